/*
 * store.c — the ckvfs store: segment and manifest files, the LMDB index,
 * import / publish with chunk dedup, export, match, verify, rm, gc, reindex.
 *
 * The files are the truth; LMDB is a cache of what they say. Publishing a
 * prefix (DESIGN §3.3):
 *   1. under a shared flock on STORE/lock, write the new chunks as a segment
 *      in STORE/staging/<id>/, fsync, rename it into seg/xx/<segment id>;
 *   2. write the store record into prefix/xx/<hash>.json (tmp, fsync, rename);
 *   3. one LMDB write transaction inserts the prefix, its chain links and the
 *      segment reference counts. It commits last: until then nothing is visible.
 * gc takes the flock exclusively, so it never sees an import in flight: any
 * staging directory, segment without an index row, or record without an
 * index row it finds is a leftover of a crash.
 *
 * LMDB databases (keys that are hashes are canonical big-endian):
 *   prefix  hash[16]                      -> store record JSON (as the file)
 *   chain   seed[8 BE] h_j[16]            -> where that chunk lives (segment, index)
 *   seg     segment id (string)           -> refcount, shape, chain hash of each chunk
 *   segref  segment id, prefix[16]        -> chunks of the segment the prefix uses
 *   ret     "<segment>/<layer>" 0 chunk[4 BE] -> {I f64, F f64, last i64}
 *   meta    "version" -> u32, "generation" -> u64
 */
#include "ckv_store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <lmdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MANIFEST_MAX (1u << 20)
#define IO_RUN (4u << 20) /* bytes moved per read/write call */

struct ckv_store {
	char *path;
	int dirfd;
	int lockfd; /* STORE/lock, flock: LOCK_SH by importers, LOCK_EX by gc */
	MDB_env *env;
	MDB_dbi db_prefix, db_chain, db_seg, db_segref, db_ret, db_meta;
	bool no_sync; /* set once before use: bulk test/bench data, not crash-safe */
};

/* One adapter for LMDB errors. */
static int mdb_errno(int rc)
{
	switch (rc) {
	case MDB_SUCCESS:
		return 0;
	case MDB_NOTFOUND:
		return -ENOENT;
	case MDB_MAP_FULL:
	case MDB_TXN_FULL:
		return -ENOSPC;
	case MDB_READERS_FULL:
		return -EAGAIN;
	case MDB_INVALID:
	case MDB_CORRUPTED:
	case MDB_PAGE_NOTFOUND:
		return -EUCLEAN;
	case MDB_VERSION_MISMATCH:
		return -EPROTONOSUPPORT;
	default:
		return rc > 0 ? -rc : -EIO;
	}
}

/* ---- small file helpers ------------------------------------------------------ */

static int write_all(int fd, const void *buf, size_t len, off_t off)
{
	const char *p = buf;
	while (len) {
		ssize_t w = off >= 0 ? pwrite(fd, p, len, off) : write(fd, p, len);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += w;
		len -= (size_t)w;
		if (off >= 0)
			off += w;
	}
	return 0;
}

static int read_all(int fd, void *buf, size_t len, off_t off)
{
	char *p = buf;
	while (len) {
		ssize_t r = pread(fd, p, len, off);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			return -ENODATA; /* short file */
		p += r;
		len -= (size_t)r;
		off += r;
	}
	return 0;
}

static int sync_fd(const ckv_store *s, int fd)
{
	if (s && s->no_sync)
		return 0;
	return fsync(fd);
}

static int fsync_dir(const ckv_store *s, int dirfd, const char *rel)
{
	int fd, rc = 0;
	if (s && s->no_sync)
		return 0;
	fd = openat(dirfd, rel, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0)
		rc = -errno;
	close(fd);
	return rc;
}

static void maybe_crash(const ckv_import_opts *o, const char *stage);

/*
 * Write a whole small file atomically: tmp, fsync, rename, fsync dir. The
 * temporary file is .NAME.PID.tmp in dir; one a crash leaves behind is
 * removed by gc. Crash point "record" (tests): the temporary file written,
 * not yet renamed.
 */
static int write_file_atomic(const ckv_store *s, const ckv_import_opts *o, int dirfd, const char *dir,
			     const char *name, const void *buf, size_t len)
{
	char tmp[512], dst[512];
	int fd, rc;

	snprintf(tmp, sizeof(tmp), "%s/.%s.%d.tmp", dir, name, (int)getpid());
	snprintf(dst, sizeof(dst), "%s/%s", dir, name);
	fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -errno;
	rc = write_all(fd, buf, len, 0);
	if (!rc && sync_fd(s, fd) < 0)
		rc = -errno;
	close(fd);
	if (!rc)
		maybe_crash(o, "record");
	if (!rc && renameat(dirfd, tmp, dirfd, dst) < 0)
		rc = -errno;
	if (rc)
		unlinkat(dirfd, tmp, 0);
	else
		rc = fsync_dir(s, dirfd, dir);
	return rc;
}

/* Read a whole regular file (no symlinks) of at most max bytes. */
static int slurp_at(int dirfd, const char *rel, size_t max, char **out, size_t *len)
{
	struct stat st;
	char *buf;
	int fd, rc;

	fd = openat(dirfd, rel, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0) {
		rc = -errno;
		goto out_close;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = -EINVAL;
		goto out_close;
	}
	if ((uint64_t)st.st_size > max) {
		rc = -EFBIG;
		goto out_close;
	}
	buf = malloc((size_t)st.st_size + 1);
	if (!buf) {
		rc = -ENOMEM;
		goto out_close;
	}
	rc = read_all(fd, buf, (size_t)st.st_size, 0);
	if (rc) {
		free(buf);
		goto out_close;
	}
	buf[st.st_size] = 0;
	*out = buf;
	*len = (size_t)st.st_size;
out_close:
	close(fd);
	return rc;
}

