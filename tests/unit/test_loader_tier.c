/*
 * test_loader_tier.c — the loader's GPU tier (host memory on the host
 * backend, same logic): a second fetch or a second pipeline pass is served
 * from it (hits_gpu) with the same bytes and no disk reads; halves are cut
 * from resident whole chunks; a parent prefix and its extension share the
 * tier's entries for their shared chunks; under pressure, chunks with
 * attention feedback stay and unscored ones go.
 */
#include "test_loader_util.h"
#include "loader_int.h"

static uint64_t gpu_hits(ckv_loader *l)
{
	ckv_loader_stats st;

	ckv_loader_get_stats(l, &st);
	return st.hits_gpu;
}

static void fetch_cmp(ckv_loader *l, ckv_prefix *p, const struct tstore *t, uint32_t layer,
		      const uint32_t *c, uint32_t n, enum ckv_part part)
{
	uint64_t len = part == CKV_PART_KV ? t->g.chunk_bytes : t->g.half_bytes;
	uint8_t *dev = tl_alloc(l, len * n), *host = malloc(len * n);
	ckv_fetch *f;

	CHECK(host);
	CHECK_RC(ckv_fetch_start(p, layer, c, n, part, dev, NULL, NULL, &f), l);
	CHECK_RC(ckv_fetch_wait(f), l);
	tl_to_host(l, host, dev, len * n);
	for (uint32_t i = 0; i < n; i++)
		CHECK(memcmp(host + i * len, tstore_chunk(t, layer, c[i], part), len) == 0);
	free(host);
	ckv_loader_free(l, dev);
}

static void check_fetch(const struct tstore *t)
{
	ckv_loader *l = tl_loader(t->dir, 32 << 20, 8 << 20);
	ckv_prefix *p, *parent;
	ckv_loader_stats st0, st1;
	uint32_t c[10];

	CHECK_RC(ckv_prefix_open(l, t->child_hex, &p), l);
	for (uint32_t i = 0; i < 10; i++)
		c[i] = i * 5 + 2;
	fetch_cmp(l, p, t, 1, c, 10, CKV_PART_KV);
	ckv_loader_get_stats(l, &st0);
	CHECK(st0.hits_gpu == 0 && st0.misses == 10);
	CHECK(st0.gpu_tier_bytes == 8 << 20 && st0.gpu_tier_used == 10 * t->g.chunk_bytes);
	fetch_cmp(l, p, t, 1, c, 10, CKV_PART_KV);
	fetch_cmp(l, p, t, 1, c, 10, CKV_PART_K);
	fetch_cmp(l, p, t, 1, c, 10, CKV_PART_V);
	ckv_loader_get_stats(l, &st1);
	CHECK(st1.hits_gpu == 30 && st1.misses == 10 && st1.hits_arena == 0);
	CHECK(st1.bytes_k + st1.bytes_v == st0.bytes_k + st0.bytes_v);
	/* another layer is another chunk */
	fetch_cmp(l, p, t, 2, c, 3, CKV_PART_KV);
	CHECK(gpu_hits(l) == 30);
	/* the parent shares chunks 0..42 with the extension: same tier entries */
	CHECK_RC(ckv_prefix_open(l, t->parent_hex, &parent), l);
	fetch_cmp(l, parent, t, 1, c, 5, CKV_PART_KV);
	CHECK(gpu_hits(l) == 35);
	ckv_prefix_close(parent);
	ckv_prefix_close(p);
	ckv_loader_close(l);
}

