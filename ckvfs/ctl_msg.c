/*
 * ctl_msg.c — parse and encode control-protocol messages (docs/PROTOCOL.md);
 * the contract is ckv_ctl_msg.h.
 *
 * The parser trusts nothing: every count is checked against the payload
 * length in 64-bit arithmetic (a count times an element size cannot wrap),
 * every reserved field must be zero, every enum in range, so what it accepts
 * re-encodes to exactly the bytes it was given (the fuzzer checks that).
 */
#include "ckv_ctl_msg.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

/* ---- little-endian stores ------------------------------------------------ */

static void st16(uint8_t *p, uint16_t v)
{
	v = htole16(v);
	memcpy(p, &v, 2);
}

static void st32(uint8_t *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, 4);
}

static void st64(uint8_t *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, 8);
}

void ckv_ctl_entry_load(const void *entries, uint32_t i, ckv_ctl_entry *e)
{
	const uint8_t *p = (const uint8_t *)entries + (size_t)i * CKV_CTL_ENTRY;

	e->index = ckv_ctl_u32(p, 0);
	e->rc = (int32_t)ckv_ctl_u32(p, 1);
	e->offset = ckv_ctl_u64(p + 8, 0);
	e->length = ckv_ctl_u64(p + 16, 0);
	e->token = ckv_ctl_u64(p + 24, 0);
}

void ckv_ctl_entry_store(void *dst, const ckv_ctl_entry *e)
{
	uint8_t *p = dst;

	st32(p, e->index);
	st32(p + 4, (uint32_t)e->rc);
	st64(p + 8, e->offset);
	st64(p + 16, e->length);
	st64(p + 24, e->token);
}

const char *ckv_ctl_type_name(uint16_t type, char buf[16])
{
	switch (type) {
	case CKV_CTL_HELLO: return "HELLO";
	case CKV_CTL_MATCH: return "MATCH";
	case CKV_CTL_OPEN: return "OPEN";
	case CKV_CTL_CLOSE: return "CLOSE";
	case CKV_CTL_GET: return "GET";
	case CKV_CTL_RELEASE: return "RELEASE";
	case CKV_CTL_PREFETCH: return "PREFETCH";
	case CKV_CTL_SCORE: return "SCORE";
	case CKV_CTL_DIGESTS: return "DIGESTS";
	case CKV_CTL_STATS: return "STATS";
	case CKV_CTL_KEYQ: return "KEYQ";
	case CKV_CTL_KEYQ_OK: return "KEYQ_OK";
	case CKV_CTL_HELLO_OK: return "HELLO_OK";
	case CKV_CTL_MATCH_OK: return "MATCH_OK";
	case CKV_CTL_OPEN_OK: return "OPEN_OK";
	case CKV_CTL_COMPLETE: return "COMPLETE";
	case CKV_CTL_DIGESTS_OK: return "DIGESTS_OK";
	case CKV_CTL_STATS_OK: return "STATS_OK";
	case CKV_CTL_ERROR: return "ERROR";
	default:
		snprintf(buf, 16, "type 0x%04x", type);
		return buf;
	}
}

/* ---- parser -------------------------------------------------------------- */

static int perr(char *err, size_t errlen, int rc, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int perr(char *err, size_t errlen, int rc, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return rc;
}

/* The payload of one message being parsed. */
struct pl {
	const uint8_t *p;
	uint32_t len;
	const char *what; /* type name for messages */
	char *err;
	size_t errlen;
};

#define PFAIL(x, rc, fmt, ...) perr((x)->err, (x)->errlen, rc, "%s: " fmt, (x)->what, __VA_ARGS__)

static uint16_t g16(const struct pl *x, uint32_t off)
{
	return ckv_ctl_u16(x->p + off, 0);
}

static uint32_t g32(const struct pl *x, uint32_t off)
{
	return ckv_ctl_u32(x->p + off, 0);
}

static uint64_t g64(const struct pl *x, uint32_t off)
{
	return ckv_ctl_u64(x->p + off, 0);
}

/* The payload must be exactly `need` bytes; `why` says what sized it. */
static int want(const struct pl *x, uint64_t need, const char *why)
{
	if (x->len == need)
		return 0;
	return PFAIL(x, -EBADMSG, "payload is %u bytes, %s needs %llu", x->len, why,
		     (unsigned long long)need);
}

/* The fixed part must be there before its fields are read. */
static int atleast(const struct pl *x, uint32_t need)
{
	if (x->len >= need)
		return 0;
	return PFAIL(x, -EBADMSG, "payload is %u bytes, shorter than its %u-byte fixed part",
		     x->len, need);
}

static int zero(const struct pl *x, uint64_t v, const char *field)
{
	if (v == 0)
		return 0;
	return PFAIL(x, -EINVAL, "%s must be 0, got %llu", field, (unsigned long long)v);
}

static int no_nul(const struct pl *x, const char *s, uint32_t n, const char *field)
{
	if (!memchr(s, 0, n))
		return 0;
	return PFAIL(x, -EINVAL, "%s contains a NUL byte", field);
}

static int p_hello(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = atleast(x, 8)))
		return rc;
	m->u.hello.nversions = g16(x, 0);
	m->u.hello.flags = g32(x, 4);
	m->u.hello.versions = x->p + 8;
	if (m->u.hello.nversions < 1 || m->u.hello.nversions > CKV_CTL_MAX_VERSIONS)
		return PFAIL(x, -EINVAL, "nversions %u, expected 1..%u", m->u.hello.nversions,
			     CKV_CTL_MAX_VERSIONS);
	if ((rc = zero(x, g16(x, 2), "reserved")) || (rc = zero(x, m->u.hello.flags, "flags")) ||
	    (rc = want(x, 8 + 2ull * m->u.hello.nversions, "nversions")))
		return rc;
	for (uint32_t i = 0; i < m->u.hello.nversions; i++)
		if (ckv_ctl_u16(m->u.hello.versions, i) == 0)
			return PFAIL(x, -EINVAL, "versions[%u] is 0", i);
	return 0;
}

