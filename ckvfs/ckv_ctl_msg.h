/*
 * ckv_ctl_msg.h — messages of the ckvfs control protocol (docs/PROTOCOL.md):
 * one parser and one encoder, shared by the server (ckvfs/ctl.c) and the
 * client (gpu/client.c).
 *
 * Everything here is pure computation on memory: no I/O, no threads, no
 * global state, so the parser can be fuzzed (tests/fuzz/fuzz_ctl_msg.c).
 *
 * Arrays in a parsed message (tokens, chunks, scores, COMPLETE entries,
 * digests, ...) are pointers into the caller's buffer, little-endian and
 * unaligned: read them with ckv_ctl_u32() and friends. They are valid as
 * long as that buffer is. The encoder copies arrays verbatim, so host arrays
 * may be passed as they are on a little-endian host (see the check below).
 */
#ifndef CKV_CTL_MSG_H
#define CKV_CTL_MSG_H

#include <endian.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
/* The wire is little-endian and ckv_ctl_encode passes arrays through. */
#error "ckv control protocol: big-endian hosts are not supported"
#endif

#define CKV_CTL_MAGIC 0x43564b43u /* "CKVC" */
#define CKV_CTL_VERSION_MIN 1
#define CKV_CTL_VERSION 2         /* highest version this code speaks */
#define CKV_CTL_VERSION_KEYQ 2    /* KEYQ needs at least this version */
#define CKV_CTL_HDR 16u
#define CKV_CTL_MAX_PAYLOAD (16u << 20)
#define CKV_CTL_MIN_MSG (64u << 10) /* smallest max_msg a server may announce */
#define CKV_CTL_MAX_VERSIONS 16
#define CKV_CTL_MAX_TEXT 1024       /* ERROR text */
#define CKV_CTL_MAX_STATS 256       /* STATS_OK fields */
#define CKV_CTL_ENTRY 32u           /* bytes of one COMPLETE entry */
#define CKV_CTL_MAX_TOKENS (1u << 26)
#define CKV_CTL_MAX_MODEL 255
#define CKV_CTL_MAX_SALT 63
#define CKV_CTL_MAX_PER (1024u * 4096u) /* kv_heads * head_dim */

enum ckv_ctl_type {
	CKV_CTL_HELLO = 0x0001,
	CKV_CTL_MATCH = 0x0002,
	CKV_CTL_OPEN = 0x0003,
	CKV_CTL_CLOSE = 0x0004,
	CKV_CTL_GET = 0x0005,
	CKV_CTL_RELEASE = 0x0006,
	CKV_CTL_PREFETCH = 0x0007,
	CKV_CTL_SCORE = 0x0008,
	CKV_CTL_DIGESTS = 0x0009,
	CKV_CTL_STATS = 0x000a,
	CKV_CTL_KEYQ = 0x000b,
	CKV_CTL_REPLY = 0x8000, /* bit set on every server -> client type */
	CKV_CTL_HELLO_OK = 0x8001,
	CKV_CTL_MATCH_OK = 0x8002,
	CKV_CTL_OPEN_OK = 0x8003,
	CKV_CTL_COMPLETE = 0x8005,
	CKV_CTL_DIGESTS_OK = 0x8009,
	CKV_CTL_STATS_OK = 0x800a,
	CKV_CTL_KEYQ_OK = 0x800b,
	CKV_CTL_ERROR = 0x80ff,
};

enum ckv_ctl_part { CKV_CTL_PART_KV = 0, CKV_CTL_PART_K = 1, CKV_CTL_PART_V = 2 };

#define CKV_CTL_HELLO_ARENA_FD 0x1u /* HELLO_OK flags: an fd rides with the message */
#define CKV_CTL_ERR_FATAL 0x1u      /* ERROR flags: the server closes the connection */

