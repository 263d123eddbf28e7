/*
 * ckvgpu.h — libckvgpu: load only the important chunks of a stored prefix's
 * KV cache into GPU (or host) memory, layer by layer, with disk I/O
 * overlapped with the caller's compute (DESIGN §6).
 *
 * Where the bytes come from:
 *   - ckv_loader_open(MOUNTPOINT): connects to the ckvfs daemon's control
 *     socket (MOUNTPOINT/.ckv/ctl, docs/PROTOCOL.md), receives its arena
 *     read-only, and asks the daemon to bring chunks into it. Chunk data is
 *     never read through FUSE.
 *   - ckv_loader_open(STORE DIRECTORY): the embedded default — the same
 *     chunk engine runs in-process over the store; no daemon, no FUSE.
 * Either way chunks land in an arena (a memfd) that the CUDA backend
 * registers once (cudaHostRegister, read-only where it is the daemon's) and
 * a gather kernel copies chunk sets from it to device memory in one launch.
 *
 * Backends: CUDA (built when nvcc exists, used when a GPU is present) and
 * host (memcpy; identical semantics; what CI tests).
 *
 * Errors: 0 or a negative errno; ckv_loader_error() has a message for the
 * last failure of a call on that loader in the calling thread.
 *
 * Ownership and lifetimes:
 *   - a ckv_loader owns its connection (or engine and store), the arena
 *     mapping and the backend; close it last.
 *   - a ckv_prefix belongs to its loader and must be closed before it; it
 *     holds the prefix open on the daemon (a removed prefix stays readable
 *     through it).
 *   - a ckv_fetch belongs to its prefix; wait on it exactly once. Until
 *     ckv_fetch_wait returns, the chunks are pinned in the arena; after it
 *     returns, the copy into dst is complete in the order of `stream` (host
 *     backend: complete). Pins are dropped once the copy has executed.
 *   - destination memory is the caller's; it must stay valid until the copy
 *     executes on the stream.
 *   - a ckv_pipeline belongs to its prefix; the layer views it returns are
 *     valid until the next ckv_pipeline_layer call for a layer that reuses
 *     the same buffer slot (opts.depth layers later) or until close.
 * A loader may be used from several threads, but each prefix, fetch and
 * pipeline from one thread at a time.
 */
#ifndef CKVGPU_H
#define CKVGPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ckv_loader ckv_loader;
typedef struct ckv_prefix ckv_prefix;
typedef struct ckv_fetch ckv_fetch;
typedef struct ckv_pipeline ckv_pipeline;

typedef enum ckv_backend_kind {
	CKV_BACKEND_AUTO = 0, /* CUDA when built in and a device is present, else host */
	CKV_BACKEND_HOST = 1,
	CKV_BACKEND_CUDA = 2,
} ckv_backend_kind;

typedef struct ckv_loader_opts {
	ckv_backend_kind backend;
	int device;                /* CUDA device ordinal */
	uint64_t arena_bytes;      /* embedded: DRAM cache size (default 1 GiB) */
	int policy;                /* embedded: 0 attention-guided, 1 LRU */
	uint64_t gpu_cache_bytes;  /* GPU tier budget; 0 = no GPU tier */
} ckv_loader_opts;

int ckv_loader_open(const char *path, const ckv_loader_opts *opts, ckv_loader **out);
void ckv_loader_close(ckv_loader *l);
const char *ckv_loader_error(const ckv_loader *l);
bool ckv_loader_remote(const ckv_loader *l);          /* talking to a daemon */
ckv_backend_kind ckv_loader_backend(const ckv_loader *l);

/*
 * Counters of everything this loader fetched (ckv_fetch_* and pipelines),
 * since open. A chunk request is one chunk of one part (KV, K or V) of one
 * layer; it is served by exactly one of: the GPU tier (hits_gpu), the arena
 * (hits_arena) or a disk read (misses). bytes_k / bytes_v: bytes the misses
 * read from disk (a whole-chunk read counts half_bytes as K and the rest of
 * chunk_bytes, V and padding, as V). Whether a source get was an arena hit
 * is asked of the source just before the get (embedded: exact unless another
 * thread evicts in between; remote: every get counts as a disk read until
 * the daemon can tell).
 */
