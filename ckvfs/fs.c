/*
 * fs.c — the ckvfs FUSE low-level front end (DESIGN §4).
 *
 * The mounted view:
 *   /by-hash/<hash>/{manifest.json,tokens.bin,sums.xxh3,layer_NNN.kv}
 *   /by-model/<org>/<name>/<hash> -> ../../../by-hash/<hash>
 *   /import/                        (write side: a later issue; see "import hooks")
 *   /.ckv/stats                     JSON counters, regenerated at each open
 * Every file of a published prefix is byte-identical to `ckv export`.
 *
 * Inode numbers. Fixed nodes (root, by-hash, ...) have small numbers. Every
 * other inode is (id << 12) | idx: a prefix's id comes from its hash (top
 * bit set), idx says which file of it (dir, manifest, tokens, sums, the
 * by-model symlink, layer 0...1023); by-model directories get small ids in
 * order of first use, idx 0xfff. Prefix ids are a function of the hash, so
 * readdir can report the d_ino that lookup will return without touching the
 * table, and a prefix that is removed and imported again is the same inode.
 * (Two hashes whose 51 id bits collide get the next free id; then readdir's
 * d_ino of the second one is wrong, nothing else.)
 *
 * Reads. A layer file is the prefix's chunks concatenated across extents;
 * a read maps its range to chunks, gets them pinned from the chunk engine
 * (CKV_GET_STREAM when the handle reads sequentially, CKV_GET_DEMAND
 * otherwise), replies with an iovec pointing into the arena slots (the only
 * copy is the kernel's, into the request pages) and releases the slots.
 * A chunk that fails its checksum fails the read that touches it: with
 * direct_io the read returns the bytes before it (a short read) and the next
 * read, starting at the bad chunk, gets EIO; through the page cache the
 * whole request fails (a short read there would shrink the file), and the
 * kernel retries the pages the reader needs one by one, so again only reads
 * touching that chunk see EIO.
 *
 * Page cache or direct_io (docs/FILESYSTEM.md has the numbers). libfuse
 * 3.14 cannot ask the kernel to allow shared mmap of a direct_io file
 * (FUSE_DIRECT_IO_ALLOW_MMAP came with 3.16), and np.memmap / torch.from_file
 * use shared mappings. So by default layer files go through the page cache
 * with keep_cache (published files never change, so cached pages stay
 * valid across opens), 1 MiB requests, async reads and a read-ahead window
 * raised on the mount's bdi after init (-o read_ahead_kb). -o direct_io
 * sends every read to the daemon instead (no double caching, exact engine
 * statistics, no shared mmap; sequential readers get the daemon's own
 * read-ahead); a file opened with O_DIRECT gets direct_io in either mode.
 * Measured on the 2-core VM both modes read cold at 0.7-0.8 of O_DIRECT
 * reads of the segment files, CPU-bound (arena first-touch faults, the
 * kernel's copies, XXH3), so mmap support decided the default.
 *
 * Store changes. The store's generation is polled on lookup/readdir (at most
 * every 0.5 s) and by a watcher thread every 0.25 s. A prefix the kernel
 * knows that is gone from the store is marked removed and its dentries are
 * invalidated (from the watcher thread: notifications must not be sent from
 * a request of the same directory). Open handles keep their own reference
 * to the prefix data (its ckv_pview: record, segment sums) and to their
 * engine files, so a removed prefix's open files read on.
 *
 * Locking. fs->lock protects the prefix table, the by-model directory
 * table, the cached model index pointer, the generation and the watcher's
 * flags; it is never held across store, engine or FUSE reply calls. Prefix
 * data, views, open files and the model index are reference counted; a read
 * holds its file handle (the kernel may send RELEASE as soon as the reply
 * is written).
 */
#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 14)

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <fuse_lowlevel.h>

#include "ckv_engine.h"
#include "ckv_format.h"
#include "ckv_pview.h"
#include "ckv_store.h"
#include "fs.h"

/* ---- constants ------------------------------------------------------------- */

enum {
	INO_ROOT = FUSE_ROOT_ID,
	INO_BY_HASH = 2,
	INO_BY_MODEL = 3,
	INO_IMPORT = 4,
	INO_CTL = 5,
	INO_STATS = 6,
	INO_CTLSOCK = 7, /* /.ckv/ctl: symlink to the control socket */
	INO_FIXED_LAST = INO_CTLSOCK,
};

#define IDX_BITS 12
#define IDX_MASK ((1u << IDX_BITS) - 1)
enum {
	IDX_DIR = 0,
	IDX_MANIFEST = 1,
	IDX_TOKENS = 2,
	IDX_SUMS = 3,
	IDX_LINK = 4,
	IDX_LAYER0 = 8, /* layer l is IDX_LAYER0 + l, l < CKV_MAX_LAYERS */
	IDX_MDIR = 0xfff,
};
#define PFX_ID_BIT (1ull << 51) /* set in every prefix id, never in a by-model dir id */

#define TMO_STATIC 3600.0  /* names and attributes that never change */
#define TMO_DYNAMIC 1.0    /* by-hash / by-model entries: store changes show within a second */
#define POLL_MIN_NS 500000000ll  /* generation polls from requests, at most this often */
#define WATCH_NS 250000000ll     /* the watcher's period */

#define READ_MAX (1u << 20)        /* max_read / max_write: 1 MiB requests */
#define HINT_MAX 65536             /* longest hint value accepted */
#define STREAM_SLACK (4ull << 20)  /* async read-ahead may reorder requests this much */
#define STREAM_MIN (1ull << 20)    /* a run from offset 0 is a stream past this */
#define RA_BYTES (4ull << 20)      /* daemon read-ahead of direct_io streams */
#define SLOTS_ON_STACK 64
#define RETENTION_LOAD_MAX (1u << 18)

#define XA_WILLNEED "user.ckv.willneed"
#define XA_SCORES "user.ckv.scores"
#define XA_RESIDENT "user.ckv.resident"

static const char SYMLINK_UP[] = "../../../by-hash/";

/* The fixed part of the tree; the root's children first, in listing order. */
static const struct {
	fuse_ino_t parent, ino;
	const char *name;
} fixed_nodes[] = {
	{ INO_ROOT, INO_BY_HASH, "by-hash" }, { INO_ROOT, INO_BY_MODEL, "by-model" },
	{ INO_ROOT, INO_IMPORT, "import" },   { INO_ROOT, INO_CTL, ".ckv" },
	{ INO_CTL, INO_STATS, "stats" },    { INO_CTL, INO_CTLSOCK, "ctl" },
};

/* ---- types ----------------------------------------------------------------- */

/*
 * What ckvfs serves of one prefix: its view (ckv_pview: the store record
 * mapped onto the engine's chunk files, shared with the control socket and
 * the embedded loader so that all three name a physical chunk alike) and
 * the generated manifest.json. Shared by the prefix node and by every open
 * handle; freed with the last reference.
 */
struct pdata {
	atomic_uint refs;
	ckv_pview *v;
	const ckv_manifest *m;     /* ckv_pview_manifest(v) */
	char hex[CKV_HASH_HEX + 1];
	char org[CKV_MAX_MODEL_ID + 2], name[CKV_MAX_MODEL_ID + 2]; /* by-model names */
	char *json;                /* exported manifest.json */
	size_t json_len;
};

/* A prefix the kernel holds inodes of (lookup count > 0). */
struct pfx {
	struct pfx *next;          /* hash chain; fs->lock */
	uint64_t id;               /* immutable */
	ckv_hash hash;             /* immutable */
	uint64_t nlookup;          /* fs->lock: sum over the prefix's inodes */
	uint64_t checked_gen;      /* fs->lock: store generation it was last verified at */
	bool removed;              /* fs->lock: gone from the store */
	struct pdata *pd;          /* fs->lock: a reference */
};

/* A by-model directory: org (name == NULL) or org/name. Never freed. */
struct mdir {
	char *org, *name;
};

/* The by-model view of the store at one generation. */
struct mentry {
	char *org, *name;
	ckv_hash hash;
};
struct mindex {
	atomic_uint refs;
	uint64_t gen;
	size_t n, cap;
	struct mentry *e;          /* sorted by (org, name, hash) */
};

enum fh_kind { FH_BUF, FH_LAYER };

/*
 * An open file. Referenced by the open (dropped at release) and by each
 * read while it runs: the kernel may send RELEASE as soon as a read's reply
 * is written, so a read must not touch the handle after replying without
 * its own reference.
 */
struct fh {
	atomic_uint refs;
	enum fh_kind kind;
	struct pdata *pd;          /* a reference; NULL for /.ckv/stats */
	bool direct;               /* opened with direct_io */
	/* FH_BUF */
	char *buf;
	size_t len;
	bool own_buf;
	/* FH_LAYER */
	uint32_t layer;
	ckv_efile **files;         /* [nextents], a reference each */
	_Atomic uint64_t last_end; /* end of the previous read: stream detection */
	_Atomic uint64_t run_start; /* where the current sequential run began */
	_Atomic uint32_t ra_next;  /* direct_io streams: first chunk not yet read ahead */
};

/* An open directory: a snapshot of its entries taken at opendir. */
struct dent {
	fuse_ino_t ino;
	mode_t mode;
	size_t name; /* offset into pool */
};
struct dirh {
	size_t n, cap;
	struct dent *d;
	char *pool;
	size_t pool_len, pool_cap;
};

struct ckvfs {
	struct ckvfs_config cfg;
	char *store_path, *mountpoint;  /* copies of cfg's strings */
	ckv_store *store;
	ckv_engine *engine;
	struct fuse_session *se;
	uid_t uid;
	gid_t gid;
	struct timespec started;

	pthread_mutex_t lock;           /* see "Locking" above */
	struct pfx **buckets;           /* fs->lock */
	size_t nbuckets, npfx;          /* fs->lock */
	struct mdir *mdirs;             /* fs->lock */
	size_t nmdirs, mdirs_cap;       /* fs->lock */
	struct mindex *mindex;          /* fs->lock: a reference, or NULL */
	uint64_t gen, nprefixes;        /* fs->lock: last seen store generation */
	int64_t polled_ns;              /* fs->lock: when gen was last polled */
	bool rescan;                    /* fs->lock: gen moved; the watcher checks known prefixes */
	bool stop;                      /* fs->lock */
	bool initialized;               /* fs->lock: init op ran */
	pthread_cond_t cond;            /* fs->lock: wakes the watcher */
	pthread_t watcher;
	bool watcher_running;

	_Atomic uint64_t reads, read_bytes, read_errors, stream_reads;
	_Atomic uint64_t hints_willneed, hints_scores, hints_rejected;
	_Atomic uint64_t invalidations, retention_loaded, retention_saved, warm_chunks;
	_Atomic uint64_t ra_chunks;     /* chunks read ahead for direct_io streams */
	_Atomic uint64_t ra_inflight;   /* of those, not yet delivered; drained before close */
};

/* ---- small helpers -------------------------------------------------------- */

static struct ckvfs *fs_of(fuse_req_t req)
{
	return fuse_req_userdata(req);
}

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

static uint64_t ino_id(fuse_ino_t ino)
{
	return (uint64_t)ino >> IDX_BITS;
}

static unsigned ino_idx(fuse_ino_t ino)
{
	return (unsigned)(ino & IDX_MASK);
}

static fuse_ino_t make_ino(uint64_t id, unsigned idx)
{
	return (fuse_ino_t)(id << IDX_BITS | idx);
}

static bool is_pfx_ino(fuse_ino_t ino)
{
	return ino_id(ino) & PFX_ID_BIT;
}

static bool is_mdir_ino(fuse_ino_t ino)
{
	return !is_pfx_ino(ino) && ino_id(ino) != 0 && ino_idx(ino) == IDX_MDIR;
}

static uint64_t pfx_id_of(const ckv_hash *h)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v = v << 8 | h->b[i];
	return (v & (PFX_ID_BIT - 1)) | PFX_ID_BIT;
}

static struct timespec ts_of(int64_t sec, uint32_t nsec)
{
	struct timespec t = { .tv_sec = (time_t)sec, .tv_nsec = nsec };
	return t;
}

/* "Qwen/Qwen2.5-7B" -> org "Qwen", name "Qwen2.5-7B"; "gpt2" -> "_", "gpt2". */
static void model_split(const char *model, char *org, char *name, size_t len)
{
	const char *slash = strchr(model, '/');
	char *parts[2] = { org, name };

	if (!slash) {
		snprintf(org, len, "_");
		snprintf(name, len, "%s", model);
	} else {
		snprintf(org, len, "%.*s", (int)(slash - model), model);
		snprintf(name, len, "%s", slash + 1);
	}
	for (int i = 0; i < 2; i++) {
		char *s = parts[i];
		for (char *p = s; *p; p++)
			if (*p == '/')
				*p = '_';
		if (!*s || !strcmp(s, ".") || !strcmp(s, "..")) {
			memmove(s + 1, s, strlen(s) + 1);
			s[0] = '_';
		}
	}
}

/* ---- prefix data ------------------------------------------------------------ */

static void pdata_get(struct pdata *pd)
{
	atomic_fetch_add(&pd->refs, 1);
}

