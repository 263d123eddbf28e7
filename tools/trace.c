/*
 * trace.c — attention-importance traces: real trace files, the synthetic
 * generator and the statistics that compare them (trace.h, docs/TRACES.md).
 */
#include "trace.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct ckv_trace {
	uint32_t layers, tokens;
	float *mass; /* [layers][tokens] */
};

const double ckv_trace_budgets[CKV_TRACE_NB] = { 0.05, 0.10, 0.25, 0.50 };

static int errf(char *err, size_t len, int rc, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int errf(char *err, size_t len, int rc, const char *fmt, ...)
{
	va_list ap;
	if (err && len) {
		va_start(ap, fmt);
		vsnprintf(err, len, fmt, ap);
		va_end(ap);
	}
	return rc;
}

static int trace_alloc(uint32_t layers, uint32_t tokens, ckv_trace **out)
{
	ckv_trace *t;
	if (!layers || !tokens || (uint64_t)layers * tokens > (1ull << 31))
		return -EINVAL;
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->mass = calloc((size_t)layers * tokens, sizeof(float));
	if (!t->mass) {
		free(t);
		return -ENOMEM;
	}
	t->layers = layers;
	t->tokens = tokens;
	*out = t;
	return 0;
}

void ckv_trace_free(ckv_trace *t)
{
	if (!t)
		return;
	free(t->mass);
	free(t);
}

uint32_t ckv_trace_layers(const ckv_trace *t)
{
	return t->layers;
}

uint32_t ckv_trace_tokens(const ckv_trace *t)
{
	return t->tokens;
}

const float *ckv_trace_layer(const ckv_trace *t, uint32_t layer)
{
	return t->mass + (size_t)layer * t->tokens;
}

/* Scale one layer to sum 1 (in double); -EINVAL when it sums to zero. */
static int normalise(float *v, uint32_t n)
{
	double s = 0;
	for (uint32_t i = 0; i < n; i++)
		s += v[i];
	if (!(s > 0))
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++)
		v[i] = (float)(v[i] / s);
	return 0;
}

/* ---- trace files -------------------------------------------------------------- */

static int dims_from_name(const char *path, uint32_t *w, uint32_t *l, uint32_t *t)
{
	const char *base = strrchr(path, '/'), *dash;
	unsigned a, b, c;
	int used = 0;
	base = base ? base + 1 : path;
	dash = strrchr(base, '-');
	if (!dash)
		return -EINVAL;
	if (sscanf(dash + 1, "%ux%ux%u.f32%n", &a, &b, &c, &used) != 3 || dash[1 + used] != '\0')
		return -EINVAL;
	*w = a;
	*l = b;
	*t = c;
	return 0;
}

int ckv_trace_file_dims(const char *path, uint32_t *windows, uint32_t *layers, uint32_t *tokens,
			char *err, size_t errlen)
{
	struct stat st;
	uint32_t w, l, t;
	if (dims_from_name(path, &w, &l, &t) < 0)
		return errf(err, errlen, -EINVAL,
			    "%s: file name: expected a '-<windows>x<layers>x<tokens>.f32' tail", path);
	if (stat(path, &st) < 0)
		return errf(err, errlen, -errno, "%s: %s", path, strerror(errno));
	if ((uint64_t)st.st_size != (uint64_t)w * l * t * 4)
		return errf(err, errlen, -EINVAL, "%s: size %lld: expected %ux%ux%u float32 = %llu bytes",
			    path, (long long)st.st_size, w, l, t, (unsigned long long)w * l * t * 4);
	*windows = w;
	*layers = l;
	*tokens = t;
	return 0;
}

