/*
 * test_loader_pipeline.c — the layer pipeline in every mode, through the
 * public API on an embedded store: each layer's view holds exactly the
 * chunks its mode selects (recomputed here independently from digests and
 * the exported keys) with the exported bytes, in order; FULL returns every
 * chunk; earlier views stay valid for `depth` layers; the counters add up
 * (a cold FULL load, and any load without speculation, reads exactly the
 * bytes it returns: read amplification 1.00; with speculation, every
 * request is a used chunk or a wasted speculation, and speculative reads
 * withdrawn before they started count as neither); key digests read ahead
 * and cached per prefix give the same selections, a second pipeline on the
 * same prefix reads none; misuse, a corrupt chunk and a corrupt digest file
 * fail with messages. Runs on the CUDA backend too (CKV_TEST_BACKEND=cuda).
 */
#include "test_loader_util.h"
#include "loader_int.h"

#define QT 2
#define QH_PER_KV 2

struct pcase {
	const char *name;
	ckv_mode mode;
	double budget;
	uint32_t period, subperiod, rerank, depth;
	bool no_prefetch, period_keys;
	bool sched;        /* LAYER: per-layer budgets SCHED_HI / SCHED_LO, floor SCHED_FLOOR */
	ckv_score score;
	uint32_t tokens;   /* > 0: the pipeline uses only the prefix's first tokens */
};

/* A calibrated-looking schedule: every third layer (1, 4, 7, ...) reads much, the others are at the floor. */
#define SCHED_HI 0.35
#define SCHED_LO 0.03
#define SCHED_FLOOR 0.05
static double sched_budget(const struct pcase *c, uint32_t layer)
{
	return !c->sched ? c->budget : layer % 3 == 1 ? SCHED_HI : SCHED_LO;
}

static bool sched_floor(const struct pcase *c, uint32_t layer)
{
	return c->sched && sched_budget(c, layer) <= SCHED_FLOOR;
}

struct ctx {
	const struct tstore *t;
	ckv_shape sh;
	ckv_prefix *ref;   /* a second handle, for reference digest scores */
	ckv_loader *refl;
	float **q;         /* [layers] queries */
	float **k;         /* [layers] the new tokens' keys */
	uint32_t qh;
};

/* Exact key scores of chunks C of a layer from the exported bytes (sh: the part used). */
static void ref_keys(struct ctx *x, const ckv_shape *sh, uint32_t layer, const uint32_t *C,
		     uint32_t n, float *out)
{
	for (uint32_t i = 0; i < n; i++)
		CHECK(ckv_key_scores(sh, tstore_chunk(x->t, layer, C[i], CKV_PART_K), sh->half_bytes,
				     &C[i], 1, x->q[layer], QT, x->qh, &out[i]) == 0);
}

/* The part of the prefix a case uses: its first c->tokens tokens, or all. */
static ckv_shape used_shape(const struct ctx *x, const struct pcase *c)
{
	ckv_shape sh = x->sh;

	if (c->tokens) {
		sh.tokens = c->tokens;
		sh.chunks = (c->tokens + sh.chunk_tokens - 1) / sh.chunk_tokens;
	}
	return sh;
}

/*
 * Key-copy scores over the part sh of the prefix, computed where the
 * pipeline computes them: on the CPU with the host backend, with the
 * backend's kernels on CUDA (the same floats as the pipeline's; the CPU's
 * agree only to rounding, which can reorder a near tie).
 */
static void ref_keyq(struct ctx *x, const ckv_shape *sh, uint32_t layer, float *sc)
{
	struct ckv_keyq kq;
	const float *k = x->k[layer];

	CHECK_RC(ckv_prefix_keyq(x->ref, layer, &kq), x->refl);
	if (ckv_loader_backend(x->refl) == CKV_BACKEND_CUDA) {
		uint64_t nq = (uint64_t)QT * x->qh * sh->head_dim * sizeof(float);
		uint64_t nk = (uint64_t)QT * sh->kv_heads * sh->head_dim * sizeof(float);
		void *qd, *kd, *sd;

		qd = tl_alloc(x->refl, nq);
		kd = tl_alloc(x->refl, nk);
		sd = tl_alloc(x->refl, sh->chunks * sizeof(float));
		CHECK_RC(ckv_loader_from_host(x->refl, qd, x->q[layer], nq), x->refl);
		if (k)
			CHECK_RC(ckv_loader_from_host(x->refl, kd, k, nk), x->refl);
		CHECK_RC(ckv_keyq_mass_dev(x->ref, layer, sh, &kq, qd, k ? kd : NULL, QT, x->qh, sd,
					   NULL),
			 x->refl);
		tl_to_host(x->refl, sc, sd, sh->chunks * sizeof(float));
		ckv_loader_free(x->refl, qd);
		ckv_loader_free(x->refl, kd);
		ckv_loader_free(x->refl, sd);
	} else {
		CHECK(ckv_keyq_mass_cpu(sh, &kq, x->q[layer], k, QT, x->qh, sc) == 0);
	}
	ckv_keyq_free(&kq);
}

