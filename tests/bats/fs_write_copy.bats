#!/usr/bin/env bats
# ckvfs write side: real cp -a and rsync -a of caches into a mount (by-hash/
# and import/ staging areas), published verified; second runs change
# nothing; times and modes kept; dedup on arrival; what staging areas take.

load fs_write_helper

setup_file() {
	local s=$BATS_FILE_TMPDIR/src
	"$CKV" init "$s" >/dev/null
	# H1: 300 tokens; H2 extends H1 by 200 (a partial last chunk); H3 unrelated.
	H1=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --tokens 300 --seed 1)
	H2=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --tokens 200 --extends "$H1" --seed 2)
	H3=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --model-id tinymodel --tokens 90 --seed 3)
	echo "$H1 $H2 $H3" >"$BATS_FILE_TMPDIR/hashes"
	mkdir -p "$BATS_FILE_TMPDIR/ex"
	for h in $H1 $H2 $H3; do
		export_cache "$s" "$h" "$BATS_FILE_TMPDIR/ex/$h"
	done
}

setup() {
	fs_require
	command -v rsync >/dev/null || skip "no rsync"
	SRC=$BATS_FILE_TMPDIR/src
	EX=$BATS_FILE_TMPDIR/ex
	read -r H1 H2 H3 <"$BATS_FILE_TMPDIR/hashes"
	DST=$BATS_TEST_TMPDIR/dst
	MNT=$BATS_TEST_TMPDIR/mnt
	"$CKV" init "$DST" >/dev/null
}

teardown() {
	fs_teardown
}

# second_run_is_noop SRCDIR MNT HASH [rsync options]: rsync -a again moves
# no file and changes nothing, published or not.
second_run_is_noop() {
	local src=$1 mnt=$2 h=$3 before
	shift 3
	before=$(published_snapshot "$DST")
	run rsync -a --stats "$@" "$src" "$mnt/by-hash/"
	assert_success
	assert_output_contains "Number of regular files transferred: 0"
	run rsync -ai "$@" "$src" "$mnt/by-hash/"
	assert_success
	assert_equal "$output" ""
	assert_equal "$(published_snapshot "$DST")" "$before"
}

@test "cp -a of an exported cache into by-hash/ publishes it, byte for byte, times kept" {
	fsw_mount "$DST" "$MNT"
	cp -a "$EX/$H1" "$MNT/by-hash/"
	wait_published "$MNT" "$H1"
	assert_equal "$(prefixes "$DST")" "$H1"
	assert_same_dir "$MNT/by-hash/$H1" "$EX/$H1"
	assert_equal "$(tree_attrs "$MNT/by-hash/$H1")" "$(tree_attrs "$EX/$H1")"
	run "$CKV" verify "$DST"
	assert_success
	second_run_is_noop "$EX/$H1" "$MNT" "$H1"
	second_run_is_noop "$EX/$H1" "$MNT" "$H1" --checksum
	# the staging copy is gone from the backing store
	[ -z "$(ls -A "$DST/incoming/by-hash")" ]
	assert_equal "$(fs_stat "$MNT" published_from_mount)" 1
	fs_umount "$MNT"
	# kept across a remount: the times and modes are in the store record
	fsw_mount "$DST" "$MNT"
	assert_equal "$(tree_attrs "$MNT/by-hash/$H1")" "$(tree_attrs "$EX/$H1")"
	fs_umount "$MNT"
}

@test "rsync -a, --inplace, --partial, --whole-file: published, identical; a second run (also --checksum) is a no-op" {
	local v n=0
	for v in "" --inplace --partial --whole-file; do
		n=$((n + 1))
		DST=$BATS_TEST_TMPDIR/dst$n
		"$CKV" init "$DST" >/dev/null
		fsw_mount "$DST" "$MNT"
		run rsync -a $v "$EX/$H1" "$MNT/by-hash/"
		assert_success
		wait_published "$MNT" "$H1"
		assert_same_dir "$MNT/by-hash/$H1" "$EX/$H1"
		assert_equal "$(tree_attrs "$MNT/by-hash/$H1")" "$(tree_attrs "$EX/$H1")"
		second_run_is_noop "$EX/$H1" "$MNT" "$H1" $v
		second_run_is_noop "$EX/$H1" "$MNT" "$H1" $v --checksum
		run "$CKV" verify "$DST"
		assert_success
		fs_umount "$MNT"
	done
}

