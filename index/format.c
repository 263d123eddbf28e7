/*
 * format.c — geometry, dtypes, the xxHash token chain, manifests and the
 * sums / digest side files. Pure computation; see docs/FORMAT.md.
 */
#include "ckv_format.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define STR2(x) #x
#define STR(x) STR2(x)

const char *ckv_version(void)
{
	return STR(CKV_VERSION_MAJOR) "." STR(CKV_VERSION_MINOR) "." STR(CKV_VERSION_PATCH);
}

int ckv_errf(ckv_err *e, int rc, const char *fmt, ...)
{
	if (e) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
		va_end(ap);
	}
	return rc;
}

/* ---- dtypes ---------------------------------------------------------------- */

static const struct {
	const char *name;
	unsigned size;
} dtypes[] = {
	[CKV_DTYPE_BF16] = { "bf16", 2 },
	[CKV_DTYPE_FP16] = { "fp16", 2 },
	[CKV_DTYPE_FP8_E4M3] = { "fp8_e4m3", 1 },
	[CKV_DTYPE_FP32] = { "fp32", 4 },
};

const char *ckv_dtype_name(ckv_dtype t)
{
	if (t <= CKV_DTYPE_INVALID || t > CKV_DTYPE_FP32)
		return "invalid";
	return dtypes[t].name;
}

ckv_dtype ckv_dtype_parse(const char *name)
{
	for (int t = CKV_DTYPE_BF16; t <= CKV_DTYPE_FP32; t++)
		if (name && strcmp(name, dtypes[t].name) == 0)
			return (ckv_dtype)t;
	return CKV_DTYPE_INVALID;
}

unsigned ckv_dtype_size(ckv_dtype t)
{
	if (t <= CKV_DTYPE_INVALID || t > CKV_DTYPE_FP32)
		return 0;
	return dtypes[t].size;
}

static float f32_from_bits(uint32_t u)
{
	float f;
	memcpy(&f, &u, sizeof(f));
	return f;
}

static float fp16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
	if (exp == 0) {
		float v = ldexpf((float)man, -24);
		return sign ? -v : v;
	}
	if (exp == 31)
		return f32_from_bits(sign | 0x7f800000u | (man << 13));
	return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

/* OCP fp8 E4M3 (FN): bias 7, no infinities, S.1111.111 is NaN. */
static float fp8_e4m3_to_f32(uint8_t b)
{
	int sign = b >> 7, exp = (b >> 3) & 0xf, man = b & 7;
	float v;
	if (exp == 0xf && man == 7)
		return NAN;
	if (exp == 0)
		v = ldexpf((float)man, -9);
	else
		v = ldexpf(1.0f + (float)man / 8.0f, exp - 7);
	return sign ? -v : v;
}

float ckv_dtype_to_f32(ckv_dtype t, const void *p)
{
	uint16_t h;
	uint32_t u;
	switch (t) {
	case CKV_DTYPE_BF16:
		memcpy(&h, p, 2);
		return f32_from_bits((uint32_t)h << 16);
	case CKV_DTYPE_FP16:
		memcpy(&h, p, 2);
		return fp16_to_f32(h);
	case CKV_DTYPE_FP8_E4M3:
		return fp8_e4m3_to_f32(*(const uint8_t *)p);
	case CKV_DTYPE_FP32:
		memcpy(&u, p, 4);
		return f32_from_bits(u);
	default:
		return NAN;
	}
}

/* ---- geometry ---------------------------------------------------------------- */

static const struct preset {
	const char *name, *model;
	uint32_t layers, kv_heads, head_dim;
} presets[] = {
	{ "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 24, 2, 64 },
	{ "qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", 28, 2, 128 },
	{ "qwen2.5-3b", "Qwen/Qwen2.5-3B", 36, 2, 128 },
	{ "qwen2.5-7b", "Qwen/Qwen2.5-7B", 28, 4, 128 },
	{ "qwen2.5-14b", "Qwen/Qwen2.5-14B", 48, 8, 128 },
	{ "qwen2.5-32b", "Qwen/Qwen2.5-32B", 64, 8, 128 },
	{ "qwen2.5-72b", "Qwen/Qwen2.5-72B", 80, 8, 128 },
};

static const char *const preset_names[] = {
	"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b",
	"qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", NULL,
};

const char *const *ckv_geom_preset_names(void)
{
	return preset_names;
}

int ckv_geom_preset(ckv_geom *g, const char *name)
{
	for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++) {
		if (strcasecmp(name, presets[i].name) != 0)
			continue;
		memset(g, 0, sizeof(*g));
		snprintf(g->model, sizeof(g->model), "%s", presets[i].model);
		g->dtype = CKV_DTYPE_BF16;
		g->layers = presets[i].layers;
		g->kv_heads = presets[i].kv_heads;
		g->head_dim = presets[i].head_dim;
		g->chunk_tokens = 16;
		return ckv_geom_init(g, NULL);
	}
	return -ENOENT;
}

static bool id_ok(const char *s)
{
	/* printable ASCII without '|' (the fingerprint separator) */
	for (; *s; s++)
		if (*s < 0x21 || *s > 0x7e || *s == '|')
			return false;
	return true;
}

