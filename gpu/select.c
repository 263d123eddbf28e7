/*
 * select.c — chunk selection: top-k with the attention sink and the most
 * recent chunk always kept, digest scores (CPU reference and through the
 * backend), exact scores from keys.
 *
 * Digest scores are linear in the query, so the CPU reference first sums
 * the query over tokens and over the query heads of each kv head (GQA
 * group), then takes one dot product per chunk and kv head:
 *   score[j] = sum_t sum_h q[t][h] . dig[j][h / g] / sqrt(D)
 *            = sum_kvh (sum_t sum_{h in group kvh} q[t][h]) . dig[j][kvh] / sqrt(D)
 * — m * kv_heads * D multiply-adds however long the suffix is. Sums are
 * accumulated in double.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader_int.h"

uint32_t ckv_select_count(uint32_t m, double budget)
{
	double x = budget * (double)m;
	uint32_t k, forced = m >= 2 ? 2 : 1;

	/* ceil, forgiving the rounding of budget * m (0.1 * 320 is 32.000000000000004) */
	k = (uint32_t)ceil(x - 1e-9 * (x > 1 ? x : 1));
	if (k < forced)
		k = forced;
	return k > m ? m : k;
}

static float score_of(const float *scores, uint32_t j)
{
	float s = scores[j];

	return isnan(s) ? -INFINITY : s;
}

/* a ranks below b: lower score, or equal score and higher chunk id */
static bool ranks_below(const float *scores, uint32_t a, uint32_t b)
{
	float sa = score_of(scores, a), sb = score_of(scores, b);

	return sa < sb || (sa == sb && a > b);
}