int ckv_trace_load(const char *path, uint32_t windows, uint32_t layers, uint32_t tokens,
		   uint32_t window, ckv_trace **out, char *err, size_t errlen)
{
	struct stat st;
	uint32_t w, l, t;
	uint64_t want, off;
	ckv_trace *tr;
	int fd, rc;
	size_t got = 0, len;

	if (!windows || !layers || !tokens) {
		if (dims_from_name(path, &w, &l, &t) < 0)
			return errf(err, errlen, -EINVAL,
				    "%s: give the shape, or name the file '...-<windows>x<layers>x<tokens>.f32'", path);
		windows = windows ? windows : w;
		layers = layers ? layers : l;
		tokens = tokens ? tokens : t;
	}
	if (window >= windows)
		return errf(err, errlen, -EINVAL, "%s: window %u: the file holds %u windows", path, window, windows);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errf(err, errlen, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		rc = errf(err, errlen, -errno, "%s: %s", path, strerror(errno));
		goto out_close;
	}
	want = (uint64_t)windows * layers * tokens * 4;
	if ((uint64_t)st.st_size != want) {
		rc = errf(err, errlen, -EINVAL, "%s: size %lld: expected %ux%ux%u float32 = %llu bytes",
			  path, (long long)st.st_size, windows, layers, tokens, (unsigned long long)want);
		goto out_close;
	}
	if ((rc = trace_alloc(layers, tokens, &tr)) < 0) {
		errf(err, errlen, rc, "%s: %s", path, strerror(-rc));
		goto out_close;
	}
	len = (size_t)layers * tokens * 4;
	off = (uint64_t)window * len;
	while (got < len) {
		ssize_t r = pread(fd, (char *)tr->mass + got, len - got, (off_t)(off + got));
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			rc = errf(err, errlen, r < 0 ? -errno : -EIO, "%s: short read at %llu", path,
				  (unsigned long long)(off + got));
			goto out_free;
		}
		got += (size_t)r;
	}
	for (uint32_t li = 0; li < layers; li++) {
		float *v = tr->mass + (size_t)li * tokens;
		for (uint32_t i = 0; i < tokens; i++)
			if (!isfinite(v[i]) || v[i] < 0) {
				rc = errf(err, errlen, -EINVAL, "%s: window %u layer %u token %u: value %g: expected a finite mass >= 0",
					  path, window, li, i, (double)v[i]);
				goto out_free;
			}
		if (normalise(v, tokens) < 0) {
			rc = errf(err, errlen, -EINVAL, "%s: window %u layer %u: all zero", path, window, li);
			goto out_free;
		}
	}
	*out = tr;
	close(fd);
	return 0;
out_free:
	ckv_trace_free(tr);
out_close:
	close(fd);
	return rc;
}

int ckv_trace_map_layers(const ckv_trace *src, uint32_t layers, ckv_trace **out)
{
	ckv_trace *t;
	int rc = trace_alloc(layers, src->tokens, &t);
	if (rc < 0)
		return rc;
	for (uint32_t l = 0; l < layers; l++) {
		uint32_t s = (uint32_t)((uint64_t)l * src->layers / layers);
		memcpy(t->mass + (size_t)l * t->tokens, ckv_trace_layer(src, s), sizeof(float) * t->tokens);
	}
	*out = t;
	return 0;
}

/* ---- the synthetic generator ---------------------------------------------------- */

struct rng {
	uint64_t s;
	bool have;
	double spare;
};

