/*
 * test_engine_threads.c — chunk engine under concurrency: threads hammer
 * random chunk sets of several files through an arena that must evict
 * (sync gets, streaming gets, async gets, prefetch, scores), checking every
 * byte; and threads that ask for the same chunks at the same moment cause
 * one read per chunk.
 */
#include "test_engine_util.h"

#define NTHREADS 8
#define NFILES 3

struct shared {
	ckv_engine *e;
	struct tfile *t;
	ckv_efile **f;
	pthread_barrier_t bar;
	int iters;
	unsigned long refs_asked;
	pthread_mutex_t mu;
	int bad;
};

struct asy {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	size_t left;
	struct shared *sh;
	const ckv_chunk_ref *refs;
	const struct tfile *t;
	int bad;
};

static int file_index(const struct shared *sh, const ckv_efile *f)
{
	for (int k = 0; k < NFILES; k++)
		if (sh->f[k] == f)
			return k;
	return -1;
}

static void asy_cb(void *arg, size_t i, ckv_slot *s, int rc)
{
	struct asy *a = arg;
	int k = file_index(a->sh, a->refs[i].file);

	if (rc == 0) {
		if (!chunk_ok(&a->sh->t[k], a->refs[i].chunk, s))
			a->bad = 1;
		ckv_engine_release(a->sh->e, s);
	} else if (rc != -ENOMEM) {
		a->bad = 1;
	}
	pthread_mutex_lock(&a->mu);
	if (--a->left == 0)
		pthread_cond_signal(&a->cv);
	pthread_mutex_unlock(&a->mu);
}

static void *hammer(void *arg)
{
	struct shared *sh = arg;
	uint64_t seed = (uint64_t)(uintptr_t)pthread_self();
	unsigned long asked = 0;
	int bad = 0;

	pthread_barrier_wait(&sh->bar);
	for (int it = 0; it < sh->iters && !bad; it++) {
		ckv_chunk_ref refs[8];
		ckv_slot *slots[8];
		int rcs[8];
		size_t n = 1 + t_rand(&seed) % 8;
		int k = (int)(t_rand(&seed) % NFILES);
		uint32_t start = (uint32_t)(t_rand(&seed) % sh->t[k].n);
		unsigned mode = (unsigned)(t_rand(&seed) % 10);

		for (size_t i = 0; i < n; i++) {
			if (t_rand(&seed) % 3 == 0)
				k = (int)(t_rand(&seed) % NFILES);
			refs[i].file = sh->f[k];
			refs[i].chunk = t_rand(&seed) % 2 ? (start + (uint32_t)i) % sh->t[k].n
							  : (uint32_t)(t_rand(&seed) % sh->t[k].n);
		}
		if (mode == 0) {
			if (ckv_engine_prefetch(sh->e, refs, n) != 0)
				bad = 1;
			continue;
		}
		if (mode == 1) {
			float sc[8];

			for (size_t i = 0; i < n; i++)
				sc[i] = (float)(t_rand(&seed) % 100) / 100.0f;
			if (ckv_engine_score(sh->e, refs, sc, n) != 0)
				bad = 1;
			continue;
		}
		asked += n;
		if (mode == 2) {
			struct asy a = { .mu = PTHREAD_MUTEX_INITIALIZER,
					 .cv = PTHREAD_COND_INITIALIZER,
					 .left = n,
					 .sh = sh,
					 .refs = refs };

			if (ckv_engine_get_async(sh->e, refs, n, CKV_GET_DEMAND, asy_cb, &a) != 0) {
				bad = 1;
				continue;
			}
			pthread_mutex_lock(&a.mu);
			while (a.left)
				pthread_cond_wait(&a.cv, &a.mu);
			pthread_mutex_unlock(&a.mu);
			bad |= a.bad;
			continue;
		}
		ckv_engine_get(sh->e, refs, n, mode == 3 ? CKV_GET_STREAM : CKV_GET_DEMAND, slots,
			       rcs);
		for (size_t i = 0; i < n; i++) {
			int fk = file_index(sh, refs[i].file);

			if (rcs[i] == 0) {
				if (!chunk_ok(&sh->t[fk], refs[i].chunk, slots[i])) {
					fprintf(stderr, "bad bytes: file %d chunk %u\n", fk,
						refs[i].chunk);
					bad = 1;
				}
			} else if (rcs[i] != -ENOMEM || slots[i]) {
				fprintf(stderr, "rc %d for file %d chunk %u\n", rcs[i], fk,
					refs[i].chunk);
				bad = 1;
			}
		}
		if (t_rand(&seed) % 4 == 0)
			sched_yield(); /* hold pins a little */
		for (size_t i = 0; i < n; i++)
			if (rcs[i] == 0)
				ckv_engine_release(sh->e, slots[i]);
	}
	pthread_mutex_lock(&sh->mu);
	sh->refs_asked += asked;
	sh->bad |= bad;
	pthread_mutex_unlock(&sh->mu);
	return NULL;
}