/* Min-heap of chunk ids by rank: the root is the weakest kept chunk. */
static void sift_down(const float *scores, uint32_t *h, uint32_t n, uint32_t i)
{
	for (;;) {
		uint32_t l = 2 * i + 1, r = l + 1, w = i;

		if (l < n && ranks_below(scores, h[l], h[w]))
			w = l;
		if (r < n && ranks_below(scores, h[r], h[w]))
			w = r;
		if (w == i)
			return;
		uint32_t t = h[i];
		h[i] = h[w];
		h[w] = t;
		i = w;
	}
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

int ckv_select_topk(const float *scores, uint32_t m, double budget, uint32_t *out)
{
	uint32_t k, nf, want, n = 0;

	if (!scores || !out || m == 0 || !(budget > 0 && budget <= 1))
		return -EINVAL;
	k = ckv_select_count(m, budget);
	if (k > INT32_MAX)
		return -EINVAL;
	/* chunk 0 and chunk m-1 always; the rest by a heap over chunks 1 .. m-2 */
	nf = m >= 2 ? 2 : 1;
	want = k - nf;
	if (want > 0) {
		for (uint32_t j = 1; j + 1 < m; j++) {
			if (n < want) {
				out[n++] = j;
				if (n == want)
					for (uint32_t i = n / 2; i-- > 0;)
						sift_down(scores, out, n, i);
			} else if (ranks_below(scores, out[0], j)) {
				out[0] = j;
				sift_down(scores, out, n, 0);
			}
		}
	}
	out[n++] = 0;
	if (m >= 2)
		out[n++] = m - 1;
	qsort(out, n, sizeof(*out), cmp_u32);
	return (int)n;
}

#define DS_LANES 8

void ckv_digest_scores_cpu(const float *dig, uint32_t m, uint32_t kv_heads, uint32_t head_dim,
			   const float *query, uint32_t q_tokens, uint32_t q_heads, float *scores)
{
	uint32_t group = q_heads / kv_heads;
	size_t per = (size_t)kv_heads * head_dim;
	double *qs = calloc(per, sizeof(*qs));
	double inv = 1.0 / sqrt((double)head_dim);

	if (!qs) { /* the direct form needs no memory */
		for (uint32_t j = 0; j < m; j++) {
			double acc = 0;

			for (uint32_t t = 0; t < q_tokens; t++)
				for (uint32_t h = 0; h < q_heads; h++) {
					const float *q = query + ((size_t)t * q_heads + h) * head_dim;
					const float *d = dig + (size_t)j * per + (size_t)(h / group) * head_dim;

					for (uint32_t x = 0; x < head_dim; x++)
						acc += (double)q[x] * d[x];
				}
			scores[j] = (float)(acc * inv);
		}
		return;
	}
	for (uint32_t t = 0; t < q_tokens; t++)
		for (uint32_t h = 0; h < q_heads; h++) {
			const float *q = query + ((size_t)t * q_heads + h) * head_dim;
			double *s = qs + (size_t)(h / group) * head_dim;

			for (uint32_t x = 0; x < head_dim; x++)
				s[x] += q[x];
		}
	/*
	 * DS_LANES chunks at a time, each summed in its own accumulator in the
	 * order of x as one chunk alone would be: the same doubles, the same
	 * scores bit for bit, but independent additions the CPU can overlap
	 * (one chain is bound by the latency of an add).
	 */
	uint32_t j = 0;

	for (; j + DS_LANES <= m; j += DS_LANES) {
		const float *d = dig + (size_t)j * per;
		double acc[DS_LANES] = { 0 };

		for (size_t x = 0; x < per; x++) {
			const double qx = qs[x];

#pragma GCC unroll 8
			for (uint32_t k = 0; k < DS_LANES; k++)
				acc[k] += qx * d[(size_t)k * per + x];
		}
		for (uint32_t k = 0; k < DS_LANES; k++)
			scores[j + k] = (float)(acc[k] * inv);
	}
	for (; j < m; j++) {
		const float *d = dig + (size_t)j * per;
		double acc = 0;

		for (size_t x = 0; x < per; x++)
			acc += qs[x] * d[x];
		scores[j] = (float)(acc * inv);
	}
	free(qs);
}

static int check_query(ckv_prefix *p, uint32_t layer, const void *query, uint32_t q_tokens,
		       uint32_t q_heads, const void *scores)
{
	const ckv_shape *sh = &p->shape;

	if (!query || !scores)
		return ckv_lerr(p->l, -EINVAL, "scores: query and scores are required");
	if (layer >= sh->layers)
		return ckv_lerr(p->l, -EINVAL, "layer %u: the prefix has %u layers", layer, sh->layers);
	if (q_tokens == 0 || q_heads == 0 || q_heads % sh->kv_heads)
		return ckv_lerr(p->l, -EINVAL,
				"query: %u tokens x %u heads; expected at least one token and a multiple of the %u kv heads",
				q_tokens, q_heads, sh->kv_heads);
	return 0;
}

int ckv_digest_scores(ckv_prefix *p, uint32_t layer, const float *query, uint32_t q_tokens,
		      uint32_t q_heads, float *scores)
{
	const float *dig;
	double waited;
	int how, rc;

	if (!p)
		return -EINVAL;
	rc = check_query(p, layer, query, q_tokens, q_heads, scores);
	if (rc == 0)
		rc = ckv_prefix_digests_get(p, layer, &dig, &how, &waited);
	if (rc == 0) {
		ckv_digest_scores_cpu(dig, p->shape.chunks, p->shape.kv_heads, p->shape.head_dim,
				      query, q_tokens, q_heads, scores);
		ckv_prefix_digests_put(p, layer);
	}
	return rc;
}

int ckv_digest_scores_device(ckv_prefix *p, uint32_t layer, const float *query,
			     uint32_t q_tokens, uint32_t q_heads, float *scores, void *stream)
{
	ckv_loader *l;
	ckv_backend *be;
	const float *dig;
	uint64_t bytes;
	double waited;
	int how, rc;

	if (!p)
		return -EINVAL;
	l = p->l;
	be = l->be;
	rc = check_query(p, layer, query, q_tokens, q_heads, scores);
	if (rc < 0)
		return rc;
	if (!be->ops->digest_scores)
		return ckv_lerr(l, -ENOTSUP, "the %s backend has no digest scoring", be->ops->name);
	rc = ckv_prefix_digests_get(p, layer, &dig, &how, &waited);
	if (rc < 0)
		return rc;
	bytes = (uint64_t)p->shape.chunks * p->shape.kv_heads * p->shape.head_dim * sizeof(float);
	rc = ckv_backend_reserve(l, &p->dig_dev, &p->dig_dev_bytes, bytes, "digest scores");
	if (rc < 0) {
		ckv_prefix_digests_put(p, layer);
		return rc;
	}
	/* the previous call synchronized its stream: the buffer is free */
	rc = be->ops->from_host(be, p->dig_dev, dig, bytes);
	ckv_prefix_digests_put(p, layer);
	if (rc == 0)
		rc = be->ops->digest_scores(be, query, q_tokens, q_heads, p->dig_dev, p->shape.chunks,
					    p->shape.kv_heads, p->shape.head_dim, scores, stream);
	if (rc == 0)
		rc = be->ops->sync(be, stream);
	if (rc < 0)
		return ckv_lerr(l, rc, "layer %u: digest scores on the %s backend failed", layer,
				be->ops->name);
	return 0;
}

/* ---- exact scores from keys ------------------------------------------------ */

/* Slots scored together: a fixed trip count the compiler vectorizes at -O2. */
#define KS_BLOCK 16

/* n elements of dtype dt at src to fp32 (bf16 and fp32 inline, the rest by ckv_dtype_to_f32). */
static void to_f32(ckv_dtype dt, unsigned es, const uint8_t *src, uint32_t n, float *out)
{
	switch (dt) {
	case CKV_DTYPE_BF16:
		for (uint32_t i = 0; i < n; i++) {
			uint32_t u = (uint32_t)(src[2 * i] | src[2 * i + 1] << 8) << 16;

			memcpy(&out[i], &u, 4);
		}
		break;
	case CKV_DTYPE_FP32:
		memcpy(out, src, (size_t)n * 4);
		break;
	default:
		for (uint32_t i = 0; i < n; i++)
			out[i] = ckv_dtype_to_f32(dt, src + (size_t)i * es);
		break;
	}
}

int ckv_key_scores(const ckv_shape *sh, const void *keys, uint64_t stride,
		   const uint32_t *chunks, uint32_t n, const float *query, uint32_t q_tokens,
		   uint32_t q_heads, float *scores)
{
	ckv_dtype dt;
	unsigned es;
	uint32_t D, c, cpad, group;
	float *kt = NULL, *row = NULL;
	double inv;

	if (!sh || (n && (!keys || !chunks || !query || !scores)))
		return -EINVAL;
	dt = ckv_dtype_parse(sh->dtype);
	es = ckv_dtype_size(dt);
	D = sh->head_dim;
	c = sh->chunk_tokens;
	if (!es || !D || !c || !sh->kv_heads || q_tokens == 0 || q_heads == 0 ||
	    q_heads % sh->kv_heads || stride < sh->half_bytes ||
	    sh->half_bytes != (uint64_t)sh->kv_heads * c * D * es)
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++)
		if (chunks[i] >= sh->chunks)
			return -EINVAL;
	group = q_heads / sh->kv_heads;
	inv = 1.0 / sqrt((double)D);
	cpad = (c + KS_BLOCK - 1) / KS_BLOCK * KS_BLOCK;
	kt = calloc((size_t)D * cpad, sizeof(*kt));
	row = malloc(sizeof(*row) * D);
	if (!kt || !row) {
		free(kt);
		free(row);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < n; i++) {
		const uint8_t *chunk = (const uint8_t *)keys + (size_t)i * stride;
		uint32_t valid = ckv_chunk_valid(sh, chunks[i]);
		double total = 0;

		for (uint32_t kvh = 0; kvh < sh->kv_heads; kvh++) {
			const uint8_t *kh = chunk + (size_t)kvh * c * D * es;

			/* keys of this head, transposed and zero-padded: kt[d][s], fp32 */
			for (uint32_t s = 0; s < cpad; s++) {
				if (s < valid)
					to_f32(dt, es, kh + (size_t)s * D * es, D, row);
				for (uint32_t d = 0; d < D; d++)
					kt[(size_t)d * cpad + s] = s < valid ? row[d] : 0;
			}
			for (uint32_t t = 0; t < q_tokens; t++)
				for (uint32_t h = kvh * group; h < (kvh + 1) * group; h++) {
					const float *q = query + ((size_t)t * q_heads + h) * D;
					float best = -INFINITY;

					for (uint32_t s0 = 0; s0 < valid; s0 += KS_BLOCK) {
						float acc[KS_BLOCK] = { 0 };

						for (uint32_t d = 0; d < D; d++) {
							const float qd = q[d], *kr = kt + (size_t)d * cpad + s0;

							/* unrolled: acc stays in vector registers */
#pragma GCC unroll 16
							for (uint32_t s = 0; s < KS_BLOCK; s++)
								acc[s] += qd * kr[s];
						}
						for (uint32_t s = 0; s < KS_BLOCK && s0 + s < valid; s++)
							if (acc[s] > best)
								best = acc[s];
					}
					total += best;
				}
		}
		scores[i] = (float)(total * inv);
	}
	free(kt);
	free(row);
	return 0;
}