/* The set a mode must pick for a layer (PERIOD: the period's first layer's). */
static uint32_t ref_set(struct ctx *x, const struct pcase *c, uint32_t layer, uint32_t *out)
{
	ckv_shape sh = used_shape(x, c);
	uint32_t m = sh.chunks, p = c->period ? c->period : 8, r = c->rerank ? c->rerank : 2;
	/* digest scores are per chunk: the first m of the whole prefix's */
	float *sc = malloc(sizeof(*sc) * x->sh.chunks), *ks = malloc(sizeof(*ks) * m);
	uint32_t *cand = malloc(sizeof(*cand) * m), n = 0;
	int k;

	CHECK(sc && ks && cand);
	switch (c->mode) {
	case CKV_MODE_FULL:
		for (uint32_t j = 0; j < m; j++)
			out[n++] = j;
		break;
	case CKV_MODE_PERIOD:
		layer -= layer % p;
		if (c->period_keys) {
			for (uint32_t j = 0; j < m; j++)
				cand[j] = j;
			ref_keys(x, &sh, layer, cand, m, sc);
		} else {
			CHECK_RC(ckv_digest_scores(x->ref, layer, x->q[layer], QT, x->qh, sc), x->refl);
		}
		k = ckv_select_topk(sc, m, c->budget, out);
		CHECK(k > 0);
		n = (uint32_t)k;
		break;
	case CKV_MODE_LAYER:
		if (sched_floor(c, layer)) { /* chunk 0 and the most recent */
			k = (int)ckv_select_count(m, sched_budget(c, layer));
			out[n++] = 0;
			for (uint32_t j = m - (uint32_t)k + 1; j < m; j++)
				out[n++] = j;
			break;
		}
		if (c->score == CKV_SCORE_KEYQ)
			ref_keyq(x, &sh, layer, sc); /* attention mass over the used part */
		else
			CHECK_RC(ckv_digest_scores(x->ref, layer, x->q[layer], QT, x->qh, sc), x->refl);
		k = ckv_select_topk(sc, m, sched_budget(c, layer), out);
		CHECK(k > 0);
		n = (uint32_t)k;
		break;
	case CKV_MODE_RERANK: {
		int nc;

		CHECK_RC(ckv_digest_scores(x->ref, layer, x->q[layer], QT, x->qh, sc), x->refl);
		nc = ckv_select_topk(sc, m, fmin(1.0, c->budget * r), cand);
		CHECK(nc > 0);
		ref_keys(x, &sh, layer, cand, (uint32_t)nc, ks);
		for (uint32_t j = 0; j < m; j++)
			sc[j] = -INFINITY;
		for (int i = 0; i < nc; i++)
			sc[cand[i]] = ks[i];
		k = ckv_select_topk(sc, m, c->budget, out);
		CHECK(k > 0);
		n = (uint32_t)k;
		break;
	}
	}
	free(sc);
	free(ks);
	free(cand);
	return n;
}

static void check_view(ckv_loader *l, const struct tstore *t, const ckv_layer_view *v,
		       const uint32_t *want, uint32_t nwant, const char *name)
{
	uint64_t cb = t->g.chunk_bytes;
	uint8_t *host = malloc(cb * (nwant ? nwant : 1));

	CHECK(host);
	if (v->nchunks != nwant || memcmp(v->chunks, want, sizeof(*want) * nwant) != 0) {
		fprintf(stderr, "%s layer %u: %u chunks, expected %u\n", name, v->layer, v->nchunks, nwant);
		for (uint32_t i = 0; i < v->nchunks || i < nwant; i++)
			fprintf(stderr, "  %u: got %d want %d\n", i, i < v->nchunks ? (int)v->chunks[i] : -1,
				i < nwant ? (int)want[i] : -1);
		exit(1);
	}
	tl_to_host(l, host, v->kv, cb * nwant);
	for (uint32_t i = 0; i < nwant; i++)
		if (memcmp(host + i * cb, tstore_chunk(t, v->layer, want[i], CKV_PART_KV), cb) != 0) {
			fprintf(stderr, "%s layer %u: bytes of chunk %u (row %u) differ\n", name, v->layer,
				want[i], i);
			exit(1);
		}
	free(host);
}