typedef struct ckv_loader_stats {
	uint64_t hits_gpu, hits_arena, misses;
	uint64_t bytes_k, bytes_v;
	uint64_t gpu_tier_bytes, gpu_tier_used; /* tier budget and bytes holding chunks */
	uint64_t gpu_tier_evictions;
} ckv_loader_stats;
void ckv_loader_get_stats(const ckv_loader *l, ckv_loader_stats *st);

/*
 * Memory of the loader's backend kind (CUDA: device memory; host: host
 * memory) and plain copies between it and host memory, so tools, tests and
 * the Python binding can provide destinations without a CUDA runtime of
 * their own. to_host / from_host are synchronous; ckv_loader_sync waits for
 * everything enqueued on stream.
 */
int ckv_loader_alloc(ckv_loader *l, uint64_t bytes, void **out);
void ckv_loader_free(ckv_loader *l, void *p);
int ckv_loader_to_host(ckv_loader *l, void *host, const void *src, uint64_t len);
int ckv_loader_from_host(ckv_loader *l, void *dst, const void *host, uint64_t len);
int ckv_loader_sync(ckv_loader *l, void *stream);
/*
 * The arena chunks are fetched through (read-only for callers; pinned and
 * registered with the backend): base and size. For tools that measure
 * copies from it and for CPU-side readers of chunks the loader pinned.
 */
const void *ckv_loader_arena(const ckv_loader *l, uint64_t *size);

/* Shape of an opened prefix (from its manifest). */
typedef struct ckv_shape {
	char hash[33];
	char model[256];
	char dtype[16];            /* "bf16", "fp16", "fp8_e4m3", "fp32" */
	uint32_t layers, kv_heads, head_dim, chunk_tokens;
	uint32_t tokens, chunks;
	uint64_t chunk_bytes;      /* padded to 4 KiB */
	uint64_t half_bytes;       /* K (or V) part of a chunk: kv_heads*chunk_tokens*head_dim*esize */
} ckv_shape;

/*
 * Longest stored prefix of tokens for a model shape given as a preset name
 * ("qwen2.5-7b") or a fingerprint-compatible description
 * "model=<id>,dtype=bf16,layers=28,kv_heads=4,head_dim=128,chunk=16[,salt=]".
 * hash receives 32 hex digits + NUL; *matched the tokens shared (0: none).
 */
int ckv_loader_match(ckv_loader *l, const char *shape, const uint32_t *tokens, uint32_t n,
		     char hash[33], uint32_t *matched);

int ckv_prefix_open(ckv_loader *l, const char *hash, ckv_prefix **out);
void ckv_prefix_close(ckv_prefix *p);
void ckv_prefix_shape(const ckv_prefix *p, ckv_shape *out);

/* ---- chunk-granular fetch ------------------------------------------------- */

enum ckv_part {
	CKV_PART_KV = 0, /* whole chunk: chunk_bytes per chunk in dst */
	CKV_PART_K = 1,  /* K half only: half_bytes per chunk in dst */
	CKV_PART_V = 2,  /* V half only */
};

/*
 * Start fetching chunks[0..n) of one layer: disk reads are issued now and
 * run in the background; the copy to dst is enqueued by ckv_fetch_wait, or
 * already here when every chunk is resident (arena or GPU tier hits), so a
 * warm fetch's transfer overlaps what the caller does until the wait. Either
 * way dst belongs to the fetch from this call until the stream has run the
 * copy.
 * Chunk chunks[i] goes to dst + i * (part == KV ? chunk_bytes : half_bytes),
 * or to dst_ptrs[i] when dst_ptrs is non-NULL. dst is device memory for the
 * CUDA backend (host memory for the host backend). stream is a cudaStream_t
 * (NULL: the default stream); ignored by the host backend.
 */
int ckv_fetch_start(ckv_prefix *p, uint32_t layer, const uint32_t *chunks, uint32_t n,
		    enum ckv_part part, void *dst, void *const *dst_ptrs, void *stream,
		    ckv_fetch **out);
/*
 * Wait for the reads, enqueue the gather (unless the start did), free the
 * handle. -EIO: a chunk failed its checksum.
 */
