/*
 * test_ctl_parse.c — the control-protocol parser (ckvfs/ctl_msg.c) on its
 * own, deterministically, so CI covers what tests/fuzz/fuzz_ctl_msg.c
 * explores:
 *   - one valid message of every type: parsed to its exact size, every
 *     truncation "incomplete", trailing bytes ignored, and re-encoded to the
 *     same bytes;
 *   - a corpus of hostile messages (bad magic, version, type, sizes, counts
 *     whose byte size overflows 32 bits, reserved fields, enums, NUL bytes,
 *     non-finite scores, ...) each rejected with the expected errno and a
 *     message;
 *   - 200000 seeded random mutations of the valid messages: no crash, and
 *     whatever parses re-encodes to its input.
 *
 *   test_ctl_parse                   run the above
 *   test_ctl_parse FILE|DIR ...      also replay files (fuzzer artifacts)
 *   test_ctl_parse --write-corpus DIR   write the messages above as seed files
 *
 * Depends on ckvfs/ctl_msg.c only (tests/fuzz/run.sh builds it with clang).
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckv_ctl_msg.h"
#include "../fuzz/ctl_touch.h"

static int failures;

#define CHECK(cond)                                                                          \
	do {                                                                                 \
		if (!(cond)) {                                                               \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
			failures++;                                                          \
		}                                                                            \
	} while (0)

/* ---- messages ---------------------------------------------------------------- */

struct sample {
	char name[48];
	uint8_t *p;
	size_t len;
	int want; /* > 0: valid; < 0: the errno expected */
};

static struct sample samples[256];
static int nsamples;

static void add(const char *name, const uint8_t *p, size_t len, int want)
{
	struct sample *s = &samples[nsamples++];

	if (nsamples > 256) {
		fprintf(stderr, "too many samples\n");
		exit(1);
	}
	snprintf(s->name, sizeof(s->name), "%s", name);
	s->p = malloc(len ? len : 1);
	if (!s->p)
		exit(1);
	memcpy(s->p, p, len);
	s->len = len;
	s->want = want;
}

static void add_msg(const char *name, ckv_ctl_msg *m)
{
	ckv_ctl_buf b = { 0 };

	if (!m->hdr.version)
		m->hdr.version = 1;
	if (ckv_ctl_encode(&b, m) != 0) {
		fprintf(stderr, "encode %s failed\n", name);
		exit(1);
	}
	add(name, b.p, b.len, 1);
	ckv_ctl_buf_free(&b);
}

/* The last valid sample, copied and changed: a hostile one. */
static uint8_t mbuf[1 << 16];
static size_t mlen;

static void base(const char *valid_name)
{
	for (int i = 0; i < nsamples; i++)
		if (!strcmp(samples[i].name, valid_name)) {
			memcpy(mbuf, samples[i].p, samples[i].len);
			mlen = samples[i].len;
			return;
		}
	fprintf(stderr, "no sample %s\n", valid_name);
	exit(1);
}

static void put16(size_t off, uint16_t v)
{
	v = htole16(v);
	memcpy(mbuf + off, &v, 2);
}

static void put32(size_t off, uint32_t v)
{
	v = htole32(v);
	memcpy(mbuf + off, &v, 4);
}

static void put64(size_t off, uint64_t v)
{
	v = htole64(v);
	memcpy(mbuf + off, &v, 8);
}

/* Set the header's length to the current mlen. */
static void fix_len(void)
{
	put32(8, (uint32_t)(mlen - CKV_CTL_HDR));
}

static void bad(const char *name, int err)
{
	add(name, mbuf, mlen, -err);
}

#define P CKV_CTL_HDR /* payload offset */

