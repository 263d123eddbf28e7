/*
 * test_loader_select.c — chunk selection: ckv_select_topk keeps the top
 * ceil(budget * m) with chunks 0 and m-1 always, ascending, NaN last, ties
 * by chunk id; digest scores (CPU reference, the backend's, and the direct
 * formula over digest.bin) agree, GQA included; exact key scores equal the
 * definition computed here from the exported bytes; key-copy attention
 * mass scores equal their definition computed here in double; and on `ckv
 * gen --plant F` data the digests recover >= 95% of the planted chunks of
 * every layer at budgets >= F (+ the two always-kept chunks).
 */
#include <jansson.h>
#include <libgen.h>

#include "test_loader_util.h"
#include "loader_int.h"

static void check_topk(void)
{
	float s[10] = { 5, 9, 1, 9, NAN, 3, 7, 2, 8, 0 };
	uint32_t out[10];
	int n;

	/* k = 4: 0 and 9 kept, then the best of 1..8: 1 (9), 3 (9) */
	n = ckv_select_topk(s, 10, 0.4, out);
	CHECK(n == 4 && out[0] == 0 && out[1] == 1 && out[2] == 3 && out[3] == 9);
	n = ckv_select_topk(s, 10, 0.5, out); /* + 8 (8) */
	CHECK(n == 5 && out[3] == 8);
	n = ckv_select_topk(s, 10, 1.0, out);
	CHECK(n == 10);
	for (int i = 0; i < 10; i++)
		CHECK(out[i] == (uint32_t)i);
	n = ckv_select_topk(s, 10, 0.01, out); /* k < 2: the two always kept */
	CHECK(n == 2 && out[0] == 0 && out[1] == 9);
	n = ckv_select_topk(s, 1, 0.5, out);
	CHECK(n == 1 && out[0] == 0);
	/* budget * m just above an integer by rounding: 0.1 * 320 */
	{
		float *z = calloc(320, sizeof(*z));
		uint32_t *o = malloc(sizeof(*o) * 320);

		CHECK(z && o);
		CHECK(ckv_select_topk(z, 320, 0.1, o) == 32);
		/* ties: lowest chunk ids first */
		CHECK(o[0] == 0 && o[1] == 1 && o[29] == 29 && o[30] == 30 && o[31] == 319);
		free(z);
		free(o);
	}
	/* NaN ranks last */
	{
		float t[5] = { 0, NAN, -1e30f, NAN, 0 };

		n = ckv_select_topk(t, 5, 0.6, out);
		CHECK(n == 3 && out[1] == 2);
	}
	CHECK(ckv_select_topk(s, 10, 0, out) == -EINVAL);
	CHECK(ckv_select_topk(s, 10, 1.5, out) == -EINVAL);
	CHECK(ckv_select_topk(s, 0, 0.5, out) == -EINVAL);
	CHECK(ckv_select_topk(NULL, 10, 0.5, out) == -EINVAL);
}

