#!/usr/bin/env bats
# ckvfs: hints through xattrs (user.ckv.willneed, user.ckv.scores), the
# resident list, attention-guided retention against LRU, and retention
# state surviving a remount (-o warm).

load test_helper

setup_file() {
	local s=$BATS_FILE_TMPDIR/store
	"$CKV" init "$s" >/dev/null
	# 2000 tokens: 125 chunks of 8 KiB per layer, 24 layers, 24 MB in all
	"$CKV" gen -q "$s" --model qwen2.5-0.5b --tokens 2000 --seed 1 >"$BATS_FILE_TMPDIR/hash"
}

setup() {
	fs_require
	command -v setfattr >/dev/null || skip "no setfattr (attr)"
	HASH=$(cat "$BATS_FILE_TMPDIR/hash")
	STORE=$BATS_TEST_TMPDIR/store
	cp -a "$BATS_FILE_TMPDIR/store" "$STORE"
	MNT=$BATS_TEST_TMPDIR/mnt
	P=$MNT/by-hash/$HASH
}

teardown() {
	fs_teardown
}

resident() {
	getfattr --only-values -n user.ckv.resident "$1" 2>/dev/null
}

resident_is() {
	[ "$(resident "$1")" = "$2" ]
}

# pread_chunks FILE FIRST COUNT: one pread of COUNT chunks from chunk FIRST
# (a loader's demand read, not a stream).
pread_chunks() {
	"$PY" -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
n = int(sys.argv[3]) * 8192
assert len(os.pread(fd, n, int(sys.argv[2]) * 8192)) == n' "$@"
}

@test "user.ckv.willneed makes chunks resident; the read after is a hit" {
	fs_mount "$STORE" "$MNT" -o direct_io,cache=16M
	assert_equal "$(resident "$P/layer_002.kv")" ""
	setfattr -n user.ckv.willneed -v "0,3,17-20" "$P/layer_002.kv"
	wait_until 5 resident_is "$P/layer_002.kv" "0,3,17-20"
	[ "$(fs_stat "$MNT" readahead_issued)" -ge 6 ]
	hits=$(fs_stat "$MNT" hits)
	misses=$(fs_stat "$MNT" misses)
	pread_chunks "$P/layer_002.kv" 17 4
	[ "$(fs_stat "$MNT" hits)" -ge $((hits + 4)) ]
	assert_equal "$(fs_stat "$MNT" misses)" "$misses"
	[ "$(fs_stat "$MNT" readahead_used)" -ge 4 ]
	[ "$(fs_stat "$MNT" hints_willneed)" -ge 1 ]
	# a trailing newline (echo) is accepted
	setfattr -n user.ckv.willneed -v "$(printf '40-41\n')" "$P/layer_002.kv"
	wait_until 5 resident_is "$P/layer_002.kv" "0,3,17-20,40-41"
	fs_umount "$MNT"
}

@test "user.ckv.resident is listed on layer files only; other xattrs" {
	fs_mount "$STORE" "$MNT" -o cache=16M
	run getfattr -d -m - "$P/layer_000.kv"
	assert_output_contains "user.ckv.resident"
	run getfattr -d -m - "$P/manifest.json"
	refute_output_contains "user.ckv"
	run getfattr -n user.foo "$P/layer_000.kv"
	assert_failure
	assert_output_contains "No such attribute"
	run setfattr -n user.foo -v 1 "$P/layer_000.kv"
	assert_failure
	assert_output_contains "Operation not permitted"
	run setfattr -n user.ckv.willneed -v 1 "$P/manifest.json"
	assert_failure
	run setfattr -n user.ckv.willneed -v 1 "$P"
	assert_failure
	run setfattr -x user.ckv.resident "$P/layer_000.kv"
	assert_failure
	fs_umount "$MNT"
}