@test "rsync -a into import/<name>: published under the computed hash; the area empties" {
	fsw_mount "$DST" "$MNT"
	run rsync -a "$EX/$H3/" "$MNT/import/engine-cache/"
	assert_success
	wait_state "$MNT/import/engine-cache" published
	assert_equal "$(getfattr --only-values -n user.ckv.published "$MNT/import/engine-cache")" "$H3"
	assert_equal "$(ls -A "$MNT/import/engine-cache")" ""
	assert_same_dir "$MNT/by-hash/$H3" "$EX/$H3"
	assert_equal "$(readlink "$MNT/by-model/_/tinymodel/$H3")" "../../../by-hash/$H3"
	assert_equal "$(prefixes "$DST")" "$H3"
	# the emptied area takes the next cache
	cp -a "$EX/$H1"/* "$MNT/import/engine-cache/"
	wait_published "$MNT" "$H1"
	assert_equal "$(prefixes "$DST" | tr '\n' ' ')" "$(printf '%s\n' "$H1" "$H3" | sort | tr '\n' ' ')"
	rmdir "$MNT/import/engine-cache"
	[ ! -e "$MNT/import/engine-cache" ]
	[ -z "$(ls -A "$DST/incoming/import")" ]
	fs_umount "$MNT"
}

@test "cp -a and rsync -a of prefixes read from a second mount over a second store" {
	local a=$BATS_TEST_TMPDIR/mnt-src
	fs_mount "$SRC" "$a"
	fsw_mount "$DST" "$MNT"
	cp -a "$a/by-hash/$H1" "$MNT/by-hash/"
	run rsync -a "$a/by-hash/$H3" "$MNT/by-hash/"
	assert_success
	wait_published "$MNT" "$H1"
	wait_published "$MNT" "$H3"
	for h in $H1 $H3; do
		assert_same_dir "$MNT/by-hash/$h" "$a/by-hash/$h"
		assert_same_dir "$MNT/by-hash/$h" "$EX/$h"
		assert_equal "$(tree_attrs "$MNT/by-hash/$h")" "$(tree_attrs "$a/by-hash/$h")"
		second_run_is_noop "$a/by-hash/$h" "$MNT" "$h"
		second_run_is_noop "$a/by-hash/$h" "$MNT" "$h" --checksum
	done
	assert_equal "$(stat -c %a "$MNT/by-hash/$H1/layer_000.kv")" 444
	run "$CKV" verify "$DST"
	assert_success
	fs_umount "$MNT"
	fs_umount "$a"
}

@test "dedup on arrival: rsync of a child prefix stores only its new chunks" {
	"$CKV" import -q "$DST" "$EX/$H1" >/dev/null
	fsw_mount "$DST" "$MNT"
	before=$(seg_bytes "$DST")
	run rsync -a "$EX/$H2" "$MNT/by-hash/"
	assert_success
	wait_published "$MNT" "$H2"
	after=$(seg_bytes "$DST")
	# H1: 300 tokens = 18 full chunks shared; H2: 500 tokens = 32 chunks, 14 new,
	# 24 layers x 8 KiB each, plus per-chunk side files (digests, sums)
	full=$((32 * 24 * 8192))
	new=$((14 * 24 * 8192))
	grown=$((after - before))
	[ "$grown" -ge "$new" ] || fail "store grew $grown bytes, less than the $new new"
	[ "$grown" -lt $((new * 3 / 2)) ] || fail "store grew $grown bytes for $new new ($full in all)"
	run "$CKV" stat "$DST" "$H2"
	assert_success
	assert_same_dir "$MNT/by-hash/$H2" "$EX/$H2"
	run "$CKV" verify "$DST"
	assert_success
	fs_umount "$MNT"
}

@test "1 MiB writes reach the daemon whole" {
	fsw_mount "$DST" "$MNT"
	mkdir "$MNT/import/w"
	w0=$(fs_stat "$MNT" fuse_writes)
	dd if=/dev/zero of="$MNT/import/w/blob" bs=1M count=8 status=none
	assert_equal "$(($(fs_stat "$MNT" fuse_writes) - w0))" 8
	assert_equal "$(stat -c %s "$MNT/import/w/blob")" $((8 << 20))
	assert_equal "$(stat -c %s "$DST/incoming/import/w/blob")" $((8 << 20))
	rm -r "$MNT/import/w"
	[ ! -e "$DST/incoming/import/w" ]
	fs_umount "$MNT"
}

@test "a staging area takes create, write, rename, truncate, chmod, utimens, fsync, unlink" {
	fsw_mount "$DST" "$MNT"
	d=$MNT/import/s
	mkdir "$d"
	assert_equal "$(fsw_state "$d")" staging
	printf 'hello world' >"$d/.tmp.XYZ"
	mv "$d/.tmp.XYZ" "$d/a"
	assert_equal "$(cat "$d/a")" "hello world"
	truncate -s 5 "$d/a"
	assert_equal "$(cat "$d/a")" hello
	chmod 0640 "$d/a"
	touch -m -d @1500000000.123456789 "$d/a"
	assert_equal "$(stat -c '%a %s %.9Y' "$d/a")" "640 5 1500000000.123456789"
	"$PY" -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b"HE", 0)
os.fsync(fd)
os.close(fd)' "$d/a"
	assert_equal "$(cat "$d/a")" HEllo
	# an open, unlinked file keeps working
	exec 5<"$d/a"
	rm "$d/a"
	[ ! -e "$d/a" ]
	assert_equal "$(cat <&5)" HEllo
	exec 5<&-
	# regular files only
	run mkdir "$d/sub"
	assert_failure
	run ln -s x "$d/link"
	assert_failure
	run mkfifo "$d/fifo"
	assert_failure
	# an area that is not empty cannot go; an empty one can
	: >"$d/b"
	run rmdir "$d"
	assert_failure
	rm "$d/b"
	rmdir "$d"
	[ ! -e "$d" ]
	run rm -rf "$MNT/by-hash"
	assert_failure
	fs_umount "$MNT"
}

@test "published prefixes are read-only: writes, renames, unlinks fail; setattrs that change nothing succeed" {
	fsw_mount "$DST" "$MNT"
	cp -a "$EX/$H1" "$MNT/by-hash/"
	wait_published "$MNT" "$H1"
	p=$MNT/by-hash/$H1
	before=$(published_snapshot "$DST")
	run sh -c "echo x >>'$p/tokens.bin'"
	assert_failure
	assert_output_contains "Read-only file system"
	run rm "$p/layer_000.kv"
	assert_failure
	run mv "$p/layer_000.kv" "$p/x"
	assert_failure
	run touch "$p/manifest.json"
	assert_failure
	run chmod 0600 "$p/sums.xxh3"
	assert_failure
	run cp "$EX/$H1/tokens.bin" "$p/new"
	assert_failure
	run rm -rf "$p"
	assert_failure
	run mkdir "$p"
	assert_failure
	assert_output_contains "File exists"
	# no-ops: the same mode, the same mtime
	chmod "$(stat -c %a "$EX/$H1/sums.xxh3")" "$p/sums.xxh3"
	touch -m -d "@$(stat -c %.9Y "$EX/$H1/tokens.bin")" "$p/tokens.bin"
	assert_equal "$(published_snapshot "$DST")" "$before"
	assert_same_dir "$p" "$EX/$H1"
	# by-hash/ takes only prefix hashes
	run mkdir "$MNT/by-hash/not-a-hash"
	assert_failure
	grep -q "mkdir by-hash/not-a-hash: not a prefix hash" "$BATS_TEST_TMPDIR/ckvfs.log"
	run mkdir "$MNT/by-hash/${H3^^}"
	assert_failure
	fs_umount "$MNT"
}