static int p_hello_ok(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = want(x, 48, "HELLO_OK")))
		return rc;
	m->u.hello_ok.version = g16(x, 0);
	m->u.hello_ok.flags = g32(x, 4);
	m->u.hello_ok.arena_size = g64(x, 8);
	m->u.hello_ok.max_msg = g32(x, 16);
	m->u.hello_ok.max_pins = g32(x, 20);
	m->u.hello_ok.max_pinned_bytes = g64(x, 24);
	m->u.hello_ok.max_prefixes = g32(x, 32);
	m->u.hello_ok.max_inflight = g32(x, 36);
	m->u.hello_ok.server_pid = g32(x, 40);
	if ((rc = zero(x, g16(x, 2), "reserved")) || (rc = zero(x, g32(x, 44), "reserved")) ||
	    (rc = zero(x, m->u.hello_ok.flags & ~CKV_CTL_HELLO_ARENA_FD, "flags (undefined bits)")))
		return rc;
	if (m->u.hello_ok.version < CKV_CTL_VERSION_MIN)
		return PFAIL(x, -EINVAL, "version %u", m->u.hello_ok.version);
	if (m->u.hello_ok.max_msg < CKV_CTL_MIN_MSG || m->u.hello_ok.max_msg > CKV_CTL_MAX_PAYLOAD)
		return PFAIL(x, -EINVAL, "max_msg %u, expected %u..%u", m->u.hello_ok.max_msg,
			     CKV_CTL_MIN_MSG, CKV_CTL_MAX_PAYLOAD);
	return 0;
}

/* Geometry fields shared by MATCH and OPEN_OK: dtype, string lengths. */
static int geom_strings(const struct pl *x, uint32_t dtype, uint16_t model_len, uint16_t salt_len)
{
	if (dtype < 1 || dtype > 4)
		return PFAIL(x, -EINVAL, "dtype %u, expected 1..4 (bf16, fp16, fp8_e4m3, fp32)", dtype);
	if (model_len < 1 || model_len > CKV_CTL_MAX_MODEL)
		return PFAIL(x, -EINVAL, "model_len %u, expected 1..%u", model_len, CKV_CTL_MAX_MODEL);
	if (salt_len > CKV_CTL_MAX_SALT)
		return PFAIL(x, -EINVAL, "salt_len %u, expected 0..%u", salt_len, CKV_CTL_MAX_SALT);
	return 0;
}

static int p_match(const struct pl *x, ckv_ctl_msg *m)
{
	uint64_t tok_bytes;
	int rc;

	if ((rc = atleast(x, 32)))
		return rc;
	m->u.match.layers = g32(x, 0);
	m->u.match.kv_heads = g32(x, 4);
	m->u.match.head_dim = g32(x, 8);
	m->u.match.chunk_tokens = g32(x, 12);
	m->u.match.dtype = g32(x, 16);
	m->u.match.model_len = g16(x, 20);
	m->u.match.salt_len = g16(x, 22);
	m->u.match.ntokens = g32(x, 24);
	if ((rc = zero(x, g32(x, 28), "reserved")) ||
	    (rc = geom_strings(x, m->u.match.dtype, m->u.match.model_len, m->u.match.salt_len)))
		return rc;
	if (m->u.match.ntokens > CKV_CTL_MAX_TOKENS)
		return PFAIL(x, -EINVAL, "ntokens %u, expected at most %u", m->u.match.ntokens,
			     CKV_CTL_MAX_TOKENS);
	tok_bytes = 4ull * m->u.match.ntokens;
	if ((rc = want(x, 32 + tok_bytes + m->u.match.model_len + m->u.match.salt_len,
		       "ntokens, model_len and salt_len")))
		return rc;
	m->u.match.tokens = x->p + 32;
	m->u.match.model = (const char *)x->p + 32 + tok_bytes;
	m->u.match.salt = m->u.match.model + m->u.match.model_len;
	if ((rc = no_nul(x, m->u.match.model, m->u.match.model_len, "model")) ||
	    (rc = no_nul(x, m->u.match.salt, m->u.match.salt_len, "salt")))
		return rc;
	return 0;
}

