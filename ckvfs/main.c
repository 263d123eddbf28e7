/*
 * main.c — the ckvfs daemon: ckvfs STORE MNT [-o opts] [-f] [-d] [-h] [-V]
 *
 * Parses the options (a fuse_opt table; libfuse's generic options pass
 * through to fuse_session_new, which rejects unknown ones), opens the store
 * before mounting so that a bad STORE is an error and not an empty mount,
 * mounts, daemonizes unless -f, then starts the chunk engine (its threads
 * must be created after the fork) and runs the multi-threaded session loop.
 * umount / fusermount3 -u / SIGTERM end the loop; the engine's retention
 * state is saved (destroy op), then engine and store are closed.
 *
 * Exit status: 0 ok, 1 failure (not a store, mount failed), 2 usage.
 */
#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 14)

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>

#include <fuse_lowlevel.h>

#include "ckv_format.h"
#include "ckv_ctl.h"
#include "fs.h"

#define DEFAULT_CACHE (1ull << 30)
#define DEFAULT_READ_AHEAD_KB 4096
#define DEFAULT_MAX_THREADS 64
#define DEFAULT_IDLE_THREADS 32
#define MIN_CACHE (1ull << 20)
#define DEFAULT_PUBLISH_DELAY_MS 1000
#define MAX_PUBLISH_DELAY_MS 600000

struct opts {
	char *cache;
	char *policy;
	char *read_ahead_kb;
	char *publish_delay;
	int warm;
	int direct_io;
	int odirect;
	int populate;
	int show_help;
	int show_version;
	int max_threads_given;
	char *store;
	int nonopts;
};

enum {
	KEY_HELP,
	KEY_VERSION,
	KEY_MAX_THREADS,
};

#define OPT(t, p, v) { t, offsetof(struct opts, p), v }
static const struct fuse_opt ckvfs_opt_spec[] = {
	OPT("cache=%s", cache, 0),
	OPT("policy=%s", policy, 0),
	OPT("read_ahead_kb=%s", read_ahead_kb, 0),
	OPT("publish_delay=%s", publish_delay, 0),
	OPT("warm", warm, 1),
	OPT("no_warm", warm, 0),
	OPT("direct_io", direct_io, 1),
	OPT("no_direct_io", direct_io, 0),
	OPT("odirect", odirect, 1),
	OPT("no_odirect", odirect, 0),
	OPT("populate", populate, 1),
	OPT("no_populate", populate, 0),
	FUSE_OPT_KEY("-h", KEY_HELP),
	FUSE_OPT_KEY("--help", KEY_HELP),
	FUSE_OPT_KEY("-V", KEY_VERSION),
	FUSE_OPT_KEY("--version", KEY_VERSION),
	FUSE_OPT_KEY("max_threads=", KEY_MAX_THREADS),
	FUSE_OPT_END
};

/*
 * Options mount(8) and fstab use that mean nothing to a FUSE daemon;
 * mount.ckvfs filters them too, this catches `mount -t fuse.ckvfs` through
 * mount.fuse3 and hand-written command lines.
 */
static bool mount_only_option(const char *o)
{
	static const char *const plain[] = {
		"defaults", "auto", "noauto", "user", "users", "nouser", "owner",
		"group", "_netdev", "nofail", "nonempty",
	};

	for (size_t i = 0; i < sizeof(plain) / sizeof(plain[0]); i++)
		if (!strcmp(o, plain[i]))
			return true;
	return !strncmp(o, "x-", 2) || !strncmp(o, "comment=", 8);
}

static int opt_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
	struct opts *o = data;

	(void)outargs;
	switch (key) {
	case FUSE_OPT_KEY_NONOPT:
		o->nonopts++;
		if (!o->store) {
			o->store = strdup(arg);
			return o->store ? 0 : -1;
		}
		if (o->nonopts == 2)
			return 1; /* the mountpoint, for fuse_parse_cmdline */
		fprintf(stderr, "ckvfs: unexpected argument '%s'\n", arg);
		return -1;
	case FUSE_OPT_KEY_OPT:
		return mount_only_option(arg) ? 0 : 1;
	case KEY_HELP:
		o->show_help = 1;
		return 0;
	case KEY_VERSION:
		o->show_version = 1;
		return 0;
	case KEY_MAX_THREADS:
		o->max_threads_given = 1;
		return 1;
	}
	return 1;
}

