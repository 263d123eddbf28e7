/*
 * ckv — command-line tool for ckvfs stores.
 *
 *   ckv init STORE
 *   ckv gen STORE --model M --tokens N [--extends HASH] [--seed S] [--plant F]
 *   ckv import STORE DIR          ckv export STORE HASH DIR
 *   ckv ls STORE [--model M] [--json]
 *   ckv stat STORE HASH           ckv match STORE --model M --tokens FILE
 *   ckv hash --model M --tokens FILE
 *   ckv verify STORE [HASH]       ckv rm STORE HASH
 *   ckv gc STORE                  ckv reindex STORE
 *
 * Exit status: 0 success, 1 failure, 2 usage error. Long operations show
 * progress on a terminal (stderr) and stay quiet when it is not one.
 */
#include "ckv_format.h"
#include "ckv_store.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXIT_USAGE 2

static const char *prog = "ckv";

static int usage_err(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int usage_err(const char *cmd, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s %s: ", prog, cmd);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nTry '%s %s -h' for help.\n", prog, cmd);
	return EXIT_USAGE;
}

static int fail(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(const char *cmd, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s %s: ", prog, cmd);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return 1;
}

static void human(uint64_t b, char *out, size_t len)
{
	static const char *u[] = { "B", "KiB", "MiB", "GiB", "TiB" };
	double v = (double)b;
	int i = 0;
	while (v >= 1024 && i < 4) {
		v /= 1024;
		i++;
	}
	if (i == 0)
		snprintf(out, len, "%" PRIu64 " B", b);
	else
		snprintf(out, len, "%.1f %s", v, u[i]);
}

/* ---- progress ------------------------------------------------------------------ */

struct progress {
	bool tty;
	struct timespec start, last;
	bool shown;
};

static double since(const struct timespec *a)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (double)(now.tv_sec - a->tv_sec) + (double)(now.tv_nsec - a->tv_nsec) / 1e9;
}

static void progress_init(struct progress *p)
{
	p->tty = isatty(STDERR_FILENO);
	clock_gettime(CLOCK_MONOTONIC, &p->start);
	p->last = p->start;
	p->shown = false;
}

static void progress_cb(void *arg, const char *what, uint64_t done, uint64_t total)
{
	struct progress *p = arg;
	char a[32], b[32];
	double t;
	if (!p->tty || (since(&p->last) < 0.1 && done < total))
		return;
	clock_gettime(CLOCK_MONOTONIC, &p->last);
	t = since(&p->start);
	human(done, a, sizeof(a));
	human(total, b, sizeof(b));
	fprintf(stderr, "\r%-7s %5.1f%%  %s / %s  %.0f MiB/s   ", what,
		total ? 100.0 * (double)done / (double)total : 100.0, a, b,
		t > 0 ? (double)done / t / 1048576.0 : 0.0);
	p->shown = true;
}

static void progress_end(struct progress *p)
{
	if (p->shown)
		fputs("\r\033[K", stderr);
}

/* ---- shared option handling ----------------------------------------------------- */

struct shape_opts {
	const char *model;
	const char *model_id, *dtype, *salt;
	long layers, kv_heads, head_dim, chunk;
};

enum {
	OPT_LAYERS = 1000, OPT_KVHEADS, OPT_HEADDIM, OPT_DTYPE, OPT_CHUNK, OPT_MODELID, OPT_SALT,
	OPT_EXTENDS, OPT_SEED, OPT_PLANT, OPT_PLANT_OUT, OPT_JSON, OPT_TOKENS_TXT, OPT_COUNT,
	OPT_NOSYNC,
};

#define SHAPE_LONGOPTS                                                  \
	{ "model", required_argument, NULL, 'm' },                     \
	{ "layers", required_argument, NULL, OPT_LAYERS },              \
	{ "kv-heads", required_argument, NULL, OPT_KVHEADS },           \
	{ "head-dim", required_argument, NULL, OPT_HEADDIM },           \
	{ "dtype", required_argument, NULL, OPT_DTYPE },                \
	{ "chunk", required_argument, NULL, OPT_CHUNK },                \
	{ "model-id", required_argument, NULL, OPT_MODELID },           \
	{ "salt", required_argument, NULL, OPT_SALT }

static bool parse_long(const char *s, long min, long max, long *out)
{
	char *end;
	long v;
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < min || v > max)
		return false;
	*out = v;
	return true;
}

/* Returns 0, or a usage message in err. */
static int shape_opt(struct shape_opts *so, int c, const char *arg, const char **err)
{
	long *dst = NULL, max = 0;
	switch (c) {
	case 'm':
		so->model = arg;
		return 0;
	case OPT_DTYPE:
		so->dtype = arg;
		return 0;
	case OPT_MODELID:
		so->model_id = arg;
		return 0;
	case OPT_SALT:
		so->salt = arg;
		return 0;
	case OPT_LAYERS:
		dst = &so->layers, max = CKV_MAX_LAYERS;
		*err = "--layers: expected an integer 1..1024";
		break;
	case OPT_KVHEADS:
		dst = &so->kv_heads, max = CKV_MAX_KV_HEADS;
		*err = "--kv-heads: expected an integer 1..1024";
		break;
	case OPT_HEADDIM:
		dst = &so->head_dim, max = CKV_MAX_HEAD_DIM;
		*err = "--head-dim: expected an integer 1..4096";
		break;
	case OPT_CHUNK:
		dst = &so->chunk, max = CKV_MAX_CHUNK_TOKENS;
		*err = "--chunk: expected an integer 1..4096";
		break;
	default:
		return 1;
	}
	if (!parse_long(arg, 1, max, dst))
		return -1;
	*err = NULL;
	return 0;
}

