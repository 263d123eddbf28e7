/*
 * test_backend_cuda.c — the CUDA backend (gpu/cuda/backend_cuda.cu) on a
 * real device; exits 77 where cudaGetDeviceCount fails or finds none.
 *
 * Arenas are memfds as the loader sees them: one reopened O_RDONLY through
 * /proc/self/fd and mapped PROT_READ (a daemon's arena, registered with
 * cudaHostRegisterReadOnly), one mapped read-write (the embedded engine's).
 * Random chunk sets of 8, 32 and 64 KiB (whole and halves, in each size of
 * kernel-parameter block and many enough to need the descriptor ring) are
 * gathered into poisoned device memory in shuffled order and compared byte
 * for byte with the arena; a 4 KiB ring with many gathers in flight on two
 * streams checks that ring space is reused only after its kernel ran;
 * gather_then's callbacks wait for their gathers (held behind a gate); digest
 * scores are compared with a double-precision reference and scatter_paged
 * with a CPU scatter, from the arena and from device memory.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cuda_runtime_api.h>

#include "backend.h"
#include "ckv_cuda.h"

#include "../unit/check.h"

#define CHECK_CU(expr)                                                               \
	do {                                                                         \
		cudaError_t e_ = (expr);                                             \
		if (e_ != cudaSuccess) {                                             \
			fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,    \
				cudaGetErrorString(e_));                             \
			exit(1);                                                     \
		}                                                                    \
	} while (0)

#define ARENA_BYTES (64u << 20)
#define POISON 0xa5

/* CUDA under ASan needs the shadow gap unprotected (the driver maps there). */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
	return "protect_shadow_gap=0";
}