static void build_samples(void)
{
	uint16_t versions[3] = { htole16(1), htole16(2), htole16(9) };
	uint32_t tokens[5] = { 1, 2, 3, 4, 5 }, chunks[4] = { 0, 7, 7, 3 };
	float scores[4] = { 0.5f, 1.0f, 0.0f, -2.0f };
	uint64_t toks[3] = { 0x100000001ull, 0x200000002ull, 3 }, fields[CKV_CTL_ST_COUNT];
	float dig[2 * 3];
	uint8_t ents[3 * CKV_CTL_ENTRY];
	ckv_ctl_entry e[3] = {
		{ 0, 0, 4096, 8192, 0x100000000ull },
		{ 2, -5, 0, 0, 0 },
		{ 1, 0, 1ull << 30, 16384, 0xffffffff00000001ull },
	};
	ckv_ctl_msg m;

	for (int i = 0; i < 6; i++)
		dig[i] = (float)i * 0.25f;
	for (int i = 0; i < 3; i++)
		ckv_ctl_entry_store(ents + i * CKV_CTL_ENTRY, &e[i]);
	for (int i = 0; i < CKV_CTL_ST_COUNT; i++)
		fields[i] = (uint64_t)i * 1000;

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_HELLO, .id = 1 } };
	m.u.hello.nversions = 3;
	m.u.hello.versions = versions;
	add_msg("hello", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_HELLO_OK, .id = 1 } };
	m.u.hello_ok.version = 1;
	m.u.hello_ok.flags = CKV_CTL_HELLO_ARENA_FD;
	m.u.hello_ok.arena_size = 1ull << 30;
	m.u.hello_ok.max_msg = 1u << 24;
	m.u.hello_ok.max_pins = 65536;
	m.u.hello_ok.max_pinned_bytes = 1ull << 29;
	m.u.hello_ok.max_prefixes = 256;
	m.u.hello_ok.max_inflight = 256;
	m.u.hello_ok.server_pid = 4242;
	add_msg("hello_ok", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_MATCH, .id = 2 } };
	m.u.match.layers = 28;
	m.u.match.kv_heads = 4;
	m.u.match.head_dim = 128;
	m.u.match.chunk_tokens = 16;
	m.u.match.dtype = 1;
	m.u.match.model = "Qwen/Qwen2.5-7B";
	m.u.match.model_len = 15;
	m.u.match.salt = "s1";
	m.u.match.salt_len = 2;
	m.u.match.ntokens = 5;
	m.u.match.tokens = tokens;
	add_msg("match", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_MATCH_OK, .id = 2 } };
	memset(m.u.match_ok.hash, 0x5a, 16);
	m.u.match_ok.matched = 5;
	add_msg("match_ok", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_OPEN, .id = 3 } };
	memset(m.u.open.hash, 0xa5, 16);
	add_msg("open", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_OPEN_OK, .id = 3 } };
	m.u.open_ok.handle = 0x10000;
	m.u.open_ok.dtype = 4;
	memset(m.u.open_ok.hash, 0x11, 16);
	m.u.open_ok.layers = 4;
	m.u.open_ok.kv_heads = 2;
	m.u.open_ok.head_dim = 64;
	m.u.open_ok.chunk_tokens = 16;
	m.u.open_ok.tokens = 1000;
	m.u.open_ok.chunks = 63;
	m.u.open_ok.half_bytes = 8192;
	m.u.open_ok.chunk_bytes = 16384;
	m.u.open_ok.seed = 0x0123456789abcdefull;
	m.u.open_ok.created = -5;
	m.u.open_ok.model = "test/tiny";
	m.u.open_ok.model_len = 9;
	m.u.open_ok.salt = "";
	add_msg("open_ok", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_CLOSE, .id = 4 } };
	m.u.close.handle = 0x10000;
	add_msg("close", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_GET, .id = 5 } };
	m.u.get.handle = 0x10000;
	m.u.get.layer = 3;
	m.u.get.part = CKV_CTL_PART_V;
	m.u.get.n = 4;
	m.u.get.chunks = chunks;
	add_msg("get", &m);
	m.hdr.type = CKV_CTL_PREFETCH;
	m.u.get.part = CKV_CTL_PART_K;
	add_msg("prefetch", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_COMPLETE, .id = 5 } };
	m.u.complete.count = 3;
	m.u.complete.entries = ents;
	add_msg("complete", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_RELEASE, .id = 6 } };
	m.u.release.n = 3;
	m.u.release.tokens = toks;
	add_msg("release", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_SCORE, .id = 7 } };
	m.u.score.handle = 0x10000;
	m.u.score.layer = 1;
	m.u.score.parts = 7;
	m.u.score.n = 4;
	m.u.score.chunks = chunks;
	m.u.score.scores = scores;
	add_msg("score", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_DIGESTS, .id = 8 } };
	m.u.digests.handle = 0x10000;
	m.u.digests.layer = 2;
	m.u.digests.first = 10;
	m.u.digests.count = 2;
	add_msg("digests", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_DIGESTS_OK, .id = 8 } };
	m.u.digests_ok.first = 10;
	m.u.digests_ok.count = 2;
	m.u.digests_ok.per = 3;
	m.u.digests_ok.data = dig;
	add_msg("digests_ok", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_KEYQ, .id = 9, .version = 2 } };
	m.u.keyq.handle = 0x10000;
	m.u.keyq.layer = 1;
	m.u.keyq.first = 4;
	m.u.keyq.count = 3;
	add_msg("keyq", &m);

	{
		/* 3 chunks in 2 parts (chunks 4 | 5, 6), hd 2, 3 bytes of codes a chunk */
		static const uint32_t starts[2] = { 4, 5 };
		static const uint16_t scales[8] = { 0x3f80, 0x4000, 0x3f80, 0x3f80, 0, 0, 0x3f80, 0x3f80 };
		static const uint8_t codes[9] = { 0xab, 0xce, 0x1d, 1, 2, 3, 4, 5, 6 };

		m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_KEYQ_OK, .id = 9, .version = 2 } };
		m.u.keyq_ok.first = 4;
		m.u.keyq_ok.count = 3;
		m.u.keyq_ok.bits = 3;
		m.u.keyq_ok.nparts = 2;
		m.u.keyq_ok.per = 3;
		m.u.keyq_ok.hd = 2;
		m.u.keyq_ok.starts = starts;
		m.u.keyq_ok.scales = scales;
		m.u.keyq_ok.codes = codes;
		add_msg("keyq_ok", &m);
	}

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_STATS, .id = 9 } };
	add_msg("stats", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_STATS_OK, .id = 9 } };
	m.u.stats_ok.nfields = CKV_CTL_ST_COUNT;
	m.u.stats_ok.fields = fields;
	add_msg("stats_ok", &m);

	m = (ckv_ctl_msg){ .hdr = { .type = CKV_CTL_ERROR, .id = 10 } };
	m.u.error.err = EBADF;
	m.u.error.flags = CKV_CTL_ERR_FATAL;
	m.u.error.text = "GET: handle 0xdead is not open";
	m.u.error.text_len = (uint16_t)strlen(m.u.error.text);
	add_msg("error", &m);
}

