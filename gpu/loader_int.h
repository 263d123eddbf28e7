/*
 * loader_int.h — internals shared by the files of libckvgpu's loader
 * (loader.c, select.c, gpu_tier.c, pipeline.c). Not installed.
 *
 * Pieces:
 *   - struct ckv_loader / ckv_prefix: the source, the backend, the GPU tier;
 *   - rbatch: one source get of chunks of one layer and part, whose
 *     completions land in arrays; owned by the thread that issued it;
 *   - reljob: what to undo once a gather has executed on its stream (arena
 *     pins, GPU tier pins), run by backend->after;
 *   - the digest cache of a prefix: key digests read ahead by a thread of
 *     the prefix and kept for the prefix's life (DIG_CACHE_BYTES at most);
 *   - ckv_tier: the GPU-resident chunk cache (gpu_tier.c).
 */
#ifndef CKV_LOADER_INT_H
#define CKV_LOADER_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "ckvgpu.h"
#include "source.h"

/* ---- the GPU tier (gpu_tier.c) ------------------------------------------- */

typedef struct ckv_tier ckv_tier;

/* A physical chunk of one layer: see prefix_chunk_key in loader.c. */
typedef struct ckv_tkey {
	uint64_t a, b;
} ckv_tkey;

#define CKV_TIER_NONE UINT32_MAX

int ckv_tier_create(ckv_backend *be, uint64_t budget, double halflife_s, ckv_tier **out);
void ckv_tier_destroy(ckv_tier *t);
/*
 * Look up a chunk of chunk_bytes: when it is resident (and its fill has
 * executed) pin it, count an access, return its entry id and *ptr (backend
 * memory); else CKV_TIER_NONE.
 */
uint32_t ckv_tier_lookup(ckv_tier *t, const ckv_tkey *k, uint64_t chunk_bytes, void **ptr);
/*
 * Make room for a chunk about to be copied in: returns a pinned entry in the
 * FILLING state (invisible to lookups) and *ptr to copy chunk_bytes into, or
 * CKV_TIER_NONE (already resident or filling, larger than the tier's slots,
 * or every slot pinned). ckv_tier_filled once the copy has executed.
 */
uint32_t ckv_tier_reserve(ckv_tier *t, const ckv_tkey *k, uint64_t chunk_bytes, void **ptr);
void ckv_tier_filled(ckv_tier *t, uint32_t id); /* FILLING -> resident, unpinned */
void ckv_tier_unpin(ckv_tier *t, uint32_t id);
/* The copy into a reserved entry failed: drop it. */
void ckv_tier_abort(ckv_tier *t, uint32_t id);
/* Raise I of resident chunks (attention feedback). */
void ckv_tier_score(ckv_tier *t, const ckv_tkey *k, const float *scores, uint32_t n);
void ckv_tier_usage(ckv_tier *t, uint64_t *budget, uint64_t *used, uint64_t *evictions);

/* ---- loader and prefix --------------------------------------------------- */

struct errbuf {
	struct errbuf *next; /* l->err_lock */
	char msg[512];
};

struct lstats { /* loader-wide counters, updated with relaxed atomics */
	atomic_uint_fast64_t hits_gpu, hits_arena, misses, bytes_k, bytes_v;
};

struct ckv_loader {
	ckv_source *src;         /* owned */
	ckv_backend *be;         /* owned */
	ckv_backend_kind kind;   /* HOST or CUDA, never AUTO */
	bool remote;
	bool arena_registered;
	ckv_tier *tier;          /* NULL without gpu_cache_bytes */
	/*
	 * The source has one message buffer (src->err): source calls whose
	 * failure message is read (open, match, digests, prefetch, score) run
	 * under src_lock. Gets do not (the hot path): a failed get's message may
	 * be another thread's. Leaf lock.
	 */
	pthread_mutex_t src_lock;
	pthread_key_t errkey;    /* this thread's struct errbuf */
	pthread_mutex_t err_lock; /* protects errbufs; leaf lock */
	struct errbuf *errbufs;  /* every thread's buffer, freed at close */
	atomic_uint nprefixes;   /* open prefixes (checked at close) */
	struct lstats st;
};

/* One layer's key digests in a prefix's digest cache. */
struct dig_ent {
	float *data;             /* [chunks][kv_heads][head_dim]; NULL unless READY */
	uint8_t state;           /* DIG_* */
	bool hinted;             /* QUEUED: the source was told (digests_hint) */
	uint32_t pins;           /* users of data (ckv_prefix_digests_get) */
	uint64_t stamp;          /* last use, for eviction */
	int rc;                  /* DIG_FAILED: the error */
	char err[256];           /* DIG_FAILED: its message */
};