/* Digest scores three ways, and key scores against their definition. */
static void check_scores(void)
{
	struct tstore t;
	ckv_loader *l;
	ckv_prefix *p;
	ckv_shape sh;
	uint64_t seed = 7;
	const uint32_t QT = 3, QH = 4; /* GQA: 2 query heads per kv head */
	float *q, *s_cpu, *s_dev, *ref, *q_dev, *sc_dev;
	uint32_t D, m;

	tstore_make(&t, "bf16", 3, 2, 64, 400, 900);
	l = tl_loader(t.dir, 32 << 20, 0);
	CHECK_RC(ckv_prefix_open(l, t.child_hex, &p), l);
	ckv_prefix_shape(p, &sh);
	D = sh.head_dim;
	m = sh.chunks;
	q = tl_query(&seed, QT, QH, D);
	s_cpu = malloc(sizeof(float) * m);
	s_dev = malloc(sizeof(float) * m);
	ref = malloc(sizeof(float) * m);
	CHECK(s_cpu && s_dev && ref);
	q_dev = tl_alloc(l, sizeof(float) * QT * QH * D);
	sc_dev = tl_alloc(l, sizeof(float) * m);
	CHECK_RC(ckv_loader_from_host(l, q_dev, q, sizeof(float) * QT * QH * D), l);
	for (uint32_t layer = 0; layer < sh.layers; layer++) {
		/* the definition, from the mean keys of the exported chunks */
		for (uint32_t j = 0; j < m; j++) {
			float dig[2 * 64];
			double acc = 0;

			ckv_chunk_digest(&t.g, tstore_chunk(&t, layer, j, CKV_PART_KV),
					 tl_valid(&sh, j), dig);
			for (uint32_t tt = 0; tt < QT; tt++)
				for (uint32_t h = 0; h < QH; h++)
					for (uint32_t d = 0; d < D; d++)
						acc += (double)q[((size_t)tt * QH + h) * D + d] * dig[(h / 2) * D + d];
			ref[j] = (float)(acc / sqrt((double)D));
		}
		CHECK_RC(ckv_digest_scores(p, layer, q, QT, QH, s_cpu), l);
		CHECK_RC(ckv_digest_scores_device(p, layer, q_dev, QT, QH, sc_dev, NULL), l);
		tl_to_host(l, s_dev, sc_dev, sizeof(float) * m);
		for (uint32_t j = 0; j < m; j++) {
			double tol = 1e-4 * (1 + fabs(ref[j]));

			if (fabs(s_cpu[j] - ref[j]) > tol || fabs(s_dev[j] - ref[j]) > tol) {
				fprintf(stderr, "layer %u chunk %u: cpu %g device %g reference %g\n", layer,
					j, s_cpu[j], s_dev[j], ref[j]);
				exit(1);
			}
		}
	}
	/*
	 * A digest cache smaller than one layer: every layer is read, handed
	 * out and freed once unpinned, with the same scores (the layer just
	 * read used to be trimmed before its reader got it).
	 */
	{
		ckv_prefix *p2;
		float *want = malloc(sizeof(float) * m * sh.layers), *s2 = malloc(sizeof(float) * m);

		CHECK(want && s2);
		for (uint32_t layer = 0; layer < sh.layers; layer++)
			CHECK_RC(ckv_digest_scores(p, layer, q, QT, QH, want + (size_t)layer * m), l);
		CHECK_RC(ckv_prefix_open(l, t.child_hex, &p2), l);
		p2->dig_cap = 1024;
		CHECK(ckv_prefix_digest_bytes(p2) > p2->dig_cap);
		for (int round = 0; round < 2; round++)
			for (uint32_t layer = 0; layer < sh.layers; layer++) {
				const float *dig = NULL;
				double waited;
				int how = -1;

				CHECK_RC(ckv_prefix_digests_get(p2, layer, &dig, &how, &waited), l);
				CHECK(dig != NULL && how >= 0);
				ckv_prefix_digests_put(p2, layer);
				CHECK(p2->dig_bytes == 0); /* unpinned, over the cap: freed */
				CHECK_RC(ckv_digest_scores(p2, layer, q, QT, QH, s2), l);
				CHECK(memcmp(want + (size_t)layer * m, s2, sizeof(float) * m) == 0);
			}
		ckv_prefix_close(p2);
		free(s2);
		free(want);
	}
	/* exact key scores: max over valid tokens of q . k / sqrt(D), summed */
	{
		uint32_t ch[4] = { 0, 17, 30, m - 1 }; /* the last chunk is partial */
		float got[4];
		const uint32_t layer = 1;

		CHECK(ckv_key_scores(&sh, tstore_chunk(&t, layer, 0, CKV_PART_K), sh.chunk_bytes, ch, 1, q,
				     QT, QH, got) == 0);
		for (int i = 0; i < 4; i++) {
			const uint8_t *k = tstore_chunk(&t, layer, ch[i], CKV_PART_K);
			uint32_t valid = tl_valid(&sh, ch[i]);
			double total = 0;

			CHECK(ckv_key_scores(&sh, k, sh.half_bytes, &ch[i], 1, q, QT, QH, &got[i]) == 0);
			for (uint32_t tt = 0; tt < QT; tt++)
				for (uint32_t h = 0; h < QH; h++) {
					double best = -INFINITY;

					for (uint32_t s = 0; s < valid; s++) {
						double dot = 0;

						for (uint32_t d = 0; d < D; d++)
							dot += (double)q[((size_t)tt * QH + h) * D + d] *
							       ckv_dtype_to_f32(CKV_DTYPE_BF16,
										k + (((size_t)(h / 2) * 16 + s) * D + d) * 2);
						if (dot > best)
							best = dot;
					}
					total += best;
				}
			total /= sqrt((double)D);
			CHECK(fabs(got[i] - total) < 1e-3 * (1 + fabs(total)));
		}
		CHECK(ckv_key_scores(&sh, tstore_chunk(&t, 0, 0, CKV_PART_K), 16, ch, 1, q, QT, QH, got) ==
		      -EINVAL);
		ch[0] = m;
		CHECK(ckv_key_scores(&sh, tstore_chunk(&t, 0, 0, CKV_PART_K), sh.half_bytes, ch, 1, q, QT,
				     QH, got) == -EINVAL);
	}
	CHECK(ckv_digest_scores(p, 0, q, QT, 3, s_cpu) == -EINVAL); /* 3 heads, 2 kv heads */
	CHECK(strstr(ckv_loader_error(l), "multiple"));
	CHECK(ckv_digest_scores(p, 3, q, QT, QH, s_cpu) == -EINVAL);
	ckv_loader_free(l, q_dev);
	ckv_loader_free(l, sc_dev);
	free(q);
	free(s_cpu);
	free(s_dev);
	free(ref);
	ckv_prefix_close(p);
	ckv_loader_close(l);
	tstore_free(&t);
}

