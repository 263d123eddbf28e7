/*
 * test_engine_io.c — chunk engine reads: random chunk sets return the file's
 * bytes (several chunk sizes in one arena), adjacent chunks merge into one
 * read, checksum mismatches and short files fail only their chunks, the
 * arena memfd shows the same bytes, prefetch, get_async, retention export
 * and import, file registration rules.
 */
#include <math.h>
#include <sys/mman.h>

#include "test_engine_util.h"

static void test_random_sets(struct tdir *d, bool no_direct)
{
	struct tfile t[3];
	ckv_efile *f[3];
	ckv_engine_opts o = { .arena_bytes = 8u << 20, .queue_depth = 16, .no_direct = no_direct };
	ckv_engine *e;
	uint64_t seed = 42, refs_total = 0;
	ckv_engine_stats st;

	CHECK_RC(ckv_engine_open(&o, &e));
	tfile_make(d, &t[0], no_direct ? "r8b" : "r8", 8192, 300, 1);
	tfile_make(d, &t[1], no_direct ? "r16b" : "r16", 16384, 200, 2);
	tfile_make(d, &t[2], no_direct ? "r64b" : "r64", 65536, 150, 3);
	for (int i = 0; i < 3; i++)
		f[i] = tfile_reg(e, d, &t[i]);

	void *ro = mmap(NULL, ckv_engine_arena_size(e), PROT_READ, MAP_SHARED,
			ckv_engine_arena_fd(e), 0);

	CHECK(ro != MAP_FAILED);
	CHECK(ckv_engine_arena_size(e) == 8u << 20);
	for (int it = 0; it < 300; it++) {
		ckv_chunk_ref refs[24];
		ckv_slot *slots[24];
		int rcs[24];
		size_t n = 1 + t_rand(&seed) % 24;

		for (size_t i = 0; i < n; i++) {
			int k = (int)(t_rand(&seed) % 3);

			refs[i].file = f[k];
			refs[i].chunk = (uint32_t)(t_rand(&seed) % t[k].n);
			int pk = i > 0 ? (refs[i - 1].file == f[0] ? 0 : refs[i - 1].file == f[1] ? 1 : 2) : 0;

			if (i > 0 && t_rand(&seed) % 2 && refs[i - 1].chunk + 1 < t[pk].n) {
				refs[i] = refs[i - 1]; /* runs, to exercise merging */
				refs[i].chunk++;
			}
		}
		CHECK_RC(ckv_engine_get(e, refs, n, it % 5 == 0 ? CKV_GET_STREAM : CKV_GET_DEMAND,
					slots, rcs));
		refs_total += n;
		for (size_t i = 0; i < n; i++) {
			int k = refs[i].file == f[0] ? 0 : refs[i].file == f[1] ? 1 : 2;

			CHECK(rcs[i] == 0);
			CHECK(chunk_ok(&t[k], refs[i].chunk, slots[i]));
			CHECK(ckv_slot_offset(slots[i]) % 4096 == 0);
			CHECK((const char *)ckv_engine_arena_base(e) + ckv_slot_offset(slots[i]) ==
			      ckv_slot_data(slots[i]));
			CHECK(memcmp((const char *)ro + ckv_slot_offset(slots[i]),
				     ckv_slot_data(slots[i]), t[k].cb) == 0);
		}
		for (size_t i = 0; i < n; i++)
			ckv_engine_release(e, slots[i]);
	}
	ckv_engine_get_stats(e, &st);
	CHECK(st.hits + st.misses == refs_total);
	CHECK(st.evictions > 0); /* 8 MiB arena, 17 MiB of files */
	CHECK(st.checksum_failures == 0 && st.io_errors == 0);
	CHECK(st.pinned == 0);
	CHECK(st.arena_used <= st.arena_bytes);
	CHECK(st.disk_reads <= st.misses);
	munmap(ro, ckv_engine_arena_size(e));
	for (int i = 0; i < 3; i++) {
		ckv_engine_file_put(e, f[i]);
		tfile_free(&t[i]);
	}
	ckv_engine_close(e);
}