static void build_hostile(void)
{
	/* header */
	base("stats"); put32(0, 0x43564b44u); bad("magic off by one", EPROTO);
	base("stats"); memcpy(mbuf, "GET ", 4); bad("text protocol", EPROTO);
	base("stats"); put16(4, 0); bad("version 0", EPROTONOSUPPORT);
	base("stats"); put16(4, 3); bad("version 3", EPROTONOSUPPORT);
	base("stats"); put16(4, 0xffff); bad("version 65535", EPROTONOSUPPORT);
	base("stats"); put16(6, 0); bad("type 0", EBADMSG);
	base("stats"); put16(6, 0x0077); bad("type 0x0077", EBADMSG);
	base("stats"); put16(6, 0x8004); bad("type 0x8004 (no CLOSE_OK)", EBADMSG);
	base("stats"); put16(6, 0xffff); bad("type 0xffff", EBADMSG);
	base("stats"); put32(8, CKV_CTL_MAX_PAYLOAD + 1); bad("length 16 MiB + 1", EMSGSIZE);
	base("stats"); put32(8, 0xffffffffu); bad("length 4 GiB - 1", EMSGSIZE);

	/* KEYQ, KEYQ_OK */
	base("keyq"); put32(P + 12, 0); bad("KEYQ count 0", EINVAL);
	base("keyq"); put32(P + 8, 0xffffffffu); bad("KEYQ first + count overflows", EINVAL);
	base("keyq"); mlen = P + 12; fix_len(); bad("KEYQ short", EBADMSG);
	base("keyq_ok"); put16(P + 8, 0); bad("KEYQ_OK bits 0", EINVAL);
	base("keyq_ok"); put16(P + 8, 5); bad("KEYQ_OK bits 5", EINVAL);
	base("keyq_ok"); put16(P + 10, 0); bad("KEYQ_OK nparts 0", EINVAL);
	base("keyq_ok"); put16(P + 10, 4); bad("KEYQ_OK nparts past count", EINVAL);
	base("keyq_ok"); put32(P + 16, 0); bad("KEYQ_OK hd 0", EINVAL);
	base("keyq_ok"); put32(P + 12, 0); bad("KEYQ_OK per 0", EINVAL);
	base("keyq_ok"); put32(P + 20, 5); bad("KEYQ_OK first part not at first", EINVAL);
	base("keyq_ok"); put32(P + 24, 4); bad("KEYQ_OK parts not rising", EINVAL);
	base("keyq_ok"); put32(P + 24, 7); bad("KEYQ_OK part past the range", EINVAL);
	base("keyq_ok"); put32(P + 12, 4); bad("KEYQ_OK codes past the payload", EBADMSG);
	base("keyq_ok"); mlen -= 1; fix_len(); bad("KEYQ_OK codes short", EBADMSG);

	/* HELLO */
	base("hello"); put16(P, 0); mlen = P + 8; fix_len(); bad("HELLO nversions 0", EINVAL);
	base("hello"); put16(P, 17); bad("HELLO nversions 17", EINVAL);
	base("hello"); put16(P, 4); bad("HELLO nversions past the payload", EBADMSG);
	base("hello"); put16(P + 2, 1); bad("HELLO reserved", EINVAL);
	base("hello"); put32(P + 4, 1); bad("HELLO flags", EINVAL);
	base("hello"); put16(P + 8, 0); bad("HELLO version 0 listed", EINVAL);
	base("hello"); mlen = P + 4; fix_len(); bad("HELLO 4-byte payload", EBADMSG);
	base("hello"); mbuf[mlen++] = 0; fix_len(); bad("HELLO trailing byte", EBADMSG);

	/* HELLO_OK */
	base("hello_ok"); put32(P + 16, CKV_CTL_MIN_MSG - 1); bad("HELLO_OK max_msg < 64 KiB", EINVAL);
	base("hello_ok"); put32(P + 16, CKV_CTL_MAX_PAYLOAD + 1); bad("HELLO_OK max_msg > 16 MiB", EINVAL);
	base("hello_ok"); put32(P + 4, 3); bad("HELLO_OK flag bit 1", EINVAL);
	base("hello_ok"); put16(P, 0); bad("HELLO_OK version 0", EINVAL);
	base("hello_ok"); put32(P + 44, 9); bad("HELLO_OK reserved", EINVAL);

	/* MATCH: payload 32 + 20 tokens + 15 + 2 */
	base("match"); put32(P + 16, 0); bad("MATCH dtype 0", EINVAL);
	base("match"); put32(P + 16, 5); bad("MATCH dtype 5", EINVAL);
	base("match"); put16(P + 20, 0); bad("MATCH model_len 0", EINVAL);
	base("match"); put16(P + 20, 256); bad("MATCH model_len 256", EINVAL);
	base("match"); put16(P + 22, 64); bad("MATCH salt_len 64", EINVAL);
	base("match"); put16(P + 22, 3); bad("MATCH salt_len past the payload", EBADMSG);
	base("match"); put32(P + 24, CKV_CTL_MAX_TOKENS + 1); bad("MATCH ntokens 2^26 + 1", EINVAL);
	base("match"); put32(P + 24, 6); bad("MATCH ntokens past the payload", EBADMSG);
	base("match"); put32(P + 24, 0x40000000u); bad("MATCH ntokens 2^30 (4n wraps)", EINVAL);
	base("match"); put32(P + 28, 1); bad("MATCH reserved", EINVAL);
	base("match"); mbuf[P + 32 + 20 + 3] = 0; bad("MATCH NUL in model", EINVAL);
	base("match"); mbuf[mlen - 1] = 0; bad("MATCH NUL in salt", EINVAL);
	base("match"); mlen = P + 31; fix_len(); bad("MATCH short fixed part", EBADMSG);

	/* MATCH_OK, OPEN, OPEN_OK, CLOSE */
	base("match_ok"); put32(P + 20, 1); bad("MATCH_OK reserved", EINVAL);
	base("match_ok"); mlen--; fix_len(); bad("MATCH_OK 23 bytes", EBADMSG);
	base("open"); mlen--; fix_len(); bad("OPEN 15 bytes", EBADMSG);
	base("open"); mbuf[mlen++] = 1; fix_len(); bad("OPEN 17 bytes", EBADMSG);
	base("open_ok"); put32(P, 0); bad("OPEN_OK handle 0", EINVAL);
	base("open_ok"); put16(P + 80, 0xffff); bad("OPEN_OK model_len 65535", EINVAL);
	base("open_ok"); put16(P + 82, 1); bad("OPEN_OK salt past the payload", EBADMSG);
	base("open_ok"); put32(P + 4, 9); bad("OPEN_OK dtype 9", EINVAL);
	base("close"); put32(P + 4, 1); bad("CLOSE reserved", EINVAL);

	/* GET / PREFETCH: payload 16 + 16 */
	base("get"); put16(P + 8, 3); bad("GET part 3", EINVAL);
	base("get"); put16(P + 10, 1); bad("GET flags", EINVAL);
	base("get"); put32(P + 12, 0); mlen = P + 16; fix_len(); bad("GET n 0", EINVAL);
	base("get"); put32(P + 12, 5); bad("GET n past the payload", EBADMSG);
	base("get"); put32(P + 12, 3); bad("GET trailing chunk", EBADMSG);
	base("get"); put32(P + 12, 0x40000001u); mlen = P + 20; fix_len();
	bad("GET n 0x40000001 (16+4n wraps to 20)", EBADMSG);
	base("get"); put32(P + 12, 0xffffffffu); bad("GET n 0xffffffff", EBADMSG);
	base("get"); mlen = P + 8; fix_len(); bad("GET short fixed part", EBADMSG);
	base("prefetch"); put16(P + 8, 0xffff); bad("PREFETCH part 65535", EINVAL);

	/* COMPLETE: payload 8 + 3 * 32 */
	base("complete"); put32(P, 0); mlen = P + 8; fix_len(); bad("COMPLETE count 0", EINVAL);
	base("complete"); put32(P, 4); bad("COMPLETE count past the payload", EBADMSG);
	base("complete"); put32(P, 0x08000001u); mlen = P + 8 + 32; fix_len();
	bad("COMPLETE count 0x08000001 (32n wraps)", EBADMSG);
	base("complete"); put32(P + 4, 1); bad("COMPLETE reserved", EINVAL);
	base("complete"); put32(P + 8 + 4, 5); bad("COMPLETE rc > 0", EINVAL);
	base("complete"); put32(P + 8 + 4, (uint32_t)-4096); bad("COMPLETE rc -4096", EINVAL);
	base("complete"); put64(P + 8 + 24, 0); bad("COMPLETE rc 0, token 0", EINVAL);
	base("complete"); put64(P + 8 + 16, 0); bad("COMPLETE rc 0, length 0", EINVAL);
	base("complete"); put64(P + 8 + 8, UINT64_MAX - 100); bad("COMPLETE offset + length wraps", EINVAL);
	base("complete"); put64(P + 40 + 24, 9); bad("COMPLETE rc < 0 with a token", EINVAL);

	/* RELEASE: payload 8 + 24 */
	base("release"); put32(P, 0); mlen = P + 8; fix_len(); bad("RELEASE n 0", EINVAL);
	base("release"); put32(P, 0x20000001u); mlen = P + 16; fix_len();
	bad("RELEASE n 0x20000001 (8+8n wraps to 16)", EBADMSG);
	base("release"); put32(P + 4, 1); bad("RELEASE reserved", EINVAL);
	base("release"); mlen -= 4; fix_len(); bad("RELEASE half a token", EBADMSG);

	/* SCORE: payload 16 + 16 + 16 */
	base("score"); put16(P + 8, 0); bad("SCORE parts 0", EINVAL);
	base("score"); put16(P + 8, 8); bad("SCORE parts 8", EINVAL);
	base("score"); put16(P + 10, 2); bad("SCORE flags", EINVAL);
	base("score"); put32(P + 12, 3); bad("SCORE n 3 of 4", EBADMSG);
	base("score"); put32(P + 12, 0x20000001u); bad("SCORE n 0x20000001 (16+8n wraps)", EBADMSG);
	base("score"); put32(P + 16 + 16 + 4, 0x7fc00000u); bad("SCORE NaN", EINVAL);
	base("score"); put32(P + 16 + 16 + 8, 0x7f800000u); bad("SCORE +inf", EINVAL);
	base("score"); put32(P + 16 + 16 + 12, 0xff800000u); bad("SCORE -inf", EINVAL);

	/* DIGESTS, DIGESTS_OK */
	base("digests"); put32(P + 12, 0); bad("DIGESTS count 0", EINVAL);
	base("digests"); put32(P + 8, 0xfffffff0u); put32(P + 12, 0x20); bad("DIGESTS first + count wraps", EINVAL);
	base("digests"); mlen++; fix_len(); bad("DIGESTS 17 bytes", EBADMSG);
	base("digests_ok"); put32(P + 8, 0); bad("DIGESTS_OK per 0", EINVAL);
	base("digests_ok"); put32(P + 8, CKV_CTL_MAX_PER + 1); bad("DIGESTS_OK per too big", EINVAL);
	base("digests_ok"); put32(P + 4, 0xffffffffu); put32(P + 8, CKV_CTL_MAX_PER);
	bad("DIGESTS_OK count x per huge", EBADMSG);
	base("digests_ok"); put32(P + 4, 0x40000000u); put32(P + 8, 4); mlen = P + 16; fix_len();
	bad("DIGESTS_OK 4*count*per wraps to 0", EBADMSG);
	base("digests_ok"); put32(P + 12, 1); bad("DIGESTS_OK reserved", EINVAL);

	/* STATS, STATS_OK */
	base("stats"); mbuf[mlen++] = 0; fix_len(); bad("STATS with a payload", EBADMSG);
	base("stats_ok"); put32(P, CKV_CTL_MAX_STATS + 1); bad("STATS_OK 257 fields", EINVAL);
	base("stats_ok"); put32(P, 1); bad("STATS_OK nfields 1, 25 sent", EBADMSG);
	base("stats_ok"); put32(P + 4, 1); bad("STATS_OK reserved", EINVAL);

	/* ERROR */
	base("error"); put32(P, 0); bad("ERROR err 0", EINVAL);
	base("error"); put32(P, 4096); bad("ERROR err 4096", EINVAL);
	base("error"); put32(P, (uint32_t)-5); bad("ERROR err -5", EINVAL);
	base("error"); put16(P + 4, 2); bad("ERROR flag bit 1", EINVAL);
	base("error"); put16(P + 6, CKV_CTL_MAX_TEXT + 1); bad("ERROR text_len 1025", EINVAL);
	base("error"); put16(P + 6, 200); bad("ERROR text past the payload", EBADMSG);
	base("error"); mbuf[P + 10] = 0; bad("ERROR NUL in text", EINVAL);
}