int ckv_geom_init(ckv_geom *g, ckv_err *e)
{
	char fp[512];
	unsigned es = ckv_dtype_size(g->dtype);
	int n;

	if (!g->model[0] || !id_ok(g->model))
		return ckv_errf(e, -EINVAL, "model: expected a non-empty printable id without spaces or '|', got \"%s\"", g->model);
	if (!id_ok(g->salt))
		return ckv_errf(e, -EINVAL, "salt: expected printable characters without spaces or '|'");
	if (!es)
		return ckv_errf(e, -EINVAL, "dtype: expected bf16, fp16, fp8_e4m3 or fp32");
	if (g->layers < 1 || g->layers > CKV_MAX_LAYERS)
		return ckv_errf(e, -EINVAL, "layers: expected 1..%u, got %u", CKV_MAX_LAYERS, g->layers);
	if (g->kv_heads < 1 || g->kv_heads > CKV_MAX_KV_HEADS)
		return ckv_errf(e, -EINVAL, "kv_heads: expected 1..%u, got %u", CKV_MAX_KV_HEADS, g->kv_heads);
	if (g->head_dim < 1 || g->head_dim > CKV_MAX_HEAD_DIM)
		return ckv_errf(e, -EINVAL, "head_dim: expected 1..%u, got %u", CKV_MAX_HEAD_DIM, g->head_dim);
	if (g->chunk_tokens < 1 || g->chunk_tokens > CKV_MAX_CHUNK_TOKENS)
		return ckv_errf(e, -EINVAL, "chunk_tokens: expected 1..%u, got %u", CKV_MAX_CHUNK_TOKENS, g->chunk_tokens);
	g->half_bytes = (uint64_t)g->kv_heads * g->chunk_tokens * g->head_dim * es;
	g->chunk_bytes = (2 * g->half_bytes + CKV_ALIGN - 1) / CKV_ALIGN * CKV_ALIGN;
	if (g->chunk_bytes > CKV_MAX_CHUNK_BYTES)
		return ckv_errf(e, -EOVERFLOW, "chunk size %" PRIu64 " bytes (kv_heads x chunk_tokens x head_dim) exceeds %llu",
				g->chunk_bytes, CKV_MAX_CHUNK_BYTES);
	n = ckv_geom_fingerprint(g, fp, sizeof(fp));
	if (n < 0)
		return ckv_errf(e, n, "model: id too long");
	g->seed = XXH3_64bits(fp, (size_t)n);
	return 0;
}

int ckv_geom_fingerprint(const ckv_geom *g, char *buf, size_t len)
{
	int n = snprintf(buf, len, "ckv1|model=%s|salt=%s|dtype=%s|layers=%u|kv_heads=%u|head_dim=%u|chunk=%u",
			 g->model, g->salt, ckv_dtype_name(g->dtype), g->layers, g->kv_heads,
			 g->head_dim, g->chunk_tokens);
	if (n < 0 || (size_t)n >= len)
		return -ENAMETOOLONG;
	return n;
}

/* ---- hashes ---------------------------------------------------------------- */

void ckv_hash_hex(const ckv_hash *h, char out[CKV_HASH_HEX + 1])
{
	static const char hx[] = "0123456789abcdef";
	for (int i = 0; i < 16; i++) {
		out[2 * i] = hx[h->b[i] >> 4];
		out[2 * i + 1] = hx[h->b[i] & 15];
	}
	out[CKV_HASH_HEX] = 0;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

int ckv_hash_parse(ckv_hash *h, const char *hex)
{
	if (!hex || strlen(hex) != CKV_HASH_HEX)
		return -EINVAL;
	for (int i = 0; i < 16; i++) {
		int a = hexval(hex[2 * i]), b = hexval(hex[2 * i + 1]);
		if (a < 0 || b < 0)
			return -EINVAL;
		h->b[i] = (uint8_t)(a << 4 | b);
	}
	return 0;
}

bool ckv_hash_eq(const ckv_hash *a, const ckv_hash *b)
{
	return memcmp(a->b, b->b, 16) == 0;
}

void ckv_tokens_to_le(uint8_t *dst, const uint32_t *t, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		dst[4 * i] = (uint8_t)t[i];
		dst[4 * i + 1] = (uint8_t)(t[i] >> 8);
		dst[4 * i + 2] = (uint8_t)(t[i] >> 16);
		dst[4 * i + 3] = (uint8_t)(t[i] >> 24);
	}
}

void ckv_tokens_from_le(uint32_t *dst, const uint8_t *src, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = (uint32_t)src[4 * i] | (uint32_t)src[4 * i + 1] << 8 |
			 (uint32_t)src[4 * i + 2] << 16 | (uint32_t)src[4 * i + 3] << 24;
}

void ckv_chain_step(const ckv_hash *prev, const uint32_t *tokens, uint32_t n, uint64_t seed,
		    ckv_hash *out)
{
	uint8_t buf[16 + 4 * CKV_MAX_CHUNK_TOKENS];
	size_t off = 0;
	XXH128_canonical_t c;

	if (n > CKV_MAX_CHUNK_TOKENS)
		n = CKV_MAX_CHUNK_TOKENS; /* callers pass at most one chunk */
	if (prev) {
		memcpy(buf, prev->b, 16);
		off = 16;
	}
	ckv_tokens_to_le(buf + off, tokens, n);
	XXH128_canonicalFromHash(&c, XXH3_128bits_withSeed(buf, off + 4 * (size_t)n, seed));
	memcpy(out->b, c.digest, 16);
}

