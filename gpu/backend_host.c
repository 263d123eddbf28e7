/*
 * backend_host.c — the host backend of libckvgpu (backend.h).
 *
 * memcpy on the calling thread: every call is complete when it returns,
 * streams are ignored, `after` runs its function at once. It checks its
 * arguments exactly as the CUDA backend does (16-byte multiples and
 * alignment, copies inside the arena), so a loader that passes CI on this
 * backend does not first fail on a GPU.
 *
 * Built without CUDA (no CKV_HAVE_CUDA), this file also supplies the CUDA
 * entry points as stubs that say "no device".
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"

/* Longest copy the CUDA kernel takes (its vector index is 32-bit); the same here. */
#define CKV_GATHER_MAX_LEN (1ull << 30)

struct host_backend {
	ckv_backend base; /* first: a ckv_backend * is a struct host_backend * */
	/* set by register_arena, before any gather; read-only afterwards */
	const unsigned char *arena;
	uint64_t arena_size;
};

static struct host_backend *hb(ckv_backend *b)
{
	return (struct host_backend *)b;
}

static int host_register_arena(ckv_backend *b, void *base, uint64_t size, bool readonly)
{
	(void)readonly; /* memcpy only reads the arena either way */
	if (!base || size == 0)
		return -EINVAL;
	if (hb(b)->arena)
		return -EBUSY;
	hb(b)->arena = base;
	hb(b)->arena_size = size;
	return 0;
}

static void host_unregister_arena(ckv_backend *b)
{
	hb(b)->arena = NULL;
	hb(b)->arena_size = 0;
}

/*
 * Same rules as the CUDA gather kernel, which moves 16-byte vectors: len a
 * non-zero multiple of 16, src and dst 16-byte aligned, every source range
 * inside the arena. All copies are checked before any is made, so a
 * rejected call changes nothing.
 */
static int host_gather(ckv_backend *b, const ckv_copy *c, uint32_t n, uint64_t len, void *stream)
{
	const struct host_backend *h = hb(b);

	(void)stream;
	if (len == 0 || len % 16 || len > CKV_GATHER_MAX_LEN || (n && !c))
		return -EINVAL;
	if (!h->arena)
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++) {
		if (c[i].src % 16 || (uintptr_t)c[i].dst % 16 || !c[i].dst)
			return -EINVAL;
		if (c[i].src > h->arena_size || len > h->arena_size - c[i].src)
			return -EINVAL;
	}
	for (uint32_t i = 0; i < n; i++)
		memcpy(c[i].dst, h->arena + c[i].src, len);
	return 0;
}

static int host_after(ckv_backend *b, void *stream, void (*fn)(void *arg), void *arg)
{
	(void)b;
	(void)stream;
	if (!fn)
		return -EINVAL;
	fn(arg); /* everything enqueued before has completed already */
	return 0;
}

static int host_gather_then(ckv_backend *b, const ckv_copy *c, uint32_t n, uint64_t len,
			    void *stream, void (*fn)(void *arg), void *arg)
{
	int rc = fn ? host_gather(b, c, n, len, stream) : -EINVAL;

	return rc ? rc : host_after(b, stream, fn, arg);
}

static int host_sync(ckv_backend *b, void *stream)
{
	(void)b;
	(void)stream;
	return 0;
}

static int host_alloc(ckv_backend *b, uint64_t bytes, void **out)
{
	(void)b;
	*out = NULL;
	if (bytes == 0)
		return 0; /* as cudaMalloc: success, NULL */
	if (bytes > SIZE_MAX - 4095)
		return -ENOMEM;
	*out = aligned_alloc(4096, (bytes + 4095) & ~(uint64_t)4095);
	return *out ? 0 : -ENOMEM;
}

static void host_free(ckv_backend *b, void *p)
{
	(void)b;
	free(p);
}

static int host_to_host(ckv_backend *b, void *host, const void *src, uint64_t len)
{
	(void)b;
	if (len && (!host || !src))
		return -EINVAL;
	if (len)
		memcpy(host, src, len);
	return 0;
}

static int host_from_host(ckv_backend *b, void *dst, const void *host, uint64_t len)
{
	return host_to_host(b, dst, host, len);
}