/* ---- checks ------------------------------------------------------------------- */


/* Parse buf; if valid, it must re-encode to the same bytes. Returns parse's result. */
static int parse_check(const uint8_t *buf, size_t len, char *err, size_t errlen)
{
	ckv_ctl_msg m;
	int n = ckv_ctl_parse(buf, len, &m, err, errlen);

	if (n > 0) {
		ckv_ctl_buf b = { 0 };
		volatile uint64_t sink = ctl_touch(&m);

		(void)sink;
		CHECK((size_t)n <= len && (size_t)n == CKV_CTL_HDR + m.hdr.length);
		CHECK(ckv_ctl_encode(&b, &m) == 0);
		CHECK(b.len == (size_t)n && memcmp(b.p, buf, b.len) == 0);
		ckv_ctl_buf_free(&b);
	} else if (n < 0) {
		CHECK(err[0] != 0);
	}
	return n;
}

/* Parse successive messages of a buffer (a fuzzer artifact or any file). */
static void replay(const uint8_t *buf, size_t len)
{
	size_t off = 0;

	while (off < len) {
		char err[256];
		int n = parse_check(buf + off, len - off, err, sizeof(err));

		if (n <= 0)
			break;
		off += (size_t)n;
	}
}

static uint64_t rs = 0xc0ffee;
static uint64_t rnd(void)
{
	rs ^= rs << 13;
	rs ^= rs >> 7;
	rs ^= rs << 17;
	return rs;
}

