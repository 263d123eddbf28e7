/*
 * bench-reprefill — the Re-Prefill benchmark (DESIGN §8; method and results
 * in docs/BENCHMARKS.md, "Re-Prefill"; traces in docs/TRACES.md).
 *
 * One invocation, one store (WORKDIR/store), side by side:
 *   full        every chunk, layer-wise pipelined (CKV_MODE_FULL);
 *   impress     an IMPRESS-style baseline built here on ckv_fetch_*:
 *               token-level importance, 64-token blocks read whole, probe
 *               keys of 3 heads (one KV group) read at every layer from a
 *               contiguous side file (IMPRESS keeps probe keys apart), all
 *               heads' keys on disagreement (--impress-fallback), identify
 *               then load in sequence per layer, no cross-layer prefetch;
 *   noprefetch  ours, per-layer digest selection, each layer's reads issued
 *               only when the model reaches it (CKV_MODE_LAYER + no_prefetch);
 *   period      ours, the paper's period mode (p = 8);
 *   layer       ours, per-layer digests with speculative next-layer reads;
 *   rerank      ours, digests pick candidates, exact K scores the winners;
 *   bound       max(compute, the oracle's chunks read by raw io_uring
 *               O_DIRECT, the fastest of three read shapes, same run).
 * Scenarios: cold (fresh loader and arena, page cache dropped), real (a
 * real trace file drives importance), warm (Zipf requests over prefixes,
 * arena below the working set, attention-guided vs LRU retention), stats
 * (the synthetic traces' statistics beside the real trace's).
 * Compute is replayed on the loader's stream, layer by layer, from a table
 * measured on the GPU by tools/measure_compute.py (--compute), or modelled
 * from FLOPs when no table is given (host backend, CI: a busy-wait).
 *
 * Importance: per layer and token, from a trace (the real one, or the
 * synthetic generator). The stores are written by this program so that the
 * planted keys follow the trace: in layer l, chunk j's keys have a component
 * a(l, j) along a per-(layer, KV head) direction u, rank-ordered by the
 * trace's chunk mass, and the query at layer l is u; so digest scores, exact
 * key scores and the trace all rank chunks alike (docs/BENCHMARKS.md says
 * what each system sees).
 *
 * Exit status: 0 ok, 1 failure, 2 usage.
 */
#include "backend.h"
#include "ckv_format.h"
#include "ckv_store.h"
#include "ckvgpu.h"
#include "trace.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <liburing.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXIT_USAGE 2
#define MAXL 8            /* entries of each list option */
#define PLANT_VERSION 1   /* bump when the planted data change: new salt, new prefixes */
#define AMP_MAX 16.0      /* planted key component of the most important chunk */
#define RAW_RING 128        /* io_uring entries of the raw reader */
#define RAW_MAX_IO (1u << 20) /* largest raw read of the probe keys and the first bound config */
#define RAW_SCRATCH (64u << 20)
#define WARMUP_TOKENS 1024

static const char *prog = "bench-reprefill";

/* ---- systems -------------------------------------------------------------- */

enum sys { SYS_FULL, SYS_IMPRESS, SYS_NOPREFETCH, SYS_PERIOD, SYS_LAYER, SYS_RERANK, SYS_N };
static const char *const sys_name[SYS_N] = { "full", "impress", "noprefetch", "period", "layer", "rerank" };

/* Qwen2.5 shapes beyond what ckv_geom_preset knows (query heads, MLP). */
struct model_info {
	const char *name;
	uint32_t q_heads, hidden, inter;
};
static const struct model_info model_infos[] = {
	{ "qwen2.5-0.5b", 14, 896, 4864 },   { "qwen2.5-1.5b", 12, 1536, 8960 },
	{ "qwen2.5-3b", 16, 2048, 11008 },   { "qwen2.5-7b", 28, 3584, 18944 },
	{ "qwen2.5-14b", 40, 5120, 13824 },  { "qwen2.5-32b", 40, 5120, 27648 },
	{ "qwen2.5-72b", 64, 8192, 29568 },
};

struct model {
	const struct model_info *info;
	ckv_geom g;               /* preset, with this benchmark's salt */
	uint32_t ncomp, nprobe;   /* measured table (0: FLOP model) */
	double *comp_a, *comp_s;  /* attended prefix tokens -> seconds per layer */
	double *probe_n, *probe_s;
};

/* ---- options ------------------------------------------------------------------- */

struct opts {
	const char *workdir;
	const char *models[MAXL];
	uint32_t nmodels;
	uint32_t tokens[MAXL], ntokens;
	double budgets[MAXL];
	uint32_t nbudgets;
	bool sys_on[SYS_N];
	bool sc_cold, sc_real, sc_warm, sc_stats;
	const char *compute_path, *trace_path, *json_path, *md_path, *machine;
	ckv_backend_kind backend;
	uint32_t suffix, reps, period, subperiod, rerank;
	bool drop, small, quiet;
	double impress_fallback;
	double flops;
	const char *real_models[MAXL];
	uint32_t nreal_models, real_windows;
	const char *warm_model;
	uint32_t warm_tokens, warm_prefixes, warm_requests;
	double warm_budget, warm_zipf, warm_arena_frac, query_noise;
	uint32_t gen_threads;
};

/* ---- results ------------------------------------------------------------------ */

struct result {
	double time_s, compute_s, wait_s;
	uint64_t bytes_kv, bytes_meta, bytes_needed, disk_bytes;
	uint64_t hits, misses, spec_used, spec_wasted, chunks_used;
	uint64_t spec_bytes;         /* bytes of wasted speculative whole-chunk reads (cold) */
	double sel_overlap;          /* mean over layers of |sel n oracle| / |oracle| */
	uint32_t fallbacks;
	double t_probe, t_ident, t_blocks; /* IMPRESS: where the time goes */
	double t_sync, t_layer, t_tail;    /* ours: host waiting for the previous layers' compute
					      before an identification, inside ckv_pipeline_layer,
					      and for the stream after the last layer */
	double t_layer_id, wait_id;        /* ours: in ckv_pipeline_layer at identifying layers, and
					      blocked on reads there */
	double t_digest;                   /* ours (period): the identifying layers' digests read
					      cold and scored, alone, after the timed run */
	double raw_s, raw_bw;        /* bound rows */
	int raw_cfg;                 /* bound rows: the fastest raw read shape (run_bound) */
	uint32_t requests;           /* warm: requests aggregated */
};

/* ---- the benchmark's state ---------------------------------------------------- */

struct rawio {
	struct io_uring ring;
	bool ready;
	void *scratch; /* RAW_SCRATCH bytes, for reads whose data nobody looks at */
	void *slots;   /* RAW_RING slots of slot_bytes: one per read in flight */
	size_t slot_bytes;
};

struct prefix;

struct bench {
	struct opts o;
	char store_path[PATH_MAX];
	ckv_store *store;
	ckv_backend *be;     /* compute replay and IMPRESS buffers, the loaders' kind */
	bool cuda;
	struct model models[16];
	uint32_t nmodels;
	struct rawio io;
	json_t *out;         /* { "machine":…, "runs": [...] } */
	FILE *md;
	bool drop_warned;
	struct prefix **prefixes;
	uint32_t nprefixes;
	double t_start;
};

static void say(const struct bench *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(const struct bench *b, const char *fmt, ...)
{
	va_list ap;
	if (b->o.quiet)
		return;
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fflush(stderr);
}

static int usage_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_err(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nTry '%s -h' for help.\n", prog);
	return EXIT_USAGE;
}

static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return -EIO;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static double unit01(uint64_t x) /* [0, 1) */
{
	return (double)(mix64(x) >> 11) / 9007199254740992.0;
}

static uint64_t fnv1a(const char *s)
{
	uint64_t h = 0xcbf29ce484222325ull;
	for (; *s; s++)
		h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
	return h;
}

/* Bytes this process has caused to be read from storage (/proc/self/io). */
static uint64_t proc_read_bytes(void)
{
	FILE *f = fopen("/proc/self/io", "r");
	char line[128];
	uint64_t v = 0;
	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, "read_bytes:", 11))
			v = strtoull(line + 11, NULL, 10);
	fclose(f);
	return v;
}

/* Cold start: drop the page cache (root only; warns once otherwise). */
static void drop_caches(struct bench *b)
{
	int fd;
	if (!b->o.drop)
		return;
	sync();
	fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, "3", 1) != 1) {
		if (!b->drop_warned)
			say(b, "%s: cannot drop the page cache (%s); cold runs rely on O_DIRECT alone\n", prog,
			    strerror(errno));
		b->drop_warned = true;
		b->o.drop = false;
	}
	if (fd >= 0)
		close(fd);
}

/* ---- raw io_uring reads (the bound; IMPRESS probe keys) ----------------------------- */

struct rreq {
	int fd;
	uint64_t off;
	uint32_t len;
	void *dst;
};

static int rawio_init(struct rawio *r)
{
	int rc = io_uring_queue_init(RAW_RING, &r->ring, 0);
	if (rc < 0)
		return rc;
	if (posix_memalign(&r->scratch, 4096, RAW_SCRATCH)) {
		io_uring_queue_exit(&r->ring);
		return -ENOMEM;
	}
	memset(r->scratch, 0, RAW_SCRATCH);
	r->ready = true;
	return 0;
}

static void rawio_fini(struct rawio *r)
{
	if (!r->ready)
		return;
	io_uring_queue_exit(&r->ring);
	free(r->scratch);
	free(r->slots);
	r->ready = false;
}

/* Slots of at least len bytes, one per read in flight (touched once, so no read faults them in). */
static int rawio_slots(struct rawio *r, size_t len)
{
	void *p;
	if (r->slot_bytes >= len)
		return 0;
	if (posix_memalign(&p, 4096, (size_t)RAW_RING * len))
		return -ENOMEM;
	memset(p, 0, (size_t)RAW_RING * len);
	free(r->slots);
	r->slots = p;
	r->slot_bytes = len;
	return 0;
}

/*
 * Run reads q[0..n) with up to qd (<= RAW_RING) in flight; short reads are
 * resubmitted for the rest (q entries are updated in place). 0 or a
 * negative errno.
 */
static int rawio_run(struct rawio *r, struct rreq *q, size_t n, unsigned qd)
{
	size_t next = 0, done = 0;
	unsigned inflight = 0;

	while (done < n) {
		struct io_uring_cqe *cqe;
		int rc;
		while (inflight < qd && next < n) {
			struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
			if (!sqe)
				break;
			io_uring_prep_read(sqe, q[next].fd, q[next].dst, q[next].len, q[next].off);
			io_uring_sqe_set_data64(sqe, next);
			next++;
			inflight++;
		}
		rc = io_uring_submit_and_wait(&r->ring, 1);
		if (rc < 0 && rc != -EINTR)
			return rc;
		while (io_uring_peek_cqe(&r->ring, &cqe) == 0) {
			size_t i = (size_t)io_uring_cqe_get_data64(cqe);
			int res = cqe->res;
			io_uring_cqe_seen(&r->ring, cqe);
			if (res == -EAGAIN || res == -EINTR || (res > 0 && (uint32_t)res < q[i].len)) {
				struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
				if (res > 0) {
					q[i].off += (uint32_t)res;
					q[i].dst = (char *)q[i].dst + res;
					q[i].len -= (uint32_t)res;
				}
				if (!sqe)
					return -EBUSY;
				io_uring_prep_read(sqe, q[i].fd, q[i].dst, q[i].len, q[i].off);
				io_uring_sqe_set_data64(sqe, i);
				continue;
			}
			if (res < 0)
				return res;
			if (res == 0)
				return -EIO; /* past the end of the file */
			inflight--;
			done++;
		}
	}
	return 0;
}

/* Open for O_DIRECT reads, buffered where the filesystem refuses O_DIRECT. */
static int open_direct(const char *path, bool direct)
{
	int fd = direct ? open(path, O_RDONLY | O_CLOEXEC | O_DIRECT) : -1;
	if (fd < 0)
		fd = open(path, O_RDONLY | O_CLOEXEC);
	return fd < 0 ? -errno : fd;
}

/* ---- compute: measured table or FLOP model ------------------------------------------ */

static double interp(const double *x, const double *y, uint32_t n, double v)
{
	uint32_t i;
	if (n == 1)
		return y[0];
	for (i = 1; i + 1 < n && x[i] < v; i++)
		;
	/* segment [i-1, i]; linear extrapolation past either end */
	return y[i - 1] + (y[i] - y[i - 1]) * (v - x[i - 1]) / (x[i] - x[i - 1]);
}

static double flops_layer(const struct bench *b, const struct model *mo, double attended)
{
	const ckv_geom *g = &mo->g;
	double q = b->o.suffix, D = g->head_dim, H = mo->info->q_heads, K = g->kv_heads;
	double hid = mo->info->hidden, it = mo->info->inter;
	double params = hid * (H * D + 2 * K * D) + H * D * hid + 3 * hid * it;
	return 2 * q * params + 4 * q * (attended + q / 2) * H * D;
}

/* Seconds of one layer's compute for the suffix attending `attended` prefix tokens. */
static double compute_layer_s(const struct bench *b, const struct model *mo, uint32_t attended)
{
	double s;
	if (mo->ncomp)
		s = interp(mo->comp_a, mo->comp_s, mo->ncomp, attended);
	else
		s = flops_layer(b, mo, attended) / b->o.flops + 20e-6;
	return s > 0 ? s : 0;
}

/* Seconds of IMPRESS's probe-head identification over `tokens` prefix tokens. */
static double compute_probe_s(const struct bench *b, const struct model *mo, uint32_t tokens)
{
	double s;
	if (mo->nprobe)
		s = interp(mo->probe_n, mo->probe_s, mo->nprobe, tokens);
	else
		s = 2.0 * 3 * b->o.suffix * tokens * mo->g.head_dim / b->o.flops + 10e-6;
	return s > 0 ? s : 0;
}