static void test_merge(struct tdir *d)
{
	struct tfile t;
	ckv_engine *e = t_engine(4u << 20, CKV_POLICY_ATTN, NULL);
	ckv_efile *f;
	ckv_chunk_ref refs[32];
	ckv_slot *slots[32];
	int rcs[32];
	ckv_engine_stats st;

	tfile_make(d, &t, "merge", 16384, 40, 7);
	f = tfile_reg(e, d, &t);
	for (uint32_t i = 0; i < 32; i++)
		refs[i] = (ckv_chunk_ref){ f, 31 - i }; /* order must not matter */
	CHECK_RC(ckv_engine_get(e, refs, 32, CKV_GET_DEMAND, slots, rcs));
	for (uint32_t i = 0; i < 32; i++) {
		CHECK(chunk_ok(&t, 31 - i, slots[i]));
		ckv_engine_release(e, slots[i]);
	}
	ckv_engine_get_stats(e, &st);
	CHECK(st.misses == 32 && st.hits == 0);
	CHECK(st.bytes_from_disk == 32 * 16384);
	CHECK(st.disk_reads < 32);
	CHECK(st.disk_reads == 1);
	CHECK(st.slots_used == 32 && st.arena_used == 32 * 16384);

	/* Two runs with a gap: two reads. */
	refs[0] = (ckv_chunk_ref){ f, 33 };
	refs[1] = (ckv_chunk_ref){ f, 34 };
	refs[2] = (ckv_chunk_ref){ f, 37 };
	refs[3] = (ckv_chunk_ref){ f, 38 };
	refs[4] = (ckv_chunk_ref){ f, 5 }; /* a hit */
	CHECK_RC(ckv_engine_get(e, refs, 5, CKV_GET_DEMAND, slots, rcs));
	for (int i = 0; i < 5; i++) {
		CHECK(chunk_ok(&t, refs[i].chunk, slots[i]));
		ckv_engine_release(e, slots[i]);
	}
	ckv_engine_get_stats(e, &st);
	CHECK(st.disk_reads == 3 && st.hits == 1 && st.misses == 36);
	ckv_engine_file_put(e, f);
	tfile_free(&t);
	ckv_engine_close(e);
}

/*
 * get_ready pins what is resident and leaves the rest; with CKV_GET_ALL a
 * set with anything not resident is left alone entirely: no pin, no hit.
 */
static void test_get_ready(struct tdir *d)
{
	struct tfile t;
	ckv_engine *e = t_engine(4u << 20, CKV_POLICY_ATTN, NULL);
	ckv_efile *f;
	ckv_chunk_ref refs[8];
	ckv_slot *slots[8];
	int rcs[8];
	ckv_engine_stats st;

	tfile_make(d, &t, "ready", 16384, 16, 3);
	f = tfile_reg(e, d, &t);
	for (uint32_t i = 0; i < 8; i++)
		refs[i] = (ckv_chunk_ref){ f, 2 * i };
	CHECK_RC(ckv_engine_get(e, refs, 4, CKV_GET_DEMAND, slots, rcs)); /* chunks 0, 2, 4, 6 */
	for (int i = 0; i < 4; i++)
		ckv_engine_release(e, slots[i]);

	/* all or nothing: 4 of 8 resident, nothing happens */
	CHECK(ckv_engine_get_ready(e, refs, 8, CKV_GET_ALL, slots) == 4);
	for (int i = 0; i < 8; i++)
		CHECK(slots[i] == NULL);
	ckv_engine_get_stats(e, &st);
	CHECK(st.pinned == 0 && st.hits == 0 && st.misses == 4);

	/* without the flag: the resident half pinned and counted */
	CHECK(ckv_engine_get_ready(e, refs, 8, 0, slots) == 4);
	ckv_engine_get_stats(e, &st);
	CHECK(st.pinned == 4 && st.hits == 4);
	for (int i = 0; i < 8; i++) {
		CHECK((slots[i] != NULL) == (i < 4));
		if (slots[i])
			CHECK(chunk_ok(&t, refs[i].chunk, slots[i]));
	}
	ckv_engine_release_n(e, slots, 8);

	/* all resident: CKV_GET_ALL pins the whole set */
	CHECK(ckv_engine_get_ready(e, refs, 4, CKV_GET_ALL, slots) == 0);
	ckv_engine_get_stats(e, &st);
	CHECK(st.pinned == 4 && st.hits == 8);
	for (int i = 0; i < 4; i++)
		CHECK(chunk_ok(&t, refs[i].chunk, slots[i]));
	ckv_engine_release_n(e, slots, 4);
	ckv_engine_get_stats(e, &st);
	CHECK(st.pinned == 0);
	ckv_engine_file_put(e, f);
	tfile_free(&t);
	ckv_engine_close(e);
}