/* Remove a directory tree below dirfd; adds freed bytes to *bytes. */
static int rm_tree(int at, const char *rel, uint64_t *bytes)
{
	struct stat st;
	DIR *d;
	struct dirent *de;
	int fd, rc = 0;

	if (fstatat(at, rel, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return errno == ENOENT ? 0 : -errno;
	if (!S_ISDIR(st.st_mode)) {
		if (bytes)
			*bytes += (uint64_t)st.st_blocks * 512;
		return unlinkat(at, rel, 0) < 0 && errno != ENOENT ? -errno : 0;
	}
	fd = openat(at, rel, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	d = fdopendir(fd);
	if (!d) {
		close(fd);
		return -errno;
	}
	while ((de = readdir(d))) {
		int r;
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		r = rm_tree(dirfd(d), de->d_name, bytes);
		if (r && !rc)
			rc = r;
	}
	closedir(d);
	if (unlinkat(at, rel, AT_REMOVEDIR) < 0 && errno != ENOENT && !rc)
		rc = -errno;
	return rc;
}

static uint64_t tree_bytes(int at, const char *rel)
{
	struct stat st;
	DIR *d;
	struct dirent *de;
	uint64_t sum = 0;
	int fd;

	if (fstatat(at, rel, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return 0;
	if (!S_ISDIR(st.st_mode))
		return (uint64_t)st.st_blocks * 512;
	fd = openat(at, rel, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0 || !(d = fdopendir(fd))) {
		if (fd >= 0)
			close(fd);
		return 0;
	}
	while ((de = readdir(d)))
		if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
			sum += tree_bytes(dirfd(d), de->d_name);
	closedir(d);
	return sum;
}

static void prefix_rel(const ckv_hash *h, char *dir, size_t dlen, char *name, size_t nlen)
{
	char hex[CKV_HASH_HEX + 1];
	ckv_hash_hex(h, hex);
	snprintf(dir, dlen, "prefix/%.2s", hex);
	snprintf(name, nlen, "%s.json", hex);
}

void ckv_segment_path(const char *segid, char *out, size_t len)
{
	snprintf(out, len, "seg/%.2s/%s", segid, segid);
}

/* ---- open / init ------------------------------------------------------------- */

static int open_env(ckv_store *s, ckv_err *e)
{
	MDB_txn *txn;
	int rc;
	char idx[4096];

	snprintf(idx, sizeof(idx), "%s/index", s->path);
	if ((rc = mdb_env_create(&s->env)))
		return ckv_errf(e, mdb_errno(rc), "%s: lmdb: %s", idx, mdb_strerror(rc));
	mdb_env_set_maxdbs(s->env, 16);
	mdb_env_set_maxreaders(s->env, 1024);
	mdb_env_set_mapsize(s->env, (size_t)64 << 30);
	rc = mdb_env_open(s->env, idx, MDB_NOTLS, 0644);
	if (rc) {
		rc = ckv_errf(e, mdb_errno(rc), "%s: cannot open the index: %s", idx, mdb_strerror(rc));
		goto out_close;
	}
	if ((rc = mdb_txn_begin(s->env, NULL, 0, &txn))) {
		rc = ckv_errf(e, mdb_errno(rc), "%s: %s", idx, mdb_strerror(rc));
		goto out_close;
	}
	if ((rc = mdb_dbi_open(txn, "prefix", MDB_CREATE, &s->db_prefix)) ||
	    (rc = mdb_dbi_open(txn, "chain", MDB_CREATE, &s->db_chain)) ||
	    (rc = mdb_dbi_open(txn, "seg", MDB_CREATE, &s->db_seg)) ||
	    (rc = mdb_dbi_open(txn, "segref", MDB_CREATE, &s->db_segref)) ||
	    (rc = mdb_dbi_open(txn, "ret", MDB_CREATE, &s->db_ret)) ||
	    (rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &s->db_meta))) {
		mdb_txn_abort(txn);
		rc = ckv_errf(e, mdb_errno(rc), "%s: %s", idx, mdb_strerror(rc));
		goto out_close;
	}
	{
		MDB_val k = { 7, (void *)"version" }, v;
		uint32_t ver = CKV_FORMAT_VERSION;
		rc = mdb_get(txn, s->db_meta, &k, &v);
		if (rc == MDB_NOTFOUND) {
			v.mv_size = 4;
			v.mv_data = &ver;
			rc = mdb_put(txn, s->db_meta, &k, &v, 0);
		} else if (rc == 0 && (v.mv_size != 4 || memcmp(v.mv_data, &ver, 4) != 0)) {
			mdb_txn_abort(txn);
			rc = ckv_errf(e, -EPROTONOSUPPORT, "%s: index format version differs from this build's (%u); run ckv reindex",
				      idx, CKV_FORMAT_VERSION);
			goto out_close;
		}
	}
	if (rc || (rc = mdb_txn_commit(txn))) {
		if (rc)
			mdb_txn_abort(txn);
		rc = ckv_errf(e, mdb_errno(rc), "%s: %s", idx, mdb_strerror(rc));
		goto out_close;
	}
	return 0;
out_close:
	mdb_env_close(s->env);
	s->env = NULL;
	return rc;
}

int ckv_store_init(const char *path, ckv_err *e)
{
	static const char *const dirs[] = { "index", "seg", "prefix", "staging" };
	ckv_store *s;
	int rc;

	if (mkdir(path, 0755) < 0 && errno != EEXIST)
		return ckv_errf(e, -errno, "%s: cannot create: %s", path, strerror(errno));
	for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
		char p[4096];
		snprintf(p, sizeof(p), "%s/%s", path, dirs[i]);
		if (mkdir(p, 0755) < 0 && errno != EEXIST)
			return ckv_errf(e, -errno, "%s: cannot create: %s", p, strerror(errno));
	}
	{
		char p[4096];
		int fd;
		snprintf(p, sizeof(p), "%s/lock", path);
		fd = open(p, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
		if (fd < 0)
			return ckv_errf(e, -errno, "%s: cannot create: %s", p, strerror(errno));
		close(fd);
	}
	rc = ckv_store_open(path, &s, e);
	if (rc)
		return rc;
	ckv_store_close(s);
	return 0;
}

int ckv_store_open(const char *path, ckv_store **out, ckv_err *e)
{
	ckv_store *s;
	struct stat st;
	int rc;

	if (stat(path, &st) < 0)
		return ckv_errf(e, -errno, "%s: %s", path, strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return ckv_errf(e, -ENOTDIR, "%s: not a directory", path);
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->lockfd = -1;
	s->path = strdup(path);
	if (!s->path) {
		rc = -ENOMEM;
		goto out_free;
	}
	s->dirfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (s->dirfd < 0) {
		rc = ckv_errf(e, -errno, "%s: %s", path, strerror(errno));
		goto out_free;
	}
	if (faccessat(s->dirfd, "index", F_OK, 0) < 0 || faccessat(s->dirfd, "seg", F_OK, 0) < 0 ||
	    faccessat(s->dirfd, "prefix", F_OK, 0) < 0) {
		rc = ckv_errf(e, -ENOENT, "%s: not a ckv store (no index/, seg/ or prefix/; create one with 'ckv init')", path);
		goto out_closefd;
	}
	mkdirat(s->dirfd, "staging", 0755);
	s->lockfd = openat(s->dirfd, "lock", O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (s->lockfd < 0)
		s->lockfd = openat(s->dirfd, "lock", O_RDONLY | O_CLOEXEC);
	if (s->lockfd < 0) {
		rc = ckv_errf(e, -errno, "%s/lock: %s", path, strerror(errno));
		goto out_closefd;
	}
	rc = open_env(s, e);
	if (rc)
		goto out_closefd;
	*out = s;
	return 0;
out_closefd:
	if (s->lockfd >= 0)
		close(s->lockfd);
	close(s->dirfd);
out_free:
	free(s->path);
	free(s);
	return rc;
}

int ckv_store_open_rebuild(const char *path, ckv_store **out, ckv_err *e)
{
	static const char *const files[] = { "index/data.mdb", "index/lock.mdb" };
	int rc = ckv_store_open(path, out, e), dfd;

	/* only an index LMDB or our version check rejected; not "no such store" */
	if (rc != -EUCLEAN && rc != -EPROTONOSUPPORT && rc != -EIO && rc != -EINVAL)
		return rc;
	dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return ckv_errf(e, -errno, "%s: %s", path, strerror(errno));
	for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
		if (unlinkat(dfd, files[i], 0) < 0 && errno != ENOENT) {
			rc = ckv_errf(e, -errno, "%s/%s: cannot remove the damaged index: %s", path,
				      files[i], strerror(errno));
			close(dfd);
			return rc;
		}
	}
	close(dfd);
	return ckv_store_open(path, out, e);
}

void ckv_store_close(ckv_store *s)
{
	if (!s)
		return;
	if (s->no_sync) {
		sync(); /* what was written without fsync reaches the disk before we say done */
		mdb_env_sync(s->env, 1);
	}
	mdb_env_close(s->env);
	close(s->lockfd);
	close(s->dirfd);
	free(s->path);
	free(s);
}

void ckv_store_set_nosync(ckv_store *s, bool no_sync)
{
	s->no_sync = no_sync;
	mdb_env_set_flags(s->env, MDB_NOSYNC, no_sync ? 1 : 0);
}

const char *ckv_store_path(const ckv_store *s)
{
	return s->path;
}

int ckv_store_dirfd(const ckv_store *s)
{
	return s->dirfd;
}

/* ---- index records ------------------------------------------------------------- */

static void be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static uint32_t lbe32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void chain_key(uint8_t k[24], uint64_t seed, const ckv_hash *h)
{
	ckv_sum_store(k, seed);
	memcpy(k + 8, h->b, 16);
}

/*
 * Index rows besides prefix records:
 *   chain   seed[8 BE] h[16] -> struct link_hdr + segment id: where the chunk
 *           whose chain hash is h lives. One link per hash: the first live
 *           segment that stored it. A segment's links go when it dies.
 *   seg     segment id -> struct seg_row + the chain hash of each of its chunks
 *   segref  segment id '\0' prefix[16] -> u32: the prefix uses chunks [0, n)
 * So a child that shares 2,000 chunks with its parent adds one segref row,
 * not 2,000 links, and match finds a live prefix through segref.
 */
struct link_hdr {
	uint32_t idx;  /* chunk inside the segment */
	uint32_t ntok; /* tokens in that chunk */
};

struct seg_row {
	uint32_t refs;  /* prefixes referencing it (segref rows) */
	uint32_t chunks;
	uint64_t seed;
	uint32_t chunk_tokens, last_ntok;
	/* followed by chunks x 16 bytes of chain hashes */
};

struct link {
	uint32_t idx, ntok;
	char seg[80];
};

static int link_get(ckv_store *s, MDB_txn *txn, uint64_t seed, const ckv_hash *h, struct link *out)
{
	uint8_t key[24];
	MDB_val k = { 24, key }, v;
	size_t idl;
	int rc;
	chain_key(key, seed, h);
	rc = mdb_get(txn, s->db_chain, &k, &v);
	if (rc)
		return mdb_errno(rc);
	idl = v.mv_size - sizeof(struct link_hdr);
	if (v.mv_size <= sizeof(struct link_hdr) || idl >= sizeof(out->seg))
		return -EUCLEAN;
	memcpy(out, v.mv_data, sizeof(struct link_hdr));
	memcpy(out->seg, (const char *)v.mv_data + sizeof(struct link_hdr), idl);
	out->seg[idl] = 0;
	return 0;
}

/* Row of a segment; *links points into LMDB memory, valid for the txn. */
static int seg_get(ckv_store *s, MDB_txn *txn, const char *id, struct seg_row *row,
		   const uint8_t **links)
{
	MDB_val k = { strlen(id), (void *)id }, v;
	int rc = mdb_get(txn, s->db_seg, &k, &v);
	if (rc)
		return mdb_errno(rc);
	if (v.mv_size < sizeof(*row))
		return -EUCLEAN;
	memcpy(row, v.mv_data, sizeof(*row));
	if (v.mv_size != sizeof(*row) + (size_t)row->chunks * 16)
		return -EUCLEAN;
	if (links)
		*links = (const uint8_t *)v.mv_data + sizeof(*row);
	return 0;
}

static int seg_put(ckv_store *s, MDB_txn *txn, const char *id, const struct seg_row *row,
		   const uint8_t *links)
{
	MDB_val k = { strlen(id), (void *)id }, v;
	size_t len = sizeof(*row) + (size_t)row->chunks * 16;
	int rc;
	v.mv_size = len;
	rc = mdb_put(txn, s->db_seg, &k, &v, MDB_RESERVE);
	if (rc)
		return mdb_errno(rc);
	memcpy(v.mv_data, row, sizeof(*row));
	if (links != (const uint8_t *)v.mv_data + sizeof(*row))
		memmove((uint8_t *)v.mv_data + sizeof(*row), links, (size_t)row->chunks * 16);
	return 0;
}

static size_t segref_key(uint8_t *k, const char *segid, const ckv_hash *prefix)
{
	size_t n = strlen(segid);
	memcpy(k, segid, n);
	k[n] = 0;
	memcpy(k + n + 1, prefix->b, 16);
	return n + 17;
}

/* A live prefix using chunk idx of segment segid. */
static int covering_prefix(ckv_store *s, MDB_txn *txn, const char *segid, uint32_t idx,
			   ckv_hash *out)
{
	uint8_t key[128];
	size_t n = strlen(segid);
	MDB_cursor *cur;
	MDB_val k, v;
	int rc;
	memcpy(key, segid, n);
	key[n] = 0;
	k.mv_size = n + 1;
	k.mv_data = key;
	rc = mdb_cursor_open(txn, s->db_segref, &cur);
	if (rc)
		return mdb_errno(rc);
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0;
	     rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		uint32_t covered;
		if (k.mv_size != n + 17 || memcmp(k.mv_data, key, n + 1) != 0) {
			rc = MDB_NOTFOUND;
			break;
		}
		if (v.mv_size != 4)
			continue;
		memcpy(&covered, v.mv_data, 4);
		if (covered > idx) {
			memcpy(out->b, (const uint8_t *)k.mv_data + n + 1, 16);
			break;
		}
	}
	mdb_cursor_close(cur);
	return mdb_errno(rc);
}

/* Delete the links that point into segment id (it died). */
static int links_drop(ckv_store *s, MDB_txn *txn, const char *id)
{
	struct seg_row row;
	const uint8_t *links;
	uint8_t *copy;
	int rc = seg_get(s, txn, id, &row, &links);
	if (rc)
		return rc == -ENOENT ? 0 : rc;
	copy = malloc((size_t)row.chunks * 16 + 1);
	if (!copy)
		return -ENOMEM;
	memcpy(copy, links, (size_t)row.chunks * 16);
	for (uint32_t i = 0; i < row.chunks; i++) {
		ckv_hash h;
		struct link l;
		uint8_t key[24];
		MDB_val k = { 24, key };
		memcpy(h.b, copy + 16 * (size_t)i, 16);
		if (link_get(s, txn, row.seed, &h, &l) || strcmp(l.seg, id) || l.idx != i)
			continue;
		chain_key(key, row.seed, &h);
		if ((rc = mdb_del(txn, s->db_chain, &k, NULL)) && rc != MDB_NOTFOUND) {
			free(copy);
			return mdb_errno(rc);
		}
	}
	free(copy);
	return 0;
}

/* Point the chain hashes of segment id at it, where no live segment has them. */
static int links_add(ckv_store *s, MDB_txn *txn, const char *id, const struct seg_row *row,
		     const uint8_t *links)
{
	size_t idl = strlen(id);
	uint8_t val[sizeof(struct link_hdr) + 80];
	for (uint32_t i = 0; i < row->chunks; i++) {
		ckv_hash h;
		struct link l;
		struct seg_row other;
		struct link_hdr lh = { i, i + 1 == row->chunks ? row->last_ntok : row->chunk_tokens };
		uint8_t key[24];
		MDB_val k = { 24, key }, v = { sizeof(lh) + idl, val };
		int rc;
		memcpy(h.b, links + 16 * (size_t)i, 16);
		if (!memcmp(h.b, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 16))
			continue; /* unknown (reindex of a partly referenced segment) */
		if (link_get(s, txn, row->seed, &h, &l) == 0 &&
		    seg_get(s, txn, l.seg, &other, NULL) == 0 && other.refs > 0)
			continue;
		memcpy(val, &lh, sizeof(lh));
		memcpy(val + sizeof(lh), id, idl);
		chain_key(key, row->seed, &h);
		if ((rc = mdb_put(txn, s->db_chain, &k, &v, 0)))
			return mdb_errno(rc);
	}
	return 0;
}

/*
 * Add prefix m's reference to each segment it names (covering [0, first+count)).
 * new_id, when set, is a segment this publish wrote: its row is created with
 * links (chain hashes of prefix chunks new_first..).
 */
static int refs_add(ckv_store *s, MDB_txn *txn, const ckv_manifest *m, const ckv_hash *chain,
		    const char *new_id, uint32_t new_first, bool strict)
{
	uint32_t pos = 0;
	for (uint32_t i = 0; i < m->nextents; pos += m->extents[i].count, i++) {
		const ckv_extent *x = &m->extents[i];
		struct seg_row row;
		const uint8_t *links = NULL;
		uint8_t *fresh = NULL, key[128];
		uint32_t covered = x->first + x->count, old;
		bool revive = false;
		MDB_val k, v;
		int rc = seg_get(s, txn, x->segment, &row, &links);

		if (rc == -ENOENT && new_id && !strcmp(new_id, x->segment)) {
			uint32_t c = m->geom.chunk_tokens;
			memset(&row, 0, sizeof(row));
			row.chunks = m->chunks - new_first;
			row.seed = m->geom.seed;
			row.chunk_tokens = c;
			row.last_ntok = m->tokens - (m->chunks - 1) * c;
			fresh = malloc((size_t)row.chunks * 16);
			if (!fresh)
				return -ENOMEM;
			for (uint32_t q = 0; q < row.chunks; q++)
				memcpy(fresh + 16 * (size_t)q, chain[new_first + q].b, 16);
			links = fresh;
		} else if (rc == -ENOENT) {
			return -EAGAIN; /* gone (gc ran between our look-up and now) */
		} else if (rc) {
			return rc;
		} else if (row.refs == 0) {
			/*
			 * Unreferenced but not yet collected: publishers hold the
			 * store lock shared and gc takes it exclusively, so its
			 * files are whole. Revive it, links included.
			 */
			revive = strict; /* reindex adds every link at the end */
		}
		if (covered > row.chunks) {
			free(fresh);
			return -EUCLEAN;
		}
		k.mv_size = segref_key(key, x->segment, &m->hash);
		k.mv_data = key;
		if (mdb_get(txn, s->db_segref, &k, &v) == 0 && v.mv_size == 4) {
			memcpy(&old, v.mv_data, 4);
			if (old > covered)
				covered = old;
		} else {
			row.refs++;
		}
		v.mv_size = 4;
		v.mv_data = &covered;
		if ((rc = mdb_put(txn, s->db_segref, &k, &v, 0)) ||
		    (rc = seg_put(s, txn, x->segment, &row, links))) {
			free(fresh);
			return rc > 0 ? mdb_errno(rc) : rc;
		}
		if (fresh || revive) {
			const uint8_t *l = fresh;
			if (!l && (rc = seg_get(s, txn, x->segment, &row, &l)))
				return rc;
			rc = links_add(s, txn, x->segment, &row, l);
			free(fresh);
			if (rc)
				return rc;
		}
	}
	(void)pos;
	return 0;
}

/* Drop prefix m's references; segments left unreferenced lose their links. */
static int refs_drop(ckv_store *s, MDB_txn *txn, const ckv_manifest *m)
{
	for (uint32_t i = 0; i < m->nextents; i++) {
		const ckv_extent *x = &m->extents[i];
		struct seg_row row;
		const uint8_t *links;
		uint8_t key[128];
		MDB_val k = { segref_key(key, x->segment, &m->hash), key };
		int rc = mdb_del(txn, s->db_segref, &k, NULL);
		if (rc == MDB_NOTFOUND)
			continue; /* named twice, already dropped */
		if (rc)
			return mdb_errno(rc);
		if ((rc = seg_get(s, txn, x->segment, &row, &links)))
			continue;
		if (row.refs)
			row.refs--;
		if ((rc = seg_put(s, txn, x->segment, &row, links)))
			return rc;
		if (row.refs == 0 && (rc = links_drop(s, txn, x->segment)))
			return rc;
	}
	return 0;
}

static int get_record(ckv_store *s, MDB_txn *txn, const ckv_hash *h, ckv_manifest *m, ckv_err *e)
{
	MDB_val k = { 16, (void *)h->b }, v;
	char hex[CKV_HASH_HEX + 1];
	int rc = mdb_get(txn, s->db_prefix, &k, &v);
	if (rc)
		return mdb_errno(rc);
	ckv_hash_hex(h, hex);
	return ckv_manifest_parse(m, v.mv_data, v.mv_size, true, hex, e);
}

static int bump_generation(ckv_store *s, MDB_txn *txn)
{
	MDB_val k = { 10, (void *)"generation" }, v;
	uint64_t g = 0;
	if (mdb_get(txn, s->db_meta, &k, &v) == 0 && v.mv_size == 8)
		memcpy(&g, v.mv_data, 8);
	g++;
	v.mv_size = 8;
	v.mv_data = &g;
	return mdb_errno(mdb_put(txn, s->db_meta, &k, &v, 0));
}

int ckv_store_generation(ckv_store *s, uint64_t *gen, uint64_t *nprefixes)
{
	MDB_txn *txn;
	MDB_val k = { 10, (void *)"generation" }, v;
	MDB_stat st;
	int rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn);
	if (rc)
		return mdb_errno(rc);
	*gen = 0;
	if (mdb_get(txn, s->db_meta, &k, &v) == 0 && v.mv_size == 8)
		memcpy(gen, v.mv_data, 8);
	if (nprefixes) {
		mdb_stat(txn, s->db_prefix, &st);
		*nprefixes = st.ms_entries;
	}
	mdb_txn_abort(txn);
	return 0;
}

int ckv_store_get(ckv_store *s, const ckv_hash *h, ckv_manifest **out, ckv_err *e)
{
	MDB_txn *txn;
	ckv_manifest *m;
	char hex[CKV_HASH_HEX + 1];
	int rc;

	m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn);
	if (rc) {
		free(m);
		return mdb_errno(rc);
	}
	rc = get_record(s, txn, h, m, e);
	mdb_txn_abort(txn);
	if (rc) {
		free(m);
		if (rc == -ENOENT) {
			ckv_hash_hex(h, hex);
			ckv_errf(e, rc, "%s: no such prefix in %s", hex, s->path);
		}
		return rc;
	}
	*out = m;
	return 0;
}

int ckv_store_list(ckv_store *s, ckv_prefix_fn fn, void *arg)
{
	MDB_txn *txn;
	MDB_cursor *cur;
	MDB_val k, v;
	int rc, op = MDB_FIRST;

	/* Copy out in batches so the read transaction stays short. */
	uint8_t last[16];
	bool have_last = false;
	for (;;) {
		ckv_manifest batch[64];
		int nb = 0;
		rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn);
		if (rc)
			return mdb_errno(rc);
		rc = mdb_cursor_open(txn, s->db_prefix, &cur);
		if (rc) {
			mdb_txn_abort(txn);
			return mdb_errno(rc);
		}
		if (have_last) {
			k.mv_size = 16;
			k.mv_data = last;
			rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
			if (rc == 0 && k.mv_size == 16 && memcmp(k.mv_data, last, 16) == 0)
				rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
		} else {
			rc = mdb_cursor_get(cur, &k, &v, op);
		}
		while (rc == 0 && nb < 64) {
			if (ckv_manifest_parse(&batch[nb], v.mv_data, v.mv_size, true, "index", NULL) == 0)
				nb++;
			memcpy(last, k.mv_data, 16);
			have_last = true;
			rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
		}
		mdb_cursor_close(cur);
		mdb_txn_abort(txn);
		bool more = rc == 0;
		int stop = 0;
		for (int i = 0; i < nb; i++) {
			if (!stop)
				stop = fn(arg, &batch[i]);
			ckv_manifest_free(&batch[i]);
		}
		if (stop)
			return stop;
		if (!more)
			return 0;
	}
}

/* ---- match ---------------------------------------------------------------------- */

/* A stored chunk with chain hash h, used by a live prefix (*prefix). */
static int chain_lookup(ckv_store *s, MDB_txn *txn, uint64_t seed, const ckv_hash *h,
			ckv_hash *prefix, struct link *l)
{
	int rc = link_get(s, txn, seed, h, l);
	if (rc)
		return rc;
	return covering_prefix(s, txn, l->seg, l->idx, prefix);
}

/*
 * Largest j < limit with chain[j] stored, by binary search; -1 if none.
 * Relies on: chain[j] stored implies chain[i] stored for i < j (a prefix
 * stores every chunk before its last).
 */
static int64_t chain_search(ckv_store *s, MDB_txn *txn, uint64_t seed, const ckv_hash *chain,
			    uint32_t limit, ckv_hash *hit, uint32_t *lookups)
{
	int64_t lo = 0, hi = (int64_t)limit - 1, best = -1;
	struct link l;
	ckv_hash p;
	while (lo <= hi) {
		int64_t mid = lo + (hi - lo) / 2;
		(*lookups)++;
		if (chain_lookup(s, txn, seed, &chain[mid], &p, &l) == 0) {
			best = mid;
			*hit = p;
			lo = mid + 1;
		} else {
			hi = mid - 1;
		}
	}
	return best;
}

int ckv_store_match(ckv_store *s, const ckv_geom *g, const uint32_t *tokens, uint32_t n,
		    ckv_hash *h, uint32_t *matched, uint32_t *lookups)
{
	uint32_t c = g->chunk_tokens, m = ckv_chunks_for(n, c), full = n / c;
	ckv_hash *chain, hit;
	MDB_txn *txn;
	uint32_t lk = 0;
	int64_t j;
	int rc;

	*matched = 0;
	if (n == 0)
		goto out_none;
	chain = malloc(sizeof(*chain) * m);
	if (!chain)
		return -ENOMEM;
	ckv_chain(g, tokens, n, chain);
	rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn);
	if (rc) {
		free(chain);
		return mdb_errno(rc);
	}
	j = chain_search(s, txn, g->seed, chain, full, &hit, &lk);
	if (j >= 0)
		*matched = (uint32_t)(j + 1) * c;
	/* The tail: a stored prefix may end inside the next chunk. */
	{
		uint32_t base = (uint32_t)(j + 1) * c;
		/* a whole next chunk was ruled out by the search; a partial one was not */
		uint32_t avail = n - base < c ? n - base : c - 1;
		for (uint32_t k = avail; k >= 1 && base < n; k--) {
			ckv_hash t, p;
			struct link l;
			ckv_chain_step(j >= 0 ? &chain[j] : NULL, tokens + base, k, g->seed, &t);
			lk++;
			if (chain_lookup(s, txn, g->seed, &t, &p, &l) == 0) {
				hit = p;
				*matched = base + k;
				break;
			}
		}
	}
	mdb_txn_abort(txn);
	free(chain);
	if (*matched)
		*h = hit;
out_none:
	if (lookups)
		*lookups = lk;
	return 0;
}

