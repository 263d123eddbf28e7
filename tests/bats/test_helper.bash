# Shared helpers for ckvfs bats tests. `load test_helper` at the top of a file.
bats_require_minimum_version 1.5.0

CKV_BUILD=${CKV_BUILD:-$(cd "$BATS_TEST_DIRNAME/../.." && pwd)/build}
CKV_SRC=$(cd "$BATS_TEST_DIRNAME/../.." && pwd)
export PATH="$CKV_BUILD:$CKV_SRC:$CKV_SRC/tools:$PATH"
export CKV="$CKV_BUILD/ckv"
PY=${CKV_PYTHON:-/usr/bin/python3}
export PYTHONPATH="$CKV_SRC/gpu/python${PYTHONPATH:+:$PYTHONPATH}"
# LeakSanitizer needs ptrace-like access that some sandboxes deny; keep it on where it works.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

fail() { echo "$@" >&2; return 1; }

assert_success() {
	[ "$status" -eq 0 ] || fail "expected success, got exit $status; output: $output"
}
assert_failure() {
	local want=${1:-}
	[ "$status" -ne 0 ] || fail "expected failure, got success; output: $output"
	[ -z "$want" ] || [ "$status" -eq "$want" ] || fail "expected exit $want, got $status; output: $output"
}
assert_output_contains() {
	[[ "$output" == *"$1"* ]] || fail "expected output to contain '$1'; got: $output"
}
assert_equal() {
	[ "$1" = "$2" ] || fail "expected '$2', got '$1'"
}

# A snapshot of a store's user-visible state: prefixes and the file tree.
store_snapshot() {
	local store=$1
	"$CKV" ls "$store" 2>&1
	(cd "$store" && find . -path ./index -prune -o -printf '%p %s\n' | sort)
}

# Wait until PATH is a mount point (deadline in seconds), checking pid is alive.
wait_mounted() {
	local mnt=$1 pid=${2:-} deadline=$((SECONDS + ${3:-10}))
	local abs
	abs=$(cd "$(dirname "$mnt")" && pwd)/$(basename "$mnt")
	while ! grep -q " $abs " /proc/self/mounts; do
		[ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && return 1
		[ $SECONDS -ge $deadline ] && return 1
		sleep 0.05
	done
}

# Unmount whatever is mounted at mnt, however it got stuck.
force_unmount() {
	local mnt=$1
	# no realpath: on a crashed daemon's mount it fails with ENOTCONN
	mnt=$(cd "$(dirname "$mnt")" 2>/dev/null && pwd)/$(basename "$mnt") || return 0
	if grep -q " $mnt " /proc/self/mounts; then
		fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
	fi
	return 0
}

# ---- helpers for the CLI suite (tests/bats/cli_*.bats) ----------------------

# After `run --separate-stderr`: stderr contains TEXT / is empty.
assert_stderr_contains() {
	[[ "$stderr" == *"$1"* ]] || fail "expected stderr to contain '$1'; got: $stderr"
}
assert_stderr_empty() {
	[ -z "$stderr" ] || fail "expected no stderr; got: $stderr"
}
refute_output_contains() {
	[[ "$output" != *"$1"* ]] || fail "expected output not to contain '$1'; got: $output"
}

# gen_hash STORE ARGS...: publish a synthetic cache (ckv gen -q), print its hash.
gen_hash() {
	local store=$1
	shift
	"$CKV" gen -q "$store" "$@"
}

# assert_same_dir A B: the same file names, and every file byte-identical.
assert_same_dir() {
	local a b f
	a=$(cd "$1" && ls -A | sort | tr '\n' ' ')
	b=$(cd "$2" && ls -A | sort | tr '\n' ' ')
	[ "$a" = "$b" ] || fail "file lists differ: $1: $a / $2: $b"
	for f in "$1"/*; do
		cmp "$f" "$2/${f##*/}" || fail "$f and $2/${f##*/} differ"
	done
}

# seg_count STORE: how many segment directories STORE/seg/<xx>/ holds.
seg_count() {
	find "$1/seg" -mindepth 2 -maxdepth 2 | wc -l
}

# staging_empty STORE: STORE/staging holds nothing.
staging_empty() {
	[ -z "$(ls -A "$1/staging")" ] || fail "$1/staging not empty: $(ls -A "$1/staging")"
}

# flip_byte FILE OFFSET: invert one byte in place (the file keeps its size).
flip_byte() {
	local f=$1 off=$2 b
	b=$(od -An -tu1 -j "$off" -N1 "$f" | tr -d ' ')
	[ -n "$b" ] || fail "flip_byte: $f has no byte at $off"
	printf "\\$(printf %03o $((255 - b)))" | dd of="$f" bs=1 seek="$off" conv=notrunc status=none
}

# json_edit FILE JQ-FILTER: rewrite a JSON file through jq.
json_edit() {
	jq "$2" "$1" >"$1.new" && mv "$1.new" "$1"
}

# u32le N...: the numbers as u32 little-endian bytes (a token file).
u32le() {
	local v s=
	for v in "$@"; do
		s+=$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((v & 255)) $((v >> 8 & 255)) $((v >> 16 & 255)) $((v >> 24 & 255)))
	done
	printf '%b' "$s"
}

# ---- helpers for the mounted-filesystem suite (tests/bats/fs_*.bats) --------

