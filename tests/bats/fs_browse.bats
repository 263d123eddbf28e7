#!/usr/bin/env bats
# ckvfs: the namespace — by-hash, by-model, stat, byte-identity with
# `ckv export`, /.ckv/stats, and store changes while mounted.

load test_helper

setup_file() {
	local s=$BATS_FILE_TMPDIR/store
	"$CKV" init "$s" >/dev/null
	# H1: one extent; H2 extends H1 (two extents, a partial last chunk);
	# H3: a model id without an org.
	H1=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --tokens 2000 --seed 1)
	H2=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --tokens 700 --extends "$H1" --seed 2)
	H3=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --model-id tinymodel --tokens 100 --seed 3)
	fs_fixture_save "$H1" "$H2" "$H3"
}

setup() {
	fs_fixture_load
}

teardown() {
	fs_teardown
}

@test "by-hash lists every prefix, sorted like ckv ls" {
	fs_mount "$STORE" "$MNT"
	want=$(printf '%s\n' "$H1" "$H2" "$H3" | sort)
	assert_equal "$(ls "$MNT/by-hash")" "$want"
	assert_equal "$(stat -c %h "$MNT/by-hash")" 5
	run ls "$MNT/by-hash/$H2"
	assert_success
	assert_equal "$(ls "$MNT/by-hash/$H2" | head -4 | tr '\n' ' ')" \
		"layer_000.kv layer_001.kv layer_002.kv layer_003.kv "
	assert_equal "$(ls "$MNT/by-hash/$H2" | wc -l)" 27
	run ls "$MNT/by-hash/00000000000000000000000000000000"
	assert_failure
	run ls "$MNT/by-hash/${H1^^}"
	assert_failure
	fs_umount "$MNT"
}

@test "by-model/<org>/<name>/<hash> symlinks resolve to by-hash" {
	fs_mount "$STORE" "$MNT"
	assert_equal "$(ls "$MNT/by-model" | tr '\n' ' ')" "Qwen _ "
	assert_equal "$(ls "$MNT/by-model/Qwen")" "Qwen2.5-0.5B"
	assert_equal "$(ls "$MNT/by-model/Qwen/Qwen2.5-0.5B" | tr '\n' ' ')" \
		"$(printf '%s\n' "$H1" "$H2" | sort | tr '\n' ' ')"
	assert_equal "$(ls "$MNT/by-model/_")" "tinymodel"
	assert_equal "$(ls "$MNT/by-model/_/tinymodel")" "$H3"
	assert_equal "$(readlink "$MNT/by-model/Qwen/Qwen2.5-0.5B/$H1")" "../../../by-hash/$H1"
	[ -L "$MNT/by-model/Qwen/Qwen2.5-0.5B/$H1" ]
	cmp "$MNT/by-model/Qwen/Qwen2.5-0.5B/$H1/layer_005.kv" "$EX/$H1/layer_005.kv"
	cmp "$MNT/by-model/_/tinymodel/$H3/manifest.json" "$EX/$H3/manifest.json"
	assert_equal "$(realpath "$MNT/by-model/_/tinymodel/$H3")" "$MNT/by-hash/$H3"
	run ls "$MNT/by-model/Qwen/Qwen2.5-0.5B/$H3"
	assert_failure
	run ls "$MNT/by-model/Nope"
	assert_failure
	fs_umount "$MNT"
}

@test "stat: sizes, modes, link counts and times match the export" {
	fs_mount "$STORE" "$MNT"
	for h in $H1 $H2 $H3; do
		for f in "$EX/$h"/*; do
			n=${f##*/}
			assert_equal "$(stat -c '%s %Y' "$MNT/by-hash/$h/$n")" "$(stat -c '%s %Y' "$f")"
			assert_equal "$(stat -c '%a %h %F' "$MNT/by-hash/$h/$n")" "444 1 regular file"
		done
		assert_equal "$(stat -c '%a %h %F' "$MNT/by-hash/$h")" "555 2 directory"
	done
	# layer file = chunks x chunk_bytes; H2 = 2700 tokens = 169 chunks of 8 KiB
	assert_equal "$(stat -c %s "$MNT/by-hash/$H2/layer_023.kv")" $((169 * 8192))
	assert_equal "$(stat -c %s "$MNT/by-hash/$H2/tokens.bin")" $((2700 * 4))
	assert_equal "$(stat -c %s "$MNT/by-hash/$H2/sums.xxh3")" $((32 + 24 * 169 * 8))
	assert_equal "$(stat -c '%a %F' "$MNT")" "555 directory"
	assert_equal "$(stat -c '%a' "$MNT/import")" "755"
	assert_equal "$(stat -c '%a %F' "$MNT/.ckv/stats")" "444 regular file"
	run du -sb "$MNT/by-hash/$H1"
	assert_success
	fs_umount "$MNT"
}

@test "every file is byte-identical to ckv export" {
	fs_mount "$STORE" "$MNT"
	for h in $H1 $H2 $H3; do
		assert_same_dir "$MNT/by-hash/$h" "$EX/$h"
	done
	fs_umount "$MNT"
}