/* ---- publish ------------------------------------------------------------------ */

static void maybe_crash(const ckv_import_opts *o, const char *stage)
{
	const char *at = o && o->crash_at ? o->crash_at : getenv("CKV_CRASH_AT");
	if (at && strcmp(at, stage) == 0)
		kill(getpid(), SIGKILL);
}

struct publish_src {
	ckv_chunk_fill_fn fill;
	void *arg;
	/* Called once the shared chunk count is known, before anything is written. */
	int (*check_shared)(void *arg, uint32_t shared, ckv_err *e);
	const ckv_manifest *times; /* file times to keep, or NULL */
};

static void progress(const ckv_import_opts *o, const char *what, uint64_t done, uint64_t total)
{
	if (o && o->progress)
		o->progress(o->progress_arg, what, done, total);
}

/*
 * Create dir/name (must not exist), write header and body, fsync it. Segment
 * files are written once and never changed: mode 0444.
 */
static int write_new_file(ckv_store *s, int dirfd, const char *dir, const char *name,
			  const void *hdr, size_t hlen, const void *body, size_t blen, ckv_err *e)
{
	char path[600];
	int fd, rc;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = openat(dirfd, path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444);
	if (fd < 0)
		return ckv_errf(e, -errno, "%s: %s", path, strerror(errno));
	rc = hlen ? write_all(fd, hdr, hlen, 0) : 0;
	if (!rc)
		rc = write_all(fd, body, blen, (off_t)hlen);
	if (!rc && sync_fd(s, fd) < 0)
		rc = -errno;
	close(fd);
	return rc ? ckv_errf(e, rc, "%s: %s", path, strerror(-rc)) : 0;
}

/* The header of a segment's side file of the given magic (docs/FORMAT.md §5). */
static void side_header(const char *magic, const ckv_geom *g, uint32_t chunks,
			uint8_t out[CKV_SIDE_HEADER])
{
	ckv_side_header sh;

	memset(&sh, 0, sizeof(sh));
	memcpy(sh.magic, magic, 8);
	sh.version = CKV_FORMAT_VERSION;
	sh.layers = g->layers;
	sh.chunks = chunks;
	if (!strcmp(magic, CKV_SUMS_MAGIC)) {
		sh.per_chunk = 1;
	} else if (!strcmp(magic, CKV_HALVES_MAGIC)) {
		sh.per_chunk = 2;
	} else if (!strcmp(magic, CKV_DIGEST_MAGIC)) {
		sh.per_chunk = g->kv_heads * g->head_dim;
	} else {
		sh.per_chunk = (uint32_t)ckv_keyq_chunk_bytes(g, CKV_KEYQ_BITS);
		sh.reserved = CKV_KEYQ_BITS;
	}
	ckv_side_header_encode(&sh, out);
}

/* Shared by the layer workers of write_segment. */
struct seg_writer {
	ckv_store *s;
	int dirfd;
	const char *rel;
	const ckv_geom *g;
	uint32_t n, s0, m, k;
	const struct publish_src *src;
	const ckv_import_opts *o;
	uint8_t *sums;
	uint8_t *halves; /* [layer][chunk][K, V] */
	float *dig;
	uint8_t *keyq;          /* [layer] ckv_keyq_layer_bytes(g, CKV_KEYQ_BITS, k) */
	pthread_mutex_t lock;   /* protects next, done, rc, e and progress calls */
	uint32_t next;          /* next layer to write */
	uint64_t done, total;
	int rc;                 /* first error */
	ckv_err *e;
};

/*
 * The layer's key copy (keyq.bin): scales from the sums of the layer's keys,
 * then the codes of every chunk, read back from the layer file just written.
 */
#define KEYQ_KEEP_MAX (64u << 20) /* a layer's K halves kept in memory for the key copy, at most */

/*
 * Chunks of a layer file read back in runs (buf: IO_RUN worth of chunks):
 * with sum, their keys' sums are added; else each chunk's codes go to
 * codes. k chunks holding ntok tokens, chunk i at i * chunk_bytes.
 */
static int keyq_pass(const ckv_geom *g, int fd, uint32_t k, uint64_t ntok, uint8_t *buf, double *sum,
		     const uint16_t *scales, uint8_t *codes)
{
	uint64_t cb = g->chunk_bytes, per = ckv_keyq_chunk_bytes(g, CKV_KEYQ_BITS);
	uint32_t run = (uint32_t)(IO_RUN / cb) ? (uint32_t)(IO_RUN / cb) : 1, c = g->chunk_tokens;
	size_t HD = (size_t)g->kv_heads * g->head_dim;

	for (uint32_t j = 0; j < k; j += run) {
		uint32_t cnt = k - j < run ? k - j : run;
		ssize_t got = pread(fd, buf, (size_t)cnt * cb, (off_t)j * (off_t)cb);

		if (got != (ssize_t)((size_t)cnt * cb))
			return got < 0 ? -errno : -EIO;
		for (uint32_t i = 0; i < cnt; i++) {
			uint32_t jj = j + i, valid = (jj + 1) * (uint64_t)c <= ntok ? c : (uint32_t)(ntok - (uint64_t)jj * c);

			if (sum)
				ckv_keyq_stats_add(g, buf + (size_t)i * cb, valid, sum, sum + HD);
			else
				ckv_keyq_encode(g, CKV_KEYQ_BITS, scales, buf + (size_t)i * cb, valid, codes + (size_t)jj * per);
		}
	}
	return 0;
}

/*
 * One layer of keyq.bin into out (ckv_keyq_layer_bytes): the scales, then
 * the codes of k chunks holding ntok tokens. The keys' sums come from sum
 * (gathered while the layer was written) or from a pass over the layer file
 * fd; the codes from kmem (the chunks' K halves, kept) or from the file.
 */
static int keyq_layer_build(const ckv_geom *g, int fd, uint32_t k, uint64_t ntok, const double *sum,
			    const uint8_t *kmem, uint8_t *buf, uint8_t *out)
{
	uint64_t per = ckv_keyq_chunk_bytes(g, CKV_KEYQ_BITS);
	uint32_t c = g->chunk_tokens;
	size_t HD = (size_t)g->kv_heads * g->head_dim;
	uint16_t *scales = malloc(sizeof(*scales) * 2 * HD);
	double *own = sum ? NULL : calloc(2 * HD, sizeof(double));
	int rc = 0;

	if (!scales || (!sum && !own)) {
		rc = -ENOMEM;
		goto out;
	}
	if (!sum) {
		rc = keyq_pass(g, fd, k, ntok, buf, own, NULL, NULL);
		if (rc)
			goto out;
		sum = own;
	}
	ckv_keyq_scales(g, sum, sum + HD, ntok, scales);
	for (size_t i = 0; i < 2 * HD; i++) { /* bf16 little-endian */
		out[2 * i] = (uint8_t)scales[i];
		out[2 * i + 1] = (uint8_t)(scales[i] >> 8);
	}
	out += 4 * HD;
	if (!kmem) {
		rc = keyq_pass(g, fd, k, ntok, buf, NULL, scales, out);
		goto out;
	}
	for (uint32_t jj = 0; jj < k; jj++) {
		uint32_t valid = (jj + 1) * (uint64_t)c <= ntok ? c : (uint32_t)(ntok - (uint64_t)jj * c);

		ckv_keyq_encode(g, CKV_KEYQ_BITS, scales, kmem + (size_t)jj * g->half_bytes, valid,
				out + (size_t)jj * per);
	}
out:
	free(scales);
	free(own);
	return rc;
}

/* Write one layer file of the segment: fill, checksum, digest, write, key copy, fsync. */
static int write_layer(struct seg_writer *w, uint32_t l, uint8_t *buf, ckv_err *e)
{
	const ckv_geom *g = w->g;
	uint64_t cb = g->chunk_bytes;
	uint32_t run = (uint32_t)(IO_RUN / cb) ? (uint32_t)(IO_RUN / cb) : 1, c = g->chunk_tokens;
	size_t dper = (size_t)g->kv_heads * g->head_dim;
	double *sum = calloc(2 * dper, sizeof(double)), *sumsq = sum + dper;
	uint64_t kbytes = (uint64_t)(w->m - w->s0) * g->half_bytes;
	/* else read back; CKV_TEST_KEYQ_READBACK=1 takes that path always (tests) */
	uint8_t *kmem = kbytes <= KEYQ_KEEP_MAX && !getenv("CKV_TEST_KEYQ_READBACK") ?
				malloc(kbytes ? kbytes : 1) : NULL;
	char name[32], path[600];
	int fd, rc = 0;

	ckv_layer_name(l, name);
	snprintf(path, sizeof(path), "%s/%s", w->rel, name);
	if (!sum) {
		free(kmem);
		return ckv_errf(e, -ENOMEM, "%s: out of memory", path);
	}
	fd = openat(w->dirfd, path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0444);
	if (fd < 0) {
		free(sum);
		free(kmem);
		return ckv_errf(e, -errno, "%s: %s", path, strerror(errno));
	}
	for (uint32_t j = w->s0; j < w->m; j += run) {
		uint32_t cnt = w->m - j < run ? w->m - j : run;
		memset(buf, 0, (size_t)cnt * cb);
		rc = w->src->fill(w->src->arg, l, j, cnt, buf);
		if (rc < 0)
			goto out_close;
		for (uint32_t i = 0; i < cnt; i++) {
			uint32_t jj = j + i, valid = (jj + 1) * (uint64_t)c <= w->n ? c : w->n - jj * c;
			uint8_t *ch = buf + (size_t)i * cb;
			size_t idx = (size_t)l * w->k + (jj - w->s0);
			ckv_sum_store(w->sums + idx * 8, ckv_chunk_sum(ch, cb));
			ckv_sum_store(w->halves + idx * 16, ckv_chunk_sum(ch, g->half_bytes));
			ckv_sum_store(w->halves + idx * 16 + 8, ckv_chunk_sum(ch + g->half_bytes, g->half_bytes));
			ckv_chunk_digest(g, ch, valid, w->dig + idx * dper);
			ckv_keyq_stats_add(g, ch, valid, sum, sumsq);
			if (kmem)
				memcpy(kmem + (size_t)(jj - w->s0) * g->half_bytes, ch, g->half_bytes);
		}
		rc = write_all(fd, buf, (size_t)cnt * cb, (off_t)(j - w->s0) * (off_t)cb);
		if (rc) {
			rc = ckv_errf(e, rc, "%s: write: %s", path, strerror(-rc));
			goto out_close;
		}
		pthread_mutex_lock(&w->lock);
		w->done += (uint64_t)cnt * cb;
		progress(w->o, "import", w->done, w->total);
		rc = w->rc;
		pthread_mutex_unlock(&w->lock);
		if (rc)
			goto out_close; /* another layer failed: stop early */
	}
	rc = keyq_layer_build(g, fd, w->k, w->n - (uint64_t)w->s0 * c, sum, kmem, buf,
			      w->keyq + (size_t)l * ckv_keyq_layer_bytes(g, CKV_KEYQ_BITS, w->k));
	if (rc)
		rc = ckv_errf(e, rc, "%s: key copy: %s", path, strerror(-rc));
	if (rc == 0 && sync_fd(w->s, fd) < 0)
		rc = ckv_errf(e, -errno, "%s: fsync: %s", path, strerror(errno));
out_close:
	close(fd);
	free(sum);
	free(kmem);
	return rc;
}