static void mutate_all(int rounds)
{
	static uint8_t buf[1 << 16];
	static const uint32_t interesting[] = { 0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x10000,
						0x7fffffff, 0x80000000u, 0xffffffffu, 0x40000001u,
						0x20000001u, 0x08000001u, CKV_CTL_MAX_PAYLOAD,
						CKV_CTL_MAX_TOKENS + 1 };
	int valid = 0, incomplete = 0, rejected = 0;

	for (int r = 0; r < rounds; r++) {
		struct sample *s = &samples[rnd() % (uint64_t)nsamples];
		size_t len = s->len;
		int k = 1 + (int)(rnd() % 4);
		char err[256];
		int n;

		memcpy(buf, s->p, len);
		for (int j = 0; j < k; j++) {
			switch (rnd() % 6) {
			case 0: /* flip a bit */
				if (len)
					buf[rnd() % len] ^= (uint8_t)(1u << (rnd() % 8));
				break;
			case 1: /* set a byte */
				if (len)
					buf[rnd() % len] = (uint8_t)rnd();
				break;
			case 2: /* truncate */
				len = len ? (size_t)(rnd() % len) : 0;
				break;
			case 3: /* append */
				for (int t = (int)(rnd() % 16); t > 0 && len < sizeof(buf); t--)
					buf[len++] = (uint8_t)rnd();
				break;
			case 4: /* an interesting u32 at a 4-aligned offset */
				if (len >= 4) {
					uint32_t v = htole32(interesting[rnd() % (sizeof(interesting) / 4)]);

					memcpy(buf + (rnd() % (len / 4)) * 4, &v, 4);
				}
				break;
			case 5: /* keep the header's length consistent with the bytes */
				if (len >= CKV_CTL_HDR) {
					uint32_t v = htole32((uint32_t)(len - CKV_CTL_HDR));

					memcpy(buf + 8, &v, 4);
				}
				break;
			}
		}
		n = parse_check(buf, len, err, sizeof(err));
		valid += n > 0;
		incomplete += n == 0;
		rejected += n < 0;
	}
	printf("mutations: %d: %d valid (re-encoded identically), %d incomplete, %d rejected\n",
	       rounds, valid, incomplete, rejected);
}

