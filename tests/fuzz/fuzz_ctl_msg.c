/*
 * fuzz_ctl_msg.c — libFuzzer target over the control-protocol parser
 * (ckv_ctl_parse, ckvfs/ctl_msg.c). Built and run by tests/fuzz/run.sh:
 *
 *   clang -fsanitize=fuzzer,address,undefined -Ickvfs \
 *         tests/fuzz/fuzz_ctl_msg.c ckvfs/ctl_msg.c
 *
 * The input is a byte stream as a server (or client) reads it: messages are
 * parsed one after another. Properties checked, besides "no crash, no
 * out-of-bounds read" (ASan) and "no undefined behaviour" (UBSan):
 *   - a message that parses is exactly header + length bytes, within the input;
 *   - every array it points at lies inside the input (each element is read);
 *   - it re-encodes (ckv_ctl_encode) to exactly its input bytes;
 *   - a rejection comes with a message;
 *   - every strict prefix of a parsed message is "incomplete" (0), checked
 *     for a few cut points.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ckv_ctl_msg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t touch(const ckv_ctl_msg *m)
{
	uint64_t acc = 0;

	switch (m->hdr.type) {
	case CKV_CTL_HELLO:
		for (uint32_t i = 0; i < m->u.hello.nversions; i++)
			acc += ckv_ctl_u16(m->u.hello.versions, i);
		break;
	case CKV_CTL_MATCH:
		for (uint32_t i = 0; i < m->u.match.ntokens; i++)
			acc += ckv_ctl_u32(m->u.match.tokens, i);
		for (uint32_t i = 0; i < m->u.match.model_len; i++)
			acc += (uint8_t)m->u.match.model[i];
		for (uint32_t i = 0; i < m->u.match.salt_len; i++)
			acc += (uint8_t)m->u.match.salt[i];
		break;
	case CKV_CTL_OPEN_OK:
		for (uint32_t i = 0; i < m->u.open_ok.model_len; i++)
			acc += (uint8_t)m->u.open_ok.model[i];
		for (uint32_t i = 0; i < m->u.open_ok.salt_len; i++)
			acc += (uint8_t)m->u.open_ok.salt[i];
		break;
	case CKV_CTL_GET:
	case CKV_CTL_PREFETCH:
		for (uint32_t i = 0; i < m->u.get.n; i++)
			acc += ckv_ctl_u32(m->u.get.chunks, i);
		break;
	case CKV_CTL_COMPLETE:
		for (uint32_t i = 0; i < m->u.complete.count; i++) {
			ckv_ctl_entry e;

			ckv_ctl_entry_load(m->u.complete.entries, i, &e);
			acc += e.index + e.offset + e.length + e.token + (uint32_t)e.rc;
		}
		break;
	case CKV_CTL_RELEASE:
		for (uint32_t i = 0; i < m->u.release.n; i++)
			acc += ckv_ctl_u64(m->u.release.tokens, i);
		break;
	case CKV_CTL_SCORE:
		for (uint32_t i = 0; i < m->u.score.n; i++)
			acc += ckv_ctl_u32(m->u.score.chunks, i) + ckv_ctl_u32(m->u.score.scores, i);
		break;
	case CKV_CTL_DIGESTS_OK:
		for (uint64_t i = 0; i < (uint64_t)m->u.digests_ok.count * m->u.digests_ok.per; i++)
			acc += ckv_ctl_u32(m->u.digests_ok.data, (size_t)i);
		break;
	case CKV_CTL_STATS_OK:
		for (uint32_t i = 0; i < m->u.stats_ok.nfields; i++)
			acc += ckv_ctl_u64(m->u.stats_ok.fields, i);
		break;
	case CKV_CTL_ERROR:
		for (uint32_t i = 0; i < m->u.error.text_len; i++)
			acc += (uint8_t)m->u.error.text[i];
		break;
	}
	return acc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t off = 0;

	while (off < size) {
		const uint8_t *p = data + off;
		size_t left = size - off;
		ckv_ctl_msg m, m2;
		ckv_ctl_buf b = { 0 };
		char err[256];
		volatile uint64_t sink;
		int n = ckv_ctl_parse(p, left, &m, err, sizeof(err));

		if (n < 0) {
			if (!err[0])
				abort(); /* a rejection must say why */
			return 0;
		}
		if (n == 0)
			return 0;
		if ((size_t)n > left || (size_t)n != CKV_CTL_HDR + m.hdr.length)
			abort();
		sink = touch(&m);
		(void)sink;
		if (ckv_ctl_encode(&b, &m) != 0 || b.len != (size_t)n || memcmp(b.p, p, b.len) != 0)
			abort();
		ckv_ctl_buf_free(&b);
		/* strict prefixes are incomplete */
		if (ckv_ctl_parse(p, (size_t)n - 1, &m2, err, sizeof(err)) != 0 ||
		    ckv_ctl_parse(p, CKV_CTL_HDR - 1, &m2, err, sizeof(err)) != 0 ||
		    (n > (int)CKV_CTL_HDR && ckv_ctl_parse(p, CKV_CTL_HDR, &m2, err, sizeof(err)) != 0))
			abort();
		off += (size_t)n;
	}
	return 0;
}