void ckv_chain(const ckv_geom *g, const uint32_t *tokens, uint32_t n, ckv_hash *out)
{
	uint32_t c = g->chunk_tokens, m = ckv_chunks_for(n, c);
	for (uint32_t j = 0; j < m; j++) {
		uint32_t k = (j + 1) * (uint64_t)c <= n ? c : n - j * c;
		ckv_chain_step(j ? &out[j - 1] : NULL, tokens + (size_t)j * c, k, g->seed, &out[j]);
	}
}

void ckv_segment_id(const ckv_hash *last, uint32_t first, char out[80])
{
	char hex[CKV_HASH_HEX + 1];
	ckv_hash_hex(last, hex);
	snprintf(out, 80, "%s-%u", hex, first);
}

void ckv_layer_name(uint32_t layer, char out[32])
{
	snprintf(out, 32, "layer_%03u.kv", layer);
}

/* ---- checksums and digests ------------------------------------------------- */

uint64_t ckv_chunk_sum(const void *chunk, size_t len)
{
	return XXH3_64bits(chunk, len);
}

void ckv_sum_store(uint8_t out[8], uint64_t s)
{
	for (int i = 0; i < 8; i++)
		out[i] = (uint8_t)(s >> (56 - 8 * i));
}

uint64_t ckv_sum_load(const uint8_t in[8])
{
	uint64_t s = 0;
	for (int i = 0; i < 8; i++)
		s = s << 8 | in[i];
	return s;
}

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void ckv_side_header_encode(const ckv_side_header *h, uint8_t out[CKV_SIDE_HEADER])
{
	memset(out, 0, CKV_SIDE_HEADER);
	memcpy(out, h->magic, 8);
	put32(out + 8, h->version);
	put32(out + 12, h->layers);
	put32(out + 16, h->chunks);
	put32(out + 20, h->per_chunk);
	put32(out + 24, (uint32_t)h->reserved);
	put32(out + 28, (uint32_t)(h->reserved >> 32));
}

int ckv_side_header_decode(ckv_side_header *h, const uint8_t in[CKV_SIDE_HEADER],
			   const char *magic, const char *what, ckv_err *e)
{
	memcpy(h->magic, in, 8);
	if (memcmp(in, magic, 8) != 0)
		return ckv_errf(e, -EINVAL, "%s: bad magic, expected \"%.8s\"", what, magic);
	h->version = get32(in + 8);
	h->layers = get32(in + 12);
	h->chunks = get32(in + 16);
	h->per_chunk = get32(in + 20);
	h->reserved = (uint64_t)get32(in + 24) | (uint64_t)get32(in + 28) << 32;
	if (h->version != CKV_FORMAT_VERSION)
		return ckv_errf(e, -EPROTONOSUPPORT, "%s: format version %u, this build reads version %u",
				what, h->version, CKV_FORMAT_VERSION);
	return 0;
}

__attribute__((optimize("tree-vectorize"))) void ckv_chunk_digest(const ckv_geom *g, const void *chunk, uint32_t valid, float *out)
{
	const uint8_t *p = chunk;
	unsigned es = ckv_dtype_size(g->dtype);
	uint32_t D = g->head_dim, c = g->chunk_tokens;

	for (uint32_t h = 0; h < g->kv_heads; h++) {
		float *o = out + (size_t)h * D;
		memset(o, 0, sizeof(float) * D);
		for (uint32_t t = 0; t < valid; t++) {
			const uint8_t *row = p + (((size_t)h * c + t) * D) * es;
			if (g->dtype == CKV_DTYPE_BF16) {
				const uint16_t *r16 = (const void *)row;
				for (uint32_t d = 0; d < D; d++)
					o[d] += f32_from_bits((uint32_t)r16[d] << 16);
			} else {
				for (uint32_t d = 0; d < D; d++)
					o[d] += ckv_dtype_to_f32(g->dtype, row + (size_t)d * es);
			}
		}
		if (valid)
			for (uint32_t d = 0; d < D; d++)
				o[d] /= (float)valid;
	}
}

/* ---- keyq: the low-bit key copy ---------------------------------------------- */

