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
#include "ctl_touch.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


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
		sink = ctl_touch(&m);
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