static void pdata_put(struct pdata *pd)
{
	if (!pd)
		return;
	assert(atomic_load(&pd->refs) > 0);
	if (atomic_fetch_sub(&pd->refs, 1) != 1)
		return;
	free(pd->json);
	ckv_pview_put(pd->v);
	free(pd);
}

/* Take ownership of m (a store record) and build the prefix data. */
static int pdata_new(struct ckvfs *fs, ckv_manifest *m, struct pdata **out)
{
	ckv_err err = { { 0 } };
	struct pdata *pd;
	char hex[CKV_HASH_HEX + 1];
	int rc;

	ckv_hash_hex(&m->hash, hex);
	pd = calloc(1, sizeof(*pd));
	if (!pd) {
		ckv_manifest_free(m);
		free(m);
		return -ENOMEM;
	}
	atomic_init(&pd->refs, 1);
	rc = ckv_pview_from(fs->store, fs->engine, m, &pd->v, &err); /* takes m */
	if (rc < 0) {
		fuse_log(FUSE_LOG_ERR, "ckvfs: prefix %s: %s\n", hex, err.msg[0] ? err.msg : strerror(-rc));
		free(pd);
		return rc;
	}
	pd->m = ckv_pview_manifest(pd->v);
	memcpy(pd->hex, hex, sizeof(hex));
	model_split(pd->m->geom.model, pd->org, pd->name, sizeof(pd->org));
	if (pd->m->geom.layers > CKV_MAX_LAYERS ||
	    (uint64_t)pd->m->chunks * pd->m->geom.chunk_tokens < pd->m->tokens) {
		fuse_log(FUSE_LOG_ERR, "ckvfs: prefix %s: %u layers, %u chunks for %u tokens\n", hex,
			 pd->m->geom.layers, pd->m->chunks, pd->m->tokens);
		rc = -EIO;
		goto out_put;
	}
	rc = ckv_manifest_emit(pd->m, false, &pd->json, &pd->json_len);
	if (rc < 0)
		goto out_put;
	*out = pd;
	return 0;
out_put:
	pdata_put(pd);
	return rc;
}

/* Whether two records of one hash point at the same chunks. */
static bool same_extents(const ckv_manifest *a, const ckv_manifest *b)
{
	if (a->nextents != b->nextents)
		return false;
	for (uint32_t e = 0; e < a->nextents; e++)
		if (strcmp(a->extents[e].segment, b->extents[e].segment) ||
		    a->extents[e].first != b->extents[e].first ||
		    a->extents[e].count != b->extents[e].count)
			return false;
	return true;
}

/*
 * Register the engine files of layer l, one per extent, into files[]
 * (nextents entries, a reference each; layer_put drops them). The engine
 * keeps a file's cached chunks and scores after its last reference goes;
 * holding references only while a file is open keeps descriptors few.
 */
static int layer_get(struct pdata *pd, uint32_t l, ckv_efile **files)
{
	int rc = ckv_pview_files_get(pd->v, l, CKV_PV_KV, files);

	if (rc < 0)
		fuse_log(FUSE_LOG_ERR, "ckvfs: prefix %s: layer %u: %s\n", pd->hex, l, strerror(-rc));
	return rc;
}

static void layer_put(const struct pdata *pd, ckv_efile **files)
{
	ckv_pview_files_put(pd->v, files);
}

/* Engine reference of prefix chunk j of a layer's files. */
static ckv_chunk_ref chunk_ref(const struct pdata *pd, ckv_efile **files, uint32_t j)
{
	return ckv_pview_ref(pd->v, files, j);
}

/* tokens.bin: the prefix's tokens, u32 little-endian. */
static int pdata_tokens(struct ckvfs *fs, struct pdata *pd, char **out, size_t *len)
{
	ckv_err err = { { 0 } };
	uint32_t *t = NULL;
	uint8_t *p;
	int rc;

	rc = ckv_store_tokens(fs->store, pd->m, &t, &err);
	if (rc < 0) {
		fuse_log(FUSE_LOG_ERR, "ckvfs: prefix %s: tokens: %s\n", pd->hex,
			 err.msg[0] ? err.msg : strerror(-rc));
		return rc;
	}
	p = (uint8_t *)t;
	for (uint32_t i = 0; i < pd->m->tokens; i++, p += 4) {
		uint32_t v = t[i];
		p[0] = (uint8_t)v;
		p[1] = (uint8_t)(v >> 8);
		p[2] = (uint8_t)(v >> 16);
		p[3] = (uint8_t)(v >> 24);
	}
	*out = (char *)t;
	*len = (size_t)pd->m->tokens * 4;
	return 0;
}

/* sums.xxh3: header, then every chunk's XXH3-64 [layer][chunk], canonical BE. */
static int pdata_sums_file(struct pdata *pd, char **out, size_t *len)
{
	const ckv_manifest *m = pd->m;
	size_t total = CKV_SIDE_HEADER + (size_t)m->geom.layers * m->chunks * 8;
	ckv_side_header h = { .version = CKV_FORMAT_VERSION, .layers = m->geom.layers,
			      .chunks = m->chunks, .per_chunk = 1 };
	uint64_t *sums = malloc((m->chunks ? m->chunks : 1) * sizeof(*sums));
	uint8_t *buf = malloc(total), *p;
	int rc = -ENOMEM;

	if (!sums || !buf)
		goto out_free;
	memcpy(h.magic, CKV_SUMS_MAGIC, sizeof(h.magic));
	ckv_side_header_encode(&h, buf);
	p = buf + CKV_SIDE_HEADER;
	for (uint32_t l = 0; l < m->geom.layers; l++) {
		rc = ckv_pview_sums(pd->v, l, sums);
		if (rc < 0) {
			fuse_log(FUSE_LOG_ERR, "ckvfs: prefix %s: sums: %s\n", pd->hex, strerror(-rc));
			goto out_free;
		}
		for (uint32_t j = 0; j < m->chunks; j++, p += 8)
			ckv_sum_store(p, sums[j]);
	}
	*out = (char *)buf;
	*len = total;
	buf = NULL;
	rc = 0;
out_free:
	free(sums);
	free(buf);
	return rc;
}

/* ---- attributes ------------------------------------------------------------ */

static void attr_fill(const struct ckvfs *fs, struct stat *st, fuse_ino_t ino, mode_t mode,
		      nlink_t nlink, uint64_t size, struct timespec mtime, struct timespec ctime)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_mode = mode;
	st->st_nlink = nlink;
	st->st_uid = fs->uid;
	st->st_gid = fs->gid;
	st->st_size = (off_t)size;
	st->st_blocks = (blkcnt_t)((size + 511) / 512);
	st->st_blksize = READ_MAX;
	st->st_atim = mtime;
	st->st_mtim = mtime;
	st->st_ctim = ctime;
}

static uint64_t layer_size(const ckv_manifest *m)
{
	return (uint64_t)m->chunks * m->geom.chunk_bytes;
}

/* Attributes of inode idx of a prefix; -ENOENT when idx names nothing. */
static int pfx_attr(const struct ckvfs *fs, const struct pdata *pd, uint64_t id, unsigned idx,
		    struct stat *st)
{
	const ckv_manifest *m = pd->m;
	struct timespec created = ts_of(m->created, 0), t = created;
	fuse_ino_t ino = make_ino(id, idx);

	switch (idx) {
	case IDX_DIR:
		attr_fill(fs, st, ino, S_IFDIR | 0555, 2, 0, created, created);
		return 0;
	case IDX_MANIFEST:
		if (m->has_times)
			t = ts_of(m->t_manifest.sec, m->t_manifest.nsec);
		attr_fill(fs, st, ino, S_IFREG | 0444, 1, pd->json_len, t, created);
		return 0;
	case IDX_TOKENS:
		if (m->has_times)
			t = ts_of(m->t_tokens.sec, m->t_tokens.nsec);
		attr_fill(fs, st, ino, S_IFREG | 0444, 1, (uint64_t)m->tokens * 4, t, created);
		return 0;
	case IDX_SUMS:
		if (m->has_times)
			t = ts_of(m->t_sums.sec, m->t_sums.nsec);
		attr_fill(fs, st, ino, S_IFREG | 0444, 1,
			  CKV_SIDE_HEADER + (uint64_t)m->geom.layers * m->chunks * 8, t, created);
		return 0;
	case IDX_LINK:
		attr_fill(fs, st, ino, S_IFLNK | 0777, 1, strlen(SYMLINK_UP) + CKV_HASH_HEX, created,
			  created);
		return 0;
	default:
		if (idx < IDX_LAYER0 || idx - IDX_LAYER0 >= m->geom.layers)
			return -ENOENT;
		if (m->has_times && m->t_layers) {
			const ckv_ftime *lt = &m->t_layers[idx - IDX_LAYER0];
			t = ts_of(lt->sec, lt->nsec);
		}
		attr_fill(fs, st, ino, S_IFREG | 0444, 1, layer_size(m), t, created);
		return 0;
	}
}

/* Name of file idx of a prefix directory; false when idx is not one. */
static bool pfx_file_name(const ckv_manifest *m, unsigned idx, char name[32])
{
	switch (idx) {
	case IDX_MANIFEST:
		snprintf(name, 32, "manifest.json");
		return true;
	case IDX_TOKENS:
		snprintf(name, 32, "tokens.bin");
		return true;
	case IDX_SUMS:
		snprintf(name, 32, "sums.xxh3");
		return true;
	default:
		if (idx < IDX_LAYER0 || idx - IDX_LAYER0 >= m->geom.layers)
			return false;
		ckv_layer_name(idx - IDX_LAYER0, name);
		return true;
	}
}

/* The idx a name in a prefix directory stands for; 0 when none. */
static unsigned pfx_file_idx(const ckv_manifest *m, const char *name)
{
	char want[32];
	char *end;
	unsigned long l;

	if (!strcmp(name, "manifest.json"))
		return IDX_MANIFEST;
	if (!strcmp(name, "tokens.bin"))
		return IDX_TOKENS;
	if (!strcmp(name, "sums.xxh3"))
		return IDX_SUMS;
	if (strncmp(name, "layer_", 6) || name[6] < '0' || name[6] > '9')
		return 0;
	errno = 0;
	l = strtoul(name + 6, &end, 10);
	if (errno || strcmp(end, ".kv") || l >= m->geom.layers)
		return 0;
	ckv_layer_name((uint32_t)l, want);
	return strcmp(want, name) ? 0 : IDX_LAYER0 + (unsigned)l;
}

/* ---- store generation ---------------------------------------------------- */

/*
 * Poll the store's generation (cheap: one read transaction), at most every
 * POLL_MIN_NS unless forced. A change wakes the watcher, which checks the
 * prefixes the kernel knows.
 */
static void fs_poll(struct ckvfs *fs, bool force)
{
	uint64_t gen, n;
	int64_t t = now_ns();

	pthread_mutex_lock(&fs->lock);
	if (!force && t - fs->polled_ns < POLL_MIN_NS) {
		pthread_mutex_unlock(&fs->lock);
		return;
	}
	fs->polled_ns = t;
	pthread_mutex_unlock(&fs->lock);

	if (ckv_store_generation(fs->store, &gen, &n) < 0)
		return;
	pthread_mutex_lock(&fs->lock);
	if (gen != fs->gen) {
		fs->gen = gen;
		fs->nprefixes = n;
		fs->rescan = true;
		pthread_cond_signal(&fs->cond);
	}
	pthread_mutex_unlock(&fs->lock);
}

static uint64_t fs_gen(struct ckvfs *fs, uint64_t *nprefixes)
{
	uint64_t g;

	pthread_mutex_lock(&fs->lock);
	g = fs->gen;
	if (nprefixes)
		*nprefixes = fs->nprefixes;
	pthread_mutex_unlock(&fs->lock);
	return g;
}

/* ---- the prefix table ------------------------------------------------------ */

static size_t bucket_of(const struct ckvfs *fs, uint64_t id)
{
	return (size_t)((id * 0x9e3779b97f4a7c15ull) >> 32) & (fs->nbuckets - 1);
}

/* fs->lock held. */
static struct pfx *pfx_by_id(struct ckvfs *fs, uint64_t id)
{
	for (struct pfx *p = fs->buckets[bucket_of(fs, id)]; p; p = p->next)
		if (p->id == id)
			return p;
	return NULL;
}

/* fs->lock held. *free_id is the id a new node for h would get. */
static struct pfx *pfx_by_hash(struct ckvfs *fs, const ckv_hash *h, uint64_t *free_id)
{
	uint64_t id = pfx_id_of(h);

	for (;;) {
		struct pfx *p = pfx_by_id(fs, id);
		if (!p) {
			if (free_id)
				*free_id = id;
			return NULL;
		}
		if (ckv_hash_eq(&p->hash, h))
			return p;
		id = ((id + 1) & (PFX_ID_BIT - 1)) | PFX_ID_BIT;
	}
}

