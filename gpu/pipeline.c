/*
 * pipeline.c — the layer pipeline (ckvgpu.h, DESIGN §6): per layer, decide
 * the chunk set (identification), issue its reads, reconcile speculative
 * reads with the set once it is known, wait, gather into a layer buffer,
 * and issue reads for the layers ahead — all on the caller's thread, between
 * the caller's layer computations.
 *
 * Requests. Per layer and part (KV, K, V) the pipeline keeps its chunk
 * requests sorted by chunk id. A request is served by the GPU tier (pinned
 * there at issue) or by a source get (an rbatch slot, pinned in the arena
 * when its read completes). A request issued before its layer's set was
 * known is speculative. Reconciling a layer's requests with a set S keeps
 * the requests in S, drops the others (a dropped arena request is released
 * once its read completes; a dropped speculative one counts as wasted) and
 * issues requests for the chunks of S that had none. Reconciling as final
 * (S is the layer's own set) turns kept speculative requests into used
 * ones.
 *
 * Speculative reads are idle reads where the source can withdraw them
 * (CKV_SRC_GET_IDLE: the engine reads them only while it has nothing else
 * to read). Reconciling withdraws those whose read has not started when
 * they are dropped (nothing was read: neither a disk read nor waste) or
 * when they are needed now (read again at once as an ordinary read), so a
 * speculation costs disk time only when the disk would have been idle.
 *
 * Digests. Identification reads the layer's key digests from the prefix's
 * digest cache; they need no query, so the pipeline asks for them ahead (a
 * thread of the prefix reads them while earlier layers load and compute):
 * at open the first identifying layer's, after a period's identification
 * the next period's (PERIOD); DIG_AHEAD layers ahead where every layer is
 * identified (LAYER, RERANK, also with no_prefetch, which concerns chunk
 * reads).
 *
 * Gather. At ckv_pipeline_layer(l) every request of l belongs to a chunk of
 * l's set; one gather per source kind (arena whole chunks, arena K halves,
 * arena V halves, and the same from the tier) fills buffer slot l % depth
 * in the order of the set; a release job then drops the pins once the
 * stream has executed the copies. Chunks not served by the tier are copied
 * into it from the buffer (device to device).
 *
 * Not thread-safe: a pipeline is used from one thread (ckvgpu.h).
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "loader_int.h"

#define NPARTS 3
#define DIG_AHEAD 4 /* layers whose digests are asked for ahead when every layer identifies */

struct preq {
	uint32_t chunk;
	bool spec;           /* issued before the layer's set was known */
	struct rbatch *b;    /* the source get, or NULL: served by the GPU tier */
	uint32_t i;          /* index in b, or the tier entry */
	void *tptr;          /* tier: the whole chunk in backend memory */
};

struct preqs {
	struct preq *v;      /* ascending chunk */
	uint32_t n, cap;
};

struct play {
	bool issued;
	struct preqs rq[NPARTS];
};

struct ckv_pipeline {
	ckv_prefix *p;
	ckv_loader *l;
	ckv_pipeline_opts o;
	ckv_shape sh;
	uint32_t L, m;
	uint32_t rows;       /* chunks of a set: m (FULL) or ckv_select_count(m, budget) */
	uint32_t kc;         /* RERANK candidates */
	uint32_t ahead;      /* run-ahead in layers */
	uint32_t next;       /* the layer expected next */
	int failed;          /* sticky error */
	uint32_t failed_layer;
	struct play *lay;    /* [L] */
	struct rbatch *batches; /* every live get */
	uint32_t *all;       /* [m]: 0 .. m-1 */
	uint32_t *cur, ncur; /* the set: PERIOD (of period cur_period), LAYER, RERANK winners */
	uint32_t *fset, nfset; /* LAYER: a floor layer's set (chunk 0 and the most recent) */
	uint32_t *spec;      /* [m] LAYER: the next layer's speculated set */
	double *budgets;     /* [L] LAYER: each layer's budget */
	bool scored;         /* LAYER: scores hold an identification's (the last one's) */
	double cur_budget;   /* LAYER: the budget cur was selected with */
	const float *keys;   /* the current call's new-token keys (ckv_pipeline_layer_qk) */
	uint32_t cur_period;
	uint32_t *cand, ncand; /* RERANK candidates */
	uint32_t *miss;      /* [m] scratch of req_issue */
	uint32_t *rmiss;     /* [m] scratch of reconcile */
	uint8_t *rdisp;      /* [m] scratch of reconcile: what becomes of each request */
	uint8_t *rgone;      /* [m] scratch of reconcile: withdrawn */
	uint32_t *wcand;     /* [m] scratch of withdraw_idle */
	uint32_t *widx;      /* [m] */
	uint32_t *wpos;      /* [m] */
	uint8_t *wdone;      /* [m] */
	uint8_t *dig_counted; /* [L] the layer's digest read was counted in bytes_digest */
	bool dig_ahead;      /* read digests ahead (digest identifications, prefetch on) */
	struct preq *radd;   /* [m] scratch of req_issue */
	float *scores;       /* [m] */
	void *kq_mem;        /* backend memory of device key-copy scoring: query, keys, scores */
	uint64_t kq_mem_bytes;
	bool kq_cpu;         /* the backend refused this shape (-ENOTSUP): score on the CPU from now on */
	uint8_t *khost;      /* [half_bytes]: a tier chunk's K, for exact scores on a device backend */
	uint32_t depth;
	void **buf;          /* [depth] backend memory, rows * chunk_bytes each */
	uint32_t **vchunks;  /* [depth][rows] chunk ids of each buffer's view */
	ckv_copy *cp[NPARTS];       /* gather scratch [rows] per part */
	const void **ts[NPARTS + 1]; /* tier copy scratch [rows]; [NPARTS]: inserts */
	void **td[NPARTS + 1];
	double t_open;
	struct rstats rs;
	ckv_pipeline_stats st;
	struct ckv_pipeline_xstats xst;
};

static int pfail(ckv_pipeline *pl, uint32_t layer, int rc)
{
	pl->failed = rc;
	pl->failed_layer = layer;
	return rc;
}

/* ---- requests ------------------------------------------------------------- */

static struct preq *req_find(struct preqs *q, uint32_t chunk)
{
	uint32_t lo = 0, hi = q->n;

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;

		if (q->v[mid].chunk < chunk)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < q->n && q->v[lo].chunk == chunk ? &q->v[lo] : NULL;
}

/* Give a request up; a speculative one counts as wasted when count_waste. */
static void req_drop(ckv_pipeline *pl, struct preq *r, bool count_waste)
{
	if (r->b)
		ckv_rbatch_drop(r->b, r->i);
	else
		ckv_tier_unpin(pl->l->tier, r->i);
	if (r->spec && count_waste)
		pl->st.spec_wasted++;
}