static void usage(const char *prog)
{
	printf("usage: %s STORE MOUNTPOINT [-f] [-d] [-o OPTION[,OPTION...]]\n"
	       "\n"
	       "Serve the prefix KV caches of a ckvfs store as files.\n"
	       "\n"
	       "ckvfs options:\n"
	       "    -o cache=SIZE          chunk arena size; bytes, K, M, G or T (default 1G)\n"
	       "    -o policy=attn|lru     eviction: attention-guided (default) or LRU\n"
	       "    -o warm                prefetch the chunks with the highest saved scores at mount\n"
	       "    -o direct_io           layer reads bypass the page cache (no shared mmap)\n"
	       "    -o read_ahead_kb=N     kernel read-ahead window of the mount (default %u, 0: leave)\n"
	       "    -o populate            allocate the whole arena at mount (faster first reads)\n"
	       "    -o no_odirect          read segment files through the page cache (e.g. tmpfs)\n"
	       "    -o publish_delay=MS    check a staging area this long after its last change\n"
	       "                           (default %u)\n"
	       "    -o allow_other, -o default_permissions, ...: see mount.fuse3(8)\n"
	       "\n",
	       prog, DEFAULT_READ_AHEAD_KB, DEFAULT_PUBLISH_DELAY_MS);
	fuse_cmdline_help();
	fuse_lowlevel_help();
}

/* Bytes with an optional K, M, G or T (binary) suffix, "B"/"iB" allowed after it. */
static int parse_size(const char *s, uint64_t *out)
{
	uint64_t v = 0, mul = 1;
	const char *p = s;

	if (*p < '0' || *p > '9')
		return -EINVAL;
	for (; *p >= '0' && *p <= '9'; p++) {
		if (v > (UINT64_MAX - 9) / 10)
			return -ERANGE;
		v = v * 10 + (uint64_t)(*p - '0');
	}
	switch (*p) {
	case 'k': case 'K': mul = 1ull << 10; p++; break;
	case 'm': case 'M': mul = 1ull << 20; p++; break;
	case 'g': case 'G': mul = 1ull << 30; p++; break;
	case 't': case 'T': mul = 1ull << 40; p++; break;
	default: break;
	}
	if (mul > 1 && (!strcmp(p, "iB") || !strcmp(p, "B")))
		p += strlen(p);
	else if (mul == 1 && !strcmp(p, "B"))
		p++;
	if (*p)
		return -EINVAL;
	if (v > UINT64_MAX / mul)
		return -ERANGE;
	*out = v * mul;
	return 0;
}

/*
 * The log sink for libfuse and ckvfs alike. Set once in main before any
 * thread starts: stderr in the foreground, syslog once daemonized.
 */
static bool log_syslog;
static enum fuse_log_level log_level = FUSE_LOG_INFO;

static void log_func(enum fuse_log_level level, const char *fmt, va_list ap)
{
	if (level > log_level)
		return;
	if (log_syslog)
		vsyslog((int)level, fmt, ap);
	else
		vfprintf(stderr, fmt, ap);
}

/* Log sink of the control-socket server: the daemon's log. */
static void ctl_log(void *arg, const char *msg)
{
	(void)arg;
	fuse_log(FUSE_LOG_WARNING, "%s\n", msg);
}

/* Whether a "-o" argument in args names opt (allow_other and friends pass through to libfuse). */
static bool strstr_opt(const struct fuse_args *args, const char *opt)
{
	size_t n = strlen(opt);
	for (int i = 0; i < args->argc; i++) {
		const char *a = args->argv[i], *p;
		for (p = strstr(a, opt); p; p = strstr(p + 1, opt))
			if ((p == a || p[-1] == ',' || p[-1] == 'o') && (p[n] == 0 || p[n] == ','))
				return true;
	}
	return false;
}

