/*
 * test_store.c — the store's C API: publish with dedup, get, list, match
 * (full chunks and partial tail, look-up bound), stat, rm, gc, reindex,
 * retention state, and concurrent publishers.
 */
#include "ckv_store.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures;
#define CHECK(cond)                                                                   \
	do {                                                                          \
		if (!(cond)) {                                                        \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
			failures++;                                                   \
		}                                                                     \
	} while (0)

static ckv_geom geom;

/* Chunk content: a function of (layer, token position, token). */
static int fill(void *arg, uint32_t layer, uint32_t first, uint32_t count, void *buf)
{
	const uint32_t *tokens = arg;
	for (uint32_t i = 0; i < count; i++) {
		uint32_t *w = (uint32_t *)((uint8_t *)buf + (size_t)i * geom.chunk_bytes);
		for (uint32_t t = 0; t < geom.chunk_tokens; t++) {
			uint32_t pos = (first + i) * geom.chunk_tokens + t;
			w[t] = layer * 1000003u ^ pos * 7919u ^ tokens[pos];
		}
	}
	return 0;
}

static uint32_t *make_tokens(uint32_t n, uint32_t seed)
{
	uint32_t *t = calloc(n + 16, sizeof(*t)); /* fill reads whole chunks */
	for (uint32_t i = 0; i < n; i++)
		t[i] = (i * 2654435761u) ^ seed;
	return t;
}

static int count_cb(void *arg, const ckv_manifest *m)
{
	(void)m;
	(*(int *)arg)++;
	return 0;
}

struct thr {
	ckv_store *s;
	uint32_t *tokens;
	uint32_t n;
	int rc;
	ckv_import_result r;
};

static void *publisher(void *arg)
{
	struct thr *t = arg;
	ckv_err e;
	t->rc = ckv_store_publish(t->s, &geom, t->tokens, t->n, fill, t->tokens, NULL, &t->r, &e);
	return NULL;
}