static int preqs_reserve(struct preqs *q, uint32_t n)
{
	struct preq *v;
	uint32_t cap;

	if (q->cap >= n)
		return 0;
	cap = q->cap ? q->cap : 16;
	while (cap < n)
		cap *= 2;
	v = realloc(q->v, sizeof(*v) * cap);
	if (!v)
		return -ENOMEM;
	q->v = v;
	q->cap = cap;
	return 0;
}

/*
 * Issue requests for chunks[0..n) (ascending, none requested yet) of a layer
 * and part: GPU tier first, one source get for the rest; merged into the
 * layer's sorted requests.
 */
static int req_issue(ckv_pipeline *pl, uint32_t layer, enum ckv_source_part part,
		     const uint32_t *chunks, uint32_t n, bool spec)
{
	ckv_loader *l = pl->l;
	struct preqs *q = &pl->lay[layer].rq[part];
	struct preq *add = pl->radd;
	struct rbatch *b = NULL;
	uint32_t nmiss = 0, a, o, w;
	int rc;

	pl->lay[layer].issued = true;
	if (n == 0)
		return 0;
	rc = preqs_reserve(q, q->n + n);
	if (rc < 0)
		return ckv_lerr(l, rc, "pipeline: out of memory");
	for (uint32_t i = 0; i < n; i++) {
		add[i] = (struct preq){ .chunk = chunks[i], .spec = spec };
		if (l->tier) {
			ckv_tkey k = ckv_prefix_chunk_key(pl->p, layer, chunks[i]);
			uint32_t id = ckv_tier_lookup(l->tier, &k, pl->sh.chunk_bytes, &add[i].tptr);

			if (id != CKV_TIER_NONE) {
				add[i].i = id;
				pl->st.hits_gpu++;
				atomic_fetch_add_explicit(&l->st.hits_gpu, 1, memory_order_relaxed);
				continue;
			}
			add[i].tptr = NULL;
		}
		add[i].i = nmiss;
		pl->miss[nmiss++] = chunks[i];
	}
	if (nmiss) {
		rc = ckv_rbatch_issue_ex(pl->p, layer, part, pl->miss, nmiss, spec, &pl->rs, &b);
		if (b) { /* even a failed get: the sweep frees it */
			b->next = pl->batches;
			pl->batches = b;
		}
		if (rc < 0) {
			for (uint32_t i = 0; i < n; i++)
				if (add[i].tptr)
					ckv_tier_unpin(l->tier, add[i].i);
			return rc;
		}
		for (uint32_t i = 0; i < n; i++)
			if (!add[i].tptr)
				add[i].b = b;
	}
	/* merge q->v[0..q->n) and add[0..n), both ascending, from the back */
	a = n;
	o = q->n;
	w = q->n + n;
	while (a > 0) {
		if (o > 0 && q->v[o - 1].chunk > add[a - 1].chunk)
			q->v[--w] = q->v[--o];
		else
			q->v[--w] = add[--a];
	}
	q->n += n;
	return 0;
}

enum { R_KEEP = 0, R_DROP = 1, R_PROMOTE = 2 };

/*
 * Withdraw the idle reads, not started yet, of the requests of q that will
 * be dropped or are needed now (disp[i] != R_KEEP); gone[i] = 1 where
 * withdrawn. One call per batch.
 */
static void withdraw_idle(ckv_pipeline *pl, struct preqs *q, const uint8_t *disp, uint8_t *gone)
{
	uint32_t nc = 0;

	for (uint32_t i = 0; i < q->n; i++) {
		struct rbatch *b = q->v[i].b;

		gone[i] = 0;
		if (disp[i] != R_KEEP && b && b->idle && b->state[q->v[i].i] == RB_HELD)
			pl->wcand[nc++] = i;
	}
	for (uint32_t a = 0; a < nc; a++) {
		struct rbatch *b;
		uint32_t k = 0;

		if (pl->wcand[a] == UINT32_MAX)
			continue;
		b = q->v[pl->wcand[a]].b;
		for (uint32_t c = a; c < nc; c++)
			if (pl->wcand[c] != UINT32_MAX && q->v[pl->wcand[c]].b == b) {
				pl->widx[k] = q->v[pl->wcand[c]].i;
				pl->wpos[k++] = pl->wcand[c];
				pl->wcand[c] = UINT32_MAX;
			}
		if (ckv_rbatch_withdraw(b, pl->widx, k, pl->wdone) == 0)
			continue;
		for (uint32_t c = 0; c < k; c++)
			gone[pl->wpos[c]] = pl->wdone[c];
	}
}

/*
 * Make layer's requests of part equal S[0..nS) (ascending): keep, drop,
 * issue the missing (speculative unless final). Speculative reads not
 * started are withdrawn when dropped, and when final read again as
 * ordinary reads (they are needed now).
 */
static int reconcile(ckv_pipeline *pl, uint32_t layer, enum ckv_source_part part,
		     const uint32_t *S, uint32_t nS, bool final)
{
	struct preqs *q = &pl->lay[layer].rq[part];
	uint32_t i, s = 0, w = 0, nmiss = 0;

	for (i = 0; i < q->n; i++) {
		while (s < nS && S[s] < q->v[i].chunk)
			s++;
		pl->rdisp[i] = !(s < nS && S[s] == q->v[i].chunk) ? R_DROP :
			       final && q->v[i].spec ? R_PROMOTE : R_KEEP;
	}
	withdraw_idle(pl, q, pl->rdisp, pl->rgone);
	i = 0;
	s = 0;
	while (i < q->n || s < nS) {
		if (s == nS || (i < q->n && q->v[i].chunk < S[s])) { /* not in S */
			if (pl->rgone[i])
				pl->xst.spec_withdrawn++;
			else
				req_drop(pl, &q->v[i], true);
			i++;
		} else if (i == q->n || S[s] < q->v[i].chunk) {
			pl->rmiss[nmiss++] = S[s++];
		} else { /* in both */
			if (pl->rgone[i]) { /* withdrawn unread: read it now */
				pl->xst.spec_promoted++;
				pl->rmiss[nmiss++] = S[s++];
				i++;
				continue;
			}
			if (final && q->v[i].spec) {
				q->v[i].spec = false;
				pl->st.spec_used++;
			}
			q->v[w++] = q->v[i++];
			s++;
		}
	}
	q->n = w;
	return req_issue(pl, layer, part, pl->rmiss, nmiss, !final);
}

