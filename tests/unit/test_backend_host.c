/*
 * test_backend_host.c — the host backend (gpu/backend_host.c): random chunk
 * sets of 8, 32 and 64 KiB (whole chunks and halves) gathered out of an
 * arena into scattered destinations, argument rules shared with the CUDA
 * backend (a rejected gather writes nothing), `after`, digest scores
 * against a double-precision reference, compute replay, allocation.
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend.h"

#include "check.h"

#define ARENA_BYTES (16u << 20)
#define POISON 0xa5

static uint64_t rnd(uint64_t *s)
{
	/* splitmix64 */
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void fill_random(void *p, size_t n, uint64_t seed)
{
	unsigned char *b = p;

	for (size_t i = 0; i < n; i += 8) {
		uint64_t v = rnd(&seed);

		memcpy(b + i, &v, n - i < 8 ? n - i : 8);
	}
}

static float frand(uint64_t *s)
{
	return (float)((double)(rnd(s) >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
}

/* Random sets of whole chunks and of halves, into a shuffled destination order. */
static void test_gather_sets(ckv_backend *b, const unsigned char *arena, uint64_t *seed)
{
	static const uint64_t sizes[] = { 8192, 32768, 65536 };

	for (int si = 0; si < 3; si++) {
		uint64_t cs = sizes[si], slots = ARENA_BYTES / cs;

		for (int it = 0; it < 40; it++) {
			uint32_t n = 1 + (uint32_t)(rnd(seed) % 300);
			bool half = it % 4 == 3;
			uint64_t len = half ? cs / 2 : cs;
			ckv_copy *c = malloc(n * sizeof(*c));
			uint32_t *perm = malloc(n * sizeof(*perm));
			unsigned char *dst;

			CHECK(c && perm);
			CHECK_RC(b->ops->alloc(b, n * len, (void **)&dst));
			memset(dst, POISON, n * len);
			for (uint32_t i = 0; i < n; i++)
				perm[i] = i;
			for (uint32_t i = n; i > 1; i--) {
				uint32_t j = (uint32_t)(rnd(seed) % i), t = perm[i - 1];

				perm[i - 1] = perm[j];
				perm[j] = t;
			}
			for (uint32_t i = 0; i < n; i++) {
				c[i].src = rnd(seed) % slots * cs + (half && rnd(seed) % 2 ? cs / 2 : 0);
				c[i].dst = dst + (uint64_t)perm[i] * len;
			}
			CHECK_RC(b->ops->gather(b, c, n, len, NULL));
			for (uint32_t i = 0; i < n; i++)
				CHECK(memcmp(dst + (uint64_t)perm[i] * len, arena + c[i].src, len) == 0);
			b->ops->free(b, dst);
			free(perm);
			free(c);
		}
	}
}

/* Whatever the CUDA kernel cannot do is refused here too, before any byte moves. */
static void test_gather_rules(ckv_backend *b, const unsigned char *arena)
{
	unsigned char *dst;
	ckv_copy c[2];

	CHECK_RC(b->ops->alloc(b, 3 * 8192, (void **)&dst));
	memset(dst, POISON, 3 * 8192);
	c[0] = (ckv_copy){ .src = 0, .dst = dst };
	c[1] = (ckv_copy){ .src = ARENA_BYTES - 8192, .dst = dst + 8192 };
	CHECK(b->ops->gather(b, c, 2, 0, NULL) == -EINVAL);
	CHECK(b->ops->gather(b, c, 2, 8200, NULL) == -EINVAL);
	CHECK(b->ops->gather(b, NULL, 2, 8192, NULL) == -EINVAL);
	CHECK(b->ops->gather(b, c, 2, 16384, NULL) == -EINVAL); /* second runs past the end */
	c[1].src = ARENA_BYTES - 8192 + 8;
	CHECK(b->ops->gather(b, c, 2, 8192, NULL) == -EINVAL); /* unaligned source */
	c[1].src = UINT64_MAX - 4095;
	CHECK(b->ops->gather(b, c, 2, 8192, NULL) == -EINVAL); /* offset + len overflows */
	c[1] = (ckv_copy){ .src = 8192, .dst = dst + 8192 + 8 };
	CHECK(b->ops->gather(b, c, 2, 8192, NULL) == -EINVAL); /* unaligned destination */
	c[1].dst = NULL;
	CHECK(b->ops->gather(b, c, 2, 8192, NULL) == -EINVAL);
	for (int i = 0; i < 3 * 8192; i++)
		CHECK(dst[i] == POISON); /* a refused call copied nothing */
	CHECK_RC(b->ops->gather(b, c, 0, 8192, NULL)); /* nothing to do */
	c[1] = (ckv_copy){ .src = ARENA_BYTES - 8192, .dst = dst + 8192 };
	CHECK_RC(b->ops->gather(b, c, 2, 8192, NULL));
	CHECK(memcmp(dst, arena, 8192) == 0);
	CHECK(memcmp(dst + 8192, arena + ARENA_BYTES - 8192, 8192) == 0);
	b->ops->free(b, dst);
}

static void count_call(void *arg)
{
	(*(int *)arg)++;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* q fp32 [T][Hq][D], dig fp32 [m][Hkv][D], summed in double in the formula's own order */
/*
 * Double-precision reference; mag[j] is the same sum over |terms|, the
 * scale of fp32 rounding error (a sum that cancels to near zero must not
 * make its rounding look like a large relative error).
 */
static void digest_ref(const float *q, uint32_t T, uint32_t hq, const float *dig, uint32_t m,
		       uint32_t hkv, uint32_t d, double *out, double *mag)
{
	uint32_t g = hq / hkv;

	for (uint32_t j = 0; j < m; j++) {
		double s = 0, a = 0;

		for (uint32_t t = 0; t < T; t++)
			for (uint32_t h = 0; h < hq; h++)
				for (uint32_t k = 0; k < d; k++) {
					double x = (double)q[((size_t)t * hq + h) * d + k] *
						   (double)dig[((size_t)j * hkv + h / g) * d + k];
					s += x;
					a += fabs(x);
				}
		out[j] = s / sqrt((double)d);
		mag[j] = a / sqrt((double)d);
	}
}

static void test_digest(ckv_backend *b, uint64_t *seed)
{
	static const uint32_t shapes[][5] = {
		/* T, Hq, Hkv, D, m */
		{ 1, 2, 2, 64, 1 },   { 37, 8, 2, 64, 100 },  { 300, 28, 4, 128, 257 },
		{ 5, 14, 2, 64, 513 }, { 64, 4, 4, 128, 33 },
	};

	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
		uint32_t T = shapes[si][0], hq = shapes[si][1], hkv = shapes[si][2];
		uint32_t d = shapes[si][3], m = shapes[si][4];
		size_t nq = (size_t)T * hq * d, nd = (size_t)m * hkv * d;
		float *q = malloc(nq * sizeof(*q)), *dig = malloc(nd * sizeof(*dig));
		float *sc = malloc(m * sizeof(*sc));
		double *ref = malloc(m * sizeof(*ref)), *mag = malloc(m * sizeof(*mag)), err = 0, norm = 0;

		CHECK(q && dig && sc && ref && mag);
		for (size_t i = 0; i < nq; i++)
			q[i] = frand(seed);
		for (size_t i = 0; i < nd; i++)
			dig[i] = frand(seed);
		for (uint32_t j = 0; j < m; j++)
			sc[j] = NAN;
		CHECK_RC(b->ops->digest_scores(b, q, T, hq, dig, m, hkv, d, sc, NULL));
		digest_ref(q, T, hq, dig, m, hkv, d, ref, mag);
		for (uint32_t j = 0; j < m; j++) {
			CHECK(isfinite(sc[j]));
			err += (sc[j] - ref[j]) * (sc[j] - ref[j]);
			norm += mag[j] * mag[j];
		}
		if (!(sqrt(err / norm) < 1e-5)) {
			fprintf(stderr, "digest T=%u Hq=%u Hkv=%u D=%u m=%u: rel err %.3g\n", T, hq,
				hkv, d, m, sqrt(err / norm));
			exit(1);
		}
		free(q);
		free(dig);
		free(sc);
		free(ref);
		free(mag);
	}

	float q[4] = { 1, 2, 3, 4 }, dig[4] = { 1, 1, 1, 1 }, sc[1] = { 5 };

	CHECK(b->ops->digest_scores(b, q, 1, 3, dig, 1, 2, 1, sc, NULL) == -EINVAL); /* 3 % 2 */
	CHECK(b->ops->digest_scores(b, q, 1, 2, dig, 1, 2, 0, sc, NULL) == -EINVAL);
	CHECK_RC(b->ops->digest_scores(b, q, 0, 2, dig, 1, 2, 2, sc, NULL));
	CHECK(sc[0] == 0.0f); /* no query tokens: score 0 */
}

int main(void)
{
	/* CKV_TEST_SEED replays the seed a failed run printed */
	const char *env = getenv("CKV_TEST_SEED");
	uint64_t seed = env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull;
	unsigned char *arena;
	ckv_backend *b;
	int calls = 0;
	void *p;

	fprintf(stderr, "seed %llu\n", (unsigned long long)seed);
	CHECK_RC(ckv_backend_host(&b));
	CHECK(strcmp(b->ops->name, "host") == 0);
	CHECK(b->ops->compute && b->ops->destroy);

	arena = aligned_alloc(4096, ARENA_BYTES);
	CHECK(arena);
	fill_random(arena, ARENA_BYTES, seed ^ 1);

	ckv_copy c = { .src = 0, .dst = arena };

	CHECK(b->ops->gather(b, &c, 1, 8192, NULL) == -EINVAL); /* no arena yet */
	CHECK(b->ops->register_arena(b, NULL, 4096, true) == -EINVAL);
	CHECK_RC(b->ops->register_arena(b, arena, ARENA_BYTES, true));
	CHECK(b->ops->register_arena(b, arena, ARENA_BYTES, true) == -EBUSY);

	test_gather_sets(b, arena, &seed);
	test_gather_rules(b, arena);

	CHECK_RC(b->ops->after(b, NULL, count_call, &calls));
	CHECK(calls == 1); /* host: at once */
	CHECK(b->ops->after(b, NULL, NULL, NULL) == -EINVAL);
	CHECK_RC(b->ops->sync(b, NULL));

	test_digest(b, &seed);

	double t0 = now_s();

	CHECK_RC(b->ops->compute(b, 0.02, NULL));
	CHECK(now_s() - t0 >= 0.02);
	CHECK(b->ops->compute(b, -1, NULL) == -EINVAL);
	CHECK(b->ops->compute(b, NAN, NULL) == -EINVAL);

	CHECK_RC(b->ops->alloc(b, 5000, &p));
	CHECK(p && (uintptr_t)p % 4096 == 0);
	CHECK_RC(b->ops->from_host(b, p, arena, 5000));
	unsigned char back[5000];

	CHECK_RC(b->ops->to_host(b, back, p, 5000));
	CHECK(memcmp(back, arena, 5000) == 0);
	b->ops->free(b, p);
	CHECK_RC(b->ops->alloc(b, 0, &p));
	CHECK(p == NULL);

	b->ops->unregister_arena(b);
	CHECK(b->ops->gather(b, &c, 1, 8192, NULL) == -EINVAL);
	b->ops->destroy(b);
	free(arena);

	if (!ckv_backend_cuda_built()) {
		CHECK(ckv_backend_cuda(0, &b) == -ENODEV);
		CHECK(b == NULL);
	}
	return 0;
}