static void test_checksum(struct tdir *d)
{
	struct tfile t;
	struct tlog log = { .mu = PTHREAD_MUTEX_INITIALIZER };
	ckv_engine *e = t_engine(4u << 20, CKV_POLICY_ATTN, &log);
	ckv_efile *f;
	ckv_chunk_ref refs[5];
	ckv_slot *slots[5];
	int rcs[5];
	ckv_engine_stats st;

	tfile_make(d, &t, "bad", 32768, 10, 9);
	t.sums[5] ^= 1; /* the engine expects another sum for chunk 5 */
	f = tfile_reg(e, d, &t);
	for (uint32_t i = 0; i < 5; i++)
		refs[i] = (ckv_chunk_ref){ f, 3 + i };
	CHECK(ckv_engine_get(e, refs, 5, CKV_GET_DEMAND, slots, rcs) == -EIO);
	for (uint32_t i = 0; i < 5; i++) {
		if (3 + i == 5) {
			CHECK(rcs[i] == -EIO && slots[i] == NULL);
			continue;
		}
		CHECK(rcs[i] == 0 && chunk_ok(&t, 3 + i, slots[i]));
		ckv_engine_release(e, slots[i]);
	}
	ckv_engine_get_stats(e, &st);
	CHECK(st.checksum_failures == 1);
	CHECK(st.slots_used == 4 && st.pinned == 0);
	CHECK(!t_resident(e, f, 5) && t_resident(e, f, 4));
	CHECK(log.lines == 1);
	CHECK(strstr(log.last, "seg/bad") && strstr(log.last, "chunk 5"));

	/* Asking again reads again and fails again; never served. */
	CHECK(ckv_engine_get(e, &refs[2], 1, CKV_GET_DEMAND, slots, rcs) == -EIO);
	CHECK(slots[0] == NULL);
	ckv_engine_get_stats(e, &st);
	CHECK(st.checksum_failures == 2);
	ckv_engine_file_put(e, f);
	tfile_free(&t);
	ckv_engine_close(e);
}