int main(int argc, char *argv[])
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	struct fuse_cmdline_opts cmd;
	struct fuse_loop_config *loop = NULL;
	struct fuse_session *se = NULL;
	struct opts o = { .odirect = 1 };
	struct ckvfs_config cfg;
	char store[PATH_MAX], msg[1024], ctl_path[PATH_MAX], *fsname = NULL, *esc = NULL;
	ckvfs *fs = NULL;
	ckv_ctl *ctl = NULL;
	bool allow_other = false;
	int ret = 2, rc;

	memset(&cmd, 0, sizeof(cmd));
	memset(&cfg, 0, sizeof(cfg));
	fuse_set_log_func(log_func);
	if (fuse_opt_parse(&args, &o, ckvfs_opt_spec, opt_proc) < 0)
		goto out_args;
	if (o.show_help) {
		usage(argv[0]);
		ret = 0;
		goto out_args;
	}
	if (o.show_version) {
		printf("ckvfs %s (libfuse %s)\n", ckv_version(), fuse_pkgversion());
		fuse_lowlevel_version();
		ret = 0;
		goto out_args;
	}
	if (o.nonopts != 2) {
		fprintf(stderr, "ckvfs: expected STORE and MOUNTPOINT\n"
				"usage: %s STORE MOUNTPOINT [-f] [-d] [-o OPTION[,OPTION...]] (-h for help)\n",
			argv[0]);
		goto out_args;
	}

	cfg.cache_bytes = DEFAULT_CACHE;
	if (o.cache) {
		rc = parse_size(o.cache, &cfg.cache_bytes);
		if (rc < 0 || cfg.cache_bytes < MIN_CACHE) {
			fprintf(stderr, "ckvfs: cache=%s: expected a size of at least 1M: bytes with an "
					"optional K, M, G or T suffix\n", o.cache);
			goto out_args;
		}
	}
	cfg.policy = CKV_POLICY_ATTN;
	if (o.policy) {
		if (!strcmp(o.policy, "lru")) {
			cfg.policy = CKV_POLICY_LRU;
		} else if (strcmp(o.policy, "attn")) {
			fprintf(stderr, "ckvfs: policy=%s: expected attn or lru\n", o.policy);
			goto out_args;
		}
	}
	cfg.read_ahead_kb = DEFAULT_READ_AHEAD_KB;
	if (o.read_ahead_kb) {
		uint64_t v;
		if (parse_size(o.read_ahead_kb, &v) < 0 || v > (1u << 20)) {
			fprintf(stderr, "ckvfs: read_ahead_kb=%s: expected a number of KiB up to 1048576\n",
				o.read_ahead_kb);
			goto out_args;
		}
		cfg.read_ahead_kb = (unsigned)v;
	}
	cfg.publish_delay_ms = DEFAULT_PUBLISH_DELAY_MS;
	if (o.publish_delay) {
		char *end;
		unsigned long v;
		errno = 0;
		v = strtoul(o.publish_delay, &end, 10);
		if (errno || end == o.publish_delay || *end || o.publish_delay[0] == '-' ||
		    v > MAX_PUBLISH_DELAY_MS) {
			fprintf(stderr, "ckvfs: publish_delay=%s: expected milliseconds, 0..%u\n",
				o.publish_delay, MAX_PUBLISH_DELAY_MS);
			goto out_args;
		}
		cfg.publish_delay_ms = (unsigned)v;
	}
	cfg.warm = o.warm;
	cfg.direct_io = o.direct_io;
	cfg.odirect = o.odirect;
	cfg.populate = o.populate;

	if (fuse_parse_cmdline(&args, &cmd) != 0)
		goto out_args;
	if (!cmd.mountpoint) {
		fprintf(stderr, "ckvfs: expected a MOUNTPOINT after STORE\n");
		goto out_args;
	}
	cfg.debug = cmd.debug;
	if (cmd.debug)
		log_level = FUSE_LOG_DEBUG;
	if (!realpath(o.store, store)) {
		fprintf(stderr, "ckvfs: %s: cannot open the store: %s\n", o.store, strerror(errno));
		ret = 1;
		goto out_args;
	}
	cfg.store = store;
	cfg.mountpoint = cmd.mountpoint;
	/* Resolve the control socket's path now: once mounted, resolving the
	 * mountpoint would ask this very daemon. */
	if (ckv_ctl_default_path(cmd.mountpoint, ctl_path, sizeof(ctl_path)) == 0)
		cfg.ctl_path = ctl_path;
	else
		fprintf(stderr, "ckvfs: no place for the control socket (/run/ckvfs, /tmp); GPU loaders cannot connect\n");
	allow_other = strstr_opt(&args, "allow_other");

	/* The mount table shows "STORE MNT fuse.ckvfs"; 1 MiB read requests. */
	if (fuse_opt_add_opt_escaped(&esc, store) < 0 || asprintf(&fsname, "fsname=%s", esc) < 0 ||
	    fuse_opt_add_arg(&args, "-o") < 0 || fuse_opt_add_arg(&args, fsname) < 0 ||
	    fuse_opt_add_arg(&args, "-osubtype=ckvfs,max_read=1048576") < 0) {
		fprintf(stderr, "ckvfs: out of memory\n");
		ret = 1;
		goto out_args;
	}

	rc = ckvfs_new(&cfg, &fs);
	if (rc < 0) {
		fprintf(stderr, "ckvfs: %s\n", strerror(-rc));
		ret = 1;
		goto out_args;
	}
	se = fuse_session_new(&args, ckvfs_ops(), sizeof(struct fuse_lowlevel_ops), fs);
	if (!se) /* libfuse said which option it did not know */
		goto out_free_fs;
	ret = 1;
	rc = ckvfs_open_store(fs, msg, sizeof(msg));
	if (rc < 0) {
		fprintf(stderr, "ckvfs: %s\n", msg);
		goto out_destroy;
	}
	if (fuse_set_signal_handlers(se) != 0)
		goto out_destroy;
	if (fuse_session_mount(se, cmd.mountpoint) != 0)
		goto out_signals;
	if (fuse_daemonize(cmd.foreground) != 0)
		goto out_unmount;
	if (!cmd.foreground) {
		openlog("ckvfs", LOG_PID, LOG_DAEMON);
		log_syslog = true;
	}
	rc = ckvfs_start(fs, se);
	if (rc < 0)
		goto out_stop;
	if (cfg.ctl_path) {
		ckv_ctl_limits lim = { .allow_other = allow_other, .log = ctl_log };
		rc = ckv_ctl_start(ckvfs_store(fs), ckvfs_engine(fs), ctl_path, &lim, &ctl);
		if (rc < 0)
			fuse_log(FUSE_LOG_ERR, "ckvfs: control socket %s: %s (GPU loaders cannot connect)\n",
				 ctl_path, strerror(-rc));
	}

	if (cmd.singlethread) {
		rc = fuse_session_loop(se);
	} else {
		loop = fuse_loop_cfg_create();
		if (!loop) {
			fuse_log(FUSE_LOG_ERR, "ckvfs: out of memory\n");
			goto out_stop;
		}
		fuse_loop_cfg_set_clone_fd(loop, (unsigned)cmd.clone_fd);
		/*
		 * Keep idle workers around: creating a thread mprotects its
		 * stack under the mmap lock, which the arena's page faults
		 * also take (UINT_MAX: not given).
		 */
		fuse_loop_cfg_set_idle_threads(loop, cmd.max_idle_threads != UINT_MAX
							     ? cmd.max_idle_threads
							     : DEFAULT_IDLE_THREADS);
		fuse_loop_cfg_set_max_threads(loop, o.max_threads_given ? cmd.max_threads
									: DEFAULT_MAX_THREADS);
		rc = fuse_session_loop_mt(se, loop);
	}
	/* 0, or the number of the signal that ended the loop: both clean. */
	ret = rc < 0 ? 1 : 0;
	if (rc < 0)
		fuse_log(FUSE_LOG_ERR, "ckvfs: session loop: %s\n", strerror(-rc));
out_stop:
	if (ctl)
		ckv_ctl_stop(ctl); /* its clients' pins go before the engine does */
	ckvfs_stop(fs);
out_unmount:
	fuse_session_unmount(se);
out_signals:
	fuse_remove_signal_handlers(se);
out_destroy:
	fuse_session_destroy(se); /* runs the destroy op: retention saved */
out_free_fs:
	ckvfs_free(fs);
	if (loop)
		fuse_loop_cfg_destroy(loop);
out_args:
	free(cmd.mountpoint);
	free(fsname);
	free(esc);
	free(o.cache);
	free(o.policy);
	free(o.read_ahead_kb);
	free(o.publish_delay);
	free(o.store);
	fuse_opt_free_args(&args);
	if (log_syslog)
		closelog();
	return ret;
}
