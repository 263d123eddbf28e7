# Shared helpers for ckvfs bats tests. `load test_helper` at the top of a file.
bats_require_minimum_version 1.5.0

CKV_BUILD=${CKV_BUILD:-$(cd "$BATS_TEST_DIRNAME/../.." && pwd)/build}
CKV_SRC=$(cd "$BATS_TEST_DIRNAME/../.." && pwd)
export PATH="$CKV_BUILD:$CKV_SRC:$CKV_SRC/tools:$PATH"
export CKV="$CKV_BUILD/ckv"
PY=/usr/bin/python3
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
	while ! grep -q " $(realpath "$mnt") " /proc/self/mounts; do
		[ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && return 1
		[ $SECONDS -ge $deadline ] && return 1
		sleep 0.05
	done
}

# Unmount whatever is mounted at mnt, however it got stuck.
force_unmount() {
	local mnt=$1
	[ -d "$mnt" ] || return 0
	mnt=$(realpath "$mnt")
	if grep -q " $mnt " /proc/self/mounts; then
		fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
	fi
	return 0
}