static int p_match_ok(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = want(x, 24, "MATCH_OK")))
		return rc;
	memcpy(m->u.match_ok.hash, x->p, 16);
	m->u.match_ok.matched = g32(x, 16);
	return zero(x, g32(x, 20), "reserved");
}

static int p_open(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = want(x, 16, "OPEN")))
		return rc;
	memcpy(m->u.open.hash, x->p, 16);
	return 0;
}

static int p_open_ok(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = atleast(x, 88)))
		return rc;
	m->u.open_ok.handle = g32(x, 0);
	m->u.open_ok.dtype = g32(x, 4);
	memcpy(m->u.open_ok.hash, x->p + 8, 16);
	m->u.open_ok.layers = g32(x, 24);
	m->u.open_ok.kv_heads = g32(x, 28);
	m->u.open_ok.head_dim = g32(x, 32);
	m->u.open_ok.chunk_tokens = g32(x, 36);
	m->u.open_ok.tokens = g32(x, 40);
	m->u.open_ok.chunks = g32(x, 44);
	m->u.open_ok.half_bytes = g64(x, 48);
	m->u.open_ok.chunk_bytes = g64(x, 56);
	m->u.open_ok.seed = g64(x, 64);
	m->u.open_ok.created = (int64_t)g64(x, 72);
	m->u.open_ok.model_len = g16(x, 80);
	m->u.open_ok.salt_len = g16(x, 82);
	if ((rc = zero(x, g32(x, 84), "reserved")) ||
	    (rc = geom_strings(x, m->u.open_ok.dtype, m->u.open_ok.model_len, m->u.open_ok.salt_len)) ||
	    (rc = want(x, 88ull + m->u.open_ok.model_len + m->u.open_ok.salt_len,
		       "model_len and salt_len")))
		return rc;
	if (m->u.open_ok.handle == 0)
		return PFAIL(x, -EINVAL, "handle is %u", 0u);
	m->u.open_ok.model = (const char *)x->p + 88;
	m->u.open_ok.salt = m->u.open_ok.model + m->u.open_ok.model_len;
	if ((rc = no_nul(x, m->u.open_ok.model, m->u.open_ok.model_len, "model")) ||
	    (rc = no_nul(x, m->u.open_ok.salt, m->u.open_ok.salt_len, "salt")))
		return rc;
	return 0;
}

static int p_close(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = want(x, 8, "CLOSE")))
		return rc;
	m->u.close.handle = g32(x, 0);
	return zero(x, g32(x, 4), "reserved");
}

/* GET and PREFETCH. */
static int p_get(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = atleast(x, 16)))
		return rc;
	m->u.get.handle = g32(x, 0);
	m->u.get.layer = g32(x, 4);
	m->u.get.part = g16(x, 8);
	m->u.get.flags = g16(x, 10);
	m->u.get.n = g32(x, 12);
	m->u.get.chunks = x->p + 16;
	if (m->u.get.part > CKV_CTL_PART_V)
		return PFAIL(x, -EINVAL, "part %u, expected 0 (KV), 1 (K) or 2 (V)", m->u.get.part);
	if ((rc = zero(x, m->u.get.flags, "flags")))
		return rc;
	if (m->u.get.n == 0)
		return PFAIL(x, -EINVAL, "n is %u, expected at least 1 chunk", 0u);
	return want(x, 16 + 4ull * m->u.get.n, "n");
}