static void test_short_and_missing(struct tdir *d)
{
	struct tfile t;
	struct tlog log = { .mu = PTHREAD_MUTEX_INITIALIZER };
	ckv_engine *e = t_engine(4u << 20, CKV_POLICY_ATTN, &log);
	ckv_efile *f, *g;
	ckv_chunk_ref refs[4];
	ckv_slot *slots[4];
	int rcs[4];
	ckv_engine_stats st;

	tfile_make(d, &t, "short", 16384, 4, 11);
	{
		char p[128];

		snprintf(p, sizeof(p), "%s/short", d->path);
		CHECK(truncate(p, 3 * 16384 + 4096) == 0); /* EOF inside chunk 3 */
	}
	f = tfile_reg(e, d, &t);
	for (uint32_t i = 0; i < 4; i++)
		refs[i] = (ckv_chunk_ref){ f, i };
	CHECK(ckv_engine_get(e, refs, 4, CKV_GET_DEMAND, slots, rcs) == -EIO);
	for (uint32_t i = 0; i < 3; i++) {
		CHECK(rcs[i] == 0 && chunk_ok(&t, i, slots[i]));
		ckv_engine_release(e, slots[i]);
	}
	CHECK(rcs[3] == -EIO && !slots[3]);
	ckv_engine_get_stats(e, &st);
	CHECK(st.io_errors >= 1 && st.checksum_failures == 0);
	CHECK(log.lines >= 1 && strstr(log.last, "seg/short"));

	/* A chunk beyond the registered count is -EINVAL. */
	refs[0] = (ckv_chunk_ref){ f, 4 };
	CHECK(ckv_engine_get(e, refs, 1, CKV_GET_DEMAND, slots, rcs) == -EINVAL);

	/* A file that does not exist: the open error for its chunks. */
	CHECK_RC(ckv_engine_file_get(e, d->fd, "nonexistent", "seg/none", 4096, 2, NULL, &g));
	refs[0] = (ckv_chunk_ref){ g, 0 };
	refs[1] = (ckv_chunk_ref){ g, 1 };
	CHECK(ckv_engine_get(e, refs, 2, CKV_GET_DEMAND, slots, rcs) == -ENOENT);
	CHECK(rcs[0] == -ENOENT && rcs[1] == -ENOENT);
	ckv_engine_get_stats(e, &st);
	CHECK(st.slots_used == 3 && st.pinned == 0);
	ckv_engine_file_put(e, g);
	ckv_engine_file_put(e, f);
	tfile_free(&t);
	ckv_engine_close(e);
}

static void test_prefetch(struct tdir *d)
{
	struct tfile t;
	ckv_engine *e = t_engine(4u << 20, CKV_POLICY_ATTN, NULL);
	ckv_efile *f;
	ckv_chunk_ref refs[10];
	ckv_slot *slots[10];
	int rcs[10];
	ckv_engine_stats st;

	tfile_make(d, &t, "pf", 65536, 20, 13);
	f = tfile_reg(e, d, &t);
	for (uint32_t i = 0; i < 10; i++)
		refs[i] = (ckv_chunk_ref){ f, 2 * i };
	CHECK_RC(ckv_engine_prefetch(e, refs, 10));
	for (int w = 0; w < 2000; w++) {
		int n = 0;

		for (uint32_t i = 0; i < 10; i++)
			n += t_resident(e, f, 2 * i);
		if (n == 10)
			break;
		t_sleep_ms(1);
	}
	for (uint32_t i = 0; i < 10; i++)
		CHECK(t_resident(e, f, 2 * i));
	CHECK(!t_resident(e, f, 1));
	CHECK_RC(ckv_engine_get(e, refs, 10, CKV_GET_DEMAND, slots, rcs));
	for (uint32_t i = 0; i < 10; i++) {
		CHECK(chunk_ok(&t, 2 * i, slots[i]));
		ckv_engine_release(e, slots[i]);
	}
	ckv_engine_get_stats(e, &st);
	CHECK(st.readahead_issued == 10 && st.readahead_used == 10);
	CHECK(st.hits == 10 && st.misses == 0 && st.hints == 1);

	/* A second get of the same chunks is a hit but not read-ahead use. */
	CHECK_RC(ckv_engine_get(e, refs, 10, CKV_GET_DEMAND, slots, rcs));
	for (uint32_t i = 0; i < 10; i++)
		ckv_engine_release(e, slots[i]);
	ckv_engine_get_stats(e, &st);
	CHECK(st.readahead_used == 10 && st.hits == 20);

	/* Prefetch immediately followed by a get: joins the read in flight. */
	for (uint32_t i = 0; i < 10; i++)
		refs[i] = (ckv_chunk_ref){ f, 2 * i + 1 };
	CHECK_RC(ckv_engine_prefetch(e, refs, 10));
	CHECK_RC(ckv_engine_get(e, refs, 10, CKV_GET_DEMAND, slots, rcs));
	for (uint32_t i = 0; i < 10; i++) {
		CHECK(chunk_ok(&t, 2 * i + 1, slots[i]));
		ckv_engine_release(e, slots[i]);
	}
	ckv_engine_get_stats(e, &st);
	CHECK(st.readahead_issued == 20 && st.readahead_used == 20 && st.hits == 30);
	CHECK(st.bytes_from_disk == 20 * 65536);
	ckv_engine_file_put(e, f);
	tfile_free(&t);
	ckv_engine_close(e);
}