static void *layer_worker(void *arg)
{
	struct seg_writer *w = arg;
	uint64_t cb = w->g->chunk_bytes;
	uint32_t run = (uint32_t)(IO_RUN / cb) ? (uint32_t)(IO_RUN / cb) : 1;
	uint8_t *buf = aligned_alloc(CKV_ALIGN, (size_t)run * cb);
	ckv_err e;

	for (;;) {
		uint32_t l;
		int rc;
		pthread_mutex_lock(&w->lock);
		if (!buf && !w->rc)
			w->rc = -ENOMEM;
		l = w->rc ? w->g->layers : w->next++;
		pthread_mutex_unlock(&w->lock);
		if (l >= w->g->layers)
			break;
		e.msg[0] = 0; /* a failing fill reports into its own context */
		rc = write_layer(w, l, buf, &e);
		if (rc) {
			pthread_mutex_lock(&w->lock);
			if (!w->rc) {
				w->rc = rc;
				if (w->e)
					*w->e = e;
			}
			pthread_mutex_unlock(&w->lock);
		}
	}
	free(buf);
	return NULL;
}

/*
 * Write chunks [s0, m) of the prefix as a segment directory at dirfd/rel.
 * Layers are independent files: up to IMPORT_THREADS workers write them in
 * parallel (hashing, digests and copies are CPU work that one core can't
 * keep up with against a fast disk).
 */
#define IMPORT_THREADS 4
static int write_segment(ckv_store *s, int dirfd, const char *rel, const ckv_geom *g,
			 const uint32_t *tokens, uint32_t n, uint32_t s0, uint32_t m,
			 const struct publish_src *src, const ckv_import_opts *o, uint64_t *written,
			 ckv_err *e)
{
	uint32_t k = m - s0, c = g->chunk_tokens;
	uint64_t cb = g->chunk_bytes, total = (uint64_t)k * cb * g->layers;
	size_t dper = (size_t)g->kv_heads * g->head_dim;
	uint8_t *sums = NULL, *halves = NULL, *keyq = NULL, hdr[CKV_SIDE_HEADER];
	uint64_t kql = ckv_keyq_layer_bytes(g, CKV_KEYQ_BITS, m - s0);
	float *dig = NULL;
	struct seg_writer w;
	pthread_t th[IMPORT_THREADS];
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	int nth, started = 0, rc;

	if (mkdirat(dirfd, rel, 0755) < 0)
		return ckv_errf(e, -errno, "%s: cannot create segment directory: %s", rel, strerror(errno));
	sums = malloc((size_t)k * g->layers * 8);
	halves = malloc((size_t)k * g->layers * 16);
	dig = malloc(sizeof(float) * dper * k * g->layers);
	keyq = malloc(kql * g->layers);
	if (!sums || !halves || !dig || !keyq) {
		rc = -ENOMEM;
		goto out_free;
	}
	memset(&w, 0, sizeof(w));
	w.halves = halves;
	w.s = s;
	w.dirfd = dirfd;
	w.rel = rel;
	w.g = g;
	w.n = n;
	w.s0 = s0;
	w.m = m;
	w.k = k;
	w.src = src;
	w.o = o;
	w.sums = sums;
	w.dig = dig;
	w.keyq = keyq;
	w.total = total;
	w.e = e;
	pthread_mutex_init(&w.lock, NULL);
	nth = ncpu < 1 ? 1 : ncpu > IMPORT_THREADS ? IMPORT_THREADS : (int)ncpu;
	if ((uint32_t)nth > g->layers)
		nth = (int)g->layers;
	for (int i = 1; i < nth; i++)
		if (pthread_create(&th[i], NULL, layer_worker, &w) == 0)
			started++;
	layer_worker(&w);
	for (int i = 1; i <= started; i++)
		pthread_join(th[i], NULL);
	pthread_mutex_destroy(&w.lock);
	rc = w.rc;
	if (rc)
		goto out_free;
	*written = total;

	/* tokens.bin of the segment */
	{
		uint32_t t0 = s0 * c, nt = n - t0;
		uint8_t *tb = malloc((size_t)nt * 4);
		if (!tb) {
			rc = -ENOMEM;
			goto out_free;
		}
		ckv_tokens_to_le(tb, tokens + t0, nt);
		rc = write_new_file(s, dirfd, rel, "tokens.bin", NULL, 0, tb, (size_t)nt * 4, e);
		free(tb);
		if (rc)
			goto out_free;
	}
	/* sums.xxh3, halves.xxh3, digest.bin and keyq.bin */
	for (int which = 0; which < 4; which++) {
		static const char *const magic[] = { CKV_SUMS_MAGIC, CKV_HALVES_MAGIC, CKV_DIGEST_MAGIC,
						     CKV_KEYQ_MAGIC };
		static const char *const fname[] = { "sums.xxh3", "halves.xxh3", "digest.bin", "keyq.bin" };
		const void *data[] = { sums, halves, dig, keyq };
		size_t len[] = { 8ull * k * g->layers, 16ull * k * g->layers,
				 sizeof(float) * dper * k * g->layers, kql * g->layers };
		side_header(magic[which], g, k, hdr);
		rc = write_new_file(s, dirfd, rel, fname[which], hdr, sizeof(hdr), data[which],
				    len[which], e);
		if (rc)
			goto out_free;
	}
	rc = fsync_dir(s, dirfd, rel);
out_free:
	free(halves);
	free(sums);
	free(dig);
	free(keyq);
	return rc;
}

/* Take chunks [0, count) of prefix p as extents. */
static int extents_prefix(const ckv_manifest *p, uint32_t count, ckv_extent *out, uint32_t *n)
{
	uint32_t left = count, k = 0;
	for (uint32_t i = 0; i < p->nextents && left; i++) {
		out[k] = p->extents[i];
		if (out[k].count > left)
			out[k].count = left;
		left -= out[k].count;
		k++;
	}
	*n = k;
	return left ? -EUCLEAN : 0;
}

static int staging_create(ckv_store *s, char *rel, size_t len, int *lockfd, ckv_err *e)
{
	char lk[600];
	for (int tries = 0; tries < 100; tries++) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		snprintf(rel, len, "staging/%d-%08lx-%d", (int)getpid(),
			 (unsigned long)(ts.tv_nsec ^ (ts.tv_sec << 12)), tries);
		if (mkdirat(s->dirfd, rel, 0755) == 0)
			break;
		if (errno != EEXIST)
			return ckv_errf(e, -errno, "%s/%s: %s", s->path, rel, strerror(errno));
	}
	snprintf(lk, sizeof(lk), "%s/.lock", rel);
	*lockfd = openat(s->dirfd, lk, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (*lockfd < 0 || flock(*lockfd, LOCK_EX) < 0) {
		int err = errno;
		if (*lockfd >= 0)
			close(*lockfd);
		rm_tree(s->dirfd, rel, NULL);
		return ckv_errf(e, -err, "%s/%s: %s", s->path, rel, strerror(err));
	}
	return 0;
}

static bool segment_indexed(ckv_store *s, const char *id)
{
	MDB_txn *txn;
	bool yes;
	if (mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn))
		return false;
	yes = seg_get(s, txn, id, &(struct seg_row){ 0 }, NULL) == 0;
	mdb_txn_abort(txn);
	return yes;
}

/*
 * The LMDB transaction that makes the prefix visible. -EAGAIN: retry without dedup.
 * The record file prefix/xx/<hash>.json is written inside it, after the check that
 * the prefix is not stored yet: LMDB's writer lock serializes publishers, so two
 * imports of one prefix (maybe with different dedup bases, so other extents)
 * cannot leave a file that says other than the index.
 */
static int commit_prefix(ckv_store *s, const ckv_manifest *m, const ckv_hash *chain,
			 const char *newseg, uint32_t newseg_first, const char *record,
			 size_t reclen, const char *pdir, const char *pname,
			 const ckv_import_opts *o, bool *existed, ckv_err *e)
{
	MDB_txn *txn;
	MDB_val k, v;
	int rc;

	rc = mdb_txn_begin(s->env, NULL, 0, &txn);
	if (rc)
		return mdb_errno(rc);
	k.mv_size = 16;
	k.mv_data = (void *)m->hash.b;
	if (mdb_get(txn, s->db_prefix, &k, &v) == 0) {
		*existed = true;
		rc = 0;
		goto out_abort;
	}
	/* Every referenced segment must still be alive (gc may have run). */
	rc = refs_add(s, txn, m, chain, newseg, newseg_first, true);
	if (rc)
		goto out_abort;
	v.mv_size = reclen;
	v.mv_data = (void *)record;
	if ((rc = mdb_put(txn, s->db_prefix, &k, &v, 0)) || (rc = bump_generation(s, txn))) {
		rc = rc > 0 ? mdb_errno(rc) : rc;
		goto out_abort;
	}
	mkdirat(s->dirfd, pdir, 0755);
	rc = write_file_atomic(s, o, s->dirfd, pdir, pname, record, reclen);
	if (rc) {
		rc = ckv_errf(e, rc, "%s/%s/%s: %s", s->path, pdir, pname, strerror(-rc));
		goto out_abort;
	}
	maybe_crash(o, "manifest");
	return mdb_errno(mdb_txn_commit(txn));
out_abort:
	mdb_txn_abort(txn);
	return rc;
}

static int publish_impl(ckv_store *s, const ckv_geom *g, const uint32_t *tokens, uint32_t n,
			const struct publish_src *src, const ckv_import_opts *o,
			ckv_import_result *r, ckv_err *e)
{
	uint32_t c = g->chunk_tokens, m = ckv_chunks_for(n, c);
	ckv_hash *chain = NULL;
	ckv_manifest man, *base = NULL;
	char staging[256] = "", segid[80] = "", pdir[64], pname[64];
	char *record = NULL;
	size_t reclen;
	int lockfd = -1, rc;
	bool locked = false, seg_created = false;

	memset(r, 0, sizeof(*r));
	if (e)
		e->msg[0] = 0;
	memset(&man, 0, sizeof(man));
	if (n == 0 || n > CKV_MAX_TOKENS)
		return ckv_errf(e, -EINVAL, "tokens: expected 1..%u tokens, got %u", CKV_MAX_TOKENS, n);
	chain = malloc(sizeof(*chain) * m);
	man.extents = calloc(m + 1, sizeof(*man.extents));
	if (!chain || !man.extents) {
		rc = -ENOMEM;
		goto out;
	}
	ckv_chain(g, tokens, n, chain);
	man.geom = *g;
	man.tokens = n;
	man.chunks = m;
	man.hash = chain[m - 1];
	r->hash = man.hash;
	if (src->times) {
		man.has_times = src->times->has_times;
		man.t_manifest = src->times->t_manifest;
		man.t_tokens = src->times->t_tokens;
		man.t_sums = src->times->t_sums;
		man.t_layers = src->times->t_layers; /* borrowed: cleared before free */
		man.has_dir_time = src->times->has_dir_time;
		man.t_dir = src->times->t_dir;
		man.has_modes = src->times->has_modes;
		man.mode_dir = src->times->mode_dir;
		man.mode_manifest = src->times->mode_manifest;
		man.mode_tokens = src->times->mode_tokens;
		man.mode_sums = src->times->mode_sums;
		man.mode_layers = src->times->mode_layers;
	}
	man.created = time(NULL);

	if (flock(s->lockfd, LOCK_SH) < 0) {
		rc = ckv_errf(e, -errno, "%s/lock: %s", s->path, strerror(errno));
		goto out;
	}
	locked = true;

	for (int attempt = 0; attempt < 4; attempt++) {
		uint32_t shared = 0, nx = 0;
		bool existed = false;
		MDB_txn *txn;

		/* Longest full-chunk chain match (dedup base). */
		rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn);
		if (rc) {
			rc = mdb_errno(rc);
			goto out;
		}
		{
			MDB_val k = { 16, man.hash.b }, v;
			if (mdb_get(txn, s->db_prefix, &k, &v) == 0) {
				mdb_txn_abort(txn);
				r->existed = true;
				rc = src->check_shared ? src->check_shared(src->arg, m, e) : 0;
				goto out;
			}
		}
		if (attempt < 3) {
			ckv_hash ph;
			uint32_t lk = 0;
			int64_t j = chain_search(s, txn, g->seed, chain, n / c, &ph, &lk);
			if (j >= 0) {
				base = calloc(1, sizeof(*base));
				if (!base || get_record(s, txn, &ph, base, NULL) < 0) {
					free(base);
					base = NULL;
				} else {
					shared = (uint32_t)j + 1;
				}
			}
		}
		mdb_txn_abort(txn);
		if (base) {
			rc = extents_prefix(base, shared, man.extents, &nx);
			ckv_manifest_free(base);
			free(base);
			base = NULL;
			if (rc) {
				shared = 0;
				nx = 0;
			}
		}
		if (src->check_shared && (rc = src->check_shared(src->arg, shared, e)) < 0)
			goto out;

		/* New chunks go to a fresh segment. */
		if (shared < m && !seg_created) {
			char rel[300], dst[300], dstdir[16];
			rc = staging_create(s, staging, sizeof(staging), &lockfd, e);
			if (rc)
				goto out;
			maybe_crash(o, "staging");
			ckv_segment_id(&chain[m - 1], shared, segid);
			snprintf(rel, sizeof(rel), "%s/seg", staging);
			rc = write_segment(s, s->dirfd, rel, g, tokens, n, shared, m, src, o,
					   &r->bytes_written, e);
			if (rc)
				goto out;
			maybe_crash(o, "segment");
			snprintf(dstdir, sizeof(dstdir), "seg/%.2s", segid);
			mkdirat(s->dirfd, dstdir, 0755);
			ckv_segment_path(segid, dst, sizeof(dst));
			if (renameat(s->dirfd, rel, s->dirfd, dst) < 0) {
				if (errno != EEXIST && errno != ENOTEMPTY) {
					rc = ckv_errf(e, -errno, "%s/%s: %s", s->path, dst, strerror(errno));
					goto out;
				}
				/*
				 * The same segment is there already: indexed (a concurrent
				 * or earlier identical import: use it), or an orphan left
				 * by a crash (maybe partial: replace it).
				 */
				if (!segment_indexed(s, segid)) {
					rm_tree(s->dirfd, dst, NULL);
					if (renameat(s->dirfd, rel, s->dirfd, dst) < 0) {
						rc = ckv_errf(e, -errno, "%s/%s: %s", s->path, dst, strerror(errno));
						goto out;
					}
				}
			}
			rc = fsync_dir(s, s->dirfd, dstdir);
			if (rc)
				goto out;
			seg_created = true;
			/*
			 * Orphan check and commit are not atomic, but both run under
			 * the shared store lock that gc and reindex take exclusively.
			 */
			r->new_chunks = m - shared;
		}
		if (shared < m) {
			ckv_extent *x = &man.extents[nx++];
			snprintf(x->segment, sizeof(x->segment), "%s", segid);
			x->first = 0;
			x->count = m - shared;
		}
		man.nextents = nx;
		r->shared_chunks = shared;

		free(record);
		record = NULL;
		rc = ckv_manifest_emit(&man, true, &record, &reclen);
		if (rc)
			goto out;
		prefix_rel(&man.hash, pdir, sizeof(pdir), pname, sizeof(pname));
		rc = commit_prefix(s, &man, chain, seg_created ? segid : NULL, shared, record,
				   reclen, pdir, pname, o, &existed, e);
		if (rc == -EAGAIN) {
			/* A dedup base vanished under us: retry, last time without dedup. */
			if (seg_created && shared > 0 && !segment_indexed(s, segid)) {
				/* our segment starts at `shared`; it can't serve a no-dedup retry */
				char dst[300];
				ckv_segment_path(segid, dst, sizeof(dst));
				rm_tree(s->dirfd, dst, NULL);
				seg_created = false;
			}
			continue;
		}
		if (rc) {
			if (e && !e->msg[0])
				ckv_errf(e, rc, "%s: index: cannot publish: %s", s->path, strerror(-rc));
			goto out;
		}
		if (existed)
			r->existed = true;
		maybe_crash(o, "commit");
		break;
	}
	if (rc == -EAGAIN)
		rc = ckv_errf(e, -EAGAIN, "%s: the store kept changing under the import; try again", s->path);