static int p_complete(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = atleast(x, 8)))
		return rc;
	m->u.complete.count = g32(x, 0);
	m->u.complete.entries = x->p + 8;
	if ((rc = zero(x, g32(x, 4), "reserved")))
		return rc;
	if (m->u.complete.count == 0)
		return PFAIL(x, -EINVAL, "count is %u, expected at least 1 entry", 0u);
	if ((rc = want(x, 8 + (uint64_t)CKV_CTL_ENTRY * m->u.complete.count, "count")))
		return rc;
	for (uint32_t i = 0; i < m->u.complete.count; i++) {
		ckv_ctl_entry e;

		ckv_ctl_entry_load(m->u.complete.entries, i, &e);
		if (e.rc > 0 || e.rc <= -4096)
			return PFAIL(x, -EINVAL, "entry %u: rc %d, expected 0 or -1..-4095", i, e.rc);
		if (e.rc == 0 && (e.token == 0 || e.length == 0 || e.offset + e.length < e.offset))
			return PFAIL(x, -EINVAL, "entry %u: rc 0 with token %llu, length %llu, offset %llu",
				     i, (unsigned long long)e.token, (unsigned long long)e.length,
				     (unsigned long long)e.offset);
		if (e.rc < 0 && (e.token || e.length || e.offset))
			return PFAIL(x, -EINVAL, "entry %u: rc %d with a non-zero offset, length or token",
				     i, e.rc);
	}
	return 0;
}

static int p_release(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = atleast(x, 8)))
		return rc;
	m->u.release.n = g32(x, 0);
	m->u.release.tokens = x->p + 8;
	if ((rc = zero(x, g32(x, 4), "reserved")))
		return rc;
	if (m->u.release.n == 0)
		return PFAIL(x, -EINVAL, "n is %u, expected at least 1 token", 0u);
	return want(x, 8 + 8ull * m->u.release.n, "n");
}

static int p_score(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = atleast(x, 16)))
		return rc;
	m->u.score.handle = g32(x, 0);
	m->u.score.layer = g32(x, 4);
	m->u.score.parts = g16(x, 8);
	m->u.score.flags = g16(x, 10);
	m->u.score.n = g32(x, 12);
	if (m->u.score.parts < 1 || m->u.score.parts > 7)
		return PFAIL(x, -EINVAL, "parts 0x%x, expected a mask of 1 (KV), 2 (K), 4 (V)",
			     m->u.score.parts);
	if ((rc = zero(x, m->u.score.flags, "flags")))
		return rc;
	if (m->u.score.n == 0)
		return PFAIL(x, -EINVAL, "n is %u, expected at least 1 chunk", 0u);
	if ((rc = want(x, 16 + 8ull * m->u.score.n, "n")))
		return rc;
	m->u.score.chunks = x->p + 16;
	m->u.score.scores = x->p + 16 + 4ull * m->u.score.n;
	for (uint32_t i = 0; i < m->u.score.n; i++)
		if (!isfinite(ckv_ctl_f32(m->u.score.scores, i)))
			return PFAIL(x, -EINVAL, "scores[%u] is not finite", i);
	return 0;
}

/* DIGESTS and KEYQ: handle, layer, first, count; at least one chunk, no overflow. */
static int p_range(const struct pl *x, const char *what, struct ckv_ctl_range *r)
{
	int rc;

	if ((rc = want(x, 16, what)))
		return rc;
	r->handle = g32(x, 0);
	r->layer = g32(x, 4);
	r->first = g32(x, 8);
	r->count = g32(x, 12);
	if (r->count == 0)
		return PFAIL(x, -EINVAL, "count is %u, expected at least 1 chunk", 0u);
	if ((uint64_t)r->first + r->count > UINT32_MAX)
		return PFAIL(x, -EINVAL, "first %u + count %u overflows", r->first, r->count);
	return 0;
}

static int p_digests_ok(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = atleast(x, 16)))
		return rc;
	m->u.digests_ok.first = g32(x, 0);
	m->u.digests_ok.count = g32(x, 4);
	m->u.digests_ok.per = g32(x, 8);
	m->u.digests_ok.data = x->p + 16;
	if ((rc = zero(x, g32(x, 12), "reserved")))
		return rc;
	if (m->u.digests_ok.count == 0)
		return PFAIL(x, -EINVAL, "count is %u, expected at least 1 chunk", 0u);
	if (m->u.digests_ok.per < 1 || m->u.digests_ok.per > CKV_CTL_MAX_PER)
		return PFAIL(x, -EINVAL, "per %u, expected 1..%u", m->u.digests_ok.per, CKV_CTL_MAX_PER);
	return want(x, 16 + 4ull * m->u.digests_ok.count * m->u.digests_ok.per, "count x per");
}