/* ---- attention mass over the key copy ------------------------------------------ */

#define KQ_RB 8   /* query rows per block (rows of one kv head) */
#define KQ_SB 256 /* key slots per block (rounded to whole chunks) */

/*
 * Keys of chunks [j0, j1) as the copy gives them back, per head transposed:
 * kt[h][d][slot]. Written along slots (a chunk's c slots of one (h, d) are
 * adjacent), so each chunk touches H * D short runs, not c * H * D pages.
 */
static void keyq_unpack(const ckv_shape *sh, const struct ckv_keyq *kq, uint32_t j0, uint32_t j1,
			float *kt, float *tmp)
{
	ckv_geom g;
	uint32_t H = sh->kv_heads, D = sh->head_dim, c = sh->chunk_tokens;
	size_t slots = (size_t)sh->chunks * c, HD = (size_t)H * D;

	memset(&g, 0, sizeof(g));
	g.kv_heads = H;
	g.head_dim = D;
	g.chunk_tokens = c;
	for (uint32_t x = 0; x < kq->nparts; x++) {
		uint32_t a = kq->first[x] > j0 ? kq->first[x] : j0;
		uint32_t b = kq->first[x + 1] < j1 ? kq->first[x + 1] : j1;

		for (uint32_t j = a; j < b; j++) {
			ckv_keyq_decode(&g, kq->bits, kq->scales + 2 * HD * x, kq->codes + (size_t)j * kq->per,
					tmp);
			for (uint32_t h = 0; h < H; h++)
				for (uint32_t d = 0; d < D; d++) {
					float *o = kt + ((size_t)h * D + d) * slots + (size_t)j * c;
					const float *in = tmp + (size_t)h * c * D + d;

					for (uint32_t t = 0; t < c; t++)
						o[t] = in[(size_t)t * D];
				}
		}
	}
}