static const char *ckv_tool(const char *argv0)
{
	static char path[4096];
	const char *b = getenv("CKV_BUILD");

	if (b) {
		snprintf(path, sizeof(path), "%s/ckv", b);
	} else { /* build/tests/<name> -> build/ckv */
		char tmp[4096];

		snprintf(tmp, sizeof(tmp), "%s", argv0);
		snprintf(path, sizeof(path), "%s/../ckv", dirname(tmp));
	}
	return path;
}

/* Planted chunks: digests must find them. */
static void check_planted(const char *ckv, const char *preset, uint32_t tokens, double frac)
{
	char dir[] = "/tmp/ckv-test-plant-XXXXXX", cmd[8192], plant[128], hash[64] = "";
	json_t *root, *planted, *query;
	json_error_t jerr;
	ckv_loader *l;
	ckv_prefix *p;
	ckv_shape sh;
	FILE *f;
	uint8_t *is_planted;
	uint32_t *sel, np;
	float *q, *sc;

	CHECK(mkdtemp(dir));
	snprintf(plant, sizeof(plant), "%s/plant.json", dir);
	snprintf(cmd, sizeof(cmd),
		 "'%s' init '%s/s' >/dev/null && '%s' gen -q --no-sync '%s/s' --model %s --tokens %u --seed 3 --plant %g --plant-out '%s'",
		 ckv, dir, ckv, dir, preset, tokens, frac, plant);
	f = popen(cmd, "r");
	CHECK(f);
	CHECK(fgets(hash, sizeof(hash), f));
	CHECK(pclose(f) == 0);
	hash[strcspn(hash, "\n")] = 0;
	root = json_load_file(plant, 0, &jerr);
	CHECK(root);
	planted = json_object_get(root, "planted");
	query = json_object_get(root, "query");
	CHECK(json_is_array(planted) && json_is_array(query));
	CHECK(strcmp(json_string_value(json_object_get(root, "hash")), hash) == 0);

	snprintf(cmd, sizeof(cmd), "%s/s", dir);
	l = tl_loader(cmd, 32 << 20, 0);
	CHECK_RC(ckv_prefix_open(l, hash, &p), l);
	ckv_prefix_shape(p, &sh);
	np = (uint32_t)json_array_size(planted);
	CHECK(np == (uint32_t)llround(frac * sh.chunks));
	is_planted = calloc(sh.chunks, 1);
	sel = malloc(sizeof(*sel) * sh.chunks);
	sc = malloc(sizeof(*sc) * sh.chunks);
	q = malloc(sizeof(*q) * 2 * sh.kv_heads * sh.head_dim);
	CHECK(is_planted && sel && sc && q && json_array_size(query) == sh.layers);
	for (size_t i = 0; i < np; i++)
		is_planted[json_integer_value(json_array_get(planted, i))] = 1;
	for (uint32_t layer = 0; layer < sh.layers; layer++) {
		json_t *lq = json_array_get(query, layer);

		/* [1][kv_heads][D] (q_heads = kv_heads), and GQA [1][2 kv_heads][D] */
		for (int gqa = 0; gqa < 2; gqa++) {
			uint32_t qh = sh.kv_heads * (gqa ? 2 : 1);
			const double budgets[3] = { frac + 2.0 / sh.chunks, 1.5 * frac, 2 * frac };

			for (uint32_t h = 0; h < qh; h++)
				for (uint32_t d = 0; d < sh.head_dim; d++)
					q[(size_t)h * sh.head_dim + d] = (float)json_real_value(
						json_array_get(json_array_get(lq, gqa ? h / 2 : h), d));
			CHECK_RC(ckv_digest_scores(p, layer, q, 1, qh, sc), l);
			for (int b = 0; b < 3; b++) {
				int n = ckv_select_topk(sc, sh.chunks, budgets[b], sel);
				uint32_t hit = 0;

				CHECK(n > 0);
				for (int i = 0; i < n; i++)
					hit += is_planted[sel[i]];
				if (hit < 0.95 * np) {
					fprintf(stderr, "%s layer %u budget %.4f: %u of %u planted chunks found\n",
						preset, layer, budgets[b], hit, np);
					exit(1);
				}
			}
		}
	}
	free(is_planted);
	free(sel);
	free(sc);
	free(q);
	json_decref(root);
	ckv_prefix_close(p);
	ckv_loader_close(l);
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	CHECK(system(cmd) == 0);
}

