# Helpers for the write side of the mount (tests/bats/fs_write_*.bats):
# staging areas under by-hash/ and import/, published by the daemon.
load test_helper

# The quiet period the tests mount with (ms). Copy tools set times and
# modes right after their last write; 500 ms leaves them room on a loaded
# 2-core CI machine and keeps every publication under a second.
FSW_DELAY=${FSW_DELAY:-500}

# fsw_mount STORE MNT [ckvfs args...]
fsw_mount() {
	local store=$1 mnt=$2
	shift 2
	fs_mount "$store" "$mnt" -o "publish_delay=$FSW_DELAY" "$@"
}

# fsw_state DIR: user.ckv.state of a staging area or prefix directory.
fsw_state() {
	getfattr --only-values -n user.ckv.state "$1" 2>/dev/null
}

# fsw_error DIR: user.ckv.error of a staging area (empty when none).
fsw_error() {
	local v
	v=$(getfattr --only-values -n user.ckv.error "$1" 2>/dev/null) || v=
	printf '%s' "$v"
}

_fsw_is() { [ "$(fsw_state "$1")" = "$2" ]; }

# wait_state DIR STATE [SECONDS]: until user.ckv.state of DIR is STATE.
wait_state() {
	wait_until "${3:-20}" _fsw_is "$1" "$2" ||
		fail "$1: state '$(fsw_state "$1")', expected '$2'; error: $(fsw_error "$1")"
}

# wait_published MNT HASH [SECONDS]
wait_published() {
	wait_state "$1/by-hash/$2" published "${3:-20}"
}

# wait_failed DIR [SECONDS]: a check of DIR ran and left a reason.
wait_failed() {
	wait_state "$1" failed "${2:-20}"
}

# export_cache STORE HASH DIR: ckv export, quietly.
export_cache() {
	"$CKV" export "$1" "$2" "$3" >/dev/null
}

# assert_cache_equal A B: the same files, byte for byte (A may hold fewer sums: no).
assert_cache_equal() {
	assert_same_dir "$1" "$2"
}

# tree_attrs DIR: "name size mode mtime" of DIR's files and "mode mtime" of DIR, sorted.
tree_attrs() {
	(cd "$1" && stat -c '%n %a %y' . && stat -c '%n %s %a %y' * | sort)
}

# prefixes STORE: the hashes a store holds, one a line.
prefixes() {
	"$CKV" ls "$1" | awk '{ print $1 }' | sort
}

# published_snapshot STORE: every published prefix and its record, for
# "nothing already published was touched".
published_snapshot() {
	local store=$1
	"$CKV" ls "$store"
	(cd "$store/prefix" && find . -type f -printf '%p %s %T@\n' | sort)
}

# seg_bytes STORE: apparent size of every segment file.
seg_bytes() {
	du -sb "$1/seg" | awk '{ print $1 }'
}