/* 8 floats, GCC's vector extension: AVX registers where the clone has them, else two SSE ones. */
typedef float kq_v8 __attribute__((vector_size(32)));


/*
 * lg[r][s] (rows lgs apart) = q_r . k_s for nr rows and the slots
 * [s0, s0 + ns) of one head. Four rows at a time over blocks of 16 slots:
 * the block's 4 x 16 sums stay in registers while d runs, and each key
 * vector loaded serves four rows. Sums run over d in order for every row
 * and slot. Built for x86-64-v3 (AVX2, FMA) too, picked at run time.
 */
__attribute__((target_clones("arch=x86-64-v3", "default"))) static void
keyq_dots(const float *const *q, uint32_t nr, const float *kt, size_t slots, uint32_t D, size_t s0,
	  uint32_t ns, float *lg, size_t lgs)
{
	const float *k0 = kt + s0;
	uint32_t r = 0, nb = ns - ns % 16;

	for (; r + 4 <= nr; r += 4) {
		const float *q0 = q[r], *q1 = q[r + 1], *q2 = q[r + 2], *q3 = q[r + 3];
		float *o = lg + (size_t)r * lgs;

		for (uint32_t b = 0; b < nb; b += 16) {
			kq_v8 a0 = { 0 }, b0 = { 0 }, a1 = { 0 }, b1 = { 0 };
			kq_v8 a2 = { 0 }, b2 = { 0 }, a3 = { 0 }, b3 = { 0 };

			for (uint32_t d = 0; d < D; d++) {
				const float *k = k0 + (size_t)d * slots + b;
				kq_v8 lo, hi;

				memcpy(&lo, k, sizeof(lo)); /* unaligned loads */
				memcpy(&hi, k + 8, sizeof(hi));
				const kq_v8 x0 = (kq_v8){ 0 } + q0[d], x1 = (kq_v8){ 0 } + q1[d];
				const kq_v8 x2 = (kq_v8){ 0 } + q2[d], x3 = (kq_v8){ 0 } + q3[d];


				a0 += x0 * lo;
				b0 += x0 * hi;
				a1 += x1 * lo;
				b1 += x1 * hi;
				a2 += x2 * lo;
				b2 += x2 * hi;
				a3 += x3 * lo;
				b3 += x3 * hi;
			}
			memcpy(o + b, &a0, sizeof(a0));
			memcpy(o + b + 8, &b0, sizeof(b0));
			memcpy(o + lgs + b, &a1, sizeof(a1));
			memcpy(o + lgs + b + 8, &b1, sizeof(b1));
			memcpy(o + 2 * lgs + b, &a2, sizeof(a2));
			memcpy(o + 2 * lgs + b + 8, &b2, sizeof(b2));
			memcpy(o + 3 * lgs + b, &a3, sizeof(a3));
			memcpy(o + 3 * lgs + b + 8, &b3, sizeof(b3));
		}
	}
	/* rows left over, and every row's slots past the last whole block */
	for (uint32_t rr = 0; rr < nr; rr++) {
		float *o = lg + (size_t)rr * lgs;
		uint32_t from = rr < r ? nb : 0;

		for (uint32_t v = from; v < ns; v++)
			o[v] = 0;
		for (uint32_t d = 0; d < D; d++) {
			const float qd = q[rr][d], *k = k0 + (size_t)d * slots;

			for (uint32_t v = from; v < ns; v++)
				o[v] += qd * k[v];
		}
	}
}