static int replay_path(const char *path)
{
	struct stat st;

	if (stat(path, &st) < 0) {
		perror(path);
		return -1;
	}
	if (S_ISDIR(st.st_mode)) {
		DIR *d = opendir(path);
		struct dirent *de;
		int count = 0;

		if (!d)
			return -1;
		while ((de = readdir(d))) {
			char p[4096];

			if (de->d_name[0] == '.')
				continue;
			snprintf(p, sizeof(p), "%s/%s", path, de->d_name);
			if (replay_path(p) == 0)
				count++;
		}
		closedir(d);
		printf("replayed %d files of %s\n", count, path);
		return 0;
	}
	{
		FILE *f = fopen(path, "rb");
		uint8_t *buf = malloc((size_t)st.st_size + 1);
		size_t got;

		if (!f || !buf) {
			if (f)
				fclose(f);
			free(buf);
			return -1;
		}
		got = fread(buf, 1, (size_t)st.st_size, f);
		fclose(f);
		replay(buf, got);
		free(buf);
	}
	return 0;
}

static int write_corpus(const char *dir)
{
	mkdir(dir, 0755);
	for (int i = 0; i < nsamples; i++) {
		char p[4096];
		FILE *f;

		snprintf(p, sizeof(p), "%s/seed-%03d", dir, i);
		f = fopen(p, "wb");
		if (!f || fwrite(samples[i].p, 1, samples[i].len, f) != samples[i].len) {
			perror(p);
			if (f)
				fclose(f);
			return 1;
		}
		fclose(f);
	}
	printf("wrote %d seed messages to %s\n", nsamples, dir);
	return 0;
}