/*
 * Key-copy mass scores (ckv_keyq_mass_cpu, what ckv_keyq_scores and the
 * pipeline's score=keyq run) against the definition computed here in
 * double from the decoded keys: for odd geometries (GQA, a chunk longer
 * than the scorer's slot block, a partial last chunk, several parts with
 * their own scales), with and without the new tokens' keys, and with
 * enough work for several threads.
 */
static void keyq_ref(const ckv_shape *sh, const struct ckv_keyq *kq, const float *q,
		     const float *keys, uint32_t T, uint32_t qh, double *out)
{
	uint32_t H = sh->kv_heads, D = sh->head_dim, c = sh->chunk_tokens, m = sh->chunks, g = qh / H;
	ckv_geom geo = { .kv_heads = H, .head_dim = D, .chunk_tokens = c };
	float *k = malloc(sizeof(float) * m * H * c * D);
	double *lg = malloc(sizeof(double) * (m * c + T));

	CHECK(k && lg);
	for (uint32_t x = 0; x < kq->nparts; x++)
		for (uint32_t j = kq->first[x]; j < kq->first[x + 1]; j++)
			ckv_keyq_decode(&geo, kq->bits, kq->scales + 2ull * H * D * x, kq->codes + j * kq->per,
					k + (size_t)j * H * c * D);
	for (uint32_t j = 0; j < m; j++)
		out[j] = 0;
	for (uint32_t t = 0; t < T; t++)
		for (uint32_t hq = 0; hq < qh; hq++) {
			const float *qq = q + ((size_t)t * qh + hq) * D;
			uint32_t h = hq / g, n = 0;
			double mx = -INFINITY, tot = 0;

			for (uint32_t j = 0; j < m; j++)
				for (uint32_t s = 0; s < c && j * c + s < sh->tokens; s++) {
					const float *kk = k + (((size_t)j * H + h) * c + s) * D;
					double d = 0;

					for (uint32_t x = 0; x < D; x++)
						d += (double)qq[x] * kk[x];
					lg[n++] = d / sqrt((double)D);
				}
			for (uint32_t u = 0; keys && u <= t; u++) {
				const float *kk = keys + ((size_t)u * H + h) * D;
				double d = 0;

				for (uint32_t x = 0; x < D; x++)
					d += (double)qq[x] * kk[x];
				lg[n++] = d / sqrt((double)D);
			}
			for (uint32_t i = 0; i < n; i++)
				mx = fmax(mx, lg[i]);
			for (uint32_t i = 0; i < n; i++)
				tot += exp(lg[i] - mx);
			n = 0;
			for (uint32_t j = 0; j < m; j++)
				for (uint32_t s = 0; s < c && j * c + s < sh->tokens; s++)
					out[j] += exp(lg[n++] - mx) / tot;
		}
	free(k);
	free(lg);
}