/*
 * One scorer thread's share: first the chunks [j0, j1) unpacked into kt,
 * then (after every thread's unpack) the row blocks k = first, first +
 * step, ... of (kv head, rows).
 */
struct kq_work {
	const ckv_shape *sh;
	const struct ckv_keyq *kq;
	uint32_t j0, j1;
	float *tmp;  /* [H][c][D] one decoded chunk */
	const float *kt, *query, *keys;
	uint32_t q_tokens, q_heads, first, step;
	size_t lgs;  /* row stride of lg: a slot block, at least one chunk */
	float *lg, *clse;
	float *suf;  /* [q_tokens] one row's logits on the new tokens' keys */
	double *acc; /* [m], this thread's sums */
};

static void *kq_unpack_worker(void *arg)
{
	struct kq_work *w = arg;

	keyq_unpack(w->sh, w->kq, w->j0, w->j1, (float *)w->kt, w->tmp);
	return NULL;
}

static void *kq_worker(void *arg)
{
	struct kq_work *w = arg;
	const ckv_shape *sh = w->sh;
	uint32_t H = sh->kv_heads, D = sh->head_dim, c = sh->chunk_tokens, m = sh->chunks;
	uint32_t g = w->q_heads / H, rows = w->q_tokens * g, rblocks = (rows + KQ_RB - 1) / KQ_RB;
	uint32_t cpb = KQ_SB / c ? KQ_SB / c : 1; /* chunks per slot block */
	size_t slots = (size_t)m * c;
	const float inv = (float)(1.0 / sqrt((double)D));

	for (uint32_t k = w->first; k < H * rblocks; k += w->step) {
		uint32_t h = k / rblocks, r0 = (k % rblocks) * KQ_RB;
		uint32_t nr = rows - r0 < KQ_RB ? rows - r0 : KQ_RB;
		const float *kth = w->kt + (size_t)h * D * slots;
		const float *q[KQ_RB];
		uint32_t tok[KQ_RB];

		/* row r: token r / g, query head h * g + r % g */
		for (uint32_t r = 0; r < nr; r++) {
			tok[r] = (r0 + r) / g;
			q[r] = w->query + ((size_t)tok[r] * w->q_heads + (size_t)h * g + (r0 + r) % g) * D;
		}
		/* log-sum-exp of each chunk's valid slots, per row */
		for (uint32_t j0 = 0; j0 < m; j0 += cpb) {
			uint32_t nj = m - j0 < cpb ? m - j0 : cpb;

			keyq_dots(q, nr, kth, slots, D, (size_t)j0 * c, nj * c, w->lg, w->lgs);
			for (uint32_t r = 0; r < nr; r++)
				for (uint32_t jj = 0; jj < nj; jj++) {
					uint32_t j = j0 + jj;
					uint64_t lo = (uint64_t)j * c;
					uint32_t valid = lo + c <= sh->tokens ? c :
							 sh->tokens > lo ? (uint32_t)(sh->tokens - lo) : 0;
					const float *x = w->lg + (size_t)r * w->lgs + (size_t)jj * c;
					float mx = -INFINITY, sum = 0;

					for (uint32_t s = 0; s < valid; s++)
						mx = fmaxf(mx, x[s] * inv);
					for (uint32_t s = 0; s < valid; s++)
						sum += expf(x[s] * inv - mx);
					w->clse[(size_t)r * m + j] = valid ? mx + logf(sum) : -INFINITY;
				}
		}
		/* each row's softmax over the chunks and the new tokens up to its own */
		for (uint32_t r = 0; r < nr; r++) {
			const float *cl = w->clse + (size_t)r * m;
			uint32_t nsuf = w->keys ? tok[r] + 1 : 0;
			double mx = -INFINITY, tot = 0, lse;

			for (uint32_t j = 0; j < m; j++)
				mx = fmax(mx, cl[j]);
			for (uint32_t t = 0; t < nsuf; t++) {
				const float *kk = w->keys + ((size_t)t * H + h) * D;
				float dot = 0;

				for (uint32_t d = 0; d < D; d++)
					dot += q[r][d] * kk[d];
				w->suf[t] = dot * inv;
				mx = fmax(mx, w->suf[t]);
			}
			if (mx == -INFINITY)
				continue;
			for (uint32_t j = 0; j < m; j++)
				tot += exp(cl[j] - mx);
			for (uint32_t t = 0; t < nsuf; t++)
				tot += exp(w->suf[t] - mx);
			lse = mx + log(tot);
			for (uint32_t j = 0; j < m; j++)
				w->acc[j] += exp(cl[j] - lse);
		}
	}
	return NULL;
}