/* Drop every request of a layer's part whose chunk is not in S (no counting as waste). */
static void keep_only(ckv_pipeline *pl, uint32_t layer, enum ckv_source_part part,
		      const uint32_t *S, uint32_t nS)
{
	struct preqs *q = &pl->lay[layer].rq[part];
	uint32_t w = 0, s = 0;

	for (uint32_t i = 0; i < q->n; i++) {
		while (s < nS && S[s] < q->v[i].chunk)
			s++;
		if (s < nS && S[s] == q->v[i].chunk)
			q->v[w++] = q->v[i];
		else
			req_drop(pl, &q->v[i], false);
	}
	q->n = w;
}

/* Wait for a layer's gets of one part (or all: part < 0), then check them. */
static int wait_layer(ckv_pipeline *pl, uint32_t layer, int part)
{
	double t0 = 0;
	bool waited = false;

	for (int x = 0; x < NPARTS; x++) {
		struct preqs *q = &pl->lay[layer].rq[x];

		if (part >= 0 && x != part)
			continue;
		struct rbatch *last = NULL;

		for (uint32_t i = 0; i < q->n; i++) {
			struct rbatch *b = q->v[i].b;

			if (!b || b == last)
				continue;
			last = b;
			if (ckv_rbatch_complete(b))
				continue;
			if (!waited) {
				t0 = ckv_now();
				waited = true;
			}
			ckv_rbatch_wait(b);
		}
	}
	if (waited)
		pl->st.wait_s += ckv_now() - t0;

	for (int x = 0; x < NPARTS; x++) {
		struct preqs *q = &pl->lay[layer].rq[x];

		if (part >= 0 && x != part)
			continue;
		for (uint32_t i = 0; i < q->n; i++) {
			int rc;

			if (!q->v[i].b)
				continue;
			rc = ckv_rbatch_check(q->v[i].b, q->v[i].i);
			if (rc < 0)
				return ckv_lerr(pl->l, rc, "prefix %s layer %u chunk %u (%s): %s",
						pl->sh.hash, layer, q->v[i].chunk,
						x == CKV_SRC_KV ? "whole chunk" : x == CKV_SRC_K ? "K half" : "V half",
						rc == -EIO ? "read failed or checksum mismatch" :
						rc == -ENOMEM ? "the arena is full of pinned chunks (raise arena_bytes or lower the subperiod)" :
						strerror(-rc));
		}
	}
	return 0;
}

/* ---- identification -------------------------------------------------------- */

/* LAYER: whether a layer is a floor layer (its set known without identification). */
static bool is_floor(const ckv_pipeline *pl, uint32_t layer)
{
	return pl->o.floor > 0 && pl->budgets[layer] <= pl->o.floor;
}

/* Ask the prefix's digest thread for a layer's digests (counted once as read). */
static void digests_ahead(ckv_pipeline *pl, uint32_t layer)
{
	if (!pl->dig_ahead || layer >= pl->L || is_floor(pl, layer))
		return;
	if (ckv_prefix_digests_ahead(pl->p, layer) == 1 && !pl->dig_counted[layer]) {
		pl->dig_counted[layer] = 1;
		pl->st.bytes_digest += ckv_prefix_digest_bytes(pl->p);
	}
}

static int digest_scores(ckv_pipeline *pl, uint32_t layer, const float *query)
{
	const float *dig;
	double t0 = ckv_now(), waited;
	int how, rc = ckv_prefix_digests_get(pl->p, layer, &dig, &how, &waited);

	if (rc < 0)
		return rc;

	pl->xst.dig_wait_s += how == DIG_GOT_CACHED ? 0 : ckv_now() - t0;
	if (how == DIG_GOT_READ) {
		pl->xst.dig_read++;
		if (!pl->dig_counted[layer])
			pl->st.bytes_digest += ckv_prefix_digest_bytes(pl->p);
	} else {
		pl->xst.dig_ahead += how == DIG_GOT_AHEAD || pl->dig_counted[layer];
		pl->xst.dig_cached += how == DIG_GOT_CACHED && !pl->dig_counted[layer];
	}
	pl->dig_counted[layer] = 1;
	ckv_digest_scores_cpu(dig, pl->m, pl->sh.kv_heads, pl->sh.head_dim, query, pl->o.q_tokens,
			      pl->o.q_heads, pl->scores);
	ckv_prefix_digests_put(pl->p, layer);
	return 0;
}

/* Exact scores of chunks C[0..n) of a layer from its K requests (complete). */
static int key_scores(ckv_pipeline *pl, uint32_t layer, const float *query, const uint32_t *C,
		      uint32_t n, float *out)
{
	ckv_loader *l = pl->l;
	const uint8_t *arena = l->src->arena;

	for (uint32_t i = 0; i < n; i++) {
		struct preq *r = req_find(&pl->lay[layer].rq[CKV_SRC_K], C[i]);
		const void *keys;
		int rc;

		if (!r)
			return ckv_lerr(l, -EIO, "pipeline: layer %u chunk %u has no K read", layer, C[i]);
		if (r->b) {
			keys = arena + r->b->off[r->i];
		} else if (l->kind == CKV_BACKEND_HOST) {
			keys = r->tptr;
		} else {
			rc = l->be->ops->to_host(l->be, pl->khost, r->tptr, pl->sh.half_bytes);
			if (rc < 0)
				return ckv_lerr(l, rc, "pipeline: cannot copy chunk %u's keys to the host", C[i]);
			keys = pl->khost;
		}
		rc = ckv_key_scores(&pl->sh, keys, pl->sh.half_bytes, &C[i], 1, query, pl->o.q_tokens,
				    pl->o.q_heads, &out[i]);
		if (rc < 0)
			return ckv_lerr(l, rc, "pipeline: exact scores of layer %u failed", layer);
	}
	return 0;
}

/*
 * Keys path: read the K halves of C (final), score them exactly, select
 * pl->rows of them into pl->cur. Scores of chunks outside C are -inf.
 */