static void run_case(struct ctx *x, const struct pcase *c)
{
	const struct tstore *t = x->t;
	ckv_pipeline_opts o = { .mode = c->mode, .budget = c->budget, .period = c->period,
				.subperiod = c->subperiod, .rerank = c->rerank, .depth = c->depth,
				.no_prefetch = c->no_prefetch, .period_keys = c->period_keys,
				.q_heads = x->qh, .q_tokens = QT, .score = c->score,
				.tokens = c->tokens };
	uint32_t L = x->sh.layers, m = x->sh.chunks, depth = c->depth ? c->depth : 2;
	uint32_t nfloor = 0;
	double *budgets = malloc(sizeof(*budgets) * L);
	uint32_t p = c->period ? c->period : 8;
	ckv_layer_view *views = calloc(L, sizeof(*views));
	uint32_t **want = calloc(L, sizeof(*want)), *nwant = calloc(L, sizeof(*nwant));
	uint64_t used = 0;
	ckv_loader *l = tl_loader(t->dir, 256 << 20, 0);
	ckv_prefix *pf;
	ckv_pipeline *pl;
	ckv_pipeline_stats st;
	double amp;

	CHECK(views && want && nwant && budgets);
	for (uint32_t layer = 0; layer < L; layer++) {
		budgets[layer] = sched_budget(c, layer);
		nfloor += sched_floor(c, layer);
	}
	if (c->sched) {
		o.budgets = budgets;
		o.floor = SCHED_FLOOR;
	}
	CHECK_RC(ckv_prefix_open(l, t->child_hex, &pf), l);
	CHECK_RC(ckv_pipeline_open(pf, &o, &pl), l);
	for (uint32_t layer = 0; layer < L; layer++) {
		want[layer] = malloc(sizeof(**want) * m);
		CHECK(want[layer]);
		nwant[layer] = ref_set(x, c, layer, want[layer]);
		CHECK_RC(ckv_pipeline_layer_qk(pl, layer,
					       c->mode == CKV_MODE_FULL || sched_floor(c, layer) ? NULL : x->q[layer],
					       x->k[layer], &views[layer]), l);
		CHECK(views[layer].layer == layer);
		check_view(l, t, &views[layer], want[layer], nwant[layer], c->name);
		/* views of the previous depth-1 layers are intact */
		for (uint32_t back = 1; back < depth && back <= layer; back++)
			check_view(l, t, &views[layer - back], want[layer - back], nwant[layer - back],
				   c->name);
		used += nwant[layer];
	}
	{
		ckv_layer_view v;

		CHECK(ckv_pipeline_layer(pl, L, NULL, &v) == -EINVAL); /* past the last layer */
	}
	ckv_pipeline_get_stats(pl, &st);
	amp = (double)(st.bytes_k + st.bytes_v) / (double)st.bytes_needed;
	printf("%-22s used %5llu read %5llu (miss %5llu hit %3llu) spec %4llu/%-4llu amp %.3f ident %llu wait %.4fs\n",
	       c->name, (unsigned long long)st.chunks_used, (unsigned long long)st.chunks_read,
	       (unsigned long long)st.misses, (unsigned long long)st.hits_arena,
	       (unsigned long long)st.spec_used, (unsigned long long)st.spec_wasted, amp,
	       (unsigned long long)st.identifications, st.wait_s);
	CHECK(st.chunks_used == used);
	CHECK(st.bytes_needed == used * x->sh.chunk_bytes);
	CHECK(st.chunks_read == st.hits_arena + st.misses);
	CHECK(st.hits_gpu == 0);
	CHECK(st.total_s > 0 && st.wait_s >= 0 && st.wait_s <= st.total_s);
	CHECK(st.identifications == (c->mode == CKV_MODE_FULL ? 0 :
				     c->mode == CKV_MODE_PERIOD ? (L + p - 1) / p : L - nfloor));
	if (c->score == CKV_SCORE_KEYQ) {
		/* per identification: every chunk's codes, and the scales of each of the prefix's segments */
		ckv_geom g = { .kv_heads = x->sh.kv_heads, .head_dim = x->sh.head_dim,
			       .chunk_tokens = x->sh.chunk_tokens };
		uint64_t codes = m * ckv_keyq_chunk_bytes(&g, CKV_KEYQ_BITS), sc = 4ull * x->sh.kv_heads * x->sh.head_dim;

		CHECK(st.bytes_digest == st.identifications * (codes + sc) ||
		      st.bytes_digest == st.identifications * (codes + 2 * sc));
	} else {
		CHECK(st.bytes_digest == (c->mode == CKV_MODE_FULL || (c->mode == CKV_MODE_PERIOD && c->period_keys) ?
					  0 : st.identifications * m * x->sh.kv_heads * x->sh.head_dim * 4));
	}
	if (c->mode != CKV_MODE_RERANK && !c->period_keys) {
		/* whole chunks only: a miss reads chunk_bytes, half of it K */
		CHECK(st.bytes_k + st.bytes_v == st.misses * x->sh.chunk_bytes);
		CHECK(st.bytes_k == st.misses * x->sh.half_bytes);
	}
	if (c->mode == CKV_MODE_FULL || c->no_prefetch) {
		/* nothing speculative: every chunk read once, exactly the bytes returned */
		CHECK(st.spec_used == 0 && st.spec_wasted == 0);
		if (c->mode != CKV_MODE_RERANK && !c->period_keys) {
			CHECK(st.misses == used && st.hits_arena == 0);
			CHECK(st.bytes_k + st.bytes_v == st.bytes_needed); /* amplification 1.00 */
		}
	}
	if (c->mode == CKV_MODE_LAYER && !c->no_prefetch) {
		/* each used chunk read once, plus each wasted speculation */
		CHECK(st.misses == used + st.spec_wasted && st.hits_arena == 0);
		CHECK(st.spec_used <= used);
	}
	if ((c->mode == CKV_MODE_PERIOD && !c->period_keys) || c->mode == CKV_MODE_LAYER) {
		/*
		 * whole chunks: every request counted (read or found) is a used
		 * chunk or a dropped speculation; withdrawn ones were neither
		 * read nor counted
		 */
		struct ckv_pipeline_xstats xs;

		ckv_pipeline_get_xstats(pl, &xs);
		CHECK(st.misses + st.hits_arena == used + st.spec_wasted);
		if (c->no_prefetch)
			CHECK(xs.spec_withdrawn == 0 && xs.spec_promoted == 0);
		/*
		 * speculation guessed right at least once: read in time (used) or,
		 * when the idle queue had not started it yet (a loaded machine),
		 * withdrawn and read again as an ordinary read (promoted)
		 */
		if (c->mode == CKV_MODE_LAYER && !c->no_prefetch)
			CHECK(st.spec_used + xs.spec_promoted > 0);
		/* side data: every identification's read ahead or read when needed, none twice */
		CHECK(xs.dig_ahead + xs.dig_read == st.identifications && xs.dig_cached == 0);
	}
	if (c->mode == CKV_MODE_RERANK) {
		/* K halves of candidates, V halves of winners */
		CHECK(st.bytes_k >= used * x->sh.half_bytes && st.bytes_v >= used * x->sh.half_bytes);
		if (c->no_prefetch)
			CHECK(st.bytes_v == used * x->sh.half_bytes);
	}
	if (c->period_keys && c->no_prefetch)
		CHECK(st.bytes_k == ((L + p - 1) / p) * (uint64_t)m * x->sh.half_bytes +
					    (used - ((L + p - 1) / p) * (uint64_t)nwant[0]) * x->sh.half_bytes);
	ckv_pipeline_close(pl);
	ckv_prefix_close(pf);
	ckv_loader_close(l);
	for (uint32_t layer = 0; layer < L; layer++)
		free(want[layer]);
	free(want);
	free(nwant);
	free(views);
	free(budgets);
}