#define KQ_MAX_THREADS 16
#define KQ_MACS_PER_THREAD (16u << 20) /* below this much work a thread is not worth starting */

/* fn on every share: w[1..nt) on threads, w[0] here; shares whose thread did not start run here too. */
static void kq_run(struct kq_work *w, pthread_t *th, uint32_t nt, void *(*fn)(void *))
{
	uint32_t started = 0;

	for (uint32_t t = 1; t < nt; t++) {
		if (pthread_create(&th[t], NULL, fn, &w[t]) != 0)
			break;
		started = t;
	}
	for (uint32_t t = started + 1; t < nt; t++)
		fn(&w[t]);
	fn(&w[0]);
	for (uint32_t t = 1; t <= started; t++)
		pthread_join(th[t], NULL);
}

/*
 * Threads: one per 16 M multiply-adds, at most the CPUs online (16); row
 * blocks go to threads round-robin and each thread sums into its own
 * array, added in thread order, so a given thread count gives the same
 * floats every run.
 */
int ckv_keyq_mass_cpu(const ckv_shape *sh, const struct ckv_keyq *kq, const float *query,
		      const float *keys, uint32_t q_tokens, uint32_t q_heads, float *scores)
{
	uint32_t H = sh->kv_heads, D = sh->head_dim, c = sh->chunk_tokens, m = sh->chunks;
	uint32_t rows = q_tokens * (q_heads / H), nblocks = H * ((rows + KQ_RB - 1) / KQ_RB);
	uint32_t cpb = KQ_SB / c ? KQ_SB / c : 1;
	size_t slots = (size_t)m * c, lgs = cpb * c > KQ_SB ? cpb * c : KQ_SB;
	double macs = (double)rows * H * slots * D;
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	uint32_t nt = (uint32_t)(macs / KQ_MACS_PER_THREAD) + 1;
	struct kq_work w[KQ_MAX_THREADS];
	pthread_t th[KQ_MAX_THREADS];
	float *kt = malloc(sizeof(float) * (slots ? slots : 1) * H * D);
	int rc = 0;

	if (nt > (uint32_t)(ncpu > 0 ? ncpu : 1))
		nt = (uint32_t)(ncpu > 0 ? ncpu : 1);
	if (nt > KQ_MAX_THREADS)
		nt = KQ_MAX_THREADS;
	if (nt > nblocks)
		nt = nblocks ? nblocks : 1;
	memset(w, 0, sizeof(w));
	for (uint32_t t = 0; t < nt; t++) {
		w[t] = (struct kq_work){ .sh = sh, .kq = kq, .j0 = (uint32_t)((uint64_t)m * t / nt),
					 .j1 = (uint32_t)((uint64_t)m * (t + 1) / nt), .kt = kt,
					 .query = query, .keys = keys, .q_tokens = q_tokens,
					 .q_heads = q_heads, .first = t, .step = nt, .lgs = lgs };
		w[t].tmp = malloc(sizeof(float) * H * c * D);
		w[t].lg = malloc(sizeof(float) * KQ_RB * lgs);
		w[t].clse = malloc(sizeof(float) * KQ_RB * (m ? m : 1));
		w[t].suf = malloc(sizeof(float) * (q_tokens ? q_tokens : 1));
		w[t].acc = calloc(m ? m : 1, sizeof(double));
		if (!w[t].tmp || !w[t].lg || !w[t].clse || !w[t].suf || !w[t].acc)
			rc = -ENOMEM;
	}
	if (!kt || rc)
		rc = -ENOMEM;
	if (rc == 0) {
		kq_run(w, th, nt, kq_unpack_worker);
		kq_run(w, th, nt, kq_worker);
		for (uint32_t j = 0; j < m; j++) {
			double sum = 0;

			for (uint32_t t = 0; t < nt; t++)
				sum += w[t].acc[j];
			scores[j] = (float)sum;
		}
	}
	for (uint32_t t = 0; t < nt; t++) {
		free(w[t].tmp);
		free(w[t].lg);
		free(w[t].clse);
		free(w[t].suf);
		free(w[t].acc);
	}
	free(kt);
	return rc;
}

