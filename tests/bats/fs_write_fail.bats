#!/usr/bin/env bats
# ckvfs write side, when things go wrong: bad caches are not published (the
# reason in user.ckv.error and the log) and published prefixes stay as they
# were; a killed rsync, a killed daemon and a full disk lose nothing; gc
# cleans abandoned staging areas only.

load fs_write_helper

setup_file() {
	local s=$BATS_FILE_TMPDIR/src
	"$CKV" init "$s" >/dev/null
	H1=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --tokens 300 --seed 1)
	H3=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --tokens 90 --seed 3)
	H4=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --tokens 700 --seed 4) # 8.3 MiB of layers
	echo "$H1 $H3 $H4" >"$BATS_FILE_TMPDIR/hashes"
	mkdir -p "$BATS_FILE_TMPDIR/ex"
	for h in $H1 $H3 $H4; do
		export_cache "$s" "$h" "$BATS_FILE_TMPDIR/ex/$h"
	done
}

setup() {
	fs_require
	command -v rsync >/dev/null || skip "no rsync"
	EX=$BATS_FILE_TMPDIR/ex
	read -r H1 H3 H4 <"$BATS_FILE_TMPDIR/hashes"
	DST=$BATS_TEST_TMPDIR/dst
	MNT=$BATS_TEST_TMPDIR/mnt
	LOG=$BATS_TEST_TMPDIR/ckvfs.log
	BAD=$BATS_TEST_TMPDIR/bad
	"$CKV" init "$DST" >/dev/null
	# one prefix published before anything goes wrong
	"$CKV" import -q "$DST" "$EX/$H3" >/dev/null
}

teardown() {
	fs_teardown
}

# the published prefix H3 is as it was: store record, files, bytes
assert_published_unchanged() {
	assert_equal "$(published_snapshot "$DST")" "$SNAP"
	assert_same_dir "$MNT/by-hash/$H3" "$EX/$H3"
	run "$CKV" verify "$DST"
	assert_success
}

# rejected DIR TEXT: the area failed with TEXT in user.ckv.error and the log,
# nothing was published.
rejected() {
	local dir=$1 text=$2
	wait_failed "$dir"
	[[ "$(fsw_error "$dir")" == *"$text"* ]] || fail "user.ckv.error of $dir: '$(fsw_error "$dir")', expected '$text'"
	grep -qF "$text" "$LOG" || fail "no '$text' in the daemon log: $(cat "$LOG")"
	assert_equal "$(prefixes "$DST")" "$H3"
	assert_published_unchanged
}

@test "a by-hash directory named other than its tokens' hash is not published" {
	fsw_mount "$DST" "$MNT"
	SNAP=$(published_snapshot "$DST")
	mkdir -p "$BAD" && cp -a "$EX/$H1" "$BAD/$H4"
	run cp -a "$BAD/$H4" "$MNT/by-hash/"
	assert_success
	rejected "$MNT/by-hash/$H4" "by-hash/$H4: directory is named $H4 but its tokens hash to $H1"
	[ -f "$MNT/by-hash/$H4/layer_000.kv" ] # the copy stays for the user to see
	rm -rf "$MNT/by-hash/$H4"
	[ ! -e "$MNT/by-hash/$H4" ]
	fs_umount "$MNT"
}

@test "a truncated layer file is not published; copying the right one publishes" {
	fsw_mount "$DST" "$MNT"
	SNAP=$(published_snapshot "$DST")
	mkdir -p "$BAD" && cp -a "$EX/$H1" "$BAD/$H1"
	truncate -s 8192 "$BAD/$H1/layer_007.kv"
	run rsync -a "$BAD/$H1" "$MNT/by-hash/"
	assert_success
	rejected "$MNT/by-hash/$H1" "by-hash/$H1/layer_007.kv: 8192 bytes, expected 155648 (19 chunks of 8192 bytes): truncated"
	# the next change is checked again
	run rsync -a "$EX/$H1" "$MNT/by-hash/"
	assert_success
	wait_published "$MNT" "$H1"
	assert_same_dir "$MNT/by-hash/$H1" "$EX/$H1"
	fs_umount "$MNT"
}

@test "a wrong manifest is not published" {
	fsw_mount "$DST" "$MNT"
	SNAP=$(published_snapshot "$DST")
	mkdir -p "$BAD"
	cp -a "$EX/$H1" "$BAD/hash" && json_edit "$BAD/hash/manifest.json" ".hash = \"$H4\""
	cp -a "$EX/$H1" "$BAD/count" && json_edit "$BAD/count/manifest.json" '.tokens = 301'
	cp -a "$EX/$H1" "$BAD/json" && printf '{"format": "ckv-prefix", ' >"$BAD/json/manifest.json"
	for d in hash count json; do
		run cp -a "$BAD/$d" "$MNT/import/"
		assert_success
	done
	rejected "$MNT/import/hash" "import/hash/manifest.json: field \"hash\" is $H4 but tokens.bin hashes to $H1"
	rejected "$MNT/import/count" "import/count/tokens.bin: 1200 bytes, expected 1204"
	rejected "$MNT/import/json" "import/json/manifest.json"
	fs_umount "$MNT"
}