enum { DIG_NONE = 0, DIG_QUEUED, DIG_LOADING, DIG_READY, DIG_FAILED };

/*
 * Bytes of digests a prefix keeps at most (its dig_cap): pinned layers, and
 * the layer just read, may exceed it.
 */
#define DIG_CACHE_BYTES (64ull << 20)

struct ckv_prefix {
	ckv_loader *l;
	uint32_t pid;            /* the source's handle */
	ckv_manifest *m;         /* from the source; owned */
	ckv_shape shape;
	uint32_t *ext_start;     /* [nextents + 1] first prefix chunk of each extent, or NULL */
	uint64_t *seg_hash;      /* [nextents] XXH3-64 of each extent's segment id */
	uint64_t key_base;       /* tier keys without extents: from the prefix hash */
	/* release jobs not yet run (pins outstanding); prefix close waits for 0 */
	pthread_mutex_t jobs_lock;
	pthread_cond_t jobs_cv;
	uint32_t jobs;           /* jobs_lock */
	/* ckv_digest_scores_device: digests of one layer in backend memory */
	void *dig_dev;
	uint64_t dig_dev_bytes;
	void *kq_dev;              /* ckv_keyq_scores_device: a layer's key copy in backend memory */
	uint64_t kq_dev_bytes;
	/*
	 * Digest cache: dig_lock protects dig[], the queue, dig_bytes,
	 * dig_stamp, dig_stop; the worker (dig_thread) loads queued layers
	 * without it. Lock order: dig_lock is a leaf; the worker takes
	 * l->src_lock (sources without digests_r) without holding it.
	 */
	pthread_mutex_t dig_lock;
	pthread_cond_t dig_cv;
	struct dig_ent *dig;     /* [layers] */
	uint32_t *dig_q;         /* [layers] FIFO ring of queued layers */
	uint32_t dig_qh, dig_qn;
	uint64_t dig_bytes, dig_stamp;
	uint64_t dig_cap;        /* DIG_CACHE_BYTES (tests lower it) */
	bool dig_thread_on, dig_stop;
	pthread_t dig_thread;
};