static int load_pairs(json_t *arr, double **x, double **y, uint32_t *n)
{
	size_t i, k = json_array_size(arr);
	if (!json_is_array(arr) || !k)
		return -EINVAL;
	*x = calloc(k, sizeof(double));
	*y = calloc(k, sizeof(double));
	if (!*x || !*y)
		return -ENOMEM;
	for (i = 0; i < k; i++) {
		json_t *p = json_array_get(arr, i);
		if (!json_is_array(p) || json_array_size(p) != 2 || !json_is_number(json_array_get(p, 0)) ||
		    !json_is_number(json_array_get(p, 1)))
			return -EINVAL;
		(*x)[i] = json_number_value(json_array_get(p, 0));
		(*y)[i] = json_number_value(json_array_get(p, 1));
		if (!(*y)[i] || (*y)[i] < 0 || (i && !((*x)[i] > (*x)[i - 1])))
			return -EINVAL;
	}
	*n = (uint32_t)k;
	return 0;
}

static int model_get(struct bench *b, const char *name, struct model **out)
{
	struct model *mo;
	const struct model_info *info = NULL;
	ckv_err e;

	for (uint32_t i = 0; i < b->nmodels; i++)
		if (!strcasecmp(b->models[i].info->name, name)) {
			*out = &b->models[i];
			return 0;
		}
	for (size_t i = 0; i < sizeof(model_infos) / sizeof(model_infos[0]); i++)
		if (!strcasecmp(model_infos[i].name, name))
			info = &model_infos[i];
	if (!info || b->nmodels == sizeof(b->models) / sizeof(b->models[0]))
		return -ENOENT;
	mo = &b->models[b->nmodels];
	memset(mo, 0, sizeof(*mo));
	mo->info = info;
	if (ckv_geom_preset(&mo->g, info->name) < 0)
		return -ENOENT;
	snprintf(mo->g.salt, sizeof(mo->g.salt), "bench-reprefill-v%d", PLANT_VERSION);
	if (ckv_geom_init(&mo->g, &e) < 0)
		return -EINVAL;
	if (b->o.compute_path) {
		json_error_t je;
		json_t *root = json_load_file(b->o.compute_path, 0, &je), *mj;
		int rc = 0;
		if (!root)
			return fail("%s: line %d: %s", b->o.compute_path, je.line, je.text);
		if (json_integer_value(json_object_get(root, "suffix_tokens")) != (json_int_t)b->o.suffix)
			rc = fail("%s: suffix_tokens: %" JSON_INTEGER_FORMAT " but --suffix is %u", b->o.compute_path,
				  json_integer_value(json_object_get(root, "suffix_tokens")), b->o.suffix);
		mj = json_object_get(json_object_get(root, "models"), info->name);
		if (!rc && !mj)
			rc = fail("%s: models.%s: missing (measure it with tools/measure_compute.py --models %s)",
				  b->o.compute_path, info->name, info->name);
		if (!rc && load_pairs(json_object_get(mj, "layer_s"), &mo->comp_a, &mo->comp_s, &mo->ncomp) < 0)
			rc = fail("%s: models.%s.layer_s: expected [[tokens, seconds], ...] ascending", b->o.compute_path,
				  info->name);
		if (!rc && load_pairs(json_object_get(mj, "probe_s"), &mo->probe_n, &mo->probe_s, &mo->nprobe) < 0)
			rc = fail("%s: models.%s.probe_s: expected [[tokens, seconds], ...] ascending", b->o.compute_path,
				  info->name);
		json_decref(root);
		if (rc) {
			free(mo->comp_a);
			free(mo->comp_s);
			free(mo->probe_n);
			free(mo->probe_s);
			return rc;
		}
	}
	b->nmodels++;
	*out = mo;
	return 0;
}

/* ---- prefixes: trace, planted store data, IMPRESS side file -------------------------- */

struct prefix {
	struct model *mo;
	char desc[160];        /* what drives importance, e.g. "synth:seed=3" */
	uint32_t n, m, L;
	uint64_t seed;
	uint32_t *tokens;
	ckv_trace *tr;         /* [L][n] */
	float *cs;             /* [L][m] oracle chunk scores (chunk sums of the trace) */
	uint32_t *rank;        /* [L][m] rank of chunk j (0: most important) */
	uint32_t *tord;        /* [L][n] tokens by descending mass */
	float *dirs;           /* [L][kv_heads][head_dim] planted unit directions */
	char hash[CKV_HASH_HEX + 1];
	char seg_rel[200];     /* the segment directory (one extent) */
	uint32_t seg_first;
	char probe_path[PATH_MAX];
	uint64_t probe_stride; /* bytes per layer in the probe file */
	uint64_t hkb;          /* one head's keys of one chunk */
	int probe_fd;          /* while generating */
	int gen_rc;
};

static void prefix_free(struct prefix *p)
{
	if (!p)
		return;
	free(p->tokens);
	ckv_trace_free(p->tr);
	free(p->cs);
	free(p->rank);
	free(p->tord);
	free(p->dirs);
	free(p);
}

