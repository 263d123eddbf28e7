/*
 * fs.c — the ckvfs FUSE low-level front end (DESIGN §4).
 *
 * The mounted view:
 *   /by-hash/<hash>/{manifest.json,tokens.bin,sums.xxh3,layer_NNN.kv}
 *   /by-model/<org>/<name>/<hash> -> ../../../by-hash/<hash>
 *   /import/<name>/                 staging areas: caches written by engines
 *   /.ckv/stats                     JSON counters, regenerated at each open
 * Every file of a published prefix is byte-identical to `ckv export`. A
 * directory made under by-hash/ or import/ is a staging area, written
 * through to STORE/incoming/ and published by a worker thread once
 * complete and verified (see "staging areas" below).
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
 * Inodes of staging areas and their files are (1 << 62) | serial: neither
 * a prefix's (bit 63) nor a by-model directory's (small).
 *
 * Locking. fs->lock protects the prefix table, the by-model directory
 * table, the cached model index pointer, the generation and the watcher's
 * flags; it is never held across store, engine or FUSE reply calls. Prefix
 * data, views, open files and the model index are reference counted; a read
 * holds its file handle (the kernel may send RELEASE as soon as the reply
 * is written). fs->stg_lock protects the staging areas and their nodes;
 * the two locks are never held together. A request that would change an
 * area the publisher is verifying waits on fs->stg_cond; the publisher
 * wakes it before it sends the kernel any notification, and notifies with
 * no lock held.
 */
#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 14)

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <inttypes.h>
#include <limits.h>
#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
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
#define XA_STATE "user.ckv.state"         /* staging areas: staging|verifying|failed|published */
#define XA_ERROR "user.ckv.error"         /* why a staging area is not published */
#define XA_PUBLISHED "user.ckv.published" /* the hash an area published last */
#define XA_CKV_PREFIX "user.ckv."

#define STG_INO_BIT (1ull << 62) /* staging inodes: (STG_INO_BIT | serial); never a prefix's or by-model's */
#define STG_BUCKETS 4096
#define TMO_STAGE 1.0             /* staging entries and attributes (publication invalidates them) */
#define MANIFEST_MAX (1u << 20)
#define PROBLEMS_MAX 4            /* problems of an area listed in user.ckv.error */

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

enum fh_kind { FH_BUF, FH_LAYER, FH_STAGE };

struct area;

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
	/* FH_STAGE: a file of a staging area */
	int fd;                    /* the backing file, closed with the last reference */
	bool writable;             /* counted in area->writers until release */
	struct area *area;         /* a reference until release */
};

/*
 * Staging areas (the write side; see "staging areas" below). A node is a
 * file of an area, or the area's directory (embedded in the area).
 */
struct snode {
	struct snode *next_ino, *next_bk; /* hash chains; fs->stg_lock */
	fuse_ino_t ino;              /* immutable */
	struct area *area;           /* immutable; a reference (not for the directory's own node) */
	int fd;                      /* immutable: O_PATH of the backing file; -1: the directory */
	dev_t bdev;                  /* immutable: backing identity */
	ino_t bino;
	uint64_t nlookup;            /* fs->stg_lock */
	bool stale;                  /* fs->stg_lock: its content was published; attributes frozen */
};

enum area_kind { AREA_BY_HASH, AREA_IMPORT };
enum area_state {
	AS_STAGING,   /* being written; checked after each quiet period */
	AS_VERIFYING, /* the publisher checks / imports it: changes wait */
	AS_PUBLISHED, /* by-hash: published and deleted; its inodes stand for the prefix */
	AS_REMOVED,   /* rmdir'ed */
};

struct area {
	struct area *next;           /* fs->areas; fs->stg_lock */
	unsigned refs;               /* fs->stg_lock: the list, file nodes, handles, the kernel (dir.nlookup) */
	enum area_kind kind;         /* immutable */
	char *name;                  /* immutable */
	char *path;                  /* immutable: "by-hash/<name>", as messages name it */
	char *bpath;                 /* immutable: STORE/incoming/<kind>/<name> */
	int dfd;                     /* immutable: the backing directory */
	struct snode dir;            /* the directory's node (fd -1) */
	enum area_state state;       /* fs->stg_lock */
	bool dirty;                  /* fs->stg_lock: changed since the last check */
	int64_t last_ns;             /* fs->stg_lock: when the last change ended */
	unsigned busy;               /* fs->stg_lock: requests changing it right now */
	unsigned writers;            /* fs->stg_lock: open handles that may write */
	char *error;                 /* fs->stg_lock: why it is not published, or NULL */
	ckv_hash published;          /* fs->stg_lock: by-hash: the prefix; import: the last one */
	bool has_published;          /* fs->stg_lock */
	bool idle_published;         /* fs->stg_lock: emptied by a publication, unchanged since */
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

