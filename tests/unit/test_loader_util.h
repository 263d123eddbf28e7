/*
 * test_loader_util.h — shared helpers of tests/unit/test_loader_*.c: a
 * scratch store with a prefix and its extension (two extents), the bytes
 * every chunk must have (from `ckv export`'s library call), queries, CHECK.
 */
#ifndef TEST_LOADER_UTIL_H
#define TEST_LOADER_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckv_store.h"
#include "ckvgpu.h"

#define CHECK(c)                                                                        \
	do {                                                                            \
		if (!(c)) {                                                             \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c); \
			exit(1);                                                        \
		}                                                                       \
	} while (0)

#define CHECK_RC(expr, l)                                                                 \
	do {                                                                              \
		int rc_ = (expr);                                                         \
		if (rc_ != 0) {                                                           \
			fprintf(stderr, "%s:%d: %s = %d (%s): %s\n", __FILE__, __LINE__, #expr, \
				rc_, strerror(rc_ < 0 ? -rc_ : rc_), ckv_loader_error(l)); \
			exit(1);                                                          \
		}                                                                         \
	} while (0)

static inline uint64_t tl_mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static inline uint64_t tl_rand(uint64_t *s)
{
	return tl_mix((*s)++);
}

/* A uniform float in [-1, 1). */
static inline float tl_unif(uint64_t *s)
{
	return (float)((double)(tl_rand(s) >> 11) / 4503599627370496.0 - 1.0);
}

struct tstore {
	char dir[64];        /* the store */
	char exp[96];        /* export of the extension */
	ckv_geom g;
	ckv_hash parent, child;
	char parent_hex[33], child_hex[33];
	uint32_t child_tokens, child_chunks;
	uint8_t **layer;     /* [layers] the exported layer files of the child */
};

/* Element e of token pos (K or V half kv, head h, dim d) of layer l: the
 * same for a prefix and its extension, since it depends on the position. */
static inline void tl_elem(const ckv_geom *g, uint32_t l, uint32_t pos, int kv, uint32_t h,
			   uint32_t d, uint8_t *out)
{
	uint64_t r = tl_mix(((uint64_t)l << 48) ^ ((uint64_t)pos << 20) ^ ((uint64_t)kv << 19) ^
			    ((uint64_t)h << 12) ^ d ^ g->seed);

	switch (g->dtype) {
	case CKV_DTYPE_FP8_E4M3: {
		uint8_t b = (uint8_t)r;

		if ((b & 0x7f) == 0x7f) /* NaN */
			b &= 0xf7;
		*out = b;
		break;
	}
	case CKV_DTYPE_FP32: {
		float f = (float)((double)(r >> 11) / 4503599627370496.0 * 4.0 - 2.0);

		memcpy(out, &f, 4);
		break;
	}
	default: { /* bf16 / fp16: finite values of either */
		float f = (float)((double)(r >> 11) / 4503599627370496.0 * 4.0 - 2.0);
		uint32_t u;
		uint16_t w;

		memcpy(&u, &f, 4);
		w = g->dtype == CKV_DTYPE_BF16 ? (uint16_t)(u >> 16) :
						 (uint16_t)(0x3800 | (r & 0x83ff)); /* fp16 in (-1, 1) */
		memcpy(out, &w, 2);
		break;
	}
	}
}

struct tl_fill_arg {
	const ckv_geom *g;
	uint32_t n;
};

static inline int tl_fill(void *arg, uint32_t l, uint32_t first, uint32_t count, void *buf)
{
	const struct tl_fill_arg *a = arg;
	const ckv_geom *g = a->g;
	unsigned es = ckv_dtype_size(g->dtype);
	uint32_t c = g->chunk_tokens;

	memset(buf, 0, (size_t)count * g->chunk_bytes);
	for (uint32_t i = 0; i < count; i++) {
		uint8_t *chunk = (uint8_t *)buf + (size_t)i * g->chunk_bytes;

		for (int kv = 0; kv < 2; kv++)
			for (uint32_t h = 0; h < g->kv_heads; h++)
				for (uint32_t t = 0; t < c; t++) {
					uint32_t pos = (first + i) * c + t;

					if (pos >= a->n)
						break;
					for (uint32_t d = 0; d < g->head_dim; d++)
						tl_elem(g, l, pos, kv, h, d,
							chunk + (size_t)kv * g->half_bytes +
								(((size_t)h * c + t) * g->head_dim + d) * es);
				}
	}
	return 0;
}

/*
 * A store with a prefix of n1 tokens and its extension to n2 tokens (two
 * segments) in chunks of `chunk` tokens, the extension exported; layer
 * files kept in memory. tstore_make: 16-token chunks.
 */
