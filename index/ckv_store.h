/*
 * ckv_store.h — a ckvfs store: segments and prefix manifests on disk, an
 * LMDB index over them (DESIGN §3). No threads are created, no FUSE.
 *
 * A store handle may be used from several threads; every call opens its own
 * short LMDB transaction. Several processes may open one store at once:
 * publishing is serialized by LMDB's writer lock, orphan sweeps by a flock.
 *
 * Errors: 0 or a negative errno; a ckv_err, when given, receives a message
 * naming the file and field.
 */
#ifndef CKV_STORE_H
#define CKV_STORE_H

#include "ckv_format.h"

typedef struct ckv_store ckv_store;

/* Create the directory layout and the index. Existing stores are left as is. */
int ckv_store_init(const char *path, ckv_err *e);
/* Open; -ENOENT / -ENOTDIR when path is not a store. */
int ckv_store_open(const char *path, ckv_store **out, ckv_err *e);
/*
 * For ckv reindex: as ckv_store_open, but an index that cannot be opened
 * (corrupt, another version) is removed and an empty one created, for
 * ckv_store_reindex to fill from the files. Processes that still have the
 * old index open keep using it until they reopen the store.
 */
int ckv_store_open_rebuild(const char *path, ckv_store **out, ckv_err *e);
void ckv_store_close(ckv_store *s);
const char *ckv_store_path(const ckv_store *s);
/*
 * Bulk mode for generating test and benchmark data: skip per-file fsync and
 * LMDB's commit sync; ckv_store_close then syncs once. Not crash-safe.
 */
void ckv_store_set_nosync(ckv_store *s, bool no_sync);
/* Directory fd of the store root, owned by the store. */
int ckv_store_dirfd(const ckv_store *s);

/* Progress callback for long work; done and total in bytes (or items). */
typedef void (*ckv_progress_fn)(void *arg, const char *what, uint64_t done, uint64_t total);

typedef struct ckv_import_opts {
	ckv_progress_fn progress;
	void *progress_arg;
	/* Fault injection for crash tests: SIGKILL self at this stage (see store.c). */
	const char *crash_at;
	/*
	 * ckv_store_import: keep the permission bits of the directory and its
	 * files in the record ("modes"), for a view that shows them (the mount's
	 * staging areas: a second rsync -a then finds nothing to change).
	 */
	bool keep_modes;
} ckv_import_opts;

typedef struct ckv_import_result {
	ckv_hash hash;
	uint32_t shared_chunks;  /* chunks referenced from already stored prefixes */
	uint32_t new_chunks;     /* chunks written to a new segment */
	uint64_t bytes_written;  /* layer bytes written */
	bool existed;            /* the prefix was already stored: nothing written */
} ckv_import_result;

/*
 * Import an exported cache directory (manifest.json, tokens.bin,
 * layer_NNN.kv, optional sums.xxh3). Everything is verified before anything
 * is published; on any error the store is unchanged.
 * If expect_hash is non-NULL the tokens must hash to it.
 */
int ckv_store_import(ckv_store *s, const char *dir, const ckv_hash *expect_hash,
		     const ckv_import_opts *o, ckv_import_result *r, ckv_err *e);

/*
 * Publish from memory (ckv gen, engines in-process): tokens and a callback
 * that fills chunks [first, first+count) of layer l of the prefix into buf
 * (count * chunk_bytes, each chunk zero-padded). Only chunks after the
 * longest stored chain match are asked for, in increasing order per layer;
 * different layers may be filled from several threads at once. A negative
 * return aborts the publish with that error.
 */
typedef int (*ckv_chunk_fill_fn)(void *arg, uint32_t layer, uint32_t first, uint32_t count,
				 void *buf);
int ckv_store_publish(ckv_store *s, const ckv_geom *g, const uint32_t *tokens, uint32_t n,
		      ckv_chunk_fill_fn fill, void *arg, const ckv_import_opts *o,
		      ckv_import_result *r, ckv_err *e);

/* Export a prefix as a directory (created; must not exist or be empty). */
int ckv_store_export(ckv_store *s, const ckv_hash *h, const char *dir,
		     ckv_progress_fn progress, void *parg, ckv_err *e);

