#!/usr/bin/env bats
# ckvfs: reads — random pread ranges, mmap, O_DIRECT, concurrent readers,
# and a corrupt chunk failing only the reads that touch it.

load test_helper

setup_file() {
	local s=$BATS_FILE_TMPDIR/store
	"$CKV" init "$s" >/dev/null
	H1=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --tokens 2000 --seed 1)
	H2=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --tokens 1500 --extends "$H1" --seed 2)
	H3=$("$CKV" gen -q "$s" --model qwen2.5-0.5b --tokens 900 --extends "$H2" --seed 3)
	fs_fixture_save "$H1" "$H2" "$H3"
}

setup() {
	fs_fixture_load
}

teardown() {
	fs_teardown
}

# random_preads MNTDIR EXDIR N: N random (offset, length) preads over every
# file of the prefix, unaligned, across chunk and extent boundaries and EOF.
random_preads() {
	"$PY" - "$@" <<'EOF'
import os, random, sys
mnt, ex, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(1234)
names = sorted(os.listdir(ex))
want = {f: open(os.path.join(ex, f), "rb").read() for f in names}
fds = {f: os.open(os.path.join(mnt, f), os.O_RDONLY) for f in names}
cb = 8192
for i in range(n):
    f = rng.choice(names)
    size = len(want[f])
    kind = rng.randrange(4)
    if kind == 0:    # anywhere, any length
        off, ln = rng.randrange(size + 100), rng.randrange(1, 3 * 1024 * 1024)
    elif kind == 1:  # across a chunk boundary
        j = rng.randrange(1, max(2, size // cb))
        off, ln = j * cb - rng.randrange(1, 5000), rng.randrange(2, 20000)
    elif kind == 2:  # whole chunks
        j = rng.randrange(max(1, size // cb))
        off, ln = j * cb, cb * rng.randrange(1, 200)
    else:            # the tail, past EOF
        off, ln = max(0, size - rng.randrange(1, 30000)), rng.randrange(1, 60000)
    got = os.pread(fds[f], ln, off)
    if got != want[f][off:off + ln]:
        sys.exit("%s: pread(%d, %d) -> %d bytes, wrong" % (f, off, ln, len(got)))
print("ok", n)
EOF
}

@test "random pread ranges match the export (page cache)" {
	fs_mount "$STORE" "$MNT" -o cache=8M
	for h in $H1 $H3; do
		run random_preads "$MNT/by-hash/$h" "$EX/$h" 300
		assert_success
		assert_output_contains "ok 300"
	done
	fs_umount "$MNT"
}

@test "random pread ranges match the export (direct_io, small arena)" {
	fs_mount "$STORE" "$MNT" -o cache=2M,direct_io
	for h in $H2 $H3; do
		run random_preads "$MNT/by-hash/$h" "$EX/$h" 300
		assert_success
		assert_output_contains "ok 300"
	done
	fs_umount "$MNT"
}

@test "mmap of a layer file reads correctly (shared and private)" {
	fs_mount "$STORE" "$MNT"
	run "$PY" - "$MNT/by-hash/$H3" "$EX/$H3" <<'EOF'
import mmap, os, sys
mnt, ex = sys.argv[1:]
for name in ("layer_000.kv", "layer_017.kv", "tokens.bin", "manifest.json"):
    want = open(os.path.join(ex, name), "rb").read()
    with open(os.path.join(mnt, name), "rb") as f:
        for access in (mmap.ACCESS_READ, mmap.ACCESS_COPY):
            m = mmap.mmap(f.fileno(), 0, access=access)
            assert m[:] == want, (name, access)
            assert m[len(want) // 3:len(want) // 3 + 12345] == want[len(want) // 3:len(want) // 3 + 12345]
            m.close()
print("ok")
EOF
	assert_success
	assert_equal "$output" ok
	fs_umount "$MNT"
}

@test "O_DIRECT reads through the mount" {
	fs_mount "$STORE" "$MNT" -o cache=4M
	dd if="$MNT/by-hash/$H2/layer_004.kv" of="$BATS_TEST_TMPDIR/l4" bs=1M iflag=direct status=none
	cmp "$BATS_TEST_TMPDIR/l4" "$EX/$H2/layer_004.kv"
	dd if="$MNT/by-hash/$H2/layer_005.kv" of="$BATS_TEST_TMPDIR/l5" bs=64k iflag=direct status=none
	cmp "$BATS_TEST_TMPDIR/l5" "$EX/$H2/layer_005.kv"
	fs_umount "$MNT"
}

@test "concurrent readers get the right bytes" {
	fs_mount "$STORE" "$MNT" -o cache=3M,direct_io
	pids=()
	for r in 1 2 3 4; do
		(
			for l in $(seq -f '%03g' $((r * 3)) $((r * 3 + 8))); do
				cmp "$MNT/by-hash/$H3/layer_$l.kv" "$EX/$H3/layer_$l.kv" || exit 1
			done
		) &
		pids+=($!)
	done
	(random_preads "$MNT/by-hash/$H2" "$EX/$H2" 200 >/dev/null) &
	pids+=($!)
	for p in "${pids[@]}"; do
		wait "$p"
	done
	assert_equal "$(fs_stat "$MNT" checksum_failures)" 0
	assert_equal "$(fs_stat "$MNT" pinned)" 0
	fs_umount "$MNT"
}

# corrupt_store DEST: a copy of the store holding only H1 (one segment) with
# one byte of chunk 5 of layer 0 flipped; prints nothing.
corrupt_store() {
	local s=$1 seg
	"$CKV" init "$s" >/dev/null
	"$CKV" import -q "$s" "$EX/$H1" >/dev/null
	seg=$(ls "$s"/seg/*/*/layer_000.kv)
	[ "$(echo "$seg" | wc -l)" -eq 1 ]
	flip_byte "$seg" $((5 * 8192 + 100))
}

check_corrupt_reads() {
	local f=$MNT/by-hash/$H1/layer_000.kv
	run "$PY" - "$f" "$EX/$H1/layer_000.kv" <<'EOF'
import errno, os, sys
path, ref = sys.argv[1:]
want = open(ref, "rb").read()
cb = 8192
fd = os.open(path, os.O_RDONLY)
def read(off, n):
    try:
        return os.pread(fd, n, off)
    except OSError as e:
        return e.errno
assert read(5 * cb, cb) == errno.EIO, "chunk 5 must fail"
assert read(5 * cb + 4000, 10) == errno.EIO, "inside chunk 5 must fail"
assert read(4 * cb, cb) == want[4 * cb:5 * cb], "chunk 4 is fine"
assert read(6 * cb, cb) == want[6 * cb:7 * cb], "chunk 6 is fine"
assert read(0, 5 * cb) == want[:5 * cb], "chunks 0-4 are fine"
assert read(6 * cb, 20 * cb) == want[6 * cb:26 * cb], "chunks 6-25 are fine"
r = read(4 * cb + 10, 2 * cb)          # starts before the bad chunk
assert r == errno.EIO or r == want[4 * cb + 10:4 * cb + 10 + len(r)], "no wrong bytes"
print("ok")
EOF
	assert_success
	assert_equal "$output" ok
	run cat "$f"
	assert_failure
	run cmp "$MNT/by-hash/$H1/layer_001.kv" "$EX/$H1/layer_001.kv"
	assert_success
	[ "$(fs_stat "$MNT" checksum_failures)" -ge 1 ]
}

@test "a corrupt chunk: EIO for reads touching it, only it (direct_io)" {
	corrupt_store "$BATS_TEST_TMPDIR/store"
	fs_mount "$BATS_TEST_TMPDIR/store" "$MNT" -o direct_io,cache=4M
	check_corrupt_reads
	# a whole-file read returns the good bytes before the bad chunk, then EIO
	run dd if="$MNT/by-hash/$H1/layer_000.kv" of="$BATS_TEST_TMPDIR/part" bs=1M status=none
	assert_failure
	assert_output_contains "Input/output error"
	cmp -n $((5 * 8192)) "$BATS_TEST_TMPDIR/part" "$EX/$H1/layer_000.kv"
	grep -q "checksum\|mismatch\|XXH" "$BATS_TEST_TMPDIR/ckvfs.log"
	fs_umount "$MNT"
}

@test "a corrupt chunk: EIO for reads touching it, only it (page cache)" {
	corrupt_store "$BATS_TEST_TMPDIR/store"
	fs_mount "$BATS_TEST_TMPDIR/store" "$MNT" -o cache=4M
	check_corrupt_reads
	fs_umount "$MNT"
}