static inline uint16_t f32_bf16(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	u += 0x7fff + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

/*
 * Store data for chunks [first, first + count) of layer l: KV-HCD, bf16.
 * K: per token and head, uniform noise of unit variance with its component
 * along the planted direction u(l, h) replaced by a(l, j) = AMP_MAX * (1 -
 * rank / m), so every token's key (and so the chunk's mean key) scores a(l, j)
 * against u exactly, up to bf16 rounding. V: cheap bf16 noise. Head 0's keys
 * of each chunk also go to the IMPRESS probe file.
 */
static int prefix_fill(void *arg, uint32_t l, uint32_t first, uint32_t count, void *buf)
{
	struct prefix *p = arg;
	const ckv_geom *g = &p->mo->g;
	uint32_t c = g->chunk_tokens, D = g->head_dim, H = g->kv_heads;
	float row[4096];

	if (g->dtype != CKV_DTYPE_BF16 || D > 4096)
		return -EINVAL;
	for (uint32_t i = 0; i < count; i++) {
		uint32_t j = first + i;
		uint8_t *ch = (uint8_t *)buf + (size_t)i * g->chunk_bytes;
		uint16_t *kh = (uint16_t *)ch, *vh = (uint16_t *)(ch + g->half_bytes);
		double a = AMP_MAX * (1.0 - (double)p->rank[(size_t)l * p->m + j] / p->m);
		for (uint32_t h = 0; h < H; h++) {
			const float *u = p->dirs + ((size_t)l * H + h) * D;
			for (uint32_t t = 0; t < c; t++) {
				uint64_t pos = (uint64_t)j * c + t, st;
				uint16_t *out = kh + ((size_t)h * c + t) * D, *vout = vh + ((size_t)h * c + t) * D;
				float dot = 0;
				if (pos >= p->n)
					break;
				st = mix64(p->seed ^ mix64(((uint64_t)l << 44) ^ ((uint64_t)h << 32) ^ pos));
				for (uint32_t d = 0; d < D; d += 2) {
					uint64_t r = mix64(st + d);
					row[d] = (float)(((double)(r & 0xffffffffu) / 4294967296.0 - 0.5) * 3.4641016);
					if (d + 1 < D)
						row[d + 1] = (float)(((double)(r >> 32) / 4294967296.0 - 0.5) * 3.4641016);
				}
				for (uint32_t d = 0; d < D; d++)
					dot += row[d] * u[d];
				for (uint32_t d = 0; d < D; d++)
					out[d] = f32_bf16(row[d] + (float)(a - dot) * u[d]);
				/* V: sign, exponent of [0.5, 1), random mantissa */
				for (uint32_t d = 0; d < D; d += 4) {
					uint64_t r = mix64(st ^ 0x5bd1e995ull ^ d);
					for (uint32_t k = 0; k < 4 && d + k < D; k++)
						vout[d + k] = (uint16_t)((((r >> (16 * k)) & 0x807f)) | 0x3f00);
				}
			}
		}
	}
	if (p->probe_fd >= 0) {
		/* head 0's keys of chunk j are the first hkb bytes of its K half */
		uint8_t *pb = malloc((size_t)count * p->hkb);
		ssize_t w;
		if (!pb)
			return -ENOMEM;
		for (uint32_t i = 0; i < count; i++)
			memcpy(pb + (size_t)i * p->hkb, (uint8_t *)buf + (size_t)i * g->chunk_bytes, p->hkb);
		w = pwrite(p->probe_fd, pb, (size_t)count * p->hkb,
			   (off_t)(l * p->probe_stride + (uint64_t)first * p->hkb));
		free(pb);
		if (w != (ssize_t)((size_t)count * p->hkb))
			return w < 0 ? -errno : -EIO;
	}
	return 0;
}

/* Build a prefix from a trace (taken): tokens, oracle scores, ranks, directions. */
static int prefix_new(struct model *mo, const char *desc, ckv_trace *tr, struct prefix **out)
{
	struct prefix *p = calloc(1, sizeof(*p));
	const ckv_geom *g = &mo->g;
	uint32_t *ord = NULL;
	uint64_t st;

	if (!p) {
		ckv_trace_free(tr);
		return -ENOMEM;
	}
	p->mo = mo;
	p->tr = tr;
	p->probe_fd = -1;
	snprintf(p->desc, sizeof(p->desc), "%s", desc);
	p->L = g->layers;
	p->n = ckv_trace_tokens(tr);
	p->m = ckv_chunks_for(p->n, g->chunk_tokens);
	p->seed = fnv1a(desc) ^ mix64(fnv1a(mo->info->name));
	p->hkb = (uint64_t)g->chunk_tokens * g->head_dim * ckv_dtype_size(g->dtype);
	p->probe_stride = ((uint64_t)p->m * p->hkb + 4095) & ~4095ull;
	p->tokens = malloc(sizeof(uint32_t) * p->n);
	p->cs = malloc(sizeof(float) * (size_t)p->L * p->m);
	p->rank = malloc(sizeof(uint32_t) * (size_t)p->L * p->m);
	p->tord = malloc(sizeof(uint32_t) * (size_t)p->L * p->n);
	p->dirs = malloc(sizeof(float) * (size_t)p->L * g->kv_heads * g->head_dim);
	ord = malloc(sizeof(uint32_t) * p->m);
	if (!p->tokens || !p->cs || !p->rank || !p->tord || !p->dirs || !ord) {
		free(ord);
		prefix_free(p);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < p->n; i++)
		p->tokens[i] = (uint32_t)(mix64(p->seed * 0x9e3779b97f4a7c15ull ^ mix64(i + 1)) % 151936);
	for (uint32_t l = 0; l < p->L; l++) {
		float *cs = p->cs + (size_t)l * p->m;
		ckv_trace_chunk_scores(tr, l, g->chunk_tokens, cs);
		ckv_trace_topk(cs, p->m, p->m, ord);
		for (uint32_t r = 0; r < p->m; r++)
			p->rank[(size_t)l * p->m + ord[r]] = r;
		ckv_trace_topk(ckv_trace_layer(tr, l), p->n, p->n, p->tord + (size_t)l * p->n);
	}
	st = mix64(p->seed ^ 0xd1a5ull);
	for (size_t v = 0; v < (size_t)p->L * g->kv_heads; v++) {
		float *d = p->dirs + v * g->head_dim, norm = 0;
		for (uint32_t k = 0; k < g->head_dim; k++) {
			st = mix64(st);
			d[k] = (float)((double)(st >> 11) / 9007199254740992.0 - 0.5);
			norm += d[k] * d[k];
		}
		norm = sqrtf(norm);
		for (uint32_t k = 0; k < g->head_dim; k++)
			d[k] /= norm;
	}
	free(ord);
	*out = p;
	return 0;
}

/* Publish a prefix's planted cache (or find it stored) and its IMPRESS probe file. */
static int prefix_generate(struct bench *b, struct prefix *p)
{
	const ckv_geom *g = &p->mo->g;
	ckv_import_result r;
	ckv_manifest *man = NULL;
	ckv_hash h;
	ckv_err e;
	char tmp[PATH_MAX + 8];
	struct stat st;
	bool have_probe;
	int rc;

	{ /* ckv_chain fills every link; the last is the prefix hash */
		ckv_hash *all = malloc(sizeof(ckv_hash) * p->m);
		if (!all)
			return -ENOMEM;
		ckv_chain(g, p->tokens, p->n, all);
		h = all[p->m - 1];
		free(all);
	}
	ckv_hash_hex(&h, p->hash);
	snprintf(p->probe_path, sizeof(p->probe_path), "%s/impress/%s.probe", b->o.workdir, p->hash);
	have_probe = stat(p->probe_path, &st) == 0 && (uint64_t)st.st_size == p->L * p->probe_stride;
	rc = ckv_store_get(b->store, &h, &man, &e);
	if (rc == 0 && have_probe)
		goto found;
	if (man) {
		ckv_manifest_free(man);
		free(man);
		man = NULL;
	}
	snprintf(tmp, sizeof(tmp), "%s.tmp", p->probe_path);
	p->probe_fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (p->probe_fd < 0)
		return fail("%s: %s", tmp, strerror(errno));
	if (ftruncate(p->probe_fd, (off_t)(p->L * p->probe_stride)) < 0) {
		rc = fail("%s: %s", tmp, strerror(errno));
		goto out_close;
	}
	if (rc == 0) {
		/* cache stored, probe file missing: fill again just for the probe keys */
		uint32_t run = 64;
		uint8_t *buf = aligned_alloc(4096, (size_t)run * g->chunk_bytes);
		if (!buf) {
			rc = -ENOMEM;
			goto out_close;
		}
		rc = 0;
		for (uint32_t l = 0; l < p->L && !rc; l++)
			for (uint32_t j = 0; j < p->m && !rc; j += run)
				rc = prefix_fill(p, l, j, p->m - j < run ? p->m - j : run, buf);
		free(buf);
	} else {
		ckv_import_opts io = { 0 };
		rc = ckv_store_publish(b->store, g, p->tokens, p->n, prefix_fill, p, &io, &r, &e);
		if (rc < 0)
			fail("publish %s: %s", p->desc, e.msg);
	}
	if (!rc && fsync(p->probe_fd) < 0)
		rc = -errno;
	close(p->probe_fd);
	p->probe_fd = -1;
	if (!rc && rename(tmp, p->probe_path) < 0)
		rc = -errno;
	if (rc)
		return rc;
	if ((rc = ckv_store_get(b->store, &h, &man, &e)) < 0)
		return fail("%s: %s", p->hash, e.msg);
found:
	if (man->nextents != 1) {
		rc = fail("%s: %u extents: expected a prefix of one segment", p->hash, man->nextents);
	} else {
		char seg[200];
		ckv_segment_path(man->extents[0].segment, seg, sizeof(seg));
		snprintf(p->seg_rel, sizeof(p->seg_rel), "%s", seg);
		p->seg_first = man->extents[0].first;
		rc = 0;
	}
	ckv_manifest_free(man);
	free(man);
	return rc;
out_close:
	close(p->probe_fd);
	p->probe_fd = -1;
	unlink(tmp);
	return rc;
}

struct genq {
	struct bench *b;
	pthread_mutex_t lock;
	uint32_t next;
	int rc;
};

static void *gen_worker(void *arg)
{
	struct genq *q = arg;
	for (;;) {
		uint32_t i;
		int rc;
		pthread_mutex_lock(&q->lock);
		i = q->rc ? q->b->nprefixes : q->next++;
		pthread_mutex_unlock(&q->lock);
		if (i >= q->b->nprefixes)
			break;
		rc = prefix_generate(q->b, q->b->prefixes[i]);
		if (rc) {
			pthread_mutex_lock(&q->lock);
			if (!q->rc)
				q->rc = rc;
			pthread_mutex_unlock(&q->lock);
		}
	}
	return NULL;
}

static int generate_all(struct bench *b)
{
	struct genq q = { .b = b, .lock = PTHREAD_MUTEX_INITIALIZER };
	uint32_t nt = b->o.gen_threads;
	pthread_t th[16];
	double t0 = now_s();
	char dir[PATH_MAX + 16];

	snprintf(dir, sizeof(dir), "%s/impress", b->o.workdir);
	if (mkdir(dir, 0755) < 0 && errno != EEXIST)
		return fail("%s: %s", dir, strerror(errno));
	if (nt > 16)
		nt = 16;
	if (nt > b->nprefixes)
		nt = b->nprefixes ? b->nprefixes : 1;
	ckv_store_set_nosync(b->store, true);
	for (uint32_t i = 0; i < nt; i++)
		if (pthread_create(&th[i], NULL, gen_worker, &q)) {
			nt = i;
			q.rc = -EAGAIN;
			break;
		}
	for (uint32_t i = 0; i < nt; i++)
		pthread_join(th[i], NULL);
	/* sync everything written before anything is timed */
	ckv_store_set_nosync(b->store, false);
	sync();
	say(b, "stores ready: %u prefixes in %.1f s\n", b->nprefixes, now_s() - t0);
	return q.rc;
}

static int add_prefix(struct bench *b, struct prefix *p)
{
	struct prefix **np = realloc(b->prefixes, sizeof(*np) * (b->nprefixes + 1));
	if (!np)
		return -ENOMEM;
	b->prefixes = np;
	b->prefixes[b->nprefixes++] = p;
	return 0;
}

/* ---- selections ------------------------------------------------------------------ */

/* The oracle set of layer l at budget: top chunks of the trace, sink and last kept. */
static uint32_t oracle_set(const struct prefix *p, uint32_t l, double budget, uint32_t *out)
{
	int k = ckv_select_topk(p->cs + (size_t)l * p->m, p->m, budget, out);
	return k < 0 ? 0 : (uint32_t)k;
}

static uint32_t ceil_budget(double budget, uint32_t n)
{
	uint32_t k = (uint32_t)ceil(budget * n - 1e-9);
	return k < 1 ? 1 : k > n ? n : k;
}

/*
 * IMPRESS-style selection of layer l: the top ceil(budget * n) tokens by the
 * trace (its probe heads are granted the true token ranking), then every
 * 64-token block that holds one, plus the first and the last block (sink and
 * recent tokens, as ours keeps chunk 0 and m - 1). Out: the blocks' chunks,
 * ascending. Returns the chunk count; *ktok the tokens selected.
 */
static uint32_t impress_set(const struct prefix *p, uint32_t l, double budget, uint8_t *mark, uint32_t *out,
			    uint32_t *ktok)
{
	uint32_t kt = ceil_budget(budget, p->n), nb = (p->n + 63) / 64, cpb = 64 / p->mo->g.chunk_tokens, cnt = 0;
	const uint32_t *ord = p->tord + (size_t)l * p->n;
	memset(mark, 0, nb);
	for (uint32_t q = 0; q < kt; q++)
		mark[ord[q] / 64] = 1;
	mark[0] = mark[nb - 1] = 1;
	for (uint32_t blk = 0; blk < nb; blk++)
		if (mark[blk])
			for (uint32_t j = blk * cpb; j < (blk + 1) * cpb && j < p->m; j++)
				out[cnt++] = j;
	*ktok = kt;
	return cnt;
}

/* How many chunks ckv_select_topk keeps of m at budget. */
static uint32_t select_count(uint32_t m, double budget)
{
	float *z = calloc(m, sizeof(float));
	uint32_t *o = malloc(sizeof(uint32_t) * m);
	int k = z && o ? ckv_select_topk(z, m, budget, o) : -ENOMEM;
	free(z);
	free(o);
	return k < 0 ? ceil_budget(budget, m) : (uint32_t)k;
}

/* ---- loaders -------------------------------------------------------------------- */

static int loader_open(struct bench *b, uint64_t arena, int policy, ckv_loader **out)
{
	ckv_loader_opts lo = { .backend = b->o.backend, .arena_bytes = arena, .policy = policy };
	int rc = ckv_loader_open(b->store_path, &lo, out);
	if (rc < 0)
		return fail("%s: cannot open the loader: %s", b->store_path, strerror(-rc));
	return 0;
}

/*
 * An arena for one cold run: what the run can pin at once, with room to
 * spare, and no more (the CUDA backend registers all of it at every open).
 * Pins last until the stream has executed a layer's gather, so they span the
 * layers the host runs ahead of the stream: up to the next layer that needs
 * a query (the bench synchronizes there) plus the pipeline's run-ahead. The
 * full load never waits for a query; it is I/O-bound here, so the host stays
 * within its run-ahead and a few layers of the stream.
 */
static uint64_t cold_arena(const struct bench *b, const struct prefix *p, enum sys s, double budget)
{
	const ckv_geom *g = &p->mo->g;
	uint64_t rows = select_count(p->m, budget), per, total = (uint64_t)p->m * g->chunk_bytes * p->L, a;
	uint32_t layers;

	switch (s) {
	case SYS_FULL:
		per = (uint64_t)p->m * g->chunk_bytes;
		layers = b->o.subperiod + 12;
		break;
	case SYS_IMPRESS:
		per = (uint64_t)p->m * (g->chunk_bytes + g->half_bytes);
		layers = 2;
		break;
	case SYS_PERIOD:
		per = rows * g->chunk_bytes;
		layers = b->o.period + b->o.subperiod + 3;
		break;
	case SYS_RERANK:
		per = (select_count(p->m, fmin(1.0, budget * b->o.rerank)) + rows) * g->half_bytes;
		layers = 4;
		break;
	default:
		per = rows * g->chunk_bytes;
		layers = 4;
		break;
	}
	if (layers > p->L)
		layers = p->L;
	a = per * layers + per * layers / 4 + (8ull << 20);
	if (a > total + (16ull << 20))
		a = total + (16ull << 20);
	if (a < (16ull << 20))
		a = 16ull << 20;
	return (a + (2ull << 20) - 1) & ~((2ull << 20) - 1);
}

/*
 * The query of layer l as the pipeline gets it: [kv_heads][head_dim], each
 * row the sum of the query rows of that KV head's group over the suffix.
 * Every query head of a group asks u(l, kvh) (plus the request's noise,
 * shared by the group), so the sum is group x that row. Digest scores are
 * linear in the query, so summing over tokens and a group's heads ranks
 * exactly as the full [q_tokens][q_heads] query would; rerank's key scores
 * take a max per head, which the sum preserves here because a group's rows
 * are equal. It keeps the pipeline's CPU scoring to m x kv_heads x head_dim.
 */
static void make_query(const struct bench *b, const struct prefix *p, uint32_t l, uint64_t req, float *q)
{
	const ckv_geom *g = &p->mo->g;
	uint32_t K = g->kv_heads, D = g->head_dim;
	double grp = (double)p->mo->info->q_heads / K;
	for (uint32_t k = 0; k < K; k++) {
		const float *u = p->dirs + ((size_t)l * K + k) * D;
		for (uint32_t d = 0; d < D; d++) {
			double w = 0;
			if (b->o.query_noise > 0 && req) {
				uint64_t x = mix64(req * 0x632be59bd9b4e019ull ^ ((uint64_t)l << 40) ^ ((uint64_t)k << 20) ^ d);
				double u1 = ((double)(x >> 11) + 0.5) / 9007199254740992.0, u2 = unit01(x ^ 0x77);
				w = sqrt(-2 * log(u1)) * cos(2 * M_PI * u2) / sqrt((double)D);
			}
			q[(size_t)k * D + d] = (float)(grp * (u[d] + b->o.query_noise * w));
		}
	}
}

/* Does layer l of system s need that layer's query (so the layer before must have computed)? */
static bool needs_query(const struct bench *b, enum sys s, uint32_t l)
{
	switch (s) {
	case SYS_FULL:
		return false;
	case SYS_PERIOD:
		return l % b->o.period == 0;
	default:
		return true;
	}
}

static int be_sync(struct bench *b)
{
	return b->be->ops->sync(b->be, NULL);
}

static int be_compute(struct bench *b, double s)
{
	return s > 0 ? b->be->ops->compute(b->be, s, NULL) : 0;
}

/* Feed the trace's chunk mass of the chunks a layer used back for retention. */
static void feedback(const struct prefix *p, ckv_prefix *px, uint32_t l, const uint32_t *chunks, uint32_t n,
		     float *tmp)
{
	for (uint32_t i = 0; i < n; i++)
		tmp[i] = p->cs[(size_t)l * p->m + chunks[i]];
	ckv_score_feedback(px, l, chunks, tmp, n);
}

/*
 * One Re-Prefill of prefix p with one of our pipeline modes (or full load)
 * on loader l. Timed from pipeline open to the end of the last layer's
 * compute on the stream.
 */
static int run_pipeline(struct bench *b, ckv_loader *l, struct prefix *p, enum sys s, double budget, uint64_t req,
			bool warm, struct result *res)
{
	const ckv_geom *g = &p->mo->g;
	ckv_pipeline_opts po = { 0 };
	ckv_pipeline_stats st;
	ckv_pipeline *pl = NULL;
	ckv_prefix *px = NULL;
	uint32_t *orc = malloc(sizeof(uint32_t) * p->m);
	uint8_t *inor = malloc(p->m);
	float *q = malloc(sizeof(float) * g->kv_heads * g->head_dim), *tmp = malloc(sizeof(float) * p->m);
	uint64_t rb0;
	double t0, ov = 0;
	int rc;

	memset(res, 0, sizeof(*res));
	if (!orc || !inor || !q || !tmp) {
		rc = -ENOMEM;
		goto out;
	}
	if ((rc = ckv_prefix_open(l, p->hash, &px)) < 0) {
		fail("prefix %s: %s", p->hash, ckv_loader_error(l));
		goto out;
	}
	po.mode = s == SYS_FULL ? CKV_MODE_FULL : s == SYS_PERIOD ? CKV_MODE_PERIOD : s == SYS_RERANK ? CKV_MODE_RERANK
								    : CKV_MODE_LAYER;
	po.budget = s == SYS_FULL ? 1.0 : budget;
	po.period = b->o.period;
	po.subperiod = b->o.subperiod;
	po.rerank = b->o.rerank;
	po.no_prefetch = s == SYS_NOPREFETCH;
	po.q_heads = g->kv_heads; /* group-summed queries: see make_query */
	po.q_tokens = 1;
	po.stream = NULL;
	rb0 = proc_read_bytes();
	t0 = now_s();
	if ((rc = ckv_pipeline_open(px, &po, &pl)) < 0) {
		fail("pipeline (%s): %s", sys_name[s], ckv_loader_error(l));
		goto out;
	}
	for (uint32_t li = 0; li < p->L; li++) {
		ckv_layer_view v;
		uint32_t no, hit = 0;
		double c, w0;
		double ta;
		if (needs_query(b, s, li)) {
			ta = now_s();
			if (li && (rc = be_sync(b)) < 0) /* the query of layer li exists once li - 1 has computed */
				goto out;
			res->t_sync += now_s() - ta;
			make_query(b, p, li, req, q);
		}
		ckv_pipeline_get_stats(pl, &st);
		w0 = st.wait_s;
		ta = now_s();
		rc = ckv_pipeline_layer(pl, li, s == SYS_FULL ? NULL : q, &v);
		res->t_layer += now_s() - ta;
		if (s != SYS_FULL && needs_query(b, s, li)) {
			res->t_layer_id += now_s() - ta;
			ckv_pipeline_get_stats(pl, &st);
			res->wait_id += st.wait_s - w0;
		}
		if (rc < 0) {
			fail("%s layer %u: %s", sys_name[s], li, ckv_loader_error(l));
			goto out;
		}
		if (s == SYS_FULL) {
			ov += 1;
		} else {
			no = oracle_set(p, li, budget, orc);
			memset(inor, 0, p->m);
			for (uint32_t i = 0; i < no; i++)
				inor[orc[i]] = 1;
			for (uint32_t i = 0; i < v.nchunks; i++)
				hit += v.chunks[i] < p->m && inor[v.chunks[i]];
			ov += no ? (double)hit / no : 1;
		}
		c = compute_layer_s(b, p->mo, v.nchunks * g->chunk_tokens < p->n ? v.nchunks * g->chunk_tokens : p->n);
		if ((rc = be_compute(b, c)) < 0)
			goto out;
		res->compute_s += c;
		if (warm)
			feedback(p, px, li, v.chunks, v.nchunks, tmp);
	}
	{
		double ta = now_s();
		if ((rc = be_sync(b)) < 0)
			goto out;
		res->t_tail = now_s() - ta;
	}
	res->time_s = now_s() - t0;
	res->disk_bytes = proc_read_bytes() - rb0;
	ckv_pipeline_get_stats(pl, &st);
	res->wait_s = st.wait_s;
	res->bytes_kv = st.bytes_k + st.bytes_v;
	res->bytes_meta = st.bytes_digest;
	res->bytes_needed = st.bytes_needed;
	res->hits = st.hits_arena + st.hits_gpu;
	res->misses = st.misses;
	res->spec_used = st.spec_used;
	res->spec_wasted = st.spec_wasted;
	/* PERIOD and LAYER speculate whole chunks; a wasted one was read (cold) and not used */
	res->spec_bytes = s == SYS_PERIOD || s == SYS_LAYER ? st.spec_wasted * g->chunk_bytes : 0;
	res->chunks_used = st.chunks_used;
	res->sel_overlap = ov / p->L;
	res->requests = 1;
out:
	if (pl)
		ckv_pipeline_close(pl);
	if (px)
		ckv_prefix_close(px);
	free(orc);
	free(inor);
	free(q);
	free(tmp);
	return rc;
}

/*
 * One Re-Prefill of prefix p, IMPRESS-style (see the head of this file). Per
 * layer, strictly in sequence: wait for the previous layer's compute (the
 * query), read the probe keys, identify (replayed), read the blocks, compute.
 */
static int run_impress(struct bench *b, ckv_loader *l, struct prefix *p, double budget, uint64_t req, bool warm,
		       struct result *res)
{
	const ckv_geom *g = &p->mo->g;
	ckv_backend *be = b->be;
	ckv_prefix *px = NULL;
	ckv_loader_stats ls0, ls1;
	uint32_t *chunks = malloc(sizeof(uint32_t) * p->m * 2), *all = malloc(sizeof(uint32_t) * p->m);
	uint32_t *cnt = malloc(sizeof(uint32_t) * p->L), *kt = malloc(sizeof(uint32_t) * p->L), maxc = 0;
	uint8_t *mark = malloc((p->n + 63) / 64 + 1);
	float *tmp = malloc(sizeof(float) * p->m * 2);
	void *hprobe = NULL, *dprobe = NULL, *dk = NULL, *dkv = NULL;
	int pfd = -1, rc;
	uint64_t rb0;
	double t0;

	memset(res, 0, sizeof(*res));
	if (!chunks || !all || !cnt || !kt || !mark || !tmp) {
		rc = -ENOMEM;
		goto out;
	}
	for (uint32_t li = 0; li < p->L; li++) {
		cnt[li] = impress_set(p, li, budget, mark, chunks, &kt[li]);
		if (cnt[li] > maxc)
			maxc = cnt[li];
	}
	for (uint32_t j = 0; j < p->m; j++)
		all[j] = j;
	if (posix_memalign(&hprobe, 4096, p->probe_stride)) {
		rc = -ENOMEM;
		goto out;
	}
	if ((rc = be->ops->alloc(be, p->probe_stride, &dprobe)) < 0 ||
	    (rc = be->ops->alloc(be, (uint64_t)p->m * g->half_bytes, &dk)) < 0 ||
	    (rc = be->ops->alloc(be, (uint64_t)maxc * g->chunk_bytes, &dkv)) < 0) {
		fail("impress: cannot allocate %s buffers", be->ops->name);
		goto out;
	}
	/* warm runs read the probe keys through the page cache (IMPRESS would cache them) */
	pfd = open_direct(p->probe_path, !warm);
	if (pfd < 0) {
		rc = fail("%s: %s", p->probe_path, strerror(-pfd));
		goto out;
	}
	if ((rc = ckv_prefix_open(l, p->hash, &px)) < 0) {
		fail("prefix %s: %s", p->hash, ckv_loader_error(l));
		goto out;
	}
	rb0 = proc_read_bytes();
	t0 = now_s();
	for (uint32_t li = 0; li < p->L; li++) {
		ckv_fetch *f;
		bool fb = b->o.impress_fallback > 0 && unit01(mix64(req + 0x1234567) ^ li) < b->o.impress_fallback;
		double ta, tb, tc, c;
		uint32_t nc, ktok;
		if (li && (rc = be_sync(b)) < 0)
			goto out;
		ta = now_s();
		if (!fb) {
			struct rreq rq[64];
			size_t nr = 0;
			for (uint64_t off = 0; off < p->probe_stride && nr < 64; off += RAW_MAX_IO) {
				uint64_t len = p->probe_stride - off < RAW_MAX_IO ? p->probe_stride - off : RAW_MAX_IO;
				rq[nr++] = (struct rreq){ pfd, li * p->probe_stride + off, (uint32_t)len, (char *)hprobe + off };
			}
			if ((rc = rawio_run(&b->io, rq, nr, 64)) < 0) {
				fail("%s: read: %s", p->probe_path, strerror(-rc));
				goto out;
			}
			if ((rc = be->ops->from_host(be, dprobe, hprobe, p->probe_stride)) < 0)
				goto out;
			res->bytes_meta += p->probe_stride;
		} else {
			ckv_loader_get_stats(l, &ls0);
			if ((rc = ckv_fetch_start(px, li, all, p->m, CKV_PART_K, dk, NULL, NULL, &f)) < 0 ||
			    (rc = ckv_fetch_wait(f)) < 0) {
				fail("impress: keys of layer %u: %s", li, ckv_loader_error(l));
				goto out;
			}
			ckv_loader_get_stats(l, &ls1);
			res->bytes_meta += (ls1.bytes_k + ls1.bytes_v) - (ls0.bytes_k + ls0.bytes_v);
			res->fallbacks++;
		}
		tb = now_s();
		res->t_probe += tb - ta;
		c = compute_probe_s(b, p->mo, p->n) * (fb ? p->mo->info->q_heads / 3.0 : 1.0);
		if ((rc = be_compute(b, c)) < 0 || (rc = be_sync(b)) < 0) /* the block list goes back to the host */
			goto out;
		res->compute_s += c;
		tc = now_s();
		res->t_ident += tc - tb;
		nc = impress_set(p, li, budget, mark, chunks, &ktok);
		ckv_loader_get_stats(l, &ls0);
		if ((rc = ckv_fetch_start(px, li, chunks, nc, CKV_PART_KV, dkv, NULL, NULL, &f)) < 0 ||
		    (rc = ckv_fetch_wait(f)) < 0) {
			fail("impress: blocks of layer %u: %s", li, ckv_loader_error(l));
			goto out;
		}
		ckv_loader_get_stats(l, &ls1);
		res->bytes_kv += (ls1.bytes_k + ls1.bytes_v) - (ls0.bytes_k + ls0.bytes_v);
		res->hits += (ls1.hits_arena + ls1.hits_gpu) - (ls0.hits_arena + ls0.hits_gpu);
		res->misses += ls1.misses - ls0.misses;
		res->t_blocks += now_s() - tc;
		res->bytes_needed += (uint64_t)ktok * (2 * g->half_bytes / g->chunk_tokens);
		res->chunks_used += nc;
		c = compute_layer_s(b, p->mo, ktok);
		if ((rc = be_compute(b, c)) < 0)
			goto out;
		res->compute_s += c;
		if (warm)
			feedback(p, px, li, chunks, nc, tmp);
	}
	if ((rc = be_sync(b)) < 0)
		goto out;
	res->time_s = now_s() - t0;
	res->disk_bytes = proc_read_bytes() - rb0;
	{
		/* selection vs the chunk oracle: how much of it the blocks hold */
		double ov = 0;
		uint32_t *orc = all; /* reuse: all[] is no longer needed */
		for (uint32_t li = 0; li < p->L; li++) {
			uint32_t ktok, nc = impress_set(p, li, budget, mark, chunks, &ktok), no = oracle_set(p, li, budget, orc),
				       hit = 0;
			uint8_t *in = (uint8_t *)tmp; /* p->m * 8 bytes of room */
			memset(in, 0, p->m);
			for (uint32_t i = 0; i < nc; i++)
				in[chunks[i]] = 1;
			for (uint32_t i = 0; i < no; i++)
				hit += in[orc[i]];
			ov += no ? (double)hit / no : 1;
		}
		res->sel_overlap = ov / p->L;
	}
	res->requests = 1;
out:
	if (px)
		ckv_prefix_close(px);
	if (pfd >= 0)
		close(pfd);
	if (dprobe)
		be->ops->free(be, dprobe);
	if (dk)
		be->ops->free(be, dk);
	if (dkv)
		be->ops->free(be, dkv);
	free(hprobe);
	free(chunks);
	free(all);
	free(cnt);
	free(kt);
	free(mark);
	free(tmp);
	return rc;
}

/*
 * The bound: max(compute of the oracle selection, raw io_uring O_DIRECT
 * reads of exactly the oracle chunks of every layer, cold). The raw reads
 * run in three shapes and the fastest counts:
 *   0: adjacent chunks merged up to 1 MiB, QD 64, layer after layer, one
 *      scratch buffer (MEASUREMENTS.md's disk table);
 *   1: merged up to 64 chunks (the engine's largest readv), QD 128, layer
 *      after layer;
 *   2: as 1, but the layers' reads interleaved (several files in flight, as
 *      the pipeline's run-ahead has them) into a buffer of their own each.
 */
static int run_bound(struct bench *b, struct prefix *p, double budget, struct result *res)
{
	static const struct { unsigned qd; uint32_t max_chunks; uint64_t max_bytes; bool interleave; } cfg[3] = {
		{ 64, UINT32_MAX, 1u << 20, false },
		{ 128, 64, UINT64_MAX, false },
		{ 128, 64, UINT64_MAX, true },
	};
	const ckv_geom *g = &p->mo->g;
	uint32_t *sel = malloc(sizeof(uint32_t) * p->m), *nsel = calloc(p->L, sizeof(uint32_t));
	uint32_t **sels = calloc(p->L, sizeof(uint32_t *));
	struct rreq *rq = NULL;
	size_t cap = 0;
	int *fds = calloc(p->L, sizeof(int));
	uint64_t bytes = 0;
	double comp = 0, best = INFINITY;
	int best_cfg = 0;
	int rc = 0;

	memset(res, 0, sizeof(*res));
	if (!sel || !nsel || !sels || !fds) {
		rc = -ENOMEM;
		goto out;
	}
	for (uint32_t li = 0; li < p->L; li++)
		fds[li] = -1;
	for (uint32_t li = 0; li < p->L; li++) {
		char path[PATH_MAX + 256], name[32];
		uint32_t k = budget >= 1 ? p->m : oracle_set(p, li, budget, sel);
		if (budget >= 1)
			for (uint32_t j = 0; j < p->m; j++)
				sel[j] = j;
		if (!(sels[li] = malloc(sizeof(uint32_t) * (k ? k : 1)))) {
			rc = -ENOMEM;
			goto out;
		}
		memcpy(sels[li], sel, sizeof(uint32_t) * k);
		nsel[li] = k;
		bytes += (uint64_t)k * g->chunk_bytes;
		ckv_layer_name(li, name);
		snprintf(path, sizeof(path), "%s/%s/%s", b->store_path, p->seg_rel, name);
		if ((fds[li] = open_direct(path, true)) < 0) {
			rc = fail("%s: %s", path, strerror(-fds[li]));
			goto out;
		}
		comp += compute_layer_s(b, p->mo, (k * g->chunk_tokens < p->n ? k * g->chunk_tokens : p->n));
	}
	for (int c = 0; c < 3; c++) {
		uint64_t maxlen = (uint64_t)(cfg[c].max_chunks == UINT32_MAX ? cfg[c].max_bytes / g->chunk_bytes : cfg[c].max_chunks);
		size_t nr = 0;
		double t0, t;
		if (maxlen < 1)
			maxlen = 1;
		maxlen *= g->chunk_bytes;
		if (!cfg[c].interleave && maxlen > RAW_SCRATCH)
			maxlen = RAW_SCRATCH;
		if (cfg[c].interleave && rawio_slots(&b->io, maxlen) < 0) {
			rc = -ENOMEM;
			goto out;
		}
		for (uint32_t li = 0; li < p->L; li++) {
			const uint32_t *S = sels[li];
			uint32_t k = nsel[li];
			for (uint32_t i = 0; i < k;) {
				uint32_t e = i + 1;
				while (e < k && S[e] == S[e - 1] + 1 && (uint64_t)(e - i + 1) * g->chunk_bytes <= maxlen)
					e++;
				if (nr == cap) {
					struct rreq *n2 = realloc(rq, sizeof(*rq) * (cap = cap ? cap * 2 : 1024));
					if (!n2) {
						rc = -ENOMEM;
						goto out;
					}
					rq = n2;
				}
				/* the data is never looked at: requests may share scratch memory */
				rq[nr] = (struct rreq){ fds[li], (uint64_t)(p->seg_first + S[i]) * g->chunk_bytes,
							(uint32_t)((uint64_t)(e - i) * g->chunk_bytes),
							(char *)b->io.scratch + (nr % (RAW_SCRATCH / maxlen)) * maxlen };
				nr++;
				i = e;
			}
		}
		if (cfg[c].interleave) {
			/* round-robin over the layers' request runs, each read into a slot of its own */
			struct rreq *iv = malloc(sizeof(*iv) * (nr ? nr : 1));
			size_t *pos = calloc(p->L + 1, sizeof(size_t)), w = 0;
			if (!iv || !pos) {
				free(iv);
				free(pos);
				rc = -ENOMEM;
				goto out;
			}
			for (uint32_t li = 0; li < p->L; li++) { /* the first request of each layer */
				size_t i = 0;
				while (i < nr && rq[i].fd != fds[li])
					i++;
				pos[li] = i;
			}
			pos[p->L] = nr;
			for (bool more = true; more;) {
				more = false;
				for (uint32_t li = 0; li < p->L; li++)
					if (pos[li] < nr && rq[pos[li]].fd == fds[li]) {
						iv[w] = rq[pos[li]++];
						iv[w].dst = (char *)b->io.slots + (w % RAW_RING) * b->io.slot_bytes;
						w++;
						more = true;
					}
			}
			memcpy(rq, iv, sizeof(*rq) * nr);
			free(iv);
			free(pos);
		}
		drop_caches(b);
		t0 = now_s();
		if ((rc = rawio_run(&b->io, rq, nr, cfg[c].qd)) < 0) {
			fail("raw reads: %s", strerror(-rc));
			goto out;
		}
		t = now_s() - t0;
		if (t < best) {
			best = t;
			best_cfg = c;
		}
	}
	res->raw_cfg = best_cfg;
	res->raw_s = best;
	res->raw_bw = bytes / best;
	res->compute_s = comp;
	res->time_s = fmax(comp, best);
	res->bytes_kv = res->bytes_needed = bytes;
	res->sel_overlap = 1;
	res->requests = 1;
out:
	if (fds)
		for (uint32_t li = 0; li < p->L; li++)
			if (fds[li] >= 0)
				close(fds[li]);
	if (sels)
		for (uint32_t li = 0; li < p->L; li++)
			free(sels[li]);
	free(sels);
	free(nsel);
	free(fds);
	free(sel);
	free(rq);
	return rc;
}

/*
 * After a timed PERIOD run: the digests of its identifying layers read cold
 * and scored, alone, through the same loader (how much of identification is
 * digest I/O and scoring rather than reconciling, issuing and gathering).
 */
static int digest_diag(struct bench *b, ckv_loader *l, struct prefix *p, struct result *res)
{
	const ckv_geom *g = &p->mo->g;
	float *q = malloc(sizeof(float) * g->kv_heads * g->head_dim), *sc = malloc(sizeof(float) * p->m);
	ckv_prefix *px = NULL;
	int rc;
	if (!q || !sc) {
		rc = -ENOMEM;
		goto out;
	}
	if ((rc = ckv_prefix_open(l, p->hash, &px)) < 0)
		goto out;
	drop_caches(b);
	for (uint32_t li = 0; li < p->L; li += b->o.period) {
		double t0 = now_s();
		make_query(b, p, li, 0, q);
		if ((rc = ckv_digest_scores(px, li, q, 1, g->kv_heads, sc)) < 0) {
			fail("digest scores of layer %u: %s", li, ckv_loader_error(l));
			goto out;
		}
		res->t_digest += now_s() - t0;
	}
out:
	if (px)
		ckv_prefix_close(px);
	free(q);
	free(sc);
	return rc;
}

/* A cold run: fresh loader (fresh arena), page cache dropped. */
static int run_cold(struct bench *b, struct prefix *p, enum sys s, double budget, uint64_t req, struct result *res)
{
	ckv_loader *l;
	int rc;
	if ((rc = loader_open(b, cold_arena(b, p, s, budget), 0, &l)) < 0)
		return rc;
	drop_caches(b);
	if (s == SYS_IMPRESS)
		rc = run_impress(b, l, p, budget, req, false, res);
	else
		rc = run_pipeline(b, l, p, s, budget, req, false, res);
	if (rc == 0 && s == SYS_PERIOD)
		rc = digest_diag(b, l, p, res);
	ckv_loader_close(l);
	return rc;
}

static int cmp_time(const void *a, const void *b)
{
	const struct result *x = a, *y = b;
	return x->time_s < y->time_s ? -1 : x->time_s > y->time_s;
}

/* `reps` cold runs (bound: raw reads), the median by time. */
static int run_median(struct bench *b, struct prefix *p, int s, double budget, struct result *res)
{
	struct result r[16];
	uint32_t reps = b->o.reps > 16 ? 16 : b->o.reps;
	int rc;
	for (uint32_t i = 0; i < reps; i++) {
		rc = s == SYS_N ? run_bound(b, p, budget, &r[i]) : run_cold(b, p, (enum sys)s, budget, 0, &r[i]);
		if (rc < 0)
			return rc;
	}
	qsort(r, reps, sizeof(r[0]), cmp_time);
	*res = r[reps / 2];
	return 0;
}

/* ---- output ----------------------------------------------------------------------- */

static json_t *result_json(const char *scenario, const struct prefix *p, const char *model, uint32_t tokens,
			   double budget, const char *sys, const struct result *r)
{
	const ckv_geom *g = p ? &p->mo->g : NULL;
	json_t *o = json_pack("{s:s, s:s, s:i, s:f, s:s, s:f, s:f, s:f, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:i,"
			      " s:f, s:f, s:f, s:f, s:f, s:i}",
			      "scenario", scenario, "model", model, "tokens", (int)tokens, "budget", budget, "system", sys,
			      "time_s", r->time_s, "compute_s", r->compute_s, "wait_s", r->wait_s,
			      "bytes_kv", (json_int_t)r->bytes_kv, "bytes_meta", (json_int_t)r->bytes_meta,
			      "bytes_needed", (json_int_t)r->bytes_needed, "disk_bytes", (json_int_t)r->disk_bytes,
			      "hits", (json_int_t)r->hits, "misses", (json_int_t)r->misses,
			      "spec_used", (json_int_t)r->spec_used, "spec_wasted", (json_int_t)r->spec_wasted,
			      "chunks_used", (json_int_t)r->chunks_used, "sel_overlap", r->sel_overlap,
			      "fallbacks", (int)r->fallbacks, "t_probe", r->t_probe, "t_ident", r->t_ident,
			      "t_blocks", r->t_blocks, "raw_s", r->raw_s, "raw_bw", r->raw_bw, "requests", (int)r->requests);
	if (o) {
		json_object_set_new(o, "t_sync", json_real(r->t_sync));
		json_object_set_new(o, "t_layer", json_real(r->t_layer));
		json_object_set_new(o, "t_tail", json_real(r->t_tail));
		json_object_set_new(o, "raw_cfg", json_integer(r->raw_cfg));
		json_object_set_new(o, "t_layer_id", json_real(r->t_layer_id));
		json_object_set_new(o, "wait_id", json_real(r->wait_id));
		json_object_set_new(o, "t_digest", json_real(r->t_digest));
	}
	if (o)
		json_object_set_new(o, "spec_bytes", json_integer((json_int_t)r->spec_bytes));
	if (o && g) {
		json_object_set_new(o, "chunk_bytes", json_integer((json_int_t)g->chunk_bytes));
		json_object_set_new(o, "half_bytes", json_integer((json_int_t)g->half_bytes));
		json_object_set_new(o, "layers", json_integer(g->layers));
		json_object_set_new(o, "chunks", json_integer(p->m));
	}
	return o;
}

static void emit_json(struct bench *b)
{
	if (b->o.json_path && json_dump_file(b->out, b->o.json_path, JSON_INDENT(1)) < 0)
		say(b, "%s: cannot write %s\n", prog, b->o.json_path);
}

/* Print to stdout and the markdown file. */
static void md(struct bench *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void md(struct bench *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	if (b->md) {
		va_start(ap, fmt);
		vfprintf(b->md, fmt, ap);
		va_end(ap);
		fflush(b->md);
	}
	fflush(stdout);
}

static const char *sys_label(int s)
{
	static const char *const l[SYS_N + 1] = { "full load", "IMPRESS-style", "ours, no prefetch", "ours, period",
						  "ours, layer", "ours, rerank", "bound" };
	return l[s];
}

static void row_md(struct bench *b, const char *budget, int s, const struct result *r, const struct result *full,
		   const struct result *imp, const struct result *bound)
{
	char vf[16] = "", vi[16] = "", vb[16] = "", amp[32] = "", hit[16] = "", ov[16] = "";
	double tot = r->time_s;
	if (full && full->time_s > 0)
		snprintf(vf, sizeof(vf), "%.2f×", full->time_s / tot);
	if (imp && imp->time_s > 0)
		snprintf(vi, sizeof(vi), "%.2f×", imp->time_s / tot);
	if (bound && bound->time_s > 0)
		snprintf(vb, sizeof(vb), "%.2f", tot / bound->time_s);
	if (r->bytes_needed && r->spec_bytes && s != SYS_RERANK)
		snprintf(amp, sizeof(amp), "%.3f / %.3f", (double)(r->bytes_kv - r->spec_bytes) / r->bytes_needed,
			 (double)r->bytes_kv / r->bytes_needed);
	else if (r->bytes_needed)
		snprintf(amp, sizeof(amp), "%.3f", (double)r->bytes_kv / r->bytes_needed);
	if (r->hits + r->misses)
		snprintf(hit, sizeof(hit), "%.1f", 100.0 * r->hits / (r->hits + r->misses));
	if (s != SYS_N && s != SYS_FULL)
		snprintf(ov, sizeof(ov), "%.3f", r->sel_overlap);
	md(b, "| %s | %s | %.2f | %s | %s | %s | %.1f + %.1f | %s | %.0f | %s | %s |\n", budget, sys_label(s),
	   tot * 1e3, vf, vi, vb, r->bytes_kv / 1e6, r->bytes_meta / 1e6, amp,
	   s == SYS_N ? 0.0 : 100.0 * fmax(0, 1 - r->compute_s / tot), ov, hit);
}

static void table_head(struct bench *b)
{
	md(b, "| budget | system | Re-Prefill ms | × vs full | × vs IMPRESS | ÷ bound | MB read (KV + meta) | read amp (KV)¹ | bubble %% | sel. vs oracle | hit %% |\n");
	md(b, "|---|---|---|---|---|---|---|---|---|---|---|\n");
}

/* ---- scenarios -------------------------------------------------------------------- */

/* Results of one (prefix set, budget) kept for the breakdown and targets. */
struct cell {
	bool have[SYS_N + 1];
	struct result r[SYS_N + 1];
	uint32_t layers;
};

static void add_results(struct result *acc, const struct result *r, uint32_t n)
{
	/* mean of n runs (times, bytes) */
	acc->time_s += r->time_s / n;
	acc->compute_s += r->compute_s / n;
	acc->wait_s += r->wait_s / n;
	acc->bytes_kv += r->bytes_kv / n;
	acc->bytes_meta += r->bytes_meta / n;
	acc->bytes_needed += r->bytes_needed / n;
	acc->disk_bytes += r->disk_bytes / n;
	acc->hits += r->hits;
	acc->misses += r->misses;
	acc->spec_used += r->spec_used;
	acc->spec_wasted += r->spec_wasted;
	acc->spec_bytes += r->spec_bytes / n;
	acc->chunks_used += r->chunks_used / n;
	acc->sel_overlap += r->sel_overlap / n;
	acc->fallbacks += r->fallbacks;
	acc->t_probe += r->t_probe / n;
	acc->t_ident += r->t_ident / n;
	acc->t_blocks += r->t_blocks / n;
	acc->t_sync += r->t_sync / n;
	acc->t_layer += r->t_layer / n;
	acc->t_tail += r->t_tail / n;
	acc->t_layer_id += r->t_layer_id / n;
	acc->wait_id += r->wait_id / n;
	acc->t_digest += r->t_digest / n;
	acc->raw_s += r->raw_s / n;
	acc->raw_bw += r->raw_bw / n;
	acc->requests += r->requests;
}

static void breakdown(struct bench *b, const char *what, const struct cell *c)
{
	const struct result *im = &c->r[SYS_IMPRESS], *pe = &c->r[SYS_PERIOD], *bd = &c->r[SYS_N];
	if (c->have[SYS_IMPRESS])
		md(b, "- %s IMPRESS-style: %.2f ms = probe-key reads %.2f + identification %.2f + block reads %.2f + "
		      "the rest (layer compute not overlapped, copies) %.2f; %u fallbacks to all heads\n",
		   what, im->time_s * 1e3, im->t_probe * 1e3, im->t_ident * 1e3, im->t_blocks * 1e3,
		   (im->time_s - im->t_probe - im->t_ident - im->t_blocks) * 1e3, im->fallbacks);
	if (c->have[SYS_PERIOD])
		md(b, "- %s ours (period): %.2f ms = in ckv_pipeline_layer at the %u identifying layers %.2f (blocked on "
		      "reads %.2f, the rest %.2f; their digests read cold and scored alone take %.2f) + at the other layers "
		      "%.2f (blocked on reads %.2f, issue and gather %.2f) + waiting for the previous layer's compute before "
		      "an identification %.2f + the stream's tail after the last layer %.2f + the rest %.2f; replayed "
		      "compute %.2f in all; KV read %.1f MB for %.1f MB needed (speculative chunks used %" PRIu64
		      ", wasted %" PRIu64 "), digests %.2f MB\n",
		   what, pe->time_s * 1e3, (c->layers + b->o.period - 1) / b->o.period, pe->t_layer_id * 1e3,
		   pe->wait_id * 1e3, (pe->t_layer_id - pe->wait_id) * 1e3, pe->t_digest * 1e3,
		   (pe->t_layer - pe->t_layer_id) * 1e3, (pe->wait_s - pe->wait_id) * 1e3,
		   (pe->t_layer - pe->t_layer_id - pe->wait_s + pe->wait_id) * 1e3, pe->t_sync * 1e3, pe->t_tail * 1e3,
		   (pe->time_s - pe->t_layer - pe->t_sync - pe->t_tail) * 1e3, pe->compute_s * 1e3, pe->bytes_kv / 1e6,
		   pe->bytes_needed / 1e6, pe->spec_used, pe->spec_wasted, pe->bytes_meta / 1e6);
	if (c->have[SYS_N])
		md(b, "- %s bound: compute %.2f ms, raw reads %.2f ms (%.0f MB/s, read shape %d of run_bound)\n", what,
		   bd->compute_s * 1e3, bd->raw_s * 1e3, bd->raw_bw / 1e6, bd->raw_cfg);
}

/* Run every system and budget on a set of prefixes of one model (averaged), print one table. */
static int scenario_table(struct bench *b, const char *scenario, const char *title, struct prefix **ps, uint32_t np,
			  struct cell *cells_out)
{
	struct model *mo = ps[0]->mo;
	struct result full = { 0 }, fullb = { 0 };
	bool have_full = false;
	int rc;

	md(b, "\n### %s\n\n", title);
	table_head(b);
	if (b->o.sys_on[SYS_FULL]) {
		for (uint32_t i = 0; i < np; i++) {
			struct result r, rb;
			if ((rc = run_median(b, ps[i], SYS_FULL, 1.0, &r)) < 0 || (rc = run_median(b, ps[i], SYS_N, 1.0, &rb)) < 0)
				return rc;
			add_results(&full, &r, np);
			add_results(&fullb, &rb, np);
			json_array_append_new(json_object_get(b->out, "runs"),
					      result_json(scenario, ps[i], mo->info->name, ps[i]->n, 1.0, "full", &r));
			json_array_append_new(json_object_get(b->out, "runs"),
					      result_json(scenario, ps[i], mo->info->name, ps[i]->n, 1.0, "bound", &rb));
		}
		have_full = true;
		row_md(b, "all", SYS_FULL, &full, NULL, NULL, &fullb);
		row_md(b, "all", SYS_N, &fullb, &full, NULL, NULL);
		emit_json(b);
	}
	for (uint32_t bi = 0; bi < b->o.nbudgets; bi++) {
		double bu = b->o.budgets[bi];
		struct cell c;
		char bs[16];
		memset(&c, 0, sizeof(c));
		c.layers = ps[0]->L;
		snprintf(bs, sizeof(bs), "%g%%", bu * 100);
		for (int s = SYS_IMPRESS; s <= SYS_N; s++) {
			if (s < SYS_N && !b->o.sys_on[s])
				continue;
			for (uint32_t i = 0; i < np; i++) {
				struct result r;
				say(b, "[%6.1f s] %s %s %u tokens, budget %g: %s%s\n", now_s() - b->t_start, scenario,
				    mo->info->name, ps[i]->n, bu, s == SYS_N ? "bound" : sys_name[s],
				    np > 1 ? " (one of several prefixes)" : "");
				if ((rc = run_median(b, ps[i], s, bu, &r)) < 0)
					return rc;
				add_results(&c.r[s], &r, np);
				json_array_append_new(json_object_get(b->out, "runs"),
						      result_json(scenario, ps[i], mo->info->name, ps[i]->n, bu,
								  s == SYS_N ? "bound" : sys_name[s], &r));
			}
			c.have[s] = true;
			emit_json(b);
		}
		for (int s = SYS_IMPRESS; s <= SYS_N; s++)
			if (c.have[s])
				row_md(b, bs, s, &c.r[s], have_full ? &full : NULL, c.have[SYS_IMPRESS] ? &c.r[SYS_IMPRESS] : NULL,
				       s == SYS_N ? NULL : &c.r[SYS_N]);
		if (cells_out)
			cells_out[bi] = c;
	}
	return 0;
}

static const char *fmt_tokens(uint32_t n, char *buf, size_t len)
{
	if (n % 1024 == 0)
		snprintf(buf, len, "%uK", n / 1024);
	else
		snprintf(buf, len, "%u", n);
	return buf;
}

static int scenario_cold(struct bench *b, struct prefix ***by_cfg, struct cell **cells)
{
	int rc;
	md(b, "\n## Cold: synthetic importance (docs/TRACES.md), fresh arena, page cache dropped\n");
	for (uint32_t mi = 0; mi < b->o.nmodels; mi++)
		for (uint32_t ti = 0; ti < b->o.ntokens; ti++) {
			struct prefix *p = by_cfg[mi][ti];
			char title[256], tk[16];
			snprintf(title, sizeof(title), "%s shapes, %s-token prefix, suffix %u", p->mo->info->name,
				 fmt_tokens(p->n, tk, sizeof(tk)), b->o.suffix);
			if ((rc = scenario_table(b, "cold", title, &p, 1, cells[mi * MAXL + ti])) < 0)
				return rc;
		}
	return 0;
}

static int scenario_real(struct bench *b, struct prefix **ps, uint32_t per_model)
{
	int rc;
	md(b, "\n## Real traces: %s, each window as it is (%u tokens, 12 layers stretched to the model's), cold\n",
	   b->o.trace_path, ckv_trace_tokens(ps[0]->tr));
	for (uint32_t mi = 0; mi < b->o.nreal_models; mi++) {
		char title[256];
		snprintf(title, sizeof(title), "%s shapes, real trace windows 0..%u (mean)", ps[mi * per_model]->mo->info->name,
			 per_model - 1);
		if ((rc = scenario_table(b, "real", title, ps + mi * per_model, per_model, NULL)) < 0)
			return rc;
	}
	return 0;
}

/* Warm: Zipf requests over prefixes with an arena below the working set. */
static int scenario_warm(struct bench *b, struct prefix **ps, uint32_t np)
{
	struct { int sys; int policy; const char *label; } runs[] = {
		{ SYS_PERIOD, 0, "ours, period, attention-guided retention" },
		{ SYS_PERIOD, 1, "ours, period, LRU" },
		{ SYS_IMPRESS, 0, "IMPRESS-style, score-based cache" },
		{ SYS_FULL, 1, "full load, LRU" },
	};
	struct result res[4];
	uint32_t *seq = malloc(sizeof(uint32_t) * b->o.warm_requests);
	double *cdf = malloc(sizeof(double) * np), z = 0;
	uint64_t ws = 0, arena;
	const ckv_geom *g = &ps[0]->mo->g;
	int rc = 0;

	if (!seq || !cdf) {
		free(seq);
		free(cdf);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < np; i++) {
		z += 1.0 / pow(i + 1, b->o.warm_zipf);
		cdf[i] = z;
	}
	for (uint32_t r = 0; r < b->o.warm_requests; r++) {
		double u = unit01(0xabcdefull + r) * z;
		uint32_t i = 0;
		while (i + 1 < np && cdf[i] < u)
			i++;
		seq[r] = i;
	}
	/* working set: what the requests' selections touch, summed over distinct prefixes */
	for (uint32_t i = 0; i < np; i++) {
		bool used = false;
		for (uint32_t r = 0; r < b->o.warm_requests && !used; r++)
			used = seq[r] == i;
		if (used)
			ws += (uint64_t)select_count(ps[i]->m, b->o.warm_budget) * g->chunk_bytes * ps[i]->L;
	}
	arena = (uint64_t)(ws * b->o.warm_arena_frac);
	arena = (arena + (2ull << 20) - 1) & ~((2ull << 20) - 1);
	if (arena < (4ull << 20))
		arena = 4ull << 20;
	md(b, "\n## Warm: %u requests, Zipf(%.2f) over %u prefixes of %s shapes, %u tokens, budget %g%%; "
	      "arena %.0f MiB = %.0f%% of the working set (%.0f MiB)\n\n",
	   b->o.warm_requests, b->o.warm_zipf, np, ps[0]->mo->info->name, ps[0]->n, b->o.warm_budget * 100,
	   arena / 1048576.0, 100.0 * arena / ws, ws / 1048576.0);
	md(b, "| system | mean Re-Prefill ms | × vs full | × vs IMPRESS | MB read per request (KV + meta) | hit %% | bubble %% |\n");
	md(b, "|---|---|---|---|---|---|---|\n");
	for (size_t k = 0; k < sizeof(runs) / sizeof(runs[0]); k++) {
		ckv_loader *l;
		memset(&res[k], 0, sizeof(res[k]));
		if (!b->o.sys_on[runs[k].sys])
			continue;
		say(b, "[%6.1f s] warm: %s\n", now_s() - b->t_start, runs[k].label);
		/* the full load needs a layer's worth of pins whatever the arena */
		if ((rc = loader_open(b, runs[k].sys == SYS_FULL ? arena + cold_arena(b, ps[0], SYS_FULL, 1) : arena,
				      runs[k].policy, &l)) < 0)
			goto out;
		drop_caches(b);
		for (uint32_t r = 0; r < b->o.warm_requests; r++) {
			struct result one;
			struct prefix *p = ps[seq[r]];
			rc = runs[k].sys == SYS_IMPRESS ? run_impress(b, l, p, b->o.warm_budget, r + 1, true, &one)
							: run_pipeline(b, l, p, (enum sys)runs[k].sys,
								       runs[k].sys == SYS_FULL ? 1.0 : b->o.warm_budget, r + 1,
								       true, &one);
			if (rc < 0) {
				ckv_loader_close(l);
				goto out;
			}
			add_results(&res[k], &one, b->o.warm_requests);
		}
		ckv_loader_close(l);
		{
			json_t *j = result_json("warm", ps[0], ps[0]->mo->info->name, ps[0]->n, b->o.warm_budget,
						sys_name[runs[k].sys], &res[k]);
			json_object_set_new(j, "policy", json_string(runs[k].policy ? "lru" : "attention"));
			json_object_set_new(j, "arena_bytes", json_integer((json_int_t)arena));
			json_array_append_new(json_object_get(b->out, "runs"), j);
			emit_json(b);
		}
	}
	for (size_t k = 0; k < sizeof(runs) / sizeof(runs[0]); k++) {
		const struct result *r = &res[k], *fu = &res[3], *im = &res[2];
		char vf[16] = "", vi[16] = "", hit[16] = "";
		if (!r->requests)
			continue;
		if (fu->requests)
			snprintf(vf, sizeof(vf), "%.2f×", fu->time_s / r->time_s);
		if (im->requests)
			snprintf(vi, sizeof(vi), "%.2f×", im->time_s / r->time_s);
		if (r->hits + r->misses)
			snprintf(hit, sizeof(hit), "%.1f", 100.0 * r->hits / (r->hits + r->misses));
		md(b, "| %s | %.2f | %s | %s | %.2f + %.2f | %s | %.0f |\n", runs[k].label, r->time_s * 1e3, vf, vi,
		   r->bytes_kv / 1e6, r->bytes_meta / 1e6, hit, 100.0 * fmax(0, 1 - r->compute_s / r->time_s));
	}
out:
	free(seq);
	free(cdf);
	return rc;
}

/* Trace statistics: the real trace beside the synthetic generator's. */
static int scenario_stats(struct bench *b, struct prefix **cold, uint32_t ncold)
{
	ckv_trace *real[64], *syn[8];
	ckv_trace_stats st[8];
	const ckv_trace_stats *sp[8];
	const char *names[8];
	char nbuf[8][96];
	uint32_t nreal = 0, ncol = 0, w, L, n;
	ckv_trace_synth_opts so;
	char err[512];
	int rc = 0;

	md(b, "\n## Importance traces: real against synthetic\n\n");
	if (b->o.trace_path && ckv_trace_file_dims(b->o.trace_path, &w, &L, &n, err, sizeof(err)) == 0) {
		for (uint32_t i = 0; i < w && i < 64; i++) {
			if ((rc = ckv_trace_load(b->o.trace_path, 0, 0, 0, i, &real[nreal], err, sizeof(err))) < 0) {
				fail("%s", err);
				goto out;
			}
			nreal++;
		}
		if ((rc = ckv_trace_stats_compute(real, nreal, 16, 4, &st[ncol])) < 0)
			goto out;
		snprintf(nbuf[ncol], sizeof(nbuf[ncol]), "real (%s)", strrchr(b->o.trace_path, '/') ? strrchr(b->o.trace_path, '/') + 1 : b->o.trace_path);
		ncol++;
	} else {
		L = 12;
		n = 3840;
	}
	ckv_trace_synth_defaults(&so);
	so.layers = L;
	so.tokens = n;
	for (uint32_t i = 0; i < 8; i++) {
		so.seed = i + 1;
		if ((rc = ckv_trace_synth(&so, &syn[i])) < 0)
			goto out_syn;
	}
	rc = ckv_trace_stats_compute(syn, 8, 16, 4, &st[ncol]);
	snprintf(nbuf[ncol], sizeof(nbuf[ncol]), "synthetic, same shape");
	ncol++;
	for (uint32_t i = 0; i < 8; i++)
		ckv_trace_free(syn[i]);
	if (rc < 0)
		goto out;
	for (uint32_t i = 0; i < ncold && ncol < 6; i++) {
		ckv_trace *t = cold[i]->tr;
		char tk[16];
		if ((rc = ckv_trace_stats_compute(&t, 1, 16, b->o.period, &st[ncol])) < 0)
			goto out;
		snprintf(nbuf[ncol], sizeof(nbuf[ncol]), "synthetic, %u layers x %s", cold[i]->L,
			 fmt_tokens(cold[i]->n, tk, sizeof(tk)));
		ncol++;
	}
	for (uint32_t i = 0; i < ncol; i++) {
		sp[i] = &st[i];
		names[i] = nbuf[i];
	}
	ckv_trace_stats_print(sp, names, ncol, stdout);
	if (b->md)
		ckv_trace_stats_print(sp, names, ncol, b->md);
	md(b, "\nSynthetic parameters: sigma %.2f, spatial %.2f, layer_rho %.3f, token_sigma %.2f, sink %.3f, "
	      "recent %.3f over %u tokens (docs/TRACES.md).\n",
	   so.sigma, so.spatial, so.layer_rho, so.token_sigma, so.sink, so.recent, so.recent_tokens);
	goto out;
out_syn:
	for (uint32_t i = 0; i < 8 && syn[i]; i++)
		ckv_trace_free(syn[i]);
out:
	for (uint32_t i = 0; i < nreal; i++)
		ckv_trace_free(real[i]);
	return rc;
}

/* The targets of docs/BENCHMARKS.md, judged on the cold cells; breakdowns where missed. */
static void targets(struct bench *b, struct prefix ***by_cfg, struct cell **cells)
{
	bool any = false;
	double worst_amp = 0, worst_chunk = 0;
	md(b, "\n## Targets\n\n");
	for (uint32_t mi = 0; mi < b->o.nmodels; mi++)
		for (uint32_t ti = 0; ti < b->o.ntokens; ti++)
			for (uint32_t bi = 0; bi < b->o.nbudgets; bi++) {
				const struct cell *c = &cells[mi * MAXL + ti][bi];
				const struct prefix *p = by_cfg[mi][ti];
				char what[128], tk[16];
				bool is7 = !strcmp(p->mo->info->name, "qwen2.5-7b") && fabs(b->o.budgets[bi] - 0.05) < 1e-9;
				for (int s = SYS_NOPREFETCH; s <= SYS_LAYER; s++) {
					const struct result *r = &c->r[s];
					if (!c->have[s] || !r->bytes_needed)
						continue;
					worst_chunk = fmax(worst_chunk, (double)(r->bytes_kv - r->spec_bytes) / r->bytes_needed);
					if (s == SYS_PERIOD)
						worst_amp = fmax(worst_amp, (double)r->bytes_kv / r->bytes_needed);
				}
				if (!is7)
					continue;
				snprintf(what, sizeof(what), "%s, %s tokens, 5%%:", p->mo->info->name, fmt_tokens(p->n, tk, sizeof(tk)));
				if (c->have[SYS_PERIOD] && c->have[SYS_IMPRESS]) {
					double sp = c->r[SYS_IMPRESS].time_s / c->r[SYS_PERIOD].time_s, best = sp;
					int bs = SYS_PERIOD;
					for (int s = SYS_NOPREFETCH; s <= SYS_RERANK; s++)
						if (c->have[s] && c->r[SYS_IMPRESS].time_s / c->r[s].time_s > best) {
							best = c->r[SYS_IMPRESS].time_s / c->r[s].time_s;
							bs = s;
						}
					md(b, "- %s speedup of ours (period) over IMPRESS-style %.2f× (target ≥ 3.85×: %s); best mode %s %.2f×\n",
					   what, sp, sp >= 3.85 ? "met" : "MISSED", sys_name[bs], best);
					any = true;
				}
				if (c->have[SYS_PERIOD] && c->have[SYS_N]) {
					double r = c->r[SYS_PERIOD].time_s / c->r[SYS_N].time_s;
					md(b, "- %s ours (period) at %.2f× the bound (target ≤ 1.25: %s)\n", what, r,
					   r <= 1.25 ? "met" : "MISSED");
				}
				breakdown(b, what, c);
			}
	if (worst_chunk > 0)
		md(b, "- read amplification of ours at chunk granularity (no prefetch, period, layer; wasted speculation "
		      "left out), worst over every cold cell: %.3f (target ≤ 1.02: %s)\n",
		   worst_chunk, worst_chunk <= 1.02 ? "met" : "MISSED");
	if (worst_amp > 0)
		md(b, "- read amplification of ours (period) counting wasted inter-period speculation, worst over every "
		      "cold cell: %.3f (target ≤ 1.02: %s)\n",
		   worst_amp, worst_amp <= 1.02 ? "met" : "MISSED");
	if (!any)
		md(b, "- (no qwen2.5-7b cell at 5%% with both period and IMPRESS in this run)\n");
}

/* ---- options ---------------------------------------------------------------------- */

static void usage(void)
{
	printf("usage: %s [options] WORKDIR\n\n"
	       "The Re-Prefill benchmark: full load, IMPRESS-style, ours (no prefetch, period, layer,\n"
	       "rerank) and the bound, side by side on one store (WORKDIR/store, created and reused).\n\n"
	       "  -m, --models LIST      qwen2.5-* presets (default qwen2.5-0.5b,qwen2.5-7b,qwen2.5-14b)\n"
	       "  -n, --tokens LIST      prefix lengths (default 4096,16384,32768)\n"
	       "  -b, --budgets LIST     fractions of chunks (default 0.05,0.10,0.25,0.50)\n"
	       "  -s, --systems LIST     full,impress,noprefetch,period,layer,rerank (default all)\n"
	       "  --scenarios LIST       cold,real,warm,stats (default all; real needs --trace)\n"
	       "  --compute FILE         per-layer compute table from tools/measure_compute.py\n"
	       "                         (default: a FLOP model at --flops, for CPU runs)\n"
	       "  --flops X              FLOP/s of the model without a table (default 4e14)\n"
	       "  --trace FILE           a real trace, float32 [window][layer][token] (docs/TRACES.md)\n"
	       "  --real-models LIST     models of the real-trace scenario (default qwen2.5-7b)\n"
	       "  --real-windows N       trace windows used (default all)\n"
	       "  --suffix N             new tokens (default 256; must match the compute table)\n"
	       "  --backend auto|host|cuda\n"
	       "  --reps N               cold repetitions, the median is kept (default 1)\n"
	       "  --period P --subperiod SP --rerank R   mode parameters (8, 4, 2)\n"
	       "  --impress-fallback F   share of layers whose probe heads disagree (default 0)\n"
	       "  --warm-model M --warm-tokens N --warm-prefixes P --warm-requests R\n"
	       "  --warm-budget B --warm-zipf S --warm-arena F   (qwen2.5-7b, 4096, 16, 64, 0.10, 1.0, 0.5)\n"
	       "  --query-noise E        request-to-request query variation (default 1.0)\n"
	       "  --no-drop              do not drop the page cache before cold runs\n"
	       "  --gen-threads N        prefixes generated at once (default: cores / 4)\n"
	       "  --json FILE            every run, machine-readable\n"
	       "  --markdown FILE        the tables, as printed\n"
	       "  --machine TEXT         card and disk, for the header\n"
	       "  --small                CI size: qwen2.5-0.5b, 1024 and 2048 tokens, budgets 0.1,0.25\n"
	       "  -q                     no progress on stderr\n"
	       "  -h, -V\n",
	       prog);
}

static int split_list(char *s, const char **out, uint32_t max, uint32_t *n)
{
	char *save = NULL;
	*n = 0;
	for (char *t = strtok_r(s, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		if (*n == max)
			return -E2BIG;
		out[(*n)++] = t;
	}
	return *n ? 0 : -EINVAL;
}

static bool parse_u32(const char *s, uint32_t lo, uint32_t hi, uint32_t *out)
{
	char *end;
	unsigned long v;
	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi)
		return false;
	*out = (uint32_t)v;
	return true;
}

static bool parse_dbl(const char *s, double lo, double hi, double *out)
{
	char *end;
	double v = strtod(s, &end);
	if (end == s || *end || !(v >= lo && v <= hi))
		return false;
	*out = v;
	return true;
}

enum {
	OPT_SCEN = 256, OPT_COMPUTE, OPT_FLOPS, OPT_TRACE, OPT_REAL_MODELS, OPT_REAL_WINDOWS, OPT_SUFFIX,
	OPT_BACKEND, OPT_REPS, OPT_PERIOD, OPT_SUBPERIOD, OPT_RERANK, OPT_FALLBACK, OPT_WMODEL, OPT_WTOKENS,
	OPT_WPREFIXES, OPT_WREQ, OPT_WBUDGET, OPT_WZIPF, OPT_WARENA, OPT_QNOISE, OPT_NODROP, OPT_GENTH,
	OPT_JSON, OPT_MD, OPT_MACHINE, OPT_SMALL,
};

static int parse_opts(int argc, char **argv, struct opts *o)
{
	static const struct option lo[] = {
		{ "models", required_argument, NULL, 'm' }, { "tokens", required_argument, NULL, 'n' },
		{ "budgets", required_argument, NULL, 'b' }, { "systems", required_argument, NULL, 's' },
		{ "scenarios", required_argument, NULL, OPT_SCEN }, { "compute", required_argument, NULL, OPT_COMPUTE },
		{ "flops", required_argument, NULL, OPT_FLOPS }, { "trace", required_argument, NULL, OPT_TRACE },
		{ "real-models", required_argument, NULL, OPT_REAL_MODELS },
		{ "real-windows", required_argument, NULL, OPT_REAL_WINDOWS },
		{ "suffix", required_argument, NULL, OPT_SUFFIX }, { "backend", required_argument, NULL, OPT_BACKEND },
		{ "reps", required_argument, NULL, OPT_REPS }, { "period", required_argument, NULL, OPT_PERIOD },
		{ "subperiod", required_argument, NULL, OPT_SUBPERIOD }, { "rerank", required_argument, NULL, OPT_RERANK },
		{ "impress-fallback", required_argument, NULL, OPT_FALLBACK },
		{ "warm-model", required_argument, NULL, OPT_WMODEL }, { "warm-tokens", required_argument, NULL, OPT_WTOKENS },
		{ "warm-prefixes", required_argument, NULL, OPT_WPREFIXES },
		{ "warm-requests", required_argument, NULL, OPT_WREQ }, { "warm-budget", required_argument, NULL, OPT_WBUDGET },
		{ "warm-zipf", required_argument, NULL, OPT_WZIPF }, { "warm-arena", required_argument, NULL, OPT_WARENA },
		{ "query-noise", required_argument, NULL, OPT_QNOISE }, { "no-drop", no_argument, NULL, OPT_NODROP },
		{ "gen-threads", required_argument, NULL, OPT_GENTH }, { "json", required_argument, NULL, OPT_JSON },
		{ "markdown", required_argument, NULL, OPT_MD }, { "machine", required_argument, NULL, OPT_MACHINE },
		{ "small", no_argument, NULL, OPT_SMALL }, { "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' }, { NULL, 0, NULL, 0 },
	};
	const char *lst[MAXL];
	uint32_t nl;
	bool set_models = false, set_tokens = false, set_budgets = false, set_warm = false;
	bool set_real = false, set_scen = false;
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	int c;

	memset(o, 0, sizeof(*o));
	o->backend = CKV_BACKEND_AUTO;
	o->suffix = 256;
	o->reps = 1;
	o->period = 8;
	o->subperiod = 4;
	o->rerank = 2;
	o->drop = true;
	o->flops = 4e14;
	o->warm_model = "qwen2.5-7b";
	o->warm_tokens = 4096;
	o->warm_prefixes = 16;
	o->warm_requests = 64;
	o->warm_budget = 0.10;
	o->warm_zipf = 1.0;
	o->warm_arena_frac = 0.5;
	o->query_noise = 1.0;
	o->gen_threads = ncpu >= 8 ? (uint32_t)(ncpu / 4) : 1;
	for (int s = 0; s < SYS_N; s++)
		o->sys_on[s] = true;
	o->sc_cold = o->sc_real = o->sc_warm = o->sc_stats = true;

	while ((c = getopt_long(argc, argv, "hVqm:n:b:s:", lo, NULL)) != -1) {
		switch (c) {
		case 'h':
			usage();
			exit(0);
		case 'V':
			printf("%s %s\n", prog, ckv_version());
			exit(0);
		case 'q':
			o->quiet = true;
			break;
		case 'm':
			if (split_list(optarg, o->models, MAXL, &o->nmodels) < 0)
				return usage_err("--models %s: expected a comma list of up to %d presets", optarg, MAXL);
			set_models = true;
			break;
		case 'n':
			if (split_list(optarg, lst, MAXL, &nl) < 0)
				return usage_err("--tokens: expected a comma list of up to %d lengths", MAXL);
			for (uint32_t i = 0; i < nl; i++)
				if (!parse_u32(lst[i], 16, 1u << 20, &o->tokens[i]))
					return usage_err("--tokens %s: expected 16..1048576", lst[i]);
			o->ntokens = nl;
			set_tokens = true;
			break;
		case 'b':
			if (split_list(optarg, lst, MAXL, &nl) < 0)
				return usage_err("--budgets: expected a comma list of up to %d fractions", MAXL);
			for (uint32_t i = 0; i < nl; i++)
				if (!parse_dbl(lst[i], 1e-6, 1, &o->budgets[i]))
					return usage_err("--budgets %s: expected a fraction in (0, 1]", lst[i]);
			o->nbudgets = nl;
			set_budgets = true;
			break;
		case 's':
			if (split_list(optarg, lst, MAXL, &nl) < 0)
				return usage_err("--systems: expected a comma list");
			for (int s = 0; s < SYS_N; s++)
				o->sys_on[s] = false;
			for (uint32_t i = 0; i < nl; i++) {
				int s;
				for (s = 0; s < SYS_N && strcmp(lst[i], sys_name[s]); s++)
					;
				if (s == SYS_N)
					return usage_err("--systems %s: expected full, impress, noprefetch, period, layer or rerank", lst[i]);
				o->sys_on[s] = true;
			}
			break;
		case OPT_SCEN:
			if (split_list(optarg, lst, MAXL, &nl) < 0)
				return usage_err("--scenarios: expected a comma list");
			o->sc_cold = o->sc_real = o->sc_warm = o->sc_stats = false;
			for (uint32_t i = 0; i < nl; i++) {
				if (!strcmp(lst[i], "cold"))
					o->sc_cold = true;
				else if (!strcmp(lst[i], "real"))
					o->sc_real = true;
				else if (!strcmp(lst[i], "warm"))
					o->sc_warm = true;
				else if (!strcmp(lst[i], "stats"))
					o->sc_stats = true;
				else
					return usage_err("--scenarios %s: expected cold, real, warm or stats", lst[i]);
			}
			set_scen = true;
			break;
		case OPT_COMPUTE:
			o->compute_path = optarg;
			break;
		case OPT_FLOPS:
			if (!parse_dbl(optarg, 1e6, 1e18, &o->flops))
				return usage_err("--flops %s: expected FLOP/s", optarg);
			break;
		case OPT_TRACE:
			o->trace_path = optarg;
			break;
		case OPT_REAL_MODELS:
			if (split_list(optarg, o->real_models, MAXL, &o->nreal_models) < 0)
				return usage_err("--real-models: expected a comma list");
			set_real = true;
			break;
		case OPT_REAL_WINDOWS:
			if (!parse_u32(optarg, 1, 64, &o->real_windows))
				return usage_err("--real-windows %s: expected 1..64", optarg);
			break;
		case OPT_SUFFIX:
			if (!parse_u32(optarg, 1, 65536, &o->suffix))
				return usage_err("--suffix %s: expected 1..65536", optarg);
			break;
		case OPT_BACKEND:
			if (!strcmp(optarg, "auto"))
				o->backend = CKV_BACKEND_AUTO;
			else if (!strcmp(optarg, "host"))
				o->backend = CKV_BACKEND_HOST;
			else if (!strcmp(optarg, "cuda"))
				o->backend = CKV_BACKEND_CUDA;
			else
				return usage_err("--backend %s: expected auto, host or cuda", optarg);
			break;
		case OPT_REPS:
			if (!parse_u32(optarg, 1, 16, &o->reps))
				return usage_err("--reps %s: expected 1..16", optarg);
			break;
		case OPT_PERIOD:
			if (!parse_u32(optarg, 1, 1024, &o->period))
				return usage_err("--period %s: expected 1..1024", optarg);
			break;
		case OPT_SUBPERIOD:
			if (!parse_u32(optarg, 1, 1024, &o->subperiod))
				return usage_err("--subperiod %s: expected 1..1024", optarg);
			break;
		case OPT_RERANK:
			if (!parse_u32(optarg, 1, 64, &o->rerank))
				return usage_err("--rerank %s: expected 1..64", optarg);
			break;
		case OPT_FALLBACK:
			if (!parse_dbl(optarg, 0, 1, &o->impress_fallback))
				return usage_err("--impress-fallback %s: expected a fraction in [0, 1]", optarg);
			break;
		case OPT_WMODEL:
			o->warm_model = optarg;
			set_warm = true;
			break;
		case OPT_WTOKENS:
			if (!parse_u32(optarg, 16, 1u << 20, &o->warm_tokens))
				return usage_err("--warm-tokens %s: expected 16..1048576", optarg);
			set_warm = true;
			break;
		case OPT_WPREFIXES:
			if (!parse_u32(optarg, 1, 1024, &o->warm_prefixes))
				return usage_err("--warm-prefixes %s: expected 1..1024", optarg);
			set_warm = true;
			break;
		case OPT_WREQ:
			if (!parse_u32(optarg, 1, 100000, &o->warm_requests))
				return usage_err("--warm-requests %s: expected 1..100000", optarg);
			set_warm = true;
			break;
		case OPT_WBUDGET:
			if (!parse_dbl(optarg, 1e-6, 1, &o->warm_budget))
				return usage_err("--warm-budget %s: expected a fraction in (0, 1]", optarg);
			break;
		case OPT_WZIPF:
			if (!parse_dbl(optarg, 0, 10, &o->warm_zipf))
				return usage_err("--warm-zipf %s: expected 0..10", optarg);
			break;
		case OPT_WARENA:
			if (!parse_dbl(optarg, 0.01, 10, &o->warm_arena_frac))
				return usage_err("--warm-arena %s: expected a fraction of the working set", optarg);
			break;
		case OPT_QNOISE:
			if (!parse_dbl(optarg, 0, 100, &o->query_noise))
				return usage_err("--query-noise %s: expected 0..100", optarg);
			break;
		case OPT_NODROP:
			o->drop = false;
			break;
		case OPT_GENTH:
			if (!parse_u32(optarg, 1, 16, &o->gen_threads))
				return usage_err("--gen-threads %s: expected 1..16", optarg);
			break;
		case OPT_JSON:
			o->json_path = optarg;
			break;
		case OPT_MD:
			o->md_path = optarg;
			break;
		case OPT_MACHINE:
			o->machine = optarg;
			break;
		case OPT_SMALL:
			o->small = true;
			break;
		default:
			return usage_err("unknown option");
		}
	}
	if (argc - optind != 1)
		return usage_err("expected one argument: WORKDIR");
	o->workdir = argv[optind];
	if (o->small) {
		static const char *small_models[] = { "qwen2.5-0.5b" };
		if (!set_models) {
			o->models[0] = small_models[0];
			o->nmodels = 1;
		}
		if (!set_tokens) {
			o->tokens[0] = 1024;
			o->tokens[1] = 2048;
			o->ntokens = 2;
		}
		if (!set_budgets) {
			o->budgets[0] = 0.10;
			o->budgets[1] = 0.25;
			o->nbudgets = 2;
		}
		if (!set_warm) {
			o->warm_model = "qwen2.5-0.5b";
			o->warm_tokens = 2048;
			o->warm_prefixes = 8;
			o->warm_requests = 32;
		}
		if (!set_real) {
			o->real_models[0] = small_models[0];
			o->nreal_models = 1;
		}
		if (!o->real_windows)
			o->real_windows = 2;
	}
	if (!o->nmodels) {
		static const char *def[] = { "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-14b" };
		for (int i = 0; i < 3; i++)
			o->models[i] = def[i];
		o->nmodels = 3;
	}
	if (!o->ntokens) {
		o->tokens[0] = 4096;
		o->tokens[1] = 16384;
		o->tokens[2] = 32768;
		o->ntokens = 3;
	}
	if (!o->nbudgets) {
		static const double def[] = { 0.05, 0.10, 0.25, 0.50 };
		for (int i = 0; i < 4; i++)
			o->budgets[i] = def[i];
		o->nbudgets = 4;
	}
	if (!o->nreal_models) {
		o->real_models[0] = "qwen2.5-7b";
		o->nreal_models = 1;
	}
	if (!o->trace_path) {
		if (set_scen && o->sc_real)
			return usage_err("--scenarios real needs --trace FILE");
		o->sc_real = false;
	}
	return 0;
}

/* ---- main ------------------------------------------------------------------------- */

static int synth_prefix(struct model *mo, uint32_t tokens, uint32_t seed, struct prefix **out)
{
	ckv_trace_synth_opts so;
	ckv_trace *t;
	char desc[160];
	int rc;
	ckv_trace_synth_defaults(&so);
	so.layers = mo->g.layers;
	so.tokens = tokens;
	so.seed = seed;
	if ((rc = ckv_trace_synth(&so, &t)) < 0)
		return rc;
	snprintf(desc, sizeof(desc), "synth:v1:sigma=%g,spatial=%g,rho=%g,tok=%g,sink=%g,recent=%g/%u,n=%u,seed=%u",
		 so.sigma, so.spatial, so.layer_rho, so.token_sigma, so.sink, so.recent, so.recent_tokens, tokens, seed);
	return prefix_new(mo, desc, t, out);
}

int main(int argc, char **argv)
{
	struct bench b;
	struct prefix **cold_by[MAXL] = { 0 }, **cold_flat = NULL, **real = NULL, **warm = NULL, *wp = NULL;
	struct cell *cells[MAXL * MAXL] = { 0 };
	uint32_t ncold = 0, nreal = 0, per_real = 0, nwarm = 0;
	ckv_err e;
	int rc;

	memset(&b, 0, sizeof(b));
	b.t_start = now_s();
	if ((rc = parse_opts(argc, argv, &b.o)) != 0)
		return rc;
	if (mkdir(b.o.workdir, 0755) < 0 && errno != EEXIST) {
		fail("%s: %s", b.o.workdir, strerror(errno));
		return 1;
	}
	snprintf(b.store_path, sizeof(b.store_path), "%s/store", b.o.workdir);
	if (ckv_store_init(b.store_path, &e) < 0 || ckv_store_open(b.store_path, &b.store, &e) < 0) {
		fail("%s: %s", b.store_path, e.msg);
		return 1;
	}
	if ((rc = rawio_init(&b.io)) < 0) {
		fail("io_uring: %s", strerror(-rc));
		goto out;
	}
	b.out = json_pack("{s:s, s:[]}", "machine", b.o.machine ? b.o.machine : "", "runs");
	if (b.o.md_path && !(b.md = fopen(b.o.md_path, "w"))) {
		rc = fail("%s: %s", b.o.md_path, strerror(errno));
		goto out;
	}

	/* prefixes of every scenario, generated together */
	if (b.o.sc_cold || b.o.sc_stats) {
		cold_flat = calloc(MAXL * MAXL, sizeof(*cold_flat));
		if (!cold_flat) {
			rc = -ENOMEM;
			goto out;
		}
		for (uint32_t mi = 0; mi < b.o.nmodels; mi++) {
			struct model *mo;
			if ((rc = model_get(&b, b.o.models[mi], &mo)) < 0) {
				if (rc == -ENOENT)
					rc = usage_err("--models %s: unknown preset", b.o.models[mi]);
				goto out;
			}
			cold_by[mi] = cold_flat + mi * MAXL;
			for (uint32_t ti = 0; ti < b.o.ntokens; ti++) {
				if ((rc = synth_prefix(mo, b.o.tokens[ti], 1000 + ti, &cold_by[mi][ti])) < 0 ||
				    (b.o.sc_cold && (rc = add_prefix(&b, cold_by[mi][ti])) < 0))
					goto out;
				ncold++;
			}
		}
	}
	if (b.o.sc_real) {
		uint32_t w, L, n;
		char err[512];
		if ((rc = ckv_trace_file_dims(b.o.trace_path, &w, &L, &n, err, sizeof(err))) < 0) {
			rc = fail("%s", err);
			goto out;
		}
		per_real = b.o.real_windows && b.o.real_windows < w ? b.o.real_windows : w;
		real = calloc((size_t)per_real * b.o.nreal_models, sizeof(*real));
		if (!real) {
			rc = -ENOMEM;
			goto out;
		}
		for (uint32_t mi = 0; mi < b.o.nreal_models; mi++) {
			struct model *mo;
			if ((rc = model_get(&b, b.o.real_models[mi], &mo)) < 0) {
				if (rc == -ENOENT)
					rc = usage_err("--real-models %s: unknown preset", b.o.real_models[mi]);
				goto out;
			}
			for (uint32_t wi = 0; wi < per_real; wi++) {
				ckv_trace *t, *tm;
				char desc[160];
				if ((rc = ckv_trace_load(b.o.trace_path, 0, 0, 0, wi, &t, err, sizeof(err))) < 0) {
					rc = fail("%s", err);
					goto out;
				}
				rc = ckv_trace_map_layers(t, mo->g.layers, &tm);
				ckv_trace_free(t);
				if (rc < 0)
					goto out;
				snprintf(desc, sizeof(desc), "real:%s:%u", strrchr(b.o.trace_path, '/') ? strrchr(b.o.trace_path, '/') + 1 : b.o.trace_path, wi);
				if ((rc = prefix_new(mo, desc, tm, &real[nreal])) < 0 || (rc = add_prefix(&b, real[nreal])) < 0)
					goto out;
				nreal++;
			}
		}
	}
	if (b.o.sc_warm) {
		struct model *mo;
		if ((rc = model_get(&b, b.o.warm_model, &mo)) < 0) {
			if (rc == -ENOENT)
				rc = usage_err("--warm-model %s: unknown preset", b.o.warm_model);
			goto out;
		}
		warm = calloc(b.o.warm_prefixes, sizeof(*warm));
		if (!warm) {
			rc = -ENOMEM;
			goto out;
		}
		for (uint32_t i = 0; i < b.o.warm_prefixes; i++) {
			if ((rc = synth_prefix(mo, b.o.warm_tokens, 5000 + i, &warm[i])) < 0 || (rc = add_prefix(&b, warm[i])) < 0)
				goto out;
			nwarm++;
		}
	}
	if (b.nprefixes) {
		/* one more, small, for the untimed warm-up run */
		struct model *mo = b.prefixes[0]->mo;
		if ((rc = synth_prefix(mo, WARMUP_TOKENS, 9999, &wp)) < 0 || (rc = add_prefix(&b, wp)) < 0)
			goto out;
		if ((rc = generate_all(&b)) < 0)
			goto out;
	}

	/* the replay backend: the same kind as the loaders' */
	{
		ckv_loader *l;
		if ((rc = loader_open(&b, 64ull << 20, 0, &l)) < 0)
			goto out;
		b.cuda = ckv_loader_backend(l) == CKV_BACKEND_CUDA;
		ckv_loader_close(l);
		rc = b.cuda ? ckv_backend_cuda(0, &b.be) : ckv_backend_host(&b.be);
		if (rc < 0) {
			fail("cannot create the %s backend: %s", b.cuda ? "cuda" : "host", strerror(-rc));
			goto out;
		}
	}
	md(&b, "# Re-Prefill benchmark\n\n¹ read amp (KV): bytes of KV read from disk over the bytes of KV the layers "
	       "attend. Ours (period, layer): chunk granularity / with wasted speculative reads; rerank includes its "
	       "candidates' K halves; IMPRESS-style: the 64-token blocks over the selected tokens. \"meta\": key "
	       "digests (ours) or probe keys (IMPRESS). ÷ bound: time over the bound's. bubble: share of the time the "
	       "replayed compute was not running.\n\nbackend %s; compute %s; suffix %u tokens; period %u, sub-period %u, rerank %u; "
	       "IMPRESS fallback rate %g; cold reps %u (median)%s%s\n",
	   b.be->ops->name, b.o.compute_path ? b.o.compute_path : "modelled from FLOPs (no --compute table)", b.o.suffix,
	   b.o.period, b.o.subperiod, b.o.rerank, b.o.impress_fallback, b.o.reps, b.o.machine ? "; machine: " : "",
	   b.o.machine ? b.o.machine : "");
	json_object_set_new(b.out, "backend", json_string(b.be->ops->name));
	if (wp) {
		/* untimed: CUDA context, kernels and the engine's first I/O */
		struct result r;
		if ((rc = run_cold(&b, wp, SYS_FULL, 1.0, 0, &r)) < 0 || (rc = run_cold(&b, wp, SYS_IMPRESS, 0.1, 0, &r)) < 0)
			goto out;
	}
	if (b.o.sc_stats) {
		/* the real trace, the generator at its shape, and the cold scenario's traces
		 * (each model at its longest length) */
		struct prefix *sel[MAXL];
		uint32_t ns = 0;
		for (uint32_t mi = 0; mi < b.o.nmodels && cold_by[mi]; mi++)
			sel[ns++] = cold_by[mi][b.o.ntokens - 1];
		if ((rc = scenario_stats(&b, sel, ns)) < 0)
			goto out;
	}
	if (b.o.sc_cold) {
		for (uint32_t i = 0; i < b.o.nmodels * b.o.ntokens; i++)
			if (!(cells[(i / b.o.ntokens) * MAXL + i % b.o.ntokens] = calloc(MAXL, sizeof(struct cell)))) {
				rc = -ENOMEM;
				goto out;
			}
		if ((rc = scenario_cold(&b, cold_by, cells)) < 0)
			goto out;
	}
	if (b.o.sc_real && (rc = scenario_real(&b, real, per_real)) < 0)
		goto out;
	if (b.o.sc_warm && (rc = scenario_warm(&b, warm, nwarm)) < 0)
		goto out;
	if (b.o.sc_cold)
		targets(&b, cold_by, cells);
	emit_json(&b);
	rc = 0;
out:
	for (uint32_t i = 0; i < MAXL * MAXL; i++)
		free(cells[i]);
	if (!b.o.sc_cold && cold_flat)
		for (uint32_t i = 0; i < MAXL * MAXL; i++)
			prefix_free(cold_flat[i]);
	for (uint32_t i = 0; i < b.nprefixes; i++)
		prefix_free(b.prefixes[i]);
	free(b.prefixes);
	free(cold_flat);
	free(real);
	free(warm);
	for (uint32_t i = 0; i < b.nmodels; i++) {
		free(b.models[i].comp_a);
		free(b.models[i].comp_s);
		free(b.models[i].probe_n);
		free(b.models[i].probe_s);
	}
	if (b.be)
		b.be->ops->destroy(b.be);
	if (b.md)
		fclose(b.md);
	json_decref(b.out);
	rawio_fini(&b.io);
	ckv_store_close(b.store);
	return rc == 0 ? 0 : rc == EXIT_USAGE ? EXIT_USAGE : 1;
}