struct actx {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	ckv_engine *e;
	const struct tfile *t;
	const ckv_chunk_ref *refs;
	size_t ncalls;
	int seen[16];
	int rcs[16];
	bool bad;
};

static void acb(void *arg, size_t i, ckv_slot *s, int rc)
{
	struct actx *a = arg;

	if (rc == 0) {
		if (!chunk_ok(a->t, a->refs[i].chunk, s))
			a->bad = true;
		ckv_engine_release(a->e, s); /* allowed: no engine lock is held here */
	} else if (s) {
		a->bad = true;
	}
	pthread_mutex_lock(&a->mu);
	a->seen[i]++;
	a->rcs[i] = rc;
	a->ncalls++;
	pthread_cond_signal(&a->cv);
	pthread_mutex_unlock(&a->mu);
}

static void test_async(struct tdir *d)
{
	struct tfile t;
	ckv_engine *e = t_engine(4u << 20, CKV_POLICY_ATTN, NULL);
	ckv_efile *f;
	ckv_chunk_ref refs[16];
	struct actx a = { .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };

	tfile_make(d, &t, "async", 8192, 30, 17);
	f = tfile_reg(e, d, &t);
	t_get1(e, f, &t, 3, CKV_GET_DEMAND); /* resident before */
	for (uint32_t i = 0; i < 15; i++)
		refs[i] = (ckv_chunk_ref){ f, i };
	refs[15] = (ckv_chunk_ref){ f, 99 }; /* invalid */
	a.e = e;
	a.t = &t;
	a.refs = refs;
	CHECK_RC(ckv_engine_get_async(e, refs, 16, CKV_GET_DEMAND, acb, &a));
	pthread_mutex_lock(&a.mu);
	while (a.ncalls < 16)
		pthread_cond_wait(&a.cv, &a.mu);
	pthread_mutex_unlock(&a.mu);
	CHECK(!a.bad);
	for (int i = 0; i < 16; i++)
		CHECK(a.seen[i] == 1);
	for (int i = 0; i < 15; i++)
		CHECK(a.rcs[i] == 0);
	CHECK(a.rcs[15] == -EINVAL);

	/* All hits: still delivered, once each. */
	memset(a.seen, 0, sizeof(a.seen));
	a.ncalls = 0;
	CHECK_RC(ckv_engine_get_async(e, refs, 15, CKV_GET_DEMAND, acb, &a));
	pthread_mutex_lock(&a.mu);
	while (a.ncalls < 15)
		pthread_cond_wait(&a.cv, &a.mu);
	pthread_mutex_unlock(&a.mu);
	CHECK(!a.bad);

	ckv_engine_stats st;

	ckv_engine_get_stats(e, &st);
	CHECK(st.pinned == 0 && st.hits == 1 + 15 && st.misses == 1 + 14);
	ckv_engine_file_put(e, f);
	tfile_free(&t);
	ckv_engine_close(e);
}

struct rrec {
	char key[48];
	uint32_t chunk;
	double i, f;
	int64_t last;
};

struct rset {
	struct rrec r[64];
	int n;
};

static int rcollect(void *arg, const char *key, uint32_t chunk, double importance, double freq,
		    int64_t last)
{
	struct rset *s = arg;

	CHECK(s->n < 64);
	snprintf(s->r[s->n].key, sizeof(s->r[0].key), "%s", key);
	s->r[s->n].chunk = chunk;
	s->r[s->n].i = importance;
	s->r[s->n].f = freq;
	s->r[s->n].last = last;
	s->n++;
	return 0;
}