/* fs->lock held. */
static int pfx_insert(struct ckvfs *fs, struct pfx *p)
{
	if (fs->npfx + 1 > fs->nbuckets) {
		size_t nb = fs->nbuckets * 2;
		struct pfx **b = calloc(nb, sizeof(*b));
		struct pfx **old = fs->buckets;
		size_t oldn = fs->nbuckets;

		if (!b)
			return -ENOMEM;
		fs->buckets = b;
		fs->nbuckets = nb;
		for (size_t i = 0; i < oldn; i++)
			while (old[i]) {
				struct pfx *q = old[i];
				size_t k = bucket_of(fs, q->id);
				old[i] = q->next;
				q->next = b[k];
				b[k] = q;
			}
		free(old);
	}
	{
		size_t k = bucket_of(fs, p->id);
		p->next = fs->buckets[k];
		fs->buckets[k] = p;
		fs->npfx++;
	}
	return 0;
}

/* fs->lock held. */
static void pfx_unlink(struct ckvfs *fs, struct pfx *p)
{
	struct pfx **pp = &fs->buckets[bucket_of(fs, p->id)];

	while (*pp != p)
		pp = &(*pp)->next;
	*pp = p->next;
	fs->npfx--;
}

/*
 * Find or create the node of prefix h for a lookup: checks the store unless
 * the node was verified at the current generation, raises nlookup and
 * returns the node's id and a reference to its data. -ENOENT when the store
 * has no such prefix.
 */
static int pfx_acquire(struct ckvfs *fs, const ckv_hash *h, uint64_t *id, struct pdata **pdp)
{
	ckv_manifest *m = NULL;
	struct pdata *pd = NULL;
	struct pfx *p;
	uint64_t gen, free_id;
	int rc;

	fs_poll(fs, false);
	pthread_mutex_lock(&fs->lock);
	gen = fs->gen;
	p = pfx_by_hash(fs, h, NULL);
	if (p && !p->removed && p->checked_gen == gen) {
		p->nlookup++;
		*id = p->id;
		pdata_get(p->pd);
		*pdp = p->pd;
		pthread_mutex_unlock(&fs->lock);
		return 0;
	}
	pthread_mutex_unlock(&fs->lock);

	rc = ckv_store_get(fs->store, h, &m, NULL);
	if (rc == -ENOENT) {
		pthread_mutex_lock(&fs->lock);
		p = pfx_by_hash(fs, h, NULL);
		if (p)
			p->removed = true;
		pthread_mutex_unlock(&fs->lock);
		return -ENOENT;
	}
	if (rc < 0)
		return rc;
	if (!ckv_hash_eq(&m->hash, h)) {
		ckv_manifest_free(m);
		free(m);
		return -EIO;
	}

	pthread_mutex_lock(&fs->lock);
	p = pfx_by_hash(fs, h, &free_id);
	if (p && same_extents(p->pd->m, m)) {
		ckv_manifest_free(m);
		free(m);
		m = NULL;
	}
	pthread_mutex_unlock(&fs->lock);
	if (m) {
		rc = pdata_new(fs, m, &pd);
		if (rc < 0)
			return rc;
	}

	pthread_mutex_lock(&fs->lock);
	p = pfx_by_hash(fs, h, &free_id);
	if (!p) {
		if (!pd) { /* the node went while the lock was dropped: start over */
			pthread_mutex_unlock(&fs->lock);
			return pfx_acquire(fs, h, id, pdp);
		}
		p = calloc(1, sizeof(*p));
		if (p) {
			p->id = free_id;
			p->hash = *h;
		}
		if (!p || pfx_insert(fs, p) < 0) {
			pthread_mutex_unlock(&fs->lock);
			free(p);
			pdata_put(pd);
			return -ENOMEM;
		}
		p->pd = pd;
		pd = NULL;
	} else if (pd && !same_extents(p->pd->m, pd->m)) {
		/* Same hash, other chunks (removed, collected, imported again). */
		struct pdata *old = p->pd;
		p->pd = pd;
		pd = old;
	}
	p->removed = false;
	p->checked_gen = gen;
	p->nlookup++;
	*id = p->id;
	pdata_get(p->pd);
	*pdp = p->pd;
	pthread_mutex_unlock(&fs->lock);
	pdata_put(pd);
	return 0;
}

/* The data of the prefix inode ino belongs to (a reference), or NULL. */
static struct pdata *pfx_data(struct ckvfs *fs, fuse_ino_t ino)
{
	struct pdata *pd = NULL;
	struct pfx *p;

	pthread_mutex_lock(&fs->lock);
	p = pfx_by_id(fs, ino_id(ino));
	if (p) {
		pd = p->pd;
		pdata_get(pd);
	}
	pthread_mutex_unlock(&fs->lock);
	return pd;
}

static void pfx_forget(struct ckvfs *fs, fuse_ino_t ino, uint64_t n)
{
	struct pdata *pd = NULL;
	struct pfx *p;

	pthread_mutex_lock(&fs->lock);
	p = pfx_by_id(fs, ino_id(ino));
	if (p) {
		assert(p->nlookup >= n);
		p->nlookup -= n < p->nlookup ? n : p->nlookup;
		if (!p->nlookup) {
			pfx_unlink(fs, p);
			pd = p->pd;
		} else {
			p = NULL;
		}
	}
	pthread_mutex_unlock(&fs->lock);
	if (pd) {
		pdata_put(pd);
		free(p);
	}
}

/* ---- by-model ------------------------------------------------------------ */

static void mindex_put(struct mindex *ix)
{
	if (!ix)
		return;
	assert(atomic_load(&ix->refs) > 0);
	if (atomic_fetch_sub(&ix->refs, 1) != 1)
		return;
	for (size_t i = 0; i < ix->n; i++) {
		free(ix->e[i].org);
		free(ix->e[i].name);
	}
	free(ix->e);
	free(ix);
}

static int mindex_add(void *arg, const ckv_manifest *m)
{
	struct mindex *ix = arg;
	char org[CKV_MAX_MODEL_ID + 2], name[CKV_MAX_MODEL_ID + 2];
	struct mentry *me;

	if (ix->n == ix->cap) {
		size_t cap = ix->cap ? ix->cap * 2 : 64;
		struct mentry *e = realloc(ix->e, cap * sizeof(*e));
		if (!e)
			return -ENOMEM;
		ix->e = e;
		ix->cap = cap;
	}
	model_split(m->geom.model, org, name, sizeof(org));
	me = &ix->e[ix->n];
	me->org = strdup(org);
	me->name = strdup(name);
	me->hash = m->hash;
	if (!me->org || !me->name) {
		free(me->org);
		free(me->name);
		return -ENOMEM;
	}
	ix->n++;
	return 0;
}

/* Order by (org, name, hash); a NULL name or hash sorts first. */
static int mentry_cmp3(const char *org, const char *name, const ckv_hash *h, const struct mentry *b)
{
	int c = strcmp(org, b->org);

	if (c)
		return c;
	if (!name)
		return -1;
	c = strcmp(name, b->name);
	if (c)
		return c;
	if (!h)
		return -1;
	return memcmp(h->b, b->hash.b, sizeof(h->b));
}

static int mentry_cmp(const void *a, const void *b)
{
	const struct mentry *x = a;
	return mentry_cmp3(x->org, x->name, &x->hash, b);
}

