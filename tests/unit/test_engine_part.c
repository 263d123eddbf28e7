/*
 * test_engine_part.c — reading one part of each chunk (the K or V half of
 * KV-HCD chunks): bytes, per-part checksums, no merging across gaps, and
 * a flipped byte in one half failing only that half.
 */
#include "test_engine_util.h"

int main(void)
{
	struct tdir d;
	struct tfile t;
	struct tlog log = { 0 };
	ckv_engine *e;
	ckv_efile *fk = NULL, *fv = NULL;
	const uint64_t cb = 16384, half = 8192;
	const uint32_t n = 32;
	uint64_t sk[32], sv[32];
	ckv_engine_stats st;

	tdir_open(&d);
	tfile_make(&d, &t, "layer_000.kv", cb, n, 42);
	for (uint32_t c = 0; c < n; c++) {
		sk[c] = XXH3_64bits(t.data + c * cb, half);
		sv[c] = XXH3_64bits(t.data + c * cb + half, half);
	}
	e = t_engine(8 << 20, CKV_POLICY_ATTN, &log);
	CHECK_RC(ckv_engine_file_get_part(e, d.fd, t.name, "seg/x/k", half, cb, 0, n, sk, &fk));
	CHECK_RC(ckv_engine_file_get_part(e, d.fd, t.name, "seg/x/v", half, cb, half, n, sv, &fv));
	CHECK(ckv_engine_file_get_part(e, d.fd, t.name, "seg/x/bad", half, half - 1, 0, n, sk, &fk) == -EINVAL);

	/* all K halves of 8 adjacent chunks, then the V halves of 3 of them */
	{
		ckv_chunk_ref refs[8];
		ckv_slot *slots[8];
		int rcs[8];
		for (uint32_t i = 0; i < 8; i++)
			refs[i] = (ckv_chunk_ref){ fk, 4 + i };
		CHECK_RC(ckv_engine_get(e, refs, 8, CKV_GET_DEMAND, slots, rcs));
		for (uint32_t i = 0; i < 8; i++) {
			CHECK(ckv_slot_len(slots[i]) == half);
			CHECK(memcmp(ckv_slot_data(slots[i]), t.data + (4 + i) * cb, half) == 0);
			ckv_engine_release(e, slots[i]);
		}
		ckv_engine_get_stats(e, &st);
		CHECK(st.disk_reads == 8);             /* gaps between K halves: no merge */
		CHECK(st.bytes_from_disk == 8 * half); /* only the K halves came from disk */
		for (uint32_t i = 0; i < 3; i++)
			refs[i] = (ckv_chunk_ref){ fv, 5 + 2 * i };
		CHECK_RC(ckv_engine_get(e, refs, 3, CKV_GET_DEMAND, slots, rcs));
		for (uint32_t i = 0; i < 3; i++) {
			CHECK(memcmp(ckv_slot_data(slots[i]), t.data + (5 + 2 * i) * cb + half, half) == 0);
			ckv_engine_release(e, slots[i]);
		}
	}

	/* flip a byte in the V half of chunk 20: V fails, K is fine */
	{
		int fd = openat(d.fd, t.name, O_WRONLY | O_CLOEXEC);
		unsigned char b = t.data[20 * cb + half + 100] ^ 0xff;
		ckv_chunk_ref rk = { fk, 20 }, rv = { fv, 20 };
		ckv_slot *s = NULL;
		int rc = 0;
		CHECK(fd >= 0);
		CHECK(pwrite(fd, &b, 1, 20 * cb + half + 100) == 1);
		CHECK(fsync(fd) == 0);
		close(fd);
		CHECK(ckv_engine_get(e, &rv, 1, CKV_GET_DEMAND, &s, &rc) == -EIO && !s && rc == -EIO);
		CHECK_RC(ckv_engine_get(e, &rk, 1, CKV_GET_DEMAND, &s, &rc));
		CHECK(s && memcmp(ckv_slot_data(s), t.data + 20 * cb, half) == 0);
		ckv_engine_release(e, s);
		ckv_engine_get_stats(e, &st);
		CHECK(st.checksum_failures == 1);
	}
	ckv_engine_file_put(e, fk);
	ckv_engine_file_put(e, fv);
	ckv_engine_close(e);
	tfile_free(&t);
	tdir_close(&d);
	printf("test_engine_part: ok\n");
	return 0;
}
