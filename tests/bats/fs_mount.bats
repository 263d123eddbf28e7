#!/usr/bin/env bats
# ckvfs: starting and stopping the daemon (ckvfs, mount.ckvfs, mount -t
# fuse.ckvfs, fstab), options, and what it refuses to mount.

load test_helper

setup_file() {
	"$CKV" init "$BATS_FILE_TMPDIR/store" >/dev/null
	"$CKV" gen -q "$BATS_FILE_TMPDIR/store" --model qwen2.5-0.5b --tokens 300 --seed 1 \
		>"$BATS_FILE_TMPDIR/hash"
}

setup() {
	fs_require
	STORE=$BATS_FILE_TMPDIR/store
	HASH=$(cat "$BATS_FILE_TMPDIR/hash")
	MNT=$BATS_TEST_TMPDIR/mnt
	mkdir -p "$MNT"
	LINK=
}

teardown() {
	fs_teardown
	[ -z "$LINK" ] || rm -f "$LINK"
}

mounted() {
	grep -q " $1 fuse.ckvfs " /proc/self/mounts
}

@test "ckvfs -f mounts, serves, and exits 0 on fusermount3 -u" {
	fs_mount "$STORE" "$MNT"
	run grep " $MNT " /proc/self/mounts
	assert_output_contains "$STORE $MNT fuse.ckvfs"
	run ls "$MNT"
	assert_success
	assert_equal "$(ls "$MNT" | tr '\n' ' ')" "by-hash by-model import "
	[ -d "$MNT/.ckv" ]
	[ -d "$MNT/by-hash/$HASH" ]
	fs_umount "$MNT"
	! mounted "$MNT"
}

@test "ckvfs daemonizes without -f and umount stops it" {
	run "$CKVFS" "$STORE" "$MNT" 3>&-
	assert_success
	mounted "$MNT"
	pid=$(fs_daemon_pid "$MNT")
	[ -n "$pid" ]
	[ -f "$MNT/by-hash/$HASH/manifest.json" ]
	umount "$MNT"
	fs_wait_gone "$pid" 10
	! mounted "$MNT"
}

@test "SIGTERM unmounts cleanly" {
	fs_mount "$STORE" "$MNT"
	kill -TERM "$FS_PID"
	rc=0
	wait "$FS_PID" || rc=$?
	FS_PID=
	assert_equal "$rc" 0
	! mounted "$MNT"
}

@test "mount.ckvfs STORE MNT -o opts mounts and drops mount(8)-only options" {
	run "$CKV_SRC/mount.ckvfs" "$STORE" "$MNT" -o cache=64M,policy=lru,noauto,_netdev,user,x-systemd.foo,defaults 3>&-
	assert_success
	mounted "$MNT"
	assert_equal "$(fs_stat "$MNT" arena_bytes)" $((64 << 20))
	assert_equal "$(fs_stat "$MNT" policy)" lru
	pid=$(fs_daemon_pid "$MNT")
	fusermount3 -u "$MNT"
	fs_wait_gone "$pid" 10
}

@test "mount.ckvfs -f is mount(8)'s fake mount: nothing happens" {
	run "$CKV_SRC/mount.ckvfs" "$STORE" "$MNT" -f -o cache=64M 3>&-
	assert_success
	! mounted "$MNT"
}

@test "mount -t fuse.ckvfs through /sbin/mount.fuse.ckvfs" {
	[ "$(id -u)" -eq 0 ] || skip "needs root"
	[ ! -e /sbin/mount.fuse.ckvfs ] || skip "/sbin/mount.fuse.ckvfs already installed"
	LINK=/sbin/mount.fuse.ckvfs
	ln -s "$CKV_SRC/mount.ckvfs" "$LINK"
	run mount -t fuse.ckvfs "$STORE" "$MNT" -o cache=32M,noauto,_netdev 3>&-
	assert_success
	mounted "$MNT"
	assert_equal "$(fs_stat "$MNT" arena_bytes)" $((32 << 20))
	pid=$(fs_daemon_pid "$MNT")
	umount "$MNT"
	fs_wait_gone "$pid" 10
}

@test "an fstab line mounts with mount -T FSTAB" {
	[ "$(id -u)" -eq 0 ] || skip "needs root"
	[ ! -e /sbin/mount.fuse.ckvfs ] || skip "/sbin/mount.fuse.ckvfs already installed"
	LINK=/sbin/mount.fuse.ckvfs
	ln -s "$CKV_SRC/mount.ckvfs" "$LINK"
	echo "$STORE $MNT fuse.ckvfs cache=8M,policy=attn,_netdev 0 0" >"$BATS_TEST_TMPDIR/fstab"
	run mount -T "$BATS_TEST_TMPDIR/fstab" -a 3>&-
	assert_success
	mounted "$MNT"
	assert_equal "$(fs_stat "$MNT" arena_bytes)" $((8 << 20))
	pid=$(fs_daemon_pid "$MNT")
	umount "$MNT"
	fs_wait_gone "$pid" 10
	# noauto lines are skipped by -a but mount by their mount point
	echo "$STORE $MNT fuse.ckvfs cache=8M,noauto 0 0" >"$BATS_TEST_TMPDIR/fstab"
	run mount -T "$BATS_TEST_TMPDIR/fstab" -a 3>&-
	! mounted "$MNT"
	run mount -T "$BATS_TEST_TMPDIR/fstab" "$MNT" 3>&-
	assert_success
	mounted "$MNT"
	pid=$(fs_daemon_pid "$MNT")
	umount "$MNT"
	fs_wait_gone "$pid" 10
}