/* First entry >= (org, name, h). */
static size_t mindex_lower(const struct mindex *ix, const char *org, const char *name,
			   const ckv_hash *h)
{
	size_t lo = 0, hi = ix->n;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (mentry_cmp3(org, name, h, &ix->e[mid]) > 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* The by-model index at the current generation (a reference), or NULL. */
static struct mindex *mindex_get(struct ckvfs *fs)
{
	struct mindex *ix;
	uint64_t gen;
	int rc;

	fs_poll(fs, false);
	pthread_mutex_lock(&fs->lock);
	gen = fs->gen;
	ix = fs->mindex;
	if (ix && ix->gen == gen) {
		atomic_fetch_add(&ix->refs, 1);
		pthread_mutex_unlock(&fs->lock);
		return ix;
	}
	pthread_mutex_unlock(&fs->lock);

	ix = calloc(1, sizeof(*ix));
	if (!ix)
		return NULL;
	atomic_init(&ix->refs, 1);
	ix->gen = gen;
	rc = ckv_store_list(fs->store, mindex_add, ix);
	if (rc < 0) {
		fuse_log(FUSE_LOG_ERR, "ckvfs: listing the store for by-model: %s\n", strerror(-rc));
		mindex_put(ix);
		return NULL;
	}
	if (ix->n)
		qsort(ix->e, ix->n, sizeof(*ix->e), mentry_cmp);

	pthread_mutex_lock(&fs->lock);
	if (!fs->mindex || fs->mindex->gen < gen) {
		struct mindex *old = fs->mindex;
		atomic_fetch_add(&ix->refs, 1);
		fs->mindex = ix;
		pthread_mutex_unlock(&fs->lock);
		mindex_put(old);
	} else {
		pthread_mutex_unlock(&fs->lock);
	}
	return ix;
}

/* Id of a by-model directory, created on first use. fs->lock held. 0 on ENOMEM. */
static uint64_t mdir_id(struct ckvfs *fs, const char *org, const char *name)
{
	struct mdir *d;

	for (size_t i = 0; i < fs->nmdirs; i++) {
		d = &fs->mdirs[i];
		if (!strcmp(d->org, org) && (name ? d->name && !strcmp(d->name, name) : !d->name))
			return i + 1;
	}
	if (fs->nmdirs == fs->mdirs_cap) {
		size_t cap = fs->mdirs_cap ? fs->mdirs_cap * 2 : 16;
		struct mdir *nd = realloc(fs->mdirs, cap * sizeof(*nd));
		if (!nd)
			return 0;
		fs->mdirs = nd;
		fs->mdirs_cap = cap;
	}
	d = &fs->mdirs[fs->nmdirs];
	d->org = strdup(org);
	d->name = name ? strdup(name) : NULL;
	if (!d->org || (name && !d->name)) {
		free(d->org);
		free(d->name);
		return 0;
	}
	return ++fs->nmdirs;
}

/* Look a by-model directory up by inode: copies of its names. */
static int mdir_names(struct ckvfs *fs, fuse_ino_t ino, char **org, char **name)
{
	uint64_t id = ino_id(ino);
	int rc = 0;

	pthread_mutex_lock(&fs->lock);
	if (id == 0 || id > fs->nmdirs) {
		rc = -ESTALE;
	} else {
		const struct mdir *d = &fs->mdirs[id - 1];
		*org = strdup(d->org);
		*name = d->name ? strdup(d->name) : NULL;
		if (!*org || (d->name && !*name)) {
			free(*org);
			free(*name);
			*org = *name = NULL;
			rc = -ENOMEM;
		}
	}
	pthread_mutex_unlock(&fs->lock);
	return rc;
}

/* Sub-directories of by-model (name == NULL: orgs) or of one org. */
static size_t mindex_count_children(const struct mindex *ix, const char *org)
{
	size_t n = 0;
	const char *prev = NULL;

	for (size_t i = org ? mindex_lower(ix, org, NULL, NULL) : 0; i < ix->n; i++) {
		const char *s = org ? ix->e[i].name : ix->e[i].org;
		if (org && strcmp(ix->e[i].org, org))
			break;
		if (!prev || strcmp(prev, s))
			n++;
		prev = s;
	}
	return n;
}

/* ---- directory handles ---------------------------------------------------- */

static int dirh_add(struct dirh *dh, fuse_ino_t ino, mode_t mode, const char *name)
{
	size_t len = strlen(name) + 1;

	if (dh->n == dh->cap) {
		size_t cap = dh->cap ? dh->cap * 2 : 16;
		struct dent *d = realloc(dh->d, cap * sizeof(*d));
		if (!d)
			return -ENOMEM;
		dh->d = d;
		dh->cap = cap;
	}
	if (dh->pool_len + len > dh->pool_cap) {
		size_t cap = dh->pool_cap ? dh->pool_cap * 2 : 512;
		char *p;
		while (cap < dh->pool_len + len)
			cap *= 2;
		p = realloc(dh->pool, cap);
		if (!p)
			return -ENOMEM;
		dh->pool = p;
		dh->pool_cap = cap;
	}
	memcpy(dh->pool + dh->pool_len, name, len);
	dh->d[dh->n].ino = ino;
	dh->d[dh->n].mode = mode;
	dh->d[dh->n].name = dh->pool_len;
	dh->pool_len += len;
	dh->n++;
	return 0;
}

static int dirh_add_dots(struct dirh *dh, fuse_ino_t self, fuse_ino_t parent)
{
	int rc = dirh_add(dh, self, S_IFDIR, ".");

	return rc ? rc : dirh_add(dh, parent, S_IFDIR, "..");
}

static void dirh_free(struct dirh *dh)
{
	if (!dh)
		return;
	free(dh->d);
	free(dh->pool);
	free(dh);
}

static int list_by_hash(void *arg, const ckv_manifest *m)
{
	char hex[CKV_HASH_HEX + 1];

	ckv_hash_hex(&m->hash, hex);
	return dirh_add(arg, make_ino(pfx_id_of(&m->hash), IDX_DIR), S_IFDIR, hex);
}

/* Fill a by-model directory listing from the index. */
static int list_by_model(struct ckvfs *fs, struct dirh *dh, const char *org, const char *name)
{
	struct mindex *ix = mindex_get(fs);
	const char *prev = NULL;
	size_t i;
	int rc = 0;

	if (!ix)
		return -EIO;
	i = org ? mindex_lower(ix, org, name, NULL) : 0;
	for (; i < ix->n && rc == 0; i++) {
		const struct mentry *me = &ix->e[i];
		char hex[CKV_HASH_HEX + 1];
		uint64_t id;

		if (org && strcmp(me->org, org))
			break;
		if (name && strcmp(me->name, name))
			break;
		if (name) {
			ckv_hash_hex(&me->hash, hex);
			rc = dirh_add(dh, make_ino(pfx_id_of(&me->hash), IDX_LINK), S_IFLNK, hex);
			continue;
		}
		{
			const char *child = org ? me->name : me->org;
			if (prev && !strcmp(prev, child))
				continue;
			prev = child;
			pthread_mutex_lock(&fs->lock);
			id = mdir_id(fs, org ? org : child, org ? child : NULL);
			pthread_mutex_unlock(&fs->lock);
			rc = id ? dirh_add(dh, make_ino(id, IDX_MDIR), S_IFDIR, child) : -ENOMEM;
		}
	}
	mindex_put(ix);
	return rc;
}

/* ---- /.ckv/stats ------------------------------------------------------------ */

static int stats_json(struct ckvfs *fs, char **out, size_t *len)
{
	ckv_engine_stats st;
	uint64_t gen, np;
	char *buf;
	int n;

	memset(&st, 0, sizeof(st));
	if (fs->engine)
		ckv_engine_get_stats(fs->engine, &st);
	gen = fs_gen(fs, &np);
	buf = malloc(4096);
	if (!buf)
		return -ENOMEM;
	n = snprintf(buf, 4096,
		     "{\n"
		     "  \"version\": \"%s\",\n"
		     "  \"policy\": \"%s\",\n"
		     "  \"mode\": \"%s\",\n"
		     "  \"arena_bytes\": %" PRIu64 ",\n"
		     "  \"arena_used\": %" PRIu64 ",\n"
		     "  \"slots_used\": %" PRIu64 ",\n"
		     "  \"pinned\": %" PRIu64 ",\n"
		     "  \"hits\": %" PRIu64 ",\n"
		     "  \"misses\": %" PRIu64 ",\n"
		     "  \"evictions\": %" PRIu64 ",\n"
		     "  \"bytes_from_disk\": %" PRIu64 ",\n"
		     "  \"disk_reads\": %" PRIu64 ",\n"
		     "  \"readahead_issued\": %" PRIu64 ",\n"
		     "  \"readahead_used\": %" PRIu64 ",\n"
		     "  \"hints\": %" PRIu64 ",\n"
		     "  \"checksum_failures\": %" PRIu64 ",\n"
		     "  \"io_errors\": %" PRIu64 ",\n"
		     "  \"fuse_reads\": %" PRIu64 ",\n"
		     "  \"fuse_read_bytes\": %" PRIu64 ",\n"
		     "  \"fuse_read_errors\": %" PRIu64 ",\n"
		     "  \"stream_reads\": %" PRIu64 ",\n"
		     "  \"hints_willneed\": %" PRIu64 ",\n"
		     "  \"hints_scores\": %" PRIu64 ",\n"
		     "  \"hints_rejected\": %" PRIu64 ",\n"
		     "  \"invalidations\": %" PRIu64 ",\n"
		     "  \"retention_loaded\": %" PRIu64 ",\n"
		     "  \"warm_chunks\": %" PRIu64 ",\n"
		     "  \"daemon_readahead\": %" PRIu64 ",\n"
		     "  \"prefixes\": %" PRIu64 ",\n"
		     "  \"generation\": %" PRIu64 "\n"
		     "}\n",
		     ckv_version(), fs->cfg.policy == CKV_POLICY_LRU ? "lru" : "attn",
		     fs->cfg.direct_io ? "direct_io" : "page_cache", st.arena_bytes, st.arena_used,
		     st.slots_used, st.pinned, st.hits, st.misses, st.evictions, st.bytes_from_disk,
		     st.disk_reads, st.readahead_issued, st.readahead_used, st.hints,
		     st.checksum_failures, st.io_errors, atomic_load(&fs->reads),
		     atomic_load(&fs->read_bytes), atomic_load(&fs->read_errors),
		     atomic_load(&fs->stream_reads), atomic_load(&fs->hints_willneed),
		     atomic_load(&fs->hints_scores), atomic_load(&fs->hints_rejected),
		     atomic_load(&fs->invalidations), atomic_load(&fs->retention_loaded),
		     atomic_load(&fs->warm_chunks), atomic_load(&fs->ra_chunks), np, gen);
	if (n < 0 || n >= 4096) {
		free(buf);
		return -EOVERFLOW;
	}
	*out = buf;
	*len = (size_t)n;
	return 0;
}

/* ---- hints ----------------------------------------------------------------- */

/* Parse a decimal chunk id < nchunks at *p (advanced). */
static int parse_chunk(const char **p, const char *end, uint32_t nchunks, uint32_t *out)
{
	uint64_t v = 0;
	const char *s = *p;

	if (s == end || *s < '0' || *s > '9')
		return -EINVAL;
	for (; s < end && *s >= '0' && *s <= '9'; s++) {
		v = v * 10 + (uint64_t)(*s - '0');
		if (v >= nchunks)
			return -EINVAL;
	}
	*p = s;
	*out = (uint32_t)v;
	return 0;
}

/* Drop one trailing newline (echo / printf users); reject empty and oversized values. */
static int hint_span(const char *v, size_t len, const char **end)
{
	if (len > HINT_MAX)
		return -EINVAL;
	if (len && v[len - 1] == '\n')
		len--;
	if (!len)
		return -EINVAL;
	*end = v + len;
	return 0;
}

/*
 * "0,3,17-20": chunk ids < nchunks, ranges inclusive and increasing, at most
 * nchunks ids in all. The whole value is parsed before anything is applied.
 */
static int parse_chunk_list(const char *v, size_t len, uint32_t nchunks, uint32_t **out, size_t *n)
{
	const char *p = v, *end;
	uint32_t *ids;
	size_t cnt = 0;
	int rc = hint_span(v, len, &end);

	if (rc < 0 || !nchunks)
		return -EINVAL;
	ids = malloc((size_t)nchunks * sizeof(*ids));
	if (!ids)
		return -ENOMEM;
	for (;;) {
		uint32_t a, b;

		rc = parse_chunk(&p, end, nchunks, &a);
		if (rc < 0)
			goto out_free;
		b = a;
		if (p < end && *p == '-') {
			p++;
			rc = parse_chunk(&p, end, nchunks, &b);
			if (rc < 0 || b < a) {
				rc = -EINVAL;
				goto out_free;
			}
		}
		if ((uint64_t)cnt + (b - a) + 1 > nchunks) {
			rc = -EINVAL;
			goto out_free;
		}
		for (uint64_t c = a; c <= b; c++)
			ids[cnt++] = (uint32_t)c;
		if (p == end)
			break;
		if (*p != ',') {
			rc = -EINVAL;
			goto out_free;
		}
		p++;
	}
	*out = ids;
	*n = cnt;
	return 0;
out_free:
	free(ids);
	return rc;
}

/* "chunk:score,…": scores finite, >= 0, plain decimal (no nan, inf, hex or sign). */
static int parse_scores(const char *v, size_t len, uint32_t nchunks, uint32_t **ids_out,
			float **scores_out, size_t *n)
{
	const char *p = v, *end;
	uint32_t *ids = NULL;
	float *scores = NULL;
	size_t cnt = 0;
	int rc = hint_span(v, len, &end);

	if (rc < 0 || !nchunks)
		return -EINVAL;
	ids = malloc((size_t)nchunks * sizeof(*ids));
	scores = malloc((size_t)nchunks * sizeof(*scores));
	if (!ids || !scores) {
		rc = -ENOMEM;
		goto out_free;
	}
	for (;;) {
		char num[64], *numend;
		const char *s;
		size_t k = 0;
		double d;

		if (cnt == nchunks) {
			rc = -EINVAL;
			goto out_free;
		}
		rc = parse_chunk(&p, end, nchunks, &ids[cnt]);
		if (rc < 0 || p == end || *p != ':') {
			rc = -EINVAL;
			goto out_free;
		}
		p++;
		for (s = p; s < end && *s != ','; s++) {
			bool ok = (*s >= '0' && *s <= '9') || *s == '.' || *s == 'e' || *s == 'E' ||
				  ((*s == '+' || *s == '-') && k && (num[k - 1] == 'e' || num[k - 1] == 'E'));
			if (!ok || k + 1 >= sizeof(num)) {
				rc = -EINVAL;
				goto out_free;
			}
			num[k++] = *s;
		}
		num[k] = 0;
		if (!k || !((num[0] >= '0' && num[0] <= '9') || num[0] == '.')) {
			rc = -EINVAL;
			goto out_free;
		}
		errno = 0;
		d = strtod(num, &numend);
		if (*numend || errno == ERANGE || !isfinite(d) || d < 0 || d > FLT_MAX) {
			rc = -EINVAL;
			goto out_free;
		}
		scores[cnt++] = (float)d;
		p = s;
		if (p == end)
			break;
		p++; /* ',' */
	}
	*ids_out = ids;
	*scores_out = scores;
	*n = cnt;
	return 0;
out_free:
	free(ids);
	free(scores);
	return rc;
}

/* Apply a hint to layer file l of a prefix. */
static int hint_apply(struct ckvfs *fs, struct pdata *pd, uint32_t l, const char *name,
		      const char *value, size_t size)
{
	uint32_t nchunks = pd->m->chunks, *ids = NULL;
	float *scores = NULL;
	ckv_chunk_ref *refs = NULL;
	ckv_efile **files = NULL;
	bool willneed = !strcmp(name, XA_WILLNEED);
	size_t n = 0;
	int rc;

	rc = willneed ? parse_chunk_list(value, size, nchunks, &ids, &n)
		      : parse_scores(value, size, nchunks, &ids, &scores, &n);
	if (rc < 0) {
		atomic_fetch_add(&fs->hints_rejected, 1);
		return rc;
	}
	refs = malloc(n * sizeof(*refs));
	files = calloc(pd->m->nextents, sizeof(*files));
	if (!refs || !files) {
		rc = -ENOMEM;
		goto out_free;
	}
	rc = layer_get(pd, l, files);
	if (rc < 0)
		goto out_free;
	for (size_t i = 0; i < n; i++)
		refs[i] = chunk_ref(pd, files, ids[i]);
	if (willneed) {
		rc = ckv_engine_prefetch(fs->engine, refs, n);
		atomic_fetch_add(&fs->hints_willneed, 1);
	} else {
		rc = ckv_engine_score(fs->engine, refs, scores, n);
		atomic_fetch_add(&fs->hints_scores, 1);
	}
	layer_put(pd, files); /* queued reads keep their file alive */
out_free:
	free(files);
	free(refs);
	free(ids);
	free(scores);
	return rc;
}

/* "0-3,7": the resident chunks of layer file l. *out malloc'ed. */
static int resident_list(struct ckvfs *fs, struct pdata *pd, uint32_t l, char **out, size_t *len)
{
	ckv_efile **files = calloc(pd->m->nextents, sizeof(*files));
	size_t cap = 256, n = 0;
	char *buf = malloc(cap);
	int rc = -ENOMEM;

	if (!files || !buf)
		goto out_free;
	rc = layer_get(pd, l, files);
	if (rc < 0)
		goto out_free;
	for (uint32_t j = 0; j < pd->m->chunks;) {
		ckv_chunk_ref r = chunk_ref(pd, files, j);
		uint32_t k;

		if (!ckv_engine_resident(fs->engine, &r)) {
			j++;
			continue;
		}
		for (k = j + 1; k < pd->m->chunks; k++) {
			ckv_chunk_ref rk = chunk_ref(pd, files, k);
			if (!ckv_engine_resident(fs->engine, &rk))
				break;
		}
		if (cap - n < 32) {
			char *b = realloc(buf, cap * 2);
			if (!b) {
				rc = -ENOMEM;
				goto out_put;
			}
			buf = b;
			cap *= 2;
		}
		if (k - 1 > j)
			n += (size_t)snprintf(buf + n, cap - n, "%s%u-%u", n ? "," : "", j, k - 1);
		else
			n += (size_t)snprintf(buf + n, cap - n, "%s%u", n ? "," : "", j);
		j = k;
	}
	*out = buf;
	*len = n;
	buf = NULL;
out_put:
	layer_put(pd, files);
out_free:
	free(files);
	free(buf);
	return rc;
}

/* ---- reads ---------------------------------------------------------------- */

static void ra_done(void *arg, size_t i, ckv_slot *slot, int rc)
{
	struct ckvfs *fs = arg;

	(void)i;
	(void)rc;
	if (slot)
		ckv_engine_release(fs->engine, slot);
	atomic_fetch_sub(&fs->ra_inflight, 1);
}

/*
 * Read-ahead for a direct_io stream (the page cache has the kernel's): keep
 * the chunks up to RA_BYTES past the reader's position loading, as stream
 * reads (no retention credit), so disk reads overlap the FUSE round trips.
 * Issued in batches of at least half the window; the slots are released as
 * soon as they arrive and stay cached unpinned.
 */
static void read_ahead(struct ckvfs *fs, struct fh *h, uint32_t next)
{
	const struct pdata *pd = h->pd;
	uint32_t m = pd->m->chunks, win, from, to;
	ckv_chunk_ref refs[256];
	size_t n = 0;

	win = (uint32_t)(RA_BYTES / pd->m->geom.chunk_bytes);
	if (win < 2)
		win = 2;
	if (win > sizeof(refs) / sizeof(refs[0]))
		win = sizeof(refs) / sizeof(refs[0]);
	from = atomic_load(&h->ra_next);
	if (from < next)
		from = next;
	to = next + win < m ? next + win : m;
	if (from >= to || to - from < win / 2)
		return;
	atomic_store(&h->ra_next, to);
	for (uint32_t j = from; j < to; j++) {
		ckv_chunk_ref r = chunk_ref(pd, h->files, j);
		if (!ckv_engine_resident(fs->engine, &r))
			refs[n++] = r;
	}
	if (!n)
		return;
	atomic_fetch_add(&fs->ra_inflight, n);
	if (ckv_engine_get_async(fs->engine, refs, n, CKV_GET_STREAM, ra_done, fs) < 0)
		atomic_fetch_sub(&fs->ra_inflight, n);
	else
		atomic_fetch_add(&fs->ra_chunks, n);
}

/*
 * Fallback when the arena is too full of pins to hold a request's chunks at
 * once (a small cache= and many readers): one chunk at a time through a
 * bounce buffer.
 */
static void read_bounced(fuse_req_t req, struct ckvfs *fs, struct fh *h, uint64_t off,
			 uint64_t end, unsigned flags)
{
	const struct pdata *pd = h->pd;
	uint64_t cb = pd->m->geom.chunk_bytes;
	char *buf = malloc(end - off);
	uint64_t pos = off;
	int rc = 0;

	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	while (pos < end) {
		uint32_t j = (uint32_t)(pos / cb);
		uint64_t in = pos - (uint64_t)j * cb, take = cb - in;
		ckv_chunk_ref r = chunk_ref(pd, h->files, j);
		ckv_slot *slot = NULL;
		int crc = 0;

		if (take > end - pos)
			take = end - pos;
		for (int tries = 0; tries < 200; tries++) {
			rc = ckv_engine_get(fs->engine, &r, 1, flags, &slot, &crc);
			if (rc != -ENOMEM)
				break;
			usleep(1000);
		}
		if (rc < 0)
			break;
		memcpy(buf + (pos - off), (const char *)ckv_slot_data(slot) + in, take);
		ckv_engine_release(fs->engine, slot);
		pos += take;
	}
	if (pos == off || (rc < 0 && !h->direct)) {
		atomic_fetch_add(&fs->read_errors, 1);
		fuse_reply_err(req, rc < 0 ? -rc : EIO);
	} else {
		atomic_fetch_add(&fs->read_bytes, pos - off);
		fuse_reply_buf(req, buf, pos - off);
	}
	free(buf);
}

static void read_layer(fuse_req_t req, struct ckvfs *fs, struct fh *h, size_t size, off_t off)
{
	const struct pdata *pd = h->pd;
	uint64_t cb = pd->m->geom.chunk_bytes, fsize = layer_size(pd->m), end, prev;
	ckv_chunk_ref refs_s[SLOTS_ON_STACK], *refs = refs_s;
	ckv_slot *slots_s[SLOTS_ON_STACK], **slots = slots_s;
	int rcs_s[SLOTS_ON_STACK], *rcs = rcs_s;
	struct iovec iov_s[SLOTS_ON_STACK], *iov = iov_s;
	uint32_t j0, n, good;
	unsigned flags = CKV_GET_DEMAND;
	int rc;

	atomic_fetch_add(&fs->reads, 1);
	if (off < 0 || (uint64_t)off >= fsize || !size) {
		fuse_reply_buf(req, NULL, 0);
		return;
	}
	end = (uint64_t)off + size;
	if (end > fsize)
		end = fsize;
	j0 = (uint32_t)((uint64_t)off / cb);
	n = (uint32_t)((end - 1) / cb) - j0 + 1;

	/*
	 * Streaming (cp, cat, rsync): the handle has read sequentially from
	 * offset 0 (give or take reordering of async read-ahead) past
	 * STREAM_MIN, and this read covers whole chunks. A loader reading its
	 * selected chunks, even several adjacent ones in a row, stays demand:
	 * its accesses count for retention, a copy's must not.
	 */
	prev = atomic_exchange(&h->last_end, end);
	if (prev == UINT64_MAX || (uint64_t)off + STREAM_SLACK < prev ||
	    (uint64_t)off > prev + STREAM_SLACK)
		atomic_store(&h->run_start, (uint64_t)off);
	if (atomic_load(&h->run_start) == 0 && (uint64_t)off >= STREAM_MIN &&
	    (uint64_t)off % cb == 0 && (end % cb == 0 || end == fsize)) {
		flags = CKV_GET_STREAM;
		atomic_fetch_add(&fs->stream_reads, 1);
	}

	if (n > SLOTS_ON_STACK) {
		refs = malloc(n * sizeof(*refs));
		slots = calloc(n, sizeof(*slots));
		rcs = malloc(n * sizeof(*rcs));
		iov = malloc(n * sizeof(*iov));
		if (!refs || !slots || !rcs || !iov) {
			fuse_reply_err(req, ENOMEM);
			goto out_free;
		}
	} else {
		memset(slots, 0, n * sizeof(*slots));
	}
	for (uint32_t i = 0; i < n; i++)
		refs[i] = chunk_ref(pd, h->files, j0 + i);

	rc = ckv_engine_get(fs->engine, refs, n, flags, slots, rcs);
	good = n;
	if (rc < 0)
		for (good = 0; good < n && slots[good]; good++)
			;
	if (good < n) {
		int err = rcs[good] < 0 ? -rcs[good] : EIO;

		if (err == ENOMEM) {
			for (uint32_t i = 0; i < n; i++)
				if (slots[i])
					ckv_engine_release(fs->engine, slots[i]);
			read_bounced(req, fs, h, (uint64_t)off, end, flags);
			goto out_free;
		}
		if (!good || !h->direct) {
			for (uint32_t i = 0; i < n; i++)
				if (slots[i])
					ckv_engine_release(fs->engine, slots[i]);
			atomic_fetch_add(&fs->read_errors, 1);
			fuse_reply_err(req, err);
			goto out_free;
		}
		end = (uint64_t)(j0 + good) * cb; /* a short read: the bytes before the bad chunk */
	}
	{
		size_t total = 0;
		for (uint32_t i = 0; i < good; i++) {
			uint64_t cstart = (uint64_t)(j0 + i) * cb;
			uint64_t a = i == 0 ? (uint64_t)off - cstart : 0;
			uint64_t b = end - cstart < cb ? end - cstart : cb;
			iov[i].iov_base = (char *)ckv_slot_data(slots[i]) + a;
			iov[i].iov_len = b - a;
			total += b - a;
		}
		atomic_fetch_add(&fs->read_bytes, total);
		if (flags == CKV_GET_STREAM && h->direct && good == n)
			read_ahead(fs, h, j0 + n);
		/* The kernel copies out of the slots during the reply; release after. */
		fuse_reply_iov(req, iov, (int)good);
	}
	for (uint32_t i = 0; i < n; i++)
		if (slots[i])
			ckv_engine_release(fs->engine, slots[i]);
out_free:
	if (refs != refs_s) {
		free(refs);
		free(slots);
		free(rcs);
		free(iov);
	}
}

/* ---- file handles ---------------------------------------------------------- */

static void fh_put(struct fh *h)
{
	if (!h)
		return;
	assert(atomic_load(&h->refs) > 0);
	if (atomic_fetch_sub(&h->refs, 1) != 1)
		return;
	if (h->own_buf)
		free(h->buf);
	if (h->files) {
		layer_put(h->pd, h->files);
		free(h->files);
	}
	pdata_put(h->pd);
	free(h);
}

/* ---- import hooks ----------------------------------------------------------- */
/*
 * The write side of /import and of new directories under /by-hash comes in
 * a later issue (DESIGN §4: staging areas verified and published). Every
 * mutating operation lands here first; for now nothing is writable.
 */
static int import_mkdir(struct ckvfs *fs, fuse_ino_t parent, const char *name)
{
	(void)fs;
	(void)parent;
	(void)name;
	return -EROFS;
}

static int import_create(struct ckvfs *fs, fuse_ino_t parent, const char *name)
{
	(void)fs;
	(void)parent;
	(void)name;
	return -EROFS;
}

/* ---- FUSE operations ----------------------------------------------------- */

static void entry_reply(fuse_req_t req, const struct stat *st, double entry_tmo, double attr_tmo)
{
	struct fuse_entry_param e;

	memset(&e, 0, sizeof(e));
	e.ino = st->st_ino;
	e.generation = 1;
	e.attr = *st;
	e.entry_timeout = entry_tmo;
	e.attr_timeout = attr_tmo;
	fuse_reply_entry(req, &e);
}

static void fixed_attr(struct ckvfs *fs, fuse_ino_t ino, struct stat *st, double *tmo)
{
	uint64_t np;
	struct timespec t = fs->started;

	*tmo = TMO_STATIC;
	switch (ino) {
	case INO_ROOT:
		attr_fill(fs, st, ino, S_IFDIR | 0555, 6, 0, t, t);
		break;
	case INO_BY_HASH:
		fs_poll(fs, false);
		fs_gen(fs, &np);
		attr_fill(fs, st, ino, S_IFDIR | 0555, 2 + np, 0, t, t);
		*tmo = TMO_DYNAMIC;
		break;
	case INO_BY_MODEL: {
		struct mindex *ix = mindex_get(fs);
		attr_fill(fs, st, ino, S_IFDIR | 0555, 2 + (ix ? mindex_count_children(ix, NULL) : 0), 0,
			  t, t);
		mindex_put(ix);
		*tmo = TMO_DYNAMIC;
		break;
	}
	case INO_IMPORT:
		attr_fill(fs, st, ino, S_IFDIR | 0755, 2, 0, t, t);
		break;
	case INO_CTL:
		attr_fill(fs, st, ino, S_IFDIR | 0555, 2, 0, t, t);
		break;
	case INO_CTLSOCK:
		attr_fill(fs, st, ino, S_IFLNK | 0777, 1, strlen(fs->cfg.ctl_path ? fs->cfg.ctl_path : ""), t, t);
		break;
	case INO_STATS: {
		char *buf = NULL;
		size_t len = 0;
		if (stats_json(fs, &buf, &len) < 0)
			len = 0;
		free(buf);
		clock_gettime(CLOCK_REALTIME, &t);
		attr_fill(fs, st, ino, S_IFREG | 0444, 1, len, t, t);
		*tmo = 0;
		break;
	}
	}
}

static int mdir_attr(struct ckvfs *fs, fuse_ino_t ino, struct stat *st)
{
	char *org = NULL, *name = NULL;
	struct mindex *ix;
	size_t kids = 0;
	int rc = mdir_names(fs, ino, &org, &name);

	if (rc < 0)
		return rc;
	ix = name ? NULL : mindex_get(fs);
	if (ix)
		kids = mindex_count_children(ix, org);
	mindex_put(ix);
	attr_fill(fs, st, ino, S_IFDIR | 0555, 2 + kids, 0, fs->started, fs->started);
	free(org);
	free(name);
	return 0;
}

static void fs_init(void *userdata, struct fuse_conn_info *conn)
{
	struct ckvfs *fs = userdata;

	if (conn->capable & FUSE_CAP_ASYNC_READ)
		conn->want |= FUSE_CAP_ASYNC_READ;
	if (conn->capable & FUSE_CAP_PARALLEL_DIROPS)
		conn->want |= FUSE_CAP_PARALLEL_DIROPS;
	if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
		conn->want |= FUSE_CAP_CACHE_SYMLINKS;
	/* Published files never change: no invalidation on mtime/size checks. */
	conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
	conn->want &= ~(FUSE_CAP_READDIRPLUS | FUSE_CAP_READDIRPLUS_AUTO);
	conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
	conn->max_write = READ_MAX;
	conn->max_read = READ_MAX;
	conn->max_readahead = READ_MAX; /* the kernel takes min(this, the bdi's window) */
	conn->max_background = 64;
	conn->congestion_threshold = 48;
	conn->time_gran = 1;

	pthread_mutex_lock(&fs->lock);
	fs->initialized = true;
	pthread_mutex_unlock(&fs->lock);
}

static int retention_collect(void *arg, const char *key, uint32_t chunk, double importance,
			     double freq, int64_t last)
{
	struct {
		ckv_retention *r;
		size_t n, cap;
	} *c = arg;
	const char *slash = strrchr(key, '/');
	ckv_retention *r;
	char *end;
	unsigned long l;

	if (!slash || (size_t)(slash - key) >= sizeof(r->segment))
		return 0; /* not a key of ours */
	errno = 0;
	l = strtoul(slash + 1, &end, 10);
	if (errno || *end || slash[1] == 0 || l >= CKV_MAX_LAYERS)
		return 0;
	if (c->n == c->cap) {
		size_t cap = c->cap ? c->cap * 2 : 1024;
		ckv_retention *nr = realloc(c->r, cap * sizeof(*nr));
		if (!nr)
			return -ENOMEM;
		c->r = nr;
		c->cap = cap;
	}
	r = &c->r[c->n++];
	memset(r, 0, sizeof(*r));
	memcpy(r->segment, key, (size_t)(slash - key));
	r->layer = (uint32_t)l;
	r->chunk = chunk;
	r->importance = importance;
	r->freq = freq;
	r->last = last;
	return 0;
}

/* Unmount: persist the engine's retention state into the store. */
static void fs_destroy(void *userdata)
{
	struct ckvfs *fs = userdata;
	struct {
		ckv_retention *r;
		size_t n, cap;
	} c = { NULL, 0, 0 };
	int rc;

	if (!fs->engine || !fs->store)
		return;
	rc = ckv_engine_retention_each(fs->engine, retention_collect, &c);
	if (rc == 0 && c.n)
		rc = ckv_store_retention_put(fs->store, c.r, c.n);
	if (rc < 0)
		fuse_log(FUSE_LOG_ERR, "ckvfs: saving retention state to %s: %s\n", fs->store_path,
			 strerror(-rc));
	else
		atomic_store(&fs->retention_saved, c.n);
	free(c.r);
}

static void fs_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct ckvfs *fs = fs_of(req);
	struct stat st = { 0 };
	double tmo;
	int rc = -ENOENT;

	if (parent == INO_ROOT || parent == INO_CTL) {
		for (size_t i = 0; i < sizeof(fixed_nodes) / sizeof(fixed_nodes[0]); i++)
			if (fixed_nodes[i].parent == parent && !strcmp(fixed_nodes[i].name, name) &&
			    (fixed_nodes[i].ino != INO_CTLSOCK || fs->cfg.ctl_path)) {
				fixed_attr(fs, fixed_nodes[i].ino, &st, &tmo);
				entry_reply(req, &st, TMO_STATIC, tmo);
				return;
			}
		goto out_err;
	}
	if (parent == INO_BY_HASH) {
		char hex[CKV_HASH_HEX + 1];
		struct pdata *pd;
		ckv_hash h;
		uint64_t id;

		if (strlen(name) != CKV_HASH_HEX || ckv_hash_parse(&h, name) < 0)
			goto out_err;
		ckv_hash_hex(&h, hex);
		if (strcmp(hex, name)) /* only the canonical lowercase spelling */
			goto out_err;
		rc = pfx_acquire(fs, &h, &id, &pd);
		if (rc < 0)
			goto out_err;
		pfx_attr(fs, pd, id, IDX_DIR, &st); /* IDX_DIR: always 0 */
		pdata_put(pd);
		entry_reply(req, &st, TMO_DYNAMIC, TMO_STATIC);
		return;
	}
	if (is_pfx_ino(parent) && ino_idx(parent) == IDX_DIR) {
		struct pdata *pd = pfx_data(fs, parent);
		unsigned idx;

		if (!pd) {
			rc = -ESTALE;
			goto out_err;
		}
		idx = pfx_file_idx(pd->m, name);
		if (!idx) {
			pdata_put(pd);
			goto out_err;
		}
		/* The child is counted in the prefix's nlookup. */
		pthread_mutex_lock(&fs->lock);
		{
			struct pfx *p = pfx_by_id(fs, ino_id(parent));
			if (p)
				p->nlookup++;
			rc = p ? 0 : -ESTALE;
		}
		pthread_mutex_unlock(&fs->lock);
		if (rc == 0)
			rc = pfx_attr(fs, pd, ino_id(parent), idx, &st);
		pdata_put(pd);
		if (rc < 0)
			goto out_err;
		entry_reply(req, &st, TMO_STATIC, TMO_STATIC);
		return;
	}
	if (parent == INO_BY_MODEL || is_mdir_ino(parent)) {
		char *org = NULL, *mname = NULL;
		struct mindex *ix;
		size_t i;

		if (parent != INO_BY_MODEL) {
			rc = mdir_names(fs, parent, &org, &mname);
			if (rc < 0)
				goto out_err;
		}
		ix = mindex_get(fs);
		if (!ix) {
			rc = -EIO;
		} else if (!org || !mname) { /* a sub-directory: org, or name under org */
			const char *o = org ? org : name, *nm = org ? name : NULL;
			i = mindex_lower(ix, o, nm, NULL);
			rc = -ENOENT;
			if (i < ix->n && !strcmp(ix->e[i].org, o) && (!nm || !strcmp(ix->e[i].name, nm))) {
				uint64_t id;
				pthread_mutex_lock(&fs->lock);
				id = mdir_id(fs, o, nm);
				pthread_mutex_unlock(&fs->lock);
				rc = id ? mdir_attr(fs, make_ino(id, IDX_MDIR), &st) : -ENOMEM;
			}
		} else { /* a symlink */
			ckv_hash h;
			rc = -ENOENT;
			if (strlen(name) == CKV_HASH_HEX && ckv_hash_parse(&h, name) == 0) {
				i = mindex_lower(ix, org, mname, &h);
				if (i < ix->n && !strcmp(ix->e[i].org, org) && !strcmp(ix->e[i].name, mname) &&
				    ckv_hash_eq(&ix->e[i].hash, &h)) {
					struct pdata *pd;
					uint64_t id;
					rc = pfx_acquire(fs, &h, &id, &pd);
					if (rc == 0) {
						rc = pfx_attr(fs, pd, id, IDX_LINK, &st);
						pdata_put(pd);
					}
				}
			}
		}
		mindex_put(ix);
		free(org);
		free(mname);
		if (rc < 0)
			goto out_err;
		entry_reply(req, &st, TMO_DYNAMIC, S_ISLNK(st.st_mode) ? TMO_STATIC : TMO_DYNAMIC);
		return;
	}
out_err:
	fuse_reply_err(req, -rc);
}

static void fs_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	if (is_pfx_ino(ino))
		pfx_forget(fs_of(req), ino, nlookup);
	fuse_reply_none(req);
}