static int identify_from_keys(ckv_pipeline *pl, uint32_t layer, const float *query,
			      const uint32_t *C, uint32_t n)
{
	struct play *ly = &pl->lay[layer];
	float *ks;
	int rc;

	rc = ly->rq[CKV_SRC_K].n ? reconcile(pl, layer, CKV_SRC_K, C, n, true) :
				   req_issue(pl, layer, CKV_SRC_K, C, n, false);
	if (rc == 0)
		rc = wait_layer(pl, layer, CKV_SRC_K);
	if (rc < 0)
		return rc;
	ks = malloc(sizeof(*ks) * (n ? n : 1));
	if (!ks)
		return ckv_lerr(pl->l, -ENOMEM, "pipeline: out of memory");
	rc = key_scores(pl, layer, query, C, n, ks);
	if (rc == 0) {
		for (uint32_t j = 0; j < pl->m; j++)
			pl->scores[j] = -INFINITY;
		for (uint32_t i = 0; i < n; i++)
			pl->scores[C[i]] = ks[i];
		rc = ckv_select_topk(pl->scores, pl->m, pl->o.budget, pl->cur);
		if (rc >= 0) {
			pl->ncur = (uint32_t)rc;
			rc = 0;
		}
	}
	free(ks);
	if (rc < 0)
		return ckv_lerr(pl->l, rc, "pipeline: selection at layer %u failed", layer);
	/* K halves of the losers were only for scoring */
	keep_only(pl, layer, CKV_SRC_K, pl->cur, pl->ncur);
	return 0;
}

/*
 * Key-copy scores on a device backend: the (host) query and new keys go to
 * backend memory, the scores come back to pl->scores. On the pipeline's
 * stream, which ckv_keyq_mass_dev synchronizes.
 */
static int keyq_scores_dev(ckv_pipeline *pl, uint32_t layer, const struct ckv_keyq *kq,
			   const float *query)
{
	ckv_backend *be = pl->l->be;
	uint64_t nq = (uint64_t)pl->o.q_tokens * pl->o.q_heads * pl->sh.head_dim * sizeof(float);
	uint64_t nk = pl->keys ? (uint64_t)pl->o.q_tokens * pl->sh.kv_heads * pl->sh.head_dim *
					 sizeof(float) : 0;
	uint64_t ns = (uint64_t)pl->m * sizeof(float), need = nq + nk + ns;
	uint8_t *mem;
	int rc;

	rc = ckv_backend_reserve(pl->l, &pl->kq_mem, &pl->kq_mem_bytes, need,
				 "pipeline: key-copy scores");
	if (rc < 0)
		return rc;
	mem = pl->kq_mem;
	rc = be->ops->from_host(be, mem, query, nq);
	if (rc == 0 && nk)
		rc = be->ops->from_host(be, mem + nq, pl->keys, nk);
	if (rc < 0)
		return ckv_lerr(pl->l, rc, "pipeline: layer %u: cannot copy the query and keys to %s memory",
				layer, be->ops->name);
	rc = ckv_keyq_mass_dev(pl->p, layer, &pl->sh, kq, (const float *)mem,
			       nk ? (const float *)(mem + nq) : NULL, pl->o.q_tokens, pl->o.q_heads,
			       (float *)(mem + nq + nk), pl->o.stream);
	if (rc == 0)
		rc = be->ops->to_host(be, pl->scores, mem + nq + nk, ns);
	return rc;
}

/* Key-copy scores (CKV_SCORE_KEYQ) of a layer into pl->scores. */
static int keyq_scores(ckv_pipeline *pl, uint32_t layer, const float *query)
{
	struct ckv_keyq kq;
	double t0 = ckv_now();
	int rc = ckv_prefix_keyq(pl->p, layer, &kq);

	if (rc < 0)
		return rc;
	pl->xst.dig_read++;
	pl->xst.dig_wait_s += ckv_now() - t0;
	pl->st.bytes_digest += ckv_prefix_keyq_bytes(pl->p, &kq);
	rc = -ENOTSUP;
	if (pl->l->be->ops->keyq_scores && !pl->kq_cpu)
		rc = keyq_scores_dev(pl, layer, &kq, query); /* its errors name the layer */
	if (rc == -ENOTSUP) { /* a backend without a scorer, or a shape it does not take */
		pl->kq_cpu = true; /* the shape is the pipeline's: every layer would be refused */
		rc = ckv_keyq_mass_cpu(&pl->sh, &kq, query, pl->keys, pl->o.q_tokens, pl->o.q_heads,
				       pl->scores);
		if (rc < 0)
			ckv_lerr(pl->l, rc, "pipeline: key-copy scores of layer %u: out of memory",
				 layer);
	}
	ckv_keyq_free(&kq);
	return rc < 0 ? rc : 0;
}

/* A layer's top chunks at budget by the pipeline's score (digest or key-copy) into out. */
static int select_scored(ckv_pipeline *pl, uint32_t layer, const float *query, double budget,
			 uint32_t *out, uint32_t *nout)
{
	int rc = pl->o.score == CKV_SCORE_KEYQ ? keyq_scores(pl, layer, query) :
						 digest_scores(pl, layer, query);

	if (rc < 0)
		return rc;
	rc = ckv_select_topk(pl->scores, pl->m, budget, out);
	if (rc < 0)
		return ckv_lerr(pl->l, rc, "pipeline: selection at layer %u failed", layer);
	*nout = (uint32_t)rc;
	return 0;
}

/* ---- gather ---------------------------------------------------------------- */