static void run_all(const char *dtype, uint32_t layers, uint32_t kv, uint32_t D)
{
	static const struct pcase cases[] = {
		{ "full", CKV_MODE_FULL, 1, 0, 0, 0, 0, false, false, false, CKV_SCORE_DIGEST, 0 },
		{ "full-noprefetch", CKV_MODE_FULL, 1, 0, 0, 0, 0, true, false, false, CKV_SCORE_DIGEST, 0 },
		{ "full-depth1-sp1", CKV_MODE_FULL, 1, 0, 1, 0, 1, false, false, false, CKV_SCORE_DIGEST, 0 },
		{ "period-p4-sp2", CKV_MODE_PERIOD, 0.2, 4, 2, 0, 0, false, false, false, CKV_SCORE_DIGEST, 0 },
		{ "period-default", CKV_MODE_PERIOD, 0.1, 0, 0, 0, 3, false, false, false, CKV_SCORE_DIGEST, 0 },
		{ "period-p3-sp5", CKV_MODE_PERIOD, 0.25, 3, 5, 0, 0, false, false, false, CKV_SCORE_DIGEST, 0 },
		{ "period-noprefetch", CKV_MODE_PERIOD, 0.2, 4, 2, 0, 0, true, false, false, CKV_SCORE_DIGEST, 0 },
		{ "period-keys-p4-sp3", CKV_MODE_PERIOD, 0.2, 4, 3, 0, 0, false, true, false, CKV_SCORE_DIGEST, 0 },
		{ "period-keys-noprefetch", CKV_MODE_PERIOD, 0.15, 4, 0, 0, 0, true, true, false, CKV_SCORE_DIGEST, 0 },
		{ "layer", CKV_MODE_LAYER, 0.2, 0, 0, 0, 0, false, false, false, CKV_SCORE_DIGEST, 0 },
		{ "layer-b05", CKV_MODE_LAYER, 0.05, 0, 0, 0, 4, false, false, false, CKV_SCORE_DIGEST, 0 },
		{ "layer-noprefetch", CKV_MODE_LAYER, 0.2, 0, 0, 0, 0, true, false, false, CKV_SCORE_DIGEST, 0 },
		{ "rerank", CKV_MODE_RERANK, 0.2, 0, 0, 0, 0, false, false, false, CKV_SCORE_DIGEST, 0 },
		{ "rerank-r3-noprefetch", CKV_MODE_RERANK, 0.1, 0, 0, 3, 0, true, false, false, CKV_SCORE_DIGEST, 0 },
		{ "rerank-b06", CKV_MODE_RERANK, 0.6, 0, 0, 2, 0, false, false, false, CKV_SCORE_DIGEST, 0 },
		{ "layer-keyq", CKV_MODE_LAYER, 0.2, 0, 0, 0, 0, false, false, false, CKV_SCORE_KEYQ, 0 },
		{ "layer-keyq-noprefetch", CKV_MODE_LAYER, 0.1, 0, 0, 0, 0, true, false, false, CKV_SCORE_KEYQ, 0 },
		{ "layer-sched", CKV_MODE_LAYER, 0.1, 0, 0, 0, 0, false, false, true, CKV_SCORE_DIGEST, 0 },
		{ "layer-sched-keyq", CKV_MODE_LAYER, 0.1, 0, 0, 0, 0, false, false, true, CKV_SCORE_KEYQ, 0 },
		{ "layer-sched-keyq-np", CKV_MODE_LAYER, 0.1, 0, 0, 0, 0, true, false, true, CKV_SCORE_KEYQ, 0 },
		/* a request that uses the first 517 tokens: 33 of the 63 chunks, the last one 5 tokens */
		{ "full-tokens", CKV_MODE_FULL, 1, 0, 0, 0, 0, false, false, false, CKV_SCORE_DIGEST, 517 },
		{ "period-tokens", CKV_MODE_PERIOD, 0.2, 4, 2, 0, 0, false, false, false, CKV_SCORE_DIGEST, 517 },
		{ "layer-tokens", CKV_MODE_LAYER, 0.2, 0, 0, 0, 0, false, false, false, CKV_SCORE_DIGEST, 517 },
		{ "rerank-tokens", CKV_MODE_RERANK, 0.2, 0, 0, 0, 0, false, false, false, CKV_SCORE_DIGEST, 517 },
		{ "layer-sched-keyq-tokens", CKV_MODE_LAYER, 0.1, 0, 0, 0, 0, false, false, true, CKV_SCORE_KEYQ, 517 },
	};
	struct tstore t;
	struct ctx x = { 0 };
	uint64_t seed = 99;

	printf("-- %s, %u layers, %u kv heads, head_dim %u\n", dtype, layers, kv, D);
	tstore_make(&t, dtype, layers, kv, D, 700, 1000);
	x.t = &t;
	x.qh = kv * QH_PER_KV;
	x.refl = tl_loader(t.dir, 16 << 20, 0);
	CHECK_RC(ckv_prefix_open(x.refl, t.child_hex, &x.ref), x.refl);
	ckv_prefix_shape(x.ref, &x.sh);
	x.q = calloc(layers, sizeof(*x.q));
	x.k = calloc(layers, sizeof(*x.k));
	CHECK(x.q && x.k);
	for (uint32_t l = 0; l < layers; l++) {
		x.q[l] = tl_query(&seed, QT, x.qh, D);
		x.k[l] = tl_query(&seed, QT, kv, D);
	}
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		run_case(&x, &cases[i]);
	for (uint32_t l = 0; l < layers; l++) {
		free(x.q[l]);
		free(x.k[l]);
	}
	free(x.q);
	free(x.k);
	ckv_prefix_close(x.ref);
	ckv_loader_close(x.refl);
	tstore_free(&t);
}