/* Build a geometry from --model (a preset or an id) and the custom shape options. */
static int shape_geom(const struct shape_opts *so, ckv_geom *g, const char **err)
{
	static char msg[512];
	ckv_err e;
	memset(g, 0, sizeof(*g));
	if (so->model && ckv_geom_preset(g, so->model) == 0) {
		/* preset, possibly overridden */
	} else if (so->model || so->model_id) {
		snprintf(g->model, sizeof(g->model), "%s", so->model_id ? so->model_id : so->model);
		g->dtype = CKV_DTYPE_BF16;
		g->chunk_tokens = 16;
		if (!so->layers || !so->kv_heads || !so->head_dim) {
			snprintf(msg, sizeof(msg),
				 "--model %s is not a known preset (qwen2.5-0.5b, -1.5b, -3b, -7b, -14b, -32b, -72b); "
				 "a custom model needs --layers, --kv-heads and --head-dim",
				 so->model ? so->model : so->model_id);
			*err = msg;
			return -1;
		}
	} else {
		*err = "--model is required";
		return -1;
	}
	if (so->model_id)
		snprintf(g->model, sizeof(g->model), "%s", so->model_id);
	if (so->salt)
		snprintf(g->salt, sizeof(g->salt), "%s", so->salt);
	if (so->layers)
		g->layers = (uint32_t)so->layers;
	if (so->kv_heads)
		g->kv_heads = (uint32_t)so->kv_heads;
	if (so->head_dim)
		g->head_dim = (uint32_t)so->head_dim;
	if (so->chunk)
		g->chunk_tokens = (uint32_t)so->chunk;
	if (so->dtype) {
		g->dtype = ckv_dtype_parse(so->dtype);
		if (!g->dtype) {
			snprintf(msg, sizeof(msg), "--dtype %s: expected bf16, fp16, fp8_e4m3 or fp32", so->dtype);
			*err = msg;
			return -1;
		}
	}
	if (ckv_geom_init(g, &e) < 0) {
		snprintf(msg, sizeof(msg), "%s", e.msg);
		*err = msg;
		return -1;
	}
	return 0;
}

static int open_store(const char *cmd, const char *path, ckv_store **s)
{
	ckv_err e;
	int rc = ckv_store_open(path, s, &e);
	if (rc)
		return fail(cmd, "%s", e.msg);
	return 0;
}

static int parse_hash_arg(const char *cmd, const char *arg, ckv_hash *h)
{
	if (ckv_hash_parse(h, arg) < 0)
		return usage_err(cmd, "'%s': expected a prefix hash (32 lowercase hex digits)", arg);
	return 0;
}

/* Read a token file: u32 little-endian (binary) or whitespace-separated decimal (text). */
static int read_tokens(const char *cmd, const char *path, bool text, uint32_t **out, uint32_t *n)
{
	FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
	uint32_t *t = NULL;
	size_t cnt = 0, cap = 0;
	if (!f)
		return fail(cmd, "%s: %s", path, strerror(errno));
	for (;;) {
		uint32_t v;
		if (text) {
			unsigned long long x;
			int r = fscanf(f, "%llu", &x);
			if (r == EOF)
				break;
			if (r != 1 || x > UINT32_MAX) {
				if (f != stdin)
					fclose(f);
				free(t);
				return fail(cmd, "%s: token %zu: expected a decimal integer 0..4294967295", path, cnt);
			}
			v = (uint32_t)x;
		} else {
			uint8_t b[4];
			size_t r = fread(b, 1, 4, f);
			if (r == 0)
				break;
			if (r != 4) {
				if (f != stdin)
					fclose(f);
				free(t);
				return fail(cmd, "%s: %zu trailing bytes: a token file is u32 little-endian (use --tokens-txt for text)",
					    path, r);
			}
			ckv_tokens_from_le(&v, b, 1);
		}
		if (cnt == cap) {
			cap = cap ? 2 * cap : 4096;
			uint32_t *nt = realloc(t, cap * 4);
			if (!nt) {
				free(t);
				if (f != stdin)
					fclose(f);
				return fail(cmd, "out of memory");
			}
			t = nt;
		}
		if (cnt >= CKV_MAX_TOKENS) {
			free(t);
			if (f != stdin)
				fclose(f);
			return fail(cmd, "%s: more than %u tokens", path, CKV_MAX_TOKENS);
		}
		t[cnt++] = v;
	}
	if (f != stdin)
		fclose(f);
	if (!cnt) {
		free(t);
		return fail(cmd, "%s: no tokens", path);
	}
	*out = t;
	*n = (uint32_t)cnt;
	return 0;
}

/* ---- init ----------------------------------------------------------------------- */

static int cmd_init(int argc, char **argv)
{
	ckv_err e;
	int c;
	while ((c = getopt(argc, argv, "h")) != -1) {
		if (c == 'h') {
			printf("usage: ckv init STORE\n\nCreate an empty store (directories and index). An existing store is left as it is.\n");
			return 0;
		}
		return usage_err("init", "unknown option");
	}
	if (argc - optind != 1)
		return usage_err("init", "expected one argument: STORE");
	if (ckv_store_init(argv[optind], &e) < 0)
		return fail("init", "%s", e.msg);
	return 0;
}

/* ---- gen ------------------------------------------------------------------------ */