/* The CUDA backend where a GPU answers (else NULL): the device scorer is checked against the CPU's. */
static ckv_backend *keyq_cuda(void)
{
	static ckv_backend *be;
	static bool tried;

	if (!tried) {
		tried = true;
		if (ckv_backend_cuda(0, &be) < 0)
			be = NULL;
	}
	return be;
}

/*
 * The backend's keyq_scores on kq (uploaded here) against the CPU's scores
 * cpu: equal to rounding; chunks of more than 32 slots refused with
 * -ENOTSUP. Returns the worst relative difference, or -1 without a GPU.
 */
static double keyq_device(const ckv_shape *sh, const struct ckv_keyq *kq, const float *q,
			  const float *nk, uint32_t T, uint32_t qh, const float *cpu)
{
	ckv_backend *be = keyq_cuda();
	uint32_t m = sh->chunks, HD = sh->kv_heads * sh->head_dim;
	uint64_t nq = (uint64_t)T * qh * sh->head_dim * 4, nn = (uint64_t)T * HD * 4;
	uint64_t nsc = (uint64_t)kq->nparts * 2 * HD * 2;
	uint32_t *part = malloc(sizeof(*part) * m);
	float *got = malloc(sizeof(float) * m);
	void *codes, *scales, *pd, *qd, *nd, *sd;
	ckv_keyq_dev k = { 0 };
	double worst = 0;
	int rc;

	CHECK(part && got);
	if (!be) {
		free(part);
		free(got);
		return -1;
	}
	for (uint32_t x = 0; x < kq->nparts; x++)
		for (uint32_t j = kq->first[x]; j < kq->first[x + 1]; j++)
			part[j] = x;
	CHECK(be->ops->alloc(be, kq->per * m, &codes) == 0);
	CHECK(be->ops->alloc(be, nsc, &scales) == 0);
	CHECK(be->ops->alloc(be, 4ull * m, &pd) == 0);
	CHECK(be->ops->alloc(be, nq, &qd) == 0);
	CHECK(be->ops->alloc(be, nn, &nd) == 0);
	CHECK(be->ops->alloc(be, 4ull * m, &sd) == 0);
	CHECK(be->ops->from_host(be, codes, kq->codes, kq->per * m) == 0);
	CHECK(be->ops->from_host(be, scales, kq->scales, nsc) == 0);
	CHECK(be->ops->from_host(be, pd, part, 4ull * m) == 0);
	CHECK(be->ops->from_host(be, qd, q, nq) == 0);
	if (nk)
		CHECK(be->ops->from_host(be, nd, nk, nn) == 0);
	k.codes = codes;
	k.scales = scales;
	k.part = pd;
	k.per = kq->per;
	k.bits = kq->bits;
	ckv_keyq_levels(kq->bits, k.levels);
	k.m = m;
	k.tokens = sh->tokens;
	k.kv_heads = sh->kv_heads;
	k.head_dim = sh->head_dim;
	k.chunk_tokens = sh->chunk_tokens;
	rc = be->ops->keyq_scores(be, &k, qd, nk ? nd : NULL, T, qh, sd, NULL);
	if (sh->chunk_tokens > CKV_KEYQ_DEV_MAX_CHUNK) {
		CHECK(rc == -ENOTSUP);
	} else {
		CHECK(rc == 0 && be->ops->sync(be, NULL) == 0);
		CHECK(be->ops->to_host(be, got, sd, 4ull * m) == 0);
		for (uint32_t j = 0; j < m; j++) {
			double err = fabs((double)got[j] - cpu[j]) / (fabs(cpu[j]) + 1e-6);

			if (err > 1e-3)
				fprintf(stderr, "keyq on the device, chunk %u: %g, the CPU %g\n", j, got[j], cpu[j]);
			CHECK(err <= 1e-3);
			worst = err > worst ? err : worst;
		}
	}
	/* bad input: query heads not a multiple of the kv heads */
	if (sh->kv_heads > 1)
		CHECK(be->ops->keyq_scores(be, &k, qd, NULL, T, sh->kv_heads + 1, sd, NULL) == -EINVAL);
	be->ops->free(be, codes);
	be->ops->free(be, scales);
	be->ops->free(be, pd);
	be->ops->free(be, qd);
	be->ops->free(be, nd);
	be->ops->free(be, sd);
	free(part);
	free(got);
	return worst;
}