/* STATS_OK field numbers (PROTOCOL.md §3.9). */
enum ckv_ctl_stat {
	CKV_CTL_ST_ARENA_BYTES = 0,
	CKV_CTL_ST_ARENA_USED,
	CKV_CTL_ST_SLOTS_USED,
	CKV_CTL_ST_PINNED,
	CKV_CTL_ST_HITS,
	CKV_CTL_ST_MISSES,
	CKV_CTL_ST_EVICTIONS,
	CKV_CTL_ST_BYTES_FROM_DISK,
	CKV_CTL_ST_DISK_READS,
	CKV_CTL_ST_READAHEAD_ISSUED,
	CKV_CTL_ST_READAHEAD_USED,
	CKV_CTL_ST_HINTS,
	CKV_CTL_ST_CHECKSUM_FAILURES,
	CKV_CTL_ST_IO_ERRORS,
	CKV_CTL_ST_CLIENTS,
	CKV_CTL_ST_ACCEPTED,
	CKV_CTL_ST_REFUSED,
	CKV_CTL_ST_MESSAGES,
	CKV_CTL_ST_ERRORS,
	CKV_CTL_ST_HOSTILE,
	CKV_CTL_ST_PINS_ALL,
	CKV_CTL_ST_MY_PINS,
	CKV_CTL_ST_MY_PINNED_BYTES,
	CKV_CTL_ST_MY_PREFIXES,
	CKV_CTL_ST_MY_INFLIGHT,
	CKV_CTL_ST_COUNT,
};

typedef struct ckv_ctl_hdr {
	uint32_t magic;
	uint16_t version;
	uint16_t type;
	uint32_t length; /* payload bytes */
	uint32_t id;
} ckv_ctl_hdr;

/*
 * A message, decoded. hdr.magic and hdr.length are filled by the parser and
 * ignored by the encoder (which writes its own). Which union member is used
 * follows hdr.type; GET and PREFETCH share `get`. Field meanings and rules:
 * PROTOCOL.md §3.
 */
/* Chunks [first, first + count) of a layer of an open prefix: DIGESTS and KEYQ. */
struct ckv_ctl_range {
	uint32_t handle, layer, first, count;
};

typedef struct ckv_ctl_msg {
	ckv_ctl_hdr hdr;
	union {
		struct {
			uint16_t nversions;
			uint32_t flags;
			const void *versions; /* u16[nversions] */
		} hello;
		struct {
			uint16_t version;
			uint32_t flags;
			uint64_t arena_size;
			uint32_t max_msg, max_pins;
			uint64_t max_pinned_bytes;
			uint32_t max_prefixes, max_inflight, server_pid;
		} hello_ok;
		struct {
			uint32_t layers, kv_heads, head_dim, chunk_tokens, dtype;
			uint16_t model_len, salt_len;
			uint32_t ntokens;
			const void *tokens; /* u32[ntokens] */
			const char *model;  /* model_len bytes, not NUL-terminated */
			const char *salt;   /* salt_len bytes */
		} match;
		struct {
			uint8_t hash[16];
			uint32_t matched;
		} match_ok;
		struct {
			uint8_t hash[16];
		} open;
		struct {
			uint32_t handle, dtype;
			uint8_t hash[16];
			uint32_t layers, kv_heads, head_dim, chunk_tokens, tokens, chunks;
			uint64_t half_bytes, chunk_bytes, seed;
			int64_t created;
			uint16_t model_len, salt_len;
			const char *model, *salt;
		} open_ok;
		struct {
			uint32_t handle;
		} close;
		struct { /* GET and PREFETCH */
			uint32_t handle, layer;
			uint16_t part, flags;
			uint32_t n;
			const void *chunks; /* u32[n] */
		} get;
		struct {
			uint32_t count;
			const void *entries; /* CKV_CTL_ENTRY bytes each: ckv_ctl_entry_load */
		} complete;
		struct {
			uint32_t n;
			const void *tokens; /* u64[n] */
		} release;
		struct {
			uint32_t handle, layer;
			uint16_t parts, flags;
			uint32_t n;
			const void *chunks; /* u32[n] */
			const void *scores; /* f32[n] */
		} score;
		struct ckv_ctl_range digests;
		struct {
			uint32_t first, count, per;
			const void *data; /* f32[count * per] */
		} digests_ok;
		struct {
			uint32_t nfields;
			const void *fields; /* u64[nfields] */
		} stats_ok;
		struct ckv_ctl_range keyq;
		struct {
			uint32_t first, count;
			uint16_t bits, nparts;
			uint32_t per;          /* code bytes per chunk */
			uint32_t hd;           /* kv_heads * head_dim */
			const void *starts;    /* u32[nparts]: first chunk of each part */
			const void *scales;    /* u16[nparts][2][hd] bf16 */
			const void *codes;     /* u8[count][per] */
		} keyq_ok;
		struct {
			int32_t err; /* positive errno */
			uint16_t flags, text_len;
			const char *text; /* text_len bytes, not NUL-terminated */
		} error;
	} u;
} ckv_ctl_msg;

