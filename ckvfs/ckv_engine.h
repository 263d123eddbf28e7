/*
 * ckv_engine.h — the chunk engine (DESIGN §5): a DRAM arena of chunk slots
 * in one memfd, filled by io_uring O_DIRECT reads from segment layer files,
 * every chunk verified against its XXH3-64 before anyone sees it, evicted
 * by attention-guided retention (S = I x F, decayed) or LRU.
 *
 * The engine knows nothing of FUSE, prefixes or LMDB: callers register
 * "chunk files" (one layer file of one segment, with its sums) and ask for
 * (file, chunk) pairs. The FUSE front end, the control-socket server and the
 * embedded loader all sit on this API.
 *
 * Threads: all functions are thread-safe. The engine runs its own I/O
 * thread(s); completion callbacks run on them and must not block.
 * Lock order (internal): engine->lock before a file's lock; never call back
 * into the engine from a completion callback while holding your own lock
 * that ckv_engine_* might also need.
 */
#ifndef CKV_ENGINE_H
#define CKV_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct ckv_engine ckv_engine;
typedef struct ckv_efile ckv_efile;

enum ckv_policy {
	CKV_POLICY_ATTN = 0, /* evict the lowest S = I x F (decayed) */
	CKV_POLICY_LRU = 1,  /* evict the least recently used */
};

typedef struct ckv_engine_opts {
	uint64_t arena_bytes;   /* cache= ; default 1 GiB */
	enum ckv_policy policy;
	unsigned queue_depth;   /* io_uring entries; default 128 */
	double halflife_s;      /* decay of I and F; default 600 s */
	bool no_direct;         /* buffered reads (tmpfs and other stores without O_DIRECT) */
	unsigned idle_depth;    /* idle (speculative) reads in flight at most; default 16 */
	/* Log sink for checksum failures and I/O errors; default stderr. */
	void (*log)(void *arg, const char *msg);
	void *log_arg;
} ckv_engine_opts;

int ckv_engine_open(const ckv_engine_opts *o, ckv_engine **out);
/* Waits for in-flight I/O; every slot must have been released. */
void ckv_engine_close(ckv_engine *e);

/* The arena: a memfd of arena_size bytes; base is the engine's RW mapping. */
int ckv_engine_arena_fd(const ckv_engine *e);
uint64_t ckv_engine_arena_size(const ckv_engine *e);
void *ckv_engine_arena_base(const ckv_engine *e);

/*
 * Register a chunk file: dirfd/relpath (e.g. "seg/ab/<id>/layer_003.kv"),
 * its chunk size and count, and the expected XXH3-64 of each chunk (copied).
 * `key` names the physical file for retention ("<segment>/<layer>"); the
 * same key returns the same ckv_efile with its reference count raised.
 * The file is opened lazily and closed when the last reference goes.
 */
int ckv_engine_file_get(ckv_engine *e, int dirfd, const char *relpath, const char *key,
			uint64_t chunk_bytes, uint32_t nchunks, const uint64_t *sums,
			ckv_efile **out);
/*
 * The same for a part of each chunk: the engine's chunk i is chunk_bytes at
 * base + i * pitch in the file (e.g. the K half of KV-HCD chunks: len
 * half_bytes, pitch chunk_bytes, base 0; the V half: base half_bytes), with
 * sums of those parts. Reads of adjacent chunks merge only when pitch ==
 * chunk_bytes. Use a key of its own ("<segment>/<layer>/k").
 */
int ckv_engine_file_get_part(ckv_engine *e, int dirfd, const char *relpath, const char *key,
			     uint64_t chunk_bytes, uint64_t pitch, uint64_t base, uint32_t nchunks,
			     const uint64_t *sums, ckv_efile **out);
void ckv_engine_file_put(ckv_engine *e, ckv_efile *f);
const char *ckv_efile_key(const ckv_efile *f);

typedef struct ckv_chunk_ref {
	ckv_efile *file;
	uint32_t chunk;
} ckv_chunk_ref;

/* A pinned, verified chunk in the arena. */
typedef struct ckv_slot ckv_slot;
const void *ckv_slot_data(const ckv_slot *s);
uint64_t ckv_slot_offset(const ckv_slot *s); /* from the arena base */
/*
 * ckv_slot_offset() of a detached slot: a chunk outside the arena, in memory
 * of its own, freed at release. Only CKV_GET_STREAM gets return one, when
 * the arena holds nothing such a read may evict (see engine.c); use
 * ckv_slot_data() for it.
 */
#define CKV_SLOT_DETACHED UINT64_MAX
uint64_t ckv_slot_len(const ckv_slot *s);