int main(int argc, char **argv)
{
	int nvalid = 0, nbad = 0;

	build_samples();
	nvalid = nsamples;
	build_hostile();
	nbad = nsamples - nvalid;
	if (argc == 3 && !strcmp(argv[1], "--write-corpus"))
		return write_corpus(argv[2]);

	/* valid messages: exact size, every prefix incomplete, trailing bytes ignored */
	for (int i = 0; i < nvalid; i++) {
		struct sample *s = &samples[i];
		uint8_t *more = malloc(s->len + 7);
		char err[256];

		CHECK(parse_check(s->p, s->len, err, sizeof(err)) == (int)s->len);
		for (size_t cut = 0; cut < s->len; cut++)
			CHECK(ckv_ctl_parse(s->p, cut, &(ckv_ctl_msg){ 0 }, err, sizeof(err)) == 0);
		memcpy(more, s->p, s->len);
		memset(more + s->len, 0xee, 7);
		CHECK(ckv_ctl_parse(more, s->len + 7, &(ckv_ctl_msg){ 0 }, err, sizeof(err)) == (int)s->len);
		free(more);
	}
	printf("valid: %d message types parse, truncate and re-encode exactly\n", nvalid);

	/* hostile corpus */
	for (int i = nvalid; i < nsamples; i++) {
		struct sample *s = &samples[i];
		char err[256] = "";
		int n = parse_check(s->p, s->len, err, sizeof(err));

		if (n != s->want) {
			fprintf(stderr, "hostile \"%s\": got %d (%s), expected %d (%s)\n", s->name, n,
				err, s->want, strerror(-s->want));
			failures++;
		} else if (!err[0]) {
			fprintf(stderr, "hostile \"%s\": no message\n", s->name);
			failures++;
		}
	}
	printf("hostile: %d messages rejected with the expected errno and a message\n", nbad);

	mutate_all(200000);

	for (int i = 1; i < argc; i++)
		if (replay_path(argv[i]) < 0)
			failures++;

	for (int i = 0; i < nsamples; i++)
		free(samples[i].p);
	if (failures) {
		fprintf(stderr, "%d failures\n", failures);
		return 1;
	}
	printf("ok\n");
	return 0;
}