static int p_keyq_ok(const struct pl *x, ckv_ctl_msg *m)
{
	uint64_t end;
	int rc;

	if ((rc = atleast(x, 20)))
		return rc;
	m->u.keyq_ok.first = g32(x, 0);
	m->u.keyq_ok.count = g32(x, 4);
	m->u.keyq_ok.bits = g16(x, 8);
	m->u.keyq_ok.nparts = g16(x, 10);
	m->u.keyq_ok.per = g32(x, 12);
	m->u.keyq_ok.hd = g32(x, 16);
	if (m->u.keyq_ok.count == 0)
		return PFAIL(x, -EINVAL, "count is %u, expected at least 1 chunk", 0u);
	end = (uint64_t)m->u.keyq_ok.first + m->u.keyq_ok.count;
	if (end > UINT32_MAX)
		return PFAIL(x, -EINVAL, "first %u + count %u overflows", m->u.keyq_ok.first,
			     m->u.keyq_ok.count);
	if (m->u.keyq_ok.bits < 1 || m->u.keyq_ok.bits > 4)
		return PFAIL(x, -EINVAL, "bits %u, expected 1..4", m->u.keyq_ok.bits);
	if (m->u.keyq_ok.nparts < 1 || m->u.keyq_ok.nparts > m->u.keyq_ok.count)
		return PFAIL(x, -EINVAL, "nparts %u, expected 1..count (%u)", m->u.keyq_ok.nparts,
			     m->u.keyq_ok.count);
	if (m->u.keyq_ok.hd < 1 || m->u.keyq_ok.hd > CKV_CTL_MAX_PER)
		return PFAIL(x, -EINVAL, "hd %u, expected 1..%u", m->u.keyq_ok.hd, CKV_CTL_MAX_PER);
	/* a chunk's codes: hd x chunk_tokens x bits / 8 bytes, chunk_tokens unknown here */
	if (m->u.keyq_ok.per < 1 || m->u.keyq_ok.per > CKV_CTL_MAX_PAYLOAD)
		return PFAIL(x, -EINVAL, "per %u, expected 1..%u", m->u.keyq_ok.per, CKV_CTL_MAX_PAYLOAD);
	if ((rc = want(x, 20 + 4ull * m->u.keyq_ok.nparts +
				  4ull * m->u.keyq_ok.hd * m->u.keyq_ok.nparts +
				  (uint64_t)m->u.keyq_ok.count * m->u.keyq_ok.per,
		       "nparts, hd, count x per")))
		return rc;
	m->u.keyq_ok.starts = x->p + 20;
	m->u.keyq_ok.scales = x->p + 20 + 4ull * m->u.keyq_ok.nparts;
	m->u.keyq_ok.codes = x->p + 20 + 4ull * m->u.keyq_ok.nparts +
			     4ull * m->u.keyq_ok.hd * m->u.keyq_ok.nparts;
	for (uint32_t i = 0; i < m->u.keyq_ok.nparts; i++) {
		uint32_t st = ckv_ctl_u32(m->u.keyq_ok.starts, i);

		if (i == 0 ? st != m->u.keyq_ok.first :
			     st <= ckv_ctl_u32(m->u.keyq_ok.starts, i - 1) || st >= end)
			return PFAIL(x, -EINVAL, "starts[%u] = %u: parts must begin at first (%u) and rise within the range",
				     i, st, m->u.keyq_ok.first);
	}
	return 0;
}

static int p_stats(const struct pl *x, ckv_ctl_msg *m)
{
	(void)m;
	return want(x, 0, "STATS");
}

static int p_stats_ok(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = atleast(x, 8)))
		return rc;
	m->u.stats_ok.nfields = g32(x, 0);
	m->u.stats_ok.fields = x->p + 8;
	if ((rc = zero(x, g32(x, 4), "reserved")))
		return rc;
	if (m->u.stats_ok.nfields > CKV_CTL_MAX_STATS)
		return PFAIL(x, -EINVAL, "nfields %u, expected at most %u", m->u.stats_ok.nfields,
			     CKV_CTL_MAX_STATS);
	return want(x, 8 + 8ull * m->u.stats_ok.nfields, "nfields");
}

static int p_error(const struct pl *x, ckv_ctl_msg *m)
{
	int rc;

	if ((rc = atleast(x, 8)))
		return rc;
	m->u.error.err = (int32_t)g32(x, 0);
	m->u.error.flags = g16(x, 4);
	m->u.error.text_len = g16(x, 6);
	m->u.error.text = (const char *)x->p + 8;
	if (m->u.error.err < 1 || m->u.error.err > 4095)
		return PFAIL(x, -EINVAL, "err %d, expected an errno 1..4095", m->u.error.err);
	if ((rc = zero(x, m->u.error.flags & ~CKV_CTL_ERR_FATAL, "flags (undefined bits)")))
		return rc;
	if (m->u.error.text_len > CKV_CTL_MAX_TEXT)
		return PFAIL(x, -EINVAL, "text_len %u, expected at most %u", m->u.error.text_len,
			     CKV_CTL_MAX_TEXT);
	if ((rc = want(x, 8ull + m->u.error.text_len, "text_len")))
		return rc;
	return no_nul(x, m->u.error.text, m->u.error.text_len, "text");
}

