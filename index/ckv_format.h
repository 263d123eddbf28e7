/*
 * ckv_format.h — the ckvfs data model: geometry, dtypes, prefix identity
 * (xxHash token chain), manifests and the small binary side files.
 *
 * Everything here is pure computation on memory: no I/O besides the
 * explicit *_read_file / *_write helpers, no threads, no global state.
 * docs/FORMAT.md is the byte-level specification; this header is its C face.
 *
 * Errors: functions that act return 0 or a negative errno. Parse functions
 * also fill a caller-given ckv_err with a message naming the file and field.
 */
#ifndef CKV_FORMAT_H
#define CKV_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CKV_VERSION_MAJOR 0
#define CKV_VERSION_MINOR 1
#define CKV_VERSION_PATCH 0
#define CKV_FORMAT_VERSION 1 /* on-disk format; every file with a header carries it */

const char *ckv_version(void);

#define CKV_ALIGN 4096u           /* every chunk starts at a multiple of this */
#define CKV_HASH_HEX 32           /* a prefix hash is 32 lowercase hex digits */
#define CKV_MAX_LAYERS 1024
#define CKV_MAX_KV_HEADS 1024
#define CKV_MAX_HEAD_DIM 4096
#define CKV_MAX_CHUNK_TOKENS 4096
#define CKV_MAX_TOKENS (1u << 26) /* 64 Mi tokens per prefix */
#define CKV_MAX_CHUNK_BYTES (1ull << 30)
#define CKV_MAX_MODEL_ID 256

/* A message for the user: names the file, the field and what was expected. */
typedef struct ckv_err {
	char msg[512];
} ckv_err;