static void fs_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	for (size_t i = 0; i < count; i++)
		if (is_pfx_ino(forgets[i].ino))
			pfx_forget(fs_of(req), forgets[i].ino, forgets[i].nlookup);
	fuse_reply_none(req);
}

static void fs_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct ckvfs *fs = fs_of(req);
	struct stat st;
	double tmo = TMO_STATIC;
	int rc = 0;

	(void)fi;
	if (ino <= INO_FIXED_LAST) {
		fixed_attr(fs, ino, &st, &tmo);
	} else if (is_pfx_ino(ino)) {
		struct pdata *pd = pfx_data(fs, ino);
		if (!pd) {
			rc = -ESTALE;
		} else {
			rc = pfx_attr(fs, pd, ino_id(ino), ino_idx(ino), &st);
			pdata_put(pd);
		}
	} else if (is_mdir_ino(ino)) {
		rc = mdir_attr(fs, ino, &st);
		tmo = TMO_DYNAMIC;
	} else {
		rc = -ESTALE;
	}
	if (rc < 0)
		fuse_reply_err(req, -rc);
	else
		fuse_reply_attr(req, &st, tmo);
}

static void fs_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		       struct fuse_file_info *fi)
{
	(void)ino;
	(void)attr;
	(void)to_set;
	(void)fi;
	fuse_reply_err(req, EROFS);
}