int ckv_ctl_parse(const void *buf, size_t len, ckv_ctl_msg *out, char *err, size_t errlen)
{
	const uint8_t *b = buf;
	ckv_ctl_hdr *h = &out->hdr;
	struct pl x;
	char tn[16];
	int rc;

	if (err && errlen)
		err[0] = 0;
	memset(out, 0, sizeof(*out));
	if (len < CKV_CTL_HDR)
		return 0;
	h->magic = ckv_ctl_u32(b, 0);
	h->version = ckv_ctl_u16(b + 4, 0);
	h->type = ckv_ctl_u16(b + 6, 0);
	h->length = ckv_ctl_u32(b + 8, 0);
	h->id = ckv_ctl_u32(b + 12, 0);
	if (h->magic != CKV_CTL_MAGIC)
		return perr(err, errlen, -EPROTO, "header: magic 0x%08x, expected 0x%08x (\"CKVC\")",
			    h->magic, CKV_CTL_MAGIC);
	if (h->version < CKV_CTL_VERSION_MIN || h->version > CKV_CTL_VERSION)
		return perr(err, errlen, -EPROTONOSUPPORT, "header: version %u, expected %u..%u",
			    h->version, CKV_CTL_VERSION_MIN, CKV_CTL_VERSION);
	x.what = ckv_ctl_type_name(h->type, tn);
	if (x.what == tn)
		return perr(err, errlen, -EBADMSG, "header: unknown message type 0x%04x", h->type);
	if (h->length > CKV_CTL_MAX_PAYLOAD)
		return perr(err, errlen, -EMSGSIZE, "%s: length %u exceeds the %u-byte maximum",
			    x.what, h->length, CKV_CTL_MAX_PAYLOAD);
	if (len - CKV_CTL_HDR < h->length)
		return 0;

	x.p = b + CKV_CTL_HDR;
	x.len = h->length;
	x.err = err;
	x.errlen = errlen;
	switch (h->type) {
	case CKV_CTL_HELLO: rc = p_hello(&x, out); break;
	case CKV_CTL_MATCH: rc = p_match(&x, out); break;
	case CKV_CTL_OPEN: rc = p_open(&x, out); break;
	case CKV_CTL_CLOSE: rc = p_close(&x, out); break;
	case CKV_CTL_GET:
	case CKV_CTL_PREFETCH: rc = p_get(&x, out); break;
	case CKV_CTL_RELEASE: rc = p_release(&x, out); break;
	case CKV_CTL_SCORE: rc = p_score(&x, out); break;
	case CKV_CTL_DIGESTS: rc = p_range(&x, "DIGESTS", &out->u.digests); break;
	case CKV_CTL_STATS: rc = p_stats(&x, out); break;
	case CKV_CTL_KEYQ: rc = p_range(&x, "KEYQ", &out->u.keyq); break;
	case CKV_CTL_KEYQ_OK: rc = p_keyq_ok(&x, out); break;
	case CKV_CTL_HELLO_OK: rc = p_hello_ok(&x, out); break;
	case CKV_CTL_MATCH_OK: rc = p_match_ok(&x, out); break;
	case CKV_CTL_OPEN_OK: rc = p_open_ok(&x, out); break;
	case CKV_CTL_COMPLETE: rc = p_complete(&x, out); break;
	case CKV_CTL_DIGESTS_OK: rc = p_digests_ok(&x, out); break;
	case CKV_CTL_STATS_OK: rc = p_stats_ok(&x, out); break;
	case CKV_CTL_ERROR: rc = p_error(&x, out); break;
	default: rc = perr(err, errlen, -EBADMSG, "header: unknown message type 0x%04x", h->type);
	}
	if (rc < 0)
		return rc;
	return (int)(CKV_CTL_HDR + h->length);
}

/* ---- encoder ------------------------------------------------------------- */

int ckv_ctl_buf_reserve(ckv_ctl_buf *b, size_t more)
{
	size_t cap;
	uint8_t *p;

	if (more > SIZE_MAX / 2 - b->len)
		return -ENOMEM;
	if (b->len + more <= b->cap)
		return 0;
	cap = b->cap ? b->cap : 256;
	while (cap < b->len + more)
		cap *= 2;
	p = realloc(b->p, cap);
	if (!p)
		return -ENOMEM;
	b->p = p;
	b->cap = cap;
	return 0;
}