static inline void tstore_make_c(struct tstore *t, const char *dtype, uint32_t layers,
				 uint32_t kv_heads, uint32_t head_dim, uint32_t n1, uint32_t n2,
				 uint32_t chunk)
{
	ckv_store *s;
	ckv_err e;
	ckv_import_result r;
	uint32_t *tok = malloc(sizeof(*tok) * n2);
	struct tl_fill_arg fa;

	memset(t, 0, sizeof(*t));
	CHECK(tok);
	strcpy(t->dir, "/tmp/ckv-test-loader-XXXXXX");
	CHECK(mkdtemp(t->dir));
	snprintf(t->exp, sizeof(t->exp), "%s.export", t->dir);
	snprintf(t->g.model, sizeof(t->g.model), "test/loader");
	t->g.dtype = ckv_dtype_parse(dtype);
	t->g.layers = layers;
	t->g.kv_heads = kv_heads;
	t->g.head_dim = head_dim;
	t->g.chunk_tokens = chunk;
	CHECK(ckv_geom_init(&t->g, &e) == 0);
	for (uint32_t i = 0; i < n2; i++)
		tok[i] = (uint32_t)(tl_mix(i) % 150000);
	CHECK(ckv_store_init(t->dir, &e) == 0 && ckv_store_open(t->dir, &s, &e) == 0);
	ckv_store_set_nosync(s, true);
	fa.g = &t->g;
	fa.n = n1;
	CHECK(ckv_store_publish(s, &t->g, tok, n1, tl_fill, &fa, NULL, &r, &e) == 0);
	t->parent = r.hash;
	fa.n = n2;
	CHECK(ckv_store_publish(s, &t->g, tok, n2, tl_fill, &fa, NULL, &r, &e) == 0);
	t->child = r.hash;
	CHECK(ckv_store_export(s, &t->child, t->exp, NULL, NULL, &e) == 0);
	ckv_store_close(s);
	ckv_hash_hex(&t->parent, t->parent_hex);
	ckv_hash_hex(&t->child, t->child_hex);
	t->child_tokens = n2;
	t->child_chunks = ckv_chunks_for(n2, chunk);
	t->layer = calloc(layers, sizeof(*t->layer));
	CHECK(t->layer);
	for (uint32_t l = 0; l < layers; l++) {
		char path[160], name[32];
		size_t len = (size_t)t->child_chunks * t->g.chunk_bytes;
		int fd;

		ckv_layer_name(l, name);
		snprintf(path, sizeof(path), "%s/%s", t->exp, name);
		t->layer[l] = malloc(len);
		fd = open(path, O_RDONLY);
		CHECK(t->layer[l] && fd >= 0);
		CHECK(read(fd, t->layer[l], len) == (ssize_t)len);
		close(fd);
	}
	free(tok);
}

static inline void tstore_make(struct tstore *t, const char *dtype, uint32_t layers,
			       uint32_t kv_heads, uint32_t head_dim, uint32_t n1, uint32_t n2)
{
	tstore_make_c(t, dtype, layers, kv_heads, head_dim, n1, n2, 16);
}

/* Expected bytes of chunk j of layer l, part (KV whole, K or V half). */
static inline const uint8_t *tstore_chunk(const struct tstore *t, uint32_t l, uint32_t j,
					  enum ckv_part part)
{
	return t->layer[l] + (size_t)j * t->g.chunk_bytes +
	       (part == CKV_PART_V ? t->g.half_bytes : 0);
}

static inline void tstore_free(struct tstore *t)
{
	char cmd[256];

	for (uint32_t l = 0; l < t->g.layers; l++)
		free(t->layer[l]);
	free(t->layer);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s' '%s'", t->dir, t->exp);
	CHECK(system(cmd) == 0);
}

/* A loader on the store: host backend unless CKV_TEST_BACKEND=cuda. */
static inline ckv_loader *tl_loader(const char *dir, uint64_t arena, uint64_t gpu_cache)
{
	ckv_loader_opts o = { .backend = CKV_BACKEND_HOST, .arena_bytes = arena,
			      .gpu_cache_bytes = gpu_cache };
	const char *want = getenv("CKV_TEST_BACKEND");
	ckv_loader *l = NULL;
	int rc;

	if (want && strcmp(want, "cuda") == 0)
		o.backend = CKV_BACKEND_CUDA;
	rc = ckv_loader_open(dir, &o, &l);
	if (rc && o.backend == CKV_BACKEND_CUDA && (rc == -ENODEV || rc == -ENOTSUP)) {
		printf("no CUDA device or no CUDA in this build: %s\n", ckv_loader_error(NULL));
		exit(77);
	}
	if (rc) {
		fprintf(stderr, "ckv_loader_open(%s): %s\n", dir, ckv_loader_error(NULL));
		exit(1);
	}
	return l;
}

/* Backend memory of the loader, and a host copy of it. */
static inline void *tl_alloc(ckv_loader *l, uint64_t bytes)
{
	void *p = NULL;

	CHECK_RC(ckv_loader_alloc(l, bytes, &p), l);
	return p;
}

static inline void tl_to_host(ckv_loader *l, void *host, const void *src, uint64_t len)
{
	CHECK_RC(ckv_loader_sync(l, NULL), l);
	CHECK_RC(ckv_loader_to_host(l, host, src, len), l);
}

/* Random ascending subset of [0, m) of about frac * m chunks (at least one). */
static inline uint32_t tl_subset(uint64_t *seed, uint32_t m, double frac, uint32_t *out)
{
	uint32_t n = 0;

	for (uint32_t j = 0; j < m; j++)
		if (tl_unif(seed) * 0.5 + 0.5 < frac)
			out[n++] = j;
	if (n == 0)
		out[n++] = (uint32_t)(tl_rand(seed) % m);
	return n;
}

/* Valid token slots of chunk j. */
static inline uint32_t tl_valid(const ckv_shape *sh, uint32_t j)
{
	uint32_t first = j * sh->chunk_tokens;

	return sh->tokens - first < sh->chunk_tokens ? sh->tokens - first : sh->chunk_tokens;
}

/* A random query [q_tokens][q_heads][head_dim]. */
static inline float *tl_query(uint64_t *seed, uint32_t q_tokens, uint32_t q_heads, uint32_t D)
{
	size_t n = (size_t)q_tokens * q_heads * D;
	float *q = malloc(sizeof(*q) * n);

	CHECK(q);
	for (size_t i = 0; i < n; i++)
		q[i] = tl_unif(seed);
	return q;
}

#endif