int ckv_fetch_wait(ckv_fetch *f);

/* Read-ahead hint: bring chunks into the arena, no copy. */
int ckv_prefetch(ckv_prefix *p, uint32_t layer, const uint32_t *chunks, uint32_t n);

/*
 * Importance feedback for retention (attention mass per chunk): goes to the
 * source (the daemon's or the embedded engine's retention, S = I x F) and
 * raises I of the chunks the GPU tier holds.
 */
int ckv_score_feedback(ckv_prefix *p, uint32_t layer, const uint32_t *chunks,
		       const float *scores, uint32_t n);

/* ---- selection ----------------------------------------------------------- */

/*
 * Chunk scores of one layer from the key digests (digest.bin: per chunk and
 * kv head the mean key) and the new tokens' queries at that layer:
 * query is fp32 [q_tokens][q_heads][head_dim] in host memory; query head h
 * maps to kv head h / (q_heads / kv_heads) (GQA). score[j] =
 * sum over tokens t, heads h of q[t][h] . digest[j][kvh(h)] / sqrt(head_dim).
 * scores receives m floats. CPU reference; the CUDA backend has the same
 * on device (ckv_digest_scores_device).
 */
int ckv_digest_scores(ckv_prefix *p, uint32_t layer, const float *query, uint32_t q_tokens,
		      uint32_t q_heads, float *scores);
/*
 * The same through the backend (CUDA: on the device): query fp32
 * [q_tokens][q_heads][head_dim] and scores [m] in backend memory; the
 * layer's digests are uploaded to backend memory the prefix keeps. Runs on
 * stream and returns once scores are written (the stream is synchronized).
 */
int ckv_digest_scores_device(ckv_prefix *p, uint32_t layer, const float *query,
			     uint32_t q_tokens, uint32_t q_heads, float *scores, void *stream);

/*
 * Exact chunk scores from keys (the K halves, host memory): for chunk i,
 * keys + i * stride holds its K half [kv_heads][chunk_tokens][head_dim] of
 * the prefix's dtype (stride half_bytes for CKV_PART_K fetches, chunk_bytes
 * for whole chunks). With k_s the keys of the chunk's valid token slots,
 *   scores[i] = sum over tokens t, heads h of max_s q[t][h] . k_s[kvh(h)] / sqrt(head_dim)
 * (softmax-free; the max says "some token of this chunk matches this query",
 * the rule top-k attention needs, and unlike a sum it is not diluted by the
 * chunk's other tokens). chunks[i] names the chunk (its valid slots: the
 * last chunk of a prefix may be partial). query as for ckv_digest_scores.
 */
int ckv_key_scores(const ckv_shape *sh, const void *keys, uint64_t stride,
		   const uint32_t *chunks, uint32_t n, const float *query, uint32_t q_tokens,
		   uint32_t q_heads, float *scores);

/*
 * Chunk scores of one layer by attention mass over the key copy (keyq.bin:
 * every chunk's keys at 3 bits, written by the store; docs/FORMAT.md): for
 * each query row (new token t, query head h) the softmax of q . k / sqrt(D)
 * over every valid key slot of the prefix, as the copy gives the keys back,
 * and, with keys, over the new tokens' own keys up to t (causal);
 * score[j] = sum over rows of the row's weight on chunk j's slots. query as
 * for ckv_digest_scores; keys fp32 [q_tokens][kv_heads][head_dim] in host
 * memory (the new tokens' post-RoPE keys) or NULL (normalise over the
 * prefix alone). scores receives m floats. Reads the layer's key copy
 * (about 9.4% of the layer's bytes for bf16) through the source (a daemon
 * sends it over the control socket, protocol version 2; -ENOTSUP from an
 * older daemon).
 */
int ckv_keyq_scores(ckv_prefix *p, uint32_t layer, const float *query, const float *keys,
		    uint32_t q_tokens, uint32_t q_heads, float *scores);
/*
 * The same through the backend (CUDA: on the device): query, keys (or
 * NULL) and scores [m] in backend memory; the layer's key copy is uploaded
 * to backend memory the prefix keeps. Runs on stream and returns once
 * scores are written (the stream is synchronized). The host backend scores
 * on the CPU (ckv_keyq_scores).
 */