void ckv_ctl_buf_free(ckv_ctl_buf *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

size_t ckv_ctl_payload_size(const ckv_ctl_msg *m)
{
	switch (m->hdr.type) {
	case CKV_CTL_HELLO: return 8 + 2 * (size_t)m->u.hello.nversions;
	case CKV_CTL_MATCH:
		return 32 + 4 * (size_t)m->u.match.ntokens + m->u.match.model_len + m->u.match.salt_len;
	case CKV_CTL_OPEN: return 16;
	case CKV_CTL_CLOSE: return 8;
	case CKV_CTL_GET:
	case CKV_CTL_PREFETCH: return 16 + 4 * (size_t)m->u.get.n;
	case CKV_CTL_RELEASE: return 8 + 8 * (size_t)m->u.release.n;
	case CKV_CTL_SCORE: return 16 + 8 * (size_t)m->u.score.n;
	case CKV_CTL_DIGESTS: return 16;
	case CKV_CTL_STATS: return 0;
	case CKV_CTL_HELLO_OK: return 48;
	case CKV_CTL_MATCH_OK: return 24;
	case CKV_CTL_OPEN_OK: return 88 + (size_t)m->u.open_ok.model_len + m->u.open_ok.salt_len;
	case CKV_CTL_COMPLETE: return 8 + CKV_CTL_ENTRY * (size_t)m->u.complete.count;
	case CKV_CTL_DIGESTS_OK:
		return 16 + 4 * (size_t)m->u.digests_ok.count * m->u.digests_ok.per;
	case CKV_CTL_STATS_OK: return 8 + 8 * (size_t)m->u.stats_ok.nfields;
	case CKV_CTL_KEYQ: return 16;
	case CKV_CTL_KEYQ_OK:
		return 20 + 4 * (size_t)m->u.keyq_ok.nparts + 4 * (size_t)m->u.keyq_ok.hd * m->u.keyq_ok.nparts +
		       (size_t)m->u.keyq_ok.count * m->u.keyq_ok.per;
	case CKV_CTL_ERROR: return 8 + (size_t)m->u.error.text_len;
	default: return 0;
	}
}

static void st_range(uint8_t *p, const struct ckv_ctl_range *r)
{
	st32(p, r->handle);
	st32(p + 4, r->layer);
	st32(p + 8, r->first);
	st32(p + 12, r->count);
}

static void copy(uint8_t *dst, const void *src, size_t n)
{
	if (n)
		memcpy(dst, src, n);
}

int ckv_ctl_encode(ckv_ctl_buf *b, const ckv_ctl_msg *m)
{
	char tn[16];
	size_t n = ckv_ctl_payload_size(m);
	uint8_t *p;
	int rc;

	if (ckv_ctl_type_name(m->hdr.type, tn) == tn || n > CKV_CTL_MAX_PAYLOAD)
		return -EINVAL;
	rc = ckv_ctl_buf_reserve(b, CKV_CTL_HDR + n);
	if (rc)
		return rc;
	p = b->p + b->len;
	memset(p, 0, CKV_CTL_HDR + n);
	st32(p, CKV_CTL_MAGIC);
	st16(p + 4, m->hdr.version);
	st16(p + 6, m->hdr.type);
	st32(p + 8, (uint32_t)n);
	st32(p + 12, m->hdr.id);
	p += CKV_CTL_HDR;

	switch (m->hdr.type) {
	case CKV_CTL_HELLO:
		st16(p, m->u.hello.nversions);
		st32(p + 4, m->u.hello.flags);
		copy(p + 8, m->u.hello.versions, 2 * (size_t)m->u.hello.nversions);
		break;
	case CKV_CTL_HELLO_OK:
		st16(p, m->u.hello_ok.version);
		st32(p + 4, m->u.hello_ok.flags);
		st64(p + 8, m->u.hello_ok.arena_size);
		st32(p + 16, m->u.hello_ok.max_msg);
		st32(p + 20, m->u.hello_ok.max_pins);
		st64(p + 24, m->u.hello_ok.max_pinned_bytes);
		st32(p + 32, m->u.hello_ok.max_prefixes);
		st32(p + 36, m->u.hello_ok.max_inflight);
		st32(p + 40, m->u.hello_ok.server_pid);
		break;
	case CKV_CTL_MATCH: {
		size_t tb = 4 * (size_t)m->u.match.ntokens;

		st32(p, m->u.match.layers);
		st32(p + 4, m->u.match.kv_heads);
		st32(p + 8, m->u.match.head_dim);
		st32(p + 12, m->u.match.chunk_tokens);
		st32(p + 16, m->u.match.dtype);
		st16(p + 20, m->u.match.model_len);
		st16(p + 22, m->u.match.salt_len);
		st32(p + 24, m->u.match.ntokens);
		copy(p + 32, m->u.match.tokens, tb);
		copy(p + 32 + tb, m->u.match.model, m->u.match.model_len);
		copy(p + 32 + tb + m->u.match.model_len, m->u.match.salt, m->u.match.salt_len);
		break;
	}
	case CKV_CTL_MATCH_OK:
		memcpy(p, m->u.match_ok.hash, 16);
		st32(p + 16, m->u.match_ok.matched);
		break;
	case CKV_CTL_OPEN:
		memcpy(p, m->u.open.hash, 16);
		break;
	case CKV_CTL_OPEN_OK:
		st32(p, m->u.open_ok.handle);
		st32(p + 4, m->u.open_ok.dtype);
		memcpy(p + 8, m->u.open_ok.hash, 16);
		st32(p + 24, m->u.open_ok.layers);
		st32(p + 28, m->u.open_ok.kv_heads);
		st32(p + 32, m->u.open_ok.head_dim);
		st32(p + 36, m->u.open_ok.chunk_tokens);
		st32(p + 40, m->u.open_ok.tokens);
		st32(p + 44, m->u.open_ok.chunks);
		st64(p + 48, m->u.open_ok.half_bytes);
		st64(p + 56, m->u.open_ok.chunk_bytes);
		st64(p + 64, m->u.open_ok.seed);
		st64(p + 72, (uint64_t)m->u.open_ok.created);
		st16(p + 80, m->u.open_ok.model_len);
		st16(p + 82, m->u.open_ok.salt_len);
		copy(p + 88, m->u.open_ok.model, m->u.open_ok.model_len);
		copy(p + 88 + m->u.open_ok.model_len, m->u.open_ok.salt, m->u.open_ok.salt_len);
		break;
	case CKV_CTL_CLOSE:
		st32(p, m->u.close.handle);
		break;
	case CKV_CTL_GET:
	case CKV_CTL_PREFETCH:
		st32(p, m->u.get.handle);
		st32(p + 4, m->u.get.layer);
		st16(p + 8, m->u.get.part);
		st16(p + 10, m->u.get.flags);
		st32(p + 12, m->u.get.n);
		copy(p + 16, m->u.get.chunks, 4 * (size_t)m->u.get.n);
		break;
	case CKV_CTL_COMPLETE:
		st32(p, m->u.complete.count);
		copy(p + 8, m->u.complete.entries, CKV_CTL_ENTRY * (size_t)m->u.complete.count);
		break;
	case CKV_CTL_RELEASE:
		st32(p, m->u.release.n);
		copy(p + 8, m->u.release.tokens, 8 * (size_t)m->u.release.n);
		break;
	case CKV_CTL_SCORE:
		st32(p, m->u.score.handle);
		st32(p + 4, m->u.score.layer);
		st16(p + 8, m->u.score.parts);
		st16(p + 10, m->u.score.flags);
		st32(p + 12, m->u.score.n);
		copy(p + 16, m->u.score.chunks, 4 * (size_t)m->u.score.n);
		copy(p + 16 + 4 * (size_t)m->u.score.n, m->u.score.scores, 4 * (size_t)m->u.score.n);
		break;
	case CKV_CTL_DIGESTS:
		st_range(p, &m->u.digests);
		break;
	case CKV_CTL_DIGESTS_OK:
		st32(p, m->u.digests_ok.first);
		st32(p + 4, m->u.digests_ok.count);
		st32(p + 8, m->u.digests_ok.per);
		copy(p + 16, m->u.digests_ok.data,
		     4 * (size_t)m->u.digests_ok.count * m->u.digests_ok.per);
		break;
	case CKV_CTL_STATS:
		break;
	case CKV_CTL_KEYQ:
		st_range(p, &m->u.keyq);
		break;
	case CKV_CTL_KEYQ_OK: {
		size_t sp = 4 * (size_t)m->u.keyq_ok.nparts;

		st32(p, m->u.keyq_ok.first);
		st32(p + 4, m->u.keyq_ok.count);
		st16(p + 8, m->u.keyq_ok.bits);
		st16(p + 10, m->u.keyq_ok.nparts);
		st32(p + 12, m->u.keyq_ok.per);
		st32(p + 16, m->u.keyq_ok.hd);
		copy(p + 20, m->u.keyq_ok.starts, sp);
		copy(p + 20 + sp, m->u.keyq_ok.scales, 4 * (size_t)m->u.keyq_ok.hd * m->u.keyq_ok.nparts);
		copy(p + 20 + sp + 4 * (size_t)m->u.keyq_ok.hd * m->u.keyq_ok.nparts, m->u.keyq_ok.codes,
		     (size_t)m->u.keyq_ok.count * m->u.keyq_ok.per);
		break;
	}
	case CKV_CTL_STATS_OK:
		st32(p, m->u.stats_ok.nfields);
		copy(p + 8, m->u.stats_ok.fields, 8 * (size_t)m->u.stats_ok.nfields);
		break;
	case CKV_CTL_ERROR:
		st32(p, (uint32_t)m->u.error.err);
		st16(p + 4, m->u.error.flags);
		st16(p + 6, m->u.error.text_len);
		copy(p + 8, m->u.error.text, m->u.error.text_len);
		break;
	}
	b->len += CKV_CTL_HDR + n;
	return 0;
}