static inline uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static inline uint16_t f32_to_bf16(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	u += 0x7fff + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

static inline uint16_t f32_to_fp16(float f)
{
	uint32_t u, sign, man;
	int exp;
	memcpy(&u, &f, 4);
	sign = (u >> 16) & 0x8000;
	exp = (int)((u >> 23) & 0xff) - 127 + 15;
	man = u & 0x7fffff;
	if (exp <= 0)
		return (uint16_t)sign; /* flush tiny values */
	if (exp >= 31)
		return (uint16_t)(sign | 0x7c00);
	return (uint16_t)(sign | (uint32_t)exp << 10 | ((man + 0x1000) >> 13));
}

static inline uint8_t f32_to_fp8(float f)
{
	/* nearest E4M3FN value by search over the 127 positive codes */
	uint8_t sign = f < 0 ? 0x80 : 0, best = 0;
	float a = fabsf(f), bd = INFINITY;
	for (int i = 0; i < 127; i++) {
		uint8_t b = (uint8_t)i;
		float d = fabsf(ckv_dtype_to_f32(CKV_DTYPE_FP8_E4M3, &b) - a);
		if (d < bd) {
			bd = d;
			best = (uint8_t)i;
		}
	}
	return sign | best;
}

struct gen_ctx {
	const ckv_geom *g;
	const uint32_t *tokens;
	uint32_t n;
	uint64_t seed;
	const uint8_t *planted; /* [chunks] or NULL */
	const float *dirs;      /* [layers][kv_heads][head_dim] unit vectors */
};

static void put_elem(const ckv_geom *g, uint8_t *p, float v)
{
	uint16_t h;
	switch (g->dtype) {
	case CKV_DTYPE_BF16:
		h = f32_to_bf16(v);
		memcpy(p, &h, 2);
		break;
	case CKV_DTYPE_FP16:
		h = f32_to_fp16(v);
		memcpy(p, &h, 2);
		break;
	case CKV_DTYPE_FP8_E4M3:
		*p = f32_to_fp8(v);
		break;
	default:
		memcpy(p, &v, 4);
		break;
	}
}

/*
 * Synthetic KV: a deterministic function of (geometry, layer, head, position,
 * token), so a prefix and its extension agree on their shared tokens. Values
 * are roughly N(0, 1) (sum of four uniforms); planted chunks add 3 x dir to
 * their keys, which makes them the top chunks for the query dir.
 */
static int gen_fill(void *arg, uint32_t l, uint32_t first, uint32_t count, void *buf)
{
	struct gen_ctx *x = arg;
	const ckv_geom *g = x->g;
	unsigned es = ckv_dtype_size(g->dtype);
	uint32_t c = g->chunk_tokens, D = g->head_dim;

	for (uint32_t i = 0; i < count; i++) {
		uint32_t j = first + i;
		uint8_t *chunk = (uint8_t *)buf + (size_t)i * g->chunk_bytes;
		for (int kv = 0; kv < 2; kv++)
			for (uint32_t h = 0; h < g->kv_heads; h++)
				for (uint32_t t = 0; t < c; t++) {
					uint64_t pos = (uint64_t)j * c + t, st;
					uint8_t *row = chunk + (size_t)kv * g->half_bytes + ((size_t)h * c + t) * D * es;
					const float *dir = x->dirs ? x->dirs + ((size_t)l * g->kv_heads + h) * D : NULL;
					bool plant = kv == 0 && x->planted && x->planted[j];
					if (pos >= x->n)
						break;
					st = splitmix64(g->seed ^ splitmix64(((uint64_t)l << 40) ^ ((uint64_t)h << 24) ^
									      ((uint64_t)kv << 22) ^ x->tokens[pos]) ^
							splitmix64(pos * 0x2545f4914f6cdd1dull));
					for (uint32_t d = 0; d < D; d++) {
						uint64_t r = splitmix64(st + d);
						float v = ((float)(r & 0xffff) + (float)((r >> 16) & 0xffff) +
							   (float)((r >> 32) & 0xffff) + (float)(r >> 48)) / 65536.0f - 2.0f;
						v *= 1.732f;
						if (plant)
							v = 0.5f * v + 3.0f * dir[d];
						put_elem(g, row + (size_t)d * es, v);
					}
				}
	}
	return 0;
}

static uint32_t gen_token(uint64_t seed, uint64_t pos)
{
	return (uint32_t)(splitmix64(seed * 0x9e3779b97f4a7c15ull ^ splitmix64(pos + 1)) % 151936);
}

static int write_plant(const char *cmd, const char *path, const ckv_geom *g, const ckv_hash *h,
		       double frac, const uint8_t *planted, uint32_t m, const float *dirs)
{
	char hex[CKV_HASH_HEX + 1];
	json_t *root, *chunks, *q;
	int rc = 0;

	ckv_hash_hex(h, hex);
	root = json_object();
	chunks = json_array();
	q = json_array();
	json_object_set_new(root, "hash", json_string(hex));
	json_object_set_new(root, "fraction", json_real(frac));
	json_object_set_new(root, "chunks_total", json_integer(m));
	json_object_set_new(root, "layers", json_integer(g->layers));
	json_object_set_new(root, "kv_heads", json_integer(g->kv_heads));
	json_object_set_new(root, "head_dim", json_integer(g->head_dim));
	for (uint32_t j = 0; j < m; j++)
		if (planted[j])
			json_array_append_new(chunks, json_integer(j));
	json_object_set_new(root, "planted", chunks);
	for (uint32_t l = 0; l < g->layers; l++) {
		json_t *lh = json_array();
		for (uint32_t k = 0; k < g->kv_heads; k++) {
			json_t *v = json_array();
			for (uint32_t d = 0; d < g->head_dim; d++)
				json_array_append_new(v, json_real(dirs[((size_t)l * g->kv_heads + k) * g->head_dim + d]));
			json_array_append_new(lh, v);
		}
		json_array_append_new(q, lh);
	}
	json_object_set_new(root, "query", q);
	if (json_dump_file(root, path, JSON_COMPACT) < 0)
		rc = fail(cmd, "%s: cannot write the plant file", path);
	json_decref(root);
	return rc;
}

static void gen_usage(void)
{
	printf("usage: ckv gen STORE --model M --tokens N [options]\n\n"
	       "Generate a deterministic synthetic cache with a real model's shape and publish it.\n\n"
	       "  -m, --model M        preset qwen2.5-{0.5b,1.5b,3b,7b,14b,32b,72b}, or a model id with\n"
	       "                       --layers/--kv-heads/--head-dim\n"
	       "  -n, --tokens N       number of tokens (with --extends: tokens appended)\n"
	       "  --extends HASH       continue the stored prefix HASH (the next turn of a dialogue)\n"
	       "  --seed S             token and value seed (default 1)\n"
	       "  --plant F            make a fraction F of the new chunks share a key direction and\n"
	       "                       write the query that selects exactly them (JSON)\n"
	       "  --plant-out FILE     where to write it (default ./<hash>.plant.json)\n"
	       "  --layers L --kv-heads H --head-dim D --dtype bf16|fp16|fp8_e4m3|fp32 --chunk C\n"
	       "  --model-id ID --salt S   override the shape / identity\n"
	       "  --count K            generate K prefixes, seeds S, S+1, ... (one hash per line)\n"
	       "  --no-sync            skip per-file fsync (bulk test data; synced once at exit)\n"
	       "  -q                   print only the prefix hash\n");
}

static int cmd_gen(int argc, char **argv)
{
	static const struct option lo[] = {
		SHAPE_LONGOPTS,
		{ "tokens", required_argument, NULL, 'n' },
		{ "extends", required_argument, NULL, OPT_EXTENDS },
		{ "seed", required_argument, NULL, OPT_SEED },
		{ "plant", required_argument, NULL, OPT_PLANT },
		{ "plant-out", required_argument, NULL, OPT_PLANT_OUT },
		{ "count", required_argument, NULL, OPT_COUNT },
		{ "no-sync", no_argument, NULL, OPT_NOSYNC },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct shape_opts so = { 0 };
	const char *err, *extends = NULL, *plant_out = NULL;
	long ntok = -1, seed = 1, count = 1;
	double plant = -1;
	bool quiet = false, nosync = false;
	ckv_store *s;
	ckv_geom g;
	uint32_t *tokens = NULL, n, base_n = 0, m;
	uint8_t *planted = NULL;
	float *dirs = NULL;
	ckv_import_result r;
	ckv_err e;
	struct progress pr;
	int c, rc;

	while ((c = getopt_long(argc, argv, "hqm:n:", lo, NULL)) != -1) {
		switch (c) {
		case 'h':
			gen_usage();
			return 0;
		case 'q':
			quiet = true;
			break;
		case 'n':
			if (!parse_long(optarg, 1, CKV_MAX_TOKENS, &ntok))
				return usage_err("gen", "--tokens %s: expected an integer 1..%u", optarg, CKV_MAX_TOKENS);
			break;
		case OPT_EXTENDS:
			extends = optarg;
			break;
		case OPT_SEED:
			if (!parse_long(optarg, 0, LONG_MAX, &seed))
				return usage_err("gen", "--seed %s: expected a non-negative integer", optarg);
			break;
		case OPT_PLANT: {
			char *end;
			plant = strtod(optarg, &end);
			if (*end || end == optarg || !(plant > 0 && plant < 1))
				return usage_err("gen", "--plant %s: expected a fraction between 0 and 1", optarg);
			break;
		}
		case OPT_PLANT_OUT:
			plant_out = optarg;
			break;
		case OPT_COUNT:
			if (!parse_long(optarg, 1, 10000000, &count))
				return usage_err("gen", "--count %s: expected an integer 1..10000000", optarg);
			break;
		case OPT_NOSYNC:
			nosync = true;
			break;
		default:
			rc = shape_opt(&so, c, optarg, &err);
			if (rc < 0)
				return usage_err("gen", "%s", err);
			if (rc > 0)
				return usage_err("gen", "unknown option");
		}
	}
	if (argc - optind != 1)
		return usage_err("gen", "expected one argument: STORE");
	if (ntok < 0)
		return usage_err("gen", "--tokens is required");
	if (!extends && shape_geom(&so, &g, &err) < 0)
		return usage_err("gen", "%s", err);
	if ((rc = open_store("gen", argv[optind], &s)))
		return rc;

	if (extends) {
		ckv_hash ph;
		ckv_manifest *pm;
		if (parse_hash_arg("gen", extends, &ph)) {
			ckv_store_close(s);
			return EXIT_USAGE;
		}
		if (ckv_store_get(s, &ph, &pm, &e) < 0) {
			ckv_store_close(s);
			return fail("gen", "--extends: %s", e.msg);
		}
		g = pm->geom;
		if (so.model || so.layers || so.kv_heads || so.head_dim || so.dtype || so.chunk) {
			ckv_geom want;
			if (shape_geom(&so, &want, &err) < 0 || want.seed != g.seed) {
				ckv_manifest_free(pm);
				free(pm);
				ckv_store_close(s);
				return usage_err("gen", "--extends %s: the stored prefix has another shape than the options give", extends);
			}
		}
		base_n = pm->tokens;
		if ((uint64_t)base_n + (uint64_t)ntok > CKV_MAX_TOKENS) {
			ckv_manifest_free(pm);
			free(pm);
			ckv_store_close(s);
			return usage_err("gen", "--tokens: the extended prefix would exceed %u tokens", CKV_MAX_TOKENS);
		}
		rc = ckv_store_tokens(s, pm, &tokens, &e);
		ckv_manifest_free(pm);
		free(pm);
		if (rc < 0) {
			ckv_store_close(s);
			return fail("gen", "--extends: %s", e.msg);
		}
		uint32_t *nt = realloc(tokens, ((size_t)base_n + (size_t)ntok) * 4);
		if (!nt) {
			free(tokens);
			ckv_store_close(s);
			return fail("gen", "out of memory");
		}
		tokens = nt;
	} else {
		tokens = malloc((size_t)ntok * 4);
		if (!tokens) {
			ckv_store_close(s);
			return fail("gen", "out of memory");
		}
	}
	if (nosync)
		ckv_store_set_nosync(s, true);
	for (long it = 0; it < count; it++) {
		n = base_n + (uint32_t)ntok;
		for (uint32_t i = base_n; i < n; i++)
			tokens[i] = gen_token((uint64_t)seed + (uint64_t)it, i);
		m = ckv_chunks_for(n, g.chunk_tokens);

		if (plant > 0) {
			uint32_t first = base_n / g.chunk_tokens, avail, want, got = 0;
			uint64_t st = splitmix64(((uint64_t)seed + (uint64_t)it) ^ 0x51a7ull);
			free(planted);
			free(dirs);
			planted = calloc(m, 1);
			dirs = malloc(sizeof(float) * g.layers * g.kv_heads * g.head_dim);
			if (!planted || !dirs) {
				rc = fail("gen", "out of memory");
				goto out;
			}
			/* candidates: new chunks except the first and the last (always selected anyway) */
			if (first < 1)
				first = 1;
			avail = m > first + 1 ? m - 1 - first : 0;
			want = (uint32_t)llround(plant * (double)m);
			if (want < 1)
				want = 1;
			if (want > avail) {
				rc = usage_err("gen", "--plant %.3f: %u chunks wanted but only %u new chunks can be planted", plant, want, avail);
				goto out;
			}
			while (got < want) {
				uint32_t j = first + (uint32_t)((st = splitmix64(st)) % avail);
				if (!planted[j]) {
					planted[j] = 1;
					got++;
				}
			}
			for (size_t v = 0; v < (size_t)g.layers * g.kv_heads; v++) {
				float *d = dirs + v * g.head_dim, norm = 0;
				for (uint32_t k = 0; k < g.head_dim; k++) {
					st = splitmix64(st);
					d[k] = (float)((double)(st >> 11) / 9007199254740992.0 - 0.5);
					norm += d[k] * d[k];
				}
				norm = sqrtf(norm);
				for (uint32_t k = 0; k < g.head_dim; k++)
					d[k] /= norm;
			}
		}

		{
			struct gen_ctx x = { .g = &g, .tokens = tokens, .n = n, .seed = (uint64_t)seed + (uint64_t)it,
					     .planted = planted, .dirs = dirs };
			ckv_import_opts o = { .progress = progress_cb, .progress_arg = &pr };
			progress_init(&pr);
			rc = ckv_store_publish(s, &g, tokens, n, gen_fill, &x, &o, &r, &e);
			progress_end(&pr);
		}
		if (rc < 0) {
			rc = fail("gen", "%s", e.msg);
			goto out;
		}
		{
			char hex[CKV_HASH_HEX + 1], b[32];
			ckv_hash_hex(&r.hash, hex);
			if (planted) {
				char def[64];
				snprintf(def, sizeof(def), "%s.plant.json", hex);
				if ((rc = write_plant("gen", plant_out ? plant_out : def, &g, &r.hash, plant, planted, m, dirs)))
					goto out;
			}
			if (!quiet && count == 1) {
				human(r.bytes_written, b, sizeof(b));
				printf("model %s  tokens %u  chunks %u  %s\n", g.model, n, m,
				       r.existed ? "(already stored)" : "");
				printf("new chunks %u  shared chunks %u  written %s\n", r.new_chunks, r.shared_chunks, b);
			}
			printf("%s\n", hex);
		}
	}
	rc = 0;
out:
	free(planted);
	free(dirs);
	free(tokens);
	ckv_store_close(s);
	return rc;
}

/* ---- import / export -------------------------------------------------------------- */

static int cmd_import(int argc, char **argv)
{
	bool quiet = false;
	const char *expect = NULL;
	ckv_hash eh;
	ckv_store *s;
	ckv_import_result r;
	ckv_err e;
	struct progress pr;
	int c, rc;

	while ((c = getopt(argc, argv, "hqH:")) != -1) {
		switch (c) {
		case 'h':
			printf("usage: ckv import [-q] [-H HASH] STORE DIR\n\n"
			       "Import an exported cache directory (manifest.json, tokens.bin, layer_NNN.kv,\n"
			       "optional sums.xxh3). Everything is verified before anything is published;\n"
			       "chunks the store already holds (longest chain match) are not written again.\n"
			       "  -H HASH  require the tokens to hash to HASH\n  -q  print only the hash\n");
			return 0;
		case 'q':
			quiet = true;
			break;
		case 'H':
			expect = optarg;
			break;
		default:
			return usage_err("import", "unknown option");
		}
	}
	if (argc - optind != 2)
		return usage_err("import", "expected two arguments: STORE DIR");
	if (expect && parse_hash_arg("import", expect, &eh))
		return EXIT_USAGE;
	if ((rc = open_store("import", argv[optind], &s)))
		return rc;
	{
		ckv_import_opts o = { .progress = progress_cb, .progress_arg = &pr };
		progress_init(&pr);
		rc = ckv_store_import(s, argv[optind + 1], expect ? &eh : NULL, &o, &r, &e);
		progress_end(&pr);
	}
	ckv_store_close(s);
	if (rc < 0)
		return fail("import", "%s", e.msg);
	{
		char hex[CKV_HASH_HEX + 1], b[32];
		ckv_hash_hex(&r.hash, hex);
		if (!quiet) {
			human(r.bytes_written, b, sizeof(b));
			if (r.existed)
				printf("already stored\n");
			else
				printf("new chunks %u  shared chunks %u  written %s\n", r.new_chunks, r.shared_chunks, b);
		}
		printf("%s\n", hex);
	}
	return 0;
}

static int cmd_export(int argc, char **argv)
{
	ckv_store *s;
	ckv_hash h;
	ckv_err e;
	struct progress pr;
	int c, rc;
	while ((c = getopt(argc, argv, "h")) != -1) {
		if (c == 'h') {
			printf("usage: ckv export STORE HASH DIR\n\nWrite a prefix as a cache directory (created; must be empty):\n"
			       "manifest.json, tokens.bin, layer_NNN.kv, sums.xxh3, with the file times it was imported with.\n"
			       "Every chunk is checked against its checksum on the way.\n");
			return 0;
		}
		return usage_err("export", "unknown option");
	}
	if (argc - optind != 3)
		return usage_err("export", "expected three arguments: STORE HASH DIR");
	if (parse_hash_arg("export", argv[optind + 1], &h))
		return EXIT_USAGE;
	if ((rc = open_store("export", argv[optind], &s)))
		return rc;
	progress_init(&pr);
	rc = ckv_store_export(s, &h, argv[optind + 2], progress_cb, &pr, &e);
	progress_end(&pr);
	ckv_store_close(s);
	if (rc < 0)
		return fail("export", "%s", e.msg);
	return 0;
}

/* ---- ls / stat ------------------------------------------------------------------------ */

struct ls_ctx {
	const char *model;
	bool json;
	json_t *arr;
	unsigned count;
};

static bool model_matches(const char *filter, const ckv_geom *g)
{
	ckv_geom p;
	if (!filter)
		return true;
	if (!strcasecmp(filter, g->model))
		return true;
	return ckv_geom_preset(&p, filter) == 0 && !strcmp(p.model, g->model);
}

static json_t *prefix_json(const ckv_manifest *m)
{
	char hex[CKV_HASH_HEX + 1];
	ckv_hash_hex(&m->hash, hex);
	return json_pack("{s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "hash", hex,
			 "model", m->geom.model, "dtype", ckv_dtype_name(m->geom.dtype),
			 "layers", (json_int_t)m->geom.layers, "kv_heads", (json_int_t)m->geom.kv_heads,
			 "head_dim", (json_int_t)m->geom.head_dim, "chunk_tokens", (json_int_t)m->geom.chunk_tokens,
			 "tokens", (json_int_t)m->tokens, "chunks", (json_int_t)m->chunks,
			 "bytes", (json_int_t)((uint64_t)m->chunks * m->geom.chunk_bytes * m->geom.layers),
			 "extents", (json_int_t)m->nextents, "created", (json_int_t)m->created);
}

static int ls_one(void *arg, const ckv_manifest *m)
{
	struct ls_ctx *x = arg;
	char hex[CKV_HASH_HEX + 1], b[32], when[32];
	time_t t = (time_t)m->created;
	struct tm tm;
	if (!model_matches(x->model, &m->geom))
		return 0;
	x->count++;
	if (x->json) {
		json_array_append_new(x->arr, prefix_json(m));
		return 0;
	}
	ckv_hash_hex(&m->hash, hex);
	human((uint64_t)m->chunks * m->geom.chunk_bytes * m->geom.layers, b, sizeof(b));
	localtime_r(&t, &tm);
	strftime(when, sizeof(when), "%Y-%m-%d %H:%M", &tm);
	printf("%s  %-20s %-8s %8u %7u %10s  %s\n", hex, m->geom.model, ckv_dtype_name(m->geom.dtype),
	       m->tokens, m->chunks, b, when);
	return 0;
}

static int cmd_ls(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "model", required_argument, NULL, 'm' },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct ls_ctx x = { 0 };
	ckv_store *s;
	int c, rc;
	while ((c = getopt_long(argc, argv, "hm:", lo, NULL)) != -1) {
		switch (c) {
		case 'h':
			printf("usage: ckv ls STORE [--model M] [--json]\n\nList stored prefixes (hash order).\n");
			return 0;
		case 'm':
			x.model = optarg;
			break;
		case OPT_JSON:
			x.json = true;
			break;
		default:
			return usage_err("ls", "unknown option");
		}
	}
	if (argc - optind != 1)
		return usage_err("ls", "expected one argument: STORE");
	if ((rc = open_store("ls", argv[optind], &s)))
		return rc;
	if (x.json)
		x.arr = json_array();
	else if (isatty(STDOUT_FILENO))
		printf("%-32s  %-20s %-8s %8s %7s %10s  %s\n", "HASH", "MODEL", "DTYPE", "TOKENS", "CHUNKS", "SIZE", "CREATED");
	rc = ckv_store_list(s, ls_one, &x);
	ckv_store_close(s);
	if (rc < 0)
		return fail("ls", "%s: %s", argv[optind], strerror(-rc));
	if (x.json) {
		char *out = json_dumps(x.arr, JSON_INDENT(2));
		printf("%s\n", out ? out : "[]");
		free(out);
		json_decref(x.arr);
	}
	return 0;
}

static int cmd_stat(int argc, char **argv)
{
	bool js = false;
	ckv_store *s;
	ckv_hash h;
	ckv_manifest *m;
	ckv_stat_info st;
	ckv_err e;
	int c, rc;
	static const struct option lo[] = {
		{ "json", no_argument, NULL, OPT_JSON }, { "help", no_argument, NULL, 'h' }, { NULL, 0, NULL, 0 },
	};
	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		if (c == 'h') {
			printf("usage: ckv stat STORE HASH [--json]\n\nShape, tokens, extents and bytes of one prefix:\n"
			       "bytes it reads, of which shared with other prefixes, and bytes on disk of its segments.\n");
			return 0;
		}
		if (c == OPT_JSON)
			js = true;
		else
			return usage_err("stat", "unknown option");
	}
	if (argc - optind != 2)
		return usage_err("stat", "expected two arguments: STORE HASH");
	if (parse_hash_arg("stat", argv[optind + 1], &h))
		return EXIT_USAGE;
	if ((rc = open_store("stat", argv[optind], &s)))
		return rc;
	rc = ckv_store_get(s, &h, &m, &e);
	if (rc < 0) {
		ckv_store_close(s);
		return fail("stat", "%s", e.msg);
	}
	ckv_store_stat(s, m, &st);
	ckv_store_close(s);
	if (js) {
		json_t *o = prefix_json(m), *ex = json_array();
		char *out;
		for (uint32_t i = 0; i < m->nextents; i++)
			json_array_append_new(ex, json_pack("{s:s, s:I, s:I}", "segment", m->extents[i].segment,
							    "first", (json_int_t)m->extents[i].first,
							    "count", (json_int_t)m->extents[i].count));
		json_object_set_new(o, "extents", ex);
		json_object_set_new(o, "bytes_shared", json_integer((json_int_t)st.bytes_shared));
		json_object_set_new(o, "bytes_on_disk", json_integer((json_int_t)st.bytes_on_disk));
		json_object_set_new(o, "chunk_bytes", json_integer((json_int_t)m->geom.chunk_bytes));
		out = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
		printf("%s\n", out);
		free(out);
		json_decref(o);
	} else {
		char hex[CKV_HASH_HEX + 1], a[32], b[32], d[32];
		ckv_hash_hex(&m->hash, hex);
		human(st.bytes_total, a, sizeof(a));
		human(st.bytes_shared, b, sizeof(b));
		human(st.bytes_on_disk, d, sizeof(d));
		printf("prefix      %s\n", hex);
		printf("model       %s%s%s\n", m->geom.model, m->geom.salt[0] ? "  salt " : "", m->geom.salt);
		printf("shape       %s, %u layers, %u kv heads, head dim %u, %u tokens per chunk\n",
		       ckv_dtype_name(m->geom.dtype), m->geom.layers, m->geom.kv_heads, m->geom.head_dim,
		       m->geom.chunk_tokens);
		printf("chunk       %" PRIu64 " bytes (KV-HCD)\n", m->geom.chunk_bytes);
		printf("tokens      %u in %u chunks\n", m->tokens, m->chunks);
		printf("bytes       %s (%" PRIu64 ")\n", a, st.bytes_total);
		printf("shared      %s (%" PRIu64 ") in segments other prefixes also use\n", b, st.bytes_shared);
		printf("on disk     %s (%" PRIu64 ") in its segments and manifest\n", d, st.bytes_on_disk);
		printf("extents     %u\n", m->nextents);
		for (uint32_t i = 0, j = 0; i < m->nextents; j += m->extents[i].count, i++)
			printf("  chunks %6u..%-6u  segment %s  [%u, %u)\n", j, j + m->extents[i].count - 1,
			       m->extents[i].segment, m->extents[i].first, m->extents[i].first + m->extents[i].count);
	}
	ckv_manifest_free(m);
	free(m);
	return 0;
}