/* One COMPLETE entry, host form. */
typedef struct ckv_ctl_entry {
	uint32_t index;
	int32_t rc;      /* 0 or -errno */
	uint64_t offset; /* in the arena */
	uint64_t length;
	uint64_t token;  /* the pin; 0 when rc < 0 */
} ckv_ctl_entry;

/* Unaligned little-endian loads of element i of a wire array. */
static inline uint16_t ckv_ctl_u16(const void *p, size_t i)
{
	uint16_t v;

	memcpy(&v, (const uint8_t *)p + i * 2, 2);
	return le16toh(v);
}

static inline uint32_t ckv_ctl_u32(const void *p, size_t i)
{
	uint32_t v;

	memcpy(&v, (const uint8_t *)p + i * 4, 4);
	return le32toh(v);
}

static inline uint64_t ckv_ctl_u64(const void *p, size_t i)
{
	uint64_t v;

	memcpy(&v, (const uint8_t *)p + i * 8, 8);
	return le64toh(v);
}

static inline float ckv_ctl_f32(const void *p, size_t i)
{
	uint32_t v = ckv_ctl_u32(p, i);
	float f;

	memcpy(&f, &v, 4);
	return f;
}

void ckv_ctl_entry_load(const void *entries, uint32_t i, ckv_ctl_entry *e);
void ckv_ctl_entry_store(void *dst, const ckv_ctl_entry *e); /* CKV_CTL_ENTRY bytes */

/*
 * Parse the message at the start of buf[0, len).
 *
 * Returns the size of the message (CKV_CTL_HDR + payload, > 0) when buf
 * holds a complete, valid one, and fills *out; 0 when more bytes are needed
 * (out->hdr is filled, and checked, once the CKV_CTL_HDR header bytes are
 * there: a caller can refuse a length over its own limit before waiting for
 * the payload); or a negative errno when the message is malformed, with a
 * message naming the message type and field in err (errlen > 0; NUL-
 * terminated): -EPROTO bad magic, -EPROTONOSUPPORT unknown version,
 * -EBADMSG unknown type or a payload size that does not match its counts,
 * -EMSGSIZE length over CKV_CTL_MAX_PAYLOAD, -EINVAL a field out of range.
 * Bytes after the message in buf are not looked at.
 */
int ckv_ctl_parse(const void *buf, size_t len, ckv_ctl_msg *out, char *err, size_t errlen);

/* Name of a message type ("GET"), or "type 0x1234". buf: room for 16. */
const char *ckv_ctl_type_name(uint16_t type, char buf[16]);

/* A growable byte buffer for encoding. */
typedef struct ckv_ctl_buf {
	uint8_t *p;
	size_t len, cap;
} ckv_ctl_buf;

int ckv_ctl_buf_reserve(ckv_ctl_buf *b, size_t more); /* 0 or -ENOMEM */
void ckv_ctl_buf_free(ckv_ctl_buf *b);

/* Payload bytes m would encode to (0 for an unknown type). */
size_t ckv_ctl_payload_size(const ckv_ctl_msg *m);

/*
 * Append m (header and payload) to b. Writes m->hdr.version, type and id,
 * computes the length; reserved fields are written as zero. Does not
 * validate beyond the type being known: what it writes from a message
 * ckv_ctl_parse accepted parses back to the same bytes. 0, -EINVAL (unknown
 * type, payload over CKV_CTL_MAX_PAYLOAD) or -ENOMEM.
 */
int ckv_ctl_encode(ckv_ctl_buf *b, const ckv_ctl_msg *m);

#endif
