/*
 * fs.h — the ckvfs FUSE front end (fs.c), as main.c drives it.
 *
 * Life cycle, in this order (main.c):
 *   ckvfs_new()          parse nothing, open nothing: just the context
 *   fuse_session_new(..., ckvfs_ops(), ..., fs)
 *   ckvfs_open_store()   before mounting, so a bad STORE is an error, not a mount
 *   fuse_session_mount(), fuse_daemonize()
 *   ckvfs_start(fs, se)  after the fork: engine (its threads), retention, watcher,
 *                        staging areas resumed, publisher
 *   fuse_session_loop_mt()
 *   ckvfs_stop()         publisher and watcher joined; no more notifications
 *   fuse_session_unmount(), fuse_session_destroy()   (the destroy op saves retention)
 *   ckvfs_free()         engine and store closed
 */
#ifndef CKVFS_FS_H
#define CKVFS_FS_H

#include <stdbool.h>
#include <stdint.h>

#include "ckv_engine.h"
#include "ckv_store.h"

struct fuse_lowlevel_ops;
struct fuse_session;

struct ckvfs_config {
	const char *store;          /* absolute path of the store */
	const char *mountpoint;     /* as given; used to find the mount's bdi */
	uint64_t cache_bytes;       /* arena size */
	enum ckv_policy policy;
	bool warm;                  /* prefetch the highest-scored chunks at start */
	bool direct_io;             /* layer files bypass the page cache (no shared mmap) */
	bool odirect;               /* engine reads segment files with O_DIRECT */
	unsigned read_ahead_kb;     /* written to the mount's bdi after init; 0 leaves it */
	bool populate;              /* fault the whole arena in at start */
	const char *ctl_path;       /* control socket, shown as /.ckv/ctl; NULL: none */
	unsigned publish_delay_ms;  /* a staging area is checked after this long without changes */
	bool debug;
};

typedef struct ckvfs ckvfs;

int ckvfs_new(const struct ckvfs_config *cfg, ckvfs **out);
const struct fuse_lowlevel_ops *ckvfs_ops(void);
/* Open the store; fills msg with a message naming STORE on failure. */
int ckvfs_open_store(ckvfs *fs, char *msg, size_t len);
/* Open the engine, load retention, start the watcher thread (after fork). */
int ckvfs_start(ckvfs *fs, struct fuse_session *se);
void ckvfs_stop(ckvfs *fs);
void ckvfs_free(ckvfs *fs);
/* The store and engine, once ckvfs_start has run (for the control socket). */
struct ckv_store *ckvfs_store(ckvfs *fs);
ckv_engine *ckvfs_engine(ckvfs *fs);

/*
 * Logging goes through fuse_log(); main.c installs the sink (stderr in the
 * foreground, syslog once daemonized), so libfuse's own messages and ours
 * end up in one place.
 */

#endif