static void fs_readlink(fuse_req_t req, fuse_ino_t ino)
{
	struct ckvfs *fs = fs_of(req);
	char target[sizeof(SYMLINK_UP) + CKV_HASH_HEX];
	struct pdata *pd;

	if (ino == INO_CTLSOCK && fs->cfg.ctl_path) {
		fuse_reply_readlink(req, fs->cfg.ctl_path);
		return;
	}
	if (!is_pfx_ino(ino) || ino_idx(ino) != IDX_LINK) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	pd = pfx_data(fs, ino);
	if (!pd) {
		fuse_reply_err(req, ESTALE);
		return;
	}
	snprintf(target, sizeof(target), "%s%s", SYMLINK_UP, pd->hex);
	pdata_put(pd);
	fuse_reply_readlink(req, target);
}

static void fs_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	(void)mode;
	fuse_reply_err(req, -import_mkdir(fs_of(req), parent, name));
}

static void fs_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
	(void)mode;
	(void)rdev;
	fuse_reply_err(req, -import_create(fs_of(req), parent, name));
}

static void fs_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
		      struct fuse_file_info *fi)
{
	(void)mode;
	(void)fi;
	fuse_reply_err(req, -import_create(fs_of(req), parent, name));
}

static void fs_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	(void)parent;
	(void)name;
	fuse_reply_err(req, EROFS);
}

static void fs_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
		      const char *newname, unsigned int flags)
{
	(void)parent;
	(void)name;
	(void)newparent;
	(void)newname;
	(void)flags;
	fuse_reply_err(req, EROFS);
}

static void fs_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
	(void)link;
	(void)parent;
	(void)name;
	fuse_reply_err(req, EROFS);
}

static void fs_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
{
	(void)ino;
	(void)newparent;
	(void)newname;
	fuse_reply_err(req, EROFS);
}

static void fs_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct ckvfs *fs = fs_of(req);
	struct fh *h;
	unsigned idx = ino_idx(ino);
	int rc = 0;

	if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC)) {
		fuse_reply_err(req, EROFS);
		return;
	}
	h = calloc(1, sizeof(*h));
	if (!h) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	atomic_init(&h->refs, 1);
	h->kind = FH_BUF;
	if (ino == INO_STATS) {
		rc = stats_json(fs, &h->buf, &h->len);
		h->own_buf = true;
		fi->direct_io = 1;
		goto out_reply;
	}
	if (!is_pfx_ino(ino) || idx == IDX_DIR || idx == IDX_LINK) {
		rc = is_pfx_ino(ino) || ino <= INO_FIXED_LAST || is_mdir_ino(ino) ? -EISDIR : -ESTALE;
		goto out_reply;
	}
	h->pd = pfx_data(fs, ino);
	if (!h->pd) {
		rc = -ESTALE;
		goto out_reply;
	}
	switch (idx) {
	case IDX_MANIFEST:
		h->buf = h->pd->json;
		h->len = h->pd->json_len;
		break;
	case IDX_TOKENS:
		rc = pdata_tokens(fs, h->pd, &h->buf, &h->len);
		h->own_buf = true;
		break;
	case IDX_SUMS:
		rc = pdata_sums_file(h->pd, &h->buf, &h->len);
		h->own_buf = true;
		break;
	default:
		if (idx < IDX_LAYER0 || idx - IDX_LAYER0 >= h->pd->m->geom.layers) {
			rc = -ESTALE;
			break;
		}
		h->kind = FH_LAYER;
		h->layer = idx - IDX_LAYER0;
		atomic_init(&h->last_end, UINT64_MAX); /* no read yet */
		h->files = calloc(h->pd->m->nextents, sizeof(*h->files));
		if (!h->files) {
			rc = -ENOMEM;
			break;
		}
		rc = layer_get(h->pd, h->layer, h->files);
		if (rc < 0) {
			free(h->files);
			h->files = NULL;
		}
		fi->direct_io = fs->cfg.direct_io || (fi->flags & O_DIRECT);
		break;
	}
	fi->keep_cache = !fi->direct_io; /* published bytes never change */
	fi->noflush = 1;
out_reply:
	if (rc < 0) {
		fh_put(h);
		fuse_reply_err(req, -rc);
		return;
	}
	h->direct = fi->direct_io;
	fi->fh = (uintptr_t)h;
	if (fuse_reply_open(req, fi) == -ENOENT) /* interrupted: no release will come */
		fh_put(h);
}

static void fs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	struct ckvfs *fs = fs_of(req);
	struct fh *h = (struct fh *)(uintptr_t)fi->fh;

	(void)ino;
	atomic_fetch_add(&h->refs, 1); /* see struct fh */
	if (h->kind == FH_LAYER)
		read_layer(req, fs, h, size, off);
	else if (off < 0 || (size_t)off >= h->len)
		fuse_reply_buf(req, NULL, 0);
	else
		fuse_reply_buf(req, h->buf + off,
			       h->len - (size_t)off < size ? h->len - (size_t)off : size);
	fh_put(h);
}

static void fs_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	(void)ino;
	(void)buf;
	(void)size;
	(void)off;
	(void)fi;
	fuse_reply_err(req, EROFS);
}

static void fs_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	fh_put((struct fh *)(uintptr_t)fi->fh);
	fuse_reply_err(req, 0);
}