static void run_hammer(struct tdir *d, enum ckv_policy pol, bool no_direct)
{
	struct tfile t[NFILES];
	ckv_efile *f[NFILES];
	ckv_engine_opts o = { .arena_bytes = 6u << 20, .policy = pol, .queue_depth = 8,
			      .no_direct = no_direct };
	struct shared sh = { .t = t, .f = f, .iters = 1500, .mu = PTHREAD_MUTEX_INITIALIZER };
	pthread_t th[NTHREADS];
	ckv_engine_stats st;
	const uint64_t sizes[NFILES] = { 8192, 16384, 65536 };

	CHECK_RC(ckv_engine_open(&o, &sh.e));
	for (int k = 0; k < NFILES; k++) {
		char name[32];

		snprintf(name, sizeof(name), "h%d_%d_%d", k, (int)pol, (int)no_direct);
		tfile_make(d, &t[k], name, sizes[k], 97 + 13 * (uint32_t)k, 1000 + (uint64_t)k);
		f[k] = tfile_reg(sh.e, d, &t[k]);
	}
	pthread_barrier_init(&sh.bar, NULL, NTHREADS);
	for (int i = 0; i < NTHREADS; i++)
		CHECK(pthread_create(&th[i], NULL, hammer, &sh) == 0);
	for (int i = 0; i < NTHREADS; i++)
		pthread_join(th[i], NULL);
	pthread_barrier_destroy(&sh.bar);
	CHECK(!sh.bad);
	ckv_engine_get_stats(sh.e, &st);
	printf("hammer %s%s: %lu refs, hits %lu misses %lu evictions %lu reads %lu "
	       "readahead %lu/%lu\n",
	       pol == CKV_POLICY_ATTN ? "attn" : "lru", no_direct ? " buffered" : "",
	       sh.refs_asked, (unsigned long)st.hits, (unsigned long)st.misses,
	       (unsigned long)st.evictions, (unsigned long)st.disk_reads,
	       (unsigned long)st.readahead_used, (unsigned long)st.readahead_issued);
	CHECK(st.hits + st.misses == sh.refs_asked);
	CHECK(st.pinned == 0 && st.checksum_failures == 0 && st.io_errors == 0);
	CHECK(st.evictions > 0 && st.arena_used <= st.arena_bytes);
	CHECK(st.readahead_used <= st.readahead_issued);
	for (int k = 0; k < NFILES; k++) {
		ckv_engine_file_put(sh.e, f[k]);
		tfile_free(&t[k]);
	}
	ckv_engine_close(sh.e); /* background reads may still be queued */
}

struct same {
	ckv_engine *e;
	ckv_efile *f;
	const struct tfile *t;
	pthread_barrier_t bar;
	int bad;
};

static void *same_reader(void *arg)
{
	struct same *s = arg;
	ckv_chunk_ref refs[32];
	ckv_slot *slots[32];
	int rcs[32];

	for (uint32_t i = 0; i < 32; i++)
		refs[i] = (ckv_chunk_ref){ s->f, i };
	pthread_barrier_wait(&s->bar);
	if (ckv_engine_get(s->e, refs, 32, CKV_GET_DEMAND, slots, rcs) != 0) {
		s->bad = 1;
		return NULL;
	}
	for (uint32_t i = 0; i < 32; i++) {
		if (!chunk_ok(s->t, i, slots[i]))
			s->bad = 1;
		ckv_engine_release(s->e, slots[i]);
	}
	return NULL;
}

static void test_same_chunks(struct tdir *d)
{
	struct tfile t;
	struct same s = { .bad = 0 };
	pthread_t th[NTHREADS];
	ckv_engine_stats st;

	s.e = t_engine(8u << 20, CKV_POLICY_ATTN, NULL);
	tfile_make(d, &t, "same", 32768, 32, 77);
	s.f = tfile_reg(s.e, d, &t);
	s.t = &t;
	pthread_barrier_init(&s.bar, NULL, NTHREADS);
	for (int i = 0; i < NTHREADS; i++)
		CHECK(pthread_create(&th[i], NULL, same_reader, &s) == 0);
	for (int i = 0; i < NTHREADS; i++)
		pthread_join(th[i], NULL);
	pthread_barrier_destroy(&s.bar);
	CHECK(!s.bad);
	ckv_engine_get_stats(s.e, &st);
	CHECK(st.bytes_from_disk == 32 * 32768); /* each chunk read once */
	CHECK(st.hits + st.misses == NTHREADS * 32);
	ckv_engine_file_put(s.e, s.f);
	tfile_free(&t);
	ckv_engine_close(s.e);
}

int main(void)
{
	struct tdir d;

	tdir_open(&d);
	test_same_chunks(&d);
	run_hammer(&d, CKV_POLICY_ATTN, false);
	run_hammer(&d, CKV_POLICY_LRU, false);
	run_hammer(&d, CKV_POLICY_ATTN, true);
	tdir_close(&d);
	printf("test_engine_threads: ok\n");
	return 0;
}