static void check_keyq_mass(void)
{
	static const struct {
		uint32_t H, D, c, tokens, parts, T, qh;
	} cases[] = {
		{ 2, 64, 16, 1000, 1, 4, 14 },   /* Qwen2.5-0.5B heads, partial last chunk */
		{ 3, 24, 512, 1300, 2, 3, 6 },   /* chunks longer than a slot block */
		{ 1, 8, 7, 50, 3, 5, 1 },        /* odd chunk, three segments' scales */
		{ 4, 32, 16, 8192, 2, 64, 28 },  /* enough work for several threads */
		{ 2, 64, 32, 700, 2, 3, 4 },     /* 32-token chunks (the device's other tiled case) */
		{ 2, 16, 8, 300, 2, 2, 4 },      /* 8-token chunks (the device's lane-a-slot kernel) */
		{ 1, 8, 16, 64, 1, 8200, 1 },    /* more new keys than the device keeps in shared memory */
	};
	uint64_t seed = 77;

	for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
		ckv_shape sh = { .kv_heads = cases[ci].H, .head_dim = cases[ci].D,
				 .chunk_tokens = cases[ci].c, .tokens = cases[ci].tokens };
		ckv_geom geo = { .kv_heads = sh.kv_heads, .head_dim = sh.head_dim,
				 .chunk_tokens = sh.chunk_tokens, .dtype = CKV_DTYPE_FP32 };
		uint32_t m = (sh.tokens + sh.chunk_tokens - 1) / sh.chunk_tokens, T = cases[ci].T;
		uint32_t qh = cases[ci].qh, np = cases[ci].parts, HD = sh.kv_heads * sh.head_dim;
		size_t chunk = (size_t)HD * sh.chunk_tokens;
		struct ckv_keyq kq = { .bits = CKV_KEYQ_BITS, .nparts = np };
		float *keys = tl_query(&seed, m * sh.chunk_tokens, sh.kv_heads, sh.head_dim); /* [m][chunk] */
		float *q = tl_query(&seed, T, qh, sh.head_dim), *nk = tl_query(&seed, T, sh.kv_heads, sh.head_dim);
		float *got = malloc(sizeof(float) * m);
		double *want = malloc(sizeof(double) * m), worst = 0, dev, dworst = -1;

		sh.chunks = m;
		kq.per = ckv_keyq_chunk_bytes(&geo, kq.bits);
		kq.first = malloc(sizeof(*kq.first) * (np + 1));
		kq.scales = malloc(sizeof(*kq.scales) * 2 * HD * np);
		kq.codes = malloc(kq.per * m);
		CHECK(keys && q && nk && got && want && kq.first && kq.scales && kq.codes);
		/* parts: equal runs of chunks, each with the scales of its own keys */
		for (uint32_t x = 0; x <= np; x++)
			kq.first[x] = (uint32_t)((uint64_t)m * x / np);
		for (uint32_t x = 0; x < np; x++) {
			double *sum = calloc(2 * HD, sizeof(double));
			uint64_t ntok = 0;

			CHECK(sum);
			/* the part's keys (a K half's layout per chunk), at the part's own scale and offset */
			for (size_t i = (size_t)kq.first[x] * chunk; i < (size_t)kq.first[x + 1] * chunk; i++)
				keys[i] = 3.0f * keys[i] * (float)(1 + x) + 0.5f * (float)(i % chunk % 3);
			for (int pass = 0; pass < 2; pass++) {
				for (uint32_t j = kq.first[x]; j < kq.first[x + 1]; j++) {
					uint32_t valid = (j + 1) * sh.chunk_tokens <= sh.tokens ? sh.chunk_tokens :
											       sh.tokens - j * sh.chunk_tokens;
					const float *kc = keys + (size_t)j * chunk;

					if (pass == 0) {
						ckv_keyq_stats_add(&geo, kc, valid, sum, sum + HD);
						ntok += valid;
					} else {
						ckv_keyq_encode(&geo, kq.bits, kq.scales + 2 * HD * x, kc, valid,
								kq.codes + j * kq.per);
					}
				}
				if (pass == 0)
					ckv_keyq_scales(&geo, sum, sum + HD, ntok, kq.scales + 2 * HD * x);
			}
			free(sum);
		}
		for (int with = 0; with < 2; with++) {
			double total = 0;

			CHECK(ckv_keyq_mass_cpu(&sh, &kq, q, with ? nk : NULL, T, qh, got) == 0);
			keyq_ref(&sh, &kq, q, with ? nk : NULL, T, qh, want);
			for (uint32_t j = 0; j < m; j++) {
				double err = fabs(got[j] - want[j]) / (fabs(want[j]) + 1e-6);

				worst = err > worst ? err : worst;
				total += got[j];
				if (err > 2e-4)
					fprintf(stderr, "keyq case %zu chunk %u: %g, want %g\n", ci, j, got[j], want[j]);
				CHECK(err <= 2e-4);
			}
			dev = keyq_device(&sh, &kq, q, with ? nk : NULL, T, qh, got);
			dworst = dev > dworst ? dev : dworst;
			/* every query row's weights sum to 1 over the prefix alone */
			if (!with)
				CHECK(fabs(total - (double)T * qh) < 1e-3 * T * qh);
			else
				CHECK(total < (double)T * qh);
		}
		printf("keyq mass: H %u D %u c %u, %u tokens in %u parts, %u x %u queries: worst relative error %.2e",
		       sh.kv_heads, sh.head_dim, sh.chunk_tokens, sh.tokens, np, T, qh, worst);
		if (dworst < 0)
			printf("; no GPU: the device scorer not compared\n");
		else if (sh.chunk_tokens > CKV_KEYQ_DEV_MAX_CHUNK)
			printf("; the device scorer refuses chunks of %u slots\n", sh.chunk_tokens);
		else
			printf("; the device scorer's worst relative difference to it %.2e\n", dworst);
		ckv_keyq_free(&kq);
		free(keys);
		free(q);
		free(nk);
		free(got);
		free(want);
	}
}

int main(int argc, char **argv)
{
	const char *ckv = ckv_tool(argv[0]);

	(void)argc;
	check_topk();
	check_scores();
	check_keyq_mass();
	if (access(ckv, X_OK) != 0) {
		fprintf(stderr, "%s: not found (set CKV_BUILD)\n", ckv);
		return 1;
	}
	check_planted(ckv, "qwen2.5-0.5b", 4096, 0.05);
	check_planted(ckv, "qwen2.5-0.5b", 3000, 0.1);
	check_planted(ckv, "qwen2.5-7b", 2048, 0.2);
	printf("ok\n");
	return 0;
}
