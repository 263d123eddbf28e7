/*
 * test_format_vectors.c — known-answer vectors of docs/FORMAT.md, computed by
 * the Python reference (gpu/python/ckv/format.py, xxhash module), checked
 * against the C implementation of index/ckv_format.h. Exit 0 pass, 1 fail.
 */
#include "ckv_format.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond, ...)                                                          \
	do {                                                                      \
		if (!(cond)) {                                                    \
			fprintf(stderr, "%s:%d: FAIL: %s: ", __FILE__, __LINE__, #cond); \
			fprintf(stderr, __VA_ARGS__);                             \
			fputc('\n', stderr);                                      \
			failures++;                                               \
		}                                                                 \
	} while (0)

#define CHECK_STR(got, want)                                                      \
	CHECK(strcmp((got), (want)) == 0, "got \"%s\", want \"%s\"", (got), (want))

/* ---- vectors (docs/FORMAT.md §8) ------------------------------------------ */

static const char FP_05B[] =
	"ckv1|model=Qwen/Qwen2.5-0.5B|salt=|dtype=bf16|layers=24|kv_heads=2|head_dim=64|chunk=16";
static const uint64_t SEED_05B = 0x855a0030d5ed17a4ull;

/* tokens 0..39 under qwen2.5-0.5b: 3 chunks (16, 16, 8) */
static const char *const CHAIN_0_39[3] = {
	"c33c991be5e460fb11adc02e8272b7b5",
	"1783c3b56fd56a89ef1a407411ca7ce2",
	"a90a5bfa30e249c0930f50066c55ea3f",
};
/* tokens 1000..1015 under qwen2.5-0.5b: one full chunk */
static const char PREFIX_1000_1015[] = "4113191c1608992a98cf20eafd69ba09";

static const uint64_t SUM_ZERO_8192 = 0x620797930ab0991aull;

static const char MANIFEST_40[] =
	"{\n"
	"  \"format\": \"ckv-prefix\",\n"
	"  \"version\": 1,\n"
	"  \"model\": \"Qwen/Qwen2.5-0.5B\",\n"
	"  \"salt\": \"\",\n"
	"  \"dtype\": \"bf16\",\n"
	"  \"layers\": 24,\n"
	"  \"kv_heads\": 2,\n"
	"  \"head_dim\": 64,\n"
	"  \"chunk_tokens\": 16,\n"
	"  \"layout\": \"KV-HCD\",\n"
	"  \"chunk_bytes\": 8192,\n"
	"  \"tokens\": 40,\n"
	"  \"chunks\": 3,\n"
	"  \"hash\": \"a90a5bfa30e249c0930f50066c55ea3f\"\n"
	"}\n";

static const struct {
	const char *name, *model;
	uint32_t layers, kv_heads, head_dim;
	uint64_t chunk_bytes, seed;
} PRESETS[] = {
	{ "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 24, 2, 64, 8192, 0x855a0030d5ed17a4ull },
	{ "qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", 28, 2, 128, 16384, 0xdcbea2826431c441ull },
	{ "qwen2.5-3b", "Qwen/Qwen2.5-3B", 36, 2, 128, 16384, 0x8c5d610a1bb00b55ull },
	{ "qwen2.5-7b", "Qwen/Qwen2.5-7B", 28, 4, 128, 32768, 0x16236b4f6ed45759ull },
	{ "qwen2.5-14b", "Qwen/Qwen2.5-14B", 48, 8, 128, 65536, 0xe53e9d0b7b35f46eull },
	{ "qwen2.5-32b", "Qwen/Qwen2.5-32B", 64, 8, 128, 65536, 0x213545fac6b3f4ddull },
	{ "qwen2.5-72b", "Qwen/Qwen2.5-72B", 80, 8, 128, 65536, 0xeb3409ab2cf5b20cull },
};

/* salted, fp16, odd shape, c = 32; tokens 0..39: 2 chunks (32, 8) */
static const char FP_ODD[] =
	"ckv1|model=test/odd|salt=tenant-a|dtype=fp16|layers=2|kv_heads=3|head_dim=80|chunk=32";
static const uint64_t SEED_ODD = 0x227d352d2498c80dull;
static const char *const CHAIN_ODD[2] = {
	"af50b58a98e4d2d97e6dfc04e44f62aa",
	"489b15e86b10e7719dc727c18467d462",
};

/* layout vector: test/tiny, bf16, L1 H2 D4 c4, 6 tokens 100..105;
 * K[h][t][d] = 0x100*h + 0x10*t + d + 1 (raw bf16 bits), V = K | 0x8000 */
static const char FP_TINY[] =
	"ckv1|model=test/tiny|salt=|dtype=bf16|layers=1|kv_heads=2|head_dim=4|chunk=4";
static const uint64_t SEED_TINY = 0x9c1824d50c44dd4bull;
static const char PREFIX_TINY[] = "e67658cb81f40178a89f01e137c74884";
static const uint64_t SUMS_TINY[2] = { 0x477f1f143fe2148bull, 0xc10e166c10594247ull };
static const uint8_t SUMS_TINY_HEADER[32] = {
	'C', 'K', 'V', 'S', 'U', 'M', 'S', '1', 1, 0, 0, 0, 1, 0, 0, 0,
	2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
};

/* ---- helpers ---------------------------------------------------------------- */

static void geom_set(ckv_geom *g, const char *model, const char *salt, ckv_dtype dt,
		     uint32_t layers, uint32_t kv_heads, uint32_t head_dim, uint32_t c)
{
	memset(g, 0, sizeof(*g));
	snprintf(g->model, sizeof(g->model), "%s", model);
	snprintf(g->salt, sizeof(g->salt), "%s", salt);
	g->dtype = dt;
	g->layers = layers;
	g->kv_heads = kv_heads;
	g->head_dim = head_dim;
	g->chunk_tokens = c;
}

static void geom_05b(ckv_geom *g)
{
	ckv_err e = { { 0 } };
	int rc;

	geom_set(g, "Qwen/Qwen2.5-0.5B", "", CKV_DTYPE_BF16, 24, 2, 64, 16);
	rc = ckv_geom_init(g, &e);
	CHECK(rc == 0, "ckv_geom_init: %d %s", rc, e.msg);
}

static void hex_of(const ckv_hash *h, char out[CKV_HASH_HEX + 1])
{
	memset(out, 0, CKV_HASH_HEX + 1);
	ckv_hash_hex(h, out);
}

static uint32_t *iota(uint32_t from, uint32_t n)
{
	uint32_t *t = malloc(n * sizeof(*t));

	if (!t)
		abort();
	for (uint32_t i = 0; i < n; i++)
		t[i] = from + i;
	return t;
}

/* ---- tests ------------------------------------------------------------------ */

static void test_dtypes(void)
{
	uint16_t bf = 0x3f80, f16 = 0x3c00;
	uint8_t f8[3] = { 0x38, 0xb8, 0x01 };
	float f32 = 2.5f;

	CHECK_STR(ckv_dtype_name(CKV_DTYPE_BF16), "bf16");
	CHECK_STR(ckv_dtype_name(CKV_DTYPE_FP16), "fp16");
	CHECK_STR(ckv_dtype_name(CKV_DTYPE_FP8_E4M3), "fp8_e4m3");
	CHECK_STR(ckv_dtype_name(CKV_DTYPE_FP32), "fp32");
	CHECK(ckv_dtype_parse("bf16") == CKV_DTYPE_BF16, "bf16");
	CHECK(ckv_dtype_parse("fp8_e4m3") == CKV_DTYPE_FP8_E4M3, "fp8_e4m3");
	CHECK(ckv_dtype_parse("float16") == CKV_DTYPE_INVALID, "unknown name");
	CHECK(ckv_dtype_size(CKV_DTYPE_BF16) == 2, "bf16 size");
	CHECK(ckv_dtype_size(CKV_DTYPE_FP16) == 2, "fp16 size");
	CHECK(ckv_dtype_size(CKV_DTYPE_FP8_E4M3) == 1, "fp8 size");
	CHECK(ckv_dtype_size(CKV_DTYPE_FP32) == 4, "fp32 size");
	CHECK(ckv_dtype_size(CKV_DTYPE_INVALID) == 0, "invalid size");
	CHECK(ckv_dtype_to_f32(CKV_DTYPE_BF16, &bf) == 1.0f, "bf16 0x3f80");
	CHECK(ckv_dtype_to_f32(CKV_DTYPE_FP16, &f16) == 1.0f, "fp16 0x3c00");
	CHECK(ckv_dtype_to_f32(CKV_DTYPE_FP8_E4M3, &f8[0]) == 1.0f, "fp8 0x38");
	CHECK(ckv_dtype_to_f32(CKV_DTYPE_FP8_E4M3, &f8[1]) == -1.0f, "fp8 0xb8");
	CHECK(ckv_dtype_to_f32(CKV_DTYPE_FP8_E4M3, &f8[2]) == 0.001953125f, "fp8 0x01 (2^-9)");
	CHECK(ckv_dtype_to_f32(CKV_DTYPE_FP32, &f32) == 2.5f, "fp32");
}

static void test_geom(void)
{
	ckv_geom g;
	ckv_err e = { { 0 } };
	char fp[512];
	int len;

	geom_05b(&g);
	CHECK(g.half_bytes == 4096, "half_bytes %llu", (unsigned long long)g.half_bytes);
	CHECK(g.chunk_bytes == 8192, "chunk_bytes %llu", (unsigned long long)g.chunk_bytes);
	CHECK(g.seed == SEED_05B, "seed %016llx", (unsigned long long)g.seed);
	len = ckv_geom_fingerprint(&g, fp, sizeof(fp));
	CHECK(len == (int)strlen(FP_05B), "fingerprint length %d", len);
	CHECK_STR(fp, FP_05B);
	len = ckv_geom_fingerprint(&g, fp, 10);
	CHECK(len == -ENAMETOOLONG, "short buffer: %d", len);

	geom_set(&g, "test/odd", "tenant-a", CKV_DTYPE_FP16, 2, 3, 80, 32);
	CHECK(ckv_geom_init(&g, &e) == 0, "init odd: %s", e.msg);
	CHECK(g.half_bytes == 15360, "odd half_bytes %llu", (unsigned long long)g.half_bytes);
	CHECK(g.chunk_bytes == 32768, "odd chunk_bytes %llu", (unsigned long long)g.chunk_bytes);
	CHECK(g.seed == SEED_ODD, "odd seed %016llx", (unsigned long long)g.seed);
	ckv_geom_fingerprint(&g, fp, sizeof(fp));
	CHECK_STR(fp, FP_ODD);

	geom_set(&g, "test/tiny", "", CKV_DTYPE_BF16, 1, 2, 4, 4);
	CHECK(ckv_geom_init(&g, &e) == 0, "init tiny: %s", e.msg);
	CHECK(g.half_bytes == 64 && g.chunk_bytes == 4096, "tiny sizes");
	CHECK(g.seed == SEED_TINY, "tiny seed %016llx", (unsigned long long)g.seed);
	ckv_geom_fingerprint(&g, fp, sizeof(fp));
	CHECK_STR(fp, FP_TINY);

	/* invalid shapes are refused */
	geom_set(&g, "Qwen/Qwen2.5-0.5B", "", CKV_DTYPE_BF16, 0, 2, 64, 16);
	CHECK(ckv_geom_init(&g, &e) < 0, "layers = 0 accepted");
	geom_set(&g, "Qwen/Qwen2.5-0.5B", "", CKV_DTYPE_BF16, 24, 2, 64, 0);
	CHECK(ckv_geom_init(&g, &e) < 0, "chunk_tokens = 0 accepted");
	geom_set(&g, "Qwen/Qwen2.5-0.5B", "", CKV_DTYPE_INVALID, 24, 2, 64, 16);
	CHECK(ckv_geom_init(&g, &e) < 0, "invalid dtype accepted");

	for (size_t i = 0; i < sizeof(PRESETS) / sizeof(PRESETS[0]); i++) {
		memset(&g, 0, sizeof(g));
		int rc = ckv_geom_preset(&g, PRESETS[i].name);
		CHECK(rc == 0, "preset %s: %d", PRESETS[i].name, rc);
		if (rc)
			continue;
		CHECK_STR(g.model, PRESETS[i].model);
		CHECK_STR(g.salt, "");
		CHECK(g.dtype == CKV_DTYPE_BF16 && g.chunk_tokens == 16, "%s dtype/c", PRESETS[i].name);
		CHECK(g.layers == PRESETS[i].layers && g.kv_heads == PRESETS[i].kv_heads &&
			      g.head_dim == PRESETS[i].head_dim,
		      "%s shape", PRESETS[i].name);
		CHECK(g.chunk_bytes == PRESETS[i].chunk_bytes, "%s chunk_bytes %llu", PRESETS[i].name,
		      (unsigned long long)g.chunk_bytes);
		CHECK(g.seed == PRESETS[i].seed, "%s seed %016llx", PRESETS[i].name,
		      (unsigned long long)g.seed);
	}
	CHECK(ckv_geom_preset(&g, "qwen2.5-9000b") < 0, "unknown preset accepted");
}

static void test_chain(void)
{
	ckv_geom g;
	ckv_err e = { { 0 } };
	ckv_hash h[3], step, parsed;
	char hex[CKV_HASH_HEX + 1];
	uint32_t *t = iota(0, 40);
	uint32_t *t1000 = iota(1000, 16);

	CHECK(ckv_chunks_for(40, 16) == 3 && ckv_chunks_for(16, 16) == 1 &&
		      ckv_chunks_for(17, 16) == 2,
	      "ckv_chunks_for");

	geom_05b(&g);
	memset(h, 0, sizeof(h));
	ckv_chain(&g, t, 40, h);
	for (int j = 0; j < 3; j++) {
		hex_of(&h[j], hex);
		CHECK_STR(hex, CHAIN_0_39[j]);
	}
	/* one step from h_1 over the partial last chunk gives h_2 */
	ckv_chain_step(&h[1], t + 32, 8, g.seed, &step);
	CHECK(ckv_hash_eq(&step, &h[2]), "chain_step(h_1, tokens 32..39) != h_2");

	CHECK(ckv_hash_parse(&parsed, CHAIN_0_39[2]) == 0, "parse");
	CHECK(ckv_hash_eq(&parsed, &h[2]), "parsed hash differs");
	CHECK(parsed.b[0] == 0xa9 && parsed.b[1] == 0x0a && parsed.b[15] == 0x3f,
	      "canonical form is big-endian");
	CHECK(ckv_hash_parse(&parsed, "a90a5bfa30e249c0930f50066c55ea3") < 0, "31 digits accepted");
	CHECK(ckv_hash_parse(&parsed, "g90a5bfa30e249c0930f50066c55ea3f") < 0, "non-hex accepted");

	ckv_chain(&g, t1000, 16, h);
	hex_of(&h[0], hex);
	CHECK_STR(hex, PREFIX_1000_1015);

	geom_set(&g, "test/odd", "tenant-a", CKV_DTYPE_FP16, 2, 3, 80, 32);
	CHECK(ckv_geom_init(&g, &e) == 0, "init odd: %s", e.msg);
	ckv_chain(&g, t, 40, h);
	for (int j = 0; j < 2; j++) {
		hex_of(&h[j], hex);
		CHECK_STR(hex, CHAIN_ODD[j]);
	}

	geom_05b(&g);
	ckv_chain(&g, t, 40, h);
	char seg[80];
	ckv_segment_id(&h[2], 0, seg);
	CHECK_STR(seg, "a90a5bfa30e249c0930f50066c55ea3f-0");
	ckv_segment_id(&h[2], 2, seg);
	CHECK_STR(seg, "a90a5bfa30e249c0930f50066c55ea3f-2");

	free(t);
	free(t1000);
}

static void test_sums(void)
{
	static uint8_t zero[8192];
	uint8_t be[8];
	char name[32];

	CHECK(ckv_chunk_sum(zero, sizeof(zero)) == SUM_ZERO_8192, "zero chunk sum %016llx",
	      (unsigned long long)ckv_chunk_sum(zero, sizeof(zero)));
	ckv_sum_store(be, SUM_ZERO_8192);
	CHECK(be[0] == 0x62 && be[1] == 0x07 && be[7] == 0x1a, "sum stored big-endian");
	CHECK(ckv_sum_load(be) == SUM_ZERO_8192, "sum load");

	ckv_layer_name(0, name);
	CHECK_STR(name, "layer_000.kv");
	ckv_layer_name(23, name);
	CHECK_STR(name, "layer_023.kv");
	ckv_layer_name(1000, name);
	CHECK_STR(name, "layer_1000.kv");
}

/* The tiny layout vector: build the two KV-HCD chunks by hand. */
static void test_layout(void)
{
	ckv_geom g;
	ckv_err e = { { 0 } };
	ckv_hash h[2];
	char hex[CKV_HASH_HEX + 1];
	uint8_t *chunk = calloc(2, 4096);
	uint32_t toks[6] = { 100, 101, 102, 103, 104, 105 };
	ckv_side_header sh, back;
	uint8_t hdr[CKV_SIDE_HEADER];

	if (!chunk)
		abort();
	geom_set(&g, "test/tiny", "", CKV_DTYPE_BF16, 1, 2, 4, 4);
	CHECK(ckv_geom_init(&g, &e) == 0, "init tiny: %s", e.msg);
	ckv_chain(&g, toks, 6, h);
	hex_of(&h[1], hex);
	CHECK_STR(hex, PREFIX_TINY);

	for (uint32_t t = 0; t < 6; t++) {
		uint32_t j = t / 4, slot = t % 4;
		for (uint32_t hd = 0; hd < 2; hd++) {
			for (uint32_t d = 0; d < 4; d++) {
				uint16_t k = (uint16_t)(0x100 * hd + 0x10 * t + d + 1);
				uint16_t v = (uint16_t)(k | 0x8000);
				size_t off = j * 4096 + ((hd * 4 + slot) * 4 + d) * 2;
				chunk[off] = (uint8_t)k;
				chunk[off + 1] = (uint8_t)(k >> 8);
				chunk[off + 64] = (uint8_t)v;
				chunk[off + 64 + 1] = (uint8_t)(v >> 8);
			}
		}
	}
	for (int j = 0; j < 2; j++)
		CHECK(ckv_chunk_sum(chunk + j * 4096, 4096) == SUMS_TINY[j], "tiny chunk %d sum %016llx",
		      j, (unsigned long long)ckv_chunk_sum(chunk + j * 4096, 4096));

	/* digest of chunk 1 (2 valid tokens, t = 4, 5): head 0 dim 0 = mean of
	 * bf16 bits 0x0041, 0x0051 read as floats */
	float dg[8];
	uint16_t b41 = 0x0041, b51 = 0x0051;
	ckv_chunk_digest(&g, chunk + 4096, 2, dg);
	float want = (ckv_dtype_to_f32(CKV_DTYPE_BF16, &b41) + ckv_dtype_to_f32(CKV_DTYPE_BF16, &b51)) / 2;
	CHECK(fabsf(dg[0] - want) <= fabsf(want) * 1e-5f, "tiny digest[0][0] %g want %g", dg[0], want);

	memset(&sh, 0, sizeof(sh));
	memcpy(sh.magic, CKV_SUMS_MAGIC, 8);
	sh.version = CKV_FORMAT_VERSION;
	sh.layers = 1;
	sh.chunks = 2;
	sh.per_chunk = 1;
	ckv_side_header_encode(&sh, hdr);
	CHECK(memcmp(hdr, SUMS_TINY_HEADER, sizeof(hdr)) == 0, "sums header bytes");
	memset(&back, 0, sizeof(back));
	CHECK(ckv_side_header_decode(&back, hdr, CKV_SUMS_MAGIC, "sums.xxh3", &e) == 0, "decode: %s",
	      e.msg);
	CHECK(back.version == 1 && back.layers == 1 && back.chunks == 2 && back.per_chunk == 1,
	      "decoded header fields");
	CHECK(ckv_side_header_decode(&back, hdr, CKV_DIGEST_MAGIC, "digest.bin", &e) < 0,
	      "wrong magic accepted");
	free(chunk);
}

/* A realistic digest: qwen2.5-0.5b, K[h][t][d] = t + 16h + d%4 (exact in bf16). */
static void test_digest(void)
{
	ckv_geom g;
	uint8_t *chunk;
	float *dg;

	geom_05b(&g);
	chunk = calloc(1, g.chunk_bytes);
	dg = calloc(2 * 64, sizeof(float));
	if (!chunk || !dg)
		abort();
	for (uint32_t hd = 0; hd < 2; hd++)
		for (uint32_t t = 0; t < 16; t++)
			for (uint32_t d = 0; d < 64; d++) {
				float f = (float)(t + 16 * hd + d % 4);
				uint32_t u;
				memcpy(&u, &f, 4);
				uint16_t b = (uint16_t)(u >> 16); /* exact: small integers */
				size_t off = ((hd * 16 + t) * 64 + d) * 2;
				chunk[off] = (uint8_t)b;
				chunk[off + 1] = (uint8_t)(b >> 8);
			}
	ckv_chunk_digest(&g, chunk, 8, dg);
	for (uint32_t hd = 0; hd < 2; hd++)
		for (uint32_t d = 0; d < 64; d++) {
			float want = 3.5f + 16 * hd + d % 4;
			CHECK(fabsf(dg[hd * 64 + d] - want) < 1e-4f, "digest[%u][%u] = %g, want %g", hd, d,
			      dg[hd * 64 + d], want);
		}
	free(chunk);
	free(dg);
}

/*
 * keyq.bin: the worked vector of docs/FORMAT.md (one head, head_dim 4, two
 * token slots, fp32, mu 0, sd 1), scales from sums, the padding rule, and a
 * round trip at every width that lands on the quantiser's level.
 */
static void test_keyq(void)
{
	static const float keys[8] = { 0, 1, -1, 2, 0.5f, -0.5f, 3, -3 };
	static const unsigned want_codes[8] = { 3, 5, 2, 7, 4, 3, 7, 0 };
	static const float lv3[8] = { -2.152f, -1.344f, -0.7560f, -0.2451f,
				      0.2451f, 0.7560f, 1.344f, 2.152f };
	ckv_geom g;
	uint16_t sc[8];
	uint8_t codes[8];
	float out[8];
	double sum[4] = { 4, 0, 0, 0 }, sumsq[4] = { 10, 0, 0, 0 };

	memset(&g, 0, sizeof(g));
	g.dtype = CKV_DTYPE_FP32;
	g.kv_heads = 1;
	g.head_dim = 4;
	g.chunk_tokens = 2;
	for (int i = 0; i < 4; i++) {
		sc[i] = ckv_f32_to_bf16(0.0f);
		sc[4 + i] = ckv_f32_to_bf16(1.0f);
	}
	CHECK(ckv_keyq_chunk_bytes(&g, 3) == 3, "3-bit chunk bytes %llu",
	      (unsigned long long)ckv_keyq_chunk_bytes(&g, 3));
	CHECK(ckv_keyq_layer_bytes(&g, 3, 5) == 16 + 15, "layer bytes");
	ckv_keyq_encode(&g, 3, sc, keys, 2, codes);
	CHECK(codes[0] == 0xab && codes[1] == 0xce && codes[2] == 0x1d,
	      "3-bit codes %02x %02x %02x, want ab ce 1d", codes[0], codes[1], codes[2]);
	ckv_keyq_decode(&g, 3, sc, codes, out);
	for (int i = 0; i < 8; i++)
		CHECK(out[i] == lv3[want_codes[i]], "decode[%d] = %g, want %g", i, out[i],
		      lv3[want_codes[i]]);
	/* one valid slot: the second slot's codes are 0 whatever its keys */
	ckv_keyq_encode(&g, 3, sc, keys, 1, codes);
	CHECK(codes[0] == 0xab && codes[1] == 0x0e && codes[2] == 0x00,
	      "partial chunk codes %02x %02x %02x, want ab 0e 00", codes[0], codes[1], codes[2]);
	/* scales: keys 1 and 3 in dimension 0: mu 2, sd sqrt(2) + 1e-6, as bf16 */
	ckv_keyq_scales(&g, sum, sumsq, 2, sc);
	CHECK(sc[0] == 0x4000 && sc[4] == 0x3fb5, "scales %04x %04x, want 4000 3fb5", sc[0], sc[4]);
	CHECK(sc[1] == 0 && sc[5] == ckv_f32_to_bf16(1e-6f), "a constant dimension: sd 1e-6");
	CHECK(ckv_f32_to_bf16(1.0f + 1.0f / 256) == 0x3f80 && ckv_f32_to_bf16(1.0f + 3.0f / 256) == 0x3f82,
	      "bf16 rounds to nearest even");
	/* keys on the levels come back exactly, 1 to 4 bits */
	for (unsigned bits = 1; bits <= 4; bits++) {
		float lv[16], in[8];

		for (int i = 0; i < 4; i++) {
			sc[i] = ckv_f32_to_bf16(0.0f);
			sc[4 + i] = ckv_f32_to_bf16(1.0f);
		}
		for (unsigned q = 0; q < (1u << bits); q++) {
			uint8_t one[8] = { 0 };

			for (unsigned b = 0; b < bits; b++)
				one[b >> 3] |= (uint8_t)((q >> b & 1) << (b & 7));
			ckv_keyq_decode(&g, bits, sc, one, out);
			lv[q] = out[0];
		}
		for (int i = 0; i < 8; i++)
			in[i] = lv[(unsigned)(i * 5 + 1) % (1u << bits)];
		ckv_keyq_encode(&g, bits, sc, in, 2, codes);
		ckv_keyq_decode(&g, bits, sc, codes, out);
		for (int i = 0; i < 8; i++)
			CHECK(out[i] == in[i], "%u bits: level %g came back as %g", bits, in[i], out[i]);
	}
}

static void test_manifest(void)
{
	ckv_manifest m, p;
	ckv_err e = { { 0 } };
	uint32_t *t = iota(0, 40);
	char *out = NULL;
	size_t len = 0;
	char hex[CKV_HASH_HEX + 1];
	ckv_hash h[3];
	int rc;

	memset(&m, 0, sizeof(m));
	geom_05b(&m.geom);
	ckv_chain(&m.geom, t, 40, h);
	m.tokens = 40;
	m.chunks = 3;
	m.hash = h[2];
	rc = ckv_manifest_emit(&m, false, &out, &len);
	CHECK(rc == 0, "emit: %d", rc);
	if (rc == 0) {
		CHECK(len == strlen(MANIFEST_40), "emit length %zu, want %zu", len, strlen(MANIFEST_40));
		CHECK(strcmp(out, MANIFEST_40) == 0, "emitted manifest differs:\n%s", out);
	}
	free(out);
	out = NULL;

	/* parse the canonical form and emit it again: byte-identical */
	memset(&p, 0, sizeof(p));
	rc = ckv_manifest_parse(&p, MANIFEST_40, strlen(MANIFEST_40), false, "manifest.json", &e);
	CHECK(rc == 0, "parse canonical: %d %s", rc, e.msg);
	if (rc == 0) {
		CHECK(p.tokens == 40 && p.chunks == 3, "parsed tokens/chunks");
		CHECK(p.geom.seed == SEED_05B && p.geom.chunk_bytes == 8192, "parsed geometry derived");
		hex_of(&p.hash, hex);
		CHECK_STR(hex, CHAIN_0_39[2]);
		rc = ckv_manifest_emit(&p, false, &out, &len);
		CHECK(rc == 0 && out && strcmp(out, MANIFEST_40) == 0, "re-emit differs");
		free(out);
		out = NULL;
		ckv_manifest_free(&p);
	}

	/* any key order and whitespace; unknown keys ignored; chunk_bytes/chunks optional */
	static const char loose[] =
		"{\"hash\":\"a90a5bfa30e249c0930f50066c55ea3f\",\"tokens\":40,"
		"\"x-engine\":{\"a\":[1,2]},\"layout\":\"KV-HCD\",\"chunk_tokens\":16,"
		"\"head_dim\":64,\"kv_heads\":2,\"layers\":24,\"dtype\":\"bf16\",\"salt\":\"\","
		"\"model\":\"Qwen/Qwen2.5-0.5B\",\"version\":1,\"format\":\"ckv-prefix\"}";
	memset(&p, 0, sizeof(p));
	rc = ckv_manifest_parse(&p, loose, strlen(loose), false, "loose.json", &e);
	CHECK(rc == 0, "parse loose: %d %s", rc, e.msg);
	if (rc == 0) {
		rc = ckv_manifest_emit(&p, false, &out, &len);
		CHECK(rc == 0 && out && strcmp(out, MANIFEST_40) == 0, "loose re-emit differs");
		free(out);
		out = NULL;
		ckv_manifest_free(&p);
	}

	/* rejected: each of these edits of the canonical text */
	static const struct {
		const char *from, *to;
	} bad[] = {
		{ "\"version\": 1", "\"version\": 2" },
		{ "\"ckv-prefix\"", "\"ckv-prefix2\"" },
		{ "\"KV-HCD\"", "\"KV-THD\"" },
		{ "\"chunk_bytes\": 8192", "\"chunk_bytes\": 4096" },
		{ "\"chunks\": 3", "\"chunks\": 4" },
		{ "\"dtype\": \"bf16\"", "\"dtype\": \"bf17\"" },
		{ "\"hash\": \"a90a5bfa30e249c0930f50066c55ea3f\"", "\"hash\": \"a90a\"" },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char buf[1024];
		const char *at = strstr(MANIFEST_40, bad[i].from);
		if (!at) {
			CHECK(at, "test bug: %s", bad[i].from);
			continue;
		}
		snprintf(buf, sizeof(buf), "%.*s%s%s", (int)(at - MANIFEST_40), MANIFEST_40, bad[i].to,
			 at + strlen(bad[i].from));
		memset(&p, 0, sizeof(p));
		e.msg[0] = 0;
		rc = ckv_manifest_parse(&p, buf, strlen(buf), false, "manifest.json", &e);
		CHECK(rc < 0, "accepted bad manifest (%s)", bad[i].to);
		if (rc == 0)
			ckv_manifest_free(&p);
		else
			CHECK(strstr(e.msg, "manifest.json") != NULL, "error does not name the file: %s",
			      e.msg);
	}
	free(t);
}

int main(void)
{
	test_dtypes();
	test_geom();
	test_chain();
	test_sums();
	test_layout();
	test_digest();
	test_keyq();
	test_manifest();
	if (failures) {
		fprintf(stderr, "test_format_vectors: %d failure(s)\n", failures);
		return 1;
	}
	printf("test_format_vectors: ok\n");
	return 0;
}
