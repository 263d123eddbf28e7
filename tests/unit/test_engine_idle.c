/*
 * test_engine_idle.c — the engine's speculative (idle) reads and its
 * cheaper completion paths: an idle get's reads wait until no demand read
 * is queued or in flight; ckv_engine_cancel withdraws idle reads that have
 * not started (their callbacks say -ECANCELED, nothing is read, nothing
 * stays pinned) and leaves started ones alone; a demand get of a chunk
 * queued as idle reads it at once; files are read in the order their
 * chunks were asked for; CKV_GET_INLINE completes arena hits on the
 * calling thread; ckv_engine_release_n and ckv_engine_resident_n agree
 * with their one-chunk forms.
 */
#include "test_engine_util.h"

#define NMAX 512

/* Completions of async gets: order, thread, result. */
struct rec {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	ckv_engine *e;
	const struct tfile *t;
	const ckv_chunk_ref *refs;
	size_t calls;
	long seq[NMAX];     /* completion order, from 1 */
	int rc[NMAX];
	bool on_caller[NMAX];
	pthread_t caller;
	bool bad;
};

static long g_seq; /* completion counter shared by every rec; g_mu */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;

static void rec_init(struct rec *r, ckv_engine *e, const struct tfile *t, const ckv_chunk_ref *refs)
{
	memset(r, 0, sizeof(*r));
	pthread_mutex_init(&r->mu, NULL);
	pthread_cond_init(&r->cv, NULL);
	r->e = e;
	r->t = t;
	r->refs = refs;
	r->caller = pthread_self();
}

static void rec_cb(void *arg, size_t i, ckv_slot *s, int rc)
{
	struct rec *r = arg;
	long q;

	if (rc == 0) {
		if (!chunk_ok(r->t, r->refs[i].chunk, s))
			r->bad = true;
		ckv_engine_release(r->e, s);
	} else if (s) {
		r->bad = true;
	}
	pthread_mutex_lock(&g_mu);
	q = ++g_seq;
	pthread_mutex_unlock(&g_mu);
	pthread_mutex_lock(&r->mu);
	r->seq[i] = q;
	r->rc[i] = rc;
	r->on_caller[i] = pthread_equal(pthread_self(), r->caller);
	r->calls++;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
}

static void rec_wait(struct rec *r, size_t n)
{
	pthread_mutex_lock(&r->mu);
	while (r->calls < n)
		pthread_cond_wait(&r->cv, &r->mu);
	pthread_mutex_unlock(&r->mu);
	CHECK(!r->bad);
}

static ckv_engine *engine_qd(unsigned qd, unsigned idle_depth)
{
	ckv_engine_opts o = { .arena_bytes = 64u << 20, .queue_depth = qd, .idle_depth = idle_depth };
	ckv_engine *e = NULL;

	CHECK_RC(ckv_engine_open(&o, &e));
	return e;
}

/* Idle reads start only once every demand read is done. */
static void test_idle_after_demand(struct tdir *d)
{
	struct tfile t;
	ckv_engine *e = engine_qd(1, 1);
	ckv_efile *f;
	ckv_chunk_ref dref[100], iref[50];
	struct rec rd, ri;
	long last_demand = 0, first_idle = -1;
	ckv_engine_stats st;

	tfile_make(d, &t, "idle", 16384, 300, 3);
	f = tfile_reg(e, d, &t);
	for (uint32_t i = 0; i < 100; i++)
		dref[i] = (ckv_chunk_ref){ f, 2 * i };       /* not adjacent: 100 reads */
	for (uint32_t i = 0; i < 50; i++)
		iref[i] = (ckv_chunk_ref){ f, 201 + 2 * i };
	rec_init(&rd, e, &t, dref);
	rec_init(&ri, e, &t, iref);
	CHECK_RC(ckv_engine_get_async(e, dref, 100, CKV_GET_DEMAND, rec_cb, &rd));
	CHECK_RC(ckv_engine_get_async(e, iref, 50, CKV_GET_IDLE, rec_cb, &ri));
	rec_wait(&rd, 100);
	rec_wait(&ri, 50);
	for (int i = 0; i < 100; i++) {
		CHECK(rd.rc[i] == 0);
		if (rd.seq[i] > last_demand)
			last_demand = rd.seq[i];
	}
	for (int i = 0; i < 50; i++) {
		CHECK(ri.rc[i] == 0);
		if (first_idle < 0 || ri.seq[i] < first_idle)
			first_idle = ri.seq[i];
	}
	printf("idle: last demand completion %ld, first idle completion %ld\n", last_demand, first_idle);
	CHECK(first_idle > last_demand);
	ckv_engine_get_stats(e, &st);
	CHECK(st.pinned == 0);
	ckv_engine_file_put(e, f);
	ckv_engine_close(e);
	tfile_free(&t);
}

/*
 * Withdrawing idle reads: those withdrawn complete with -ECANCELED and are
 * not read; the others complete as usual. Behind 300 demand reads at queue
 * depth 1 nothing idle can have started by the time cancel runs, unless
 * this thread slept for all of them: then the round is tried again.
 */