@test "a missing STORE: clear error, exit 1, no mount" {
	run "$CKVFS" "$BATS_TEST_TMPDIR/nope" "$MNT" -f 3>&-
	assert_failure 1
	assert_output_contains "nope"
	! mounted "$MNT"
}

@test "a directory that is not a store: clear error, exit 1, no mount" {
	mkdir "$BATS_TEST_TMPDIR/plain"
	run "$CKVFS" "$BATS_TEST_TMPDIR/plain" "$MNT" -f 3>&-
	assert_failure 1
	assert_output_contains "not a ckvfs store"
	! mounted "$MNT"
}

@test "an unknown option: error naming it, exit 2, no mount" {
	run "$CKVFS" "$STORE" "$MNT" -f -o cache=64M,frobnicate 3>&-
	assert_failure 2
	assert_output_contains "frobnicate"
	! mounted "$MNT"
}

@test "bad option values name the option" {
	for v in cache=12X cache=0 cache=-5 cache=1Q cache= cache=99999999999T; do
		run "$CKVFS" "$STORE" "$MNT" -f -o "$v" 3>&-
		assert_failure 2
		assert_output_contains "cache="
	done
	run "$CKVFS" "$STORE" "$MNT" -f -o policy=mru 3>&-
	assert_failure 2
	assert_output_contains "policy=mru"
	run "$CKVFS" "$STORE" "$MNT" -f -o read_ahead_kb=lots 3>&-
	assert_failure 2
	assert_output_contains "read_ahead_kb"
	! mounted "$MNT"
}

@test "missing arguments: usage, exit 2" {
	run "$CKVFS" "$STORE"
	assert_failure 2
	assert_output_contains "usage"
	run "$CKV_SRC/mount.ckvfs" "$STORE"
	assert_failure 2
	assert_output_contains "usage"
}

@test "-h and -V" {
	run "$CKVFS" -h
	assert_success
	assert_output_contains "cache=SIZE"
	assert_output_contains "policy=attn|lru"
	run "$CKVFS" -V
	assert_success
	assert_output_contains "ckvfs 0."
}

@test "cache sizes take K/M/G/T suffixes" {
	fs_mount "$STORE" "$MNT" -o cache=3M
	assert_equal "$(fs_stat "$MNT" arena_bytes)" $((3 << 20))
	fs_umount "$MNT"
	fs_mount "$STORE" "$MNT" -o cache=2048KiB
	assert_equal "$(fs_stat "$MNT" arena_bytes)" $((2 << 20))
	fs_umount "$MNT"
	fs_mount "$STORE" "$MNT"
	assert_equal "$(fs_stat "$MNT" arena_bytes)" $((1 << 30))
	assert_equal "$(fs_stat "$MNT" policy)" attn
	fs_umount "$MNT"
}

@test "-o populate, read_ahead_kb, direct_io, warm, allow_other, default_permissions are accepted" {
	"$CKV" export "$STORE" "$HASH" "$BATS_TEST_TMPDIR/ex" >/dev/null
	fs_mount "$STORE" "$MNT" -o cache=8M,populate,read_ahead_kb=1024,direct_io,warm,no_warm,allow_other,default_permissions
	assert_equal "$(fs_stat "$MNT" mode)" direct_io
	cmp "$MNT/by-hash/$HASH/layer_000.kv" "$BATS_TEST_TMPDIR/ex/layer_000.kv"
	fs_umount "$MNT"
}

@test "the published tree is read-only; import/ takes new directories (staging areas)" {
	fs_mount "$STORE" "$MNT"
	run touch "$MNT/by-hash/$HASH/manifest.json"
	assert_failure
	run sh -c "echo x > '$MNT/by-hash/$HASH/tokens.bin'"
	assert_failure
	run rm "$MNT/by-hash/$HASH/tokens.bin"
	assert_failure
	run mkdir "$MNT/by-hash/x"
	assert_failure
	run mkdir "$MNT/by-model/x"
	assert_failure
	run mkdir "$MNT/x"
	assert_failure
	mkdir "$MNT/import/new"
	rmdir "$MNT/import/new"
	[ -f "$MNT/by-hash/$HASH/tokens.bin" ]
	fs_umount "$MNT"
}