/*
 * fp32, in the order the CUDA kernels use: first qk[kvh][d], the query
 * summed over tokens and over the query heads of kv head kvh's group, then
 * one dot product per chunk. Summing the query first makes the cost
 * q_tokens*q_heads*head_dim + m*kv_heads*head_dim instead of their product.
 */
static int host_digest_scores(ckv_backend *b, const float *q, uint32_t q_tokens, uint32_t q_heads,
			      const float *dig, uint32_t m, uint32_t kv_heads, uint32_t head_dim,
			      float *scores, void *stream)
{
	size_t qk_n, row;
	float *qk;

	(void)b;
	(void)stream;
	if (!q_heads || !kv_heads || !head_dim || q_heads % kv_heads)
		return -EINVAL;
	if (m == 0)
		return 0;
	if (!dig || !scores || (q_tokens && !q))
		return -EINVAL;
	if (__builtin_mul_overflow((size_t)kv_heads, (size_t)head_dim, &qk_n) ||
	    __builtin_mul_overflow((size_t)q_heads, (size_t)head_dim, &row))
		return -EOVERFLOW;
	qk = calloc(qk_n, sizeof(*qk));
	if (!qk)
		return -ENOMEM;

	uint32_t group = q_heads / kv_heads;

	for (uint32_t t = 0; t < q_tokens; t++) {
		const float *qt = q + (size_t)t * row;

		for (uint32_t h = 0; h < q_heads; h++) {
			float *acc = qk + (size_t)(h / group) * head_dim;
			const float *qh = qt + (size_t)h * head_dim;

			for (uint32_t d = 0; d < head_dim; d++)
				acc[d] += qh[d];
		}
	}

	float inv = 1.0f / sqrtf((float)head_dim);

	for (uint32_t j = 0; j < m; j++) {
		const float *dj = dig + (size_t)j * qk_n;
		float s = 0.0f;

		for (size_t e = 0; e < qk_n; e++)
			s += qk[e] * dj[e];
		scores[j] = s * inv;
	}
	free(qk);
	return 0;
}

/* Host memory is the backend's memory: the same rules as gather, then memcpy. */
static int host_gather_dev(ckv_backend *b, const void *const *src, void *const *dst, uint32_t n,
			   uint64_t len, void *stream)
{
	(void)b;
	(void)stream;
	if (len == 0 || len % 16 || len > CKV_GATHER_MAX_LEN || (n && (!src || !dst)))
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++)
		if (!src[i] || !dst[i] || (uintptr_t)src[i] % 16 || (uintptr_t)dst[i] % 16)
			return -EINVAL;
	for (uint32_t i = 0; i < n; i++)
		memcpy(dst[i], src[i], len);
	return 0;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Busy-wait: a replayed compute phase keeps this thread (as a CPU engine's would) busy. */
static int host_compute(ckv_backend *b, double seconds, void *stream)
{
	(void)b;
	(void)stream;
	if (!(seconds >= 0.0) || seconds > 3600.0)
		return -EINVAL; /* also NaN */
	double end = now_s() + seconds;

	while (now_s() < end)
		;
	return 0;
}

static void host_destroy(ckv_backend *b)
{
	free(b);
}

static const struct ckv_backend_ops host_ops = {
	.name = "host",
	.register_arena = host_register_arena,
	.unregister_arena = host_unregister_arena,
	.gather = host_gather,
	.after = host_after,
	.sync = host_sync,
	.alloc = host_alloc,
	.free = host_free,
	.to_host = host_to_host,
	.from_host = host_from_host,
	.digest_scores = host_digest_scores,
	.compute = host_compute,
	.gather_dev = host_gather_dev,
	.gather_then = host_gather_then,
	.destroy = host_destroy,
};

int ckv_backend_host(ckv_backend **out)
{
	struct host_backend *h = calloc(1, sizeof(*h));

	*out = NULL;
	if (!h)
		return -ENOMEM;
	h->base.ops = &host_ops;
	*out = &h->base;
	return 0;
}

#ifndef CKV_HAVE_CUDA
/* Built without nvcc: gpu/cuda/backend_cuda.cu, which defines these, is not in the library. */
bool ckv_backend_cuda_built(void)
{
	return false;
}

int ckv_backend_cuda(int device, ckv_backend **out)
{
	(void)device;
	*out = NULL;
	return -ENODEV;
}
#endif