/* Look up one prefix; *out is the caller's (ckv_manifest_free + free). */
int ckv_store_get(ckv_store *s, const ckv_hash *h, ckv_manifest **out, ckv_err *e);

/* The tokens of a prefix, read from its segments; *out malloc'ed [m->tokens]. */
int ckv_store_tokens(ckv_store *s, const ckv_manifest *m, uint32_t **out, ckv_err *e);

/* Iterate every prefix in hash order; stop early when fn returns non-zero (returned). */
typedef int (*ckv_prefix_fn)(void *arg, const ckv_manifest *m);
int ckv_store_list(ckv_store *s, ckv_prefix_fn fn, void *arg);

/* Count of prefixes and a generation number that changes on every publish/remove. */
int ckv_store_generation(ckv_store *s, uint64_t *gen, uint64_t *nprefixes);

/*
 * Longest stored prefix of tokens (same geometry): *matched is the number of
 * leading tokens shared with the stored prefix *h (0 if none). Full chunks by
 * binary search over the chain, then the partial tail. *lookups counts index
 * look-ups.
 */
int ckv_store_match(ckv_store *s, const ckv_geom *g, const uint32_t *tokens, uint32_t n,
		    ckv_hash *h, uint32_t *matched, uint32_t *lookups);

typedef struct ckv_stat_info {
	uint64_t bytes_total;   /* layer bytes this prefix reads */
	uint64_t bytes_shared;  /* of which in segments other prefixes also reference */
	uint64_t bytes_on_disk; /* all files of its segments plus its manifest */
} ckv_stat_info;
int ckv_store_stat(ckv_store *s, const ckv_manifest *m, ckv_stat_info *st);

/* Remove a prefix (its segments stay until ckv_store_gc). */
int ckv_store_rm(ckv_store *s, const ckv_hash *h, ckv_err *e);

/*
 * gc also removes the mount's staging areas (STORE/incoming/, see
 * docs/FILESYSTEM.md) when no daemon holds STORE/incoming/lock: copies
 * into a mount that nobody serves any more are abandoned. They count as
 * staging.
 */
typedef struct ckv_gc_result {
	uint64_t segments, staging, manifests; /* removed */
	uint64_t bytes;
} ckv_gc_result;
int ckv_store_gc(ckv_store *s, ckv_gc_result *r, ckv_err *e);

/* Report of a verify: called per problem found. */
typedef void (*ckv_verify_fn)(void *arg, const char *problem);
/* Check every checksum of one prefix (h) or all. Returns problems found (>= 0) or -errno. */
int ckv_store_verify(ckv_store *s, const ckv_hash *h, ckv_verify_fn fn, void *arg,
		     ckv_progress_fn progress, void *parg);

/*
 * Rebuild the index from the files. Segments written before key copies
 * existed get their keyq.bin; *keyq_written (may be NULL) counts them.
 */
int ckv_store_reindex(ckv_store *s, uint64_t *keyq_written, ckv_err *e);

/* --- chunk access, for the engine and export --- */

/* Path of a segment directory relative to the store root: "seg/ab/<id>". */
void ckv_segment_path(const char *segid, char *out, size_t len);

/*
 * Read the sums of a segment: *sums is malloc'ed [layers][chunks] host order,
 * *chunks the segment's chunk count.
 */
int ckv_segment_sums(ckv_store *s, const char *segid, const ckv_geom *g, uint64_t **sums,
		     uint32_t *chunks, ckv_err *e);

/*
 * The sums of the K and V halves of every chunk (halves.xxh3), for reads of
 * one half only: *halves is malloc'ed [layers][chunks][2] (K, V).
 */
int ckv_segment_halves(ckv_store *s, const char *segid, const ckv_geom *g, uint64_t **halves,
		       uint32_t *chunks, ckv_err *e);

/* --- retention state (DESIGN §3.4): scores per physical chunk --- */
typedef struct ckv_retention {
	char segment[80];
	uint32_t layer, chunk;
	double importance; /* I, decayed */
	double freq;       /* F, decayed */
	int64_t last;      /* unix seconds */
} ckv_retention;
int ckv_store_retention_put(ckv_store *s, const ckv_retention *r, size_t n);
/* Highest-scored first; up to max entries; *out malloc'ed. */
int ckv_store_retention_top(ckv_store *s, size_t max, ckv_retention **out, size_t *n);

#endif