@test "missing tokens.bin: not published" {
	fsw_mount "$DST" "$MNT"
	SNAP=$(published_snapshot "$DST")
	mkdir -p "$BAD" && cp -a "$EX/$H1" "$BAD/notok" && rm "$BAD/notok/tokens.bin"
	run rsync -a "$BAD/notok/" "$MNT/import/notok/"
	assert_success
	rejected "$MNT/import/notok" "import/notok/tokens.bin: missing"
	fs_umount "$MNT"
}

@test "a bad sums.xxh3 is not published: a wrong checksum, a wrong size" {
	fsw_mount "$DST" "$MNT"
	SNAP=$(published_snapshot "$DST")
	mkdir -p "$BAD"
	cp -a "$EX/$H1" "$BAD/sum" && flip_byte "$BAD/sum/sums.xxh3" $((32 + 8 * 19 * 3 + 5))
	cp -a "$EX/$H1" "$BAD/size" && truncate -s 100 "$BAD/size/sums.xxh3"
	cp -a "$BAD/sum" "$BAD/size" "$MNT/import/"
	rejected "$MNT/import/sum" "import/sum/layer_003.kv: chunk 0 does not match its checksum in sums.xxh3"
	rejected "$MNT/import/size" "import/size/sums.xxh3: 100 bytes, expected 3680"
	fs_umount "$MNT"
}

# checked DIR: the publisher is done with an import area (emptied or failed)
checked() {
	[ -z "$(ls -A "$1")" ] || [ "$(fsw_state "$1")" = failed ]
}

@test "a corrupt copy of a prefix already published leaves the published one as it is" {
	"$CKV" import -q "$DST" "$EX/$H1" >/dev/null
	fsw_mount "$DST" "$MNT"
	SNAP=$(published_snapshot "$DST")
	mkdir -p "$BAD" && cp -a "$EX/$H1" "$BAD/c" && flip_byte "$BAD/c/layer_002.kv" 4096
	run cp -a "$BAD/c" "$MNT/by-hash/$H1"
	assert_failure
	cp -a "$BAD/c" "$MNT/import/"
	wait_until 20 checked "$MNT/import/c"
	cat "$LOG" >&2
	assert_equal "$(published_snapshot "$DST")" "$SNAP"
	assert_same_dir "$MNT/by-hash/$H1" "$EX/$H1"
	run "$CKV" verify "$DST"
	assert_success
	fs_umount "$MNT"
}

@test "rsync killed mid-transfer, then run again: completes and publishes" {
	fsw_mount "$DST" "$MNT"
	SNAP=$(published_snapshot "$DST")
	# its own process group, so that all of rsync's processes go at once
	setsid rsync -a --bwlimit=1500 "$EX/$H4" "$MNT/by-hash/" >/dev/null 2>&1 &
	pid=$!
	wait_until 10 test -e "$MNT/by-hash/$H4/layer_003.kv"
	kill -KILL -- "-$pid"
	st=0
	wait "$pid" || st=$?
	[ "$st" -eq 137 ] # rsync died of the SIGKILL
	sleep 1
	[ "$(fsw_state "$MNT/by-hash/$H4")" != published ]
	assert_equal "$(prefixes "$DST")" "$H3"
	assert_published_unchanged
	run rsync -a "$EX/$H4" "$MNT/by-hash/"
	assert_success
	wait_published "$MNT" "$H4"
	assert_same_dir "$MNT/by-hash/$H4" "$EX/$H4"
	assert_equal "$(tree_attrs "$MNT/by-hash/$H4")" "$(tree_attrs "$EX/$H4")"
	run "$CKV" verify "$DST"
	assert_success
	[ -z "$(ls -A "$DST/incoming/by-hash")" ] # rsync's orphaned temporary file went too
	fs_umount "$MNT"
}