/* Format into e (if non-NULL) and return rc; rc is a negative errno. */
int ckv_errf(ckv_err *e, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

typedef enum ckv_dtype {
	CKV_DTYPE_INVALID = 0,
	CKV_DTYPE_BF16,
	CKV_DTYPE_FP16,
	CKV_DTYPE_FP8_E4M3,
	CKV_DTYPE_FP32,
} ckv_dtype;

const char *ckv_dtype_name(ckv_dtype t);       /* "bf16", "fp16", "fp8_e4m3", "fp32" */
ckv_dtype ckv_dtype_parse(const char *name);   /* CKV_DTYPE_INVALID when unknown */
unsigned ckv_dtype_size(ckv_dtype t);          /* bytes per element, 0 when invalid */
float ckv_dtype_to_f32(ckv_dtype t, const void *p); /* one element at p */

/*
 * Geometry of a cache. chunk layout "KV-HCD": K then V, each
 * [kv_heads][chunk_tokens][head_dim] of dtype; padded with zeros to
 * chunk_bytes = roundup(2 * kv_heads * chunk_tokens * head_dim * esize, 4096).
 */
typedef struct ckv_geom {
	char model[CKV_MAX_MODEL_ID]; /* e.g. "Qwen/Qwen2.5-7B" */
	char salt[64];                /* engine-chosen namespace, usually "" */
	ckv_dtype dtype;
	uint32_t layers;
	uint32_t kv_heads;
	uint32_t head_dim;
	uint32_t chunk_tokens; /* c, 16 by default */
	uint64_t half_bytes;   /* kv_heads * c * head_dim * esize: K (or V) of one chunk */
	uint64_t chunk_bytes;  /* padded, multiple of CKV_ALIGN */
	uint64_t seed;         /* XXH3_64 of the fingerprint */
} ckv_geom;

/* Validate the shape fields and fill half_bytes, chunk_bytes and seed. */
int ckv_geom_init(ckv_geom *g, ckv_err *e);
/* The canonical fingerprint string; returns its length or -ENAMETOOLONG. */
int ckv_geom_fingerprint(const ckv_geom *g, char *buf, size_t len);
/* Known model shapes: "qwen2.5-0.5b" … "qwen2.5-72b" (bf16, c=16). */
int ckv_geom_preset(ckv_geom *g, const char *name);
const char *const *ckv_geom_preset_names(void);

static inline uint32_t ckv_chunks_for(uint32_t tokens, uint32_t c)
{
	return (uint32_t)(((uint64_t)tokens + c - 1) / c);
}

/* A 128-bit chain hash in canonical (big-endian) byte order. */
typedef struct ckv_hash {
	uint8_t b[16];
} ckv_hash;

void ckv_hash_hex(const ckv_hash *h, char out[CKV_HASH_HEX + 1]);
int ckv_hash_parse(ckv_hash *h, const char *hex); /* 0, or -EINVAL */
bool ckv_hash_eq(const ckv_hash *a, const ckv_hash *b);

/* Tokens as stored (tokens.bin): u32 little-endian, 4 * n bytes. */
void ckv_tokens_to_le(uint8_t *dst, const uint32_t *tokens, size_t n);
void ckv_tokens_from_le(uint32_t *dst, const uint8_t *src, size_t n);

/*
 * Token chain: h_0 = XXH3_128(tokens[0:c] as u32 LE, seed);
 * h_j = XXH3_128(canonical(h_{j-1}) || tokens[jc:(j+1)c], seed).
 * A partial last chunk hashes its shorter run the same way.
 * ckv_chain fills out[0 .. ckv_chunks_for(n, c)).
 */
void ckv_chain_step(const ckv_hash *prev, const uint32_t *tokens, uint32_t n,
		    uint64_t seed, ckv_hash *out);
void ckv_chain(const ckv_geom *g, const uint32_t *tokens, uint32_t n, ckv_hash *out);

/* One run of chunks of a prefix stored in a segment. */
typedef struct ckv_extent {
	char segment[80]; /* segment id, see ckv_segment_id */
	uint32_t first;   /* first chunk inside the segment */
	uint32_t count;
} ckv_extent;

/* Segment id for the chunks [first, first+count) of a chain ending at last. */
void ckv_segment_id(const ckv_hash *last, uint32_t first, char out[80]);

/* File times kept so that rsync -a / cp -a of a cache round-trip exactly. */
typedef struct ckv_ftime {
	int64_t sec;
	uint32_t nsec;
} ckv_ftime;

/*
 * A prefix: the exported manifest plus, in the store, its extents and the
 * times of its files. Owned by whoever allocated it; ckv_manifest_free.
 */
typedef struct ckv_manifest {
	ckv_geom geom;
	uint32_t tokens;        /* n */
	uint32_t chunks;        /* m = ceil(n / c) */
	ckv_hash hash;          /* h_{m-1} */
	uint32_t nextents;
	ckv_extent *extents;    /* store record only */
	bool has_times;
	ckv_ftime t_manifest, t_tokens, t_sums; /* mtimes of the exported files */
	ckv_ftime *t_layers;    /* [layers], when has_times */
	int64_t created;        /* unix seconds the prefix was published */
	/* Store record, optional: the cache directory's mtime (times.dir). */
	bool has_dir_time;
	ckv_ftime t_dir;
	/*
	 * Store record, optional ("modes"): permission bits of the directory and
	 * files as they were copied into a mount, which shows them again, so
	 * that a second rsync -a / cp -a finds nothing to change. One mode for
	 * all layer files (layer_000.kv's). Scalars only: copies stay shallow.
	 */
	bool has_modes;
	uint32_t mode_dir, mode_manifest, mode_tokens, mode_sums, mode_layers;
} ckv_manifest;

void ckv_manifest_free(ckv_manifest *m);

/*
 * Parse an exported manifest.json (extents ignored) or a store record
 * (store_record = true: extents required). `what` names the source in
 * errors, e.g. "DIR/manifest.json".
 */
int ckv_manifest_parse(ckv_manifest *m, const char *json, size_t len, bool store_record,
		       const char *what, ckv_err *e);
/*
 * Emit canonical JSON; *out is malloc'ed, NUL-terminated. The exported form
 * (store_record = false) is byte-stable: export of an import is identical.
 */
int ckv_manifest_emit(const ckv_manifest *m, bool store_record, char **out, size_t *len);

/* sums.xxh3: header, then XXH3-64 (canonical BE) of every chunk, [layer][chunk]. */
#define CKV_SUMS_MAGIC "CKVSUMS1"
#define CKV_DIGEST_MAGIC "CKVDGST1"
#define CKV_HALVES_MAGIC "CKVHALF1" /* per chunk: XXH3-64 of the K half, then of the V half */
#define CKV_SIDE_HEADER 32

typedef struct ckv_side_header {
	char magic[8];
	uint32_t version;     /* CKV_FORMAT_VERSION */
	uint32_t layers;
	uint32_t chunks;
	uint32_t per_chunk;   /* sums: 1 (u64); digest: kv_heads * head_dim (f32); keyq: code bytes */
	uint64_t reserved;    /* keyq: bits per key element; 0 elsewhere */
} ckv_side_header;

void ckv_side_header_encode(const ckv_side_header *h, uint8_t out[CKV_SIDE_HEADER]);
int ckv_side_header_decode(ckv_side_header *h, const uint8_t in[CKV_SIDE_HEADER],
			   const char *magic, const char *what, ckv_err *e);

uint64_t ckv_chunk_sum(const void *chunk, size_t len); /* XXH3-64 */
void ckv_sum_store(uint8_t out[8], uint64_t s);          /* canonical BE */
uint64_t ckv_sum_load(const uint8_t in[8]);

/* Digest of one chunk: per kv head the fp32 mean of its `valid` keys. */
void ckv_chunk_digest(const ckv_geom *g, const void *chunk, uint32_t valid, float *out);

/*
 * keyq.bin: a low-bit copy of every chunk's keys, for identification by
 * attention mass (docs/FORMAT.md). Side header (per_chunk = code bytes per
 * chunk, reserved = bits), then per layer: the layer's scales, mu[h][d] and
 * sd[h][d] as bf16 (4 x kv_heads x head_dim bytes, over the segment's
 * tokens), then per chunk its codes: the keys [h][slot][d] centred and
 * scaled, z = (k - mu) / sd, each quantised to `bits` bits (1-3: the
 * Lloyd-Max quantiser of a unit Gaussian; 4: uniform on +-3), packed
 * LSB-first. Padding slots of a partial chunk hold code 0.
 */
#define CKV_KEYQ_MAGIC "CKVKEYQ1"
#define CKV_KEYQ_BITS 3 /* what the store writes */

/* Code bytes of one chunk: kv_heads * chunk_tokens * head_dim * bits / 8. */
uint64_t ckv_keyq_chunk_bytes(const ckv_geom *g, unsigned bits);
/* Bytes of one layer in keyq.bin: scales then `chunks` chunks' codes. */
uint64_t ckv_keyq_layer_bytes(const ckv_geom *g, unsigned bits, uint32_t chunks);
/* Add the `valid` keys of a chunk to per-(head, dim) sums: sum[h*D+d], sumsq[h*D+d]. */
void ckv_keyq_stats_add(const ckv_geom *g, const void *chunk, uint32_t valid, double *sum,
			double *sumsq);
/*
 * Scales from the sums over n keys: mu = sum / n, sd = sqrt(var) + 1e-6
 * with var = (sumsq - n mu^2) / (n - 1) (0 when n < 2), both rounded to
 * bf16: scales[0 .. HD) = mu, scales[HD .. 2HD) = sd.
 */
void ckv_keyq_scales(const ckv_geom *g, const double *sum, const double *sumsq, uint64_t n,
		     uint16_t *scales);
/* Codes of one chunk (ckv_keyq_chunk_bytes of them) from its keys. bits 1-4. */
void ckv_keyq_encode(const ckv_geom *g, unsigned bits, const uint16_t *scales, const void *chunk,
		     uint32_t valid, uint8_t *codes);
/* The 2^bits levels a code decodes to (times sd, plus mu): lv[0 .. 2^bits). bits 1-4. */
void ckv_keyq_levels(unsigned bits, float *lv);
/* The keys a chunk's codes stand for: out [kv_heads][chunk_tokens][head_dim] fp32. */
void ckv_keyq_decode(const ckv_geom *g, unsigned bits, const uint16_t *scales,
		     const uint8_t *codes, float *out);
/*
 * One layer's key copy over a run of a prefix's chunks, [first[0],
 * first[nparts]): the chunks of part i, [first[i], first[i + 1]), come from
 * one segment and share its scales; codes of chunk j at (j - first[0]) * per.
 */
struct ckv_keyq {
	unsigned bits;       /* per key element, 1-4 */
	uint64_t per;        /* code bytes per chunk */
	uint32_t nparts;
	uint32_t *first;     /* [nparts + 1] */
	uint16_t *scales;    /* [nparts][2][kv_heads][head_dim] bf16: mu then sd */
	uint8_t *codes;      /* [chunks][per] */
};
void ckv_keyq_free(struct ckv_keyq *k); /* frees the arrays, zeroes *k */

/* bf16 <-> fp32 (round to nearest even; NaN stays NaN). */
uint16_t ckv_f32_to_bf16(float f);
float ckv_bf16_to_f32(uint16_t h);

/* Layer file name "layer_%03u.kv" (4 digits past 999). */
void ckv_layer_name(uint32_t layer, char out[32]);

#endif