	/*
	 * The write side. stg_lock protects the areas, the node tables and
	 * every field marked so in struct area and struct snode; it is never
	 * held together with fs->lock, nor across a store call, a FUSE reply
	 * or notification; backing syscalls under it are short (unlink of an
	 * empty directory, close).
	 */
	pthread_mutex_t stg_lock;
	pthread_cond_t stg_cond;        /* stg_lock: an area left AS_VERIFYING */
	pthread_cond_t pub_cond;        /* stg_lock: wakes the publisher (CLOCK_MONOTONIC) */
	struct area *areas;             /* stg_lock: live areas (staging or verifying) */
	size_t nareas;                  /* stg_lock */
	struct snode **stg_ino, **stg_bk; /* stg_lock: [STG_BUCKETS] by inode / backing identity */
	uint64_t stg_serial;            /* stg_lock: last staging inode serial */
	bool stg_stop;                  /* stg_lock */
	int incoming_fd;                /* STORE/incoming; -1: writing disabled */
	int incoming_lock_fd;           /* flock'ed incoming/lock */
	int kind_fd[2];                 /* incoming/by-hash, incoming/import */
	pthread_t publisher;
	bool publisher_running;
	_Atomic uint64_t writes, write_bytes, write_errors, publishes, publish_failures;
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

static bool is_stg_ino(fuse_ino_t ino);

static bool is_mdir_ino(fuse_ino_t ino)
{
	return !is_pfx_ino(ino) && !is_stg_ino(ino) && ino_id(ino) != 0 && ino_idx(ino) == IDX_MDIR;
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
	bool md = m->has_modes; /* copied in through a mount: the modes it came with */

	switch (idx) {
	case IDX_DIR:
		if (m->has_dir_time)
			t = ts_of(m->t_dir.sec, m->t_dir.nsec);
		attr_fill(fs, st, ino, S_IFDIR | (md ? m->mode_dir : 0555), 2, 0, t, created);
		return 0;
	case IDX_MANIFEST:
		if (m->has_times)
			t = ts_of(m->t_manifest.sec, m->t_manifest.nsec);
		attr_fill(fs, st, ino, S_IFREG | (md ? m->mode_manifest : 0444), 1, pd->json_len, t, created);
		return 0;
	case IDX_TOKENS:
		if (m->has_times)
			t = ts_of(m->t_tokens.sec, m->t_tokens.nsec);
		attr_fill(fs, st, ino, S_IFREG | (md ? m->mode_tokens : 0444), 1, (uint64_t)m->tokens * 4, t,
			  created);
		return 0;
	case IDX_SUMS:
		if (m->has_times)
			t = ts_of(m->t_sums.sec, m->t_sums.nsec);
		attr_fill(fs, st, ino, S_IFREG | (md ? m->mode_sums : 0444), 1,
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
		attr_fill(fs, st, ino, S_IFREG | (md ? m->mode_layers : 0444), 1, layer_size(m), t, created);
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
	uint64_t gen, np, nareas;
	char *buf;
	int n;

	memset(&st, 0, sizeof(st));
	if (fs->engine)
		ckv_engine_get_stats(fs->engine, &st);
	gen = fs_gen(fs, &np);
	pthread_mutex_lock(&fs->stg_lock);
	nareas = fs->nareas;
	pthread_mutex_unlock(&fs->stg_lock);
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
		     "  \"fuse_writes\": %" PRIu64 ",\n"
		     "  \"fuse_write_bytes\": %" PRIu64 ",\n"
		     "  \"fuse_write_errors\": %" PRIu64 ",\n"
		     "  \"staging_areas\": %" PRIu64 ",\n"
		     "  \"published_from_mount\": %" PRIu64 ",\n"
		     "  \"publish_failures\": %" PRIu64 ",\n"
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
		     atomic_load(&fs->warm_chunks), atomic_load(&fs->ra_chunks), atomic_load(&fs->writes),
		     atomic_load(&fs->write_bytes), atomic_load(&fs->write_errors), nareas,
		     atomic_load(&fs->publishes), atomic_load(&fs->publish_failures), np, gen);
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
	if (h->kind == FH_STAGE && h->fd >= 0)
		close(h->fd);
	if (h->files) {
		layer_put(h->pd, h->files);
		free(h->files);
	}
	pdata_put(h->pd);
	free(h);
}

/* ---- entries ----------------------------------------------------------------- */

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

/* ---- staging areas: the write side (DESIGN §4) ------------------------------ */
/*
 * A directory made under by-hash/ or import/ is a staging area. Its files
 * are real files in STORE/incoming/<by-hash|import>/<name>/ (same disk as
 * the store, so a write is one pwrite and publishing reads them in place);
 * every operation passes through to them. A node (struct snode) holds an
 * O_PATH descriptor of its backing file, so it keeps its identity through
 * renames and unlinks (passthrough_ll's way); the area's directory node is
 * part of the area.
 *
 * The publisher thread checks an area once it has been quiet for
 * publish_delay (no request changing it in flight, no file open for
 * writing, no change for that long): cp -a and rsync -a set times and modes
 * of files and of the directory after writing them, and must see a staging
 * file, not a published one. A check first looks at names and sizes only
 * (area_check); when the manifest, tokens and every layer file are there
 * with their exact sizes, leftover dot files (a killed rsync's temporaries)
 * are removed and ckv_store_import verifies and publishes the directory in
 * place, with the directory's name as the expected hash under by-hash/.
 * While it runs the area is AS_VERIFYING and requests that would change it
 * wait. Then a by-hash area is deleted and its inodes stand for the
 * published prefix (AS_PUBLISHED); an import area is emptied and stays. A
 * failed check leaves everything as it is, with the reason in
 * user.ckv.error and the log; the next change starts the clock again.
 *
 * Published data never changes: writes, creates, renames and unlinks get
 * EROFS, and a setattr is accepted only when it changes nothing that is
 * kept (mode, owner, size, mtime), which is what a second rsync -a or a
 * late utimens of a copy tool asks for.
 */

static bool is_stg_ino(fuse_ino_t ino)
{
	return ((uint64_t)ino >> 62) == 1;
}

static size_t stg_bucket(uint64_t key)
{
	return (size_t)((key * 0x9e3779b97f4a7c15ull) >> 40) & (STG_BUCKETS - 1);
}

/* fs->stg_lock held. */
static struct snode *snode_by_ino(struct ckvfs *fs, fuse_ino_t ino)
{
	for (struct snode *n = fs->stg_ino[stg_bucket(ino)]; n; n = n->next_ino)
		if (n->ino == ino)
			return n;
	return NULL;
}

/* fs->stg_lock held. */
static struct snode *snode_by_backing(struct ckvfs *fs, dev_t dev, ino_t bino)
{
	for (struct snode *n = fs->stg_bk[stg_bucket((uint64_t)bino ^ (uint64_t)dev << 32)]; n;
	     n = n->next_bk)
		if (n->bino == bino && n->bdev == dev)
			return n;
	return NULL;
}

/* fs->stg_lock held. Directory nodes (fd < 0) are found by inode only. */
static void snode_link(struct ckvfs *fs, struct snode *n)
{
	size_t k = stg_bucket(n->ino);

	n->next_ino = fs->stg_ino[k];
	fs->stg_ino[k] = n;
	if (n->fd >= 0) {
		k = stg_bucket((uint64_t)n->bino ^ (uint64_t)n->bdev << 32);
		n->next_bk = fs->stg_bk[k];
		fs->stg_bk[k] = n;
	}
}

/* fs->stg_lock held. */
static void snode_unlink(struct ckvfs *fs, struct snode *n)
{
	struct snode **pp = &fs->stg_ino[stg_bucket(n->ino)];

	while (*pp && *pp != n)
		pp = &(*pp)->next_ino;
	if (*pp)
		*pp = n->next_ino;
	if (n->fd >= 0) {
		pp = &fs->stg_bk[stg_bucket((uint64_t)n->bino ^ (uint64_t)n->bdev << 32)];
		while (*pp && *pp != n)
			pp = &(*pp)->next_bk;
		if (*pp)
			*pp = n->next_bk;
	}
}

/* fs->stg_lock held. */
static void area_get(struct area *a)
{
	a->refs++;
}

/* fs->stg_lock held. The last reference frees the area and its directory node. */
static void area_put(struct ckvfs *fs, struct area *a)
{
	assert(a->refs > 0);
	if (--a->refs)
		return;
	snode_unlink(fs, &a->dir);
	close(a->dfd);
	free(a->name);
	free(a->path);
	free(a->bpath);
	free(a->error);
	free(a);
}

/* fs->stg_lock held. A lookup of an area's directory: the kernel's reference to the area. */
static void area_dir_lookup(struct area *a)
{
	if (a->dir.nlookup++ == 0)
		area_get(a);
}

/* fs->stg_lock held. A live area of kind by name. */
static struct area *area_find(struct ckvfs *fs, enum area_kind kind, const char *name)
{
	for (struct area *a = fs->areas; a; a = a->next)
		if (a->kind == kind && !strcmp(a->name, name))
			return a;
	return NULL;
}

/* fs->stg_lock held. Take a out of the list (published or removed). */
static void area_unlist(struct ckvfs *fs, struct area *a)
{
	struct area **pp = &fs->areas;

	while (*pp && *pp != a)
		pp = &(*pp)->next;
	if (*pp) {
		*pp = a->next;
		fs->nareas--;
		area_put(fs, a);
	}
}

/* fs->stg_lock held. A change ended: the quiet period starts (again). */
static void area_touch(struct ckvfs *fs, struct area *a)
{
	a->dirty = true;
	a->idle_published = false;
	a->last_ns = now_ns();
	pthread_cond_signal(&fs->pub_cond);
}

/*
 * Wait until the publisher is done with a (AS_VERIFYING), then, for a
 * change, count it in flight (area_leave ends it). -EROFS: its content was
 * published (a by-hash area, or n is a file of a publication); -ENOENT: the
 * area was removed.
 */
static int area_enter(struct ckvfs *fs, struct area *a, const struct snode *n, bool change)
{
	int rc = 0;

	pthread_mutex_lock(&fs->stg_lock);
	while (a->state == AS_VERIFYING)
		pthread_cond_wait(&fs->stg_cond, &fs->stg_lock);
	if (a->state == AS_PUBLISHED || (n && n->stale))
		rc = -EROFS;
	else if (a->state == AS_REMOVED)
		rc = -ENOENT;
	else if (change)
		a->busy++;
	pthread_mutex_unlock(&fs->stg_lock);
	return rc;
}

static void area_leave(struct ckvfs *fs, struct area *a)
{
	pthread_mutex_lock(&fs->stg_lock);
	assert(a->busy > 0);
	a->busy--;
	area_touch(fs, a);
	pthread_mutex_unlock(&fs->stg_lock);
}

/* The node of a staging inode; the kernel keeps it alive while a request names it. */
static struct snode *snode_get(struct ckvfs *fs, fuse_ino_t ino)
{
	struct snode *n;

	pthread_mutex_lock(&fs->stg_lock);
	n = snode_by_ino(fs, ino);
	pthread_mutex_unlock(&fs->stg_lock);
	return n;
}

static bool snode_is_dir(const struct snode *n)
{
	return n == &n->area->dir;
}

/* "/proc/self/fd/N": reopens / changes the file behind an O_PATH descriptor. */
static void proc_path(int fd, char out[40])
{
	snprintf(out, 40, "/proc/self/fd/%d", fd);
}

/*
 * The data of a published prefix, for an inode that stands for it (a
 * by-hash area after publication), without keeping a lookup count.
 */
static int pfx_peek(struct ckvfs *fs, const ckv_hash *h, uint64_t *id, struct pdata **pd)
{
	int rc = pfx_acquire(fs, h, id, pd);

	if (rc == 0)
		pfx_forget(fs, make_ino(*id, IDX_DIR), 1);
	return rc;
}

/* Attributes of a staging node: the backing file's, or the prefix's once published. */
static int stg_stat(struct ckvfs *fs, struct snode *n, struct stat *st)
{
	struct area *a = n->area;

	if (snode_is_dir(n)) {
		ckv_hash h;
		bool pub;

		pthread_mutex_lock(&fs->stg_lock);
		pub = a->state == AS_PUBLISHED;
		h = a->published;
		pthread_mutex_unlock(&fs->stg_lock);
		if (pub) {
			struct pdata *pd;
			uint64_t id;
			int rc = pfx_peek(fs, &h, &id, &pd);

			if (rc < 0)
				return rc;
			pfx_attr(fs, pd, id, IDX_DIR, st);
			pdata_put(pd);
			st->st_ino = n->ino;
			return 0;
		}
		if (fstat(a->dfd, st) < 0)
			return -errno;
	} else if (fstat(n->fd, st) < 0) {
		return -errno;
	}
	st->st_ino = n->ino;
	st->st_dev = 0;
	st->st_blksize = READ_MAX;
	return 0;
}

/*
 * The node of regular file `name` of area a, made on first sight, with a
 * lookup counted; st gets its attributes. Only regular files are shown.
 */
static int snode_lookup(struct ckvfs *fs, struct area *a, const char *name, struct stat *st,
			struct snode **out)
{
	int fd = openat(a->dfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
	struct snode *n;

	if (fd < 0)
		return -errno;
	if (fstat(fd, st) < 0) {
		int rc = -errno;
		close(fd);
		return rc;
	}
	if (!S_ISREG(st->st_mode)) {
		close(fd);
		return -ENOENT;
	}
	pthread_mutex_lock(&fs->stg_lock);
	n = snode_by_backing(fs, st->st_dev, st->st_ino);
	if (n) {
		n->nlookup++;
		pthread_mutex_unlock(&fs->stg_lock);
		close(fd);
	} else {
		n = calloc(1, sizeof(*n));
		if (!n) {
			pthread_mutex_unlock(&fs->stg_lock);
			close(fd);
			return -ENOMEM;
		}
		n->ino = (fuse_ino_t)(STG_INO_BIT | ++fs->stg_serial);
		n->fd = fd;
		n->bdev = st->st_dev;
		n->bino = st->st_ino;
		n->area = a;
		n->nlookup = 1;
		area_get(a);
		snode_link(fs, n);
		pthread_mutex_unlock(&fs->stg_lock);
	}
	st->st_ino = n->ino;
	st->st_dev = 0;
	st->st_blksize = READ_MAX;
	*out = n;
	return 0;
}

static void stg_forget(struct ckvfs *fs, fuse_ino_t ino, uint64_t nl)
{
	struct snode *n;

	pthread_mutex_lock(&fs->stg_lock);
	n = snode_by_ino(fs, ino);
	if (n) {
		struct area *a = n->area;

		assert(n->nlookup >= nl);
		n->nlookup -= nl < n->nlookup ? nl : n->nlookup;
		if (!n->nlookup) {
			if (snode_is_dir(n)) {
				area_put(fs, a); /* the kernel's reference */
			} else {
				snode_unlink(fs, n);
				close(n->fd);
				free(n);
				area_put(fs, a);
			}
		}
	}
	pthread_mutex_unlock(&fs->stg_lock);
}

/*
 * A new area over the existing backing directory kind/name: listed (the
 * list's reference), with a lookup of its directory counted when `lookup`.
 */
static int area_new(struct ckvfs *fs, enum area_kind kind, const char *name, bool lookup,
		    struct area **out)
{
	static const char *const kinds[] = { "by-hash", "import" };
	struct area *a = calloc(1, sizeof(*a));
	int rc = -ENOMEM;

	if (!a)
		return -ENOMEM;
	a->dfd = openat(fs->kind_fd[kind], name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (a->dfd < 0) {
		rc = -errno;
		free(a);
		return rc;
	}
	a->kind = kind;
	a->name = strdup(name);
	if (asprintf(&a->path, "%s/%s", kinds[kind], name) < 0)
		a->path = NULL;
	if (asprintf(&a->bpath, "%s/incoming/%s/%s", fs->store_path, kinds[kind], name) < 0)
		a->bpath = NULL;
	if (!a->name || !a->path || !a->bpath) {
		close(a->dfd);
		free(a->name);
		free(a->path);
		free(a->bpath);
		free(a);
		return rc;
	}
	a->dir.fd = -1;
	a->dir.area = a;
	a->refs = 1;
	a->state = AS_STAGING;
	pthread_mutex_lock(&fs->stg_lock);
	if (area_find(fs, kind, name)) {
		pthread_mutex_unlock(&fs->stg_lock);
		close(a->dfd);
		free(a->name);
		free(a->path);
		free(a->bpath);
		free(a);
		return -EEXIST;
	}
	a->dir.ino = (fuse_ino_t)(STG_INO_BIT | ++fs->stg_serial);
	snode_link(fs, &a->dir);
	a->next = fs->areas;
	fs->areas = a;
	fs->nareas++;
	area_touch(fs, a);
	if (lookup)
		area_dir_lookup(a);
	pthread_mutex_unlock(&fs->stg_lock);
	*out = a;
	return 0;
}

/* "by-hash/<name>": only a prefix hash (32 lowercase hex digits). */
static bool hash_name(const char *name, ckv_hash *h)
{
	char hex[CKV_HASH_HEX + 1];

	if (strlen(name) != CKV_HASH_HEX || ckv_hash_parse(h, name) < 0)
		return false;
	ckv_hash_hex(h, hex);
	return !strcmp(hex, name);
}

/* mkdir by-hash/<hash> or import/<name>: a new staging area. */
static int stg_mkdir_area(struct ckvfs *fs, fuse_ino_t parent, const char *name, mode_t mode,
			  struct stat *st)
{
	enum area_kind kind = parent == INO_BY_HASH ? AREA_BY_HASH : AREA_IMPORT;
	struct area *a;
	ckv_hash h;
	int rc;

	if (fs->incoming_fd < 0)
		return -EROFS;
	if (kind == AREA_BY_HASH) {
		ckv_manifest *m = NULL;

		if (!hash_name(name, &h)) {
			fuse_log(FUSE_LOG_WARNING,
				 "ckvfs: mkdir by-hash/%s: not a prefix hash (32 lowercase hex digits); "
				 "copy a cache into import/<any name>/ to publish it under the hash of its tokens\n",
				 name);
			return -EINVAL;
		}
		rc = ckv_store_get(fs->store, &h, &m, NULL);
		if (m) {
			ckv_manifest_free(m);
			free(m);
		}
		if (rc == 0)
			return -EEXIST;
	}
	if (mkdirat(fs->kind_fd[kind], name, mode & 07777) < 0)
		return -errno;
	rc = area_new(fs, kind, name, true, &a);
	if (rc < 0) {
		unlinkat(fs->kind_fd[kind], name, AT_REMOVEDIR);
		return rc;
	}
	if (fstat(a->dfd, st) < 0)
		memset(st, 0, sizeof(*st));
	st->st_ino = a->dir.ino;
	st->st_dev = 0;
	st->st_blksize = READ_MAX;
	return 0;
}

/* rmdir by-hash/<hash> or import/<name> of an (empty) staging area. */
static int stg_rmdir_area(struct ckvfs *fs, fuse_ino_t parent, const char *name)
{
	enum area_kind kind = parent == INO_BY_HASH ? AREA_BY_HASH : AREA_IMPORT;
	struct area *a;
	int rc = 0;

	pthread_mutex_lock(&fs->stg_lock);
	a = area_find(fs, kind, name);
	if (a) {
		area_get(a);
		while (a->state == AS_VERIFYING)
			pthread_cond_wait(&fs->stg_cond, &fs->stg_lock);
	}
	if (!a || a->state != AS_STAGING) {
		rc = kind == AREA_BY_HASH ? -EROFS : -ENOENT; /* by-hash: a published prefix */
	} else if (unlinkat(fs->kind_fd[kind], name, AT_REMOVEDIR) < 0) {
		rc = -errno;
	} else {
		a->state = AS_REMOVED;
		area_unlist(fs, a);
	}
	if (a)
		area_put(fs, a);
	pthread_mutex_unlock(&fs->stg_lock);
	return rc;
}

/* A lookup of by-hash/<name> or import/<name> that names a staging area; -ENOENT if none. */
static int stg_lookup_area(struct ckvfs *fs, enum area_kind kind, const char *name, struct stat *st)
{
	struct area *a;

	pthread_mutex_lock(&fs->stg_lock);
	a = area_find(fs, kind, name);
	if (a)
		area_dir_lookup(a);
	pthread_mutex_unlock(&fs->stg_lock);
	if (!a)
		return -ENOENT;
	if (fstat(a->dfd, st) < 0)
		memset(st, 0, sizeof(*st));
	st->st_ino = a->dir.ino;
	st->st_dev = 0;
	st->st_blksize = READ_MAX;
	return 0;
}

/* The staging areas of one kind, for readdir of by-hash/ or import/. */
static int stg_list_areas(struct ckvfs *fs, enum area_kind kind, struct dirh *dh)
{
	int rc = 0;

	pthread_mutex_lock(&fs->stg_lock);
	for (struct area *a = fs->areas; a && rc == 0; a = a->next)
		if (a->kind == kind)
			rc = dirh_add(dh, a->dir.ino, S_IFDIR, a->name);
	pthread_mutex_unlock(&fs->stg_lock);
	return rc;
}

/*
 * Whether a setattr on published data changes nothing that is kept (mode,
 * owner, size, mtime; atime and ctime are not kept): then it is a no-op
 * that succeeds, as a second rsync -a asks for, else EROFS.
 */
static bool attr_unchanged(const struct stat *cur, const struct stat *want, int to_set)
{
	if ((to_set & FUSE_SET_ATTR_MODE) && (want->st_mode & 07777) != (cur->st_mode & 07777))
		return false;
	if ((to_set & FUSE_SET_ATTR_UID) && want->st_uid != cur->st_uid)
		return false;
	if ((to_set & FUSE_SET_ATTR_GID) && want->st_gid != cur->st_gid)
		return false;
	if ((to_set & FUSE_SET_ATTR_SIZE) && want->st_size != cur->st_size)
		return false;
	if (to_set & FUSE_SET_ATTR_MTIME_NOW)
		return false;
	if ((to_set & FUSE_SET_ATTR_MTIME) && (want->st_mtim.tv_sec != cur->st_mtim.tv_sec ||
					       want->st_mtim.tv_nsec != cur->st_mtim.tv_nsec))
		return false;
	return true;
}

/* A staging directory must be a directory node. */
static int stg_parent(struct ckvfs *fs, fuse_ino_t parent, struct snode **out)
{
	struct snode *p = snode_get(fs, parent);

	if (!p)
		return -ESTALE;
	if (!snode_is_dir(p))
		return -ENOTDIR;
	*out = p;
	return 0;
}

/* A lookup in a by-hash area that was published: the prefix's files. */
static void stg_lookup_published(fuse_req_t req, struct ckvfs *fs, struct area *a, const char *name)
{
	struct pdata *pd;
	struct stat st;
	ckv_hash h;
	uint64_t id;
	unsigned idx;
	int rc;

	pthread_mutex_lock(&fs->stg_lock);
	h = a->published;
	pthread_mutex_unlock(&fs->stg_lock);
	rc = pfx_acquire(fs, &h, &id, &pd);
	if (rc < 0) {
		fuse_reply_err(req, -rc);
		return;
	}
	idx = pfx_file_idx(pd->m, name);
	if (!idx) {
		pdata_put(pd);
		pfx_forget(fs, make_ino(id, IDX_DIR), 1);
		fuse_reply_err(req, ENOENT);
		return;
	}
	pfx_attr(fs, pd, id, idx, &st); /* the acquired lookup stands for this entry */
	pdata_put(pd);
	entry_reply(req, &st, TMO_STATIC, TMO_STATIC);
}

static void stg_lookup(fuse_req_t req, struct ckvfs *fs, fuse_ino_t parent, const char *name)
{
	struct snode *p, *n;
	struct stat st;
	int rc = stg_parent(fs, parent, &p);

	if (rc == 0)
		rc = area_enter(fs, p->area, NULL, false);
	if (rc == -EROFS) {
		stg_lookup_published(req, fs, p->area, name);
		return;
	}
	if (rc == 0)
		rc = snode_lookup(fs, p->area, name, &st, &n);
	if (rc < 0) {
		fuse_reply_err(req, -rc);
		return;
	}
	entry_reply(req, &st, TMO_STAGE, TMO_STAGE);
}

/* A handle of a staging file: a reference to its area; writers counted. */
static struct fh *stage_fh_new(struct ckvfs *fs, struct area *a, int fd, bool writable)
{
	struct fh *h = calloc(1, sizeof(*h));

	if (!h)
		return NULL;
	atomic_init(&h->refs, 1);
	h->kind = FH_STAGE;
	h->fd = fd;
	h->writable = writable;
	h->area = a;
	pthread_mutex_lock(&fs->stg_lock);
	area_get(a);
	if (writable)
		a->writers++;
	pthread_mutex_unlock(&fs->stg_lock);
	return h;
}

/* Release: a writer closing starts the quiet period; the descriptor goes with the last reference. */
static void stage_release(struct ckvfs *fs, struct fh *h)
{
	struct area *a = h->area;

	pthread_mutex_lock(&fs->stg_lock);
	if (h->writable) {
		assert(a->writers > 0);
		a->writers--;
		area_touch(fs, a);
	}
	h->area = NULL;
	area_put(fs, a);
	pthread_mutex_unlock(&fs->stg_lock);
	fh_put(h);
}

/*
 * Which staging handles bypass the page cache (direct_io: the kernel hands
 * the writer's pages to the daemon, one copy less): those opened
 * write-only (cp, dd, Python "wb"; cp into a mount ran twice as fast), which
 * cannot be mapped anyway, and temporaries — "."-named files created with
 * O_EXCL, like rsync's mkstemp files (rsync -a: 0.6 -> 0.8 of a plain
 * directory). Other handles that can read (np.memmap "w+") keep the page
 * cache, so shared mmap works on them. `name` is the created file's, or NULL.
 */
static bool stage_direct(int flags, const char *name)
{
	return (flags & O_ACCMODE) == O_WRONLY || (flags & O_DIRECT) ||
	       (name && name[0] == '.' && (flags & O_EXCL));
}

/* Flags for opening a backing file on behalf of the kernel. */
static int backing_flags(int flags)
{
	return (flags & ~(O_CREAT | O_EXCL | O_NOCTTY | O_DIRECT | O_NOFOLLOW)) | O_CLOEXEC;
}

static void stg_create(fuse_req_t req, struct ckvfs *fs, fuse_ino_t parent, const char *name,
		       mode_t mode, struct fuse_file_info *fi)
{
	struct fuse_entry_param e;
	struct snode *p, *n = NULL;
	struct area *a;
	struct fh *h;
	int rc = stg_parent(fs, parent, &p), fd;
	bool writable = (fi->flags & O_ACCMODE) != O_RDONLY;

	if (rc < 0)
		goto out_err;
	a = p->area;
	rc = area_enter(fs, a, NULL, true);
	if (rc < 0)
		goto out_err;
	fd = openat(a->dfd, name, (fi->flags & ~(O_NOCTTY | O_DIRECT)) | O_CREAT | O_NOFOLLOW | O_CLOEXEC,
		    mode & 07777);
	if (fd < 0) {
		rc = -errno;
		area_leave(fs, a);
		goto out_err;
	}
	memset(&e, 0, sizeof(e));
	rc = snode_lookup(fs, a, name, &e.attr, &n);
	h = rc == 0 ? stage_fh_new(fs, a, fd, writable) : NULL;
	area_leave(fs, a);
	if (!h) {
		close(fd);
		if (n)
			stg_forget(fs, n->ino, 1);
		rc = rc < 0 ? rc : -ENOMEM;
		goto out_err;
	}
	e.ino = n->ino;
	e.generation = 1;
	e.entry_timeout = TMO_STAGE;
	e.attr_timeout = TMO_STAGE;
	fi->fh = (uintptr_t)h;
	fi->direct_io = stage_direct(fi->flags, name);
	fi->keep_cache = 0;
	if (fuse_reply_create(req, &e, fi) == -ENOENT) { /* interrupted: no release, no forget */
		stage_release(fs, h);
		stg_forget(fs, n->ino, 1);
	}
	return;
out_err:
	fuse_reply_err(req, -rc);
}

static void stg_open(fuse_req_t req, struct ckvfs *fs, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct snode *n = snode_get(fs, ino);
	bool writable = (fi->flags & O_ACCMODE) != O_RDONLY, change = writable || (fi->flags & O_TRUNC);
	char proc[40];
	struct fh *h;
	int rc = 0, fd;

	if (!n) {
		fuse_reply_err(req, ESTALE);
		return;
	}
	if (snode_is_dir(n)) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	if (change) {
		rc = area_enter(fs, n->area, n, true);
		if (rc < 0) {
			fuse_reply_err(req, -rc);
			return;
		}
	}
	proc_path(n->fd, proc);
	fd = open(proc, backing_flags(fi->flags));
	if (fd < 0)
		rc = -errno;
	h = fd >= 0 ? stage_fh_new(fs, n->area, fd, writable) : NULL;
	if (change)
		area_leave(fs, n->area);
	if (!h) {
		if (fd >= 0)
			close(fd);
		fuse_reply_err(req, rc < 0 ? -rc : ENOMEM);
		return;
	}
	fi->fh = (uintptr_t)h;
	fi->direct_io = stage_direct(fi->flags, NULL);
	fi->keep_cache = 0;
	if (fuse_reply_open(req, fi) == -ENOENT)
		stage_release(fs, h);
}

static void stage_read(fuse_req_t req, struct fh *h, size_t size, off_t off)
{
	struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);

	buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
	buf.buf[0].fd = h->fd;
	buf.buf[0].pos = off;
	fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
}

/* One pwrite per request (up to max_write, 1 MiB); a short write is answered as such. */
static void stage_write(fuse_req_t req, struct ckvfs *fs, struct fh *h, const char *buf, size_t size,
			off_t off)
{
	size_t done = 0;
	int err = 0;

	if (!h->writable) {
		fuse_reply_err(req, EBADF);
		return;
	}
	while (done < size) {
		ssize_t w = pwrite(h->fd, buf + done, size - done, off + (off_t)done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			err = w < 0 ? errno : EIO;
			break;
		}
		done += (size_t)w;
	}
	atomic_fetch_add(&fs->writes, 1);
	if (!done && size) {
		atomic_fetch_add(&fs->write_errors, 1);
		fuse_reply_err(req, err);
		return;
	}
	atomic_fetch_add(&fs->write_bytes, done);
	fuse_reply_write(req, done);
}

static void stg_setattr(fuse_req_t req, struct ckvfs *fs, fuse_ino_t ino, struct stat *attr,
			int to_set, struct fuse_file_info *fi)
{
	struct snode *n = snode_get(fs, ino);
	struct fh *h = fi ? (struct fh *)(uintptr_t)fi->fh : NULL;
	struct stat st;
	struct area *a;
	char proc[40];
	bool dir;
	int rc;

	if (!n) {
		fuse_reply_err(req, ESTALE);
		return;
	}
	a = n->area;
	dir = snode_is_dir(n);
	if (h && h->kind != FH_STAGE)
		h = NULL;
	proc_path(n->fd, proc);
	rc = area_enter(fs, a, n, true);
	if (rc == -EROFS) { /* published: a no-op is fine, a change is not */
		rc = stg_stat(fs, n, &st);
		if (rc == 0 && !attr_unchanged(&st, attr, to_set))
			rc = -EROFS;
		goto out_reply;
	}
	if (rc < 0)
		goto out_reply;
	if (to_set & FUSE_SET_ATTR_MODE) {
		mode_t mode = attr->st_mode & 07777;
		if ((dir ? fchmod(a->dfd, mode) : h ? fchmod(h->fd, mode) : chmod(proc, mode)) < 0)
			rc = -errno;
	}
	if (rc == 0 && (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID))) {
		uid_t uid = (to_set & FUSE_SET_ATTR_UID) ? attr->st_uid : (uid_t)-1;
		gid_t gid = (to_set & FUSE_SET_ATTR_GID) ? attr->st_gid : (gid_t)-1;
		if (fchownat(dir ? a->dfd : n->fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0)
			rc = -errno;
	}
	if (rc == 0 && (to_set & FUSE_SET_ATTR_SIZE)) {
		if (dir) {
			rc = -EISDIR;
		} else if (h && h->writable) {
			if (ftruncate(h->fd, attr->st_size) < 0)
				rc = -errno;
		} else {
			int fd = open(proc, O_WRONLY | O_CLOEXEC);
			if (fd < 0 || ftruncate(fd, attr->st_size) < 0)
				rc = -errno;
			if (fd >= 0)
				close(fd);
		}
	}
	if (rc == 0 && (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW |
				  FUSE_SET_ATTR_MTIME_NOW))) {
		struct timespec ts[2] = { { 0, UTIME_OMIT }, { 0, UTIME_OMIT } };
		if (to_set & FUSE_SET_ATTR_ATIME_NOW)
			ts[0].tv_nsec = UTIME_NOW;
		else if (to_set & FUSE_SET_ATTR_ATIME)
			ts[0] = attr->st_atim;
		if (to_set & FUSE_SET_ATTR_MTIME_NOW)
			ts[1].tv_nsec = UTIME_NOW;
		else if (to_set & FUSE_SET_ATTR_MTIME)
			ts[1] = attr->st_mtim;
		if ((dir ? futimens(a->dfd, ts) : h ? futimens(h->fd, ts) : utimensat(AT_FDCWD, proc, ts, 0)) < 0)
			rc = -errno;
	}
	area_leave(fs, a);
	if (rc == 0)
		rc = stg_stat(fs, n, &st);
out_reply:
	if (rc < 0)
		fuse_reply_err(req, -rc);
	else
		fuse_reply_attr(req, &st, TMO_STAGE);
}

/* unlink / rmdir / mknod inside an area. */
static int stg_unlink(struct ckvfs *fs, fuse_ino_t parent, const char *name, int flags)
{
	struct snode *p;
	int rc = stg_parent(fs, parent, &p);

	if (rc == 0)
		rc = area_enter(fs, p->area, NULL, true);
	if (rc < 0)
		return rc;
	if (unlinkat(p->area->dfd, name, flags) < 0)
		rc = -errno;
	area_leave(fs, p->area);
	return rc;
}

static int stg_mknod(struct ckvfs *fs, fuse_ino_t parent, const char *name, mode_t mode,
		     struct stat *st, struct snode **n)
{
	struct snode *p;
	int rc = stg_parent(fs, parent, &p);

	if (rc < 0)
		return rc;
	if (!S_ISREG(mode))
		return -EPERM; /* a cache directory holds regular files only */
	rc = area_enter(fs, p->area, NULL, true);
	if (rc < 0)
		return rc;
	if (mknodat(p->area->dfd, name, S_IFREG | (mode & 07777), 0) < 0)
		rc = -errno;
	else
		rc = snode_lookup(fs, p->area, name, st, n);
	area_leave(fs, p->area);
	return rc;
}

/* rename inside one area (rsync's temporary files); across areas EXDEV (mv copies). */
static int stg_rename(struct ckvfs *fs, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
		      const char *newname, unsigned flags)
{
	struct snode *p, *np;
	int rc;

	if (!is_stg_ino(parent) || !is_stg_ino(newparent))
		return is_pfx_ino(parent) || is_pfx_ino(newparent) ? -EROFS : -EXDEV;
	if ((rc = stg_parent(fs, parent, &p)) < 0 || (rc = stg_parent(fs, newparent, &np)) < 0)
		return rc;
	if (p->area != np->area)
		return -EXDEV;
	rc = area_enter(fs, p->area, NULL, true);
	if (rc < 0)
		return rc;
	if (renameat2(p->area->dfd, name, p->area->dfd, newname, flags) < 0)
		rc = -errno;
	area_leave(fs, p->area);
	return rc;
}

/* A listing of an area: its regular files (of the prefix once published). */
static int stg_opendir(struct ckvfs *fs, fuse_ino_t ino, struct dirh *dh)
{
	struct snode *p;
	struct area *a;
	DIR *d;
	struct dirent *de;
	int rc = stg_parent(fs, ino, &p), fd;

	if (rc < 0)
		return rc;
	a = p->area;
	rc = dirh_add_dots(dh, ino, a->kind == AREA_BY_HASH ? INO_BY_HASH : INO_IMPORT);
	if (rc < 0)
		return rc;
	if (area_enter(fs, a, NULL, false) == -EROFS) {
		static const unsigned order[] = { IDX_MANIFEST, IDX_TOKENS, IDX_SUMS };
		struct pdata *pd;
		uint64_t id;
		char name[32];
		ckv_hash h;

		pthread_mutex_lock(&fs->stg_lock);
		h = a->published;
		pthread_mutex_unlock(&fs->stg_lock);
		rc = pfx_peek(fs, &h, &id, &pd);
		if (rc < 0)
			return rc;
		for (size_t i = 0; rc == 0 && i < 3; i++)
			if (pfx_file_name(pd->m, order[i], name))
				rc = dirh_add(dh, make_ino(id, order[i]), S_IFREG, name);
		for (uint32_t l = 0; rc == 0 && l < pd->m->geom.layers; l++) {
			ckv_layer_name(l, name);
			rc = dirh_add(dh, make_ino(id, IDX_LAYER0 + l), S_IFREG, name);
		}
		pdata_put(pd);
		return rc;
	}
	fd = openat(a->dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	d = fd >= 0 ? fdopendir(fd) : NULL;
	if (!d) {
		rc = -errno;
		if (fd >= 0)
			close(fd);
		return rc;
	}
	while (rc == 0 && (de = readdir(d))) {
		struct stat st;
		struct snode *n;
		fuse_ino_t ino_of = 0xffffffffu; /* not known yet: the kernel does not use d_ino */

		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		if (fstatat(a->dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode))
			continue;
		pthread_mutex_lock(&fs->stg_lock);
		n = snode_by_backing(fs, st.st_dev, st.st_ino);
		if (n)
			ino_of = n->ino;
		pthread_mutex_unlock(&fs->stg_lock);
		rc = dirh_add(dh, ino_of, S_IFREG, de->d_name);
	}
	closedir(d);
	return rc;
}

/* user.ckv.state / user.ckv.error / user.ckv.published of an area's directory. */
static int stg_xattr(struct ckvfs *fs, struct snode *n, const char *name, char **out, size_t *len)
{
	struct area *a = n->area;
	char hex[CKV_HASH_HEX + 1];
	const char *v = NULL;
	int rc = 0;

	if (!snode_is_dir(n))
		return -ENODATA;
	pthread_mutex_lock(&fs->stg_lock);
	if (!strcmp(name, XA_STATE)) {
		v = a->state == AS_VERIFYING			      ? "verifying"
		    : a->state == AS_PUBLISHED || a->idle_published ? "published"
		    : a->error					      ? "failed"
								      : "staging";
	} else if (!strcmp(name, XA_ERROR)) {
		v = a->error;
	} else if (!strcmp(name, XA_PUBLISHED) && a->has_published) {
		ckv_hash_hex(&a->published, hex);
		v = hex;
	}
	if (!v)
		rc = -ENODATA;
	else if (!(*out = strdup(v)))
		rc = -ENOMEM;
	else
		*len = strlen(v);
	pthread_mutex_unlock(&fs->stg_lock);
	return rc;
}

/* ---- the publisher --------------------------------------------------------- */

/* Up to PROBLEMS_MAX problems of an area, "; "-separated, then a count of the rest. */
struct problems {
	char msg[4096];
	size_t len;
	unsigned n;
};

static void problem(struct problems *p, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static void problem(struct problems *p, const char *fmt, ...)
{
	va_list ap;
	int k;

	if (++p->n > PROBLEMS_MAX)
		return;
	if (p->len && p->len + 2 < sizeof(p->msg)) {
		memcpy(p->msg + p->len, "; ", 3);
		p->len += 2;
	}
	va_start(ap, fmt);
	k = vsnprintf(p->msg + p->len, sizeof(p->msg) - p->len, fmt, ap);
	va_end(ap);
	if (k > 0)
		p->len += (size_t)k;
	if (p->len >= sizeof(p->msg))
		p->len = sizeof(p->msg) - 1;
}

static char *problems_text(struct problems *p)
{
	if (p->n > PROBLEMS_MAX && p->len + 40 < sizeof(p->msg))
		p->len += (size_t)snprintf(p->msg + p->len, sizeof(p->msg) - p->len, " (and %u more)",
					   p->n - PROBLEMS_MAX);
	return strdup(p->msg);
}

/* One file of an area must have exactly `want` bytes. */
static void check_size(struct area *a, struct problems *p, const char *name, uint64_t want,
		       const char *why)
{
	struct stat st;

	if (fstatat(a->dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
		problem(p, "%s/%s: %s", a->path, name, errno == ENOENT ? "missing" : strerror(errno));
	else if (!S_ISREG(st.st_mode))
		problem(p, "%s/%s: not a regular file", a->path, name);
	else if ((uint64_t)st.st_size != want)
		problem(p, "%s/%s: %lld bytes, expected %llu (%s)%s", a->path, name,
			(long long)st.st_size, (unsigned long long)want, why,
			(uint64_t)st.st_size < want ? ": truncated" : ": too large");
}

/*
 * Names and sizes only, no data read: 1 when the area holds nothing but
 * dot files (empty, or a killed rsync's leftovers), 0 when it looks
 * complete, -EINVAL with *msg (malloc'ed) saying what is missing or wrong.
 */
static int area_check(struct area *a, char **msg)
{
	struct problems p = { .len = 0 };
	ckv_manifest m;
	bool have_m = false;
	unsigned files = 0;
	struct dirent *de;
	DIR *d;
	int fd;

	memset(&m, 0, sizeof(m));
	fd = openat(a->dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	d = fd >= 0 ? fdopendir(fd) : NULL;
	if (!d) {
		if (fd >= 0)
			close(fd);
		problem(&p, "%s: cannot list: %s", a->path, strerror(errno));
		*msg = problems_text(&p);
		return -EIO;
	}
	while ((de = readdir(d))) {
		struct stat st;

		if (de->d_name[0] == '.')
			continue;
		files++;
		if (fstatat(a->dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISREG(st.st_mode))
			problem(&p, "%s/%s: not a regular file", a->path, de->d_name);
	}
	closedir(d);
	if (!files)
		return 1;

	fd = openat(a->dfd, "manifest.json", O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		problem(&p, "%s/manifest.json: %s", a->path, errno == ENOENT ? "missing" : strerror(errno));
	} else {
		struct stat st;
		char *json = NULL;
		ssize_t got = -1;

		if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
			problem(&p, "%s/manifest.json: not a regular file", a->path);
		else if (st.st_size > MANIFEST_MAX)
			problem(&p, "%s/manifest.json: %lld bytes, more than a manifest has (%u)", a->path,
				(long long)st.st_size, MANIFEST_MAX);
		else if (!(json = malloc((size_t)st.st_size + 1)) ||
			 (got = pread(fd, json, (size_t)st.st_size, 0)) != st.st_size)
			problem(&p, "%s/manifest.json: cannot read: %s", a->path,
				got < 0 ? strerror(errno) : "short read");
		if (got == st.st_size && json) {
			char what[PATH_MAX + 32];
			ckv_err e = { { 0 } };

			snprintf(what, sizeof(what), "%s/manifest.json", a->path);
			if (ckv_manifest_parse(&m, json, (size_t)got, false, what, &e) < 0)
				problem(&p, "%s", e.msg[0] ? e.msg : "invalid manifest");
			else
				have_m = true;
		}
		free(json);
		close(fd);
	}
	if (have_m) {
		uint64_t lsize = (uint64_t)m.chunks * m.geom.chunk_bytes;
		char why[160], name[32];
		struct stat st;

		snprintf(why, sizeof(why), "4 bytes for each of the %u tokens in manifest.json", m.tokens);
		check_size(a, &p, "tokens.bin", (uint64_t)m.tokens * 4, why);
		snprintf(why, sizeof(why), "%u chunks of %" PRIu64 " bytes", m.chunks, m.geom.chunk_bytes);
		for (uint32_t l = 0; l < m.geom.layers; l++) {
			ckv_layer_name(l, name);
			check_size(a, &p, name, lsize, why);
		}
		if (fstatat(a->dfd, "sums.xxh3", &st, AT_SYMLINK_NOFOLLOW) == 0 || errno != ENOENT)
			check_size(a, &p, "sums.xxh3",
				   CKV_SIDE_HEADER + (uint64_t)m.geom.layers * m.chunks * 8,
				   "a 32-byte header and 8 bytes per chunk per layer");
	}
	ckv_manifest_free(&m);
	if (!p.n)
		return 0;
	*msg = problems_text(&p);
	return -EINVAL;
}

/* msg with every `from` replaced by `to` (backing paths shown as mount paths); malloc'ed. */
static char *replace_all(const char *msg, const char *from, const char *to)
{
	size_t fl = strlen(from), tl = strlen(to), n = 0;
	const char *s;
	char *out, *o;

	for (s = strstr(msg, from); s; s = strstr(s + fl, from))
		n++;
	out = malloc(strlen(msg) + n * (tl > fl ? tl - fl : 0) + 1);
	if (!out)
		return NULL;
	for (o = out, s = msg;;) {
		const char *hit = strstr(s, from);
		size_t k = hit ? (size_t)(hit - s) : strlen(s);
		memcpy(o, s, k);
		o += k;
		if (!hit)
			break;
		memcpy(o, to, tl);
		o += tl;
		s = hit + fl;
	}
	*o = 0;
	return out;
}

/* Remove what `name` is in directory dfd (a file, or a directory tree). */
static void rm_entry(int dfd, const char *name)
{
	struct dirent *de;
	DIR *d;
	int fd;

	if (unlinkat(dfd, name, 0) == 0 || (errno != EISDIR && errno != EPERM))
		return;
	fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	d = fd >= 0 ? fdopendir(fd) : NULL;
	if (!d) {
		if (fd >= 0)
			close(fd);
		return;
	}
	while ((de = readdir(d)))
		if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
			rm_entry(dirfd(d), de->d_name);
	closedir(d);
	unlinkat(dfd, name, AT_REMOVEDIR);
}

/* The names in an area; with dots_only, the leftovers (".*") only. *out malloc'ed. */
static int area_names(struct area *a, bool dots_only, char ***out, size_t *n)
{
	struct dirent *de;
	char **v = NULL;
	size_t cap = 0;
	DIR *d;
	int fd = openat(a->dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC), rc = 0;

	*n = 0;
	d = fd >= 0 ? fdopendir(fd) : NULL;
	if (!d) {
		rc = -errno;
		if (fd >= 0)
			close(fd);
		return rc;
	}
	while ((de = readdir(d))) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..") ||
		    (dots_only && de->d_name[0] != '.'))
			continue;
		if (*n == cap) {
			char **nv = realloc(v, (cap = cap ? cap * 2 : 64) * sizeof(*v));
			if (!nv) {
				rc = -ENOMEM;
				break;
			}
			v = nv;
		}
		if (!(v[*n] = strdup(de->d_name))) {
			rc = -ENOMEM;
			break;
		}
		(*n)++;
	}
	closedir(d);
	*out = v;
	return rc;
}

static void names_free(char **v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(v[i]);
	free(v);
}

/*
 * After a publication: delete a by-hash area, empty an import area
 * (manifest.json first, so that a crash halfway leaves nothing that looks
 * complete). *names gets what was removed, for the kernel's dentries.
 */
static void area_empty(struct ckvfs *fs, struct area *a, char ***names, size_t *n)
{
	struct stat st;
	bool chmodded = false;

	/* A directory copied with mode 0555 must be writable to be emptied. */
	if (fstat(a->dfd, &st) == 0 && (st.st_mode & 0300) != 0300 &&
	    fchmod(a->dfd, (st.st_mode & 07777) | 0300) == 0)
		chmodded = true;
	if (area_names(a, false, names, n) < 0) {
		names_free(*names, *n);
		*names = NULL;
		*n = 0;
	}
	unlinkat(a->dfd, "manifest.json", 0);
	for (size_t i = 0; i < *n; i++)
		rm_entry(a->dfd, (*names)[i]);
	if (a->kind == AREA_BY_HASH) {
		if (unlinkat(fs->kind_fd[AREA_BY_HASH], a->name, AT_REMOVEDIR) < 0)
			fuse_log(FUSE_LOG_WARNING, "ckvfs: %s/incoming/%s: cannot remove: %s\n",
				 fs->store_path, a->path, strerror(errno));
	} else if (chmodded) {
		fchmod(a->dfd, st.st_mode & 07777);
	}
}

/*
 * Verify and publish an area that looks complete (the publisher's part;
 * the area is AS_VERIFYING, so nothing changes it meanwhile). Leftover dot
 * files go first, the directory's mtime is put back, then
 * ckv_store_import reads and checks every byte; by-hash areas must hash to
 * their name. 0: published (*h), the area's files are gone.
 */
static int area_publish(struct ckvfs *fs, struct area *a, ckv_hash *h, char **msg,
			char ***names, size_t *nnames)
{
	ckv_import_opts o = { .keep_modes = true };
	ckv_import_result res;
	ckv_err e = { { 0 } };
	ckv_hash want;
	struct stat st;
	char **dots = NULL, hex[CKV_HASH_HEX + 1];
	size_t ndots = 0;
	int rc;

	if (fstat(a->dfd, &st) == 0 && area_names(a, true, &dots, &ndots) == 0 && ndots) {
		struct timespec ts[2] = { { 0, UTIME_OMIT }, st.st_mtim };

		for (size_t i = 0; i < ndots; i++) {
			fuse_log(FUSE_LOG_INFO, "ckvfs: %s/%s: removing a leftover (nothing has it open)\n",
				 a->path, dots[i]);
			rm_entry(a->dfd, dots[i]);
		}
		futimens(a->dfd, ts); /* the copy set it; keep it */
	}
	names_free(dots, ndots);
	if (a->kind == AREA_BY_HASH)
		hash_name(a->name, &want);
	rc = ckv_store_import(fs->store, a->bpath, a->kind == AREA_BY_HASH ? &want : NULL, &o, &res, &e);
	if (rc < 0) {
		*msg = replace_all(e.msg[0] ? e.msg : strerror(-rc), a->bpath, a->path);
		return rc;
	}
	*h = res.hash;
	ckv_hash_hex(h, hex);
	if (res.existed)
		fuse_log(FUSE_LOG_INFO, "ckvfs: %s: %s was already stored\n", a->path, hex);
	else
		fuse_log(FUSE_LOG_INFO, "ckvfs: %s: published %s (%u new chunks, %u shared)\n", a->path,
			 hex, res.new_chunks, res.shared_chunks);
	area_empty(fs, a, names, nnames);
	return 0;
}

/*
 * The publisher's work on one area (AS_VERIFYING, a reference held): check,
 * publish, record the outcome, wake the requests that waited, then tell
 * the kernel (no lock held: it may call back).
 */
static void area_process(struct ckvfs *fs, struct area *a)
{
	char *msg = NULL, **names = NULL;
	size_t nnames = 0;
	ckv_hash h;
	bool published = false;
	fuse_ino_t dir;
	int rc;

	rc = area_check(a, &msg);
	if (rc < 0)
		fuse_log(FUSE_LOG_INFO, "ckvfs: %s: not complete: %s\n", a->path, msg ? msg : "");
	if (rc == 0) {
		rc = area_publish(fs, a, &h, &msg, &names, &nnames);
		if (rc < 0) {
			fuse_log(FUSE_LOG_WARNING, "ckvfs: %s: not published: %s\n", a->path,
				 msg ? msg : strerror(-rc));
			atomic_fetch_add(&fs->publish_failures, 1);
		} else {
			published = true;
			atomic_fetch_add(&fs->publishes, 1);
		}
	}

	pthread_mutex_lock(&fs->stg_lock);
	free(a->error);
	a->error = rc < 0 ? (msg ? msg : strdup(strerror(-rc))) : NULL;
	msg = NULL;
	a->state = AS_STAGING;
	if (published) {
		a->published = h;
		a->has_published = true;
		a->idle_published = true;
		for (size_t b = 0; b < STG_BUCKETS; b++) /* its files now stand for published data */
			for (struct snode *n = fs->stg_ino[b]; n; n = n->next_ino)
				if (n->area == a && !snode_is_dir(n))
					n->stale = true;
		if (a->kind == AREA_BY_HASH) {
			a->state = AS_PUBLISHED;
			area_unlist(fs, a); /* the caller's reference keeps it */
		}
	}
	dir = a->dir.ino;
	pthread_cond_broadcast(&fs->stg_cond);
	pthread_mutex_unlock(&fs->stg_lock);
	free(msg);

	if (published) {
		fs_poll(fs, true);
		if (a->kind == AREA_BY_HASH) {
			fuse_lowlevel_notify_inval_entry(fs->se, INO_BY_HASH, a->name, strlen(a->name));
			fuse_lowlevel_notify_inval_inode(fs->se, INO_BY_HASH, -1, 0);
		} else {
			for (size_t i = 0; i < nnames; i++)
				fuse_lowlevel_notify_inval_entry(fs->se, dir, names[i], strlen(names[i]));
			fuse_lowlevel_notify_inval_inode(fs->se, dir, -1, 0);
		}
	}
	names_free(names, nnames);
}

static void *publisher_main(void *arg)
{
	struct ckvfs *fs = arg;
	int64_t delay = (int64_t)fs->cfg.publish_delay_ms * 1000000ll;

	pthread_mutex_lock(&fs->stg_lock);
	while (!fs->stg_stop) {
		int64_t t = now_ns(), wait = 1000000000ll;
		struct area *pick = NULL;

		for (struct area *a = fs->areas; a; a = a->next) {
			if (a->state != AS_STAGING || !a->dirty || a->busy || a->writers)
				continue; /* busy and writers signal when they are done */
			if (a->last_ns + delay <= t) {
				pick = a;
				break;
			}
			if (a->last_ns + delay - t < wait)
				wait = a->last_ns + delay - t;
		}
		if (!pick) {
			struct timespec ts;
			clock_gettime(CLOCK_MONOTONIC, &ts);
			ts.tv_sec += (time_t)(wait / 1000000000ll);
			ts.tv_nsec += (long)(wait % 1000000000ll);
			if (ts.tv_nsec >= 1000000000l) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000l;
			}
			pthread_cond_timedwait(&fs->pub_cond, &fs->stg_lock, &ts);
			continue;
		}
		pick->state = AS_VERIFYING;
		pick->dirty = false;
		area_get(pick);
		pthread_mutex_unlock(&fs->stg_lock);
		area_process(fs, pick);
		pthread_mutex_lock(&fs->stg_lock);
		area_put(fs, pick);
	}
	pthread_mutex_unlock(&fs->stg_lock);
	return NULL;
}

/*
 * Writing at start: STORE/incoming/{by-hash,import}, held with a flock on
 * incoming/lock (one daemon per store writes; gc leaves held areas alone).
 * Areas left by an earlier daemon are resumed: listed again and checked
 * after the quiet period; a by-hash area whose prefix is published already
 * (a crash between publishing and deleting it) is removed.
 */
static void stg_start(struct ckvfs *fs)
{
	static const char *const kinds[] = { "by-hash", "import" };
	int dfd = ckv_store_dirfd(fs->store), fd, tries;

	mkdirat(dfd, "incoming", 0755);
	fs->incoming_fd = openat(dfd, "incoming", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fs->incoming_fd < 0) {
		fuse_log(FUSE_LOG_WARNING, "ckvfs: %s/incoming: %s; by-hash/ and import/ are read-only\n",
			 fs->store_path, strerror(errno));
		return;
	}
	fd = openat(fs->incoming_fd, "lock", O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	for (tries = 0; fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) < 0 && tries < 40; tries++)
		usleep(50000); /* a gc may hold it for a moment */
	if (fd < 0 || tries == 40) {
		fuse_log(FUSE_LOG_WARNING, "ckvfs: %s/incoming/lock: %s; by-hash/ and import/ are read-only\n",
			 fs->store_path, fd < 0 ? strerror(errno) : "held by another ckvfs on this store");
		if (fd >= 0)
			close(fd);
		close(fs->incoming_fd);
		fs->incoming_fd = -1;
		return;
	}
	fs->incoming_lock_fd = fd;
	for (int k = 0; k < 2; k++) {
		mkdirat(fs->incoming_fd, kinds[k], 0755);
		fs->kind_fd[k] = openat(fs->incoming_fd, kinds[k], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (fs->kind_fd[k] < 0) {
			fuse_log(FUSE_LOG_WARNING, "ckvfs: %s/incoming/%s: %s; by-hash/ and import/ are read-only\n",
				 fs->store_path, kinds[k], strerror(errno));
			close(fs->incoming_fd);
			fs->incoming_fd = -1;
			return;
		}
	}
	for (int k = 0; k < 2; k++) {
		int kfd = dup(fs->kind_fd[k]);
		DIR *d = kfd >= 0 ? fdopendir(kfd) : NULL;
		struct dirent *de;

		if (!d) {
			if (kfd >= 0)
				close(kfd);
			continue;
		}
		while ((de = readdir(d))) {
			struct area *a;
			ckv_manifest *m = NULL;
			ckv_hash h;
			struct stat st;
			int rc;

			if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
				continue;
			if (fstatat(fs->kind_fd[k], de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
			    !S_ISDIR(st.st_mode))
				continue;
			if (k == AREA_BY_HASH) {
				if (!hash_name(de->d_name, &h))
					continue;
				rc = ckv_store_get(fs->store, &h, &m, NULL);
				if (m) {
					ckv_manifest_free(m);
					free(m);
				}
				if (rc == 0) {
					fuse_log(FUSE_LOG_INFO, "ckvfs: incoming/by-hash/%s: published already; removed\n",
						 de->d_name);
					rm_entry(fs->kind_fd[k], de->d_name);
					continue;
				}
			}
			if (area_new(fs, (enum area_kind)k, de->d_name, false, &a) == 0)
				fuse_log(FUSE_LOG_INFO, "ckvfs: %s: resumed (checked again after publish_delay)\n",
					 a->path); /* no requests yet: a stays listed */
		}
		closedir(d);
	}
}

/* ---- FUSE operations ----------------------------------------------------- */

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
	if (is_stg_ino(parent)) {
		stg_lookup(req, fs, parent, name);
		return;
	}
	if (parent == INO_IMPORT) {
		rc = stg_lookup_area(fs, AREA_IMPORT, name, &st);
		if (rc < 0)
			goto out_err;
		entry_reply(req, &st, TMO_STAGE, TMO_STAGE);
		return;
	}
	if (parent == INO_BY_HASH) {
		struct pdata *pd;
		ckv_hash h;
		uint64_t id;

		if (!hash_name(name, &h)) /* only the canonical lowercase spelling */
			goto out_err;
		if (stg_lookup_area(fs, AREA_BY_HASH, name, &st) == 0) { /* a staging area */
			entry_reply(req, &st, TMO_DYNAMIC, TMO_STAGE);
			return;
		}
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

static void forget_one(struct ckvfs *fs, fuse_ino_t ino, uint64_t nlookup)
{
	if (is_pfx_ino(ino))
		pfx_forget(fs, ino, nlookup);
	else if (is_stg_ino(ino))
		stg_forget(fs, ino, nlookup);
}

static void fs_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	forget_one(fs_of(req), ino, nlookup);
	fuse_reply_none(req);
}

static void fs_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	for (size_t i = 0; i < count; i++)
		forget_one(fs_of(req), forgets[i].ino, forgets[i].nlookup);
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
	} else if (is_stg_ino(ino)) {
		struct snode *n = snode_get(fs, ino);
		rc = n ? stg_stat(fs, n, &st) : -ESTALE;
		tmo = TMO_STAGE;
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

/*
 * Published files and directories never change; a setattr that would
 * change nothing kept (rsync -a run again, a copy tool's late utimens) is
 * answered with the attributes, anything else with EROFS.
 */
static void fs_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		       struct fuse_file_info *fi)
{
	struct ckvfs *fs = fs_of(req);
	struct pdata *pd;
	struct stat st;
	int rc;

	if (is_stg_ino(ino)) {
		stg_setattr(req, fs, ino, attr, to_set, fi);
		return;
	}
	if (!is_pfx_ino(ino) || !(pd = pfx_data(fs, ino))) {
		fuse_reply_err(req, EROFS);
		return;
	}
	rc = pfx_attr(fs, pd, ino_id(ino), ino_idx(ino), &st);
	pdata_put(pd);
	if (rc == 0 && !attr_unchanged(&st, attr, to_set))
		rc = -EROFS;
	if (rc < 0)
		fuse_reply_err(req, -rc);
	else
		fuse_reply_attr(req, &st, TMO_STATIC);
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

/* mkdir by-hash/<hash> or import/<name> makes a staging area; nothing else may. */
static void fs_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	struct ckvfs *fs = fs_of(req);
	struct stat st;
	int rc;

	if (parent == INO_BY_HASH || parent == INO_IMPORT) {
		rc = stg_mkdir_area(fs, parent, name, mode, &st);
		if (rc == 0) {
			entry_reply(req, &st, parent == INO_BY_HASH ? TMO_DYNAMIC : TMO_STAGE, TMO_STAGE);
			return;
		}
	} else {
		rc = is_stg_ino(parent) ? -EPERM : -EROFS; /* a cache directory has no sub-directories */
	}
	fuse_reply_err(req, -rc);
}

static void fs_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
	struct snode *n;
	struct stat st;
	int rc = -EROFS;

	(void)rdev;
	if (is_stg_ino(parent))
		rc = stg_mknod(fs_of(req), parent, name, mode, &st, &n);
	if (rc < 0)
		fuse_reply_err(req, -rc);
	else
		entry_reply(req, &st, TMO_STAGE, TMO_STAGE);
}

static void fs_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
		      struct fuse_file_info *fi)
{
	if (is_stg_ino(parent))
		stg_create(req, fs_of(req), parent, name, mode, fi);
	else
		fuse_reply_err(req, EROFS);
}

static void fs_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	fuse_reply_err(req, is_stg_ino(parent) ? -stg_unlink(fs_of(req), parent, name, 0) : EROFS);
}

static void fs_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct ckvfs *fs = fs_of(req);
	int rc = -EROFS;

	if (parent == INO_BY_HASH || parent == INO_IMPORT)
		rc = stg_rmdir_area(fs, parent, name);
	else if (is_stg_ino(parent))
		rc = stg_unlink(fs, parent, name, AT_REMOVEDIR);
	fuse_reply_err(req, -rc);
}

static void fs_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
		      const char *newname, unsigned int flags)
{
	struct ckvfs *fs = fs_of(req);
	int rc = -EROFS;

	if (is_stg_ino(parent) || is_stg_ino(newparent)) {
		rc = stg_rename(fs, parent, name, newparent, newname, flags);
	} else if (parent == INO_BY_HASH || parent == INO_IMPORT) {
		struct stat st;
		/* moving an area: EXDEV, so mv copies and removes */
		if (stg_lookup_area(fs, parent == INO_BY_HASH ? AREA_BY_HASH : AREA_IMPORT, name, &st) == 0) {
			stg_forget(fs, st.st_ino, 1);
			rc = -EXDEV;
		}
	}
	fuse_reply_err(req, -rc);
}

static void fs_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
	(void)link;
	(void)name;
	fuse_reply_err(req, is_stg_ino(parent) ? EPERM : EROFS);
}