static void fs_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct ckvfs *fs = fs_of(req);
	struct dirh *dh = calloc(1, sizeof(*dh));
	int rc = 0;

	if (!dh) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	switch (ino) {
	case INO_ROOT:
		rc = dirh_add_dots(dh, ino, INO_ROOT);
		for (size_t i = 0; rc == 0 && i < sizeof(fixed_nodes) / sizeof(fixed_nodes[0]); i++)
			if (fixed_nodes[i].parent == INO_ROOT)
				rc = dirh_add(dh, fixed_nodes[i].ino, S_IFDIR, fixed_nodes[i].name);
		break;
	case INO_BY_HASH:
		fs_poll(fs, false);
		rc = dirh_add_dots(dh, ino, INO_ROOT);
		if (rc == 0)
			rc = ckv_store_list(fs->store, list_by_hash, dh);
		break;
	case INO_BY_MODEL:
		rc = dirh_add_dots(dh, ino, INO_ROOT);
		if (rc == 0)
			rc = list_by_model(fs, dh, NULL, NULL);
		break;
	case INO_IMPORT:
		rc = dirh_add_dots(dh, ino, INO_ROOT);
		break;
	case INO_CTL:
		rc = dirh_add_dots(dh, ino, INO_ROOT);
		if (rc == 0)
			rc = dirh_add(dh, INO_STATS, S_IFREG, "stats");
		if (rc == 0 && fs->cfg.ctl_path)
			rc = dirh_add(dh, INO_CTLSOCK, S_IFLNK, "ctl");
		break;
	default:
		if (is_pfx_ino(ino) && ino_idx(ino) == IDX_DIR) {
			struct pdata *pd = pfx_data(fs, ino);
			static const unsigned order[] = { IDX_MANIFEST, IDX_TOKENS, IDX_SUMS };
			char name[32];

			if (!pd) {
				rc = -ESTALE;
				break;
			}
			rc = dirh_add_dots(dh, ino, INO_BY_HASH);
			for (size_t i = 0; rc == 0 && i < 3; i++)
				if (pfx_file_name(pd->m, order[i], name))
					rc = dirh_add(dh, make_ino(ino_id(ino), order[i]), S_IFREG, name);
			for (uint32_t l = 0; rc == 0 && l < pd->m->geom.layers; l++) {
				ckv_layer_name(l, name);
				rc = dirh_add(dh, make_ino(ino_id(ino), IDX_LAYER0 + l), S_IFREG, name);
			}
			pdata_put(pd);
		} else if (is_mdir_ino(ino)) {
			char *org = NULL, *name = NULL;
			rc = mdir_names(fs, ino, &org, &name);
			if (rc == 0) {
				fuse_ino_t up = INO_BY_MODEL;
				if (name) {
					pthread_mutex_lock(&fs->lock);
					up = make_ino(mdir_id(fs, org, NULL), IDX_MDIR);
					pthread_mutex_unlock(&fs->lock);
				}
				rc = dirh_add_dots(dh, ino, up);
				if (rc == 0)
					rc = list_by_model(fs, dh, org, name);
			}
			free(org);
			free(name);
		} else {
			rc = is_pfx_ino(ino) || ino == INO_STATS ? -ENOTDIR : -ESTALE;
		}
	}
	if (rc < 0) {
		dirh_free(dh);
		fuse_reply_err(req, -rc);
		return;
	}
	fi->fh = (uintptr_t)dh;
	if (fuse_reply_open(req, fi) == -ENOENT)
		dirh_free(dh);
}

static void fs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	struct dirh *dh = (struct dirh *)(uintptr_t)fi->fh;
	size_t pos = 0;
	char *buf;

	(void)ino;
	buf = malloc(size);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	for (size_t i = off < 0 ? 0 : (size_t)off; i < dh->n; i++) {
		struct stat st = { .st_ino = dh->d[i].ino, .st_mode = dh->d[i].mode };
		size_t sz = fuse_add_direntry(req, buf + pos, size - pos, dh->pool + dh->d[i].name, &st,
					      (off_t)(i + 1));
		if (sz > size - pos)
			break;
		pos += sz;
	}
	fuse_reply_buf(req, buf, pos);
	free(buf);
}

static void fs_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	dirh_free((struct dirh *)(uintptr_t)fi->fh);
	fuse_reply_err(req, 0);
}

static void fs_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct ckvfs *fs = fs_of(req);
	struct statvfs sv;
	uint64_t np;

	(void)ino;
	if (fstatvfs(ckv_store_dirfd(fs->store), &sv) < 0) {
		fuse_reply_err(req, errno);
		return;
	}
	fs_gen(fs, &np);
	sv.f_files = np;
	sv.f_ffree = 0;
	sv.f_favail = 0;
	sv.f_namemax = 255;
	fuse_reply_statfs(req, &sv);
}

/* The layer index of a layer file inode, or -1. */
static int layer_of(fuse_ino_t ino)
{
	unsigned idx = ino_idx(ino);

	if (!is_pfx_ino(ino) || idx < IDX_LAYER0 || idx == IDX_MDIR)
		return -1;
	return (int)(idx - IDX_LAYER0);
}

static void fs_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
			size_t size, int flags)
{
	struct ckvfs *fs = fs_of(req);
	struct pdata *pd;
	int l = layer_of(ino), rc;

	(void)flags;
	if (l < 0 || (strcmp(name, XA_WILLNEED) && strcmp(name, XA_SCORES))) {
		fuse_reply_err(req, EPERM); /* published objects carry no attributes of their own */
		return;
	}
	pd = pfx_data(fs, ino);
	if (!pd) {
		fuse_reply_err(req, ESTALE);
		return;
	}
	rc = (uint32_t)l < pd->m->geom.layers ? hint_apply(fs, pd, (uint32_t)l, name, value, size)
					      : -ESTALE;
	pdata_put(pd);
	fuse_reply_err(req, -rc);
}

static void fs_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	struct ckvfs *fs = fs_of(req);
	struct pdata *pd;
	char *buf = NULL;
	size_t len = 0;
	int l = layer_of(ino), rc;

	if (l < 0 || strcmp(name, XA_RESIDENT)) {
		fuse_reply_err(req, ENODATA);
		return;
	}
	pd = pfx_data(fs, ino);
	if (!pd) {
		fuse_reply_err(req, ESTALE);
		return;
	}
	rc = (uint32_t)l < pd->m->geom.layers ? resident_list(fs, pd, (uint32_t)l, &buf, &len)
					      : -ESTALE;
	pdata_put(pd);
	if (rc < 0)
		fuse_reply_err(req, -rc);
	else if (!size)
		fuse_reply_xattr(req, len);
	else if (size < len)
		fuse_reply_err(req, ERANGE);
	else
		fuse_reply_buf(req, buf, len);
	free(buf);
}

static void fs_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
	static const char names[] = XA_RESIDENT; /* with its NUL */
	size_t len = layer_of(ino) >= 0 ? sizeof(names) : 0;

	if (!size)
		fuse_reply_xattr(req, len);
	else if (size < len)
		fuse_reply_err(req, ERANGE);
	else
		fuse_reply_buf(req, names, len);
}

static void fs_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
	(void)ino;
	(void)name;
	fuse_reply_err(req, ENODATA);
}

static const struct fuse_lowlevel_ops ckvfs_oper = {
	.init = fs_init,
	.destroy = fs_destroy,
	.lookup = fs_lookup,
	.forget = fs_forget,
	.forget_multi = fs_forget_multi,
	.getattr = fs_getattr,
	.setattr = fs_setattr,
	.readlink = fs_readlink,
	.mknod = fs_mknod,
	.mkdir = fs_mkdir,
	.unlink = fs_unlink,
	.rmdir = fs_unlink,
	.symlink = fs_symlink,
	.rename = fs_rename,
	.link = fs_link,
	.open = fs_open,
	.create = fs_create,
	.read = fs_read,
	.write = fs_write,
	.release = fs_release,
	.opendir = fs_opendir,
	.readdir = fs_readdir,
	.releasedir = fs_releasedir,
	.statfs = fs_statfs,
	.setxattr = fs_setxattr,
	.getxattr = fs_getxattr,
	.listxattr = fs_listxattr,
	.removexattr = fs_removexattr,
};

const struct fuse_lowlevel_ops *ckvfs_ops(void)
{
	return &ckvfs_oper;
}

/* ---- the watcher ---------------------------------------------------------- */

struct gone {
	ckv_hash hash;
	char org[CKV_MAX_MODEL_ID + 2], name[CKV_MAX_MODEL_ID + 2];
};

/*
 * The store's generation moved: check every prefix the kernel knows, mark
 * the ones gone from the store and invalidate their dentries.
 */
static void watcher_rescan(struct ckvfs *fs)
{
	ckv_hash *known = NULL;
	struct gone *gone = NULL;
	size_t n = 0, ngone = 0;
	uint64_t gen;

	pthread_mutex_lock(&fs->lock);
	gen = fs->gen;
	known = malloc((fs->npfx ? fs->npfx : 1) * sizeof(*known));
	if (known)
		for (size_t b = 0; b < fs->nbuckets; b++)
			for (struct pfx *p = fs->buckets[b]; p; p = p->next)
				if (!p->removed)
					known[n++] = p->hash;
	pthread_mutex_unlock(&fs->lock);
	if (!known)
		return;
	gone = malloc((n ? n : 1) * sizeof(*gone));
	if (!gone) {
		free(known);
		return;
	}

	for (size_t i = 0; i < n; i++) {
		ckv_manifest *m = NULL;
		int rc = ckv_store_get(fs->store, &known[i], &m, NULL);
		struct pfx *p;

		if (m) {
			ckv_manifest_free(m);
			free(m);
		}
		if (rc < 0 && rc != -ENOENT)
			continue;
		pthread_mutex_lock(&fs->lock);
		p = pfx_by_hash(fs, &known[i], NULL);
		if (p && rc == -ENOENT && !p->removed) {
			p->removed = true;
			gone[ngone].hash = p->hash;
			snprintf(gone[ngone].org, sizeof(gone[ngone].org), "%s", p->pd->org);
			snprintf(gone[ngone].name, sizeof(gone[ngone].name), "%s", p->pd->name);
			ngone++;
		} else if (p && rc == 0 && p->checked_gen < gen) {
			p->checked_gen = gen;
		}
		pthread_mutex_unlock(&fs->lock);
	}

	/* Notifications go out with no lock held: the kernel may call back. */
	for (size_t i = 0; i < ngone; i++) {
		char hex[CKV_HASH_HEX + 1];
		uint64_t mid = 0;

		ckv_hash_hex(&gone[i].hash, hex);
		fuse_lowlevel_notify_inval_entry(fs->se, INO_BY_HASH, hex, CKV_HASH_HEX);
		pthread_mutex_lock(&fs->lock);
		for (size_t k = 0; k < fs->nmdirs; k++)
			if (fs->mdirs[k].name && !strcmp(fs->mdirs[k].org, gone[i].org) &&
			    !strcmp(fs->mdirs[k].name, gone[i].name))
				mid = k + 1;
		pthread_mutex_unlock(&fs->lock);
		if (mid)
			fuse_lowlevel_notify_inval_entry(fs->se, make_ino(mid, IDX_MDIR), hex, CKV_HASH_HEX);
		atomic_fetch_add(&fs->invalidations, 1);
		fuse_log(FUSE_LOG_DEBUG, "ckvfs: prefix %s removed from the store\n", hex);
	}
	/* by-hash's nlink and listing changed. */
	fuse_lowlevel_notify_inval_inode(fs->se, INO_BY_HASH, -1, 0);
	fuse_lowlevel_notify_inval_inode(fs->se, INO_BY_MODEL, -1, 0);
	free(known);
	free(gone);
}

/* Find the mount's backing device (major:minor) in mountinfo. */
static int mount_devno(const char *mnt, char *dev, size_t len)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char line[4096];
	int rc = -ENOENT;

	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		char d[64], path[PATH_MAX], un[PATH_MAX];
		size_t k = 0;

		if (sscanf(line, "%*s %*s %63s %*s %4095s", d, path) != 2)
			continue;
		for (const char *s = path; *s && k + 1 < sizeof(un); s++) { /* undo \040 escapes */
			if (s[0] == '\\' && s[1] >= '0' && s[1] <= '7' && s[2] && s[3]) {
				un[k++] = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
				s += 3;
			} else {
				un[k++] = *s;
			}
		}
		un[k] = 0;
		if (!strcmp(un, mnt) && strstr(line, " - fuse")) {
			snprintf(dev, len, "%s", d);
			rc = 0; /* the last one is the one on top */
		}
	}
	fclose(f);
	return rc;
}

/*
 * The kernel sizes the read-ahead window of a FUSE mount by
 * min(bdi default, max_readahead) = 128 KiB at most; a larger window lets
 * async read-ahead keep several 1 MiB requests in flight. Only root may
 * write the bdi's read_ahead_kb; elsewhere this is a no-op.
 */