uint16_t ckv_f32_to_bf16(float f)
{
	uint32_t u;

	memcpy(&u, &f, 4);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
	u += 0x7fffu + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

float ckv_bf16_to_f32(uint16_t h)
{
	return f32_from_bits((uint32_t)h << 16);
}

/*
 * Lloyd-Max quantisers of a unit Gaussian, thresholds and levels; written
 * as double literals narrowed to float, the values numpy and torch use for
 * the same decimals (gpu/python/ckv/prune.py mirrors them).
 */
static const double lm_th1[] = { 0.0 };
static const double lm_lv1[] = { -0.7979, 0.7979 };
static const double lm_th2[] = { -0.9816, 0.0, 0.9816 };
static const double lm_lv2[] = { -1.5104, -0.4528, 0.4528, 1.5104 };
static const double lm_th3[] = { -1.748, -1.050, -0.5006, 0.0, 0.5006, 1.050, 1.748 };
static const double lm_lv3[] = { -2.152, -1.344, -0.7560, -0.2451, 0.2451, 0.7560, 1.344, 2.152 };

/* The 4-bit code of z: uniform on +-3 (1-3 bits use the Lloyd-Max thresholds, in ckv_keyq_encode). */
static unsigned keyq_code_uniform(unsigned bits, float z)
{
	const unsigned n = 1u << bits;
	const float step = 6.0f / (float)n;
	float b = floorf((z + 3.0f) / step);

	if (!(b > 0.0f)) /* also NaN */
		return 0;
	return b > (float)(n - 1) ? n - 1 : (unsigned)b;
}

static float keyq_level(unsigned bits, unsigned code)
{
	static const double *const lv[] = { NULL, lm_lv1, lm_lv2, lm_lv3 };

	if (bits <= 3)
		return (float)lv[bits][code];
	{
		const float step = 6.0f / (float)(1u << bits);

		return ((float)code + 0.5f) * step - 3.0f;
	}
}

void ckv_keyq_levels(unsigned bits, float *lv)
{
	for (unsigned i = 0; i < (1u << bits); i++)
		lv[i] = keyq_level(bits, i);
}

void ckv_keyq_free(struct ckv_keyq *k)
{
	if (!k)
		return;
	free(k->first);
	free(k->scales);
	free(k->codes);
	memset(k, 0, sizeof(*k));
}

uint64_t ckv_keyq_chunk_bytes(const ckv_geom *g, unsigned bits)
{
	return ((uint64_t)g->kv_heads * g->chunk_tokens * g->head_dim * bits + 7) / 8;
}

uint64_t ckv_keyq_layer_bytes(const ckv_geom *g, unsigned bits, uint32_t chunks)
{
	return 4ull * g->kv_heads * g->head_dim + (uint64_t)chunks * ckv_keyq_chunk_bytes(g, bits);
}

#define KQ_TILE 256 /* head dimensions converted at a time */

/* n elements of a key row as fp32 (bf16: a shift; others through ckv_dtype_to_f32). */
static inline void row_to_f32(ckv_dtype dt, const uint8_t *row, uint32_t n, float *out)
{
	if (dt == CKV_DTYPE_BF16) {
		for (uint32_t d = 0; d < n; d++) {
			uint16_t h;

			memcpy(&h, row + 2 * (size_t)d, 2);
			out[d] = f32_from_bits((uint32_t)h << 16);
		}
		return;
	}
	for (uint32_t d = 0; d < n; d++)
		out[d] = ckv_dtype_to_f32(dt, row + (size_t)d * ckv_dtype_size(dt));
}

__attribute__((optimize("tree-vectorize"))) void
ckv_keyq_stats_add(const ckv_geom *g, const void *chunk, uint32_t valid, double *sum, double *sumsq)
{
	unsigned es = ckv_dtype_size(g->dtype);
	uint32_t D = g->head_dim, c = g->chunk_tokens;
	float x[KQ_TILE];

	for (uint32_t h = 0; h < g->kv_heads; h++)
		for (uint32_t t = 0; t < valid; t++) {
			const uint8_t *row = (const uint8_t *)chunk + (((size_t)h * c + t) * D) * es;

			for (uint32_t d0 = 0; d0 < D; d0 += KQ_TILE) {
				uint32_t n = D - d0 < KQ_TILE ? D - d0 : KQ_TILE;
				double *su = sum + (size_t)h * D + d0, *sq = sumsq + (size_t)h * D + d0;

				row_to_f32(g->dtype, row + (size_t)d0 * es, n, x);
				for (uint32_t d = 0; d < n; d++) {
					su[d] += x[d];
					sq[d] += (double)x[d] * x[d];
				}
			}
		}
}

void ckv_keyq_scales(const ckv_geom *g, const double *sum, const double *sumsq, uint64_t n,
		     uint16_t *scales)
{
	size_t HD = (size_t)g->kv_heads * g->head_dim;

	for (size_t i = 0; i < HD; i++) {
		double mu = n ? sum[i] / (double)n : 0.0;
		double var = n > 1 ? (sumsq[i] - (double)n * mu * mu) / (double)(n - 1) : 0.0;

		if (!(var > 0.0))
			var = 0.0;
		scales[i] = ckv_f32_to_bf16((float)mu);
		scales[HD + i] = ckv_f32_to_bf16((float)(sqrt(var) + 1e-6));
	}
}

/* Appends codes to a byte stream, LSB first (up to 32 bits at a time). */
struct bitw {
	uint8_t *o;
	uint64_t acc;
	unsigned nb;
};

/* Eight codes of `bits` bits as one value (shifts constant per width). */
static inline uint32_t pack8(const uint32_t *q, unsigned bits)
{
	uint32_t v = 0;

	switch (bits) {
	case 3:
		for (unsigned k = 0; k < 8; k++)
			v |= q[k] << (3 * k);
		return v;
	case 2:
		for (unsigned k = 0; k < 8; k++)
			v |= q[k] << (2 * k);
		return v;
	default:
		for (unsigned k = 0; k < 8; k++)
			v |= q[k] << (bits * k);
		return v;
	}
}

static inline void bitw_put(struct bitw *w, uint32_t v, unsigned nbits)
{
	w->acc |= (uint64_t)v << w->nb;
	w->nb += nbits;
	while (w->nb >= 8) {
		*w->o++ = (uint8_t)w->acc;
		w->acc >>= 8;
		w->nb -= 8;
	}
}

__attribute__((optimize("tree-vectorize"))) void
ckv_keyq_encode(const ckv_geom *g, unsigned bits, const uint16_t *scales, const void *chunk,
		uint32_t valid, uint8_t *codes)
{
	static const double *const thd[] = { NULL, lm_th1, lm_th2, lm_th3 };
	unsigned es = ckv_dtype_size(g->dtype), nth = (1u << bits) - 1;
	uint32_t D = g->head_dim, c = g->chunk_tokens;
	size_t HD = (size_t)g->kv_heads * D;
	uint64_t total = ckv_keyq_chunk_bytes(g, bits);
	struct bitw w = { codes, 0, 0 };
	float th[8], x[KQ_TILE], z[KQ_TILE], mu[KQ_TILE], sd[KQ_TILE];
	uint32_t q[KQ_TILE];

	for (unsigned i = 0; bits <= 3 && i < nth; i++)
		th[i] = (float)thd[bits][i];
	for (uint32_t h = 0; h < g->kv_heads; h++) {
		for (uint32_t t = 0; t < c; t++) {
			const uint8_t *row = (const uint8_t *)chunk + (((size_t)h * c + t) * D) * es;

			for (uint32_t d0 = 0; d0 < D; d0 += KQ_TILE) {
				uint32_t n = D - d0 < KQ_TILE ? D - d0 : KQ_TILE, d = 0;

				/* the scales of this tile as floats: once per head when one tile holds them */
				if (t == 0 || D > KQ_TILE)
					for (uint32_t k = 0; k < n; k++) {
						mu[k] = ckv_bf16_to_f32(scales[h * D + d0 + k]);
						sd[k] = ckv_bf16_to_f32(scales[HD + h * D + d0 + k]);
					}
				if (t >= valid) { /* padding: code 0 */
					memset(q, 0, sizeof(*q) * n);
				} else {
					row_to_f32(g->dtype, row + (size_t)d0 * es, n, x);
					for (uint32_t k = 0; k < n; k++)
						z[k] = (x[k] - mu[k]) / sd[k];
					/* bucket = thresholds strictly below z (z on a threshold goes down) */
					if (bits == 3) {
						for (uint32_t k = 0; k < n; k++)
							q[k] = (uint32_t)(th[0] < z[k]) + (th[1] < z[k]) + (th[2] < z[k]) +
							       (th[3] < z[k]) + (th[4] < z[k]) + (th[5] < z[k]) +
							       (th[6] < z[k]);
					} else if (bits <= 2) {
						for (uint32_t k = 0; k < n; k++) {
							uint32_t v = 0;

							for (unsigned i = 0; i < nth; i++)
								v += th[i] < z[k];
							q[k] = v;
						}
					} else {
						for (uint32_t k = 0; k < n; k++)
							q[k] = keyq_code_uniform(bits, z[k]);
					}
				}
				/* eight codes at a time: 8 x bits <= 32 bits, whole bytes when aligned */
				for (; d + 8 <= n; d += 8) {
					uint32_t v = pack8(q + d, bits);

					if (w.nb == 0) {
						for (unsigned k = 0; k < bits; k++)
							*w.o++ = (uint8_t)(v >> (8 * k));
					} else {
						bitw_put(&w, v, 8 * bits);
					}
				}
				for (; d < n; d++)
					bitw_put(&w, q[d], bits);
			}
		}
	}
	if (w.nb)
		*w.o++ = (uint8_t)w.acc;
	while ((uint64_t)(w.o - codes) < total)
		*w.o++ = 0;
}

void ckv_keyq_decode(const ckv_geom *g, unsigned bits, const uint16_t *scales,
		     const uint8_t *codes, float *out)
{
	uint32_t D = g->head_dim, c = g->chunk_tokens;
	size_t HD = (size_t)g->kv_heads * D;
	uint64_t nbytes = ckv_keyq_chunk_bytes(g, bits);
	unsigned mask = (1u << bits) - 1;
	float lv[16];

	ckv_keyq_levels(bits, lv);
	/* per (head, dimension): its scales once, then its c elements */
	for (uint32_t h = 0; h < g->kv_heads; h++)
		for (uint32_t d = 0; d < D; d++) {
			float mu = ckv_bf16_to_f32(scales[h * D + d]);
			float sd = ckv_bf16_to_f32(scales[HD + h * D + d]);

			for (uint32_t t = 0; t < c; t++) {
				size_t i = ((size_t)h * c + t) * D + d;
				uint64_t bit = (uint64_t)i * bits, byte = bit >> 3;
				/* a code of at most 4 bits spans at most two bytes */
				unsigned v = codes[byte] | (byte + 1 < nbytes ? (unsigned)codes[byte + 1] << 8 : 0);

				out[i] = mu + sd * lv[(v >> (bit & 7)) & mask];
			}
		}
}

/* ---- manifests --------------------------------------------------------------- */

void ckv_manifest_free(ckv_manifest *m)
{
	if (!m)
		return;
	free(m->extents);
	free(m->t_layers);
	m->extents = NULL;
	m->t_layers = NULL;
}

/* Fetch an unsigned integer field; range-checked. */
static int get_uint(json_t *o, const char *key, uint64_t max, bool required, uint64_t *out,
		    const char *what, ckv_err *e)
{
	json_t *v = json_object_get(o, key);
	json_int_t i;
	if (!v) {
		if (required)
			return ckv_errf(e, -EINVAL, "%s: missing field \"%s\"", what, key);
		return 1;
	}
	if (!json_is_integer(v))
		return ckv_errf(e, -EINVAL, "%s: field \"%s\": expected an integer", what, key);
	i = json_integer_value(v);
	if (i < 0 || (uint64_t)i > max)
		return ckv_errf(e, -ERANGE, "%s: field \"%s\": %lld out of range 0..%llu", what, key,
				(long long)i, (unsigned long long)max);
	*out = (uint64_t)i;
	return 0;
}

static int get_str(json_t *o, const char *key, bool required, const char **out,
		   const char *what, ckv_err *e)
{
	json_t *v = json_object_get(o, key);
	if (!v) {
		if (required)
			return ckv_errf(e, -EINVAL, "%s: missing field \"%s\"", what, key);
		*out = NULL;
		return 1;
	}
	if (!json_is_string(v))
		return ckv_errf(e, -EINVAL, "%s: field \"%s\": expected a string", what, key);
	*out = json_string_value(v);
	return 0;
}

static int get_time(json_t *v, ckv_ftime *t, const char *what, const char *key, ckv_err *e)
{
	json_t *a, *b;
	if (!json_is_array(v) || json_array_size(v) != 2 ||
	    !json_is_integer(a = json_array_get(v, 0)) || !json_is_integer(b = json_array_get(v, 1)) ||
	    json_integer_value(b) < 0 || json_integer_value(b) > 999999999)
		return ckv_errf(e, -EINVAL, "%s: times.%s: expected [seconds, nanoseconds]", what, key);
	t->sec = json_integer_value(a);
	t->nsec = (uint32_t)json_integer_value(b);
	return 0;
}

int ckv_manifest_parse(ckv_manifest *m, const char *json, size_t len, bool store_record,
		       const char *what, ckv_err *e)
{
	json_error_t jerr;
	json_t *root, *v;
	const char *s;
	uint64_t u;
	int rc;

	memset(m, 0, sizeof(*m));
	root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return ckv_errf(e, -EINVAL, "%s: invalid JSON at line %d: %s", what, jerr.line, jerr.text);
	if (!json_is_object(root)) {
		rc = ckv_errf(e, -EINVAL, "%s: expected a JSON object", what);
		goto out_decref;
	}
	if ((rc = get_str(root, "format", true, &s, what, e)) < 0)
		goto out_decref;
	if (strcmp(s, "ckv-prefix") != 0) {
		rc = ckv_errf(e, -EINVAL, "%s: field \"format\": expected \"ckv-prefix\", got \"%s\"", what, s);
		goto out_decref;
	}
	if ((rc = get_uint(root, "version", UINT32_MAX, true, &u, what, e)) < 0)
		goto out_decref;
	if (u != CKV_FORMAT_VERSION) {
		rc = ckv_errf(e, -EPROTONOSUPPORT, "%s: field \"version\": format version %llu, this build reads %u",
			      what, (unsigned long long)u, CKV_FORMAT_VERSION);
		goto out_decref;
	}
	if ((rc = get_str(root, "model", true, &s, what, e)) < 0)
		goto out_decref;
	if (strlen(s) >= sizeof(m->geom.model)) {
		rc = ckv_errf(e, -EINVAL, "%s: field \"model\": longer than %zu bytes", what, sizeof(m->geom.model) - 1);
		goto out_decref;
	}
	strcpy(m->geom.model, s);
	if ((rc = get_str(root, "salt", false, &s, what, e)) < 0)
		goto out_decref;
	if (s && strlen(s) >= sizeof(m->geom.salt)) {
		rc = ckv_errf(e, -EINVAL, "%s: field \"salt\": longer than %zu bytes", what, sizeof(m->geom.salt) - 1);
		goto out_decref;
	}
	if (s)
		strcpy(m->geom.salt, s);
	if ((rc = get_str(root, "dtype", true, &s, what, e)) < 0)
		goto out_decref;
	m->geom.dtype = ckv_dtype_parse(s);
	if (!m->geom.dtype) {
		rc = ckv_errf(e, -EINVAL, "%s: field \"dtype\": unknown dtype \"%s\" (expected bf16, fp16, fp8_e4m3 or fp32)", what, s);
		goto out_decref;
	}
	if ((rc = get_str(root, "layout", false, &s, what, e)) < 0)
		goto out_decref;
	if (s && strcmp(s, "KV-HCD") != 0) {
		rc = ckv_errf(e, -EINVAL, "%s: field \"layout\": expected \"KV-HCD\", got \"%s\"", what, s);
		goto out_decref;
	}
#define UF(key, max, dst)                                                    \
	do {                                                                 \
		if ((rc = get_uint(root, key, max, true, &u, what, e)) < 0)  \
			goto out_decref;                                     \
		dst = (uint32_t)u;                                           \
	} while (0)
	UF("layers", CKV_MAX_LAYERS, m->geom.layers);
	UF("kv_heads", CKV_MAX_KV_HEADS, m->geom.kv_heads);
	UF("head_dim", CKV_MAX_HEAD_DIM, m->geom.head_dim);
	UF("chunk_tokens", CKV_MAX_CHUNK_TOKENS, m->geom.chunk_tokens);
	UF("tokens", CKV_MAX_TOKENS, m->tokens);
#undef UF
	{
		ckv_err ge;
		if ((rc = ckv_geom_init(&m->geom, &ge)) < 0) {
			rc = ckv_errf(e, rc, "%s: %s", what, ge.msg);
			goto out_decref;
		}
	}
	if (m->tokens == 0) {
		rc = ckv_errf(e, -EINVAL, "%s: field \"tokens\": must be at least 1", what);
		goto out_decref;
	}
	m->chunks = ckv_chunks_for(m->tokens, m->geom.chunk_tokens);
	if ((rc = get_uint(root, "chunk_bytes", UINT64_MAX >> 1, false, &u, what, e)) < 0)
		goto out_decref;
	if (rc == 0 && u != m->geom.chunk_bytes) {
		rc = ckv_errf(e, -EINVAL, "%s: field \"chunk_bytes\": %llu does not match the shape (expected %llu)",
			      what, (unsigned long long)u, (unsigned long long)m->geom.chunk_bytes);
		goto out_decref;
	}
	if ((rc = get_uint(root, "chunks", UINT32_MAX, false, &u, what, e)) < 0)
		goto out_decref;
	if (rc == 0 && u != m->chunks) {
		rc = ckv_errf(e, -EINVAL, "%s: field \"chunks\": %llu does not match tokens / chunk_tokens (expected %u)",
			      what, (unsigned long long)u, m->chunks);
		goto out_decref;
	}
	if ((rc = get_str(root, "hash", true, &s, what, e)) < 0)
		goto out_decref;
	if (ckv_hash_parse(&m->hash, s) < 0) {
		rc = ckv_errf(e, -EINVAL, "%s: field \"hash\": expected 32 lowercase hex digits", what);
		goto out_decref;
	}

	if (store_record) {
		json_t *ex = json_object_get(root, "extents"), *t;
		size_t i;
		uint64_t total = 0;
		if (!json_is_array(ex) || json_array_size(ex) == 0 || json_array_size(ex) > m->chunks) {
			rc = ckv_errf(e, -EINVAL, "%s: field \"extents\": expected a non-empty array", what);
			goto out_decref;
		}
		m->nextents = (uint32_t)json_array_size(ex);
		m->extents = calloc(m->nextents, sizeof(*m->extents));
		if (!m->extents) {
			rc = -ENOMEM;
			goto out_decref;
		}
		json_array_foreach(ex, i, v) {
			ckv_extent *x = &m->extents[i];
			if (!json_is_object(v) || get_str(v, "segment", true, &s, what, e) < 0 ||
			    strlen(s) >= sizeof(x->segment) || strchr(s, '/') || s[0] == '.' || strlen(s) < 3) {
				rc = ckv_errf(e, -EINVAL, "%s: extents[%zu].segment: expected a segment id", what, i);
				goto out_free;
			}
			strcpy(x->segment, s);
			if ((rc = get_uint(v, "first", UINT32_MAX, true, &u, what, e)) < 0)
				goto out_free;
			x->first = (uint32_t)u;
			if ((rc = get_uint(v, "count", UINT32_MAX, true, &u, what, e)) < 0)
				goto out_free;
			x->count = (uint32_t)u;
			if (x->count == 0) {
				rc = ckv_errf(e, -EINVAL, "%s: extents[%zu].count: must be at least 1", what, i);
				goto out_free;
			}
			total += x->count;
		}
		if (total != m->chunks) {
			rc = ckv_errf(e, -EINVAL, "%s: field \"extents\": counts add up to %llu chunks, expected %u",
				      what, (unsigned long long)total, m->chunks);
			goto out_free;
		}
		if (get_uint(root, "created", INT64_MAX, false, &u, what, NULL) == 0)
			m->created = (int64_t)u;
		t = json_object_get(root, "times");
		if (json_is_object(t)) {
			json_t *ls = json_object_get(t, "layers");
			if ((rc = get_time(json_object_get(t, "manifest.json"), &m->t_manifest, what, "manifest.json", e)) < 0 ||
			    (rc = get_time(json_object_get(t, "tokens.bin"), &m->t_tokens, what, "tokens.bin", e)) < 0 ||
			    (rc = get_time(json_object_get(t, "sums.xxh3"), &m->t_sums, what, "sums.xxh3", e)) < 0)
				goto out_free;
			if (!json_is_array(ls) || json_array_size(ls) != m->geom.layers) {
				rc = ckv_errf(e, -EINVAL, "%s: times.layers: expected %u entries", what, m->geom.layers);
				goto out_free;
			}
			m->t_layers = calloc(m->geom.layers, sizeof(*m->t_layers));
			if (!m->t_layers) {
				rc = -ENOMEM;
				goto out_free;
			}
			json_array_foreach(ls, i, v)
				if ((rc = get_time(v, &m->t_layers[i], what, "layers[]", e)) < 0)
					goto out_free;
			m->has_times = true;
			if ((v = json_object_get(t, "dir"))) {
				if ((rc = get_time(v, &m->t_dir, what, "dir", e)) < 0)
					goto out_free;
				m->has_dir_time = true;
			}
		}
		t = json_object_get(root, "modes");
		if (json_is_object(t)) {
			static const char *const keys[] = { "dir", "manifest.json", "tokens.bin", "sums.xxh3", "layers" };
			uint32_t *dst[] = { &m->mode_dir, &m->mode_manifest, &m->mode_tokens, &m->mode_sums,
					    &m->mode_layers };
			for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
				char key[32];
				snprintf(key, sizeof(key), "modes.%s", keys[k]);
				if ((rc = get_uint(t, keys[k], 07777, true, &u, what, e)) < 0) {
					ckv_errf(e, -EINVAL, "%s: field \"%s\": expected permission bits 0..4095", what, key);
					goto out_free;
				}
				*dst[k] = (uint32_t)u;
			}
			m->has_modes = true;
		}
	}
	json_decref(root);
	return 0;

out_free:
	ckv_manifest_free(m);
out_decref:
	json_decref(root);
	return rc < 0 ? rc : -EINVAL;
}