/* ---- match / hash -------------------------------------------------------------------- */

static int cmd_match_or_hash(int argc, char **argv, bool is_match)
{
	static const struct option lo[] = {
		SHAPE_LONGOPTS,
		{ "tokens", required_argument, NULL, 'n' },
		{ "tokens-txt", required_argument, NULL, OPT_TOKENS_TXT },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *cmd = is_match ? "match" : "hash", *err, *tfile = NULL;
	struct shape_opts so = { 0 };
	bool text = false;
	uint32_t *tokens = NULL, n = 0;
	ckv_geom g;
	int c, rc;

	while ((c = getopt_long(argc, argv, "hm:n:", lo, NULL)) != -1) {
		switch (c) {
		case 'h':
			if (is_match)
				printf("usage: ckv match STORE --model M --tokens FILE\n\n"
				       "Longest stored prefix of the tokens in FILE (u32 little-endian; --tokens-txt for\n"
				       "decimal text). Binary search over the chain: O(log m) index look-ups.\n"
				       "Exit 1 when no stored prefix shares even one token.\n");
			else
				printf("usage: ckv hash --model M --tokens FILE\n\n"
				       "Print the fingerprint, seed and token chain of FILE (u32 little-endian;\n"
				       "--tokens-txt for decimal text): one line per chunk, then the prefix hash.\n");
			return 0;
		case 'n':
			tfile = optarg;
			break;
		case OPT_TOKENS_TXT:
			tfile = optarg;
			text = true;
			break;
		default:
			rc = shape_opt(&so, c, optarg, &err);
			if (rc < 0)
				return usage_err(cmd, "%s", err);
			if (rc > 0)
				return usage_err(cmd, "unknown option");
		}
	}
	if (argc - optind != (is_match ? 1 : 0))
		return usage_err(cmd, is_match ? "expected one argument: STORE" : "expected no arguments");
	if (!tfile)
		return usage_err(cmd, "--tokens FILE is required");
	if (shape_geom(&so, &g, &err) < 0)
		return usage_err(cmd, "%s", err);
	if ((rc = read_tokens(cmd, tfile, text, &tokens, &n)))
		return rc;
	if (is_match) {
		ckv_store *s;
		ckv_hash h;
		uint32_t matched, lookups;
		if ((rc = open_store(cmd, argv[optind], &s))) {
			free(tokens);
			return rc;
		}
		rc = ckv_store_match(s, &g, tokens, n, &h, &matched, &lookups);
		ckv_store_close(s);
		free(tokens);
		if (rc < 0)
			return fail(cmd, "%s", strerror(-rc));
		if (!matched) {
			printf("no stored prefix matches (%u look-ups)\n", lookups);
			return 1;
		}
		{
			char hex[CKV_HASH_HEX + 1];
			ckv_hash_hex(&h, hex);
			printf("matched %u of %u tokens (%u look-ups)\n%s\n", matched, n, lookups, hex);
		}
		return 0;
	} else {
		char fp[512], hex[CKV_HASH_HEX + 1];
		uint32_t m = ckv_chunks_for(n, g.chunk_tokens);
		ckv_hash *chain = malloc(sizeof(*chain) * m);
		if (!chain) {
			free(tokens);
			return fail(cmd, "out of memory");
		}
		ckv_chain(&g, tokens, n, chain);
		ckv_geom_fingerprint(&g, fp, sizeof(fp));
		printf("fingerprint %s\nseed 0x%016" PRIx64 "\n", fp, g.seed);
		for (uint32_t j = 0; j < m; j++) {
			uint32_t k = (j + 1) * (uint64_t)g.chunk_tokens <= n ? g.chunk_tokens : n - j * g.chunk_tokens;
			ckv_hash_hex(&chain[j], hex);
			printf("chunk %u %u %s\n", j, k, hex);
		}
		ckv_hash_hex(&chain[m - 1], hex);
		printf("prefix %s\n", hex);
		free(chain);
		free(tokens);
		return 0;
	}
}

/* ---- verify / rm / gc / reindex ------------------------------------------------------------ */

static void verify_print(void *arg, const char *problem)
{
	(void)arg;
	fprintf(stderr, "ckv verify: %s\n", problem);
}

static int cmd_verify(int argc, char **argv)
{
	ckv_store *s;
	ckv_hash h;
	struct progress pr;
	int c, rc;
	while ((c = getopt(argc, argv, "h")) != -1) {
		if (c == 'h') {
			printf("usage: ckv verify STORE [HASH]\n\nCheck every chunk of one prefix (or all) against sums.xxh3, the\n"
			       "segment sizes and the token chain. Each problem names the file, layer and chunk; exit 1 if any.\n");
			return 0;
		}
		return usage_err("verify", "unknown option");
	}
	if (argc - optind < 1 || argc - optind > 2)
		return usage_err("verify", "expected STORE [HASH]");
	if (argc - optind == 2 && parse_hash_arg("verify", argv[optind + 1], &h))
		return EXIT_USAGE;
	if ((rc = open_store("verify", argv[optind], &s)))
		return rc;
	progress_init(&pr);
	rc = ckv_store_verify(s, argc - optind == 2 ? &h : NULL, verify_print, NULL, progress_cb, &pr);
	progress_end(&pr);
	ckv_store_close(s);
	if (rc < 0)
		return fail("verify", "%s: %s", argc - optind == 2 ? argv[optind + 1] : argv[optind],
			    rc == -ENOENT ? "no such prefix" : strerror(-rc));
	if (rc > 0) {
		printf("%d problem%s found\n", rc, rc == 1 ? "" : "s");
		return 1;
	}
	printf("ok\n");
	return 0;
}

static int cmd_rm(int argc, char **argv)
{
	ckv_store *s;
	ckv_err e;
	int c, rc;
	while ((c = getopt(argc, argv, "h")) != -1) {
		if (c == 'h') {
			printf("usage: ckv rm STORE HASH...\n\nRemove prefixes. Chunks other prefixes share stay; 'ckv gc' frees the rest.\n");
			return 0;
		}
		return usage_err("rm", "unknown option");
	}
	if (argc - optind < 2)
		return usage_err("rm", "expected STORE HASH...");
	for (int i = optind + 1; i < argc; i++) {
		ckv_hash h;
		if (parse_hash_arg("rm", argv[i], &h))
			return EXIT_USAGE;
	}
	if ((rc = open_store("rm", argv[optind], &s)))
		return rc;
	for (int i = optind + 1; i < argc; i++) {
		ckv_hash h;
		ckv_hash_parse(&h, argv[i]);
		if (ckv_store_rm(s, &h, &e) < 0) {
			rc = fail("rm", "%s", e.msg);
			break;
		}
	}
	ckv_store_close(s);
	return rc;
}

static int cmd_gc(int argc, char **argv)
{
	ckv_store *s;
	ckv_gc_result r;
	ckv_err e;
	char b[32];
	int c, rc;
	while ((c = getopt(argc, argv, "h")) != -1) {
		if (c == 'h') {
			printf("usage: ckv gc STORE\n\nRemove segments no prefix references and leftovers of interrupted imports;\nprint the bytes freed.\n");
			return 0;
		}
		return usage_err("gc", "unknown option");
	}
	if (argc - optind != 1)
		return usage_err("gc", "expected one argument: STORE");
	if ((rc = open_store("gc", argv[optind], &s)))
		return rc;
	rc = ckv_store_gc(s, &r, &e);
	ckv_store_close(s);
	if (rc < 0)
		return fail("gc", "%s", e.msg);
	human(r.bytes, b, sizeof(b));
	printf("removed %" PRIu64 " segments, %" PRIu64 " staging areas, %" PRIu64 " stray records; freed %s (%" PRIu64 " bytes)\n",
	       r.segments, r.staging, r.manifests, b, r.bytes);
	return 0;
}

static int cmd_reindex(int argc, char **argv)
{
	ckv_store *s;
	ckv_err e;
	uint64_t gen, n, kq = 0;
	int c, rc;
	while ((c = getopt(argc, argv, "h")) != -1) {
		if (c == 'h') {
			printf("usage: ckv reindex STORE\n\nRebuild the LMDB index from the manifest and segment files.\n"
			       "Segments written before key copies (keyq.bin) existed get one.\n");
			return 0;
		}
		return usage_err("reindex", "unknown option");
	}
	if (argc - optind != 1)
		return usage_err("reindex", "expected one argument: STORE");
	if ((rc = ckv_store_open_rebuild(argv[optind], &s, &e)))
		return fail("reindex", "%s", e.msg);
	rc = ckv_store_reindex(s, &kq, &e);
	if (rc == 0)
		ckv_store_generation(s, &gen, &n);
	ckv_store_close(s);
	if (rc < 0)
		return fail("reindex", "%s", e.msg);
	printf("indexed %" PRIu64 " prefixes\n", n);
	if (kq)
		printf("wrote key copies (keyq.bin) for %" PRIu64 " segments\n", kq);
	return 0;
}

/* ---- main ------------------------------------------------------------------------------------ */

static const struct command {
	const char *name;
	int (*fn)(int, char **);
	const char *summary;
} commands[] = {
	{ "init", cmd_init, "create a store" },
	{ "gen", cmd_gen, "generate a synthetic cache with a real model's shape" },
	{ "import", cmd_import, "import an exported cache directory" },
	{ "export", cmd_export, "export a prefix as a cache directory" },
	{ "ls", cmd_ls, "list prefixes" },
	{ "stat", cmd_stat, "show one prefix: shape, extents, shared bytes" },
	{ "match", NULL, "longest stored prefix of a token sequence" },
	{ "hash", NULL, "print the token chain and prefix hash" },
	{ "verify", cmd_verify, "check every checksum" },
	{ "rm", cmd_rm, "remove prefixes" },
	{ "gc", cmd_gc, "free unreferenced segments and import leftovers" },
	{ "reindex", cmd_reindex, "rebuild the index from the files" },
};

static void usage(FILE *f)
{
	fprintf(f, "usage: ckv COMMAND [ARGS]   (ckv COMMAND -h for details)\n\ncommands:\n");
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		fprintf(f, "  %-8s %s\n", commands[i].name, commands[i].summary);
	fprintf(f, "\n  -h  this help    -V  version\n");
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return EXIT_USAGE;
	}
	if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(argv[1], "-V") || !strcmp(argv[1], "--version")) {
		printf("ckv %s (format %u)\n", ckv_version(), CKV_FORMAT_VERSION);
		return 0;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strcmp(argv[1], commands[i].name))
			continue;
		optind = 1;
		if (!strcmp(argv[1], "match"))
			return cmd_match_or_hash(argc - 1, argv + 1, true);
		if (!strcmp(argv[1], "hash"))
			return cmd_match_or_hash(argc - 1, argv + 1, false);
		return commands[i].fn(argc - 1, argv + 1);
	}
	fprintf(stderr, "ckv: unknown command '%s'\n", argv[1]);
	usage(stderr);
	return EXIT_USAGE;
}