static const struct rrec *rfind(const struct rset *s, const char *key, uint32_t chunk)
{
	for (int i = 0; i < s->n; i++)
		if (strcmp(s->r[i].key, key) == 0 && s->r[i].chunk == chunk)
			return &s->r[i];
	return NULL;
}

static int near(double a, double b)
{
	double d = a > b ? a - b : b - a;

	return d <= 1e-6 * (1 + (a > 0 ? a : -a));
}

static void test_retention(struct tdir *d)
{
	struct tfile t;
	ckv_engine_opts o = { .arena_bytes = 4u << 20, .halflife_s = 1e9 };
	ckv_engine *e;
	ckv_efile *f;
	ckv_chunk_ref refs[3];
	float sc[3] = { 2.0f, 0.5f, 1.0f };
	struct rset a = { .n = 0 }, b = { .n = 0 };
	ckv_engine_stats st;

	CHECK_RC(ckv_engine_open(&o, &e));
	tfile_make(d, &t, "ret", 4096, 8, 19);
	f = tfile_reg(e, d, &t);
	CHECK(strcmp(ckv_efile_key(f), "seg/ret") == 0);
	refs[0] = (ckv_chunk_ref){ f, 1 };
	refs[1] = (ckv_chunk_ref){ f, 2 };
	refs[2] = (ckv_chunk_ref){ f, 1 };
	CHECK_RC(ckv_engine_score(e, refs, sc, 3)); /* chunk 1: 3.0, chunk 2: 0.5, not resident */
	t_get1(e, f, &t, 2, CKV_GET_DEMAND);
	t_get1(e, f, &t, 2, CKV_GET_DEMAND);
	t_get1(e, f, &t, 6, CKV_GET_DEMAND);
	t_get1(e, f, &t, 7, CKV_GET_STREAM); /* streaming reads leave no record */
	ckv_engine_get_stats(e, &st);
	CHECK(st.hints == 1);
	CHECK_RC(ckv_engine_retention_load(e, "seg/other", 5, 7.5, 3.0, 1234));
	CHECK_RC(ckv_engine_retention_each(e, rcollect, &a));
	CHECK(a.n == 4);
	const struct rrec *r;

	CHECK((r = rfind(&a, "seg/ret", 1)) && near(r->i, 3.0) && near(r->f, 0) && r->last > 0);
	CHECK((r = rfind(&a, "seg/ret", 2)) && near(r->i, 0.5) && near(r->f, 2.0));
	CHECK((r = rfind(&a, "seg/ret", 6)) && near(r->i, 0) && near(r->f, 1.0));
	CHECK((r = rfind(&a, "seg/other", 5)) && near(r->i, 7.5) && near(r->f, 3.0) &&
	      r->last == 1234);
	CHECK(!rfind(&a, "seg/ret", 7));
	ckv_engine_file_put(e, f);
	ckv_engine_close(e);

	/* Into a fresh engine and out again. */
	CHECK_RC(ckv_engine_open(&o, &e));
	for (int i = 0; i < a.n; i++)
		CHECK_RC(ckv_engine_retention_load(e, a.r[i].key, a.r[i].chunk, a.r[i].i, a.r[i].f,
						   a.r[i].last));
	CHECK_RC(ckv_engine_retention_each(e, rcollect, &b));
	CHECK(b.n == a.n);
	for (int i = 0; i < a.n; i++) {
		r = rfind(&b, a.r[i].key, a.r[i].chunk);
		CHECK(r && near(r->i, a.r[i].i) && near(r->f, a.r[i].f) && r->last == a.r[i].last);
	}
	CHECK(ckv_engine_retention_load(e, "k", 0, NAN, 0, 0) == -EINVAL);
	ckv_engine_close(e);

	/* Decay: with a half-life of 50 ms, values halve every 50 ms. */
	o.halflife_s = 0.05;
	CHECK_RC(ckv_engine_open(&o, &e));
	CHECK_RC(ckv_engine_retention_load(e, "k", 0, 8.0, 4.0, 1));
	t_sleep_ms(100);
	memset(&b, 0, sizeof(b));
	CHECK_RC(ckv_engine_retention_each(e, rcollect, &b));
	CHECK(b.n == 1 && b.r[0].i < 2.5 && b.r[0].i > 0.5 && b.r[0].f < 1.25);
	ckv_engine_close(e);
	tfile_free(&t);
}