@test "every file is byte-identical to ckv export with -o direct_io" {
	fs_mount "$STORE" "$MNT" -o direct_io,cache=4M
	for h in $H1 $H2 $H3; do
		assert_same_dir "$MNT/by-hash/$h" "$EX/$h"
	done
	fs_umount "$MNT"
}

@test "cp -a of a prefix directory round-trips into ckv import" {
	fs_mount "$STORE" "$MNT"
	cp -a "$MNT/by-hash/$H2" "$BATS_TEST_TMPDIR/copy"
	assert_same_dir "$BATS_TEST_TMPDIR/copy" "$EX/$H2"
	"$CKV" init "$BATS_TEST_TMPDIR/other" >/dev/null
	chmod -R u+w "$BATS_TEST_TMPDIR/copy"
	run "$CKV" import -q "$BATS_TEST_TMPDIR/other" "$BATS_TEST_TMPDIR/copy"
	assert_success
	assert_equal "$output" "$H2"
	fs_umount "$MNT"
}

@test "/.ckv/stats is JSON with the counters" {
	fs_mount "$STORE" "$MNT" -o cache=16M
	cat "$MNT/by-hash/$H1/layer_000.kv" >/dev/null
	run "$PY" - "$MNT/.ckv/stats" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
for k in ("arena_bytes", "arena_used", "hits", "misses", "evictions", "bytes_from_disk",
          "readahead_issued", "readahead_used", "hints", "checksum_failures", "prefixes"):
    assert isinstance(s[k], int) and s[k] >= 0, k
assert s["arena_bytes"] == 16 << 20, s
assert s["misses"] > 0 and s["bytes_from_disk"] > 0, s
assert s["prefixes"] == 3, s
assert s["policy"] == "attn", s
print("ok")
EOF
	assert_success
	assert_equal "$output" ok
	fs_umount "$MNT"
}

@test "ckv import and ckv rm while mounted show up within a second" {
	local s=$BATS_TEST_TMPDIR/store
	"$CKV" init "$s" >/dev/null
	"$CKV" import -q "$s" "$EX/$H3" >/dev/null
	fs_mount "$s" "$MNT"
	assert_equal "$(ls "$MNT/by-hash")" "$H3"
	# keep the kernel's view warm: these must be invalidated, not just time out
	ls -l "$MNT/by-hash/$H3" >/dev/null
	ls "$MNT/by-model/_/tinymodel" >/dev/null

	"$CKV" import -q "$s" "$EX/$H1" >/dev/null
	wait_until 1 test -d "$MNT/by-hash/$H1"
	wait_until 1 test -L "$MNT/by-model/Qwen/Qwen2.5-0.5B/$H1"
	cmp "$MNT/by-hash/$H1/layer_007.kv" "$EX/$H1/layer_007.kv"
	assert_equal "$(ls "$MNT/by-hash" | wc -l)" 2

	"$CKV" rm "$s" "$H3" >/dev/null
	wait_until 1 test ! -e "$MNT/by-hash/$H3"
	wait_until 1 test ! -e "$MNT/by-model/_/tinymodel/$H3"
	assert_equal "$(ls "$MNT/by-hash")" "$H1"
	run stat "$MNT/by-hash/$H3/manifest.json"
	assert_failure
	# and back again
	"$CKV" import -q "$s" "$EX/$H3" >/dev/null
	wait_until 1 test -f "$MNT/by-hash/$H3/manifest.json"
	cmp "$MNT/by-hash/$H3/tokens.bin" "$EX/$H3/tokens.bin"
	fs_umount "$MNT"
}

@test "a prefix removed while a reader has its file open: right bytes or an error" {
	local s=$BATS_TEST_TMPDIR/store
	"$CKV" init "$s" >/dev/null
	"$CKV" import -q "$s" "$EX/$H1" >/dev/null
	fs_mount "$s" "$MNT" -o direct_io,cache=2M
	run "$PY" - "$MNT/by-hash/$H1/layer_003.kv" "$EX/$H1/layer_003.kv" "$CKV" "$s" "$H1" <<'EOF'
import os, subprocess, sys, time
path, ref, ckv, store, h = sys.argv[1:]
want = open(ref, "rb").read()
fd = os.open(path, os.O_RDONLY)
half = len(want) // 2
assert os.pread(fd, half, 0) == want[:half]
subprocess.run([ckv, "rm", store, h], check=True, stdout=subprocess.DEVNULL)
time.sleep(1.2)
assert not os.path.exists(path)
got = os.pread(fd, len(want) - half, half)   # still open: keeps working
assert got == want[half:], "wrong bytes after rm"
subprocess.run([ckv, "gc", store], check=True, stdout=subprocess.DEVNULL)
try:                                         # segments gone: right bytes or an error
    got = os.pread(fd, len(want), 0)
    assert got == want[:len(got)], "wrong bytes after gc"
except OSError as e:
    print("after gc:", e.strerror)
os.close(fd)
print("ok")
EOF
	assert_success
	assert_output_contains ok
	fs_umount "$MNT"
}
