#!/usr/bin/env bats
# ckvfs write side for engines: a C program and a Python engine write a new
# cache file by file into import/<name>/ and find it published under
# by-hash/<hash>/ (no cp, no rsync: plain open / write / close by path).

load fs_write_helper

setup() {
	fs_require
	DST=$BATS_TEST_TMPDIR/dst
	MNT=$BATS_TEST_TMPDIR/mnt
	"$CKV" init "$DST" >/dev/null
}

teardown() {
	fs_teardown
}

@test "C: an engine writes a cache by path into import/<name>/ and reads it back from by-hash/" {
	[ -x "$CKV_BUILD/tests/test_fs_write" ] || skip "no $CKV_BUILD/tests/test_fs_write (make)"
	fsw_mount "$DST" "$MNT"
	CKV_TEST_MNT=$MNT run "$CKV_BUILD/tests/test_fs_write"
	assert_success
	h=${output#published }
	assert_equal "$(prefixes "$DST")" "$h"
	run "$CKV" verify "$DST"
	assert_success
	fs_umount "$MNT"
}

@test "Python: format.write_export into import/<name>/, then by-hash/<hash> read back" {
	"$PY" -c 'import xxhash' 2>/dev/null || skip "no python3-xxhash"
	fsw_mount "$DST" "$MNT"
	run "$PY" - "$MNT" <<'EOF'
import os, sys, time
import ckv.format as F

mnt = sys.argv[1]
g = F.preset("qwen2.5-0.5b")
tokens = [(7919 * i) % 151000 for i in range(1, 58)]  # 57 tokens: 4 chunks, the last partial
n = len(tokens)

def layer(l):  # K and V as bf16 bits, [kv_heads][n][head_dim], little-endian bytes
    size = g.kv_heads * n * g.head_dim
    k = b"".join(((l * 31 + i) % 65000).to_bytes(2, "little") for i in range(size))
    v = b"".join(((l * 17 + 3 * i) % 65000).to_bytes(2, "little") for i in range(size))
    return k, v

h = F.write_export(os.path.join(mnt, "import", "py-engine"), g, tokens, layer)
pub = os.path.join(mnt, "by-hash", h)
deadline = time.time() + 20
while not os.path.exists(os.path.join(pub, "manifest.json")):
    assert time.time() < deadline, "%s: not published after 20 s" % pub
    time.sleep(0.05)
geom, toks, layers = F.read_export(pub)  # validates sizes, hash and every checksum
assert geom == g and list(toks) == tokens
for l in range(g.layers):
    k, v = F.layer_arrays(geom, n, layers[l])
    want_k, want_v = layer(l)
    assert k.tobytes() == want_k and v.tobytes() == want_v, "layer %d differs" % l
assert os.listdir(os.path.join(mnt, "import", "py-engine")) == []
print(h)
EOF
	assert_success
	h=${output##*$'\n'}
	assert_equal "$(prefixes "$DST")" "$h"
	assert_equal "$(fsw_state "$MNT/import/py-engine")" published
	fs_umount "$MNT"
}