static void set_read_ahead(struct ckvfs *fs)
{
	char dev[64], path[128];
	FILE *f;

	if (!fs->cfg.read_ahead_kb || !fs->mountpoint || mount_devno(fs->mountpoint, dev, sizeof(dev)) < 0)
		return;
	snprintf(path, sizeof(path), "/sys/class/bdi/%s/read_ahead_kb", dev);
	f = fopen(path, "we");
	if (!f)
		return;
	fprintf(f, "%u\n", fs->cfg.read_ahead_kb);
	if (fclose(f) != 0)
		fuse_log(FUSE_LOG_DEBUG, "ckvfs: %s: %s\n", path, strerror(errno));
}

static void *watcher_main(void *arg)
{
	struct ckvfs *fs = arg;
	int ra_ticks = 0;

	pthread_mutex_lock(&fs->lock);
	while (!fs->stop) {
		struct timespec ts;
		bool rescan;

		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += WATCH_NS;
		if (ts.tv_nsec >= 1000000000l) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000l;
		}
		pthread_cond_timedwait(&fs->cond, &fs->lock, &ts);
		if (fs->stop)
			break;
		if (fs->initialized && ra_ticks < 2 && ++ra_ticks == 2) {
			/* After init's reply, which clamps the window: a period later. */
			pthread_mutex_unlock(&fs->lock);
			set_read_ahead(fs);
			pthread_mutex_lock(&fs->lock);
			continue;
		}
		pthread_mutex_unlock(&fs->lock);
		fs_poll(fs, true);
		pthread_mutex_lock(&fs->lock);
		rescan = fs->rescan && fs->initialized;
		fs->rescan = false;
		if (rescan) {
			pthread_mutex_unlock(&fs->lock);
			watcher_rescan(fs);
			pthread_mutex_lock(&fs->lock);
		}
	}
	pthread_mutex_unlock(&fs->lock);
	return NULL;
}

/* ---- retention at start --------------------------------------------------- */

struct warm_seg {
	const char *segment;
	ckv_geom geom;
	bool found;
	uint64_t *sums;      /* loaded on first use */
	uint32_t chunks;
	ckv_efile **files;   /* [geom.layers], registered on first use */
};
struct warm_find {
	struct warm_seg *segs;
	size_t n, left;
};

static int warm_seg_cmp(const void *a, const void *b)
{
	return strcmp(((const struct warm_seg *)a)->segment, ((const struct warm_seg *)b)->segment);
}

static struct warm_seg *warm_seg_find(const struct warm_find *wf, const char *segment)
{
	struct warm_seg key = { .segment = segment };

	return bsearch(&key, wf->segs, wf->n, sizeof(key), warm_seg_cmp);
}

/* ckv_store_list callback: note the geometry of each wanted segment. */
static int warm_find_geom(void *arg, const ckv_manifest *m)
{
	struct warm_find *wf = arg;

	for (uint32_t e = 0; e < m->nextents; e++) {
		struct warm_seg *s = warm_seg_find(wf, m->extents[e].segment);
		if (s && !s->found) {
			s->found = true;
			s->geom = m->geom;
			wf->left--;
		}
	}
	return wf->left ? 0 : 1;
}

/* "seg/ab/<segment>/<file>", relative to the store root. */
static int seg_file(const char *segment, const char *file, char *out, size_t len)
{
	char dir[PATH_MAX];
	int n;

	ckv_segment_path(segment, dir, sizeof(dir));
	n = snprintf(out, len, "%s/%s", dir, file);
	return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

/*
 * The engine file of one layer of a warm segment, registered on first use
 * under the key ckv_pview uses ("<segment>/<layer>"), so reads through a
 * prefix find the chunks warmed here.
 */
static ckv_efile *warm_file(struct ckvfs *fs, struct warm_seg *s, uint32_t layer)
{
	char key[128], rel[PATH_MAX], lname[32];
	int rc;

	if (!s->files) {
		s->files = calloc(s->geom.layers, sizeof(*s->files));
		if (!s->files ||
		    ckv_segment_sums(fs->store, s->segment, &s->geom, &s->sums, &s->chunks, NULL) < 0) {
			s->found = false;
			return NULL;
		}
	}
	if (s->files[layer])
		return s->files[layer];
	snprintf(key, sizeof(key), "%s/%u", s->segment, layer);
	ckv_layer_name(layer, lname);
	if (seg_file(s->segment, lname, rel, sizeof(rel)) < 0)
		return NULL;
	rc = ckv_engine_file_get(fs->engine, ckv_store_dirfd(fs->store), rel, key, s->geom.chunk_bytes,
				 s->chunks, s->sums + (size_t)layer * s->chunks, &s->files[layer]);
	if (rc < 0) {
		s->files[layer] = NULL;
		return NULL;
	}
	return s->files[layer];
}

/*
 * -o warm: prefetch the highest-scored chunks (r is best first) that fit in
 * half the arena. Queued reads keep their engine files alive, so the
 * references are dropped right after.
 */
static void warm_up(struct ckvfs *fs, const ckv_retention *r, size_t n)
{
	struct warm_find wf = { NULL, 0, 0 };
	ckv_chunk_ref *refs = NULL;
	uint64_t budget = ckv_engine_arena_size(fs->engine) / 2, used = 0;
	size_t nrefs = 0;

	if (!n)
		return;
	wf.segs = calloc(n, sizeof(*wf.segs));
	refs = calloc(n, sizeof(*refs));
	if (!wf.segs || !refs)
		goto out_free;
	for (size_t i = 0; i < n; i++)
		wf.segs[i].segment = r[i].segment;
	qsort(wf.segs, n, sizeof(*wf.segs), warm_seg_cmp);
	for (size_t i = 0; i < n; i++) /* unique */
		if (!wf.n || strcmp(wf.segs[wf.n - 1].segment, wf.segs[i].segment))
			wf.segs[wf.n++] = wf.segs[i];
	wf.left = wf.n;
	if (ckv_store_list(fs->store, warm_find_geom, &wf) < 0)
		goto out_free;

	for (size_t i = 0; i < n; i++) {
		struct warm_seg *s = warm_seg_find(&wf, r[i].segment);
		ckv_efile *f;

		if (!s || !s->found || r[i].layer >= s->geom.layers)
			continue;
		if (used + s->geom.chunk_bytes > budget)
			break;
		f = warm_file(fs, s, r[i].layer);
		if (!f || r[i].chunk >= s->chunks)
			continue;
		refs[nrefs].file = f;
		refs[nrefs].chunk = r[i].chunk;
		nrefs++;
		used += s->geom.chunk_bytes;
	}
	if (nrefs && ckv_engine_prefetch(fs->engine, refs, nrefs) == 0)
		atomic_store(&fs->warm_chunks, nrefs);
	fuse_log(FUSE_LOG_INFO, "ckvfs: warm: prefetching %zu chunks\n", nrefs);
out_free:
	if (wf.segs)
		for (size_t i = 0; i < wf.n; i++) {
			for (uint32_t l = 0; wf.segs[i].files && l < wf.segs[i].geom.layers; l++)
				if (wf.segs[i].files[l])
					ckv_engine_file_put(fs->engine, wf.segs[i].files[l]);
			free(wf.segs[i].sums);
			free(wf.segs[i].files);
		}
	free(wf.segs);
	free(refs);
}

/* ---- life cycle ------------------------------------------------------------ */

static void engine_log(void *arg, const char *msg)
{
	(void)arg;
	fuse_log(FUSE_LOG_ERR, "ckvfs: %s\n", msg);
}

int ckvfs_new(const struct ckvfs_config *cfg, ckvfs **out)
{
	struct ckvfs *fs = calloc(1, sizeof(*fs));

	if (!fs)
		return -ENOMEM;
	pthread_mutex_init(&fs->lock, NULL);
	pthread_cond_init(&fs->cond, NULL);
	fs->cfg = *cfg;
	fs->store_path = cfg->store ? strdup(cfg->store) : NULL;
	fs->mountpoint = cfg->mountpoint ? strdup(cfg->mountpoint) : NULL;
	fs->cfg.store = fs->store_path;
	fs->cfg.mountpoint = fs->mountpoint;
	fs->nbuckets = 256;
	fs->buckets = calloc(fs->nbuckets, sizeof(*fs->buckets));
	if (!fs->buckets || (cfg->store && !fs->store_path) || (cfg->mountpoint && !fs->mountpoint)) {
		ckvfs_free(fs);
		return -ENOMEM;
	}
	fs->uid = getuid();
	fs->gid = getgid();
	clock_gettime(CLOCK_REALTIME, &fs->started);
	*out = fs;
	return 0;
}

int ckvfs_open_store(ckvfs *fs, char *msg, size_t len)
{
	ckv_err err = { { 0 } };
	struct stat st;
	int rc;

	rc = ckv_store_open(fs->store_path, &fs->store, &err);
	if (rc < 0) {
		snprintf(msg, len, "%s: not a ckvfs store: %s", fs->store_path,
			 err.msg[0] ? err.msg : strerror(-rc));
		fs->store = NULL;
		return rc;
	}
	if (fstat(ckv_store_dirfd(fs->store), &st) == 0) {
		fs->uid = st.st_uid;
		fs->gid = st.st_gid;
	}
	ckv_store_generation(fs->store, &fs->gen, &fs->nprefixes);
	return 0;
}

int ckvfs_start(ckvfs *fs, struct fuse_session *se)
{
	ckv_engine_opts eo = {
		.arena_bytes = fs->cfg.cache_bytes,
		.policy = fs->cfg.policy,
		.no_direct = !fs->cfg.odirect,
		.log = engine_log,
		.log_arg = fs,
	};
	ckv_retention *r = NULL;
	size_t n = 0, max;
	int rc;

	fs->se = se;
	rc = ckv_engine_open(&eo, &fs->engine);
	if (rc < 0) {
		fuse_log(FUSE_LOG_ERR, "ckvfs: cache=%" PRIu64 ": cannot set up the chunk arena: %s\n",
			 fs->cfg.cache_bytes, strerror(-rc));
		fs->engine = NULL;
		return rc;
	}

	/*
	 * -o populate: a fresh arena costs a page fault, an allocation and a
	 * zeroed page per 4 KiB on first use (a third of the CPU of a cold
	 * read); take that cost now, at mount.
	 */
	if (fs->cfg.populate &&
	    madvise(ckv_engine_arena_base(fs->engine), ckv_engine_arena_size(fs->engine),
		    MADV_POPULATE_WRITE) < 0)
		fuse_log(FUSE_LOG_WARNING, "ckvfs: populate: %s\n", strerror(errno));

	/* Scores of the chunks that mattered, for retention (and -o warm). */
	max = fs->cfg.cache_bytes / CKV_ALIGN;
	if (max > RETENTION_LOAD_MAX)
		max = RETENTION_LOAD_MAX;
	rc = ckv_store_retention_top(fs->store, max, &r, &n);
	if (rc < 0) {
		fuse_log(FUSE_LOG_WARNING, "ckvfs: %s: reading retention state: %s\n", fs->store_path,
			 strerror(-rc));
		n = 0;
	}
	for (size_t i = 0; i < n; i++) {
		char key[128];
		snprintf(key, sizeof(key), "%s/%u", r[i].segment, r[i].layer);
		if (ckv_engine_retention_load(fs->engine, key, r[i].chunk, r[i].importance, r[i].freq,
					      r[i].last) == 0)
			atomic_fetch_add(&fs->retention_loaded, 1);
	}
	if (fs->cfg.warm)
		warm_up(fs, r, n);
	free(r);

	rc = pthread_create(&fs->watcher, NULL, watcher_main, fs);
	if (rc) {
		fuse_log(FUSE_LOG_ERR, "ckvfs: starting the watcher thread: %s\n", strerror(rc));
		return -rc;
	}
	fs->watcher_running = true;
	return 0;
}

void ckvfs_stop(ckvfs *fs)
{
	if (!fs->watcher_running)
		return;
	pthread_mutex_lock(&fs->lock);
	fs->stop = true;
	pthread_cond_signal(&fs->cond);
	pthread_mutex_unlock(&fs->lock);
	pthread_join(fs->watcher, NULL);
	fs->watcher_running = false;
}

void ckvfs_free(ckvfs *fs)
{
	if (!fs)
		return;
	ckvfs_stop(fs);
	if (fs->buckets) {
		for (size_t b = 0; b < fs->nbuckets; b++)
			while (fs->buckets[b]) {
				struct pfx *p = fs->buckets[b];
				fs->buckets[b] = p->next;
				pdata_put(p->pd);
				free(p);
			}
		free(fs->buckets);
	}
	while (atomic_load(&fs->ra_inflight)) /* read-ahead callbacks release slots */
		usleep(1000);
	mindex_put(fs->mindex);
	for (size_t i = 0; i < fs->nmdirs; i++) {
		free(fs->mdirs[i].org);
		free(fs->mdirs[i].name);
	}
	free(fs->mdirs);
	if (fs->engine)
		ckv_engine_close(fs->engine);
	if (fs->store)
		ckv_store_close(fs->store);
	pthread_mutex_destroy(&fs->lock);
	pthread_cond_destroy(&fs->cond);
	free(fs->store_path);
	free(fs->mountpoint);
	free(fs);
}

ckv_store *ckvfs_store(ckvfs *fs)
{
	return fs->store;
}

ckv_engine *ckvfs_engine(ckvfs *fs)
{
	return fs->engine;
}