int ckv_keyq_mass_dev(ckv_prefix *p, uint32_t layer, const ckv_shape *sh,
		      const struct ckv_keyq *kq, const float *query, const float *keys,
		      uint32_t q_tokens, uint32_t q_heads, float *scores, void *stream)
{
	ckv_backend *be = p->l->be;
	ckv_keyq_dev k;
	uint64_t HD, nsc, o_sc, o_part, bytes;
	uint32_t *part;
	int rc;

	if (!be->ops->keyq_scores)
		return ckv_lerr(p->l, -ENOTSUP, "layer %u: the %s backend has no key-copy scoring",
				layer, be->ops->name);
	if (sh->chunk_tokens > CKV_KEYQ_DEV_MAX_CHUNK)
		return ckv_lerr(p->l, -ENOTSUP,
				"layer %u: the %s backend scores chunks of at most %u tokens; "
				"these have %u (ckv_keyq_scores scores them on the CPU)",
				layer, be->ops->name, CKV_KEYQ_DEV_MAX_CHUNK, sh->chunk_tokens);
	if (kq->nparts == 0 || kq->first[0] != 0 || kq->first[kq->nparts] < sh->chunks ||
	    kq->per != ckv_keyq_chunk_bytes(&p->m->geom, kq->bits))
		return ckv_lerr(p->l, -EPROTO,
				"layer %u: the key copy does not cover the prefix's %u chunks", layer,
				sh->chunks);
	/* codes, then the scales, then each chunk's part, 16-byte aligned */
	HD = (uint64_t)sh->kv_heads * sh->head_dim;
	nsc = (uint64_t)kq->nparts * 2 * HD;
	o_sc = ((uint64_t)sh->chunks * kq->per + 15) & ~15ull;
	o_part = (o_sc + nsc * sizeof(uint16_t) + 15) & ~15ull;
	bytes = o_part + (uint64_t)sh->chunks * sizeof(uint32_t);
	/* the previous call synchronized its stream: the buffer is free */
	rc = ckv_backend_reserve(p->l, &p->kq_dev, &p->kq_dev_bytes, bytes, "key-copy scores");
	if (rc < 0)
		return rc; /* its message says what */
	part = malloc(sizeof(*part) * (sh->chunks ? sh->chunks : 1));
	if (!part)
		return ckv_lerr(p->l, -ENOMEM, "key-copy scores of layer %u: out of memory", layer);
	for (uint32_t x = 0; x < kq->nparts; x++)
		for (uint32_t j = kq->first[x]; j < kq->first[x + 1] && j < sh->chunks; j++)
			part[j] = x;
	rc = be->ops->from_host(be, p->kq_dev, kq->codes, (uint64_t)sh->chunks * kq->per);
	if (rc == 0)
		rc = be->ops->from_host(be, (uint8_t *)p->kq_dev + o_sc, kq->scales,
					nsc * sizeof(uint16_t));
	if (rc == 0)
		rc = be->ops->from_host(be, (uint8_t *)p->kq_dev + o_part, part,
					(uint64_t)sh->chunks * sizeof(uint32_t));
	free(part);
	if (rc == 0) {
		memset(&k, 0, sizeof(k));
		k.codes = p->kq_dev;
		k.scales = (const uint16_t *)((uint8_t *)p->kq_dev + o_sc);
		k.part = (const uint32_t *)((uint8_t *)p->kq_dev + o_part);
		k.per = kq->per;
		k.bits = kq->bits;
		ckv_keyq_levels(kq->bits, k.levels);
		k.m = sh->chunks;
		k.tokens = sh->tokens;
		k.kv_heads = sh->kv_heads;
		k.head_dim = sh->head_dim;
		k.chunk_tokens = sh->chunk_tokens;
		rc = be->ops->keyq_scores(be, &k, query, keys, q_tokens, q_heads, scores, stream);
	}
	if (rc == 0)
		rc = be->ops->sync(be, stream);
	if (rc == -ENOTSUP)
		return ckv_lerr(p->l, rc,
				"layer %u: the %s backend cannot score chunks of %u tokens of "
				"head_dim %u (ckv_keyq_scores scores them on the CPU)",
				layer, be->ops->name, sh->chunk_tokens, sh->head_dim);
	if (rc < 0)
		return ckv_lerr(p->l, rc, "layer %u: key-copy scores on the %s backend failed: %s",
				layer, be->ops->name, strerror(-rc));
	return 0;
}