static json_t *time_json(const ckv_ftime *t)
{
	return json_pack("[I,I]", (json_int_t)t->sec, (json_int_t)t->nsec);
}

int ckv_manifest_emit(const ckv_manifest *m, bool store_record, char **out, size_t *len)
{
	char hex[CKV_HASH_HEX + 1];
	json_t *root;
	char *s;
	int rc = -ENOMEM;

	ckv_hash_hex(&m->hash, hex);
	root = json_pack("{s:s, s:i, s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:s, s:I, s:I, s:I, s:s}",
			 "format", "ckv-prefix", "version", CKV_FORMAT_VERSION,
			 "model", m->geom.model, "salt", m->geom.salt,
			 "dtype", ckv_dtype_name(m->geom.dtype),
			 "layers", (json_int_t)m->geom.layers, "kv_heads", (json_int_t)m->geom.kv_heads,
			 "head_dim", (json_int_t)m->geom.head_dim,
			 "chunk_tokens", (json_int_t)m->geom.chunk_tokens, "layout", "KV-HCD",
			 "chunk_bytes", (json_int_t)m->geom.chunk_bytes, "tokens", (json_int_t)m->tokens,
			 "chunks", (json_int_t)m->chunks, "hash", hex);
	if (!root)
		return -ENOMEM;
	if (store_record) {
		json_t *ex = json_array();
		if (!ex || json_object_set_new(root, "extents", ex) < 0)
			goto out_decref;
		for (uint32_t i = 0; i < m->nextents; i++)
			if (json_array_append_new(ex, json_pack("{s:s, s:I, s:I}", "segment", m->extents[i].segment,
								"first", (json_int_t)m->extents[i].first,
								"count", (json_int_t)m->extents[i].count)) < 0)
				goto out_decref;
		json_object_set_new(root, "created", json_integer(m->created));
		if (m->has_times) {
			json_t *t = json_object(), *ls = json_array();
			if (!t || !ls || json_object_set_new(root, "times", t) < 0) {
				json_decref(ls);
				goto out_decref;
			}
			json_object_set_new(t, "manifest.json", time_json(&m->t_manifest));
			json_object_set_new(t, "tokens.bin", time_json(&m->t_tokens));
			json_object_set_new(t, "sums.xxh3", time_json(&m->t_sums));
			json_object_set_new(t, "layers", ls);
			for (uint32_t l = 0; l < m->geom.layers; l++)
				json_array_append_new(ls, time_json(&m->t_layers[l]));
			if (m->has_dir_time)
				json_object_set_new(t, "dir", time_json(&m->t_dir));
		}
		if (m->has_modes) {
			json_t *mo = json_pack("{s:I, s:I, s:I, s:I, s:I}", "dir", (json_int_t)m->mode_dir,
					       "manifest.json", (json_int_t)m->mode_manifest,
					       "tokens.bin", (json_int_t)m->mode_tokens,
					       "sums.xxh3", (json_int_t)m->mode_sums,
					       "layers", (json_int_t)m->mode_layers);
			if (!mo || json_object_set_new(root, "modes", mo) < 0)
				goto out_decref;
		}
	}
	s = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_ENSURE_ASCII);
	if (!s)
		goto out_decref;
	{
		size_t n = strlen(s);
		char *t = realloc(s, n + 2);
		if (!t) {
			free(s);
			goto out_decref;
		}
		t[n] = '\n';
		t[n + 1] = 0;
		*out = t;
		*len = n + 1;
	}
	rc = 0;
out_decref:
	json_decref(root);
	return rc;
}