@test "the daemon killed (SIGKILL) mid-transfer: the store verifies, the area is resumed, a rerun publishes" {
	fsw_mount "$DST" "$MNT"
	SNAP=$(published_snapshot "$DST")
	setsid rsync -a --bwlimit=1500 "$EX/$H4" "$MNT/by-hash/" >/dev/null 2>&1 &
	pid=$!
	wait_until 10 test -e "$MNT/by-hash/$H4/layer_003.kv"
	kill -KILL "$FS_PID"
	st=0
	wait "$FS_PID" || st=$?
	[ "$st" -eq 137 ] # the daemon died of the SIGKILL
	FS_PID=
	st=0
	wait "$pid" || st=$?
	[ "$st" -ne 0 ] # rsync saw its destination go away
	force_unmount "$MNT"
	run "$CKV" verify "$DST"
	assert_success
	assert_equal "$(prefixes "$DST")" "$H3"
	[ -d "$DST/incoming/by-hash/$H4" ]
	fsw_mount "$DST" "$MNT"
	[ -d "$MNT/by-hash/$H4" ]
	grep -q "by-hash/$H4: resumed" "$LOG"
	assert_published_unchanged
	run rsync -a "$EX/$H4" "$MNT/by-hash/"
	assert_success
	wait_published "$MNT" "$H4"
	assert_same_dir "$MNT/by-hash/$H4" "$EX/$H4"
	run "$CKV" verify "$DST"
	assert_success
	fs_umount "$MNT"
}

# small_store SIZE: a store on a tmpfs of SIZE (root only); sets DST.
small_store() {
	[ "$(id -u)" -eq 0 ] || skip "needs root (mount -t tmpfs)"
	SMALL=$BATS_TEST_TMPDIR/small
	mkdir -p "$SMALL"
	mount -t tmpfs -o "size=$1" tmpfs "$SMALL" || skip "cannot mount a tmpfs"
	DST=$SMALL/store
	"$CKV" init "$DST" >/dev/null
	"$CKV" import -q "$DST" "$EX/$H3" >/dev/null
}

used_kb() {
	df -k --output=used "$SMALL" | tail -1 | tr -d ' '
}

@test "a full backing disk: cp reports the write error, nothing is published, rm -rf reclaims the space" {
	small_store 6m
	fsw_mount "$DST" "$MNT" -o no_odirect
	SNAP=$(published_snapshot "$DST")
	used=$(used_kb)
	run cp -a "$EX/$H4" "$MNT/by-hash/"
	assert_failure
	assert_output_contains "No space left on device"
	wait_failed "$MNT/by-hash/$H4"
	assert_equal "$(prefixes "$DST")" "$H3"
	assert_published_unchanged
	rm -rf "$MNT/by-hash/$H4"
	[ ! -e "$MNT/by-hash/$H4" ]
	[ "$(used_kb)" -le $((used + 64)) ] || fail "tmpfs holds $(used_kb) KiB, $used before the copy"
	fs_umount "$MNT"
}

@test "a disk that fills while publishing: not published, the reason kept, the store as it was" {
	small_store 7m # the copy (3.6 MiB) fits, the copy and its segment do not
	fsw_mount "$DST" "$MNT" -o no_odirect
	SNAP=$(published_snapshot "$DST")
	used=$(used_kb)
	run cp -a "$EX/$H1" "$MNT/by-hash/"
	assert_success
	rejected "$MNT/by-hash/$H1" "No space left on device"
	[ -z "$(ls -A "$DST/staging")" ]
	rm -rf "$MNT/by-hash/$H1"
	[ "$(used_kb)" -le $((used + 64)) ] || fail "tmpfs holds $(used_kb) KiB, $used before the copy"
	fs_umount "$MNT"
}

@test "ckv gc leaves a mounted daemon's staging areas alone and removes abandoned ones" {
	fsw_mount "$DST" "$MNT"
	mkdir "$MNT/by-hash/$H1" "$MNT/import/part"
	cp "$EX/$H1/layer_000.kv" "$MNT/by-hash/$H1/"
	cp "$EX/$H1/tokens.bin" "$MNT/import/part/"
	run "$CKV" gc "$DST"
	assert_success
	assert_output_contains "0 staging areas"
	[ -f "$MNT/by-hash/$H1/layer_000.kv" ]
	fs_umount "$MNT"
	# unmounted: nobody serves them any more
	run "$CKV" gc "$DST"
	assert_success
	assert_output_contains "2 staging areas"
	fsw_mount "$DST" "$MNT"
	[ ! -e "$MNT/by-hash/$H1" ]
	assert_equal "$(ls "$MNT/import")" ""
	fs_umount "$MNT"
}

@test "a second daemon on the same store serves it read-only" {
	fsw_mount "$DST" "$MNT"
	m2=$BATS_TEST_TMPDIR/mnt2
	mkdir -p "$m2"
	"$CKVFS" "$DST" "$m2" -f 3>&- 2>"$BATS_TEST_TMPDIR/second.log" &
	pid2=$!
	wait_mounted "$m2" "$pid2" 15
	run mkdir "$m2/import/x"
	assert_failure
	grep -q "held by another ckvfs" "$BATS_TEST_TMPDIR/second.log"
	mkdir "$MNT/import/x"
	fusermount3 -u "$m2"
	wait "$pid2"
	fs_umount "$MNT"
}