/* ckv_keyq_scores (device false) and ckv_keyq_scores_device: one layer's copy read, then scored. */
static int keyq_scores(ckv_prefix *p, uint32_t layer, const float *query, const float *keys,
		       uint32_t q_tokens, uint32_t q_heads, float *scores, void *stream,
		       bool device)
{
	struct ckv_keyq kq;
	int rc;

	if (!p)
		return -EINVAL;
	rc = check_query(p, layer, query, q_tokens, q_heads, scores);
	if (rc == 0)
		rc = ckv_prefix_keyq(p, layer, &kq);
	if (rc < 0)
		return rc;
	if (device && p->l->be->ops->keyq_scores) {
		rc = ckv_keyq_mass_dev(p, layer, &p->shape, &kq, query, keys, q_tokens, q_heads,
				       scores, stream);
	} else { /* on the CPU; for ..._device, backend memory is host memory */
		rc = ckv_keyq_mass_cpu(&p->shape, &kq, query, keys, q_tokens, q_heads, scores);
		if (rc < 0)
			ckv_lerr(p->l, rc, "key-copy scores of layer %u: out of memory", layer);
	}
	ckv_keyq_free(&kq);
	return rc < 0 ? rc : 0;
}

int ckv_keyq_scores(ckv_prefix *p, uint32_t layer, const float *query, const float *keys,
		    uint32_t q_tokens, uint32_t q_heads, float *scores)
{
	return keyq_scores(p, layer, query, keys, q_tokens, q_heads, scores, NULL, false);
}

int ckv_keyq_scores_device(ckv_prefix *p, uint32_t layer, const float *query, const float *keys,
			   uint32_t q_tokens, uint32_t q_heads, float *scores, void *stream)
{
	return keyq_scores(p, layer, query, keys, q_tokens, q_heads, scores, stream, true);
}