/* Copy layer's requests for set S into buffer slot; hand every pin to a release job. */
static int gather_layer(ckv_pipeline *pl, uint32_t layer, const uint32_t *S, uint32_t nS,
			ckv_layer_view *out)
{
	ckv_loader *l = pl->l;
	ckv_backend *be = l->be;
	struct play *ly = &pl->lay[layer];
	uint32_t slot = layer % pl->depth;
	uint8_t *buf = pl->buf[slot];
	uint64_t cb = pl->sh.chunk_bytes, hb = pl->sh.half_bytes;
	uint64_t len[NPARTS] = { cb, hb, hb };
	uint32_t ncp[NPARTS] = { 0 }, nts[NPARTS] = { 0 }, nreq = 0, nrow = 0, nins = 0;
	struct reljob *j;
	int rc = 0;

	for (int x = 0; x < NPARTS; x++)
		nreq += ly->rq[x].n;
	/* every request of the layer is for a chunk of S, every chunk of S is covered */
	for (uint32_t r = 0; r < nS; r++) {
		if (req_find(&ly->rq[CKV_SRC_KV], S[r]))
			nrow++;
		else if (req_find(&ly->rq[CKV_SRC_K], S[r]) && req_find(&ly->rq[CKV_SRC_V], S[r]))
			nrow += 2;
		else
			return ckv_lerr(l, -EIO, "pipeline: layer %u chunk %u was never requested",
					layer, S[r]);
	}
	if (nrow != nreq)
		return ckv_lerr(l, -EIO, "pipeline: layer %u has %u requests for %u chunks", layer,
				nreq, nS);
	j = ckv_reljob_new(pl->p, nreq, nreq + nS);
	if (!j)
		return ckv_lerr(l, -ENOMEM, "pipeline: out of memory");
	for (uint32_t r = 0; r < nS; r++) {
		uint8_t *row = buf + (size_t)r * cb;
		struct preq *q[NPARTS];
		int first, last;

		q[CKV_SRC_KV] = req_find(&ly->rq[CKV_SRC_KV], S[r]);
		q[CKV_SRC_K] = q[CKV_SRC_KV] ? NULL : req_find(&ly->rq[CKV_SRC_K], S[r]);
		q[CKV_SRC_V] = q[CKV_SRC_KV] ? NULL : req_find(&ly->rq[CKV_SRC_V], S[r]);
		first = q[CKV_SRC_KV] ? CKV_SRC_KV : CKV_SRC_K;
		last = q[CKV_SRC_KV] ? CKV_SRC_KV : CKV_SRC_V;
		for (int x = first; x <= last; x++) {
			void *dst = row + (x == CKV_SRC_V ? hb : 0);

			if (q[x]->b) {
				pl->cp[x][ncp[x]].src = q[x]->b->off[q[x]->i];
				pl->cp[x][ncp[x]++].dst = dst;
				ckv_rbatch_take(q[x]->b, q[x]->i);
				j->tok[j->ntok++] = q[x]->b->tok[q[x]->i];
			} else {
				pl->ts[x][nts[x]] = (uint8_t *)q[x]->tptr + (x == CKV_SRC_V ? hb : 0);
				pl->td[x][nts[x]++] = dst;
				j->unpin[j->nunpin++] = q[x]->i;
			}
		}
		pl->vchunks[slot][r] = S[r];
	}
	/* the layer's requests are the job's now */
	for (int x = 0; x < NPARTS; x++)
		ly->rq[x].n = 0;
	/* where the layer's last copy is a gather, the job follows it with no stream operation */
	int then = l->tier ? -1 : NPARTS;
	for (int x = 0; x < NPARTS && then >= 0; x++)
		if (nts[x])
			then = -1;
		else if (ncp[x])
			then = x;
	for (int x = 0; x < NPARTS && rc == 0 && j; x++) {
		if (ncp[x] && x == then) {
			rc = ckv_reljob_gather(j, pl->cp[x], ncp[x], len[x], pl->o.stream);
			if (rc == 0)
				j = NULL; /* the backend's now; nothing follows */
			continue;
		}
		if (ncp[x])
			rc = be->ops->gather(be, pl->cp[x], ncp[x], len[x], pl->o.stream);
		if (rc == 0)
			rc = ckv_copy_dev(l, pl->ts[x], pl->td[x], nts[x], len[x], pl->o.stream);
	}
	if (rc < 0) {
		ckv_reljob_run_synced(j, pl->o.stream);
		return ckv_lerr(l, rc, "pipeline: layer %u: the %s backend's copy failed: %s", layer,
				be->ops->name, strerror(-rc));
	}
	if (j && l->tier) {
		for (uint32_t r = 0; r < nS; r++) {
			ckv_tkey k = ckv_prefix_chunk_key(pl->p, layer, S[r]);
			void *tp;
			uint32_t id = ckv_tier_reserve(l->tier, &k, cb, &tp);

			if (id == CKV_TIER_NONE)
				continue;
			pl->ts[NPARTS][nins] = buf + (size_t)r * cb;
			pl->td[NPARTS][nins++] = tp;
			j->fill[j->nfill++] = id;
		}
		if (nins && ckv_copy_dev(l, pl->ts[NPARTS], pl->td[NPARTS], nins, cb, pl->o.stream) < 0) {
			for (uint32_t i = 0; i < j->nfill; i++)
				ckv_tier_abort(l->tier, j->fill[i]);
			j->nfill = 0;
		}
	}
	if (j)
		ckv_reljob_submit(j, pl->o.stream);
	out->layer = layer;
	out->nchunks = nS;
	out->chunks = pl->vchunks[slot];
	out->kv = buf;
	pl->st.chunks_used += nS;
	pl->st.bytes_needed += (uint64_t)nS * cb;
	return 0;
}

/* ---- issue plans ------------------------------------------------------------- */

/* FULL and PERIOD: reads of a window layer j not issued yet. */
static int plan_issue(ckv_pipeline *pl, uint32_t j)
{
	uint32_t p = pl->o.period;

	if (pl->o.mode == CKV_MODE_FULL)
		return req_issue(pl, j, CKV_SRC_KV, pl->all, pl->m, false);
	if (pl->o.period_keys && j % p == 0)
		return 0; /* its K halves are all read at its identification */
	return req_issue(pl, j, CKV_SRC_KV, pl->cur, pl->ncur, j / p != pl->cur_period);
}

/* ---- open / layer / close ------------------------------------------------------ */

void ckv_pipeline_close(ckv_pipeline *pl)
{
	ckv_loader *l;

	if (!pl)
		return;
	l = pl->l;
	/* gathers into our buffers may still be queued */
	l->be->ops->sync(l->be, pl->o.stream);
	for (uint32_t layer = 0; pl->lay && layer < pl->L; layer++)
		for (int x = 0; x < NPARTS; x++) {
			struct preqs *q = &pl->lay[layer].rq[x];

			for (uint32_t i = 0; i < q->n; i++)
				if (!q->v[i].b)
					ckv_tier_unpin(l->tier, q->v[i].i);
			free(q->v);
		}
	ckv_rbatch_free_all(pl->batches);
	for (uint32_t s = 0; pl->buf && s < pl->depth; s++)
		if (pl->buf[s])
			l->be->ops->free(l->be, pl->buf[s]);
	if (pl->kq_mem)
		l->be->ops->free(l->be, pl->kq_mem);
	for (uint32_t s = 0; pl->vchunks && s < pl->depth; s++)
		free(pl->vchunks[s]);
	for (int x = 0; x <= NPARTS; x++) {
		if (x < NPARTS)
			free(pl->cp[x]);
		free(pl->ts[x]);
		free(pl->td[x]);
	}
	free(pl->buf);
	free(pl->vchunks);
	free(pl->lay);
	free(pl->all);
	free(pl->cur);
	free(pl->fset);
	free(pl->spec);
	free(pl->budgets);
	free(pl->cand);
	free(pl->miss);
	free(pl->rmiss);
	free(pl->radd);
	free(pl->scores);
	free(pl->rdisp);
	free(pl->rgone);
	free(pl->wcand);
	free(pl->widx);
	free(pl->wpos);
	free(pl->wdone);
	free(pl->dig_counted);
	free(pl->khost);
	free(pl);
}