int ckv_keyq_scores_device(ckv_prefix *p, uint32_t layer, const float *query, const float *keys,
			   uint32_t q_tokens, uint32_t q_heads, float *scores, void *stream);

/*
 * Top ceil(budget * m) chunks by score, always keeping chunk 0 (attention
 * sink) and chunk m-1 (most recent tokens); ascending chunk ids into out
 * (room for m); returns the count, or -EINVAL.
 */
int ckv_select_topk(const float *scores, uint32_t m, double budget, uint32_t *out);

/* ---- the layer pipeline -------------------------------------------------- */

typedef enum ckv_mode {
	CKV_MODE_FULL = 0,   /* every chunk, layer-wise pipelined */
	CKV_MODE_PERIOD = 1, /* identify at each period's first layer, load the period at once */
	CKV_MODE_LAYER = 2,  /* digests every layer, next layer speculated from the current set */
	CKV_MODE_RERANK = 3, /* digests pick r x budget candidates, exact K scores pick the winners */
} ckv_mode;
const char *ckv_mode_name(ckv_mode m);           /* "full", "period", "layer", "rerank" */
int ckv_mode_parse(const char *name, ckv_mode *out); /* 0 or -EINVAL */

/* How LAYER mode scores chunks at an identification. */
typedef enum ckv_score {
	CKV_SCORE_DIGEST = 0, /* digest.bin, ckv_digest_scores: linear in the queries */
	CKV_SCORE_KEYQ = 1,   /* keyq.bin, ckv_keyq_scores: attention mass over a 3-bit key copy */
} ckv_score;
const char *ckv_score_name(ckv_score s);            /* "digest", "keyq" */
int ckv_score_parse(const char *name, ckv_score *out); /* 0 or -EINVAL */

typedef struct ckv_pipeline_opts {
	ckv_mode mode;
	double budget;       /* fraction of chunks per layer, (0, 1] */
	uint32_t period;     /* p, default 8 */
	uint32_t subperiod;  /* sp, default 4: run-ahead bound in layers */
	uint32_t rerank;     /* r, default 2 */
	bool no_prefetch;    /* issue each layer's reads only when it is asked for */
	uint32_t q_heads;    /* query heads of the model */
	uint32_t q_tokens;   /* new tokens (suffix) */
	void *stream;        /* cudaStream_t for copies */
	uint32_t depth;      /* layer buffers (views alive at once), default 2 */
	bool period_keys;    /* PERIOD: identify from the period's first layer's keys (all of
				its K halves read, scored with ckv_key_scores) instead of digests */
	/*
	 * LAYER mode only (docs/LOADER.md, "A calibrated schedule"): budgets
	 * per layer, [layers] fractions in (0, 1] (NULL: budget at every
	 * layer; the caller keeps the array until ckv_pipeline_open returns);
	 * floor > 0: layers whose budget is <= floor take chunk 0 and the
	 * most recent chunks without identification (no side data read,
	 * their reads issued ahead as final); score: what identifications
	 * rank chunks by.
	 */
	const double *budgets;
	double floor;
	ckv_score score;
	/*
	 * > 0: the request uses only the prefix's first `tokens` tokens (a
	 * prompt that shares part of a longer stored prefix, or leaves its
	 * last token to recompute). Chunks past them are never scored,
	 * selected or read; budgets, "the last chunk" and attention mass count
	 * the first ceil(tokens / chunk_tokens) chunks only. 0: all of them.
	 */
	uint32_t tokens;
} ckv_pipeline_opts;

/* What a layer gets: its selected chunks, in device (or host) memory. */
typedef struct ckv_layer_view {
	uint32_t layer;
	uint32_t nchunks;
	const uint32_t *chunks; /* ascending chunk ids */
	void *kv;               /* [nchunks][chunk_bytes]: KV-HCD chunks, in order of chunks[] */
} ckv_layer_view;