/*
 * ckv_keyq_scores_device: query, keys and scores in backend memory. On the
 * host backend it is the CPU scorer (the same floats); on CUDA
 * (CKV_TEST_BACKEND=cuda) the device kernels, equal to rounding. Two
 * segments (two sets of scales) and a partial last chunk; with and without
 * the new tokens' keys; bad input refused.
 */
static void check_keyq_device(void)
{
	struct tstore t;
	ckv_loader *l;
	ckv_prefix *p;
	ckv_shape sh;
	uint64_t seed = 17;
	const uint32_t T = 5, qh = 6; /* 3 query heads per kv head */

	tstore_make(&t, "bf16", 4, 2, 64, 700, 1000);
	l = tl_loader(t.dir, 64 << 20, 0);
	CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
	ckv_prefix_shape(p, &sh);
	CHECK(sh.tokens % sh.chunk_tokens != 0);

	size_t nq = (size_t)T * qh * sh.head_dim, nk = (size_t)T * sh.kv_heads * sh.head_dim;
	float *q = tl_query(&seed, T, qh, sh.head_dim), *k = tl_query(&seed, T, sh.kv_heads, sh.head_dim);
	float *cpu = malloc(sizeof(float) * sh.chunks), *got = malloc(sizeof(float) * sh.chunks);
	void *qd, *kd, *sd;
	bool exact = ckv_loader_backend(l) == CKV_BACKEND_HOST;
	double worst = 0;

	CHECK(cpu && got);
	qd = tl_alloc(l, nq * sizeof(float));
	kd = tl_alloc(l, nk * sizeof(float));
	sd = tl_alloc(l, sh.chunks * sizeof(float));
	CHECK_RC(ckv_loader_from_host(l, qd, q, nq * sizeof(float)), l);
	CHECK_RC(ckv_loader_from_host(l, kd, k, nk * sizeof(float)), l);
	for (uint32_t layer = 0; layer < sh.layers; layer++)
		for (int with = 0; with < 2; with++) {
			double sum = 0;

			CHECK_RC(ckv_keyq_scores(p, layer, q, with ? k : NULL, T, qh, cpu), l);
			CHECK_RC(ckv_keyq_scores_device(p, layer, qd, with ? kd : NULL, T, qh, sd, NULL), l);
			tl_to_host(l, got, sd, sh.chunks * sizeof(float));
			for (uint32_t j = 0; j < sh.chunks; j++) {
				double err = fabs((double)got[j] - cpu[j]) / (fabs(cpu[j]) + 1e-6);

				sum += got[j];
				if (exact)
					CHECK(got[j] == cpu[j]);
				else
					CHECK(err <= 1e-3);
				worst = err > worst ? err : worst;
			}
			/* every row's weights sum to 1: over the prefix alone, or shared with the new keys */
			if (!with)
				CHECK(fabs(sum - (double)T * qh) <= 1e-3 * T * qh);
			else
				CHECK(sum < (double)T * qh && sum > 0);
		}
	/* bad input: nothing computed, the reason named */
	CHECK(ckv_keyq_scores_device(p, 0, qd, NULL, T, 5, sd, NULL) == -EINVAL);
	CHECK(strstr(ckv_loader_error(l), "multiple of the 2 kv heads"));
	CHECK(ckv_keyq_scores_device(p, 0, NULL, NULL, T, qh, sd, NULL) == -EINVAL);
	CHECK(ckv_keyq_scores_device(p, sh.layers, qd, NULL, T, qh, sd, NULL) == -EINVAL);
	CHECK(ckv_keyq_scores_device(NULL, 0, qd, NULL, T, qh, sd, NULL) == -EINVAL);
	printf("keyq scores through the %s backend: worst relative difference to the CPU %.2e\n",
	       exact ? "host" : "cuda", worst);
	ckv_loader_free(l, qd);
	ckv_loader_free(l, kd);
	ckv_loader_free(l, sd);
	free(q);
	free(k);
	free(cpu);
	free(got);
	ckv_prefix_close(p);
	ckv_loader_close(l);
	tstore_free(&t);
}