int ckv_pipeline_open(ckv_prefix *p, const ckv_pipeline_opts *o, ckv_pipeline **out)
{
	ckv_pipeline *pl;
	ckv_loader *l;
	ckv_backend *be;
	uint64_t need, bufbytes;
	bool halves;
	int rc = 0;

	if (!p || !o || !out)
		return -EINVAL;
	l = p->l;
	be = l->be;
	if (o->mode != CKV_MODE_FULL && o->mode != CKV_MODE_PERIOD && o->mode != CKV_MODE_LAYER &&
	    o->mode != CKV_MODE_RERANK)
		return ckv_lerr(l, -EINVAL, "pipeline: mode %d: expected full, period, layer or rerank",
				(int)o->mode);
	if (o->mode != CKV_MODE_FULL && !(o->budget > 0 && o->budget <= 1))
		return ckv_lerr(l, -EINVAL, "pipeline: budget %g: expected a fraction in (0, 1]", o->budget);
	if (o->mode != CKV_MODE_LAYER && (o->budgets || o->floor != 0 || o->score != CKV_SCORE_DIGEST))
		return ckv_lerr(l, -EINVAL,
				"pipeline: per-layer budgets, floor and score are options of layer mode, not %s",
				ckv_mode_name(o->mode));
	if (o->score != CKV_SCORE_DIGEST && o->score != CKV_SCORE_KEYQ)
		return ckv_lerr(l, -EINVAL, "pipeline: score %d: expected digest or keyq", (int)o->score);
	if (!(o->floor >= 0 && o->floor < 1))
		return ckv_lerr(l, -EINVAL, "pipeline: floor %g: expected a fraction in [0, 1)", o->floor);
	for (uint32_t j = 0; o->budgets && j < p->shape.layers; j++)
		if (!(o->budgets[j] > 0 && o->budgets[j] <= 1))
			return ckv_lerr(l, -EINVAL, "pipeline: budget of layer %u, %g: expected a fraction in (0, 1]",
					j, o->budgets[j]);
	if (o->tokens > p->shape.tokens)
		return ckv_lerr(l, -EINVAL, "pipeline: tokens %u: the prefix has %u", o->tokens,
				p->shape.tokens);
	if (o->mode != CKV_MODE_FULL &&
	    (o->q_tokens == 0 || o->q_heads == 0 || o->q_heads % p->shape.kv_heads))
		return ckv_lerr(l, -EINVAL,
				"pipeline: q_tokens %u, q_heads %u: a %s pipeline needs queries; q_heads must be a multiple of the %u kv heads",
				o->q_tokens, o->q_heads, ckv_mode_name(o->mode), p->shape.kv_heads);
	pl = calloc(1, sizeof(*pl));
	if (!pl)
		return ckv_lerr(l, -ENOMEM, "pipeline: out of memory");
	pl->t_open = ckv_now();
	pl->p = p;
	pl->l = l;
	pl->o = *o;
	pl->sh = p->shape;
	if (o->tokens) { /* the part of the prefix this request uses: its shape from here on */
		pl->sh.tokens = o->tokens;
		pl->sh.chunks = (o->tokens + pl->sh.chunk_tokens - 1) / pl->sh.chunk_tokens;
	}
	pl->L = p->shape.layers;
	pl->m = pl->sh.chunks;
	if (!pl->o.period)
		pl->o.period = 8;
	if (!pl->o.subperiod)
		pl->o.subperiod = 4;
	if (!pl->o.rerank)
		pl->o.rerank = 2;
	pl->depth = pl->o.depth ? pl->o.depth : 2;
	pl->o.depth = pl->depth;
	if (pl->o.mode != CKV_MODE_PERIOD)
		pl->o.period_keys = false;
	halves = pl->o.mode == CKV_MODE_RERANK || pl->o.period_keys;
	if (halves && pl->sh.half_bytes % 16) {
		rc = ckv_lerr(l, -ENOTSUP, "pipeline: %s needs K/V halves; %llu bytes is not a multiple of 16",
			      pl->o.mode == CKV_MODE_RERANK ? "rerank" : "period_keys",
			      (unsigned long long)pl->sh.half_bytes);
		goto out_close;
	}
	if (pl->o.no_prefetch)
		pl->ahead = 0;
	else if (pl->o.mode == CKV_MODE_FULL || pl->o.mode == CKV_MODE_PERIOD)
		pl->ahead = pl->o.subperiod;
	else
		pl->ahead = 1;
	pl->budgets = malloc(sizeof(*pl->budgets) * pl->L);
	if (!pl->budgets) {
		rc = ckv_lerr(l, -ENOMEM, "pipeline: out of memory");
		goto out_close;
	}
	for (uint32_t j = 0; j < pl->L; j++)
		pl->budgets[j] = o->budgets ? o->budgets[j] : o->budget;
	pl->o.budgets = NULL; /* the caller's array is not kept */
	pl->rows = pl->o.mode == CKV_MODE_FULL ? pl->m : ckv_select_count(pl->m, pl->o.budget);
	for (uint32_t j = 0; pl->o.mode == CKV_MODE_LAYER && j < pl->L; j++) {
		uint32_t r = ckv_select_count(pl->m, pl->budgets[j]);

		pl->rows = j == 0 || r > pl->rows ? r : pl->rows;
	}
	pl->kc = pl->o.mode == CKV_MODE_RERANK ?
			 ckv_select_count(pl->m, fmin(1.0, pl->o.budget * pl->o.rerank)) : 0;

	/* pins in the arena at once: the run-ahead window's sets (and the candidates' K) */
	need = (uint64_t)(pl->ahead < pl->L ? pl->ahead + 1 : pl->L) *
	       (pl->o.mode == CKV_MODE_RERANK ? pl->kc * pl->sh.half_bytes + pl->rows * pl->sh.half_bytes :
		pl->o.period_keys ? pl->m * pl->sh.half_bytes + pl->rows * pl->sh.chunk_bytes :
				    pl->rows * pl->sh.chunk_bytes);
	if (need > l->src->arena_size) {
		rc = ckv_lerr(l, -ENOSPC,
			      "pipeline: the arena (%llu MiB) cannot hold the %llu MiB of chunks the run-ahead pins; raise arena_bytes or lower subperiod/budget",
			      (unsigned long long)(l->src->arena_size >> 20),
			      (unsigned long long)((need + (1 << 20) - 1) >> 20));
		goto out_close;
	}

	pl->lay = calloc(pl->L, sizeof(*pl->lay));
	pl->all = malloc(sizeof(*pl->all) * pl->m);
	pl->cur = malloc(sizeof(*pl->cur) * pl->m);
	pl->fset = malloc(sizeof(*pl->fset) * pl->m);
	pl->spec = malloc(sizeof(*pl->spec) * pl->m);
	pl->cand = malloc(sizeof(*pl->cand) * pl->m);
	pl->miss = malloc(sizeof(*pl->miss) * pl->m);
	pl->rmiss = malloc(sizeof(*pl->rmiss) * pl->m);
	pl->radd = malloc(sizeof(*pl->radd) * pl->m);
	pl->scores = malloc(sizeof(*pl->scores) * pl->m);
	pl->rdisp = malloc(pl->m);
	pl->rgone = malloc(pl->m);
	pl->wcand = malloc(sizeof(*pl->wcand) * pl->m);
	pl->widx = malloc(sizeof(*pl->widx) * pl->m);
	pl->wpos = malloc(sizeof(*pl->wpos) * pl->m);
	pl->wdone = malloc(pl->m);
	pl->dig_counted = calloc(pl->L, 1);
	pl->khost = halves ? malloc(pl->sh.half_bytes) : NULL;
	pl->buf = calloc(pl->depth, sizeof(*pl->buf));
	pl->vchunks = calloc(pl->depth, sizeof(*pl->vchunks));
	if (!pl->lay || !pl->all || !pl->cur || !pl->fset || !pl->spec || !pl->cand || !pl->miss || !pl->rmiss ||
	    !pl->radd || !pl->scores || !pl->rdisp || !pl->rgone || !pl->wcand || !pl->widx ||
	    !pl->wpos || !pl->wdone || !pl->dig_counted || (halves && !pl->khost) || !pl->buf ||
	    !pl->vchunks) {
		rc = ckv_lerr(l, -ENOMEM, "pipeline: out of memory");
		goto out_close;
	}
	for (int x = 0; x <= NPARTS; x++) {
		if (x < NPARTS && !(pl->cp[x] = malloc(sizeof(*pl->cp[x]) * pl->rows)))
			rc = -ENOMEM;
		if (!(pl->ts[x] = malloc(sizeof(*pl->ts[x]) * pl->rows)) ||
		    !(pl->td[x] = malloc(sizeof(*pl->td[x]) * pl->rows)))
			rc = -ENOMEM;
	}
	if (rc < 0) {
		ckv_lerr(l, rc, "pipeline: out of memory");
		goto out_close;
	}
	for (uint32_t j = 0; j < pl->m; j++)
		pl->all[j] = j;
	bufbytes = (uint64_t)pl->rows * pl->sh.chunk_bytes;
	for (uint32_t s = 0; s < pl->depth; s++) {
		pl->vchunks[s] = malloc(sizeof(**pl->vchunks) * pl->rows);
		if (!pl->vchunks[s]) {
			rc = ckv_lerr(l, -ENOMEM, "pipeline: out of memory");
			goto out_close;
		}
		rc = be->ops->alloc(be, bufbytes, &pl->buf[s]);
		if (rc < 0) {
			ckv_lerr(l, rc, "pipeline: cannot allocate a %llu-byte layer buffer in %s memory",
				 (unsigned long long)bufbytes, be->ops->name);
			goto out_close;
		}
		/* halves leave the padding of assembled chunks untouched: zero it once */
		if (halves && pl->sh.chunk_bytes > 2 * pl->sh.half_bytes) {
			void *z = calloc(1, bufbytes);

			rc = z ? be->ops->from_host(be, pl->buf[s], z, bufbytes) : -ENOMEM;
			free(z);
			if (rc < 0) {
				ckv_lerr(l, rc, "pipeline: cannot clear a layer buffer");
				goto out_close;
			}
		}
	}
	/* FULL needs no query: its first layers' reads start now */
	if (pl->o.mode == CKV_MODE_FULL)
		for (uint32_t j = 0; j <= pl->ahead && j < pl->L && rc == 0; j++)
			rc = plan_issue(pl, j);
	if (rc < 0)
		goto out_close;
	/* the first identifications' digests do not wait for a query */
	pl->dig_ahead = pl->o.mode != CKV_MODE_FULL && !pl->o.period_keys &&
			pl->o.score == CKV_SCORE_DIGEST;
	digests_ahead(pl, 0);
	for (uint32_t j = 1; j < DIG_AHEAD && pl->o.mode != CKV_MODE_PERIOD; j++)
		digests_ahead(pl, j);
	*out = pl;
	return 0;

out_close:
	ckv_pipeline_close(pl);
	return rc;
}

