#!/usr/bin/env bats
# The Python reference (gpu/python/ckv/format.py) and the C tools agree:
# a cache written by Python imports, hashes and exports byte-identically.

setup() {
	CKV="${CKV_BUILD:-$BATS_TEST_DIRNAME/../../build}/ckv"
	PY=/usr/bin/python3
	"$PY" -c 'import xxhash' 2>/dev/null || skip "/usr/bin/python3 has no xxhash module (python3-xxhash)"
	export PYTHONPATH="$BATS_TEST_DIRNAME/../../gpu/python${PYTHONPATH:+:$PYTHONPATH}"
	T="$BATS_TEST_TMPDIR"
}

# py_write DIR PRESET NTOKENS [nosums]: write an exported cache with the Python
# writer (no numpy needed) and print Python's prefix_hash. Token i is
# 7*i+3; the K/V rows depend only on (layer, K|V, head, token), so a longer
# prefix has the same data for the tokens it shares with a shorter one.
py_write() {
	"$PY" - "$@" <<'EOF'
import struct, sys, xxhash
import ckv.format as F
d, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sums = not (len(sys.argv) > 4 and sys.argv[4] == "nosums")
g = F.preset(name)
toks = [(7 * i + 3) & 0xFFFFFFFF for i in range(n)]
rowb = g.head_dim * g.esize
def rows(l, part):
    out = bytearray()
    for h in range(g.kv_heads):
        for t in range(n):
            r = b"".join(xxhash.xxh3_128(struct.pack("<4I", l, part, h, t), seed=k).digest()
                         for k in range((rowb + 15) // 16))
            out += r[:rowb]
    return bytes(out)
h = F.write_export(d, g, toks, lambda l: (rows(l, 0), rows(l, 1)), sums=sums)
assert h == F.prefix_hash(g, toks)
print(F.prefix_hash(g, toks))
EOF
}

# same_dir A B: same file names, every file byte-identical
same_dir() {
	[ "$(cd "$1" && ls -A | sort)" = "$(cd "$2" && ls -A | sort)" ] || {
		echo "file lists differ: $1: $(cd "$1" && ls -A | tr '\n' ' ') / $2: $(cd "$2" && ls -A | tr '\n' ' ')"
		return 1
	}
	local f
	for f in "$1"/*; do
		cmp "$f" "$2/$(basename "$f")" || return 1
	done
}

@test "format.py: Python cache imports with the Python hash and exports byte-identically" {
	pyhash=$(py_write "$T/src" qwen2.5-0.5b 100)
	[ ${#pyhash} -eq 32 ]
	"$CKV" init "$T/store"
	hash=$("$CKV" import -q "$T/store" "$T/src")
	echo "ckv: $hash python: $pyhash"
	[ "$hash" = "$pyhash" ]
	"$CKV" export "$T/store" "$hash" "$T/out"
	same_dir "$T/src" "$T/out"
	# and the Python reader accepts what C exported
	"$PY" -c 'import sys, ckv.format as F; g, t, l = F.read_export(sys.argv[1]); assert len(t) == 100 and len(l) == 24' "$T/out"
}

@test "format.py: import without sums.xxh3; export writes the same sums as Python" {
	py_write "$T/full" qwen2.5-0.5b 40 >/dev/null
	pyhash=$(py_write "$T/src" qwen2.5-0.5b 40 nosums)
	[ ! -e "$T/src/sums.xxh3" ]
	"$CKV" init "$T/store"
	hash=$("$CKV" import -q "$T/store" "$T/src")
	[ "$hash" = "$pyhash" ]
	"$CKV" export "$T/store" "$hash" "$T/out"
	same_dir "$T/full" "$T/out"
}

@test "format.py: an extended prefix (shared chunks) exports byte-identically" {
	h1=$(py_write "$T/a" qwen2.5-0.5b 100)
	h2=$(py_write "$T/b" qwen2.5-0.5b 150)
	"$CKV" init "$T/store"
	[ "$("$CKV" import -q "$T/store" "$T/a")" = "$h1" ]
	[ "$("$CKV" import -q "$T/store" "$T/b")" = "$h2" ]
	"$CKV" export "$T/store" "$h1" "$T/out1"
	"$CKV" export "$T/store" "$h2" "$T/out2"
	same_dir "$T/a" "$T/out1"
	same_dir "$T/b" "$T/out2"
}

@test "format.py: Python reads a prefix straight from the store's files" {
	h1=$(py_write "$T/a" qwen2.5-0.5b 100)
	h2=$(py_write "$T/b" qwen2.5-0.5b 150)
	"$CKV" init "$T/store"
	"$CKV" import -q "$T/store" "$T/a" >/dev/null
	"$CKV" import -q "$T/store" "$T/b" >/dev/null
	"$PY" - "$T/store" "$h1" "$T/a" "$h2" "$T/b" <<'EOF'
import sys, ckv.format as F
store = sys.argv[1]
for h, d in ((sys.argv[2], sys.argv[3]), (sys.argv[4], sys.argv[5])):
    gs, ts, ls = F.read_store_prefix(store, h)
    ge, te, le = F.read_export(d)
    assert gs == ge, (gs, ge)
    assert ts == te, "tokens differ for %s" % h
    for i, (a, b) in enumerate(zip(ls, le)):
        assert a == b, "layer %d differs for %s" % (i, h)
EOF
}

@test "format.py: ckv hash agrees with Python (fingerprint, seed, chain, prefix)" {
	for n in 1 16 40 1000; do
		"$PY" -c 'import struct, sys; n = int(sys.argv[2]); open(sys.argv[1], "wb").write(struct.pack("<%dI" % n, *[(2654435761 * i) & 0xFFFFFFFF for i in range(n)]))' "$T/tok$n" "$n"
		"$CKV" hash --model qwen2.5-0.5b --tokens "$T/tok$n" >"$T/c$n"
		"$PY" - "$T/tok$n" >"$T/p$n" <<'EOF'
import sys, ckv.format as F
g = F.preset("qwen2.5-0.5b")
tb = open(sys.argv[1], "rb").read()
print("fingerprint %s" % g.fingerprint)
print("seed 0x%016x" % g.seed)
for j, h in enumerate(F.chain(g, tb)):
    print("chunk %d %s" % (j, h.hex()))
print("prefix %s" % F.prefix_hash(g, tb))
EOF
		cat "$T/c$n"
		# last line: the prefix hash
		[ "$(tail -n 1 "$T/c$n")" = "$(tail -n 1 "$T/p$n")" ]
		# fingerprint and seed lines (hex case-insensitive)
		[ "$(grep '^fingerprint ' "$T/c$n")" = "$(grep '^fingerprint ' "$T/p$n")" ]
		[ "$(grep '^seed ' "$T/c$n" | tr A-F a-f)" = "$(grep '^seed ' "$T/p$n")" ]
		# chunk lines: index and hash (the token-count field is not compared)
		[ "$(awk '$1 == "chunk" { print $2, tolower($4) }' "$T/c$n")" = \
		  "$(awk '$1 == "chunk" { print $2, $3 }' "$T/p$n")" ]
	done
}