/*
 * 64-token chunks: more than the device key-copy scorer takes. On CUDA
 * ckv_keyq_scores_device refuses them with a message and a keyq pipeline
 * scores on the CPU; on the host backend both are the CPU scorer. Either
 * way each layer's view holds the top chunks of ckv_keyq_scores.
 */
static void check_keyq_long_chunks(void)
{
	struct tstore t;
	ckv_loader *l;
	ckv_prefix *p;
	ckv_pipeline *pl;
	ckv_shape sh;
	uint64_t seed = 23;
	const uint32_t qh = 4;
	ckv_pipeline_opts o = { .mode = CKV_MODE_LAYER, .budget = 0.3, .q_heads = qh, .q_tokens = 1,
				.score = CKV_SCORE_KEYQ, .no_prefetch = true };
	float *q, *sc;
	uint32_t *want;
	void *qd, *sd;
	int rc;

	tstore_make_c(&t, "bf16", 3, 2, 32, 500, 900, 64);
	l = tl_loader(t.dir, 64 << 20, 0);
	CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
	ckv_prefix_shape(p, &sh);
	CHECK(sh.chunk_tokens == 64);
	q = tl_query(&seed, 1, qh, sh.head_dim);
	sc = malloc(sizeof(float) * sh.chunks);
	want = malloc(sizeof(uint32_t) * sh.chunks);
	CHECK(sc && want);
	qd = tl_alloc(l, (uint64_t)qh * sh.head_dim * sizeof(float));
	sd = tl_alloc(l, sh.chunks * sizeof(float));
	CHECK_RC(ckv_loader_from_host(l, qd, q, (uint64_t)qh * sh.head_dim * sizeof(float)), l);
	rc = ckv_keyq_scores_device(p, 0, qd, NULL, 1, qh, sd, NULL);
	if (ckv_loader_backend(l) == CKV_BACKEND_CUDA) {
		CHECK(rc == -ENOTSUP);
		CHECK(strstr(ckv_loader_error(l), "at most 32 tokens; these have 64"));
	} else {
		CHECK_RC(rc, l);
	}
	CHECK_RC(ckv_pipeline_open(p, &o, &pl), l);
	for (uint32_t layer = 0; layer < sh.layers; layer++) {
		ckv_layer_view v;
		int n;

		CHECK_RC(ckv_keyq_scores(p, layer, q, NULL, 1, qh, sc), l);
		n = ckv_select_topk(sc, sh.chunks, o.budget, want);
		CHECK(n > 0);
		CHECK_RC(ckv_pipeline_layer(pl, layer, q, &v), l);
		CHECK(v.nchunks == (uint32_t)n && memcmp(v.chunks, want, sizeof(*want) * n) == 0);
	}
	printf("keyq with 64-token chunks on the %s backend: the CPU's selections\n",
	       ckv_loader_backend(l) == CKV_BACKEND_CUDA ? "cuda" : "host");
	ckv_pipeline_close(pl);
	ckv_loader_free(l, qd);
	ckv_loader_free(l, sd);
	free(q);
	free(sc);
	free(want);
	ckv_prefix_close(p);
	ckv_loader_close(l);
	tstore_free(&t);
}

/*
 * Digests are cached per prefix: a second pipeline on the same prefix
 * handle reads none (bytes_digest 0, every identification from the cache)
 * and selects the same chunks; a fresh handle reads them again.
 */
