/*
 * test_engine_evict.c — chunk engine retention: eviction through a small
 * arena, pins (-ENOMEM when all pinned), attention scores protect chunks
 * from streaming reads under ATTN but not under LRU, a streaming read still
 * works when the arena holds only important chunks, demand eviction takes
 * the lowest S, chunk sizes of several classes share pages; under LRU,
 * random hits, misses and held pins evict exactly what a model LRU evicts
 * (hits leave their slots in the eviction heap, re-keyed only at its top).
 */
#include "test_engine_util.h"

#define K64 65536u

static void test_small_arena(struct tdir *d)
{
	struct tfile t;
	ckv_engine *e = t_engine(1u << 20, CKV_POLICY_ATTN, NULL); /* 16 slots of 64 KiB */
	ckv_efile *f;
	ckv_engine_stats st;
	int res = 0;

	tfile_make(d, &t, "small", K64, 64, 101);
	f = tfile_reg(e, d, &t);
	for (uint32_t c = 0; c < 64; c++)
		t_get1(e, f, &t, c, CKV_GET_DEMAND);
	ckv_engine_get_stats(e, &st);
	CHECK(st.misses == 64 && st.evictions == 48);
	CHECK(st.slots_used == 16 && st.arena_used == 16 * K64 && st.pinned == 0);
	for (uint32_t c = 0; c < 64; c++)
		res += t_resident(e, f, c);
	CHECK(res == 16);
	/* Again, in reverse: still correct bytes. */
	for (uint32_t c = 64; c-- > 0;)
		t_get1(e, f, &t, c, CKV_GET_DEMAND);
	ckv_engine_file_put(e, f);
	tfile_free(&t);
	ckv_engine_close(e);
}

static void test_pins(struct tdir *d)
{
	struct tfile t;
	ckv_engine *e = t_engine(1u << 20, CKV_POLICY_ATTN, NULL);
	ckv_efile *f;
	ckv_chunk_ref refs[20];
	ckv_slot *slots[20], *s;
	int rcs[20], rc;
	ckv_engine_stats st;

	tfile_make(d, &t, "pins", K64, 40, 103);
	f = tfile_reg(e, d, &t);
	for (uint32_t i = 0; i < 20; i++)
		refs[i] = (ckv_chunk_ref){ f, i };
	/* 20 wanted, 16 fit: the last 4 fail, the first 16 stay pinned. */
	CHECK(ckv_engine_get(e, refs, 20, CKV_GET_DEMAND, slots, rcs) == -ENOMEM);
	for (uint32_t i = 0; i < 16; i++)
		CHECK(rcs[i] == 0 && chunk_ok(&t, i, slots[i]));
	for (uint32_t i = 16; i < 20; i++)
		CHECK(rcs[i] == -ENOMEM && !slots[i]);
	ckv_engine_get_stats(e, &st);
	CHECK(st.pinned == 16 && st.slots_used == 16);

	/* Every slot pinned: another chunk cannot come in. */
	ckv_chunk_ref r = { f, 30 };

	CHECK(ckv_engine_get(e, &r, 1, CKV_GET_DEMAND, &s, &rc) == -ENOMEM && !s);
	/* A resident chunk can still be pinned twice. */
	r.chunk = 3;
	CHECK_RC(ckv_engine_get(e, &r, 1, CKV_GET_DEMAND, &s, &rc));
	CHECK(s == slots[3]);
	ckv_engine_release(e, s);
	/* Prefetch into a full arena is a no-op, not an error. */
	r.chunk = 31;
	CHECK_RC(ckv_engine_prefetch(e, &r, 1));
	CHECK(!t_resident(e, f, 31));

	/* Release one: room for exactly one more, taken from that slot. */
	ckv_engine_release(e, slots[7]);
	r.chunk = 30;
	CHECK_RC(ckv_engine_get(e, &r, 1, CKV_GET_DEMAND, &s, &rc));
	CHECK(chunk_ok(&t, 30, s));
	CHECK(!t_resident(e, f, 7));
	for (uint32_t i = 0; i < 16; i++)
		CHECK(i == 7 || t_resident(e, f, i));
	ckv_engine_release(e, s);
	for (uint32_t i = 0; i < 16; i++)
		if (i != 7)
			ckv_engine_release(e, slots[i]);
	ckv_engine_get_stats(e, &st);
	CHECK(st.pinned == 0);
	ckv_engine_file_put(e, f);
	tfile_free(&t);
	ckv_engine_close(e);
}

/*
 * 8 chunks of A are read and scored important; then 200 chunks of B are
 * streamed (cat-like: 4 chunks per call) through a 32-slot arena.
 * Returns how many of A's chunks are still resident.
 */