@test "malformed hints: EINVAL and nothing changes" {
	fs_mount "$STORE" "$MNT" -o direct_io,cache=16M
	f=$P/layer_001.kv
	hints=$(fs_stat "$MNT" hints)
	n=0
	for v in abc "1,,2" ",1" "1," "5-3" "125" "0-125" "99999999999999999999" "-1" "1-" "1 ,2" \
		" 1" "1;2" "0x10" "1-2-3" "0,124,$(seq -s, 0 124)" "$(seq -s, 0 200)"; do
		run setfattr -n user.ckv.willneed -v "$v" "$f"
		assert_failure
		assert_output_contains "Invalid argument"
		n=$((n + 1))
	done
	for v in "1:nan" "1:NaN" "1:inf" "1:-0.5" "1:-1" "1:1e999" "1:0x10" "1:" ":1" "x:1" "125:1" \
		"1:1,2" "1:1:1" "1:1.5.5" "1:1e" "1:+1" "1:2,,3:1"; do
		run setfattr -n user.ckv.scores -v "$v" "$f"
		assert_failure
		assert_output_contains "Invalid argument"
		n=$((n + 1))
	done
	# more ids than the file has chunks
	run setfattr -n user.ckv.willneed -v "$(printf '1,%.0s' $(seq 1 20000))1" "$f"
	assert_failure
	n=$((n + 1))
	# longer than the 64 KiB a hint may be (the kernel refuses it first)
	run setfattr -n user.ckv.willneed -v "$(printf '0,%.0s' $(seq 1 33000))0" "$f"
	assert_failure
	assert_equal "$(resident "$f")" ""
	assert_equal "$(fs_stat "$MNT" hints)" "$hints"
	assert_equal "$(fs_stat "$MNT" hints_rejected)" "$n"
	assert_equal "$(fs_stat "$MNT" readahead_issued)" 0
	# well-formed values are taken
	setfattr -n user.ckv.scores -v "0:1,1:2.5,124:0,7:1e-3,8:3E2" "$f"
	setfattr -n user.ckv.willneed -v "124" "$f"
	wait_until 5 resident_is "$f" "124"
	fs_umount "$MNT"
}

# retention_run POLICY: mark chunks 0-49 of layer 0 important, read them,
# stream 23 other layer files (23 MB) through a 4 MiB arena, re-read them;
# prints "HITS MISSES" of the re-read.
retention_run() {
	local scores
	fs_mount "$STORE" "$MNT" -o "direct_io,cache=4M,policy=$1"
	scores=$(seq -s, -f '%g:10' 0 49)
	setfattr -n user.ckv.scores -v "$scores" "$P/layer_000.kv"
	pread_chunks "$P/layer_000.kv" 0 50
	for l in $(seq -f '%03g' 1 23); do
		cat "$P/layer_$l.kv" >/dev/null
	done
	[ "$(fs_stat "$MNT" evictions)" -gt 0 ]
	h=$(fs_stat "$MNT" hits)
	m=$(fs_stat "$MNT" misses)
	pread_chunks "$P/layer_000.kv" 0 50
	echo "$(($(fs_stat "$MNT" hits) - h)) $(($(fs_stat "$MNT" misses) - m))"
	fs_umount "$MNT"
}

@test "policy=attn keeps chunks marked important through a flood of reads" {
	read -r hits misses <<<"$(retention_run attn)"
	assert_equal "$hits" 50
	assert_equal "$misses" 0
}

@test "policy=lru evicts them" {
	read -r hits misses <<<"$(retention_run lru)"
	assert_equal "$misses" 50
}

@test "scores survive umount and mount; -o warm preloads the important chunks" {
	fs_mount "$STORE" "$MNT" -o direct_io,cache=8M
	setfattr -n user.ckv.scores -v "$(seq -s, -f '%g:5' 10 19)" "$P/layer_003.kv"
	setfattr -n user.ckv.scores -v "100:7,101:7" "$P/layer_009.kv"
	pread_chunks "$P/layer_003.kv" 10 10
	fs_umount "$MNT"

	fs_mount "$STORE" "$MNT" -o direct_io,cache=8M,warm
	[ "$(fs_stat "$MNT" retention_loaded)" -ge 12 ]
	[ "$(fs_stat "$MNT" warm_chunks)" -ge 12 ]
	wait_until 5 resident_is "$P/layer_003.kv" "10-19"
	wait_until 5 resident_is "$P/layer_009.kv" "100-101"
	assert_equal "$(resident "$P/layer_004.kv")" ""
	m=$(fs_stat "$MNT" misses)
	pread_chunks "$P/layer_003.kv" 10 10
	assert_equal "$(fs_stat "$MNT" misses)" "$m"
	fs_umount "$MNT"

	# without warm: scores loaded, nothing read ahead
	fs_mount "$STORE" "$MNT" -o direct_io,cache=8M
	[ "$(fs_stat "$MNT" retention_loaded)" -ge 12 ]
	assert_equal "$(fs_stat "$MNT" warm_chunks)" 0
	assert_equal "$(resident "$P/layer_003.kv")" ""
	fs_umount "$MNT"
}
