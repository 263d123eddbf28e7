/*
 * test_pview.c — prefix views: chunks of a prefix that spans several
 * segments (a parent and its extension) read through the engine as whole
 * chunks and as K / V halves, equal to the published bytes; sums and
 * digests line up with the prefix's chunk numbering.
 */
#include "ckv_pview.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

static ckv_geom geom;

static void chunk_bytes_of(uint32_t layer, uint32_t j, uint8_t *out)
{
	uint16_t *w = (uint16_t *)out;
	memset(out, 0, geom.chunk_bytes);
	for (size_t i = 0; i < 2 * geom.half_bytes / 2; i++)
		w[i] = (uint16_t)(0x3c00 | ((layer * 131 + j * 7 + i) & 0x3ff)); /* finite bf16 */
}

static int fill(void *arg, uint32_t layer, uint32_t first, uint32_t count, void *buf)
{
	(void)arg;
	for (uint32_t i = 0; i < count; i++)
		chunk_bytes_of(layer, first + i, (uint8_t *)buf + (size_t)i * geom.chunk_bytes);
	return 0;
}

int main(void)
{
	char dir[] = "/tmp/ckv-test-pview-XXXXXX", cmd[128];
	ckv_store *s;
	ckv_engine *eng;
	ckv_engine_opts eo = { .arena_bytes = 16 << 20 };
	ckv_err e;
	ckv_import_result r;
	ckv_pview *v;
	uint32_t tokens[700];
	uint8_t *want;

	CHECK(mkdtemp(dir));
	CHECK(ckv_geom_preset(&geom, "qwen2.5-0.5b") == 0);
	for (uint32_t i = 0; i < 700; i++)
		tokens[i] = i * 31 + 5;
	CHECK(ckv_store_init(dir, &e) == 0 && ckv_store_open(dir, &s, &e) == 0);
	CHECK(ckv_store_publish(s, &geom, tokens, 400, fill, NULL, NULL, &r, &e) == 0);
	CHECK(ckv_store_publish(s, &geom, tokens, 700, fill, NULL, NULL, &r, &e) == 0);
	CHECK(r.shared_chunks == 25);
	CHECK(ckv_engine_open(&eo, &eng) == 0);
	CHECK(ckv_pview_open(s, eng, &r.hash, &v, &e) == 0);
	CHECK(ckv_pview_manifest(v)->nextents == 2 && ckv_pview_manifest(v)->chunks == 44);
	CHECK(ckv_pview_extent(v, 24) == 0 && ckv_pview_extent(v, 25) == 1 && ckv_pview_extent_start(v, 1) == 25);

	want = malloc(geom.chunk_bytes);
	for (int part = CKV_PV_KV; part <= CKV_PV_V; part++) {
		ckv_efile *files[2];
		uint32_t layer = (uint32_t)part * 7 + 3;
		uint64_t len = part == CKV_PV_KV ? geom.chunk_bytes : geom.half_bytes;
		uint64_t off = part == CKV_PV_V ? geom.half_bytes : 0;
		CHECK(ckv_pview_files_get(v, layer, (enum ckv_pview_part)part, files) == 0);
		for (uint32_t j = 0; j < 44; j += 3) {
			ckv_chunk_ref ref = ckv_pview_ref(v, files, j);
			ckv_slot *slot;
			int rc;
			CHECK(ckv_engine_get(eng, &ref, 1, CKV_GET_DEMAND, &slot, &rc) == 0);
			chunk_bytes_of(layer, j, want);
			CHECK(ckv_slot_len(slot) == len);
			CHECK(memcmp(ckv_slot_data(slot), want + off, len) == 0);
			ckv_engine_release(eng, slot);
		}
		ckv_pview_files_put(v, files);
	}
	{
		uint64_t sums[44];
		float *dig = malloc(sizeof(float) * 44 * geom.kv_heads * geom.head_dim), ref[128];
		CHECK(ckv_pview_sums(v, 5, sums) == 0);
		CHECK(ckv_pview_digests(v, 5, dig) == 0);
		for (uint32_t j = 0; j < 44; j++) {
			uint32_t valid = j == 43 ? 700 - 43 * 16 : 16;
			chunk_bytes_of(5, j, want);
			CHECK(sums[j] == ckv_chunk_sum(want, geom.chunk_bytes));
			ckv_chunk_digest(&geom, want, valid, ref);
			for (uint32_t k = 0; k < geom.kv_heads * geom.head_dim; k++)
				CHECK(fabsf(ref[k] - dig[(size_t)j * geom.kv_heads * geom.head_dim + k]) < 1e-5f);
		}
		/* ranges: inside either extent, across the boundary at 25, the whole layer */
		{
			const uint32_t rg[][2] = { { 0, 1 }, { 3, 10 }, { 24, 1 }, { 25, 1 }, { 20, 10 },
						   { 30, 14 }, { 43, 1 }, { 0, 44 } };
			size_t per = (size_t)geom.kv_heads * geom.head_dim;
			float *part = malloc(sizeof(float) * 44 * per);

			CHECK(part);
			for (size_t i = 0; i < sizeof(rg) / sizeof(rg[0]); i++) {
				memset(part, 0xff, sizeof(float) * 44 * per);
				CHECK(ckv_pview_digests_range(v, 5, rg[i][0], rg[i][1], part) == 0);
				CHECK(memcmp(part, dig + rg[i][0] * per, sizeof(float) * rg[i][1] * per) == 0);
			}
			CHECK(ckv_pview_digests_range(v, 5, 40, 5, part) == -EINVAL);
			CHECK(ckv_pview_digests_range(v, 5, UINT32_MAX, 2, part) == -EINVAL);
			CHECK(ckv_pview_digests_range(v, geom.layers, 0, 1, part) == -EINVAL);
			free(part);
		}
		free(dig);
	}
	CHECK(ckv_pview_files_get(v, geom.layers, CKV_PV_KV, (ckv_efile *[2]){ 0 }) == -EINVAL);
	/* the view outlives the prefix's removal */
	CHECK(ckv_store_rm(s, &r.hash, &e) == 0);
	{
		ckv_efile *files[2];
		ckv_chunk_ref ref;
		ckv_slot *slot;
		int rc;
		CHECK(ckv_pview_files_get(v, 0, CKV_PV_KV, files) == 0);
		ref = ckv_pview_ref(v, files, 30);
		CHECK(ckv_engine_get(eng, &ref, 1, CKV_GET_DEMAND, &slot, &rc) == 0);
		chunk_bytes_of(0, 30, want);
		CHECK(memcmp(ckv_slot_data(slot), want, geom.chunk_bytes) == 0);
		ckv_engine_release(eng, slot);
		ckv_pview_files_put(v, files);
	}
	ckv_pview_put(v);
	ckv_engine_close(eng);
	ckv_store_close(s);
	free(want);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	CHECK(system(cmd) == 0);
	printf("test_pview: ok\n");
	return 0;
}