export CKVFS="$CKV_BUILD/ckvfs" # mount.ckvfs runs this one

# fs_require: skip unless this machine can mount FUSE filesystems.
fs_require() {
	[ -x "$CKVFS" ] || skip "no $CKVFS (make)"
	[ -c /dev/fuse ] || skip "no /dev/fuse"
	command -v fusermount3 >/dev/null || skip "no fusermount3"
}

# fs_mount STORE MNT [ckvfs args...]: run ckvfs in the foreground as a
# background job (fd 3 closed so bats does not wait on it), wait for the
# mount. Sets FS_PID; the daemon's stderr goes to $BATS_TEST_TMPDIR/ckvfs.log.
fs_mount() {
	local store=$1 mnt=$2
	shift 2
	mkdir -p "$mnt"
	"$CKVFS" "$store" "$mnt" -f "$@" 3>&- 2>>"$BATS_TEST_TMPDIR/ckvfs.log" &
	FS_PID=$!
	if ! wait_mounted "$mnt" "$FS_PID" 15; then
		cat "$BATS_TEST_TMPDIR/ckvfs.log" >&2
		return 1
	fi
}

# fs_umount MNT: unmount a fs_mount'ed filesystem and wait for the daemon;
# fails if the daemon exits non-zero (under ASan: a leak or error report).
fs_umount() {
	local mnt=$1 rc=0
	fusermount3 -u "$mnt" || return 1
	if [ -n "${FS_PID:-}" ]; then
		wait "$FS_PID" || rc=$?
		FS_PID=
	fi
	[ "$rc" -eq 0 ] || { cat "$BATS_TEST_TMPDIR/ckvfs.log" >&2; fail "ckvfs exited with $rc"; }
}

# fs_daemon_pid MNT: pid of the ckvfs serving MNT (found by its command line).
fs_daemon_pid() {
	local mnt=$1 p
	# no realpath on a mount point: it stats it, and a dead daemon's mount says ENOTCONN
	[ "${mnt#/}" != "$mnt" ] || mnt=$PWD/$mnt
	for p in /proc/[0-9]*; do
		{ tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -q "ckvfs .* $mnt\( \|$\)" && echo "${p#/proc/}"
	done
	return 0
}

# fs_wait_gone PID [SECONDS]: wait until PID has exited.
fs_wait_gone() {
	local pid=$1 deadline=$((SECONDS + ${2:-10}))
	while kill -0 "$pid" 2>/dev/null; do
		[ $SECONDS -lt $deadline ] || return 1
		sleep 0.05
	done
}

# fs_teardown: for teardown(): unmount everything under the test's scratch
# directories, then end the daemons this test started (by pid).
fs_teardown() {
	local m p pids=
	for m in $(awk -v a="$BATS_TEST_TMPDIR" -v b="${BATS_FILE_TMPDIR:-/nonexistent}" \
		'index($2, a) == 1 || index($2, b) == 1 { print $2 }' /proc/self/mounts); do
		pids="$pids $(fs_daemon_pid "$m")"
		fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null ||
			echo "teardown: cannot unmount $m" >&2
	done
	for p in ${FS_PID:-} $pids; do
		fs_wait_gone "$p" 5 || kill "$p" 2>/dev/null ||
			echo "teardown: daemon $p already gone" >&2
	done
	FS_PID=
	return 0
}

# fs_stat MNT FIELD: one field of MNT/.ckv/stats.
fs_stat() {
	"$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1/.ckv/stats" "$2"
}

# wait_until SECONDS COMMAND...: retry COMMAND (a command, re-run each time: pass a
# function, not a "$(...)" that expands once) until it succeeds or time runs out.
wait_until() {
	local deadline
	deadline=$(($(date +%s%N) + ${1%.*} * 1000000000))
	shift
	until "$@"; do
		[ "$(date +%s%N)" -lt "$deadline" ] || return 1
		sleep 0.05
	done
}

# A sanitizer report exits with its own status, so that a test expecting a
# plain failure (exit 1) of an ASan/UBSan build cannot pass on one.
export ASAN_OPTIONS="$ASAN_OPTIONS:exitcode=86"
export UBSAN_OPTIONS="$UBSAN_OPTIONS:exitcode=87"

# fs_fixture_save H...: for setup_file() of mount tests on one store at
# $BATS_FILE_TMPDIR/store: export each prefix to $BATS_FILE_TMPDIR/ex/<hash>
# and remember the hashes for fs_fixture_load.
fs_fixture_save() {
	local h
	echo "$*" >"$BATS_FILE_TMPDIR/hashes"
	mkdir -p "$BATS_FILE_TMPDIR/ex"
	for h in "$@"; do
		"$CKV" export "$BATS_FILE_TMPDIR/store" "$h" "$BATS_FILE_TMPDIR/ex/$h" >/dev/null
	done
}

# fs_fixture_load: for setup(): STORE, EX, H1 H2 H3 and a mount point MNT.
fs_fixture_load() {
	fs_require
	STORE=$BATS_FILE_TMPDIR/store
	EX=$BATS_FILE_TMPDIR/ex
	read -r H1 H2 H3 <"$BATS_FILE_TMPDIR/hashes"
	MNT=$BATS_TEST_TMPDIR/mnt
}