static int attn_vs_lru(struct tdir *d, enum ckv_policy pol, int *stream_ok)
{
	struct tfile a, b;
	ckv_engine *e = t_engine(2u << 20, pol, NULL);
	ckv_efile *fa, *fb;
	ckv_chunk_ref refs[8];
	float sc[8];
	int res = 0;
	char an[16], bn[16];

	snprintf(an, sizeof(an), "imp%d", (int)pol);
	snprintf(bn, sizeof(bn), "stream%d", (int)pol);
	tfile_make(d, &a, an, K64, 8, 201);
	tfile_make(d, &b, bn, K64, 200, 202);
	fa = tfile_reg(e, d, &a);
	fb = tfile_reg(e, d, &b);
	for (uint32_t c = 0; c < 8; c++) {
		t_get1(e, fa, &a, c, CKV_GET_DEMAND);
		refs[c] = (ckv_chunk_ref){ fa, c };
		sc[c] = 0.05f * (float)(c + 1);
	}
	CHECK_RC(ckv_engine_score(e, refs, sc, 8));
	*stream_ok = 1;
	for (uint32_t c = 0; c < 200; c += 4) {
		ckv_chunk_ref r[4];
		ckv_slot *s[4];
		int rcs[4];

		for (uint32_t i = 0; i < 4; i++)
			r[i] = (ckv_chunk_ref){ fb, c + i };
		if (ckv_engine_get(e, r, 4, CKV_GET_STREAM, s, rcs) != 0) {
			*stream_ok = 0;
			continue;
		}
		for (uint32_t i = 0; i < 4; i++) {
			if (!chunk_ok(&b, c + i, s[i]))
				*stream_ok = 0;
			ckv_engine_release(e, s[i]);
		}
	}
	for (uint32_t c = 0; c < 8; c++)
		res += t_resident(e, fa, c);
	ckv_engine_file_put(e, fa);
	ckv_engine_file_put(e, fb);
	tfile_free(&a);
	tfile_free(&b);
	ckv_engine_close(e);
	return res;
}

static void test_attn_vs_lru(struct tdir *d)
{
	int ok;

	CHECK(attn_vs_lru(d, CKV_POLICY_ATTN, &ok) == 8);
	CHECK(ok);
	CHECK(attn_vs_lru(d, CKV_POLICY_LRU, &ok) == 0);
	CHECK(ok);
}

/* The arena is all important chunks: a stream read still gets its bytes. */
static void test_stream_detached(struct tdir *d)
{
	struct tfile a, b;
	ckv_engine *e = t_engine(1u << 20, CKV_POLICY_ATTN, NULL);
	ckv_efile *fa, *fb;
	ckv_chunk_ref refs[16];
	float sc[16];
	ckv_slot *slots[16];
	int rcs[16];
	ckv_engine_stats st;

	tfile_make(d, &a, "full", K64, 16, 301);
	tfile_make(d, &b, "cp", K64, 40, 302);
	fa = tfile_reg(e, d, &a);
	fb = tfile_reg(e, d, &b);
	for (uint32_t c = 0; c < 16; c++) {
		refs[c] = (ckv_chunk_ref){ fa, c };
		sc[c] = 1.0f;
	}
	CHECK_RC(ckv_engine_get(e, refs, 16, CKV_GET_DEMAND, slots, rcs));
	for (uint32_t c = 0; c < 16; c++)
		ckv_engine_release(e, slots[c]);
	CHECK_RC(ckv_engine_score(e, refs, sc, 16));

	for (uint32_t c = 0; c < 40; c += 8) {
		for (uint32_t i = 0; i < 8; i++)
			refs[i] = (ckv_chunk_ref){ fb, c + i };
		CHECK_RC(ckv_engine_get(e, refs, 8, CKV_GET_STREAM, slots, rcs));
		for (uint32_t i = 0; i < 8; i++) {
			CHECK(chunk_ok(&b, c + i, slots[i]));
			CHECK(ckv_slot_offset(slots[i]) == CKV_SLOT_DETACHED);
			ckv_engine_release(e, slots[i]);
		}
	}
	for (uint32_t c = 0; c < 16; c++)
		CHECK(t_resident(e, fa, c));
	for (uint32_t c = 0; c < 40; c++)
		CHECK(!t_resident(e, fb, c));
	ckv_engine_get_stats(e, &st);
	CHECK(st.evictions == 0 && st.slots_used == 16 && st.pinned == 0);

	/* A demand read may evict the least important one. */
	refs[0] = (ckv_chunk_ref){ fb, 0 };
	CHECK_RC(ckv_engine_get(e, refs, 1, CKV_GET_DEMAND, slots, rcs));
	CHECK(ckv_slot_offset(slots[0]) != CKV_SLOT_DETACHED);
	ckv_engine_release(e, slots[0]);
	ckv_engine_get_stats(e, &st);
	CHECK(st.evictions == 1);
	ckv_engine_file_put(e, fa);
	ckv_engine_file_put(e, fb);
	tfile_free(&a);
	tfile_free(&b);
	ckv_engine_close(e);
}