static void fs_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
{
	(void)ino;
	(void)newname;
	fuse_reply_err(req, is_stg_ino(newparent) ? EPERM : EROFS);
}

static void fs_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct ckvfs *fs = fs_of(req);
	struct fh *h;
	unsigned idx = ino_idx(ino);
	int rc = 0;

	if (is_stg_ino(ino)) {
		stg_open(req, fs, ino, fi);
		return;
	}
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
	if (h->kind == FH_STAGE)
		stage_read(req, h, size, off);
	else if (h->kind == FH_LAYER)
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
	struct fh *h = (struct fh *)(uintptr_t)fi->fh;

	(void)ino;
	if (h->kind == FH_STAGE)
		stage_write(req, fs_of(req), h, buf, size, off);
	else
		fuse_reply_err(req, EROFS);
}

static void fs_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fh *h = (struct fh *)(uintptr_t)fi->fh;

	(void)ino;
	if (h->kind == FH_STAGE)
		stage_release(fs_of(req), h);
	else
		fh_put(h);
	fuse_reply_err(req, 0);
}

static void fs_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	struct fh *h = (struct fh *)(uintptr_t)fi->fh;
	int rc = 0;

	(void)ino;
	if (h->kind == FH_STAGE && (datasync ? fdatasync(h->fd) : fsync(h->fd)) < 0)
		rc = errno;
	fuse_reply_err(req, rc); /* published data is on disk already */
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
		if (rc == 0)
			rc = stg_list_areas(fs, AREA_BY_HASH, dh);
		break;
	case INO_BY_MODEL:
		rc = dirh_add_dots(dh, ino, INO_ROOT);
		if (rc == 0)
			rc = list_by_model(fs, dh, NULL, NULL);
		break;
	case INO_IMPORT:
		rc = dirh_add_dots(dh, ino, INO_ROOT);
		if (rc == 0)
			rc = stg_list_areas(fs, AREA_IMPORT, dh);
		break;
	case INO_CTL:
		rc = dirh_add_dots(dh, ino, INO_ROOT);
		if (rc == 0)
			rc = dirh_add(dh, INO_STATS, S_IFREG, "stats");
		if (rc == 0 && fs->cfg.ctl_path)
			rc = dirh_add(dh, INO_CTLSOCK, S_IFLNK, "ctl");
		break;
	default:
		if (is_stg_ino(ino)) {
			rc = stg_opendir(fs, ino, dh);
		} else if (is_pfx_ino(ino) && ino_idx(ino) == IDX_DIR) {
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
	if (is_stg_ino(ino)) {
		/* cp -a copies a mount's user.ckv.* views along: hints, meaningless here */
		fuse_reply_err(req, strncmp(name, XA_CKV_PREFIX, strlen(XA_CKV_PREFIX)) ? ENOTSUP : 0);
		return;
	}
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

	if (is_stg_ino(ino)) {
		struct snode *n = snode_get(fs, ino);
		rc = n ? stg_xattr(fs, n, name, &buf, &len) : -ESTALE;
	} else if (is_pfx_ino(ino) && ino_idx(ino) == IDX_DIR && !strcmp(name, XA_STATE)) {
		rc = (buf = strdup("published")) ? 0 : -ENOMEM;
		len = buf ? strlen(buf) : 0;
	} else if (l < 0 || strcmp(name, XA_RESIDENT)) {
		rc = -ENODATA;
	} else if (!(pd = pfx_data(fs, ino))) {
		rc = -ESTALE;
	} else {
		rc = (uint32_t)l < pd->m->geom.layers ? resident_list(fs, pd, (uint32_t)l, &buf, &len)
						      : -ESTALE;
		pdata_put(pd);
	}
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
	static const char resident[] = XA_RESIDENT; /* with its NUL */
	char names[64];
	size_t len = 0;

	if (layer_of(ino) >= 0) {
		memcpy(names, resident, sizeof(resident));
		len = sizeof(resident);
	} else if (is_stg_ino(ino)) {
		struct ckvfs *fs = fs_of(req);
		struct snode *n = snode_get(fs, ino);
		static const char *const xa[] = { XA_STATE, XA_ERROR, XA_PUBLISHED };

		for (size_t i = 0; n && i < 3; i++) {
			char *v = NULL;
			size_t vl;
			if (stg_xattr(fs, n, xa[i], &v, &vl) == 0) {
				memcpy(names + len, xa[i], strlen(xa[i]) + 1);
				len += strlen(xa[i]) + 1;
			}
			free(v);
		}
	}
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
	.rmdir = fs_rmdir,
	.symlink = fs_symlink,
	.rename = fs_rename,
	.link = fs_link,
	.open = fs_open,
	.create = fs_create,
	.read = fs_read,
	.write = fs_write,
	.release = fs_release,
	.fsync = fs_fsync,
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
	pthread_mutex_init(&fs->stg_lock, NULL);
	pthread_cond_init(&fs->stg_cond, NULL);
	{
		pthread_condattr_t ca;
		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		pthread_cond_init(&fs->pub_cond, &ca);
		pthread_condattr_destroy(&ca);
	}
	fs->incoming_fd = fs->incoming_lock_fd = fs->kind_fd[0] = fs->kind_fd[1] = -1;
	fs->cfg = *cfg;
	fs->store_path = cfg->store ? strdup(cfg->store) : NULL;
	fs->mountpoint = cfg->mountpoint ? strdup(cfg->mountpoint) : NULL;
	fs->cfg.store = fs->store_path;
	fs->cfg.mountpoint = fs->mountpoint;
	fs->nbuckets = 256;
	fs->buckets = calloc(fs->nbuckets, sizeof(*fs->buckets));
	fs->stg_ino = calloc(STG_BUCKETS, sizeof(*fs->stg_ino));
	fs->stg_bk = calloc(STG_BUCKETS, sizeof(*fs->stg_bk));
	if (!fs->buckets || !fs->stg_ino || !fs->stg_bk || (cfg->store && !fs->store_path) ||
	    (cfg->mountpoint && !fs->mountpoint)) {
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

	stg_start(fs);
	if (fs->incoming_fd >= 0) {
		rc = pthread_create(&fs->publisher, NULL, publisher_main, fs);
		if (rc) {
			fuse_log(FUSE_LOG_ERR, "ckvfs: starting the publisher thread: %s\n", strerror(rc));
			return -rc;
		}
		fs->publisher_running = true;
	}
	return 0;
}

/* The publisher finishes the area it works on (its waiters go on), then stops. */
void ckvfs_stop(ckvfs *fs)
{
	if (fs->publisher_running) {
		pthread_mutex_lock(&fs->stg_lock);
		fs->stg_stop = true;
		pthread_cond_signal(&fs->pub_cond);
		pthread_mutex_unlock(&fs->stg_lock);
		pthread_join(fs->publisher, NULL);
		fs->publisher_running = false;
	}
	if (!fs->watcher_running)
		return;
	pthread_mutex_lock(&fs->lock);
	fs->stop = true;
	pthread_cond_signal(&fs->cond);
	pthread_mutex_unlock(&fs->lock);
	pthread_join(fs->watcher, NULL);
	fs->watcher_running = false;
}

/* At exit: every node and area, whoever still names them (the kernel is gone). */
static void stg_free(struct ckvfs *fs)
{
	struct area **all = NULL;
	size_t n = 0, cap = 0;

	for (struct area *a = fs->areas; a; a = a->next) {
		if (n == cap) {
			struct area **na = realloc(all, (cap = cap ? 2 * cap : 16) * sizeof(*all));
			if (!na)
				break;
			all = na;
		}
		all[n++] = a;
	}
	for (size_t b = 0; fs->stg_ino && b < STG_BUCKETS; b++)
		for (struct snode *nd = fs->stg_ino[b], *next; nd; nd = next) {
			struct area *a = nd->area;
			size_t i;

			next = nd->next_ino;
			for (i = 0; i < n && all[i] != a; i++)
				;
			if (i == n) {
				if (n == cap) {
					struct area **na = realloc(all, (cap = cap ? 2 * cap : 16) * sizeof(*all));
					if (!na)
						continue;
					all = na;
				}
				all[n++] = a;
			}
			if (!snode_is_dir(nd)) {
				close(nd->fd);
				free(nd);
			}
		}
	for (size_t i = 0; i < n; i++) {
		close(all[i]->dfd);
		free(all[i]->name);
		free(all[i]->path);
		free(all[i]->bpath);
		free(all[i]->error);
		free(all[i]);
	}
	free(all);
	free(fs->stg_ino);
	free(fs->stg_bk);
	for (int k = 0; k < 2; k++)
		if (fs->kind_fd[k] >= 0)
			close(fs->kind_fd[k]);
	if (fs->incoming_lock_fd >= 0)
		close(fs->incoming_lock_fd); /* the flock goes with it */
	if (fs->incoming_fd >= 0)
		close(fs->incoming_fd);
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
	stg_free(fs);
	if (fs->engine)
		ckv_engine_close(fs->engine);
	if (fs->store)
		ckv_store_close(fs->store);
	pthread_mutex_destroy(&fs->lock);
	pthread_cond_destroy(&fs->cond);
	pthread_mutex_destroy(&fs->stg_lock);
	pthread_cond_destroy(&fs->stg_cond);
	pthread_cond_destroy(&fs->pub_cond);
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