out:
	if (staging[0]) {
		rm_tree(s->dirfd, staging, NULL);
		fsync_dir(s, s->dirfd, "staging");
	}
	if (lockfd >= 0)
		close(lockfd);
	if (locked)
		flock(s->lockfd, LOCK_UN);
	man.t_layers = NULL;
	ckv_manifest_free(&man);
	free(record);
	free(chain);
	return rc;
}

int ckv_store_publish(ckv_store *s, const ckv_geom *g, const uint32_t *tokens, uint32_t n,
		      ckv_chunk_fill_fn fill, void *arg, const ckv_import_opts *o,
		      ckv_import_result *r, ckv_err *e)
{
	struct publish_src src = { .fill = fill, .arg = arg };
	return publish_impl(s, g, tokens, n, &src, o, r, e);
}

/* ---- import ----------------------------------------------------------------------- */

struct import_ctx {
	const char *dir;
	ckv_manifest *man;
	int *layer_fd;
	uint8_t *sums; /* provided sums.xxh3 entries, or NULL */
	/*
	 * [layers]: the error of import_fill, per layer. Layers are filled by
	 * parallel workers, so each reports into its own slot; ckv_store_import
	 * hands the first one to the caller.
	 */
	ckv_err *layer_err;
};

static int check_sums(struct import_ctx *x, uint32_t l, uint32_t first, uint32_t count,
		      const uint8_t *buf)
{
	const ckv_geom *g = &x->man->geom;
	char name[32];
	if (!x->sums)
		return 0;
	for (uint32_t i = 0; i < count; i++) {
		uint64_t want = ckv_sum_load(x->sums + ((size_t)l * x->man->chunks + first + i) * 8);
		if (ckv_chunk_sum(buf + (size_t)i * g->chunk_bytes, g->chunk_bytes) != want) {
			ckv_layer_name(l, name);
			return ckv_errf(&x->layer_err[l], -EBADMSG, "%s/%s: chunk %u does not match its checksum in sums.xxh3",
					x->dir, name, first + i);
		}
	}
	return 0;
}

static int import_fill(void *arg, uint32_t l, uint32_t first, uint32_t count, void *buf)
{
	struct import_ctx *x = arg;
	uint64_t cb = x->man->geom.chunk_bytes;
	char name[32];
	int rc = read_all(x->layer_fd[l], buf, (size_t)count * cb, (off_t)first * (off_t)cb);
	if (rc) {
		ckv_layer_name(l, name);
		return ckv_errf(&x->layer_err[l], rc == -ENODATA ? -EINVAL : rc, "%s/%s: read: %s", x->dir, name,
				rc == -ENODATA ? "file shrank during import" : strerror(-rc));
	}
	return check_sums(x, l, first, count, buf);
}

/* With sums.xxh3 given, the chunks the store already holds are checked too. */
static int import_check_shared(void *arg, uint32_t shared, ckv_err *e)
{
	struct import_ctx *x = arg;
	uint64_t cb = x->man->geom.chunk_bytes;
	uint32_t run = (uint32_t)(IO_RUN / cb) ? (uint32_t)(IO_RUN / cb) : 1;
	uint8_t *buf;
	int rc = 0;
	(void)e;
	if (!x->sums || !shared)
		return 0;
	buf = malloc((size_t)run * cb);
	if (!buf)
		return -ENOMEM;
	for (uint32_t l = 0; l < x->man->geom.layers && !rc; l++)
		for (uint32_t j = 0; j < shared && !rc; j += run) {
			uint32_t cnt = shared - j < run ? shared - j : run;
			rc = import_fill(x, l, j, cnt, buf);
		}
	free(buf);
	return rc;
}

static bool expected_name(const char *name, uint32_t layers)
{
	unsigned l;
	char tail[8];
	if (!strcmp(name, "manifest.json") || !strcmp(name, "tokens.bin") || !strcmp(name, "sums.xxh3"))
		return true;
	if (sscanf(name, "layer_%u.kv%1s", &l, tail) == 1 && l < layers) {
		char want[32];
		ckv_layer_name(l, want);
		return strcmp(want, name) == 0;
	}
	return false;
}

/* Open an input file: regular, not a symlink. */
static int open_input(int dfd, const char *dir, const char *name, struct stat *st, ckv_err *e)
{
	int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		if (errno == ELOOP)
			return ckv_errf(e, -ELOOP, "%s/%s: is a symbolic link; expected a regular file", dir, name);
		return ckv_errf(e, -errno, "%s/%s: %s", dir, name, strerror(errno));
	}
	if (fstat(fd, st) < 0 || !S_ISREG(st->st_mode)) {
		close(fd);
		return ckv_errf(e, -EINVAL, "%s/%s: not a regular file", dir, name);
	}
	return fd;
}