static uint64_t rnd(uint64_t *s)
{
	/* splitmix64 */
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static float frand(uint64_t *s)
{
	return (float)((double)(rnd(s) >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
}

struct arena {
	int fd;
	unsigned char *rw;       /* writable mapping: fills it, and is the reference */
	const unsigned char *ro; /* PROT_READ mapping of an O_RDONLY reopen, or NULL */
	void *reg;               /* what the backend registers */
};

static void arena_make(struct arena *a, bool readonly, uint64_t seed)
{
	char path[64];

	a->fd = memfd_create(readonly ? "ckv-test-ro" : "ckv-test-rw", MFD_CLOEXEC);
	CHECK(a->fd >= 0);
	CHECK(ftruncate(a->fd, ARENA_BYTES) == 0);
	a->rw = mmap(NULL, ARENA_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, a->fd, 0);
	CHECK(a->rw != MAP_FAILED);
	for (size_t i = 0; i < ARENA_BYTES; i += 8) {
		uint64_t v = rnd(&seed);

		memcpy(a->rw + i, &v, 8);
	}
	a->ro = NULL;
	a->reg = a->rw;
	if (readonly) {
		/* as a loader gets the daemon's arena: a read-only file, a read-only map */
		snprintf(path, sizeof(path), "/proc/self/fd/%d", a->fd);
		int rfd = open(path, O_RDONLY | O_CLOEXEC);

		CHECK(rfd >= 0);
		a->ro = mmap(NULL, ARENA_BYTES, PROT_READ, MAP_SHARED, rfd, 0);
		CHECK(a->ro != MAP_FAILED);
		close(rfd);
		a->reg = (void *)a->ro;
	}
}

static void arena_free(struct arena *a)
{
	if (a->ro)
		munmap((void *)a->ro, ARENA_BYTES);
	munmap(a->rw, ARENA_BYTES);
	close(a->fd);
}

static void shuffle(uint32_t *p, uint32_t n, uint64_t *seed)
{
	for (uint32_t i = 0; i < n; i++)
		p[i] = i;
	for (uint32_t i = n; i > 1; i--) {
		uint32_t j = (uint32_t)(rnd(seed) % i), t = p[i - 1];

		p[i - 1] = p[j];
		p[j] = t;
	}
}

/*
 * Random chunk sets, whole and halves, into poisoned device memory in
 * shuffled order; chunks of 8, 32, 64 KiB and an odd 16 KiB + 32 bytes.
 */
static void test_gather_sets(ckv_backend *b, const struct arena *a, cudaStream_t st,
			     uint64_t *seed)
{
	static const uint64_t sizes[] = { 8192, 32768, 65536, 16416 };
	const uint32_t max_n = 2600;
	unsigned char *dev, *host = malloc((size_t)max_n * 65536);
	ckv_copy *c = malloc(max_n * sizeof(*c));
	uint32_t *perm = malloc(max_n * sizeof(*perm));

	CHECK(host && c && perm);
	CHECK_RC(b->ops->alloc(b, (uint64_t)max_n * 65536, (void **)&dev));
	for (int si = 0; si < 4; si++) {
		uint64_t cs = sizes[si], slots = ARENA_BYTES / cs;

		for (int it = 0; it < 24; it++) {
			/* each parameter block (up to 128, 508, 2044 copies) and the ring past it */
			static const uint32_t lo[] = { 1, 129, 509, 2045 }, hi[] = { 128, 508, 2044, 2600 };
			uint32_t n = lo[it % 4] + (uint32_t)(rnd(seed) % (hi[it % 4] - lo[it % 4] + 1));
			bool half = it % 8 >= 4;
			uint64_t len = half ? cs / 2 : cs;

			CHECK_CU(cudaMemsetAsync(dev, POISON, (size_t)n * len, st));
			shuffle(perm, n, seed);
			for (uint32_t i = 0; i < n; i++) {
				c[i].src = rnd(seed) % slots * cs + (half && rnd(seed) % 2 ? cs / 2 : 0);
				c[i].dst = dev + (uint64_t)perm[i] * len;
			}
			CHECK_RC(b->ops->gather(b, c, n, len, st));
			CHECK_RC(b->ops->sync(b, st));
			CHECK_RC(b->ops->to_host(b, host, dev, (uint64_t)n * len));
			for (uint32_t i = 0; i < n; i++) {
				if (memcmp(host + (uint64_t)perm[i] * len, a->rw + c[i].src, len)) {
					fprintf(stderr, "gather %s: chunk %llu B, n %u, copy %u (src %llu) differs\n",
						a->ro ? "ro" : "rw", (unsigned long long)len, n, i,
						(unsigned long long)c[i].src);
					exit(1);
				}
			}
		}
	}
	b->ops->free(b, dev);
	free(perm);
	free(c);
	free(host);
}

/*
 * Gathers that overlap the kernel before them must still keep stream order
 * for their destinations: back to back with nothing between, A writes D,
 * a device-to-device gather copies D to E (reads what A wrote), B writes D
 * again (after that read; and last). D must hold B's chunks and E A's.
 */
static void count_call(void *arg)
{
	__atomic_add_fetch((int *)arg, 1, __ATOMIC_SEQ_CST);
}

/* The arena gathers of the order tests: plain, or with a completion callback. */
static void gather_maybe_then(ckv_backend *b, const ckv_copy *c, uint32_t n, uint64_t len,
			      cudaStream_t st, bool then, int *calls)
{
	if (then)
		CHECK_RC(b->ops->gather_then(b, c, n, len, st, count_call, calls));
	else
		CHECK_RC(b->ops->gather(b, c, n, len, st));
}

static void test_overlap_order(ckv_backend *b, const struct arena *a, cudaStream_t st,
			       bool then, uint64_t *seed)
{
	int calls = 0;
	const uint32_t n = 100;
	const uint64_t len = 32768, slots = ARENA_BYTES / len;
	ckv_copy ca[100], cb[100];
	const void *src[100];
	void *dst[100];
	unsigned char *d, *e, *host = malloc(2 * n * len);

	CHECK(host);
	CHECK_RC(b->ops->alloc(b, 2 * n * len, (void **)&d));
	e = d + n * len;
	for (uint32_t i = 0; i < n; i++) {
		src[i] = d + i * len;
		dst[i] = e + i * len;
	}
	for (int it = 0; it < 50; it++) {
		for (uint32_t i = 0; i < n; i++) {
			ca[i].src = rnd(seed) % slots * len;
			ca[i].dst = d + i * len;
			cb[i].src = rnd(seed) % slots * len;
			cb[i].dst = d + i * len;
		}
		gather_maybe_then(b, ca, n, len, st, then, &calls);
		CHECK_RC(b->ops->gather_dev(b, src, dst, n, len, st));
		gather_maybe_then(b, cb, n, len, st, then, &calls);
		CHECK_RC(b->ops->sync(b, st));
		CHECK(__atomic_load_n(&calls, __ATOMIC_SEQ_CST) == (then ? 2 * (it + 1) : 0));
		CHECK_RC(b->ops->to_host(b, host, d, 2 * n * len));
		for (uint32_t i = 0; i < n; i++) {
			CHECK(memcmp(host + i * len, a->rw + cb[i].src, len) == 0);
			CHECK(memcmp(host + (n + i) * len, a->rw + ca[i].src, len) == 0);
		}
	}
	b->ops->free(b, d);
	free(host);
}

/*
 * With at most 128 copies in kernel parameters, 200-copy sets go through
 * the ring. A 4 KiB ring holds one such descriptor set (3.2 KiB) at a time, so
 * each of these gathers must wait until the previous kernel has run before
 * its descriptors are staged: with a missing wait, a kernel would read the
 * next gather's descriptors and copy the wrong chunks. The caller's array is
 * scribbled over right after each call (the backend copied it). The last
 * gather, bigger than the ring, grows it.
 */
static void test_ring_reuse(ckv_backend *b, const struct arena *a, cudaStream_t st[2],
			    uint64_t *seed)
{
	const uint32_t rounds = 48, per = 200, big = 5000;
	const uint64_t len = 8192, slots = ARENA_BYTES / len;
	uint64_t total = (uint64_t)rounds * per + big;
	uint64_t *src = malloc(total * sizeof(*src));
	unsigned char *dev, *host = malloc(total * len);
	ckv_copy *c = malloc(big * sizeof(*c));
	ckv_cuda_gather_cfg cfg, small;

	CHECK(src && host && c);
	ckv_cuda_get_gather_cfg(b, &cfg);
	small = cfg;
	small.ring_bytes = 4096;
	small.inline_max = 128;
	CHECK_RC(ckv_cuda_set_gather_cfg(b, &small));
	CHECK_RC(b->ops->alloc(b, total * len, (void **)&dev));
	CHECK_CU(cudaMemset(dev, POISON, total * len));
	for (uint64_t i = 0; i < total; i++)
		src[i] = rnd(seed) % slots * len;
	for (uint32_t r = 0; r <= rounds; r++) {
		uint32_t n = r < rounds ? per : big;
		uint64_t first = (uint64_t)r * per;

		for (uint32_t i = 0; i < n; i++)
			c[i] = (ckv_copy){ .src = src[first + i], .dst = dev + (first + i) * len };
		CHECK_RC(b->ops->gather(b, c, n, len, st[r % 2]));
		for (uint32_t i = 0; i < n; i++)
			c[i] = (ckv_copy){ .src = 0, .dst = dev }; /* the backend has its own copy */
	}
	CHECK_RC(b->ops->sync(b, st[0]));
	CHECK_RC(b->ops->sync(b, st[1]));
	CHECK_RC(b->ops->to_host(b, host, dev, total * len));
	for (uint64_t i = 0; i < total; i++) {
		if (memcmp(host + i * len, a->rw + src[i], len)) {
			fprintf(stderr, "ring reuse: copy %llu differs\n", (unsigned long long)i);
			exit(1);
		}
	}
	ckv_cuda_get_gather_cfg(b, &small);
	CHECK(small.ring_bytes >= big * sizeof(ckv_copy)); /* grew */
	CHECK_RC(ckv_cuda_set_gather_cfg(b, &cfg));
	b->ops->free(b, dev);
	free(c);
	free(host);
	free(src);
}

static void test_gather_rules(ckv_backend *b)
{
	unsigned char *dev, host[2 * 8192];
	ckv_copy c[2];

	CHECK_RC(b->ops->alloc(b, 2 * 8192, (void **)&dev));
	CHECK_CU(cudaMemset(dev, POISON, 2 * 8192));
	c[0] = (ckv_copy){ .src = 0, .dst = dev };
	c[1] = (ckv_copy){ .src = ARENA_BYTES - 8192, .dst = dev + 8192 };
	CHECK(b->ops->gather(b, c, 2, 0, NULL) == -EINVAL);
	CHECK(b->ops->gather(b, c, 2, 8200, NULL) == -EINVAL);
	CHECK(b->ops->gather(b, c, 2, 16384, NULL) == -EINVAL);
	c[1].src = UINT64_MAX - 4095;
	CHECK(b->ops->gather(b, c, 2, 8192, NULL) == -EINVAL);
	c[1] = (ckv_copy){ .src = 8192, .dst = dev + 8192 + 8 };
	CHECK(b->ops->gather(b, c, 2, 8192, NULL) == -EINVAL);
	CHECK_RC(b->ops->sync(b, NULL));
	CHECK_RC(b->ops->to_host(b, host, dev, sizeof(host)));
	for (size_t i = 0; i < sizeof(host); i++)
		CHECK(host[i] == POISON);
	b->ops->free(b, dev);
}

static void digest_ref(const float *q, uint32_t T, uint32_t hq, const float *dig, uint32_t m,
		       uint32_t hkv, uint32_t d, double *out)
{
	uint32_t g = hq / hkv;

	for (uint32_t j = 0; j < m; j++) {
		double s = 0;

		for (uint32_t t = 0; t < T; t++)
			for (uint32_t h = 0; h < hq; h++)
				for (uint32_t k = 0; k < d; k++)
					s += (double)q[((size_t)t * hq + h) * d + k] *
					     (double)dig[((size_t)j * hkv + h / g) * d + k];
		out[j] = s / sqrt((double)d);
	}
}

static void test_digest(ckv_backend *b, cudaStream_t st, uint64_t *seed)
{
	static const uint32_t shapes[][5] = {
		/* T, Hq, Hkv, D, m */
		{ 1, 2, 2, 64, 1 },     { 37, 8, 2, 64, 100 },   { 300, 28, 4, 128, 257 },
		{ 5, 14, 2, 64, 513 },  { 64, 4, 4, 128, 33 },   { 2000, 8, 2, 64, 40 },
	};

	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
		uint32_t T = shapes[si][0], hq = shapes[si][1], hkv = shapes[si][2];
		uint32_t d = shapes[si][3], m = shapes[si][4];
		size_t nq = (size_t)T * hq * d, nd = (size_t)m * hkv * d;
		float *q = malloc(nq * sizeof(*q)), *dig = malloc(nd * sizeof(*dig));
		float *sc = malloc(m * sizeof(*sc)), *dq, *ddig, *dsc;
		double *ref = malloc(m * sizeof(*ref)), err = 0, norm = 0;

		CHECK(q && dig && sc && ref);
		for (size_t i = 0; i < nq; i++)
			q[i] = frand(seed);
		for (size_t i = 0; i < nd; i++)
			dig[i] = frand(seed);
		CHECK_RC(b->ops->alloc(b, nq * sizeof(float), (void **)&dq));
		CHECK_RC(b->ops->alloc(b, nd * sizeof(float), (void **)&ddig));
		CHECK_RC(b->ops->alloc(b, m * sizeof(float), (void **)&dsc));
		CHECK_RC(b->ops->from_host(b, dq, q, nq * sizeof(float)));
		CHECK_RC(b->ops->from_host(b, ddig, dig, nd * sizeof(float)));
		CHECK_CU(cudaMemset(dsc, 0xff, m * sizeof(float))); /* NaN */
		CHECK_RC(b->ops->digest_scores(b, dq, T, hq, ddig, m, hkv, d, dsc, st));
		CHECK_RC(b->ops->sync(b, st));
		CHECK_RC(b->ops->to_host(b, sc, dsc, m * sizeof(float)));
		digest_ref(q, T, hq, dig, m, hkv, d, ref);
		for (uint32_t j = 0; j < m; j++) {
			CHECK(isfinite(sc[j]));
			err += (sc[j] - ref[j]) * (sc[j] - ref[j]);
			norm += ref[j] * ref[j];
		}
		fprintf(stderr, "digest T=%u Hq=%u Hkv=%u D=%u m=%u: rel err %.3g\n", T, hq, hkv, d,
			m, sqrt(err / norm));
		CHECK(sqrt(err / norm) < 1e-5);
		b->ops->free(b, dq);
		b->ops->free(b, ddig);
		b->ops->free(b, dsc);
		free(q);
		free(dig);
		free(sc);
		free(ref);
	}
}

/*
 * scatter_paged against a CPU scatter of the same bytes. Slots are a random
 * permutation of the cache's slots; the last chunk is partial (-1 tail), a
 * few tokens are -1 or past the cache, which must leave the poison alone.
 */
static void test_scatter(ckv_backend *b, const struct arena *a, cudaStream_t st, uint64_t *seed)
{
	static const struct {
		uint32_t heads, dim, c, es, bs;
		bool flashinfer;  /* [blocks][2][bs][H][D]: strided K and V caches */
		bool from_device; /* chunks gathered to device memory first */
	} cases[] = {
		{ 2, 64, 16, 2, 16, false, false }, { 4, 128, 16, 1, 32, false, true },
		{ 2, 64, 16, 4, 16, true, false },  { 3, 10, 16, 2, 16, false, false },
		{ 8, 128, 16, 2, 16, true, true },  { 1, 64, 32, 2, 8, false, false },
	};

	for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
		uint32_t H = cases[ci].heads, D = cases[ci].dim, c = cases[ci].c;
		uint32_t es = cases[ci].es, bs = cases[ci].bs;
		uint64_t row = (uint64_t)D * es, half = row * H * c;
		uint64_t chunk_bytes = (2 * half + 4095) / 4096 * 4096;
		uint32_t n = 300 + (uint32_t)(rnd(seed) % 200);
		uint64_t ntok = (uint64_t)n * c, nblocks = (ntok + 100 + bs - 1) / bs;
		uint64_t dense = (uint64_t)bs * H * row;
		uint64_t stride = cases[ci].flashinfer ? 2 * dense : dense;
		uint64_t cache_bytes = nblocks * stride; /* one allocation holds K (and V when interleaved) */
		uint64_t *src = malloc(n * sizeof(*src));
		int64_t *slot = malloc(ntok * sizeof(*slot));
		uint32_t *perm = malloc(nblocks * bs * sizeof(*perm));
		unsigned char *kref = malloc(cache_bytes), *vref = malloc(cache_bytes);
		unsigned char *kout = malloc(cache_bytes), *vout = malloc(cache_bytes);
		unsigned char *dk, *dv, *dslot, *dchunks = NULL;

		CHECK(src && slot && perm && kref && vref && kout && vout);
		for (uint32_t i = 0; i < n; i++)
			src[i] = rnd(seed) % (ARENA_BYTES / chunk_bytes) * chunk_bytes;
		shuffle(perm, (uint32_t)(nblocks * bs), seed);
		for (uint64_t t = 0; t < ntok; t++) {
			uint64_t r = rnd(seed) % 64;

			slot[t] = r == 0 ? -1 : r == 1 ? (int64_t)(nblocks * bs + rnd(seed) % 9) : perm[t];
		}
		for (uint64_t t = ntok - c / 3; t < ntok; t++)
			slot[t] = -1; /* partial last chunk */

		/* CPU reference */
		memset(kref, POISON, cache_bytes);
		memset(vref, POISON, cache_bytes);
		unsigned char *vbase = cases[ci].flashinfer ? kref + dense : vref;

		for (uint32_t i = 0; i < n; i++)
			for (uint32_t h = 0; h < H; h++)
				for (uint32_t t = 0; t < c; t++) {
					int64_t s = slot[(uint64_t)i * c + t];

					if (s < 0 || (uint64_t)s >= nblocks * bs)
						continue;
					uint64_t o = (uint64_t)s / bs * stride + (uint64_t)s % bs * H * row +
						     h * row;
					const unsigned char *k = a->rw + src[i] + (h * c + t) * row;

					memcpy(kref + o, k, row);
					memcpy(vbase + o, k + half, row);
				}

		CHECK_RC(b->ops->alloc(b, cache_bytes, (void **)&dk));
		CHECK_RC(b->ops->alloc(b, cache_bytes, (void **)&dv));
		CHECK_RC(b->ops->alloc(b, ntok * sizeof(*slot), (void **)&dslot));
		CHECK_CU(cudaMemset(dk, POISON, cache_bytes));
		CHECK_CU(cudaMemset(dv, POISON, cache_bytes));
		CHECK_RC(b->ops->from_host(b, dslot, slot, ntok * sizeof(*slot)));

		ckv_paged_geom g = {
			.kv_heads = H, .head_dim = D, .chunk_tokens = c, .elem_bytes = es,
			.block_size = bs, .num_blocks = nblocks,
			.block_stride = cases[ci].flashinfer ? stride : 0,
		};
		void *vcache = cases[ci].flashinfer ? (void *)(dk + dense) : (void *)dv;

		if (cases[ci].from_device) {
			ckv_copy *cp = malloc(n * sizeof(*cp));
			uint64_t *off = malloc(n * sizeof(*off));

			CHECK(cp && off);
			CHECK_RC(b->ops->alloc(b, n * chunk_bytes, (void **)&dchunks));
			for (uint32_t i = 0; i < n; i++) {
				cp[i] = (ckv_copy){ .src = src[i], .dst = dchunks + i * chunk_bytes };
				off[i] = i * chunk_bytes;
			}
			CHECK_RC(b->ops->gather(b, cp, n, chunk_bytes, st));
			CHECK_RC(ckv_cuda_scatter_paged(b, dchunks, off, n, &g, (const int64_t *)dslot,
							dk, vcache, st));
			free(off);
			free(cp);
		} else {
			CHECK_RC(ckv_cuda_scatter_paged(b, NULL, src, n, &g, (const int64_t *)dslot, dk,
							vcache, st));
		}
		CHECK_RC(b->ops->sync(b, st));
		CHECK_RC(b->ops->to_host(b, kout, dk, cache_bytes));
		CHECK_RC(b->ops->to_host(b, vout, dv, cache_bytes));
		if (memcmp(kout, kref, cache_bytes) || memcmp(vout, vref, cache_bytes)) {
			fprintf(stderr, "scatter case %zu (H=%u D=%u c=%u es=%u bs=%u) differs\n", ci, H,
				D, c, es, bs);
			exit(1);
		}
		if (dchunks)
			b->ops->free(b, dchunks);
		b->ops->free(b, dk);
		b->ops->free(b, dv);
		b->ops->free(b, dslot);
		free(src);
		free(slot);
		free(perm);
		free(kref);
		free(vref);
		free(kout);
		free(vout);
	}

	ckv_paged_geom g = { .kv_heads = 2, .head_dim = 64, .chunk_tokens = 16, .elem_bytes = 3,
			     .block_size = 16, .num_blocks = 4 };
	uint64_t off = 0;
	int64_t *dslot;

	CHECK_RC(b->ops->alloc(b, 16 * sizeof(int64_t), (void **)&dslot));
	CHECK(ckv_cuda_scatter_paged(b, NULL, &off, 1, &g, dslot, dslot, dslot, st) == -EINVAL);
	g.elem_bytes = 2;
	off = ARENA_BYTES - 4096; /* the chunk's 8 KiB run past the arena */
	CHECK(ckv_cuda_scatter_paged(b, NULL, &off, 1, &g, dslot, dslot, dslot, st) == -EINVAL);
	b->ops->free(b, dslot);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/*
 * after() and sync() under churn: callbacks on two streams behind work of
 * random length; a sync returns only once every callback queued before it
 * has run (those of the other stream too), whether the reaper or the
 * syncing thread ran it; none runs twice or is lost.
 */
static void test_after_sync(ckv_backend *b, cudaStream_t st[2], uint64_t *seed)
{
	int calls = 0, queued = 0;

	for (int it = 0; it < 400; it++) {
		cudaStream_t s = st[it & 1];
		uint64_t r = rnd(seed);

		if (r % 3 == 0)
			CHECK_RC(b->ops->compute(b, (double)(r >> 8 & 63) * 1e-6, s));
		CHECK_RC(b->ops->after(b, s, count_call, &calls));
		queued++;
		if (r % 7 == 0) {
			CHECK_RC(b->ops->sync(b, st[(r >> 4) & 1]));
			CHECK(__atomic_load_n(&calls, __ATOMIC_SEQ_CST) == queued);
		}
	}
	CHECK_RC(b->ops->sync(b, st[0]));
	CHECK(__atomic_load_n(&calls, __ATOMIC_SEQ_CST) == queued);
	CHECK_RC(b->ops->sync(b, st[1]));
	CHECK(__atomic_load_n(&calls, __ATOMIC_SEQ_CST) == queued);
}

/* A host function that holds its stream until *arg is set. */
static void gate_fn(void *arg)
{
	while (!__atomic_load_n((int *)arg, __ATOMIC_ACQUIRE)) {
		struct timespec ts = { 0, 1000000 };

		nanosleep(&ts, NULL);
	}
}

/*
 * gather_then: the callback runs once its gather has executed, never
 * before. Both streams wait behind a gate (a host function that blocks
 * until the test opens it) while 300 gathers are queued on them — more
 * than the backend's completion words, so later ones fall back to events,
 * of up to 160 copies (run_one runs it with the default parameter limit
 * and with inline_max 128, which sends the larger ones through the
 * descriptor ring): no callback may run while
 * the gate is shut; once it opens, every one runs exactly once, and every
 * chunk is where it belongs. Then gathers with callbacks under churn, as
 * in test_after_sync.
 */
static void test_gather_then(ckv_backend *b, const struct arena *a, cudaStream_t st[2],
			     uint64_t *seed)
{
	const uint32_t rounds = 300, max_per = 160;
	const uint64_t len = 8192, slots = ARENA_BYTES / len;
	uint64_t total = 0, *src = malloc((size_t)rounds * max_per * sizeof(*src));
	uint32_t *per = malloc(rounds * sizeof(*per));
	ckv_copy *c = malloc(max_per * sizeof(*c));
	unsigned char *dev, *host = malloc((size_t)rounds * max_per * len);
	cudaStream_t gs;
	cudaEvent_t gev;
	int open = 0, calls = 0, queued = 0;
	struct timespec ms20 = { 0, 20000000 };

	CHECK(src && per && c && host);
	CHECK_RC(b->ops->alloc(b, (uint64_t)rounds * max_per * len, (void **)&dev));
	CHECK_CU(cudaMemset(dev, POISON, (size_t)rounds * max_per * len));
	CHECK_CU(cudaDeviceSynchronize());
	CHECK_CU(cudaStreamCreateWithFlags(&gs, cudaStreamNonBlocking));
	CHECK_CU(cudaEventCreateWithFlags(&gev, cudaEventDisableTiming));
	CHECK_CU(cudaLaunchHostFunc(gs, gate_fn, &open));
	CHECK_CU(cudaEventRecord(gev, gs));
	CHECK_CU(cudaStreamWaitEvent(st[0], gev, 0));
	CHECK_CU(cudaStreamWaitEvent(st[1], gev, 0));
	for (uint32_t r = 0; r < rounds; r++) {
		per[r] = 1 + (uint32_t)(rnd(seed) % max_per); /* up to 160: inline and ring */
		for (uint32_t i = 0; i < per[r]; i++) {
			src[total + i] = rnd(seed) % slots * len;
			c[i] = (ckv_copy){ .src = src[total + i], .dst = dev + (total + i) * len };
		}
		CHECK_RC(b->ops->gather_then(b, c, per[r], len, st[r % 2], count_call, &calls));
		total += per[r];
	}
	nanosleep(&ms20, NULL);
	CHECK(__atomic_load_n(&calls, __ATOMIC_SEQ_CST) == 0); /* nothing has run */
	__atomic_store_n(&open, 1, __ATOMIC_RELEASE);
	CHECK_RC(b->ops->sync(b, st[0]));
	CHECK_RC(b->ops->sync(b, st[1]));
	CHECK(__atomic_load_n(&calls, __ATOMIC_SEQ_CST) == (int)rounds);
	CHECK_RC(b->ops->to_host(b, host, dev, total * len));
	for (uint64_t i = 0; i < total; i++) {
		if (memcmp(host + i * len, a->rw + src[i], len)) {
			fprintf(stderr, "gather_then: copy %llu differs\n", (unsigned long long)i);
			exit(1);
		}
	}
	/* churn: syncs keep their promise for gather_then's callbacks too */
	calls = 0;
	for (int it = 0; it < 400; it++) {
		cudaStream_t s = st[it & 1];
		uint64_t r = rnd(seed);
		uint32_t n = 1 + (uint32_t)(r >> 20) % max_per;

		if (r % 3 == 0)
			CHECK_RC(b->ops->compute(b, (double)(r >> 8 & 63) * 1e-6, s));
		for (uint32_t i = 0; i < n; i++)
			c[i] = (ckv_copy){ .src = rnd(seed) % slots * len, .dst = dev + (uint64_t)i * len };
		CHECK_RC(b->ops->gather_then(b, c, n, len, s, count_call, &calls));
		queued++;
		if (r % 7 == 0) {
			CHECK_RC(b->ops->sync(b, st[(r >> 4) & 1]));
			CHECK(__atomic_load_n(&calls, __ATOMIC_SEQ_CST) == queued);
		}
	}
	CHECK_RC(b->ops->sync(b, st[0]));
	CHECK_RC(b->ops->sync(b, st[1]));
	CHECK(__atomic_load_n(&calls, __ATOMIC_SEQ_CST) == queued);
	CHECK(b->ops->gather_then(b, c, 1, len, st[0], NULL, NULL) == -EINVAL);
	c[0].src = ARENA_BYTES;
	CHECK(b->ops->gather_then(b, c, 1, len, st[0], count_call, &calls) == -EINVAL);
	CHECK_RC(b->ops->sync(b, st[0]));
	CHECK(__atomic_load_n(&calls, __ATOMIC_SEQ_CST) == queued); /* a refused call queues nothing */
	CHECK_CU(cudaStreamSynchronize(gs));
	CHECK_CU(cudaEventDestroy(gev));
	CHECK_CU(cudaStreamDestroy(gs));
	b->ops->free(b, dev);
	free(host);
	free(c);
	free(per);
	free(src);
}

static void run_one(ckv_backend *b, const struct arena *a, cudaStream_t st[2], uint64_t *seed)
{
	int calls = 0;

	{
		/* overlapped launches (the default) and ordinary ones */
		ckv_cuda_gather_cfg def, cfg;

		ckv_cuda_get_gather_cfg(b, &def);
		CHECK(def.overlap == 1 && def.inline_max == 0);
		test_gather_sets(b, a, st[0], seed);
		cfg = def;
		cfg.inline_max = 128; /* every set past 128 copies through the ring */
		CHECK_RC(ckv_cuda_set_gather_cfg(b, &cfg));
		test_gather_sets(b, a, st[0], seed);
		cfg.inline_max = 2045;
		CHECK(ckv_cuda_set_gather_cfg(b, &cfg) == -EINVAL);
		CHECK_RC(ckv_cuda_set_gather_cfg(b, &def));
		test_overlap_order(b, a, st[0], false, seed);
		test_overlap_order(b, a, st[0], true, seed);
		cfg = def;
		cfg.overlap = 0;
		CHECK_RC(ckv_cuda_set_gather_cfg(b, &cfg));
		test_gather_sets(b, a, st[0], seed);
		test_overlap_order(b, a, st[0], false, seed);
		test_overlap_order(b, a, st[0], true, seed);
		cfg.overlap = 2;
		CHECK(ckv_cuda_set_gather_cfg(b, &cfg) == -EINVAL);
		CHECK_RC(ckv_cuda_set_gather_cfg(b, &def));
	}
	test_ring_reuse(b, a, st, seed);
	test_gather_rules(b);
	CHECK_RC(b->ops->after(b, st[0], count_call, &calls));
	CHECK_RC(b->ops->sync(b, st[0]));
	CHECK(__atomic_load_n(&calls, __ATOMIC_SEQ_CST) == 1);
	test_after_sync(b, st, seed);
	test_gather_then(b, a, st, seed);
	{
		ckv_cuda_gather_cfg def, cfg;

		ckv_cuda_get_gather_cfg(b, &def);
		cfg = def;
		cfg.inline_max = 128; /* gathers of 129-160 copies stage their descriptors */
		CHECK_RC(ckv_cuda_set_gather_cfg(b, &cfg));
		test_gather_then(b, a, st, seed);
		CHECK_RC(ckv_cuda_set_gather_cfg(b, &def));
	}
	test_scatter(b, a, st[1], seed);
}

int main(void)
{
	uint64_t seed = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull;
	struct arena ro, rw;
	ckv_backend *b_ro, *b_rw;
	cudaStream_t st[2];
	int count = 0;

	if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
		printf("no CUDA device\n");
		return 77;
	}
	fprintf(stderr, "seed %llu\n", (unsigned long long)seed);
	CHECK(ckv_backend_cuda_built());
	CHECK(ckv_backend_cuda(count, &b_ro) == -ENODEV && b_ro == NULL);
	CHECK_RC(ckv_backend_cuda(0, &b_ro));
	CHECK_RC(ckv_backend_cuda(0, &b_rw));
	CHECK(strcmp(b_ro->ops->name, "cuda") == 0);
	/*
	 * Blocking streams: the set-up copies and memsets of this test run on
	 * the legacy default stream, which orders itself with blocking streams
	 * only.
	 */
	CHECK_CU(cudaStreamCreateWithFlags(&st[0], cudaStreamDefault));
	CHECK_CU(cudaStreamCreateWithFlags(&st[1], cudaStreamDefault));

	arena_make(&ro, true, seed ^ 1);
	arena_make(&rw, false, seed ^ 2);

	ckv_copy c = { .src = 0, .dst = NULL };

	CHECK(b_ro->ops->gather(b_ro, &c, 1, 8192, NULL) == -EINVAL); /* no arena yet */
	CHECK_RC(b_ro->ops->register_arena(b_ro, ro.reg, ARENA_BYTES, true));
	CHECK(b_ro->ops->register_arena(b_ro, ro.reg, ARENA_BYTES, true) == -EBUSY);
	CHECK_RC(b_rw->ops->register_arena(b_rw, rw.reg, ARENA_BYTES, false));

	run_one(b_ro, &ro, st, &seed);
	run_one(b_rw, &rw, st, &seed);
	test_digest(b_rw, st[0], &seed);

	double t0 = now_s();

	CHECK_RC(b_rw->ops->compute(b_rw, 0.05, st[0]));
	CHECK_RC(b_rw->ops->sync(b_rw, st[0]));
	CHECK(now_s() - t0 >= 0.05);
	CHECK(b_rw->ops->compute(b_rw, -1.0, st[0]) == -EINVAL);

	b_ro->ops->unregister_arena(b_ro);
	CHECK(b_ro->ops->gather(b_ro, &c, 1, 8192, NULL) == -EINVAL);
	b_ro->ops->destroy(b_ro);
	b_rw->ops->destroy(b_rw); /* unregisters its arena */
	arena_free(&ro);
	arena_free(&rw);
	CHECK_CU(cudaStreamDestroy(st[0]));
	CHECK_CU(cudaStreamDestroy(st[1]));
	printf("cuda backend: all checks passed\n");
	return 0;
}