/* LAYER: a floor layer's set into pl->fset: chunk 0 and the most recent chunks. */
static void floor_set(ckv_pipeline *pl, uint32_t layer)
{
	uint32_t k = ckv_select_count(pl->m, pl->budgets[layer]), n = 0;

	pl->fset[n++] = 0;
	for (uint32_t j = pl->m - k + 1; j < pl->m; j++)
		if (j > 0)
			pl->fset[n++] = j;
	pl->nfset = n;
}

/* 3. Reads of the layers ahead of layer, as the mode says (see ckvgpu.h). */
static int issue_ahead(ckv_pipeline *pl, uint32_t layer, bool ident)
{
	uint32_t p = pl->o.period;
	uint32_t last = pl->ahead < pl->L - 1 - layer ? layer + pl->ahead : pl->L - 1;
	int rc = 0;

	switch (pl->o.mode) {
	case CKV_MODE_FULL:
	case CKV_MODE_PERIOD:
		for (uint32_t j = layer + 1; j <= last && rc == 0; j++) {
			if (!pl->lay[j].issued)
				rc = plan_issue(pl, j);
			else if (ident && pl->o.mode == CKV_MODE_PERIOD &&
				 !(pl->o.period_keys && j % p == 0))
				/* speculated with the last period's set: only the difference */
				rc = reconcile(pl, j, CKV_SRC_KV, pl->cur, pl->ncur, j / p == pl->cur_period);
		}
		break;
	case CKV_MODE_LAYER:
		if (last <= layer)
			break;
		if (is_floor(pl, layer + 1)) {
			/* known without identification: final reads */
			floor_set(pl, layer + 1);
			rc = req_issue(pl, layer + 1, CKV_SRC_KV, pl->fset, pl->nfset, false);
		} else if (pl->scored && pl->budgets[layer + 1] == pl->cur_budget) {
			rc = req_issue(pl, layer + 1, CKV_SRC_KV, pl->cur, pl->ncur, true);
		} else if (pl->scored) {
			/* the last identification's ranking at the next layer's budget */
			int k = ckv_select_topk(pl->scores, pl->m, pl->budgets[layer + 1], pl->spec);

			rc = k < 0 ? ckv_lerr(pl->l, k, "pipeline: speculation for layer %u failed", layer + 1) :
				     req_issue(pl, layer + 1, CKV_SRC_KV, pl->spec, (uint32_t)k, true);
		}
		break;
	case CKV_MODE_RERANK:
		if (last > layer) {
			rc = req_issue(pl, layer + 1, CKV_SRC_K, pl->cand, pl->ncand, true);
			if (rc == 0)
				rc = req_issue(pl, layer + 1, CKV_SRC_V, pl->cur, pl->ncur, true);
		}
		break;
	}
	return rc;
}