/* Demand pressure: ATTN keeps the scored half, LRU the recent half. */
static void test_demand_order(struct tdir *d, enum ckv_policy pol)
{
	struct tfile t;
	ckv_engine *e = t_engine(1u << 20, pol, NULL);
	ckv_efile *f;
	ckv_chunk_ref refs[8];
	float sc[8];
	char name[16];

	snprintf(name, sizeof(name), "order%d", (int)pol);
	tfile_make(d, &t, name, K64, 24, 401);
	f = tfile_reg(e, d, &t);
	for (uint32_t c = 0; c < 16; c++)
		t_get1(e, f, &t, c, CKV_GET_DEMAND);
	for (uint32_t i = 0; i < 8; i++) {
		refs[i] = (ckv_chunk_ref){ f, i }; /* the older half */
		sc[i] = 1.0f;
	}
	CHECK_RC(ckv_engine_score(e, refs, sc, 8));
	for (uint32_t c = 16; c < 24; c++)
		t_get1(e, f, &t, c, CKV_GET_DEMAND);
	for (uint32_t c = 0; c < 8; c++)
		CHECK(t_resident(e, f, c) == (pol == CKV_POLICY_ATTN));
	for (uint32_t c = 8; c < 16; c++)
		CHECK(t_resident(e, f, c) == (pol == CKV_POLICY_LRU));
	for (uint32_t c = 16; c < 24; c++)
		CHECK(t_resident(e, f, c));
	ckv_engine_file_put(e, f);
	tfile_free(&t);
	ckv_engine_close(e);
}

/*
 * 3,000 random gets (a hot third of the chunks takes half of them) through
 * a 16-slot LRU arena, some held pinned for a while: after every 25, the
 * resident set is the model's (the least recently got unpinned chunk goes).
 */
static void test_lru_model(struct tdir *d)
{
	enum { N = 48, SLOTS = 16, HOLD = 4 };
	struct tfile t;
	ckv_engine *e = t_engine(SLOTS * K64, CKV_POLICY_LRU, NULL);
	ckv_efile *f;
	uint64_t stamp[N] = { 0 }, clock = 0, x = 0x2545f4914f6cdd1dull;
	uint32_t pins[N] = { 0 }, nres = 0, nheld = 0, held_c[HOLD];
	ckv_slot *held[HOLD];

	tfile_make(d, &t, "lrumodel", K64, N, 501);
	f = tfile_reg(e, d, &t);
	for (int it = 0; it < 3000; it++) {
		uint32_t c, r;

		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		r = (uint32_t)(x >> 32);
		c = r % 2 ? (r >> 1) % (N / 3) : (r >> 1) % N;
		if (nheld && (r >> 8) % 5 == 0) { /* drop the oldest hold */
			ckv_engine_release(e, held[0]);
			pins[held_c[0]]--;
			memmove(held, held + 1, sizeof(*held) * --nheld);
			memmove(held_c, held_c + 1, sizeof(*held_c) * nheld);
		}
		if (!stamp[c] && nres == SLOTS) { /* the model's victim */
			uint32_t v = N;

			for (uint32_t j = 0; j < N; j++)
				if (stamp[j] && !pins[j] && (v == N || stamp[j] < stamp[v]))
					v = j;
			CHECK(v < N);
			stamp[v] = 0;
			nres--;
		}
		nres += !stamp[c];
		stamp[c] = ++clock;
		if (nheld < HOLD && (r >> 12) % 4 == 0) {
			ckv_chunk_ref ref = { f, c };
			int rc = 0;

			CHECK_RC(ckv_engine_get(e, &ref, 1, CKV_GET_DEMAND, &held[nheld], &rc));
			CHECK(chunk_ok(&t, c, held[nheld]));
			held_c[nheld++] = c;
			pins[c]++;
		} else {
			t_get1(e, f, &t, c, CKV_GET_DEMAND);
		}
		if (it % 25 == 24)
			for (uint32_t j = 0; j < N; j++)
				if (t_resident(e, f, j) != (stamp[j] != 0)) {
					fprintf(stderr, "step %d: chunk %u resident %d, the model says %d\n", it,
						j, t_resident(e, f, j), stamp[j] != 0);
					exit(1);
				}
	}
	while (nheld)
		ckv_engine_release(e, held[--nheld]);
	ckv_engine_file_put(e, f);
	tfile_free(&t);
	ckv_engine_close(e);
}