/* Set this thread's message for l and return rc (a negative errno). */
int ckv_lerr(const ckv_loader *l, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/*
 * Backend memory *buf of at least need bytes (*have: its size), grown by
 * freeing and allocating (contents lost): the scratch buffers the scorers
 * keep between calls. what names the user in the error message.
 */
int ckv_backend_reserve(ckv_loader *l, void **buf, uint64_t *have, uint64_t need,
			const char *what);

/* Bytes of one chunk request of a part. */
static inline uint64_t ckv_part_bytes(const ckv_shape *sh, enum ckv_source_part part)
{
	return part == CKV_SRC_KV ? sh->chunk_bytes : sh->half_bytes;
}

ckv_tkey ckv_prefix_chunk_key(const ckv_prefix *p, uint32_t layer, uint32_t chunk);
/* The layer's digests ([chunks][kv_heads][head_dim] fp32) from the source; message on failure. */
int ckv_prefix_digests(ckv_prefix *p, uint32_t layer, float *out);
/* The layer's key copy from the source (ckv_keyq_free it); message on failure. */
int ckv_prefix_keyq(ckv_prefix *p, uint32_t layer, struct ckv_keyq *out);
/* Bytes a key copy of one layer takes on disk: scales and codes. */
uint64_t ckv_prefix_keyq_bytes(const ckv_prefix *p, const struct ckv_keyq *k);
/* Bytes of one layer's digests. */
uint64_t ckv_prefix_digest_bytes(const ckv_prefix *p);
/*
 * Start reading a layer's digests into the prefix's digest cache in the
 * background (a thread of the prefix). Returns 1 when a read was queued,
 * 0 when the layer is cached, queued or loading already (or the thread
 * cannot start: ckv_prefix_digests_get then reads it), -EINVAL.
 */
int ckv_prefix_digests_ahead(ckv_prefix *p, uint32_t layer);
/* How ckv_prefix_digests_get found a layer. */
enum { DIG_GOT_CACHED = 0, DIG_GOT_AHEAD = 1, DIG_GOT_READ = 2 };
/*
 * The layer's digests from the cache, pinned until ckv_prefix_digests_put:
 * waits for a read in flight, or reads them on this thread (a queued read
 * not started yet is taken over). *how: DIG_GOT_CACHED (there before the
 * call), DIG_GOT_AHEAD (being read by the thread: waited *waited seconds),
 * DIG_GOT_READ (read by this call). Message on failure.
 */
int ckv_prefix_digests_get(ckv_prefix *p, uint32_t layer, const float **out, int *how,
			   double *waited);
void ckv_prefix_digests_put(ckv_prefix *p, uint32_t layer);

/* ---- reads --------------------------------------------------------------- */

/* Counters of one caller (a pipeline), beside the loader's. */
struct rstats {
	uint64_t hits_arena, misses, bytes_k, bytes_v;
};

struct rbatch {
	ckv_prefix *p;
	uint32_t layer;
	enum ckv_source_part part;
	uint32_t n;
	bool idle;             /* speculative (CKV_SRC_GET_IDLE): ckv_rbatch_withdraw applies */
	void *handle;          /* the source's name of the get, for cancel */
	struct rstats *rs;     /* the caller's counters the get was counted in, or NULL */
	uint8_t *miss;         /* [n] counted as a disk read */
	uint32_t *chunks;      /* [n] */
	uint64_t *off, *tok;   /* [n], written by the completion before pending drops */
	uint64_t *len;         /* [n], likewise */
	int *rc;               /* [n] */
	uint8_t *state;        /* [n] RB_*; owner thread only */
	uint32_t unresolved;   /* indices not RB_DONE; owner thread only */
	/*
	 * pending: completions still to come. Each completion stores its
	 * results, then decrements it; the last one sets fin and broadcasts cv
	 * under mu (a leaf lock). So a thread holding mu that sees fin == 0
	 * keeps the get's last callback from finishing, and the owner may free
	 * the batch once fin is set and mu taken once more.
	 */
	pthread_mutex_t mu;
	pthread_cond_t cv;
	atomic_uint pending;
	atomic_bool fin;
	struct rbatch *next;   /* owner's list */
};

enum {
	RB_HELD = 0, /* wanted (or not yet decided) */
	RB_DROP = 1, /* not wanted: release once complete */
	RB_DONE = 2, /* released, handed to a job, or failed */
};

/*
 * Issue a get of chunks[0..n) (n > 0) of one layer and part; counts arena
 * hits and misses into the loader and into rs (may be NULL). *out is the
 * batch even when the get failed (then every rc[i] is the error and
 * pending 0); the return value is 0 or that error.
 */
int ckv_rbatch_issue(ckv_prefix *p, uint32_t layer, enum ckv_source_part part,
		     const uint32_t *chunks, uint32_t n, struct rstats *rs, struct rbatch **out);
/*
 * The same, speculative when idle and the source can withdraw reads
 * (get_ex and cancel): its reads wait for an idle disk (CKV_SRC_GET_IDLE)
 * and ckv_rbatch_withdraw may take back those not started. rs must stay
 * valid for the batch's life.
 */
int ckv_rbatch_issue_ex(ckv_prefix *p, uint32_t layer, enum ckv_source_part part,
			const uint32_t *chunks, uint32_t n, bool idle, struct rstats *rs,
			struct rbatch **out);
/*
 * Withdraw indices idx[0..n) (held, not wanted as they are) of an idle
 * batch whose reads have not started: done[k] = 1 where withdrawn (the
 * index is dropped, nothing was read for it, and it no longer counts as a
 * disk read in the loader's and rs's counters). Returns how many.
 */
uint32_t ckv_rbatch_withdraw(struct rbatch *b, const uint32_t *idx, uint32_t n, uint8_t *done);
/* Block until every completion arrived. */
void ckv_rbatch_wait(struct rbatch *b);
/* After the wait: 0 when index i holds a pinned chunk of the right size, else -errno. */
int ckv_rbatch_check(const struct rbatch *b, uint32_t i);
bool ckv_rbatch_complete(struct rbatch *b);
/* Index i is no longer wanted; released at once if complete, else by ckv_rbatch_sweep. */
void ckv_rbatch_drop(struct rbatch *b, uint32_t i);
/* Hand index i's pin to someone else (a job); the batch forgets it. */
void ckv_rbatch_take(struct rbatch *b, uint32_t i);
/* Release dropped indices of complete batches; free batches with nothing left; returns the rest. */
struct rbatch *ckv_rbatch_sweep(struct rbatch *list);
/* Drop every index of every batch, wait, release, free (close paths). */
void ckv_rbatch_free_all(struct rbatch *list);

/* ---- copies and their release jobs --------------------------------------- */

struct reljob {
	ckv_prefix *p;
	uint32_t ntok, nunpin, nfill;
	uint64_t *tok;         /* arena pins to release */
	uint32_t *unpin;       /* tier entries to unpin */
	uint32_t *fill;        /* tier entries whose fill this job's copies wrote */
};

struct reljob *ckv_reljob_new(ckv_prefix *p, uint32_t max_tok, uint32_t max_tier);
/*
 * Run the job once the stream has passed this point (backend->after); on
 * failure synchronize the stream and run it now. Takes the job.
 */
void ckv_reljob_submit(struct reljob *j, void *stream);
/* Run it at once (nothing was enqueued, or the stream is synchronized). */
void ckv_reljob_run(struct reljob *j);
/* Synchronize stream, then run the job: where its copies could not be enqueued. */
void ckv_reljob_run_synced(struct reljob *j, void *stream);
/*
 * Enqueue the gather of cp[0..n) (len bytes each) on stream and take the
 * job, to run once that gather has read its sources (backend->gather_then;
 * its stores may still be in flight, so the job must not publish the
 * destination: no tier fills): for a gather that is the last copy the
 * job's pins guard. On failure nothing was enqueued and the job is still
 * the caller's. Returns 0 or the backend's -errno.
 */
int ckv_reljob_gather(struct reljob *j, const ckv_copy *cp, uint32_t n, uint64_t len, void *stream);

/* Copies between backend memory (the GPU tier): backend->gather_dev or memcpy on host. */
int ckv_copy_dev(ckv_loader *l, const void *const *src, void *const *dst, uint32_t n,
		 uint64_t len, void *stream);

/* Monotonic seconds. */
double ckv_now(void);

/* ---- pipeline counters beyond ckvgpu.h's (tests, tools) ------------------- */

struct ckv_pipeline_xstats {
	uint64_t spec_withdrawn; /* speculative requests dropped before their read started (not read) */
	uint64_t spec_promoted;  /* speculative requests needed before their read started: read as ordinary ones */
	uint64_t dig_ahead;      /* identifications whose digests were asked for ahead */
	uint64_t dig_cached;     /* ... found in the prefix's cache, read before this pipeline */
	uint64_t dig_read;       /* ... read when the layer was identified */
	double dig_wait_s;       /* time identifications waited for digests (read or being read) */
};
void ckv_pipeline_get_xstats(const ckv_pipeline *pl, struct ckv_pipeline_xstats *x);

/* ---- selection helpers (select.c) ---------------------------------------- */

/*
 * What ckv_keyq_mass_cpu computes, on the backend (which must have
 * keyq_scores): query, keys (or NULL) and scores in backend memory; the
 * first sh->chunks chunks of kq (layer's) are uploaded to the prefix's
 * buffer. Runs on stream and synchronizes it. Errors, naming the layer, are
 * set on the loader.
 */
int ckv_keyq_mass_dev(ckv_prefix *p, uint32_t layer, const ckv_shape *sh,
		      const struct ckv_keyq *kq, const float *query, const float *keys,
		      uint32_t q_tokens, uint32_t q_heads, float *scores, void *stream);
/*
 * Attention-mass scores of a layer's chunks from its key copy (ckvgpu.h,
 * ckv_keyq_scores): 0, or -ENOMEM.
 */
int ckv_keyq_mass_cpu(const ckv_shape *sh, const struct ckv_keyq *kq, const float *query,
		      const float *keys, uint32_t q_tokens, uint32_t q_heads, float *scores);
/* Digest scores of one layer from host digests: the CPU reference. */
void ckv_digest_scores_cpu(const float *dig, uint32_t m, uint32_t kv_heads, uint32_t head_dim,
			   const float *query, uint32_t q_tokens, uint32_t q_heads, float *scores);
/* Chunk j's valid token slots in a prefix of `tokens` tokens. */
static inline uint32_t ckv_chunk_valid(const ckv_shape *sh, uint32_t j)
{
	uint64_t first = (uint64_t)j * sh->chunk_tokens;
	uint64_t left = sh->tokens > first ? sh->tokens - first : 0;
	return left < sh->chunk_tokens ? (uint32_t)left : sh->chunk_tokens;
}
/* Largest count ckv_select_topk returns for m chunks at budget. */
uint32_t ckv_select_count(uint32_t m, double budget);

#endif