enum {
	CKV_GET_DEMAND = 0,     /* a reader waits: goes ahead of background reads */
	CKV_GET_STREAM = 1 << 0, /* whole-file streaming (cp, rsync): must not evict important chunks */
	/*
	 * Speculative (async gets): chunks not yet in the arena are read only
	 * while no demand or background read is queued or in flight, at most
	 * opts.idle_depth at once; until their read starts they can be
	 * withdrawn with ckv_engine_cancel. A get without this flag for such a
	 * chunk makes its read a demand read.
	 */
	CKV_GET_IDLE = 1 << 1,
	/*
	 * Async gets: callbacks of chunks that complete at once (resident, or
	 * failed) may run on the calling thread before ckv_engine_get_async
	 * returns, instead of on an engine thread: no hand-off for arena hits.
	 * The caller must not hold a lock its callback takes.
	 */
	CKV_GET_INLINE = 1 << 2,
	/*
	 * ckv_engine_get_ready: all or nothing. When some chunk of the set is
	 * not resident, nothing is pinned or counted and every slots[i] is
	 * NULL; the return value is still the number not resident.
	 */
	CKV_GET_ALL = 1 << 3,
};

/*
 * Bring chunks into the arena and pin them; blocks until every chunk is
 * resident or failed. slots[i] is NULL and rcs[i] < 0 for a failed chunk
 * (-EIO checksum mismatch or read error, -ENOMEM arena full of pins).
 * Returns 0 when every chunk succeeded, else the first error.
 * Each returned slot is released with ckv_engine_release.
 */
int ckv_engine_get(ckv_engine *e, const ckv_chunk_ref *refs, size_t n, unsigned flags,
		   ckv_slot **slots, int *rcs);

/* Asynchronous form: cb(arg, i, slot, rc) once per ref, on an engine thread (CKV_GET_INLINE: see there). */
typedef void (*ckv_get_cb)(void *arg, size_t i, ckv_slot *slot, int rc);
int ckv_engine_get_async(ckv_engine *e, const ckv_chunk_ref *refs, size_t n, unsigned flags,
			 ckv_get_cb cb, void *arg);

/*
 * The synchronous part of a get, for callers that handle hits themselves:
 * every ref whose chunk is resident is pinned and counted as a get of it
 * would be (a hit, an access), slots[i] its slot; slots[i] = NULL where it
 * is not resident (being read, or not in the arena), and nothing is done
 * for it (with CKV_GET_ALL, for any of the set). One lock for the whole
 * set, no allocation, no callback. Returns the number not resident (what
 * a get must still ask for), or -EINVAL.
 */
int ckv_engine_get_ready(ckv_engine *e, const ckv_chunk_ref *refs, size_t n, unsigned flags,
			 ckv_slot **slots);

void ckv_engine_release(ckv_engine *e, ckv_slot *s);
/* The same for s[0..n) (NULL entries skipped) under one lock. */
void ckv_engine_release_n(ckv_engine *e, ckv_slot *const *s, size_t n);

/*
 * Withdraw requests of an earlier CKV_GET_IDLE ckv_engine_get_async (the
 * same cb and arg) whose reads have not started: refs[k] is the ref at
 * index idx[k] of that get. done[k] = 1 where withdrawn: that index's
 * callback comes (on an engine thread) with rc -ECANCELED and no slot, and
 * the chunk is not read for it; 0 where the read has started or ended, or
 * the chunk was already there (the callback comes as usual). The caller
 * must keep arg valid until the call returns (e.g. hold the lock its
 * callbacks take). Returns 0 or -EINVAL.
 */
int ckv_engine_cancel(ckv_engine *e, const ckv_chunk_ref *refs, const size_t *idx, size_t n,
		      ckv_get_cb cb, void *arg, uint8_t *done);

/* Read-ahead: queue background reads, return at once. */
int ckv_engine_prefetch(ckv_engine *e, const ckv_chunk_ref *refs, size_t n);

/* Importance feedback: add score to I of each chunk (resident or not). */
int ckv_engine_score(ckv_engine *e, const ckv_chunk_ref *refs, const float *scores, size_t n);

/* Whether a chunk is resident now (for tests and stats). */
bool ckv_engine_resident(ckv_engine *e, const ckv_chunk_ref *ref);
/* The same for refs[0..n) under one lock: out[i] = 1 when resident. */
void ckv_engine_resident_n(ckv_engine *e, const ckv_chunk_ref *refs, size_t n, uint8_t *out);

typedef struct ckv_engine_stats {
	uint64_t arena_bytes, arena_used, slots_used, pinned;
	uint64_t hits, misses, evictions;
	uint64_t bytes_from_disk, disk_reads; /* a merged read counts once */
	uint64_t readahead_issued, readahead_used;
	uint64_t hints, checksum_failures, io_errors;
} ckv_engine_stats;
void ckv_engine_get_stats(ckv_engine *e, ckv_engine_stats *st);

/*
 * Retention state, for persistence: iterate the (decayed) I and F of every
 * chunk the engine has scores for; load them back at start.
 */
typedef int (*ckv_retention_fn)(void *arg, const char *key, uint32_t chunk, double importance,
				double freq, int64_t last);
int ckv_engine_retention_each(ckv_engine *e, ckv_retention_fn fn, void *arg);
int ckv_engine_retention_load(ckv_engine *e, const char *key, uint32_t chunk, double importance,
			      double freq, int64_t last);

#endif