/* 8 KiB and 64 KiB chunks in a 4 MiB arena: pages move between classes. */
static void test_classes(struct tdir *d)
{
	struct tfile s8, s64, s20;
	ckv_engine *e = t_engine(4u << 20, CKV_POLICY_ATTN, NULL);
	ckv_efile *f8, *f64, *f20;
	ckv_engine_stats st;

	tfile_make(d, &s8, "c8", 8192, 600, 501);
	tfile_make(d, &s64, "c64", K64, 80, 502);
	tfile_make(d, &s20, "c20", 20480, 50, 503); /* not a power of two */
	f8 = tfile_reg(e, d, &s8);
	f64 = tfile_reg(e, d, &s64);
	f20 = tfile_reg(e, d, &s20);
	for (uint32_t c = 0; c < 600; c++)
		t_get1(e, f8, &s8, c, CKV_GET_DEMAND); /* fills both pages with 8 KiB slots */
	for (uint32_t c = 0; c < 80; c++)
		t_get1(e, f64, &s64, c, CKV_GET_DEMAND);
	for (uint32_t c = 0; c < 50; c++)
		t_get1(e, f20, &s20, c, CKV_GET_DEMAND);
	for (uint32_t c = 0; c < 600; c += 7)
		t_get1(e, f8, &s8, c, CKV_GET_STREAM);
	ckv_engine_get_stats(e, &st);
	CHECK(st.arena_used <= 4u << 20 && st.pinned == 0 && st.io_errors == 0);
	ckv_engine_file_put(e, f8);
	ckv_engine_file_put(e, f64);
	ckv_engine_file_put(e, f20);
	tfile_free(&s8);
	tfile_free(&s64);
	tfile_free(&s20);
	ckv_engine_close(e);

	/* An arena smaller than a page and a chunk larger than one. */
	struct tfile big;
	ckv_efile *fb;

	e = t_engine(600u << 10, CKV_POLICY_LRU, NULL);
	tfile_make(d, &big, "big", 3u << 20, 2, 504);
	fb = tfile_reg(e, d, &big);
	ckv_chunk_ref r = { fb, 0 };
	ckv_slot *s;
	int rc;

	CHECK(ckv_engine_get(e, &r, 1, CKV_GET_DEMAND, &s, &rc) == -ENOMEM);
	ckv_engine_file_put(e, fb);
	ckv_engine_close(e);
	e = t_engine(8u << 20, CKV_POLICY_LRU, NULL);
	fb = tfile_reg(e, d, &big);
	t_get1(e, fb, &big, 1, CKV_GET_DEMAND);
	t_get1(e, fb, &big, 0, CKV_GET_DEMAND);
	t_get1(e, fb, &big, 1, CKV_GET_DEMAND);
	ckv_engine_file_put(e, fb);
	ckv_engine_close(e);
	tfile_free(&big);
}

/* Hundreds of half-lives pass: values are rescaled, heaps rebuilt, order kept. */
static void test_rebase(struct tdir *d)
{
	struct tfile t;
	ckv_engine_opts o = { .arena_bytes = 1u << 20, .halflife_s = 0.001 };
	ckv_engine *e;
	ckv_efile *f;
	ckv_chunk_ref refs[4];
	float sc[4] = { 1, 1, 1, 1 };

	CHECK_RC(ckv_engine_open(&o, &e));
	tfile_make(d, &t, "rebase", K64, 40, 601);
	f = tfile_reg(e, d, &t);
	for (uint32_t c = 0; c < 16; c++)
		t_get1(e, f, &t, c, CKV_GET_DEMAND);
	for (uint32_t i = 0; i < 4; i++)
		refs[i] = (ckv_chunk_ref){ f, i };
	CHECK_RC(ckv_engine_score(e, refs, sc, 4));
	t_sleep_ms(600); /* > 256 half-lives */
	for (uint32_t c = 16; c < 40; c++)
		t_get1(e, f, &t, c, CKV_GET_STREAM);
	for (uint32_t c = 0; c < 4; c++)
		CHECK(t_resident(e, f, c)); /* I decayed but is not zero */
	for (uint32_t c = 16; c < 40; c++)
		t_get1(e, f, &t, c, CKV_GET_DEMAND);
	ckv_engine_file_put(e, f);
	tfile_free(&t);
	ckv_engine_close(e);
}

int main(void)
{
	struct tdir d;

	tdir_open(&d);
	test_small_arena(&d);
	test_pins(&d);
	test_attn_vs_lru(&d);
	test_stream_detached(&d);
	test_demand_order(&d, CKV_POLICY_ATTN);
	test_demand_order(&d, CKV_POLICY_LRU);
	test_lru_model(&d);
	test_classes(&d);
	test_rebase(&d);
	tdir_close(&d);
	printf("test_engine_evict: ok\n");
	return 0;
}