/* Two passes of a pipeline: the second is served from the tier. */
static void check_passes(const struct tstore *t, ckv_mode mode)
{
	ckv_loader *l = tl_loader(t->dir, 64 << 20, 64 << 20);
	ckv_prefix *p;
	ckv_shape sh;
	uint64_t seed = 11;
	float *q[16];
	uint8_t *first[16], *host;
	uint32_t *ids[16], nids[16];
	ckv_pipeline_stats st[2];
	struct ckv_pipeline_xstats xs[2];

	CHECK_RC(ckv_prefix_open(l, t->child_hex, &p), l);
	ckv_prefix_shape(p, &sh);
	CHECK(sh.layers <= 16);
	host = malloc(sh.chunk_bytes * sh.chunks);
	CHECK(host);
	for (uint32_t layer = 0; layer < sh.layers; layer++)
		q[layer] = tl_query(&seed, 2, 4, sh.head_dim);
	for (int pass = 0; pass < 2; pass++) {
		ckv_pipeline_opts o = { .mode = mode, .budget = 0.25, .q_heads = 4, .q_tokens = 2,
					.period = 3 };
		ckv_pipeline *pl;

		CHECK_RC(ckv_pipeline_open(p, &o, &pl), l);
		for (uint32_t layer = 0; layer < sh.layers; layer++) {
			ckv_layer_view v;
			uint64_t bytes;

			CHECK_RC(ckv_pipeline_layer(pl, layer, q[layer], &v), l);
			bytes = (uint64_t)v.nchunks * sh.chunk_bytes;
			tl_to_host(l, host, v.kv, bytes);
			if (pass == 0) {
				first[layer] = malloc(bytes);
				ids[layer] = malloc(sizeof(uint32_t) * v.nchunks);
				CHECK(first[layer] && ids[layer]);
				memcpy(first[layer], host, bytes);
				memcpy(ids[layer], v.chunks, sizeof(uint32_t) * v.nchunks);
				nids[layer] = v.nchunks;
				for (uint32_t i = 0; i < v.nchunks; i++)
					CHECK(memcmp(host + i * sh.chunk_bytes,
						     tstore_chunk(t, layer, v.chunks[i], CKV_PART_KV),
						     sh.chunk_bytes) == 0);
			} else {
				CHECK(v.nchunks == nids[layer]);
				CHECK(memcmp(v.chunks, ids[layer], sizeof(uint32_t) * v.nchunks) == 0);
				CHECK(memcmp(host, first[layer], bytes) == 0);
			}
		}
		ckv_pipeline_get_stats(pl, &st[pass]);
		ckv_pipeline_get_xstats(pl, &xs[pass]);
		ckv_pipeline_close(pl);
	}
	printf("%-6s pass 1: gpu %llu arena %llu miss %llu | pass 2: gpu %llu arena %llu miss %llu (used %llu)\n",
	       ckv_mode_name(mode), (unsigned long long)st[0].hits_gpu,
	       (unsigned long long)st[0].hits_arena, (unsigned long long)st[0].misses,
	       (unsigned long long)st[1].hits_gpu, (unsigned long long)st[1].hits_arena,
	       (unsigned long long)st[1].misses, (unsigned long long)st[1].chunks_used);
	CHECK(st[0].hits_gpu == 0 && st[0].misses > 0);
	CHECK(st[1].chunks_used == st[0].chunks_used);
	/*
	 * Nothing is read twice: the second pass reads from disk only
	 * speculative chunks the first pass withdrew before reading them (idle
	 * reads, docs/LOADER.md), and drops them again.
	 */
	CHECK(st[1].misses <= xs[0].spec_withdrawn && st[1].misses <= st[1].spec_wasted);
	CHECK((st[1].misses == 0) == (st[1].bytes_k + st[1].bytes_v == 0));
	if (mode == CKV_MODE_FULL)
		CHECK(st[1].hits_gpu == st[1].chunks_used && st[1].chunks_read == 0);
	else if (mode == CKV_MODE_RERANK) /* K and V of every winner; losers' K from the arena */
		CHECK(st[1].hits_gpu >= 2 * st[1].chunks_used);
	else
		CHECK(st[1].hits_gpu >= st[1].chunks_used);
	for (uint32_t layer = 0; layer < sh.layers; layer++) {
		free(q[layer]);
		free(first[layer]);
		free(ids[layer]);
	}
	free(host);
	ckv_prefix_close(p);
	ckv_loader_close(l);
}