/*
 * What is issued when (docs/LOADER.md has the full picture). "Ahead" is the
 * run-ahead: while layer l computes, reads of layers up to l + ahead may be
 * in flight, their chunks pinned in the arena; it is sp for FULL and PERIOD,
 * 1 for LAYER and RERANK, 0 with no_prefetch (each layer's reads are issued
 * by its own ckv_pipeline_layer call).
 *   FULL   every chunk of every layer; layers 0..ahead are issued at open.
 *   PERIOD at a period's first layer P the set S is identified (digests and
 *          P's query, or with period_keys all of P's K halves scored by
 *          ckv_key_scores); layers of the period within the window are
 *          issued with S at once; window layers past the period's end are
 *          issued speculatively with S (inter-period); at the next period's
 *          identification those speculative reads are reconciled: only
 *          chunks missing from them are read, the others released.
 *   LAYER  every layer identified from digests; after layer l's chunks are
 *          in, layer l+1 is issued speculatively with l's set; at l+1 only
 *          the missing chunks are read.
 *   RERANK digests pick ceil(r x budget x m) candidates whose K halves are
 *          read and scored exactly (ckv_key_scores); the top ceil(budget x m)
 *          have their V halves read; the view holds whole KV-HCD chunks
 *          assembled from both reads. Layer l+1's candidate K halves and
 *          winners' V halves are speculated with l's sets.
 * Chunks resident in the GPU tier are copied device to device and not read.
 * Layer buffers: opts.depth buffers of (largest set) x chunk_bytes from the
 * backend; a layer's gather is enqueued on opts.stream by its own call.
 */
int ckv_pipeline_open(ckv_prefix *p, const ckv_pipeline_opts *o, ckv_pipeline **out);
/*
 * Layer `layer` (0, 1, ... L-1, in order, once each) is about to compute
 * attention; query as for ckv_digest_scores (NULL allowed in FULL mode, and
 * for layers of PERIOD mode that do not start a period). Blocks until the
 * layer's chunks are in its buffer (in stream order), having issued the
 * reads for layers ahead as the mode prescribes. After a failure (-EIO: a
 * chunk failed its checksum; -ENOMEM: the arena is full of pinned chunks)
 * the pipeline only fails; close it.
 */
int ckv_pipeline_layer(ckv_pipeline *pl, uint32_t layer, const float *query,
		       ckv_layer_view *out);
/*
 * The same with the new tokens' keys at this layer, fp32
 * [q_tokens][kv_heads][head_dim] in host memory (post-RoPE), or NULL: a
 * CKV_SCORE_KEYQ identification normalises each query's attention over the
 * prefix and these keys (ckv_keyq_scores); other scores ignore them.
 */
int ckv_pipeline_layer_qk(ckv_pipeline *pl, uint32_t layer, const float *query,
			  const float *keys, ckv_layer_view *out);

/*
 * Counters of one pipeline. A chunk request is one chunk of one part (KV,
 * K or V) of one layer; each is served by one of the GPU tier (hits_gpu),
 * the arena (hits_arena) or disk (misses), counted when it is issued.
 *   read amplification = (bytes_k + bytes_v) / bytes_needed
 * (1.00 for a cold load of whole chunks without speculation: every chunk
 * read once, nothing else; reads of halves skip the padding of padded
 * geometries, so RERANK can go below 1.00 there).
 */
typedef struct ckv_pipeline_stats {
	double wait_s;              /* time ckv_pipeline_layer blocked on I/O (bubbles) */
	double total_s;             /* wall time from open to the last layer's return */
	uint64_t bytes_k, bytes_v;  /* bytes read from disk: K halves, V halves (+ padding) */
	uint64_t bytes_needed;      /* chunks_used x chunk_bytes: the chunks the views hold, as stored */
	uint64_t chunks_used;       /* sum of the views' nchunks */
	uint64_t chunks_read;       /* chunk requests sent to the source: hits_arena + misses */
	uint64_t spec_used, spec_wasted; /* speculative chunk requests whose chunk the layer used / dropped */
	uint64_t hits_gpu, hits_arena, misses;
	uint64_t identifications;   /* layers whose set was (re)computed */
	uint64_t bytes_digest;      /* side data loaded for identification: digests or key copies */
} ckv_pipeline_stats;
void ckv_pipeline_get_stats(const ckv_pipeline *pl, ckv_pipeline_stats *st);
void ckv_pipeline_close(ckv_pipeline *pl);

#ifdef __cplusplus
}
#endif
#endif