static void check_digest_cache(void)
{
	struct tstore t;
	uint64_t seed = 17;
	float *q[8];
	ckv_loader *l;
	ckv_prefix *p, *p2;
	uint32_t *first[8], nfirst[8];

	tstore_make(&t, "bf16", 8, 2, 64, 300, 500);
	for (uint32_t i = 0; i < 8; i++)
		q[i] = tl_query(&seed, QT, 4, 64);
	l = tl_loader(t.dir, 64 << 20, 0);
	for (int mode = 0; mode < 2; mode++) {
		ckv_pipeline_opts o = { .mode = mode ? CKV_MODE_LAYER : CKV_MODE_PERIOD, .budget = 0.2,
					.period = 3, .q_heads = 4, .q_tokens = QT };

		CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
		CHECK_RC(ckv_prefix_open(l, t.child_hex, &p2), l);
		for (int pass = 0; pass < 3; pass++) {
			ckv_prefix *px = pass == 2 ? p2 : p;
			ckv_pipeline *pl;
			ckv_pipeline_stats st;
			struct ckv_pipeline_xstats xs;
			uint64_t dig = 0;

			CHECK_RC(ckv_pipeline_open(px, &o, &pl), l);
			for (uint32_t layer = 0; layer < 8; layer++) {
				ckv_layer_view v;

				CHECK_RC(ckv_pipeline_layer(pl, layer, q[layer], &v), l);
				if (pass == 0 && mode == 0) {
					first[layer] = malloc(sizeof(uint32_t) * v.nchunks);
					CHECK(first[layer]);
					memcpy(first[layer], v.chunks, sizeof(uint32_t) * v.nchunks);
					nfirst[layer] = v.nchunks;
				} else if (mode == 0) {
					CHECK(v.nchunks == nfirst[layer] &&
					      memcmp(v.chunks, first[layer], sizeof(uint32_t) * v.nchunks) == 0);
				}
			}
			ckv_pipeline_get_stats(pl, &st);
			ckv_pipeline_get_xstats(pl, &xs);
			dig = st.identifications * ckv_prefix_digest_bytes(px);
			printf("digest cache: %s pass %d: ident %llu digest bytes %llu (ahead %llu cached %llu read %llu)\n",
			       ckv_mode_name(o.mode), pass, (unsigned long long)st.identifications,
			       (unsigned long long)st.bytes_digest, (unsigned long long)xs.dig_ahead,
			       (unsigned long long)xs.dig_cached, (unsigned long long)xs.dig_read);
			if (pass == 1) /* the same handle: all from the cache */
				CHECK(st.bytes_digest == 0 && xs.dig_cached == st.identifications);
			else /* a fresh handle: all read */
				CHECK(st.bytes_digest == dig && xs.dig_cached == 0 &&
				      xs.dig_ahead + xs.dig_read == st.identifications);
			ckv_pipeline_close(pl);
		}
		ckv_prefix_close(p2);
		ckv_prefix_close(p);
	}
	for (uint32_t i = 0; i < 8; i++) {
		free(first[i]);
		free(q[i]);
	}
	ckv_loader_close(l);

	/* a digest file that is not one: the identifying layer fails, naming it */
	{
		char cmd[512];
		ckv_pipeline_opts o = { .mode = CKV_MODE_PERIOD, .budget = 0.2, .q_heads = 4,
					.q_tokens = QT };
		ckv_pipeline *pl;
		ckv_layer_view v;
		float *q0 = tl_query(&seed, QT, 4, 64);

		snprintf(cmd, sizeof(cmd),
			 "printf 'XXXXXXXX' | dd of=%s/seg/%.2s/%s-0/digest.bin bs=1 conv=notrunc status=none",
			 t.dir, t.parent_hex, t.parent_hex);
		CHECK(system(cmd) == 0);
		l = tl_loader(t.dir, 64 << 20, 0);
		CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
		CHECK_RC(ckv_pipeline_open(p, &o, &pl), l);
		CHECK(ckv_pipeline_layer(pl, 0, q0, &v) < 0);
		printf("digest failure: %s\n", ckv_loader_error(l));
		CHECK(strstr(ckv_loader_error(l), "digest.bin") && strstr(ckv_loader_error(l), "layer 0"));
		ckv_pipeline_close(pl);
		ckv_prefix_close(p);
		ckv_loader_close(l);
		free(q0);
	}
	tstore_free(&t);
}