int ckv_pipeline_layer(ckv_pipeline *pl, uint32_t layer, const float *query,
		       ckv_layer_view *out)
{
	return ckv_pipeline_layer_qk(pl, layer, query, NULL, out);
}

int ckv_pipeline_layer_qk(ckv_pipeline *pl, uint32_t layer, const float *query,
			  const float *keys, ckv_layer_view *out)
{
	ckv_loader *l;
	struct play *ly;
	const uint32_t *S;
	uint32_t nS, p;
	bool ident = false, early;
	int rc = 0;

	if (!pl || !out)
		return -EINVAL;
	l = pl->l;
	p = pl->o.period;
	if (pl->failed)
		return ckv_lerr(l, pl->failed, "pipeline: failed at layer %u (%s); close it",
				pl->failed_layer, strerror(-pl->failed));
	if (layer >= pl->L)
		return ckv_lerr(l, -EINVAL, "pipeline: layer %u: the prefix has %u layers", layer, pl->L);
	if (layer != pl->next)
		return ckv_lerr(l, -EINVAL, "pipeline: layer %u: expected layer %u (layers go in order, once)",
				layer, pl->next);
	if (!query && ((pl->o.mode == CKV_MODE_LAYER && !is_floor(pl, layer)) ||
		       pl->o.mode == CKV_MODE_RERANK ||
		       (pl->o.mode == CKV_MODE_PERIOD && layer % p == 0)))
		return ckv_lerr(l, -EINVAL, "pipeline: layer %u: a %s pipeline needs this layer's query",
				layer, ckv_mode_name(pl->o.mode));
	ly = &pl->lay[layer];
	pl->keys = keys;
	pl->batches = ckv_rbatch_sweep(pl->batches);

	/* 1. identify and bring the layer's own requests in line */
	switch (pl->o.mode) {
	case CKV_MODE_FULL:
		if (!ly->issued)
			rc = plan_issue(pl, layer);
		S = pl->all;
		nS = pl->m;
		break;
	case CKV_MODE_PERIOD:
		if (layer % p == 0) {
			ident = true;
			pl->st.identifications++;
			pl->cur_period = layer / p;
			if (pl->o.period_keys) {
				rc = identify_from_keys(pl, layer, query, pl->all, pl->m);
				if (rc == 0)
					rc = reconcile(pl, layer, CKV_SRC_V, pl->cur, pl->ncur, true);
			} else {
				rc = select_scored(pl, layer, query, pl->o.budget, pl->cur, &pl->ncur);
				if (rc == 0 && ly->issued)
					rc = reconcile(pl, layer, CKV_SRC_KV, pl->cur, pl->ncur, true);
			}
		}
		if (rc == 0 && !ly->issued)
			rc = plan_issue(pl, layer);
		S = pl->cur;
		nS = pl->ncur;
		break;
	case CKV_MODE_LAYER:
		if (is_floor(pl, layer)) {
			floor_set(pl, layer);
			S = pl->fset;
			nS = pl->nfset;
		} else {
			pl->st.identifications++;
			rc = select_scored(pl, layer, query, pl->budgets[layer], pl->cur, &pl->ncur);
			pl->scored = rc == 0;
			pl->cur_budget = pl->budgets[layer];
			S = pl->cur;
			nS = pl->ncur;
		}
		if (rc == 0)
			rc = ly->issued ? reconcile(pl, layer, CKV_SRC_KV, S, nS, true) :
					  req_issue(pl, layer, CKV_SRC_KV, S, nS, false);
		break;
	case CKV_MODE_RERANK:
	default:
		pl->st.identifications++;
		rc = select_scored(pl, layer, query, fmin(1.0, pl->o.budget * pl->o.rerank), pl->cand,
				   &pl->ncand);
		if (rc == 0)
			rc = identify_from_keys(pl, layer, query, pl->cand, pl->ncand);
		if (rc == 0)
			rc = ly->rq[CKV_SRC_V].n ? reconcile(pl, layer, CKV_SRC_V, pl->cur, pl->ncur, true) :
						   req_issue(pl, layer, CKV_SRC_V, pl->cur, pl->ncur, false);
		S = pl->cur;
		nS = pl->ncur;
		break;
	}

	/*
	 * 2. reads of the layers ahead (3) and the layer's wait and gather: at a
	 * period's identification the window's reads go first, so that the
	 * disk has the period's reads queued behind the layer's own while it
	 * waits (the engine serves them in the order they came); elsewhere
	 * after the gather, which keeps the window's pins as they were.
	 */
	early = pl->o.mode == CKV_MODE_PERIOD && ident;
	if (rc == 0 && early)
		rc = issue_ahead(pl, layer, ident);
	if (rc == 0)
		rc = wait_layer(pl, layer, -1);
	if (rc == 0)
		rc = gather_layer(pl, layer, S, nS, out);
	if (rc == 0 && !early)
		rc = issue_ahead(pl, layer, ident);
	if (rc < 0)
		return pfail(pl, layer, rc);
	/* 4. digests of the identifications ahead */
	if (pl->o.mode == CKV_MODE_PERIOD && ident)
		digests_ahead(pl, layer + p);
	else if (pl->o.mode == CKV_MODE_LAYER || pl->o.mode == CKV_MODE_RERANK)
		digests_ahead(pl, layer + DIG_AHEAD);
	pl->next++;
	if (pl->next == pl->L)
		pl->st.total_s = ckv_now() - pl->t_open;
	return 0;
}

void ckv_pipeline_get_stats(const ckv_pipeline *pl, ckv_pipeline_stats *st)
{
	if (!pl) {
		memset(st, 0, sizeof(*st));
		return;
	}
	*st = pl->st;
	st->bytes_k = pl->rs.bytes_k;
	st->bytes_v = pl->rs.bytes_v;
	st->hits_arena = pl->rs.hits_arena;
	st->misses = pl->rs.misses;
	st->chunks_read = pl->rs.hits_arena + pl->rs.misses;
	if (pl->next < pl->L)
		st->total_s = ckv_now() - pl->t_open;
}

void ckv_pipeline_get_xstats(const ckv_pipeline *pl, struct ckv_pipeline_xstats *x)
{
	if (!pl) {
		memset(x, 0, sizeof(*x));
		return;
	}
	*x = pl->xst;
}