static void test_cancel(struct tdir *d)
{
	struct tfile t;
	size_t withdrawn = 0;

	tfile_make(d, &t, "cancel", 8192, 700, 5);
	for (int round = 0; round < 5 && withdrawn == 0; round++) {
		ckv_engine *e = engine_qd(1, 4);
		ckv_efile *f = tfile_reg(e, d, &t);
		ckv_chunk_ref dref[300], iref[40], cref[20];
		size_t idx[20];
		uint8_t done[20];
		struct rec rd, ri;
		ckv_engine_stats st;

		for (uint32_t i = 0; i < 300; i++)
			dref[i] = (ckv_chunk_ref){ f, 2 * i };
		for (uint32_t i = 0; i < 40; i++)
			iref[i] = (ckv_chunk_ref){ f, 601 + 2 * i };
		rec_init(&rd, e, &t, dref);
		rec_init(&ri, e, &t, iref);
		CHECK_RC(ckv_engine_get_async(e, dref, 300, CKV_GET_DEMAND, rec_cb, &rd));
		CHECK_RC(ckv_engine_get_async(e, iref, 40, CKV_GET_IDLE, rec_cb, &ri));
		for (uint32_t k = 0; k < 20; k++) { /* the even indices */
			idx[k] = 2 * k;
			cref[k] = iref[2 * k];
		}
		/* a ref that does not match its index, and a foreign arg: nothing happens */
		{
			size_t bad = 1;
			uint8_t bd = 9;

			CHECK_RC(ckv_engine_cancel(e, &iref[0], &bad, 1, rec_cb, &ri, &bd));
			CHECK(bd == 0);
			CHECK_RC(ckv_engine_cancel(e, &iref[1], &bad, 1, rec_cb, &rd, &bd));
			CHECK(bd == 0);
		}
		CHECK_RC(ckv_engine_cancel(e, cref, idx, 20, rec_cb, &ri, done));
		rec_wait(&rd, 300);
		rec_wait(&ri, 40);
		withdrawn = 0;
		for (uint32_t k = 0; k < 20; k++) {
			uint32_t i = (uint32_t)idx[k];

			CHECK(done[k] ? ri.rc[i] == -ECANCELED : ri.rc[i] == 0);
			withdrawn += done[k];
			/* withdrawn and asked for by nobody else: not read, not kept */
			if (done[k])
				CHECK(!t_resident(e, f, iref[i].chunk));
		}
		for (uint32_t i = 1; i < 40; i += 2)
			CHECK(ri.rc[i] == 0 && t_resident(e, f, iref[i].chunk));
		ckv_engine_get_stats(e, &st);
		CHECK(st.pinned == 0);
		printf("cancel round %d: %zu of 20 withdrawn\n", round, withdrawn);
		ckv_engine_file_put(e, f);
		ckv_engine_close(e);
	}
	CHECK(withdrawn > 0);
	tfile_free(&t);
}

/*
 * A demand get of chunks queued as idle reads them now, as demand reads,
 * ahead of the demand reads already queued (of another file: within a
 * file, queued chunks are read in chunk order).
 */
static void test_promote(struct tdir *d)
{
	struct tfile ta, tb;
	ckv_engine *e = engine_qd(1, 1);
	ckv_efile *fa, *fb;
	ckv_chunk_ref dref[200], iref[30], pref[5];
	struct rec rd, ri, rp;
	long last_p = 0, last_d = 0;

	tfile_make(d, &ta, "promote_a", 8192, 400, 7);
	tfile_make(d, &tb, "promote_b", 8192, 60, 9);
	fa = tfile_reg(e, d, &ta);
	fb = tfile_reg(e, d, &tb);
	for (uint32_t i = 0; i < 200; i++)
		dref[i] = (ckv_chunk_ref){ fa, 2 * i };
	for (uint32_t i = 0; i < 30; i++)
		iref[i] = (ckv_chunk_ref){ fb, 2 * i };
	for (uint32_t i = 0; i < 5; i++)
		pref[i] = iref[3 * i];
	rec_init(&rd, e, &ta, dref);
	rec_init(&ri, e, &tb, iref);
	rec_init(&rp, e, &tb, pref);
	CHECK_RC(ckv_engine_get_async(e, dref, 200, CKV_GET_DEMAND, rec_cb, &rd));
	CHECK_RC(ckv_engine_get_async(e, iref, 30, CKV_GET_IDLE, rec_cb, &ri));
	CHECK_RC(ckv_engine_get_async(e, pref, 5, CKV_GET_DEMAND, rec_cb, &rp));
	rec_wait(&rp, 5);
	rec_wait(&rd, 200);
	rec_wait(&ri, 30);
	for (int i = 0; i < 5; i++) {
		CHECK(rp.rc[i] == 0);
		if (rp.seq[i] > last_p)
			last_p = rp.seq[i];
	}
	for (int i = 0; i < 200; i++)
		if (rd.seq[i] > last_d)
			last_d = rd.seq[i];
	for (int i = 0; i < 30; i++)
		CHECK(ri.rc[i] == 0);
	printf("promote: last promoted completion %ld, last demand %ld\n", last_p, last_d);
	CHECK(last_p < last_d);
	ckv_engine_file_put(e, fa);
	ckv_engine_file_put(e, fb);
	ckv_engine_close(e);
	tfile_free(&ta);
	tfile_free(&tb);
}

