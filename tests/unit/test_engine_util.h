/*
 * test_engine_util.h — shared helpers of the tests/unit/test_engine_*.c
 * tests: scratch directory, chunk files of known content with their XXH3-64
 * sums, a log sink that remembers what it was told, CHECK().
 */
#ifndef TEST_ENGINE_UTIL_H
#define TEST_ENGINE_UTIL_H

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ckv_engine.h"

#include "check.h"

struct tdir {
	char path[64];
	int fd;
	char names[64][32];
	int nnames;
};

struct tfile {
	char name[32];
	char key[48];
	uint64_t cb;
	uint32_t n;
	unsigned char *data; /* n * cb bytes */
	uint64_t *sums;
};

static inline uint64_t t_rand(uint64_t *s)
{
	/* splitmix64 */
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static inline void tdir_open(struct tdir *d)
{
	memset(d, 0, sizeof(*d));
	strcpy(d->path, "/tmp/ckv-engine-XXXXXX");
	CHECK(mkdtemp(d->path));
	d->fd = open(d->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(d->fd >= 0);
}

static inline void tdir_close(struct tdir *d)
{
	for (int i = 0; i < d->nnames; i++)
		unlinkat(d->fd, d->names[i], 0);
	close(d->fd);
	rmdir(d->path);
}

/* Write a file of n chunks of cb bytes, contents from seed; keep a copy. */
static inline void tfile_make(struct tdir *d, struct tfile *t, const char *name, uint64_t cb,
			      uint32_t n, uint64_t seed)
{
	memset(t, 0, sizeof(*t));
	snprintf(t->name, sizeof(t->name), "%s", name);
	snprintf(t->key, sizeof(t->key), "seg/%s", name);
	t->cb = cb;
	t->n = n;
	t->data = malloc(cb * n + 1);
	t->sums = malloc(sizeof(uint64_t) * (n + 1));
	CHECK(t->data && t->sums);
	for (uint64_t i = 0; i < cb * n; i += 8) {
		uint64_t v = t_rand(&seed);

		memcpy(t->data + i, &v, cb * n - i < 8 ? cb * n - i : 8);
	}
	for (uint32_t c = 0; c < n; c++)
		t->sums[c] = XXH3_64bits(t->data + c * cb, cb);

	int fd = openat(d->fd, name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	CHECK(fd >= 0);
	CHECK(write(fd, t->data, cb * n) == (ssize_t)(cb * n));
	CHECK(fsync(fd) == 0);
	close(fd);
	CHECK(d->nnames < 64);
	snprintf(d->names[d->nnames++], sizeof(d->names[0]), "%s", name);
}

static inline void tfile_free(struct tfile *t)
{
	free(t->data);
	free(t->sums);
}

static inline ckv_efile *tfile_reg(ckv_engine *e, struct tdir *d, struct tfile *t)
{
	ckv_efile *f = NULL;

	CHECK_RC(ckv_engine_file_get(e, d->fd, t->name, t->key, t->cb, t->n, t->sums, &f));
	CHECK(f);
	return f;
}

static inline int chunk_ok(const struct tfile *t, uint32_t c, const ckv_slot *s)
{
	return s && ckv_slot_len(s) == t->cb && memcmp(ckv_slot_data(s), t->data + c * t->cb, t->cb) == 0;
}

/* A log sink that counts lines and keeps the last one. */
struct tlog {
	pthread_mutex_t mu;
	int lines;
	char last[512];
};

static inline void tlog_fn(void *arg, const char *msg)
{
	struct tlog *l = arg;

	pthread_mutex_lock(&l->mu);
	l->lines++;
	snprintf(l->last, sizeof(l->last), "%s", msg);
	pthread_mutex_unlock(&l->mu);
}

static inline ckv_engine *t_engine(uint64_t arena, enum ckv_policy pol, struct tlog *log)
{
	ckv_engine_opts o = { .arena_bytes = arena, .policy = pol, .queue_depth = 32 };
	ckv_engine *e = NULL;

	if (log) {
		o.log = tlog_fn;
		o.log_arg = log;
	}
	CHECK_RC(ckv_engine_open(&o, &e));
	return e;
}

/* Get one chunk, check its bytes, release it. */
static inline void t_get1(ckv_engine *e, ckv_efile *f, const struct tfile *t, uint32_t c,
			  unsigned flags)
{
	ckv_chunk_ref r = { f, c };
	ckv_slot *s = NULL;
	int rc = 0;

	CHECK_RC(ckv_engine_get(e, &r, 1, flags, &s, &rc));
	CHECK(chunk_ok(t, c, s));
	ckv_engine_release(e, s);
}

static inline int t_resident(ckv_engine *e, ckv_efile *f, uint32_t c)
{
	ckv_chunk_ref r = { f, c };

	return ckv_engine_resident(e, &r);
}

static inline void t_sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

#endif