static void test_registration(struct tdir *d)
{
	struct tfile t;
	ckv_engine *e = t_engine(1u << 20, CKV_POLICY_ATTN, NULL);
	ckv_efile *f, *g, *h;

	tfile_make(d, &t, "reg", 4096, 8, 23);
	f = tfile_reg(e, d, &t);
	g = tfile_reg(e, d, &t);
	CHECK(f == g);
	CHECK(ckv_engine_file_get(e, d->fd, t.name, t.key, 8192, 4, NULL, &h) == -EINVAL);
	CHECK(ckv_engine_file_get(e, d->fd, t.name, t.key, 0, 4, NULL, &h) == -EINVAL);
	ckv_engine_file_put(e, g);
	t_get1(e, f, &t, 0, CKV_GET_DEMAND);
	ckv_engine_file_put(e, f);
	/* No user left but chunk 0 cached: the same registration finds it. */
	f = tfile_reg(e, d, &t);
	CHECK(t_resident(e, f, 0));
	ckv_engine_file_put(e, f);
	/* Another geometry under the key once unused: a new file, old chunks dropped. */
	CHECK_RC(ckv_engine_file_get(e, d->fd, t.name, t.key, 8192, 4, NULL, &h));
	CHECK(!t_resident(e, h, 0));
	ckv_chunk_ref r = { h, 1 };
	ckv_slot *s;
	int rc;

	CHECK_RC(ckv_engine_get(e, &r, 1, CKV_GET_DEMAND, &s, &rc));
	CHECK(ckv_slot_len(s) == 8192 && memcmp(ckv_slot_data(s), t.data + 8192, 8192) == 0);
	ckv_engine_release(e, s);
	ckv_engine_file_put(e, h);
	tfile_free(&t);
	ckv_engine_close(e);
}

/* With one read at a time and 200 background reads queued, a demand read
 * does not wait for them. */
static void test_priority(struct tdir *d)
{
	struct tfile t;
	ckv_engine_opts o = { .arena_bytes = 32u << 20, .queue_depth = 1 };
	ckv_engine *e;
	ckv_efile *f;
	ckv_chunk_ref refs[200];
	int res = 0;

	CHECK_RC(ckv_engine_open(&o, &e));
	tfile_make(d, &t, "prio", 65536, 402, 29);
	f = tfile_reg(e, d, &t);
	for (uint32_t i = 0; i < 200; i++)
		refs[i] = (ckv_chunk_ref){ f, 2 * i }; /* not adjacent: 200 reads */
	CHECK_RC(ckv_engine_prefetch(e, refs, 200));
	t_get1(e, f, &t, 401, CKV_GET_DEMAND);
	for (uint32_t i = 0; i < 200; i++)
		res += t_resident(e, f, 2 * i);
	printf("priority: %d of 200 background reads done when the demand read returned\n", res);
	CHECK(res < 200);
	ckv_engine_file_put(e, f);
	ckv_engine_close(e); /* cancels what is still queued */
	tfile_free(&t);
}

int main(void)
{
	struct tdir d;

	tdir_open(&d);
	test_random_sets(&d, false);
	test_random_sets(&d, true);
	test_merge(&d);
	test_get_ready(&d);
	test_checksum(&d);
	test_short_and_missing(&d);
	test_prefetch(&d);
	test_async(&d);
	test_retention(&d);
	test_registration(&d);
	test_priority(&d);
	tdir_close(&d);
	printf("test_engine_io: ok\n");
	return 0;
}