/* Misuse, and a chunk that fails its checksum in the middle of a pass. */
static void check_errors(void)
{
	struct tstore t;
	ckv_loader *l;
	ckv_prefix *p;
	ckv_pipeline *pl;
	ckv_layer_view v;
	uint64_t seed = 5;
	float *q;
	ckv_pipeline_opts o = { .mode = CKV_MODE_LAYER, .budget = 0.2, .q_heads = 4, .q_tokens = 1 };

	tstore_make(&t, "bf16", 12, 2, 64, 300, 500);
	q = tl_query(&seed, 1, 4, 64);
	l = tl_loader(t.dir, 8 << 20, 0);
	CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
	o.budget = 0;
	CHECK(ckv_pipeline_open(p, &o, &pl) == -EINVAL && strstr(ckv_loader_error(l), "budget"));
	o.budget = 0.2;
	o.q_heads = 3;
	CHECK(ckv_pipeline_open(p, &o, &pl) == -EINVAL && strstr(ckv_loader_error(l), "q_heads"));
	o.q_heads = 4;
	o.mode = (ckv_mode)9;
	CHECK(ckv_pipeline_open(p, &o, &pl) == -EINVAL);
	o.mode = CKV_MODE_LAYER;
	o.tokens = 501; /* the prefix has 500 */
	CHECK(ckv_pipeline_open(p, &o, &pl) == -EINVAL &&
	      strstr(ckv_loader_error(l), "tokens 501: the prefix has 500"));
	o.tokens = 0;
	{
		/* schedules: layer mode only, every budget a fraction, the floor below 1 */
		double b[12];

		for (int i = 0; i < 12; i++)
			b[i] = 0.1;
		b[7] = 1.5;
		o.budgets = b;
		CHECK(ckv_pipeline_open(p, &o, &pl) == -EINVAL &&
		      strstr(ckv_loader_error(l), "budget of layer 7, 1.5"));
		b[7] = 0.1;
		o.floor = 1;
		CHECK(ckv_pipeline_open(p, &o, &pl) == -EINVAL && strstr(ckv_loader_error(l), "floor 1"));
		o.floor = 0.05;
		o.mode = CKV_MODE_PERIOD;
		CHECK(ckv_pipeline_open(p, &o, &pl) == -EINVAL && strstr(ckv_loader_error(l), "layer mode, not period"));
		o.mode = CKV_MODE_LAYER;
		o.budgets = NULL;
		o.floor = 0;
		o.score = (ckv_score)7;
		CHECK(ckv_pipeline_open(p, &o, &pl) == -EINVAL && strstr(ckv_loader_error(l), "score 7"));
		o.score = CKV_SCORE_DIGEST;
		CHECK(strcmp(ckv_score_name(CKV_SCORE_KEYQ), "keyq") == 0);
		CHECK(ckv_score_parse("keyq", &o.score) == 0 && o.score == CKV_SCORE_KEYQ);
		CHECK(ckv_score_parse("mass", &o.score) == -EINVAL);
		o.score = CKV_SCORE_DIGEST;
	}
	CHECK_RC(ckv_pipeline_open(p, &o, &pl), l);
	CHECK(ckv_pipeline_layer(pl, 1, q, &v) == -EINVAL && strstr(ckv_loader_error(l), "expected layer 0"));
	CHECK(ckv_pipeline_layer(pl, 0, NULL, &v) == -EINVAL && strstr(ckv_loader_error(l), "query"));
	CHECK_RC(ckv_pipeline_layer(pl, 0, q, &v), l);
	CHECK(ckv_pipeline_layer(pl, 0, q, &v) == -EINVAL);
	ckv_pipeline_close(pl); /* mid-pass: speculative reads of layer 1 in flight */
	{
		ckv_pipeline_opts f = { .mode = CKV_MODE_FULL, .subperiod = 40 };

		/* a run-ahead past the last layer: every layer issued at open */
		CHECK_RC(ckv_pipeline_open(p, &f, &pl), l);
		for (uint32_t layer = 0; layer < 12; layer++)
			CHECK_RC(ckv_pipeline_layer(pl, layer, NULL, &v), l);
		ckv_pipeline_close(pl);
	}
	ckv_prefix_close(p);
	ckv_loader_close(l);

	/* an arena too small for the run-ahead: 12 layers x 32 chunks x 8 KiB > 2 MiB */
	l = tl_loader(t.dir, 2 << 20, 0);
	CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
	{
		ckv_pipeline_opts f = { .mode = CKV_MODE_FULL, .subperiod = 11 };

		CHECK(ckv_pipeline_open(p, &f, &pl) == -ENOSPC && strstr(ckv_loader_error(l), "arena"));
	}
	ckv_prefix_close(p);
	ckv_loader_close(l);

	/* chunk 5 of layer 2 corrupt: layers 0, 1 load, layer 2 fails, and stays failed */
	{
		char cmd[512];
		ckv_pipeline_opts f = { .mode = CKV_MODE_FULL };

		/* the parent's segment "<parent hash>-0" holds chunks 0..17 of the prefix */
		snprintf(cmd, sizeof(cmd),
			 "printf '\\xff\\xfe' | dd of=%s/seg/%.2s/%s-0/layer_002.kv bs=1 seek=$((5*8192+64)) conv=notrunc status=none",
			 t.dir, t.parent_hex, t.parent_hex);
		CHECK(system(cmd) == 0);
		l = tl_loader(t.dir, 8 << 20, 0);
		CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
		CHECK_RC(ckv_pipeline_open(p, &f, &pl), l);
		CHECK_RC(ckv_pipeline_layer(pl, 0, NULL, &v), l);
		CHECK_RC(ckv_pipeline_layer(pl, 1, NULL, &v), l);
		CHECK(ckv_pipeline_layer(pl, 2, NULL, &v) == -EIO);
		CHECK(strstr(ckv_loader_error(l), "layer 2 chunk 5"));
		CHECK(ckv_pipeline_layer(pl, 2, NULL, &v) == -EIO);
		CHECK(strstr(ckv_loader_error(l), "failed at layer 2"));
		ckv_pipeline_close(pl);
		ckv_prefix_close(p);
		ckv_loader_close(l);
	}
	/* a segment without a key copy (written before keyq.bin existed): the file named, how to fix it */
	{
		char path[600];
		float sc[64];
		ckv_pipeline_opts k = { .mode = CKV_MODE_LAYER, .budget = 0.2, .q_heads = 4, .q_tokens = 1,
					.score = CKV_SCORE_KEYQ };

		snprintf(path, sizeof(path), "%s/seg/%.2s/%s-0/keyq.bin", t.dir, t.parent_hex, t.parent_hex);
		CHECK(unlink(path) == 0);
		l = tl_loader(t.dir, 8 << 20, 0);
		CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
		CHECK(ckv_keyq_scores(p, 0, q, NULL, 1, 4, sc) == -ENOENT);
		CHECK(strstr(ckv_loader_error(l), "keyq.bin") && strstr(ckv_loader_error(l), "ckv reindex"));
		CHECK_RC(ckv_pipeline_open(p, &k, &pl), l);
		CHECK(ckv_pipeline_layer(pl, 0, q, &v) == -ENOENT);
		CHECK(strstr(ckv_loader_error(l), "keyq.bin"));
		ckv_pipeline_close(pl);
		ckv_prefix_close(p);
		ckv_loader_close(l);
	}
	free(q);
	tstore_free(&t);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	run_all("bf16", 10, 2, 64);
	run_all("fp8_e4m3", 7, 2, 48); /* chunk_bytes 4096 > 2 x 1536: padding */
	run_all("fp16", 9, 4, 32);
	check_errors();
	check_digest_cache();
	check_keyq_device();
	check_keyq_long_chunks();
	printf("ok\n");
	return 0;
}
