/*
 * ckv_ctl.h — the control-socket server of the ckvfs daemon
 * (docs/PROTOCOL.md): GPU loader processes connect, receive the engine's
 * arena read-only, and have chunks of stored prefixes brought into it and
 * pinned for them.
 *
 * Life cycle in the daemon (ckvfs/main.c):
 *
 *   char path[PATH_MAX];
 *   ckv_ctl_default_path(mountpoint, path, sizeof(path));  // BEFORE fuse_session_mount()
 *   ... mount, daemonize, start the engine ...
 *   ckv_ctl *ctl;
 *   ckv_ctl_start(store, engine, path, &limits (or NULL), &ctl);
 *   ... the FUSE side shows MNT/.ckv/ctl as a symlink to `path` ...
 *   ckv_ctl_stop(ctl);       // before the engine is closed
 *
 * Threads: the server runs one thread of its own (epoll over the listening
 * socket, the clients and an eventfd). Engine completions arrive on the
 * engine's I/O thread, which queues them on the client and wakes the server
 * thread. ckv_ctl_stats may be called from any thread.
 *
 * Ownership: the store and the engine are the caller's and must outlive the
 * server (ckv_ctl_stop returns only when no engine request of a client is
 * left in flight and every pin of every client is released). The server
 * changes the mode of the engine's memfd to 0400 at start so that a client
 * cannot reopen its read-only descriptor for writing (PROTOCOL.md §3.1).
 *
 * Errors: 0 or a negative errno; messages go to limits->log.
 */
#ifndef CKV_CTL_H
#define CKV_CTL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ckv_engine.h"
#include "ckv_store.h"

typedef struct ckv_ctl ckv_ctl;

/* Limits and options; a zero field takes its default. */
typedef struct ckv_ctl_limits {
	uint32_t max_clients;      /* connected at once; default 64 */
	uint32_t max_pins;         /* per client: pinned chunks, GETs in flight included; default 65536 */
	uint64_t max_pinned_bytes; /* per client; default half the arena */
	uint32_t max_prefixes;     /* per client: open prefix handles; default 256, at most 65535 */
	uint32_t max_inflight;     /* per client: GETs in flight; default 256 */
	uint32_t max_msg;          /* largest payload accepted and sent; 64 KiB .. 16 MiB (default) */
	bool allow_other;          /* any uid (socket 0666); default: the daemon's uid and root */
	uint32_t hello_ms;         /* a connection that has not sent HELLO this long after connecting
				    * is closed (ERROR ETIMEDOUT); default 10000 */
	/* Log sink (connection refused, hostile client, I/O error); default stderr. */
	void (*log)(void *arg, const char *msg);
	void *log_arg;
} ckv_ctl_limits;

#define CKV_CTL_DEFAULT_CLIENTS 64u
#define CKV_CTL_DEFAULT_PINS 65536u
#define CKV_CTL_DEFAULT_PREFIXES 256u
#define CKV_CTL_DEFAULT_INFLIGHT 256u
#define CKV_CTL_DEFAULT_HELLO_MS 10000u

/*
 * The socket path of the daemon mounted at mountpoint:
 * /run/ckvfs/<XXH3-64 of realpath(mountpoint), 16 hex>.sock, or
 * /tmp/ckvfs-<euid>/<same>.sock when /run/ckvfs cannot be created or
 * written. Creates the directory (0755 under /run, 0700 under /tmp; a /tmp
 * directory that is not ours, not a directory or open to others gives
 * -EPERM). Call it before mounting: it resolves mountpoint.
 */
int ckv_ctl_default_path(const char *mountpoint, char *out, size_t len);

/*
 * The client side: the socket to connect to for `path`, which is a socket,
 * or a mountpoint (its .ckv/ctl symlink, then the two default locations, for
 * this euid: /run/ckvfs only when owned by root or us and not writable by
 * others, the /tmp directory only when ckv_ctl_default_path would accept
 * it). No side effects. -ENOENT when no socket is found.
 */
int ckv_ctl_find_path(const char *path, char *out, size_t len);

/*
 * Listen on sock_path (at most 107 bytes) and serve clients until
 * ckv_ctl_stop. A stale socket file there is replaced; -EADDRINUSE when a
 * server answers on it, -EEXIST when it is not a socket. lim may be NULL.
 */
int ckv_ctl_start(ckv_store *s, ckv_engine *e, const char *sock_path, const ckv_ctl_limits *lim,
		  ckv_ctl **out);

/*
 * Stop: close the listening socket and unlink it (if it is still ours),
 * disconnect every client, release their pins, wait for their GETs in
 * flight to drain, join the thread, free. NULL is a no-op.
 */
void ckv_ctl_stop(ckv_ctl *c);

struct ckv_ctl_stats {
	uint64_t clients;      /* connected now */
	uint64_t accepted;     /* connections accepted since start */
	uint64_t refused;      /* refused: peer uid, max_clients */
	uint64_t messages;     /* requests handled */
	uint64_t errors;       /* ERROR replies sent */
	uint64_t hostile;      /* clients disconnected for malformed or hostile input */
	uint64_t disconnects;  /* clients gone, for any reason */
	uint64_t pins;         /* chunks pinned for clients now (GETs in flight included) */
	uint64_t gets_inflight;
};

void ckv_ctl_stats(ckv_ctl *c, struct ckv_ctl_stats *st);

#endif