int main(void)
{
	char dir[] = "/tmp/ckv-test-store-XXXXXX", cmd[256];
	ckv_store *s;
	ckv_err e;
	ckv_import_result r1, r2, r3;
	ckv_manifest *m;
	ckv_hash h;
	uint32_t matched, lookups, *t1, *t2;
	int n;

	if (!mkdtemp(dir))
		return 77;
	memset(&geom, 0, sizeof(geom));
	snprintf(geom.model, sizeof(geom.model), "test/tiny");
	geom.dtype = CKV_DTYPE_FP32;
	geom.layers = 3;
	geom.kv_heads = 1;
	geom.head_dim = 8;
	geom.chunk_tokens = 16;
	CHECK(ckv_geom_init(&geom, &e) == 0);
	CHECK(geom.chunk_bytes == 4096);

	CHECK(ckv_store_open(dir, &s, &e) == -ENOENT); /* not a store yet */
	CHECK(ckv_store_init(dir, &e) == 0);
	CHECK(ckv_store_open(dir, &s, &e) == 0);

	/* parent: 1000 tokens (63 chunks, the last partial) */
	t1 = make_tokens(1300, 1);
	CHECK(ckv_store_publish(s, &geom, t1, 1000, fill, t1, NULL, &r1, &e) == 0);
	CHECK(r1.new_chunks == 63 && r1.shared_chunks == 0 && !r1.existed);
	/* publishing it again writes nothing */
	CHECK(ckv_store_publish(s, &geom, t1, 1000, fill, t1, NULL, &r2, &e) == 0);
	CHECK(r2.existed && ckv_hash_eq(&r1.hash, &r2.hash));
	/* child: same first 1000 tokens + 300; shares the 62 full chunks */
	CHECK(ckv_store_publish(s, &geom, t1, 1300, fill, t1, NULL, &r2, &e) == 0);
	CHECK(r2.shared_chunks == 62 && r2.new_chunks == 82 - 62);
	CHECK(ckv_store_get(s, &r2.hash, &m, &e) == 0);
	CHECK(m->tokens == 1300 && m->chunks == 82 && m->nextents == 2);
	CHECK(m->extents[0].count == 62 && m->extents[1].count == 20);
	{
		ckv_stat_info st;
		CHECK(ckv_store_stat(s, m, &st) == 0);
		CHECK(st.bytes_total == 82ull * 4096 * 3);
		CHECK(st.bytes_shared == 62ull * 4096 * 3);
	}
	ckv_manifest_free(m);
	free(m);

	/* tokens read back from the segments */
	CHECK(ckv_store_get(s, &r2.hash, &m, &e) == 0);
	{
		uint32_t *back;
		CHECK(ckv_store_tokens(s, m, &back, &e) == 0);
		CHECK(memcmp(back, t1, 1300 * 4) == 0);
		free(back);
	}
	ckv_manifest_free(m);
	free(m);

	/* match: exact, longer, diverging mid-chunk, partial tail, none */
	CHECK(ckv_store_match(s, &geom, t1, 1300, &h, &matched, &lookups) == 0);
	CHECK(matched == 1300 && ckv_hash_eq(&h, &r2.hash));
	CHECK(lookups <= 2 * 7 + 16 + 2);
	t2 = make_tokens(1300, 1);
	t2[500] ^= 1; /* diverges inside chunk 31 */
	CHECK(ckv_store_match(s, &geom, t2, 1300, &h, &matched, &lookups) == 0);
	CHECK(matched == 496); /* 31 full chunks */
	memcpy(t2, t1, 1300 * 4);
	t2[1010] ^= 1; /* the parent (1000 tokens) ends inside chunk 62 */
	{
		ckv_store *s2 = s;
		ckv_hash parent = r1.hash;
		/* drop the child so only the partial-tail parent matches beyond 992 */
		CHECK(ckv_store_rm(s2, &r2.hash, &e) == 0);
		CHECK(ckv_store_match(s2, &geom, t2, 1300, &h, &matched, &lookups) == 0);
		CHECK(matched == 1000 && ckv_hash_eq(&h, &parent));
		CHECK(ckv_store_publish(s2, &geom, t1, 1300, fill, t1, NULL, &r2, &e) == 0);
	}
	t2[0] ^= 1;
	CHECK(ckv_store_match(s, &geom, t2, 1300, &h, &matched, &lookups) == 0);
	CHECK(matched == 0);

	/* grandchild, then remove parent and child: the grandchild stays whole */
	CHECK(ckv_store_publish(s, &geom, t1, 1200, fill, t1, NULL, &r3, &e) == 0);
	CHECK(r3.shared_chunks == 75);
	CHECK(ckv_store_rm(s, &r1.hash, &e) == 0);
	CHECK(ckv_store_rm(s, &r1.hash, &e) == -ENOENT);
	{
		ckv_gc_result g;
		CHECK(ckv_store_gc(s, &g, &e) == 0);
		CHECK(g.segments == 0); /* the parent's segment is still referenced */
	}
	CHECK(ckv_store_verify(s, NULL, NULL, NULL, NULL, NULL) == 0);
	CHECK(ckv_store_match(s, &geom, t1, 1200, &h, &matched, &lookups) == 0);
	CHECK(matched == 1200);

	/* generation and count */
	{
		uint64_t g1, g2, np;
		CHECK(ckv_store_generation(s, &g1, &np) == 0 && np == 2);
		CHECK(ckv_store_rm(s, &r2.hash, &e) == 0);
		CHECK(ckv_store_generation(s, &g2, &np) == 0 && np == 1 && g2 > g1);
	}

	/* reindex from the files gives the same answers */
	n = 0;
	ckv_store_list(s, count_cb, &n);
	CHECK(n == 1);
	ckv_store_close(s);
	snprintf(cmd, sizeof(cmd), "rm -f %s/index/*", dir);
	CHECK(system(cmd) == 0);
	CHECK(ckv_store_open(dir, &s, &e) == 0);
	n = 0;
	ckv_store_list(s, count_cb, &n);
	CHECK(n == 0);
	if (ckv_store_reindex(s, NULL, &e) != 0) {
		fprintf(stderr, "reindex: %s\n", e.msg);
		failures++;
	}
	n = 0;
	ckv_store_list(s, count_cb, &n);
	CHECK(n == 1);
	CHECK(ckv_store_match(s, &geom, t1, 1300, &h, &matched, &lookups) == 0);
	CHECK(matched == 1200 && ckv_hash_eq(&h, &r3.hash));
	CHECK(ckv_store_verify(s, NULL, NULL, NULL, NULL, NULL) == 0);

	/* retention state */
	{
		ckv_retention rr[3] = {
			{ "segA", 1, 5, 2.0, 3.0, 100 },
			{ "segA", 1, 6, 10.0, 1.0, 101 },
			{ "segB", 0, 0, 0.5, 1.0, 102 },
		}, *top;
		size_t nt;
		CHECK(ckv_store_retention_put(s, rr, 3) == 0);
		CHECK(ckv_store_retention_top(s, 2, &top, &nt) == 0);
		CHECK(nt == 2 && top[0].chunk == 6 && top[1].chunk == 5 && !strcmp(top[0].segment, "segA") && top[0].layer == 1);
		CHECK(fabs(top[1].importance - 2.0) < 1e-12 && top[1].last == 100);
		free(top);
	}

	/* concurrent publishers: four prefixes sharing a trunk */
	{
		struct thr th[4];
		pthread_t tid[4];
		ckv_gc_result g;
		for (int i = 0; i < 4; i++) {
			th[i].s = s;
			th[i].n = 1000 + 16 * (uint32_t)i;
			th[i].tokens = make_tokens(th[i].n, 9);
			th[i].tokens[th[i].n - 1] ^= (uint32_t)i + 77;
			pthread_create(&tid[i], NULL, publisher, &th[i]);
		}
		for (int i = 0; i < 4; i++) {
			pthread_join(tid[i], NULL);
			CHECK(th[i].rc == 0);
		}
		n = 0;
		ckv_store_list(s, count_cb, &n);
		CHECK(n == 5);
		CHECK(ckv_store_verify(s, NULL, NULL, NULL, NULL, NULL) == 0);
		for (int i = 0; i < 4; i++) {
			CHECK(ckv_store_rm(s, &th[i].r.hash, &e) == 0);
			free(th[i].tokens);
		}
		CHECK(ckv_store_rm(s, &r3.hash, &e) == 0);
		CHECK(ckv_store_gc(s, &g, &e) == 0);
		CHECK(g.segments >= 3);
	}
	n = 0;
	ckv_store_list(s, count_cb, &n);
	CHECK(n == 0);

	ckv_store_close(s);
	free(t1);
	free(t2);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd) != 0)
		failures++;
	if (failures)
		fprintf(stderr, "test_store: %d failure(s)\n", failures);
	else
		printf("test_store: ok\n");
	return failures ? 1 : 0;
}
