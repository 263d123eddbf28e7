/*
 * backend.h — the copy engines of libckvgpu (internal).
 *
 * A backend moves chunks from the arena (a memfd mapped into this process;
 * read-only when it is a daemon's) to destination memory, asynchronously in
 * the order of a caller's stream, and computes digest scores. The host
 * backend does it with memcpy on the calling thread (streams ignored, every
 * call complete on return); the CUDA backend registers the arena once with
 * cudaHostRegister (cudaHostRegisterReadOnly for read-only mappings) and
 * gathers with one kernel launch per call — never one copy per chunk
 * (MEASUREMENTS.md: per-chunk cudaMemcpyAsync reaches 5-27% of the link).
 */
#ifndef CKV_BACKEND_H
#define CKV_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ckv_backend ckv_backend;

/* One chunk (or half chunk) to copy: from arena + src, len bytes, to dst. */
typedef struct ckv_copy {
	uint64_t src; /* offset in the arena */
	void *dst;    /* destination (device memory for CUDA) */
} ckv_copy;

/*
 * One layer's key copy (keyq.bin, docs/FORMAT.md) in backend memory, for
 * keyq_scores: chunk j's codes at codes + j * per decode as
 * mu + sd * levels[code] with mu and sd from its part's scales. Chunks of
 * more than CKV_KEYQ_DEV_MAX_CHUNK tokens get -ENOTSUP, as does a chunk's
 * head too large for shared memory.
 */
#define CKV_KEYQ_DEV_MAX_CHUNK 32
typedef struct ckv_keyq_dev {
	const uint8_t *codes;   /* [m][per] */
	const uint16_t *scales; /* [parts][2][kv_heads][head_dim] bf16: mu then sd */
	const uint32_t *part;   /* [m]: the part whose scales chunk j uses */
	uint64_t per;           /* code bytes per chunk */
	unsigned bits;          /* 1-4 */
	float levels[16];       /* ckv_keyq_levels(bits) */
	uint32_t m;             /* chunks */
	uint32_t tokens;        /* valid key slots: the last chunk may be partial */
	uint32_t kv_heads, head_dim, chunk_tokens;
} ckv_keyq_dev;

struct ckv_backend_ops {
	const char *name; /* "host", "cuda" */
	/* Make the arena readable by the copy engine; once per loader. */
	int (*register_arena)(ckv_backend *b, void *base, uint64_t size, bool readonly);
	void (*unregister_arena)(ckv_backend *b);
	/* Enqueue n copies of len bytes each (len a multiple of 16) on stream. */
	int (*gather)(ckv_backend *b, const ckv_copy *c, uint32_t n, uint64_t len, void *stream);
	/* Run fn(arg) on a host thread once the stream has passed this point. */
	int (*after)(ckv_backend *b, void *stream, void (*fn)(void *arg), void *arg);
	int (*sync)(ckv_backend *b, void *stream);
	/* Memory of the backend's kind (device / host). */
	int (*alloc)(ckv_backend *b, uint64_t bytes, void **out);
	void (*free)(ckv_backend *b, void *p);
	/* Copy between host memory and backend memory (tests, small tables). */
	int (*to_host)(ckv_backend *b, void *host, const void *src, uint64_t len);
	int (*from_host)(ckv_backend *b, void *dst, const void *host, uint64_t len);
	/*
	 * scores[j] = sum_t sum_h q[t][h] . dig[j][h / group] / sqrt(head_dim),
	 * q fp32 [q_tokens][q_heads][head_dim] and dig fp32 [m][kv_heads][head_dim]
	 * and scores [m], all in backend memory.
	 */
	int (*digest_scores)(ckv_backend *b, const float *q, uint32_t q_tokens, uint32_t q_heads,
			     const float *dig, uint32_t m, uint32_t kv_heads, uint32_t head_dim,
			     float *scores, void *stream);
	/*
	 * Optional: chunk scores by attention mass over a key copy, what
	 * ckv_keyq_mass_cpu computes (gpu/select.c): q fp32
	 * [q_tokens][q_heads][head_dim], keys fp32 [q_tokens][kv_heads][head_dim]
	 * or NULL, scores [m] and the arrays of k, all in backend memory. NULL
	 * where backend memory is host memory: the loader scores on the CPU.
	 */
	int (*keyq_scores)(ckv_backend *b, const ckv_keyq_dev *k, const float *q, const float *keys,
			   uint32_t q_tokens, uint32_t q_heads, float *scores, void *stream);
	/*
	 * Replay `seconds` of compute on the stream (benchmarks: per-layer
	 * compute measured on the real model, replayed so that I/O overlap is
	 * measured against it). CUDA: a spin kernel timed by %globaltimer;
	 * host: busy-wait on the calling thread.
	 */
	int (*compute)(ckv_backend *b, double seconds, void *stream);
	/*
	 * Optional (the loader's GPU tier needs it on a device backend):
	 * enqueue n copies of len bytes (a multiple of 16) from src[i] to dst[i],
	 * both backend memory, on stream: one launch, like gather. The host
	 * backend may leave it NULL (its memory is host memory: the loader
	 * copies with memcpy).
	 */
	int (*gather_dev)(ckv_backend *b, const void *const *src, void *const *dst, uint32_t n,
			  uint64_t len, void *stream);
	/*
	 * Gather (as above), then run fn(arg) as after() would once the
	 * gather has read its sources. CUDA: the kernel itself marks its
	 * completion, so no stream operation comes between one gather and the
	 * next; the host backend gathers and runs fn at once.
	 */
	int (*gather_then)(ckv_backend *b, const ckv_copy *c, uint32_t n, uint64_t len, void *stream,
			   void (*fn)(void *arg), void *arg);
	void (*destroy)(ckv_backend *b);
};

struct ckv_backend {
	const struct ckv_backend_ops *ops;
};

int ckv_backend_host(ckv_backend **out);
/* -ENODEV when built without CUDA or no device is present. */
int ckv_backend_cuda(int device, ckv_backend **out);
/* Whether this build has the CUDA backend. */
bool ckv_backend_cuda_built(void);

#ifdef __cplusplus
}
#endif
#endif