/* Files are read in the order their first chunk was asked for. */
static void test_file_order(struct tdir *d)
{
	struct tfile ta, tb;
	ckv_engine *e = engine_qd(1, 1);
	ckv_efile *fa, *fb;
	ckv_chunk_ref ra[40], rb[40];
	struct rec ra_, rb_;
	long last_b = 0, first_a = -1;

	tfile_make(d, &ta, "order_a", 8192, 80, 11);
	tfile_make(d, &tb, "order_b", 8192, 80, 13);
	fa = tfile_reg(e, d, &ta);
	fb = tfile_reg(e, d, &tb);
	for (uint32_t i = 0; i < 40; i++) {
		ra[i] = (ckv_chunk_ref){ fa, 2 * i };
		rb[i] = (ckv_chunk_ref){ fb, 2 * i };
	}
	rec_init(&ra_, e, &ta, ra);
	rec_init(&rb_, e, &tb, rb);
	/* b first, then a: every read of b before any of a, whatever the files' addresses */
	CHECK_RC(ckv_engine_get_async(e, rb, 40, CKV_GET_DEMAND, rec_cb, &rb_));
	CHECK_RC(ckv_engine_get_async(e, ra, 40, CKV_GET_DEMAND, rec_cb, &ra_));
	rec_wait(&rb_, 40);
	rec_wait(&ra_, 40);
	for (int i = 0; i < 40; i++) {
		if (rb_.seq[i] > last_b)
			last_b = rb_.seq[i];
		if (first_a < 0 || ra_.seq[i] < first_a)
			first_a = ra_.seq[i];
	}
	CHECK(first_a > last_b);
	ckv_engine_file_put(e, fa);
	ckv_engine_file_put(e, fb);
	ckv_engine_close(e);
	tfile_free(&ta);
	tfile_free(&tb);
}

/* CKV_GET_INLINE: hits complete on the calling thread, before the call returns. */
static void test_inline(struct tdir *d)
{
	struct tfile t;
	ckv_engine *e = engine_qd(8, 0);
	ckv_efile *f;
	ckv_chunk_ref refs[20];
	ckv_slot *slots[20];
	uint8_t res[20];
	struct rec r;
	ckv_engine_stats st;

	tfile_make(d, &t, "inline", 8192, 40, 19);
	f = tfile_reg(e, d, &t);
	for (uint32_t i = 0; i < 20; i++)
		refs[i] = (ckv_chunk_ref){ f, i };
	for (uint32_t i = 0; i < 10; i++) /* the first 10 resident */
		t_get1(e, f, &t, i, CKV_GET_DEMAND);
	ckv_engine_resident_n(e, refs, 20, res);
	for (uint32_t i = 0; i < 20; i++)
		CHECK(res[i] == (i < 10) && res[i] == t_resident(e, f, i));
	rec_init(&r, e, &t, refs);
	CHECK_RC(ckv_engine_get_async(e, refs, 20, CKV_GET_INLINE, rec_cb, &r));
	pthread_mutex_lock(&r.mu);
	CHECK(r.calls >= 10); /* the hits, before the call returned */
	pthread_mutex_unlock(&r.mu);
	rec_wait(&r, 20);
	for (uint32_t i = 0; i < 20; i++) {
		CHECK(r.rc[i] == 0);
		if (i < 10)
			CHECK(r.on_caller[i]);
		else
			CHECK(!r.on_caller[i]); /* reads complete on the engine's thread */
	}
	/* release_n: the same as one release each, NULLs skipped */
	for (uint32_t i = 0; i < 20; i++) {
		int rc;

		CHECK_RC(ckv_engine_get(e, &refs[i], 1, CKV_GET_DEMAND, &slots[i], &rc));
	}
	slots[3] = NULL;
	ckv_engine_get_stats(e, &st);
	CHECK(st.pinned == 20);
	ckv_engine_release_n(e, slots, 20);
	ckv_engine_get_stats(e, &st);
	CHECK(st.pinned == 1);
	{
		int rc;

		CHECK_RC(ckv_engine_get(e, &refs[3], 1, CKV_GET_DEMAND, &slots[3], &rc));
		ckv_engine_release(e, slots[3]); /* the get's pin */
		ckv_engine_release(e, slots[3]); /* the one left over */
	}
	ckv_engine_get_stats(e, &st);
	CHECK(st.pinned == 0);
	ckv_engine_file_put(e, f);
	ckv_engine_close(e);
	tfile_free(&t);
}

int main(void)
{
	struct tdir d;

	tdir_open(&d);
	test_idle_after_demand(&d);
	test_cancel(&d);
	test_promote(&d);
	test_file_order(&d);
	test_inline(&d);
	tdir_close(&d);
	printf("test_engine_idle: ok\n");
	return 0;
}