static uint64_t rng_next(struct rng *r)
{
	uint64_t x = (r->s += 0x9e3779b97f4a7c15ull);
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static double rng_unit(struct rng *r) /* (0, 1) */
{
	return ((double)(rng_next(r) >> 11) + 0.5) / 9007199254740992.0;
}

static double rng_gauss(struct rng *r)
{
	double u, v;
	if (r->have) {
		r->have = false;
		return r->spare;
	}
	u = rng_unit(r);
	v = rng_unit(r);
	r->spare = sqrt(-2 * log(u)) * sin(2 * M_PI * v);
	r->have = true;
	return sqrt(-2 * log(u)) * cos(2 * M_PI * v);
}

/*
 * Calibration (docs/TRACES.md has the numbers side by side with the real
 * trace): sigma and spatial set the heavy tail and how important chunks
 * cluster; layer_rho makes top-10% sets of layers 8 apart (adjacent periods
 * at p = 8) overlap ~0.6, inside the 52-64% the ContiguousKV paper reports,
 * while adjacent layers overlap ~0.9.
 */
void ckv_trace_synth_defaults(ckv_trace_synth_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->chunk = 16;
	o->sigma = 1.6;
	o->spatial = 0.6;
	o->layer_rho = 0.97;
	o->token_sigma = 0.7;
	o->sink = 0.05;
	o->recent = 0.10;
	o->recent_tokens = 256;
}

/* One draw of the spatially correlated field e[0..m): AR(1) along j, unit variance. */
static void spatial_field(struct rng *r, double phi, double *e, uint32_t m)
{
	double c = sqrt(1 - phi * phi);
	e[0] = rng_gauss(r);
	for (uint32_t j = 1; j < m; j++)
		e[j] = phi * e[j - 1] + c * rng_gauss(r);
}

int ckv_trace_synth(const ckv_trace_synth_opts *o, ckv_trace **out)
{
	uint32_t n = o->tokens, L = o->layers, c = o->chunk ? o->chunk : 16, m, R;
	double *z = NULL, *e = NULL, *xi = NULL, rc_l, rc_t;
	struct rng r = { .s = o->seed * 0x2545f4914f6cdd1dull + 0x51a7 };
	ckv_trace *t;
	int rc;

	if (!(o->sigma >= 0) || !(o->spatial >= 0 && o->spatial < 1) || !(o->layer_rho >= 0 && o->layer_rho <= 1) ||
	    !(o->token_sigma >= 0) || !(o->sink >= 0) || !(o->recent >= 0) || !(o->sink + o->recent < 1))
		return -EINVAL;
	if ((rc = trace_alloc(L, n, &t)) < 0)
		return rc;
	m = (n + c - 1) / c;
	z = malloc(sizeof(double) * m);
	e = malloc(sizeof(double) * m);
	xi = malloc(sizeof(double) * n);
	if (!z || !e || !xi) {
		rc = -ENOMEM;
		goto out;
	}
	rc_l = sqrt(1 - o->layer_rho * o->layer_rho);
	rc_t = rc_l;
	R = o->recent_tokens < n ? o->recent_tokens : n - 1;
	for (uint32_t l = 0; l < L; l++) {
		float *v = t->mass + (size_t)l * n;
		double body = 0, ramp = 0;
		spatial_field(&r, o->spatial, e, m);
		for (uint32_t j = 0; j < m; j++)
			z[j] = l ? o->layer_rho * z[j] + rc_l * e[j] : e[j];
		for (uint32_t i = 0; i < n; i++) {
			double g = rng_gauss(&r);
			xi[i] = l ? o->layer_rho * xi[i] + rc_t * g : g;
		}
		for (uint32_t i = 0; i < n; i++) {
			double w = exp(o->sigma * z[i / c] + o->token_sigma * xi[i]);
			v[i] = (float)w;
			if (i)
				body += w;
		}
		/* the body gets 1 - sink - recent of the mass, then sink and the recent ramp */
		for (uint32_t i = 1; i < n; i++)
			v[i] = (float)(v[i] / body * (1 - o->sink - (R ? o->recent : 0)));
		v[0] = (float)(o->sink + (n == 1 ? 1 - o->sink : 0));
		for (uint32_t k = 1; k <= R; k++)
			ramp += k;
		for (uint32_t k = 1; k <= R; k++)
			v[n - R - 1 + k] += (float)(o->recent * k / ramp);
		normalise(v, n);
	}
	*out = t;
	t = NULL;
	rc = 0;
out:
	free(z);
	free(e);
	free(xi);
	ckv_trace_free(t);
	return rc;
}

/* ---- selection helpers and statistics ---------------------------------------- */

void ckv_trace_chunk_scores(const ckv_trace *t, uint32_t layer, uint32_t chunk, float *out)
{
	const float *v = ckv_trace_layer(t, layer);
	uint32_t m = (t->tokens + chunk - 1) / chunk;
	for (uint32_t j = 0; j < m; j++) {
		double s = 0;
		uint32_t end = (j + 1) * chunk < t->tokens ? (j + 1) * chunk : t->tokens;
		for (uint32_t i = j * chunk; i < end; i++)
			s += v[i];
		out[j] = (float)s;
	}
}

struct kv_idx {
	float v;
	uint32_t i;
};

static int cmp_desc(const void *a, const void *b)
{
	const struct kv_idx *x = a, *y = b;
	if (x->v != y->v)
		return x->v > y->v ? -1 : 1;
	return x->i < y->i ? -1 : x->i > y->i;
}

/* Indices of v sorted by descending value (ties: lower index first). */
static int argsort_desc(const float *v, uint32_t n, uint32_t *out)
{
	struct kv_idx *a = malloc(sizeof(*a) * (n ? n : 1));
	if (!a)
		return -ENOMEM;
	for (uint32_t i = 0; i < n; i++) {
		a[i].v = v[i];
		a[i].i = i;
	}
	qsort(a, n, sizeof(*a), cmp_desc);
	for (uint32_t i = 0; i < n; i++)
		out[i] = a[i].i;
	free(a);
	return 0;
}

void ckv_trace_topk(const float *v, uint32_t n, uint32_t k, uint32_t *out)
{
	uint32_t *o = malloc(sizeof(uint32_t) * (n ? n : 1));
	if (k > n)
		k = n;
	if (!o) { /* fall back to selection by repeated scans */
		for (uint32_t s = 0; s < k; s++) {
			uint32_t best = UINT32_MAX;
			for (uint32_t i = 0; i < n; i++) {
				bool taken = false;
				for (uint32_t q = 0; q < s && !taken; q++)
					taken = out[q] == i;
				if (!taken && (best == UINT32_MAX || v[i] > v[best]))
					best = i;
			}
			out[s] = best;
		}
		return;
	}
	argsort_desc(v, n, o);
	memcpy(out, o, sizeof(uint32_t) * k);
	free(o);
}

static uint32_t budget_k(double b, uint32_t n)
{
	uint32_t k = (uint32_t)ceil(b * n - 1e-9);
	return k < 1 ? 1 : k > n ? n : k;
}

int ckv_trace_stats_compute(ckv_trace *const *tr, uint32_t ntr, uint32_t chunk, uint32_t period,
			    ckv_trace_stats *st)
{
	uint32_t L, n, m, dist[3];
	double cnt_d[3][CKV_TRACE_NB] = { { 0 } }, cnt_p = 0, cnt_ip = 0, cnt_l = 0, adj_hit = 0, adj_all = 0;
	float *cs = NULL;
	uint32_t *ord = NULL, *tord = NULL;
	uint8_t *in = NULL, *seen = NULL;
	int rc = -ENOMEM;

	memset(st, 0, sizeof(*st));
	if (!ntr || !chunk || !period)
		return -EINVAL;
	L = tr[0]->layers;
	n = tr[0]->tokens;
	for (uint32_t x = 1; x < ntr; x++)
		if (tr[x]->layers != L || tr[x]->tokens != n)
			return -EINVAL;
	m = (n + chunk - 1) / chunk;
	st->traces = ntr;
	st->layers = L;
	st->tokens = n;
	st->period = period;
	dist[0] = 1;
	dist[1] = 4;
	dist[2] = period;
	cs = malloc(sizeof(float) * (size_t)L * m);
	ord = malloc(sizeof(uint32_t) * (size_t)L * m);
	tord = malloc(sizeof(uint32_t) * n);
	in = malloc((size_t)L * m);
	seen = malloc(n / 16 + 2 > m ? n / 16 + 2 : m);
	if (!cs || !ord || !tord || !in || !seen)
		goto out;

	for (uint32_t x = 0; x < ntr; x++) {
		const ckv_trace *t = tr[x];
		for (uint32_t l = 0; l < L; l++) {
			ckv_trace_chunk_scores(t, l, chunk, cs + (size_t)l * m);
			if ((rc = argsort_desc(cs + (size_t)l * m, m, ord + (size_t)l * m)) < 0)
				goto out;
			st->sink += cs[(size_t)l * m];
			st->recent += cs[(size_t)l * m + m - 1];
			cnt_l++;
		}
		for (int b = 0; b < CKV_TRACE_NB; b++) {
			uint32_t k = budget_k(ckv_trace_budgets[b], m);
			memset(in, 0, (size_t)L * m);
			for (uint32_t l = 0; l < L; l++) {
				double mass = 0;
				for (uint32_t q = 0; q < k; q++) {
					in[(size_t)l * m + ord[(size_t)l * m + q]] = 1;
					mass += cs[(size_t)l * m + ord[(size_t)l * m + q]];
				}
				st->top_mass[b] += mass;
				if (b == 1)
					for (uint32_t j = 0; j + 1 < m; j++)
						if (in[(size_t)l * m + j]) {
							adj_all++;
							adj_hit += in[(size_t)l * m + j + 1];
						}
			}
			/* overlaps of layer pairs: a and b share how much */
#define OVL(a, bb, o_sum, j_sum)                                                        \
	do {                                                                            \
		uint32_t inter = 0;                                                     \
		for (uint32_t q = 0; q < m; q++)                                        \
			inter += in[(size_t)(a) * m + q] & in[(size_t)(bb) * m + q];    \
		o_sum += (double)inter / k;                                             \
		j_sum += (double)inter / (2.0 * k - inter);                             \
	} while (0)
			for (int d = 0; d < 3; d++)
				for (uint32_t l = 0; l + dist[d] < L; l++) {
					OVL(l, l + dist[d], st->overlap[d][b], st->jaccard[d][b]);
					cnt_d[d][b]++;
				}
			for (uint32_t l = 0; l + period < L; l += period) {
				double dummy = 0;
				OVL(l, l + period, st->overlap_periods[b], dummy);
				if (b == 0)
					cnt_p++;
			}
			for (uint32_t p0 = 0; p0 < L; p0 += period)
				for (uint32_t a = p0; a < p0 + period && a < L; a++)
					for (uint32_t c2 = a + 1; c2 < p0 + period && c2 < L; c2++) {
						double dummy = 0;
						OVL(a, c2, st->overlap_in_period[b], dummy);
						if (b == 0)
							cnt_ip++;
					}
#undef OVL
			/* token level: chunks and 64-token blocks that hold the top-k tokens */
			{
				uint32_t kt = budget_k(ckv_trace_budgets[b], n);
				for (uint32_t l = 0; l < L; l++) {
					uint32_t nc = 0, nb = 0;
					if ((rc = argsort_desc(ckv_trace_layer(t, l), n, tord)) < 0)
						goto out;
					memset(seen, 0, m);
					for (uint32_t q = 0; q < kt; q++)
						if (!seen[tord[q] / chunk]) {
							seen[tord[q] / chunk] = 1;
							nc++;
						}
					memset(seen, 0, m);
					for (uint32_t q = 0; q < kt; q++)
						if (!seen[tord[q] / 64]) {
							seen[tord[q] / 64] = 1;
							nb++;
						}
					st->token_chunk_amp[b] += (double)nc / ((kt + chunk - 1) / chunk);
					st->token_block_amp[b] += (double)nb * 64 /
								  (double)((uint64_t)((kt + 63) / 64) * 64);
				}
			}
		}
	}
	for (int b = 0; b < CKV_TRACE_NB; b++) {
		for (int d = 0; d < 3; d++)
			if (cnt_d[d][b]) {
				st->overlap[d][b] /= cnt_d[d][b];
				st->jaccard[d][b] /= cnt_d[d][b];
			}
		if (cnt_p)
			st->overlap_periods[b] /= cnt_p;
		if (cnt_ip)
			st->overlap_in_period[b] /= cnt_ip;
		st->top_mass[b] /= cnt_l;
		st->token_chunk_amp[b] /= cnt_l;
		st->token_block_amp[b] /= cnt_l;
	}
	st->sink /= cnt_l;
	st->recent /= cnt_l;
	st->adjacent = adj_all ? adj_hit / adj_all : 0;
	rc = 0;
out:
	free(cs);
	free(ord);
	free(tord);
	free(in);
	free(seen);
	return rc;
}

void ckv_trace_stats_print(const ckv_trace_stats *const *st, const char *const *names, uint32_t n,
			   FILE *f)
{
	static const char *bn[CKV_TRACE_NB] = { "5%", "10%", "25%", "50%" };
	fprintf(f, "| statistic |");
	for (uint32_t i = 0; i < n; i++)
		fprintf(f, " %s |", names[i]);
	fprintf(f, "\n|---|");
	for (uint32_t i = 0; i < n; i++)
		fprintf(f, "---|");
	fprintf(f, "\n| traces x layers x tokens |");
	for (uint32_t i = 0; i < n; i++)
		fprintf(f, " %u x %u x %u |", st[i]->traces, st[i]->layers, st[i]->tokens);
	fprintf(f, "\n");
#define ROW(label, expr)                                          \
	do {                                                      \
		fprintf(f, "| %s |", label);                      \
		for (uint32_t i = 0; i < n; i++)                  \
			fprintf(f, " %.3f |", (double)(expr));    \
		fprintf(f, "\n");                                 \
	} while (0)
	for (int b = 0; b < CKV_TRACE_NB; b++) {
		char lab[96];
		snprintf(lab, sizeof(lab), "top-%s chunk-set overlap, adjacent layers", bn[b]);
		ROW(lab, st[i]->overlap[0][b]);
	}
	for (int b = 0; b < CKV_TRACE_NB; b++) {
		char lab[96];
		snprintf(lab, sizeof(lab), "top-%s overlap, layers 4 apart", bn[b]);
		ROW(lab, st[i]->overlap[1][b]);
	}
	for (int b = 0; b < CKV_TRACE_NB; b++) {
		char lab[96];
		snprintf(lab, sizeof(lab), "top-%s overlap, adjacent period starts (p apart)", bn[b]);
		ROW(lab, st[i]->overlap_periods[b]);
	}
	for (int b = 0; b < CKV_TRACE_NB; b++) {
		char lab[96];
		snprintf(lab, sizeof(lab), "top-%s overlap, layer pairs inside a period", bn[b]);
		ROW(lab, st[i]->overlap_in_period[b]);
	}
	ROW("top-10% Jaccard, adjacent layers", st[i]->jaccard[0][1]);
	ROW("top-10% Jaccard, layers 4 apart", st[i]->jaccard[1][1]);
	for (int b = 0; b < CKV_TRACE_NB; b++) {
		char lab[96];
		snprintf(lab, sizeof(lab), "attention mass in the top-%s chunks", bn[b]);
		ROW(lab, st[i]->top_mass[b]);
	}
	ROW("mass of chunk 0 (sink)", st[i]->sink);
	ROW("mass of the last chunk (recent)", st[i]->recent);
	ROW("P(next chunk important | chunk important), top 10%", st[i]->adjacent);
	for (int b = 0; b < CKV_TRACE_NB; b++) {
		char lab[96];
		snprintf(lab, sizeof(lab), "top-%s tokens: 16-token chunks holding them / fewest", bn[b]);
		ROW(lab, st[i]->token_chunk_amp[b]);
	}
	for (int b = 0; b < CKV_TRACE_NB; b++) {
		char lab[96];
		snprintf(lab, sizeof(lab), "top-%s tokens: 64-token blocks holding them / fewest", bn[b]);
		ROW(lab, st[i]->token_block_amp[b]);
	}
#undef ROW
	fprintf(f, "| period p |");
	for (uint32_t i = 0; i < n; i++)
		fprintf(f, " %u |", st[i]->period);
	fprintf(f, "\n");
}