int ckv_store_import(ckv_store *s, const char *dir, const ckv_hash *expect_hash,
		     const ckv_import_opts *o, ckv_import_result *r, ckv_err *e)
{
	ckv_manifest man;
	struct import_ctx x = { .dir = dir, .man = &man };
	struct stat st;
	char *json = NULL, *tokbuf = NULL;
	uint32_t *tokens = NULL;
	size_t len;
	int dfd, fd, rc;
	DIR *d = NULL;
	struct dirent *de;

	memset(&man, 0, sizeof(man));
	dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return ckv_errf(e, -errno, "%s: %s", dir, strerror(errno));
	if (fstat(dfd, &st) == 0) {
		man.t_dir.sec = st.st_mtim.tv_sec;
		man.t_dir.nsec = (uint32_t)st.st_mtim.tv_nsec;
		man.mode_dir = st.st_mode & 07777;
	}

	fd = open_input(dfd, dir, "manifest.json", &st, e);
	if (fd < 0) {
		rc = fd;
		goto out_close;
	}
	if (st.st_size > MANIFEST_MAX) {
		close(fd);
		rc = ckv_errf(e, -EFBIG, "%s/manifest.json: larger than %u bytes", dir, MANIFEST_MAX);
		goto out_close;
	}
	man.t_manifest.sec = st.st_mtim.tv_sec;
	man.t_manifest.nsec = (uint32_t)st.st_mtim.tv_nsec;
	man.mode_manifest = st.st_mode & 07777;
	json = malloc((size_t)st.st_size + 1);
	rc = json ? read_all(fd, json, (size_t)st.st_size, 0) : -ENOMEM;
	len = (size_t)st.st_size;
	close(fd);
	if (rc) {
		rc = ckv_errf(e, rc, "%s/manifest.json: %s", dir, strerror(-rc));
		goto out_close;
	}
	{
		char what[4200];
		ckv_manifest keep = man;
		snprintf(what, sizeof(what), "%s/manifest.json", dir);
		rc = ckv_manifest_parse(&man, json, len, false, what, e);
		man.t_manifest = keep.t_manifest;
		man.t_dir = keep.t_dir;
		man.mode_dir = keep.mode_dir;
		man.mode_manifest = keep.mode_manifest;
		if (rc)
			goto out_close;
	}
	man.t_layers = calloc(man.geom.layers, sizeof(*man.t_layers));
	x.layer_fd = malloc(sizeof(int) * man.geom.layers);
	x.layer_err = calloc(man.geom.layers, sizeof(*x.layer_err));
	if (!man.t_layers || !x.layer_fd || !x.layer_err) {
		rc = -ENOMEM;
		goto out_close;
	}
	for (uint32_t l = 0; l < man.geom.layers; l++)
		x.layer_fd[l] = -1;

	/* Nothing but the cache's own files. */
	{
		int dfd2 = dup(dfd);
		d = dfd2 >= 0 ? fdopendir(dfd2) : NULL;
		if (!d) {
			rc = ckv_errf(e, -errno, "%s: %s", dir, strerror(errno));
			goto out_close;
		}
		while ((de = readdir(d))) {
			if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
				continue;
			if (!expected_name(de->d_name, man.geom.layers)) {
				rc = ckv_errf(e, -EINVAL, "%s/%s: unexpected file (a %u-layer cache holds manifest.json, tokens.bin, sums.xxh3 and layer_000.kv..layer_%03u.kv)",
					      dir, de->d_name, man.geom.layers, man.geom.layers - 1);
				goto out_close;
			}
		}
	}

	/* tokens.bin */
	fd = open_input(dfd, dir, "tokens.bin", &st, e);
	if (fd < 0) {
		rc = fd;
		goto out_close;
	}
	man.t_tokens.sec = st.st_mtim.tv_sec;
	man.t_tokens.nsec = (uint32_t)st.st_mtim.tv_nsec;
	man.mode_tokens = st.st_mode & 07777;
	if ((uint64_t)st.st_size != (uint64_t)man.tokens * 4) {
		close(fd);
		rc = ckv_errf(e, -EINVAL, "%s/tokens.bin: %lld bytes, expected %llu (field \"tokens\" = %u, 4 bytes each)",
			      dir, (long long)st.st_size, (unsigned long long)man.tokens * 4, man.tokens);
		goto out_close;
	}
	tokbuf = malloc((size_t)man.tokens * 4);
	tokens = malloc((size_t)man.tokens * 4);
	rc = tokbuf && tokens ? read_all(fd, tokbuf, (size_t)man.tokens * 4, 0) : -ENOMEM;
	close(fd);
	if (rc) {
		rc = ckv_errf(e, rc, "%s/tokens.bin: %s", dir, strerror(-rc));
		goto out_close;
	}
	ckv_tokens_from_le(tokens, (const uint8_t *)tokbuf, man.tokens);
	{
		ckv_hash *chain = malloc(sizeof(*chain) * man.chunks);
		char a[CKV_HASH_HEX + 1], b[CKV_HASH_HEX + 1];
		if (!chain) {
			rc = -ENOMEM;
			goto out_close;
		}
		ckv_chain(&man.geom, tokens, man.tokens, chain);
		if (!ckv_hash_eq(&chain[man.chunks - 1], &man.hash)) {
			ckv_hash_hex(&chain[man.chunks - 1], a);
			ckv_hash_hex(&man.hash, b);
			free(chain);
			rc = ckv_errf(e, -EINVAL, "%s/manifest.json: field \"hash\" is %s but tokens.bin hashes to %s", dir, b, a);
			goto out_close;
		}
		free(chain);
		if (expect_hash && !ckv_hash_eq(expect_hash, &man.hash)) {
			ckv_hash_hex(expect_hash, a);
			ckv_hash_hex(&man.hash, b);
			rc = ckv_errf(e, -EINVAL, "%s: directory is named %s but its tokens hash to %s", dir, a, b);
			goto out_close;
		}
	}

	/* layer files */
	for (uint32_t l = 0; l < man.geom.layers; l++) {
		char name[32];
		uint64_t want = (uint64_t)man.chunks * man.geom.chunk_bytes;
		ckv_layer_name(l, name);
		fd = open_input(dfd, dir, name, &st, e);
		if (fd < 0) {
			rc = fd;
			goto out_close;
		}
		x.layer_fd[l] = fd;
		if ((uint64_t)st.st_size != want) {
			rc = ckv_errf(e, -EINVAL, "%s/%s: %lld bytes, expected %llu (%u chunks of %llu bytes)%s",
				      dir, name, (long long)st.st_size, (unsigned long long)want, man.chunks,
				      (unsigned long long)man.geom.chunk_bytes,
				      (uint64_t)st.st_size < want ? ": truncated" : ": too large");
			goto out_close;
		}
		man.t_layers[l].sec = st.st_mtim.tv_sec;
		man.t_layers[l].nsec = (uint32_t)st.st_mtim.tv_nsec;
		if (l == 0)
			man.mode_layers = st.st_mode & 07777;
	}

	/* sums.xxh3, optional */
	fd = openat(dfd, "sums.xxh3", O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
	if (fd >= 0 || errno != ENOENT) {
		uint64_t want = CKV_SIDE_HEADER + (uint64_t)man.chunks * man.geom.layers * 8;
		uint8_t hdr[CKV_SIDE_HEADER];
		ckv_side_header sh;
		char what[4200];
		if (fd >= 0)
			close(fd);
		fd = open_input(dfd, dir, "sums.xxh3", &st, e);
		if (fd < 0) {
			rc = fd;
			goto out_close;
		}
		man.t_sums.sec = st.st_mtim.tv_sec;
		man.t_sums.nsec = (uint32_t)st.st_mtim.tv_nsec;
		man.mode_sums = st.st_mode & 07777;
		snprintf(what, sizeof(what), "%s/sums.xxh3", dir);
		if ((uint64_t)st.st_size != want) {
			close(fd);
			rc = ckv_errf(e, -EINVAL, "%s: %lld bytes, expected %llu (header + 8 bytes per chunk per layer)",
				      what, (long long)st.st_size, (unsigned long long)want);
			goto out_close;
		}
		x.sums = malloc((size_t)(want - CKV_SIDE_HEADER));
		rc = x.sums ? read_all(fd, hdr, sizeof(hdr), 0) : -ENOMEM;
		if (!rc)
			rc = read_all(fd, x.sums, (size_t)(want - CKV_SIDE_HEADER), CKV_SIDE_HEADER);
		close(fd);
		if (rc) {
			rc = ckv_errf(e, rc, "%s: %s", what, strerror(-rc));
			goto out_close;
		}
		if ((rc = ckv_side_header_decode(&sh, hdr, CKV_SUMS_MAGIC, what, e)) < 0)
			goto out_close;
		if (sh.layers != man.geom.layers || sh.chunks != man.chunks || sh.per_chunk != 1) {
			rc = ckv_errf(e, -EINVAL, "%s: header says %u layers x %u chunks x %u, expected %u x %u x 1",
				      what, sh.layers, sh.chunks, sh.per_chunk, man.geom.layers, man.chunks);
			goto out_close;
		}
	} else {
		struct timespec now;
		clock_gettime(CLOCK_REALTIME, &now);
		man.t_sums.sec = now.tv_sec;
		man.t_sums.nsec = (uint32_t)now.tv_nsec;
		man.mode_sums = 0444; /* computed here: as the mount shows generated files */
	}
	man.has_times = true;
	man.has_dir_time = true;
	man.has_modes = o && o->keep_modes;

	{
		struct publish_src src = {
			.fill = import_fill, .arg = &x, .check_shared = import_check_shared, .times = &man,
		};
		rc = publish_impl(s, &man.geom, tokens, man.tokens, &src, o, r, e);
		for (uint32_t l = 0; rc < 0 && e && l < man.geom.layers; l++)
			if (x.layer_err[l].msg[0]) {
				*e = x.layer_err[l];
				break;
			}
	}
out_close:
	if (d)
		closedir(d);
	if (x.layer_fd)
		for (uint32_t l = 0; l < man.geom.layers; l++)
			if (x.layer_fd[l] >= 0)
				close(x.layer_fd[l]);
	free(x.layer_fd);
	free(x.layer_err);
	free(x.sums);
	free(tokens);
	free(tokbuf);
	free(json);
	ckv_manifest_free(&man);
	close(dfd);
	return rc;
}

/* ---- reading prefixes back ------------------------------------------------------- */

static int segment_side_sums(ckv_store *s, const char *segid, const ckv_geom *g, const char *fname,
			     const char *magic, uint32_t per, uint64_t **sums, uint32_t *chunks, ckv_err *e)
{
	char rel[300];
	uint8_t hdr[CKV_SIDE_HEADER], *raw = NULL;
	ckv_side_header sh;
	struct stat st;
	uint64_t *out = NULL;
	size_t cnt;
	int fd, rc;

	ckv_segment_path(segid, rel, sizeof(rel));
	strcat(rel, "/");
	strcat(rel, fname);
	fd = openat(s->dirfd, rel, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return ckv_errf(e, -errno, "%s/%s: %s", s->path, rel, strerror(errno));
	if (fstat(fd, &st) < 0 || (rc = read_all(fd, hdr, sizeof(hdr), 0))) {
		rc = ckv_errf(e, -EIO, "%s/%s: cannot read header", s->path, rel);
		goto out_close;
	}
	if ((rc = ckv_side_header_decode(&sh, hdr, magic, rel, e)) < 0)
		goto out_close;
	cnt = (size_t)sh.layers * sh.chunks * per;
	if (sh.layers != g->layers || sh.per_chunk != per || sh.chunks == 0 ||
	    (uint64_t)st.st_size != CKV_SIDE_HEADER + (uint64_t)cnt * 8) {
		rc = ckv_errf(e, -EUCLEAN, "%s/%s: header does not match the segment", s->path, rel);
		goto out_close;
	}
	raw = malloc(cnt * 8);
	out = malloc(cnt * sizeof(*out));
	if (!raw || !out) {
		rc = -ENOMEM;
		goto out_free;
	}
	if ((rc = read_all(fd, raw, cnt * 8, CKV_SIDE_HEADER))) {
		rc = ckv_errf(e, -EIO, "%s/%s: short read", s->path, rel);
		goto out_free;
	}
	for (size_t i = 0; i < cnt; i++)
		out[i] = ckv_sum_load(raw + 8 * i);
	*sums = out;
	*chunks = sh.chunks;
	out = NULL;
out_free:
	free(out);
	free(raw);
out_close:
	close(fd);
	return rc;
}

int ckv_segment_sums(ckv_store *s, const char *segid, const ckv_geom *g, uint64_t **sums,
		     uint32_t *chunks, ckv_err *e)
{
	return segment_side_sums(s, segid, g, "sums.xxh3", CKV_SUMS_MAGIC, 1, sums, chunks, e);
}

int ckv_segment_halves(ckv_store *s, const char *segid, const ckv_geom *g, uint64_t **halves,
		       uint32_t *chunks, ckv_err *e)
{
	return segment_side_sums(s, segid, g, "halves.xxh3", CKV_HALVES_MAGIC, 2, halves, chunks, e);
}

/* Tokens of a prefix, from its segments' tokens.bin files. */
static int prefix_tokens(ckv_store *s, const ckv_manifest *m, uint32_t **out, ckv_err *e)
{
	uint32_t c = m->geom.chunk_tokens, pos = 0;
	uint32_t *t = malloc((size_t)m->tokens * 4);
	if (!t)
		return -ENOMEM;
	for (uint32_t i = 0; i < m->nextents; i++) {
		const ckv_extent *x = &m->extents[i];
		char rel[320];
		uint8_t *buf;
		uint32_t want = x->count * c;
		struct stat st;
		int fd, rc;
		if (want > m->tokens - pos)
			want = m->tokens - pos;
		ckv_segment_path(x->segment, rel, sizeof(rel));
		strcat(rel, "/tokens.bin");
		fd = openat(s->dirfd, rel, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0 || fstat(fd, &st) < 0) {
			rc = ckv_errf(e, -errno, "%s/%s: %s", s->path, rel, strerror(errno));
			if (fd >= 0)
				close(fd);
			free(t);
			return rc;
		}
		if ((uint64_t)st.st_size < ((uint64_t)x->first * c + want) * 4) {
			close(fd);
			free(t);
			return ckv_errf(e, -EUCLEAN, "%s/%s: %lld bytes, too short for extent %u (chunks %u..%u)",
					s->path, rel, (long long)st.st_size, i, x->first, x->first + x->count - 1);
		}
		buf = malloc((size_t)want * 4);
		rc = buf ? read_all(fd, buf, (size_t)want * 4, (off_t)x->first * c * 4) : -ENOMEM;
		close(fd);
		if (rc) {
			free(buf);
			free(t);
			return ckv_errf(e, rc, "%s/%s: %s", s->path, rel, strerror(-rc));
		}
		ckv_tokens_from_le(t + pos, buf, want);
		free(buf);
		pos += want;
	}
	if (pos != m->tokens) {
		free(t);
		return ckv_errf(e, -EUCLEAN, "extents hold %u tokens, expected %u", pos, m->tokens);
	}
	*out = t;
	return 0;
}

int ckv_store_tokens(ckv_store *s, const ckv_manifest *m, uint32_t **out, ckv_err *e)
{
	return prefix_tokens(s, m, out, e);
}

static void set_times(int fd, const ckv_ftime *t)
{
	struct timespec ts[2] = { { t->sec, t->nsec }, { t->sec, t->nsec } };
	futimens(fd, ts);
}

int ckv_store_export(ckv_store *s, const ckv_hash *h, const char *dir,
		     ckv_progress_fn prog, void *parg, ckv_err *e)
{
	ckv_manifest *m = NULL;
	uint32_t *tokens = NULL;
	uint8_t *buf = NULL, *sums = NULL, hdr[CKV_SIDE_HEADER];
	char *json = NULL;
	size_t jlen;
	int dfd = -1, fd = -1, rc;
	uint64_t cb, done = 0, total;
	uint32_t run;
	ckv_ftime tdef;
	bool created = false, owned = false;

	rc = ckv_store_get(s, h, &m, e);
	if (rc)
		return rc;
	cb = m->geom.chunk_bytes;
	run = (uint32_t)(IO_RUN / cb) ? (uint32_t)(IO_RUN / cb) : 1;
	total = (uint64_t)m->chunks * cb * m->geom.layers;
	tdef.sec = m->created;
	tdef.nsec = 0;
	if (mkdir(dir, 0755) == 0)
		created = true;
	else if (errno != EEXIST) {
		rc = ckv_errf(e, -errno, "%s: %s", dir, strerror(errno));
		goto out;
	}
	dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0) {
		rc = ckv_errf(e, -errno, "%s: %s", dir, strerror(errno));
		goto out;
	}
	{
		DIR *d = fdopendir(dup(dfd));
		struct dirent *de;
		bool empty = true;
		while (d && (de = readdir(d)))
			if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
				empty = false;
		if (d)
			closedir(d);
		if (!empty) {
			rc = ckv_errf(e, -EEXIST, "%s: directory is not empty", dir);
			goto out;
		}
		owned = true; /* from here on, a failure removes what we wrote */
	}
	rc = prefix_tokens(s, m, &tokens, e);
	if (rc)
		goto out;
	buf = aligned_alloc(CKV_ALIGN, (size_t)run * cb);
	sums = malloc((size_t)m->chunks * m->geom.layers * 8);
	if (!buf || !sums) {
		rc = -ENOMEM;
		goto out;
	}
	for (uint32_t l = 0; l < m->geom.layers; l++) {
		char name[32];
		uint32_t j = 0;
		ckv_layer_name(l, name);
		fd = openat(dfd, name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (fd < 0) {
			rc = ckv_errf(e, -errno, "%s/%s: %s", dir, name, strerror(errno));
			goto out;
		}
		for (uint32_t i = 0; i < m->nextents; i++) {
			const ckv_extent *x = &m->extents[i];
			uint64_t *ssum = NULL;
			uint32_t segchunks;
			char rel[340];
			int sfd;
			rc = ckv_segment_sums(s, x->segment, &m->geom, &ssum, &segchunks, e);
			if (rc)
				goto out;
			if (x->first + (uint64_t)x->count > segchunks) {
				free(ssum);
				rc = ckv_errf(e, -EUCLEAN, "segment %s: extent %u..%u beyond its %u chunks",
					      x->segment, x->first, x->first + x->count, segchunks);
				goto out;
			}
			ckv_segment_path(x->segment, rel, sizeof(rel));
			strcat(rel, "/");
			strcat(rel, name);
			sfd = openat(s->dirfd, rel, O_RDONLY | O_CLOEXEC);
			if (sfd < 0) {
				free(ssum);
				rc = ckv_errf(e, -errno, "%s/%s: %s", s->path, rel, strerror(errno));
				goto out;
			}
			for (uint32_t k = 0; k < x->count; k += run) {
				uint32_t cnt = x->count - k < run ? x->count - k : run;
				rc = read_all(sfd, buf, (size_t)cnt * cb, (off_t)(x->first + k) * (off_t)cb);
				if (rc) {
					rc = ckv_errf(e, -EIO, "%s/%s: short read", s->path, rel);
					break;
				}
				for (uint32_t q = 0; q < cnt; q++) {
					uint64_t got = ckv_chunk_sum(buf + (size_t)q * cb, cb);
					uint64_t want = ssum[(size_t)l * segchunks + x->first + k + q];
					if (got != want) {
						rc = ckv_errf(e, -EIO, "%s/%s: chunk %u (layer %u, prefix chunk %u) fails its checksum; the store is damaged (ckv verify)",
							      s->path, rel, x->first + k + q, l, j + k + q);
						break;
					}
					ckv_sum_store(sums + ((size_t)l * m->chunks + j + k + q) * 8, got);
				}
				if (rc)
					break;
				rc = write_all(fd, buf, (size_t)cnt * cb, (off_t)(j + k) * (off_t)cb);
				if (rc) {
					rc = ckv_errf(e, rc, "%s/%s: write: %s", dir, name, strerror(-rc));
					break;
				}
				done += (uint64_t)cnt * cb;
				if (prog)
					prog(parg, "export", done, total);
			}
			close(sfd);
			free(ssum);
			if (rc)
				goto out;
			j += x->count;
		}
		set_times(fd, m->has_times ? &m->t_layers[l] : &tdef);
		close(fd);
		fd = -1;
	}
	/* tokens.bin */
	{
		uint8_t *tb = malloc((size_t)m->tokens * 4);
		if (!tb) {
			rc = -ENOMEM;
			goto out;
		}
		ckv_tokens_to_le(tb, tokens, m->tokens);
		fd = openat(dfd, "tokens.bin", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		rc = fd < 0 ? -errno : write_all(fd, tb, (size_t)m->tokens * 4, 0);
		free(tb);
		if (rc) {
			rc = ckv_errf(e, rc, "%s/tokens.bin: %s", dir, strerror(-rc));
			goto out;
		}
		set_times(fd, m->has_times ? &m->t_tokens : &tdef);
		close(fd);
		fd = -1;
	}
	/* sums.xxh3 */
	{
		side_header(CKV_SUMS_MAGIC, &m->geom, m->chunks, hdr);
		fd = openat(dfd, "sums.xxh3", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		rc = fd < 0 ? -errno : write_all(fd, hdr, sizeof(hdr), 0);
		if (!rc)
			rc = write_all(fd, sums, (size_t)m->chunks * m->geom.layers * 8, CKV_SIDE_HEADER);
		if (rc) {
			rc = ckv_errf(e, rc, "%s/sums.xxh3: %s", dir, strerror(-rc));
			goto out;
		}
		set_times(fd, m->has_times ? &m->t_sums : &tdef);
		close(fd);
		fd = -1;
	}
	/* manifest.json last */
	rc = ckv_manifest_emit(m, false, &json, &jlen);
	if (rc)
		goto out;
	fd = openat(dfd, "manifest.json", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	rc = fd < 0 ? -errno : write_all(fd, json, jlen, 0);
	if (rc) {
		rc = ckv_errf(e, rc, "%s/manifest.json: %s", dir, strerror(-rc));
		goto out;
	}
	set_times(fd, m->has_times ? &m->t_manifest : &tdef);
	if (m->has_dir_time)
		set_times(dfd, &m->t_dir); /* last: writing the files moved it */
out:
	if (fd >= 0)
		close(fd);
	if (rc && owned) {
		static const char *const names[] = { "manifest.json", "tokens.bin", "sums.xxh3" };
		for (size_t i = 0; i < 3; i++)
			unlinkat(dfd, names[i], 0);
		for (uint32_t l = 0; l < m->geom.layers; l++) {
			char name[32];
			ckv_layer_name(l, name);
			unlinkat(dfd, name, 0);
		}
		if (created)
			rmdir(dir);
	}
	if (dfd >= 0)
		close(dfd);
	free(json);
	free(buf);
	free(sums);
	free(tokens);
	if (m) {
		ckv_manifest_free(m);
		free(m);
	}
	return rc;
}

/* ---- stat -------------------------------------------------------------------------- */

int ckv_store_stat(ckv_store *s, const ckv_manifest *m, ckv_stat_info *st)
{
	MDB_txn *txn;
	uint64_t per_chunk = m->geom.chunk_bytes * m->geom.layers;
	char hdir[64], hname[64], rel[320];
	int rc;

	memset(st, 0, sizeof(*st));
	st->bytes_total = per_chunk * m->chunks;
	rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn);
	if (rc)
		return mdb_errno(rc);
	for (uint32_t i = 0; i < m->nextents; i++) {
		struct seg_row row = { 0 };
		seg_get(s, txn, m->extents[i].segment, &row, NULL);
		if (row.refs > 1)
			st->bytes_shared += per_chunk * m->extents[i].count;
	}
	mdb_txn_abort(txn);
	for (uint32_t i = 0; i < m->nextents; i++) {
		bool seen = false;
		for (uint32_t q = 0; q < i; q++)
			seen |= strcmp(m->extents[q].segment, m->extents[i].segment) == 0;
		if (seen)
			continue;
		ckv_segment_path(m->extents[i].segment, rel, sizeof(rel));
		st->bytes_on_disk += tree_bytes(s->dirfd, rel);
	}
	prefix_rel(&m->hash, hdir, sizeof(hdir), hname, sizeof(hname));
	snprintf(rel, sizeof(rel), "%s/%s", hdir, hname);
	st->bytes_on_disk += tree_bytes(s->dirfd, rel);
	return 0;
}

/* ---- rm ------------------------------------------------------------------------------ */

static int unindex_prefix(ckv_store *s, MDB_txn *txn, const ckv_manifest *m)
{
	MDB_val k = { 16, (void *)m->hash.b };
	int rc = refs_drop(s, txn, m);
	if (rc)
		return rc;
	rc = mdb_del(txn, s->db_prefix, &k, NULL);
	if (rc)
		return mdb_errno(rc);
	return bump_generation(s, txn);
}

int ckv_store_rm(ckv_store *s, const ckv_hash *h, ckv_err *e)
{
	MDB_txn *txn;
	ckv_manifest m;
	char hex[CKV_HASH_HEX + 1], pdir[64], pname[64], rel[160];
	int rc;

	ckv_hash_hex(h, hex);
	rc = mdb_txn_begin(s->env, NULL, 0, &txn);
	if (rc)
		return ckv_errf(e, mdb_errno(rc), "%s: index: %s", s->path, mdb_strerror(rc));
	rc = get_record(s, txn, h, &m, e);
	if (rc) {
		mdb_txn_abort(txn);
		return rc == -ENOENT ? ckv_errf(e, rc, "%s: no such prefix in %s", hex, s->path) : rc;
	}
	rc = unindex_prefix(s, txn, &m);
	ckv_manifest_free(&m);
	if (rc) {
		mdb_txn_abort(txn);
		return ckv_errf(e, rc, "%s: cannot remove: %s", hex, strerror(-rc));
	}
	rc = mdb_txn_commit(txn);
	if (rc)
		return ckv_errf(e, mdb_errno(rc), "%s: index: %s", s->path, mdb_strerror(rc));
	prefix_rel(h, pdir, sizeof(pdir), pname, sizeof(pname));
	snprintf(rel, sizeof(rel), "%s/%s", pdir, pname);
	unlinkat(s->dirfd, rel, 0);
	fsync_dir(s, s->dirfd, pdir);
	return 0;
}

/* ---- gc ------------------------------------------------------------------------------ */

static bool seg_indexed(ckv_store *s, MDB_txn *txn, const char *id)
{
	MDB_val k = { strlen(id), (void *)id }, v;
	(void)s;
	return mdb_get(txn, s->db_seg, &k, &v) == 0;
}

/*
 * Call fn(arg, rel, name) for every entry top/<shard>/<name> of the store
 * ("seg" or "prefix"); dot-names are skipped unless hidden (then only "."
 * and ".." are). Stops at fn's first non-zero return and returns it.
 */
typedef int (*shard_fn)(void *arg, const char *rel, const char *name);
static int walk_sharded(ckv_store *s, const char *top, bool hidden, shard_fn fn, void *arg)
{
	int fd = openat(s->dirfd, top, O_RDONLY | O_DIRECTORY | O_CLOEXEC), rc = 0;
	DIR *d1 = fd >= 0 ? fdopendir(fd) : NULL;
	struct dirent *a;

	if (!d1) {
		if (fd >= 0)
			close(fd);
		return 0;
	}
	while (rc == 0 && (a = readdir(d1))) {
		int fd2;
		DIR *d2;
		struct dirent *b;
		if (a->d_name[0] == '.')
			continue;
		fd2 = openat(dirfd(d1), a->d_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		d2 = fd2 >= 0 ? fdopendir(fd2) : NULL;
		if (!d2) {
			if (fd2 >= 0)
				close(fd2);
			continue;
		}
		while (rc == 0 && (b = readdir(d2))) {
			char rel[600];
			if (b->d_name[0] == '.' && (!hidden || !strcmp(b->d_name, ".") ||
						    !strcmp(b->d_name, "..")))
				continue;
			snprintf(rel, sizeof(rel), "%s/%s/%s", top, a->d_name, b->d_name);
			rc = fn(arg, rel, b->d_name);
		}
		closedir(d2);
	}
	closedir(d1);
	return rc;
}

struct gc_sweep {
	ckv_store *s;
	MDB_txn *txn;
	ckv_gc_result *r;
};

/* A segment directory nothing indexes: a crashed import's. */
static int gc_seg_one(void *arg, const char *rel, const char *name)
{
	struct gc_sweep *g = arg;
	if (!seg_indexed(g->s, g->txn, name)) {
		rm_tree(g->s->dirfd, rel, &g->r->bytes);
		g->r->segments++;
	}
	return 0;
}

/*
 * A record file whose prefix is not indexed (a crashed import's or rm's),
 * or the temporary file of a record whose writer died before its rename
 * (gc holds the store lock exclusively, so no writer is alive).
 */
static int gc_record_one(void *arg, const char *rel, const char *name)
{
	struct gc_sweep *g = arg;
	char hex[CKV_HASH_HEX + 1];
	ckv_hash h;
	MDB_val hk = { 16, h.b }, hv;
	size_t len = strlen(name);

	if (name[0] == '.') {
		if (len > 4 && !strcmp(name + len - 4, ".tmp")) {
			rm_tree(g->s->dirfd, rel, &g->r->bytes);
			g->r->manifests++;
		}
		return 0;
	}
	snprintf(hex, sizeof(hex), "%.32s", name);
	if (len == CKV_HASH_HEX + 5 && !strcmp(name + CKV_HASH_HEX, ".json") &&
	    ckv_hash_parse(&h, hex) == 0 && mdb_get(g->txn, g->s->db_prefix, &hk, &hv) == 0)
		return 0;
	rm_tree(g->s->dirfd, rel, &g->r->bytes);
	g->r->manifests++;
	return 0;
}

int ckv_store_gc(ckv_store *s, ckv_gc_result *r, ckv_err *e)
{
	MDB_txn *txn;
	MDB_cursor *cur;
	MDB_val k, v;
	char **dead = NULL;
	size_t ndead = 0, cap = 0;
	int rc;

	memset(r, 0, sizeof(*r));
	if (flock(s->lockfd, LOCK_EX) < 0)
		return ckv_errf(e, -errno, "%s/lock: %s", s->path, strerror(errno));

	/* 1. Segments nothing references. */
	rc = mdb_txn_begin(s->env, NULL, 0, &txn);
	if (rc) {
		rc = ckv_errf(e, mdb_errno(rc), "%s: index: %s", s->path, mdb_strerror(rc));
		goto out_unlock;
	}
	rc = mdb_cursor_open(txn, s->db_seg, &cur);
	if (rc) {
		mdb_txn_abort(txn);
		rc = mdb_errno(rc);
		goto out_unlock;
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		struct seg_row row;
		if (v.mv_size < sizeof(row))
			continue;
		memcpy(&row, v.mv_data, sizeof(row));
		if (row.refs)
			continue;
		if (ndead == cap) {
			cap = cap ? 2 * cap : 16;
			char **nd = realloc(dead, cap * sizeof(*dead));
			if (!nd) {
				rc = -ENOMEM;
				break;
			}
			dead = nd;
		}
		dead[ndead++] = strndup(k.mv_data, k.mv_size);
	}
	mdb_cursor_close(cur);
	for (size_t i = 0; i < ndead && rc != -ENOMEM; i++) {
		MDB_val dk;
		if (!dead[i])
			continue;
		dk.mv_size = strlen(dead[i]);
		dk.mv_data = dead[i];
		links_drop(s, txn, dead[i]);
		mdb_del(txn, s->db_seg, &dk, NULL);
	}
	if (rc == -ENOMEM) {
		mdb_txn_abort(txn);
		goto out_free;
	}
	rc = mdb_txn_commit(txn);
	if (rc) {
		rc = ckv_errf(e, mdb_errno(rc), "%s: index: %s", s->path, mdb_strerror(rc));
		goto out_free;
	}
	for (size_t i = 0; i < ndead; i++) {
		char rel[320];
		if (!dead[i])
			continue;
		ckv_segment_path(dead[i], rel, sizeof(rel));
		rm_tree(s->dirfd, rel, &r->bytes);
		r->segments++;
	}

	/* 2. Leftovers of crashed imports: staging, unindexed segments and records. */
	rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn);
	if (rc) {
		rc = mdb_errno(rc);
		goto out_free;
	}
	{
		struct gc_sweep g = { s, txn, r };
		walk_sharded(s, "seg", false, gc_seg_one, &g);
		walk_sharded(s, "prefix", true, gc_record_one, &g);
	}
	mdb_txn_abort(txn);
	/* shard directories left empty (rmdir fails on the others) */
	for (int t = 0; t < 2; t++) {
		static const char *const top[] = { "seg", "prefix" };
		int fd = openat(s->dirfd, top[t], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
		struct dirent *a;

		if (!d && fd >= 0)
			close(fd);
		while (d && (a = readdir(d)))
			if (a->d_name[0] != '.')
				unlinkat(dirfd(d), a->d_name, AT_REMOVEDIR);
		if (d)
			closedir(d);
	}
	{
		int fd = openat(s->dirfd, "staging", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
		struct dirent *a;
		while (d && (a = readdir(d))) {
			char rel[600];
			if (!strcmp(a->d_name, ".") || !strcmp(a->d_name, ".."))
				continue;
			snprintf(rel, sizeof(rel), "staging/%s", a->d_name);
			rm_tree(s->dirfd, rel, &r->bytes);
			r->staging++;
		}
		if (d)
			closedir(d);
		else if (fd >= 0)
			close(fd);
	}
	/* 3. Staging areas of a mount (incoming/<kind>/<name>) that no daemon holds. */
	{
		int lfd = openat(s->dirfd, "incoming/lock", O_RDWR | O_CLOEXEC);
		static const char *const kinds[] = { "incoming/by-hash", "incoming/import" };
		if (lfd >= 0 && flock(lfd, LOCK_EX | LOCK_NB) == 0) {
			for (int kd = 0; kd < 2; kd++) {
				int fd = openat(s->dirfd, kinds[kd], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
				DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
				struct dirent *a;
				while (d && (a = readdir(d))) {
					char rel[600];
					if (!strcmp(a->d_name, ".") || !strcmp(a->d_name, ".."))
						continue;
					snprintf(rel, sizeof(rel), "%s/%s", kinds[kd], a->d_name);
					rm_tree(s->dirfd, rel, &r->bytes);
					r->staging++;
				}
				if (d)
					closedir(d);
				else if (fd >= 0)
					close(fd);
			}
			flock(lfd, LOCK_UN);
		}
		if (lfd >= 0)
			close(lfd);
	}
	rc = 0;
out_free:
	for (size_t i = 0; i < ndead; i++)
		free(dead[i]);
	free(dead);
out_unlock:
	flock(s->lockfd, LOCK_UN);
	return rc;
}

/* ---- verify ------------------------------------------------------------------------- */

struct verify_ctx {
	ckv_store *s;
	ckv_verify_fn fn;
	void *arg;
	ckv_progress_fn progress;
	void *parg;
	int problems;
	uint64_t done, total;
	char **checked; /* segments already checked */
	size_t nchecked, cap;
};

static void vreport(struct verify_ctx *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void vreport(struct verify_ctx *v, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	v->problems++;
	if (v->fn)
		v->fn(v->arg, msg);
}

static int verify_segment(struct verify_ctx *v, const ckv_manifest *m, const char *segid)
{
	ckv_store *s = v->s;
	uint64_t *sums = NULL, cb = m->geom.chunk_bytes;
	uint32_t chunks, run = (uint32_t)(IO_RUN / cb) ? (uint32_t)(IO_RUN / cb) : 1;
	uint8_t *buf;
	char rel[320];
	ckv_err e;
	int rc;

	for (size_t i = 0; i < v->nchecked; i++)
		if (!strcmp(v->checked[i], segid))
			return 0;
	if (v->nchecked == v->cap) {
		size_t nc = v->cap ? 2 * v->cap : 64;
		char **n = realloc(v->checked, nc * sizeof(*n));
		if (!n)
			return -ENOMEM;
		v->checked = n;
		v->cap = nc;
	}
	v->checked[v->nchecked++] = strdup(segid);

	ckv_segment_path(segid, rel, sizeof(rel));
	rc = ckv_segment_sums(s, segid, &m->geom, &sums, &chunks, &e);
	if (rc) {
		vreport(v, "%s", e.msg);
		return 0;
	}
	buf = malloc((size_t)run * cb);
	if (!buf) {
		free(sums);
		return -ENOMEM;
	}
	for (uint32_t l = 0; l < m->geom.layers; l++) {
		char name[32], path[400];
		struct stat st;
		int fd;
		ckv_layer_name(l, name);
		snprintf(path, sizeof(path), "%s/%s", rel, name);
		fd = openat(s->dirfd, path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0 || fstat(fd, &st) < 0) {
			vreport(v, "%s/%s: %s", s->path, path, strerror(errno));
			if (fd >= 0)
				close(fd);
			continue;
		}
		if ((uint64_t)st.st_size != (uint64_t)chunks * cb) {
			vreport(v, "%s/%s: layer %u: %lld bytes, expected %llu", s->path, path, l,
				(long long)st.st_size, (unsigned long long)chunks * cb);
			close(fd);
			continue;
		}
		for (uint32_t j = 0; j < chunks; j += run) {
			uint32_t cnt = chunks - j < run ? chunks - j : run;
			if (read_all(fd, buf, (size_t)cnt * cb, (off_t)j * (off_t)cb)) {
				vreport(v, "%s/%s: layer %u: read error at chunk %u", s->path, path, l, j);
				break;
			}
			for (uint32_t q = 0; q < cnt; q++)
				if (ckv_chunk_sum(buf + (size_t)q * cb, cb) != sums[(size_t)l * chunks + j + q])
					vreport(v, "%s/%s: layer %u chunk %u: checksum mismatch", s->path, path,
						l, j + q);
			v->done += (uint64_t)cnt * cb;
			if (v->progress)
				v->progress(v->parg, "verify", v->done, v->total);
		}
		close(fd);
	}
	free(buf);
	free(sums);
	return 0;
}

static int verify_prefix(struct verify_ctx *v, const ckv_manifest *m)
{
	uint32_t *tokens;
	ckv_hash *chain;
	char hex[CKV_HASH_HEX + 1];
	ckv_err e;
	int rc;

	ckv_hash_hex(&m->hash, hex);
	rc = prefix_tokens(v->s, m, &tokens, &e);
	if (rc) {
		vreport(v, "prefix %s: tokens: %s", hex, e.msg);
	} else {
		chain = malloc(sizeof(*chain) * m->chunks);
		if (!chain) {
			free(tokens);
			return -ENOMEM;
		}
		ckv_chain(&m->geom, tokens, m->tokens, chain);
		if (!ckv_hash_eq(&chain[m->chunks - 1], &m->hash))
			vreport(v, "prefix %s: its segments' tokens hash to a different prefix", hex);
		free(chain);
		free(tokens);
	}
	for (uint32_t i = 0; i < m->nextents; i++) {
		rc = verify_segment(v, m, m->extents[i].segment);
		if (rc)
			return rc;
	}
	return 0;
}

static int verify_total(void *arg, const ckv_manifest *m)
{
	struct verify_ctx *v = arg;
	v->total += (uint64_t)m->chunks * m->geom.chunk_bytes * m->geom.layers;
	return 0;
}

static int verify_one(void *arg, const ckv_manifest *m)
{
	return verify_prefix(arg, m);
}

int ckv_store_verify(ckv_store *s, const ckv_hash *h, ckv_verify_fn fn, void *arg,
		     ckv_progress_fn prog, void *parg)
{
	struct verify_ctx v = { .s = s, .fn = fn, .arg = arg, .progress = prog, .parg = parg };
	int rc;

	if (h) {
		ckv_manifest *m;
		ckv_err e;
		rc = ckv_store_get(s, h, &m, &e);
		if (rc)
			return rc;
		verify_total(&v, m);
		rc = verify_prefix(&v, m);
		ckv_manifest_free(m);
		free(m);
	} else {
		ckv_store_list(s, verify_total, &v);
		rc = ckv_store_list(s, verify_one, &v);
	}
	for (size_t i = 0; i < v.nchecked; i++)
		free(v.checked[i]);
	free(v.checked);
	return rc < 0 ? rc : v.problems;
}

/* ---- reindex ------------------------------------------------------------------------- */

/*
 * Write keyq.bin for a segment written before key copies existed (its
 * tokens.bin says how many tokens it holds): the layer files are read
 * twice, for the scales and for the codes, and the file appears by rename.
 * 1 when written, 0 when it was there, or -errno.
 */
static int segment_keyq_fill(ckv_store *s, const char *segid, const ckv_geom *g)
{
	char dir[320], path[400], tmp[400], name[32];
	uint64_t cb = g->chunk_bytes;
	uint32_t c = g->chunk_tokens, run = (uint32_t)(IO_RUN / cb) ? (uint32_t)(IO_RUN / cb) : 1;
	uint64_t kql, ntok;
	uint32_t chunks;
	uint8_t *out = NULL, *buf = NULL, hdr[CKV_SIDE_HEADER];
	struct stat st;
	int fd = -1, rc = 0;

	ckv_segment_path(segid, dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/keyq.bin", dir);
	if (faccessat(s->dirfd, path, F_OK, 0) == 0)
		return 0;
	snprintf(tmp, sizeof(tmp), "%s/tokens.bin", dir);
	if (fstatat(s->dirfd, tmp, &st, 0) < 0)
		return -errno;
	ntok = (uint64_t)st.st_size / 4;
	chunks = (uint32_t)((ntok + c - 1) / c);
	if (!chunks)
		return -EUCLEAN;
	kql = ckv_keyq_layer_bytes(g, CKV_KEYQ_BITS, chunks);
	out = malloc(kql * g->layers);
	buf = aligned_alloc(CKV_ALIGN, (size_t)run * cb);
	if (!out || !buf) {
		rc = -ENOMEM;
		goto out;
	}
	for (uint32_t l = 0; l < g->layers && rc == 0; l++) {
		ckv_layer_name(l, name);
		snprintf(tmp, sizeof(tmp), "%s/%s", dir, name);
		fd = openat(s->dirfd, tmp, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || fstat(fd, &st) < 0 || (uint64_t)st.st_size != chunks * cb) {
			rc = fd < 0 ? -errno : -EUCLEAN;
			break;
		}
		rc = keyq_layer_build(g, fd, chunks, ntok, NULL, NULL, buf, out + (size_t)l * kql);
		close(fd);
		fd = -1;
	}
	if (rc)
		goto out;
	side_header(CKV_KEYQ_MAGIC, g, chunks, hdr);
	snprintf(tmp, sizeof(tmp), "%s/keyq.bin.tmp", dir);
	unlinkat(s->dirfd, tmp, 0); /* a crashed attempt's */
	rc = write_new_file(s, s->dirfd, dir, "keyq.bin.tmp", hdr, sizeof(hdr), out, kql * g->layers, NULL);
	if (rc == 0 && renameat(s->dirfd, tmp, s->dirfd, path) < 0)
		rc = -errno;
	if (rc == 0)
		rc = fsync_dir(s, s->dirfd, dir) < 0 ? -EIO : 1;
	else
		unlinkat(s->dirfd, tmp, 0);
out:
	if (fd >= 0)
		close(fd);
	free(out);
	free(buf);
	return rc;
}

/* Index one store record read from prefix/xx/<hash>.json (reindex). */
static int reindex_one(ckv_store *s, MDB_txn *txn, const char *json, size_t len, const char *rel,
		       uint64_t *keyq_written)
{
	ckv_manifest m;
	uint32_t *tokens = NULL;
	ckv_hash *chain = NULL;
	uint32_t pos = 0;
	MDB_val k, v;
	int rc;

	if (ckv_manifest_parse(&m, json, len, true, rel, NULL))
		return 0; /* not a record: gc removes it */
	rc = prefix_tokens(s, &m, &tokens, NULL);
	if (rc) {
		/* its segments are gone or damaged: leave it out, like a hash mismatch */
		if (rc != -ENOMEM)
			rc = 0;
		goto out;
	}
	chain = malloc(sizeof(*chain) * m.chunks);
	if (!chain) {
		rc = -ENOMEM;
		goto out;
	}
	ckv_chain(&m.geom, tokens, m.tokens, chain);
	if (!ckv_hash_eq(&chain[m.chunks - 1], &m.hash))
		goto out; /* its segments hash to something else: leave it out */
	/* Segment rows: chunk counts from their sums, chain hashes from this prefix. */
	for (uint32_t i = 0; i < m.nextents; pos += m.extents[i].count, i++) {
		const ckv_extent *x = &m.extents[i];
		struct seg_row row;
		const uint8_t *links;
		uint8_t *buf;
		if (seg_get(s, txn, x->segment, &row, &links) != 0) {
			uint64_t *sums;
			uint32_t chunks;
			if (ckv_segment_sums(s, x->segment, &m.geom, &sums, &chunks, NULL) < 0)
				goto out;
			free(sums);
			memset(&row, 0, sizeof(row));
			row.chunks = chunks;
			row.seed = m.geom.seed;
			row.chunk_tokens = m.geom.chunk_tokens;
			row.last_ntok = m.geom.chunk_tokens;
			links = NULL;
		}
		if (x->first + (uint64_t)x->count > row.chunks)
			goto out;
		/* segments written before key copies existed get one */
		rc = segment_keyq_fill(s, x->segment, &m.geom);
		if (rc < 0)
			goto out;
		*keyq_written += (uint64_t)rc;
		rc = 0;
		buf = calloc(row.chunks, 16);
		if (!buf) {
			rc = -ENOMEM;
			goto out;
		}
		if (links)
			memcpy(buf, links, (size_t)row.chunks * 16);
		for (uint32_t q = 0; q < x->count; q++)
			memcpy(buf + 16 * ((size_t)x->first + q), chain[pos + q].b, 16);
		if (x->first + x->count == row.chunks && pos + x->count == m.chunks)
			row.last_ntok = m.tokens - (m.chunks - 1) * m.geom.chunk_tokens;
		rc = seg_put(s, txn, x->segment, &row, buf);
		free(buf);
		if (rc)
			goto out;
	}
	rc = refs_add(s, txn, &m, chain, NULL, 0, false);
	if (rc)
		goto out;
	k.mv_size = 16;
	k.mv_data = m.hash.b;
	v.mv_size = len;
	v.mv_data = (void *)json;
	rc = mdb_errno(mdb_put(txn, s->db_prefix, &k, &v, 0));
out:
	free(chain);
	free(tokens);
	ckv_manifest_free(&m);
	return rc;
}

/* After all records are in: point every chain hash at a segment holding it. */
static int reindex_links(ckv_store *s, MDB_txn *txn)
{
	MDB_cursor *cur;
	MDB_val k, v;
	char **ids = NULL;
	size_t n = 0, cap = 0;
	int rc = mdb_cursor_open(txn, s->db_seg, &cur);
	if (rc)
		return mdb_errno(rc);
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if (n == cap) {
			char **ni = realloc(ids, (cap = cap ? 2 * cap : 64) * sizeof(*ids));
			if (!ni)
				break;
			ids = ni;
		}
		ids[n++] = strndup(k.mv_data, k.mv_size);
	}
	mdb_cursor_close(cur);
	rc = 0;
	for (size_t i = 0; i < n; i++) {
		struct seg_row row;
		const uint8_t *links;
		uint8_t *copy;
		if (!ids[i] || seg_get(s, txn, ids[i], &row, &links))
			continue;
		copy = malloc((size_t)row.chunks * 16 + 1);
		if (copy) {
			memcpy(copy, links, (size_t)row.chunks * 16);
			if (!rc)
				rc = links_add(s, txn, ids[i], &row, copy);
			free(copy);
		}
	}
	for (size_t i = 0; i < n; i++)
		free(ids[i]);
	free(ids);
	return rc;
}

struct reindex_walk {
	uint64_t keyq_written;
	ckv_store *s;
	MDB_txn *txn;
};

static int reindex_record(void *arg, const char *rel, const char *name)
{
	struct reindex_walk *w = arg;
	char *json = NULL;
	size_t len = 0;
	int rc;

	if (strlen(name) != CKV_HASH_HEX + 5)
		return 0;
	if (slurp_at(w->s->dirfd, rel, MANIFEST_MAX, &json, &len))
		return 0;
	rc = reindex_one(w->s, w->txn, json, len, rel, &w->keyq_written);
	free(json);
	return rc;
}

int ckv_store_reindex(ckv_store *s, uint64_t *keyq_written, ckv_err *e)
{
	MDB_txn *txn;
	uint64_t written = 0;
	int rc;

	if (flock(s->lockfd, LOCK_EX) < 0)
		return ckv_errf(e, -errno, "%s/lock: %s", s->path, strerror(errno));
	rc = mdb_txn_begin(s->env, NULL, 0, &txn);
	if (rc) {
		rc = ckv_errf(e, mdb_errno(rc), "%s: index: %s", s->path, mdb_strerror(rc));
		goto out_unlock;
	}
	if ((rc = mdb_drop(txn, s->db_prefix, 0)) || (rc = mdb_drop(txn, s->db_chain, 0)) ||
	    (rc = mdb_drop(txn, s->db_seg, 0)) || (rc = mdb_drop(txn, s->db_segref, 0))) {
		mdb_txn_abort(txn);
		rc = ckv_errf(e, mdb_errno(rc), "%s: index: %s", s->path, mdb_strerror(rc));
		goto out_unlock;
	}
	{
		struct reindex_walk w = { .s = s, .txn = txn };
		rc = walk_sharded(s, "prefix", false, reindex_record, &w);
		written = w.keyq_written;
	}
	if (!rc)
		rc = reindex_links(s, txn);
	if (!rc)
		rc = bump_generation(s, txn);
	if (rc) {
		mdb_txn_abort(txn);
		rc = ckv_errf(e, rc, "%s: index: cannot rebuild: %s", s->path, strerror(-rc));
		goto out_unlock;
	}
	if ((rc = mdb_txn_commit(txn)))
		rc = ckv_errf(e, mdb_errno(rc), "%s: index: cannot commit: %s", s->path, mdb_strerror(rc));
	if (keyq_written)
		*keyq_written = written;
out_unlock:
	flock(s->lockfd, LOCK_UN);
	return rc;
}

/* ---- retention ------------------------------------------------------------------------ */

struct ret_val {
	double importance, freq;
	int64_t last;
};

static size_t ret_key(uint8_t *k, const ckv_retention *r)
{
	int n = snprintf((char *)k, 100, "%s/%u", r->segment, r->layer);
	k[n] = 0;
	be32(k + n + 1, r->chunk);
	return (size_t)n + 5;
}

int ckv_store_retention_put(ckv_store *s, const ckv_retention *r, size_t n)
{
	MDB_txn *txn;
	int rc = mdb_txn_begin(s->env, NULL, 0, &txn);
	if (rc)
		return mdb_errno(rc);
	for (size_t i = 0; i < n; i++) {
		uint8_t key[128];
		struct ret_val rv = { r[i].importance, r[i].freq, r[i].last };
		MDB_val k = { ret_key(key, &r[i]), key }, v = { sizeof(rv), &rv };
		if ((rc = mdb_put(txn, s->db_ret, &k, &v, 0))) {
			mdb_txn_abort(txn);
			return mdb_errno(rc);
		}
	}
	return mdb_errno(mdb_txn_commit(txn));
}

static int ret_cmp(const void *a, const void *b)
{
	const ckv_retention *x = a, *y = b;
	double sx = x->importance * x->freq, sy = y->importance * y->freq;
	return sx < sy ? 1 : sx > sy ? -1 : 0;
}

int ckv_store_retention_top(ckv_store *s, size_t max, ckv_retention **out, size_t *n)
{
	MDB_txn *txn;
	MDB_cursor *cur;
	MDB_val k, v;
	ckv_retention *all = NULL;
	size_t cnt = 0, cap = 0;
	int rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn);
	if (rc)
		return mdb_errno(rc);
	rc = mdb_cursor_open(txn, s->db_ret, &cur);
	if (rc) {
		mdb_txn_abort(txn);
		return mdb_errno(rc);
	}
	for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		const char *ks = k.mv_data;
		size_t sl = strnlen(ks, k.mv_size);
		const char *slash;
		struct ret_val rv;
		ckv_retention *r;
		if (sl + 5 != k.mv_size || v.mv_size != sizeof(rv))
			continue;
		if (cnt == cap) {
			cap = cap ? 2 * cap : 256;
			ckv_retention *na = realloc(all, cap * sizeof(*all));
			if (!na) {
				rc = -ENOMEM;
				break;
			}
			all = na;
		}
		r = &all[cnt];
		memset(r, 0, sizeof(*r));
		slash = memrchr(ks, '/', sl);
		if (!slash || (size_t)(slash - ks) >= sizeof(r->segment))
			continue;
		memcpy(r->segment, ks, (size_t)(slash - ks));
		r->layer = (uint32_t)strtoul(slash + 1, NULL, 10);
		r->chunk = lbe32((const uint8_t *)ks + sl + 1);
		memcpy(&rv, v.mv_data, sizeof(rv));
		r->importance = rv.importance;
		r->freq = rv.freq;
		r->last = rv.last;
		cnt++;
	}
	mdb_cursor_close(cur);
	mdb_txn_abort(txn);
	if (rc == -ENOMEM) {
		free(all);
		return rc;
	}
	if (cnt)
		qsort(all, cnt, sizeof(*all), ret_cmp);
	if (cnt > max)
		cnt = max;
	*out = all;
	*n = cnt;
	return 0;
}