/* A tier of 20 chunks: scored chunks survive a stream of new ones. */
static void check_retention(const struct tstore *t)
{
	ckv_loader *l = tl_loader(t->dir, 32 << 20, 20 * t->g.chunk_bytes);
	ckv_prefix *p;
	ckv_loader_stats st;
	uint32_t a[10], c[10], b[10];
	float sc[10];
	uint64_t h;

	CHECK_RC(ckv_prefix_open(l, t->child_hex, &p), l);
	for (uint32_t i = 0; i < 10; i++) {
		a[i] = i;
		c[i] = 10 + i;
		b[i] = 20 + i;
		sc[i] = 5.0f;
	}
	fetch_cmp(l, p, t, 0, a, 10, CKV_PART_KV);
	fetch_cmp(l, p, t, 0, c, 10, CKV_PART_KV);
	CHECK_RC(ckv_score_feedback(p, 0, a, sc, 10), l); /* A matters, C does not */
	fetch_cmp(l, p, t, 0, b, 10, CKV_PART_KV);    /* evicts 10 */
	ckv_loader_get_stats(l, &st);
	CHECK(st.gpu_tier_evictions == 10 && st.gpu_tier_used == 20 * t->g.chunk_bytes);
	h = gpu_hits(l);
	fetch_cmp(l, p, t, 0, a, 10, CKV_PART_KV);
	CHECK(gpu_hits(l) == h + 10); /* every scored chunk stayed */
	h = gpu_hits(l);
	fetch_cmp(l, p, t, 0, c, 3, CKV_PART_KV);
	CHECK(gpu_hits(l) == h);      /* unscored ones went */
	ckv_prefix_close(p);
	ckv_loader_close(l);
}

/*
 * Eviction after a long idle stretch: every score decays to zero, the ties
 * go least recently used first, whatever order the scores had before.
 * (A half-life of 10 us makes 30 ms thousands of half-lives.)
 */
static void check_idle_rebase(void)
{
	ckv_backend *be;
	ckv_tier *t;
	ckv_tkey k[9];
	void *ptr;
	uint32_t id;

	CHECK(ckv_backend_host(&be) == 0);
	CHECK(ckv_tier_create(be, 8 * 4096, 1e-5, &t) == 0);
	for (uint32_t i = 0; i < 9; i++)
		k[i] = (ckv_tkey){ .a = 1000 + i, .b = 7 };
	for (uint32_t i = 0; i < 8; i++) { /* k0 oldest ... k7 newest; k7 the least important */
		float sc = (float)(8 - i) * 10;

		id = ckv_tier_reserve(t, &k[i], 4096, &ptr);
		CHECK(id != CKV_TIER_NONE);
		ckv_tier_filled(t, id);
		ckv_tier_score(t, &k[i], &sc, 1);
	}
	usleep(30000);
	id = ckv_tier_lookup(t, &k[3], 4096, &ptr); /* touched after the idle stretch */
	CHECK(id != CKV_TIER_NONE);
	ckv_tier_unpin(t, id);
	id = ckv_tier_reserve(t, &k[8], 4096, &ptr); /* full: evicts the LRU of the zeros, k0 */
	CHECK(id != CKV_TIER_NONE);
	ckv_tier_filled(t, id);
	CHECK(ckv_tier_lookup(t, &k[0], 4096, &ptr) == CKV_TIER_NONE);
	id = ckv_tier_lookup(t, &k[7], 4096, &ptr);
	CHECK(id != CKV_TIER_NONE);
	ckv_tier_unpin(t, id);
	ckv_tier_destroy(t);
	be->ops->destroy(be);
	printf("idle rebase: after thousands of half-lives the least recently used goes first\n");
}

int main(void)
{
	struct tstore t;

	setvbuf(stdout, NULL, _IOLBF, 0);
	check_idle_rebase();
	tstore_make(&t, "bf16", 6, 2, 64, 700, 1000);
	check_fetch(&t);
	check_passes(&t, CKV_MODE_FULL);
	check_passes(&t, CKV_MODE_PERIOD);
	check_passes(&t, CKV_MODE_LAYER);
	check_passes(&t, CKV_MODE_RERANK);
	check_retention(&t);
	tstore_free(&t);
	printf("ok\n");
	return 0;
}
