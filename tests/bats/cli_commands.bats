#!/usr/bin/env bats
# ckv CLI: every command's normal path, -h, usage errors (exit 2) and
# failures (exit 1, a message on stderr naming the file or field).

load test_helper

COMMANDS="init gen import export ls stat match hash verify rm gc reindex"

setup_file() {
	local F=$BATS_FILE_TMPDIR
	"$CKV" init "$F/store"
	gen_hash "$F/store" -m qwen2.5-0.5b -n 100 --seed 1 >"$F/p.hash"
	gen_hash "$F/store" -m qwen2.5-7b -n 40 --seed 2 >"$F/q.hash"
	"$CKV" export "$F/store" "$(cat "$F/p.hash")" "$F/p.export"
}

setup() {
	T=$BATS_TEST_TMPDIR
	F=$BATS_FILE_TMPDIR
	P=$(cat "$F/p.hash")
	Q=$(cat "$F/q.hash")
}

# A private copy of the fixture store, for tests that change it.
copy_store() {
	cp -a "$F/store" "$T/store"
}

# ---- help and top level -------------------------------------------------------

@test "ckv -h / --help / help print the command list and exit 0" {
	for h in -h --help help; do
		run -0 --separate-stderr "$CKV" $h
		assert_output_contains "usage: ckv COMMAND"
		for c in $COMMANDS; do
			assert_output_contains "  $c "
		done
		assert_stderr_empty
	done
}

@test "ckv -V prints the version and the format version" {
	run -0 "$CKV" -V
	[[ "$output" =~ ^ckv\ [0-9]+\.[0-9]+\.[0-9]+\ \(format\ 1\)$ ]] || fail "got: $output"
}

@test "ckv without a command, or with an unknown one, is a usage error (exit 2)" {
	run -2 --separate-stderr "$CKV"
	assert_stderr_contains "usage: ckv COMMAND"
	[ -z "$output" ]
	run -2 --separate-stderr "$CKV" frobnicate
	assert_stderr_contains "unknown command 'frobnicate'"
}

@test "every command: -h prints its usage on stdout and exits 0" {
	for c in $COMMANDS; do
		run -0 --separate-stderr "$CKV" "$c" -h
		assert_output_contains "usage: ckv $c"
		assert_stderr_empty
	done
}

@test "every command: an unknown option is a usage error (exit 2)" {
	for c in $COMMANDS; do
		run -2 --separate-stderr "$CKV" "$c" -Z "$F/store"
		assert_stderr_contains "ckv $c: "
		assert_stderr_contains "Try 'ckv $c -h' for help."
		[ -z "$output" ] || fail "$c: unexpected stdout: $output"
	done
	for c in gen ls stat match hash; do
		run -2 --separate-stderr "$CKV" "$c" --no-such-option "$F/store"
		assert_stderr_contains "ckv $c: "
	done
}

# ---- usage errors ----------------------------------------------------------------

# usage_case WANT-STDERR ARGS...: ckv ARGS exits 2 and says WANT-STDERR.
usage_case() {
	local want=$1
	shift
	run -2 --separate-stderr "$CKV" "$@"
	assert_stderr_contains "$want"
	assert_stderr_contains "Try 'ckv $1 -h'"
}

@test "missing or extra arguments are usage errors (exit 2)" {
	S=$F/store
	usage_case "expected one argument: STORE" init
	usage_case "expected one argument: STORE" init "$T/a" "$T/b"
	usage_case "expected one argument: STORE" gen -m qwen2.5-0.5b -n 10
	usage_case "--tokens is required" gen "$S" -m qwen2.5-0.5b
	usage_case "--model is required" gen "$S" -n 10
	usage_case "a custom model needs --layers, --kv-heads and --head-dim" gen "$S" -m my/model -n 10 --layers 2
	usage_case "expected two arguments: STORE DIR" import "$S"
	usage_case "expected two arguments: STORE DIR" import "$S" "$F/p.export" extra
	usage_case "expected three arguments: STORE HASH DIR" export "$S" "$P"
	usage_case "expected one argument: STORE" ls
	usage_case "expected one argument: STORE" ls "$S" extra
	usage_case "expected two arguments: STORE HASH" stat "$S"
	usage_case "--tokens FILE is required" match "$S" -m qwen2.5-0.5b
	usage_case "expected one argument: STORE" match -m qwen2.5-0.5b --tokens "$F/p.export/tokens.bin"
	usage_case "--model is required" match "$S" --tokens "$F/p.export/tokens.bin"
	usage_case "--tokens FILE is required" hash -m qwen2.5-0.5b
	usage_case "expected no arguments" hash -m qwen2.5-0.5b --tokens "$F/p.export/tokens.bin" extra
	usage_case "expected STORE [HASH]" verify
	usage_case "expected STORE [HASH]" verify "$S" "$P" "$Q"
	usage_case "expected STORE HASH..." rm "$S"
	usage_case "expected one argument: STORE" gc
	usage_case "expected one argument: STORE" reindex
	usage_case "expected one argument: STORE" reindex "$S" extra
}

@test "a bad hash argument is a usage error (exit 2) and changes nothing" {
	copy_store
	before=$(store_snapshot "$T/store")
	for bad in xyz "${P^^}" "${P:0:31}" "${P}0" "g${P:1}" ""; do
		usage_case "expected a prefix hash (32 lowercase hex digits)" stat "$T/store" "$bad"
		usage_case "expected a prefix hash" export "$T/store" "$bad" "$T/out"
		[ ! -e "$T/out" ] || fail "export created $T/out"
		usage_case "expected a prefix hash" rm "$T/store" "$bad"
		usage_case "expected a prefix hash" rm "$T/store" "$P" "$bad"
		usage_case "expected a prefix hash" verify "$T/store" "$bad"
		usage_case "expected a prefix hash" import -H "$bad" "$T/store" "$F/p.export"
		usage_case "expected a prefix hash" gen "$T/store" --extends "$bad" -n 10
	done
	assert_equal "$(store_snapshot "$T/store")" "$before"
}

@test "bad --tokens and shape values are usage errors (exit 2) and publish nothing" {
	"$CKV" init "$T/s"
	for n in abc 0 -5 "" 12x 1.5 99999999999 67108865; do
		usage_case "--tokens $n: expected an integer 1..67108864" gen "$T/s" -m qwen2.5-0.5b -n "$n"
	done
	usage_case "--layers: expected an integer 1..1024" gen "$T/s" -m qwen2.5-0.5b -n 10 --layers 0
	usage_case "--layers: expected an integer 1..1024" gen "$T/s" -m qwen2.5-0.5b -n 10 --layers 1025
	usage_case "--kv-heads: expected an integer 1..1024" gen "$T/s" -m qwen2.5-0.5b -n 10 --kv-heads x
	usage_case "--head-dim: expected an integer 1..4096" gen "$T/s" -m qwen2.5-0.5b -n 10 --head-dim 4097
	usage_case "--chunk: expected an integer 1..4096" gen "$T/s" -m qwen2.5-0.5b -n 10 --chunk 0
	usage_case "--dtype int4: expected bf16, fp16, fp8_e4m3 or fp32" gen "$T/s" -m qwen2.5-0.5b -n 10 --dtype int4
	usage_case "--seed -1: expected a non-negative integer" gen "$T/s" -m qwen2.5-0.5b -n 10 --seed -1
	usage_case "--plant 1.5: expected a fraction between 0 and 1" gen "$T/s" -m qwen2.5-0.5b -n 10 --plant 1.5
	usage_case "--plant 0: expected a fraction between 0 and 1" gen "$T/s" -m qwen2.5-0.5b -n 10 --plant 0
	# kv_heads x chunk x head_dim x esize past 1 GiB: caught, not overflowed
	usage_case "chunk size" gen "$T/s" -m qwen2.5-0.5b -n 10 --kv-heads 1024 --head-dim 4096 --chunk 4096 --dtype fp32
	usage_case "model: expected a non-empty printable id" gen "$T/s" --model-id "a b" --layers 1 --kv-heads 1 --head-dim 8 -n 10
	usage_case "--kv-heads: expected an integer 1..1024" match "$T/s" -m qwen2.5-0.5b --kv-heads 0 --tokens "$F/p.export/tokens.bin"
	usage_case "a custom model needs" hash -m nosuchpreset --tokens "$F/p.export/tokens.bin"
	run -0 "$CKV" ls "$T/s"
	[ -z "$output" ]
	[ "$(seg_count "$T/s")" -eq 0 ]
}

# ---- failures: exit 1, message naming the file ------------------------------------

@test "a path that is not a store fails (exit 1) naming it, for every store command" {
	mkdir "$T/plain"
	for S in "$T/missing" "$T/plain"; do
		for args in "ls" "stat $P" "verify" "gc" "reindex" "rm $P" "export $P $T/out" \
			"import $F/p.export" "gen -m qwen2.5-0.5b -n 10" \
			"match -m qwen2.5-0.5b --tokens $F/p.export/tokens.bin"; do
			set -- $args
			c=$1
			shift
			run -1 --separate-stderr "$CKV" "$c" "$S" "$@"
			assert_stderr_contains "ckv $c: $S"
			[ -z "$output" ] || fail "$c: unexpected stdout: $output"
		done
	done
	[ ! -e "$T/out" ]
	[ ! -e "$T/missing" ]
	[ -z "$(ls -A "$T/plain")" ] || fail "a command wrote into a non-store: $(ls -A "$T/plain")"
	run -1 --separate-stderr "$CKV" ls "$T/plain"
	assert_stderr_contains "not a ckv store"
}

@test "init fails (exit 1) naming the path when it cannot create the store" {
	touch "$T/file"
	run -1 --separate-stderr "$CKV" init "$T/file/store"
	assert_stderr_contains "$T/file/store"
	run -1 --separate-stderr "$CKV" init "$T/file"
	assert_stderr_contains "$T/file"
}

@test "stat, export, verify, rm of a prefix that is not stored fail (exit 1)" {
	copy_store
	absent=0123456789abcdef0123456789abcdef
	before=$(store_snapshot "$T/store")
	run -1 --separate-stderr "$CKV" stat "$T/store" "$absent"
	assert_stderr_contains "$absent: no such prefix"
	run -1 --separate-stderr "$CKV" export "$T/store" "$absent" "$T/out"
	assert_stderr_contains "$absent: no such prefix"
	[ ! -e "$T/out" ]
	run -1 --separate-stderr "$CKV" verify "$T/store" "$absent"
	assert_stderr_contains "$absent: no such prefix"
	run -1 --separate-stderr "$CKV" rm "$T/store" "$absent"
	assert_stderr_contains "$absent: no such prefix"
	run -1 --separate-stderr "$CKV" gen "$T/store" --extends "$absent" -n 10
	assert_stderr_contains "--extends: $absent: no such prefix"
	assert_equal "$(store_snapshot "$T/store")" "$before"
}

@test "export into a non-empty directory fails (exit 1) and leaves it alone" {
	mkdir "$T/out"
	echo keep >"$T/out/note"
	run -1 --separate-stderr "$CKV" export "$F/store" "$P" "$T/out"
	assert_stderr_contains "$T/out: directory is not empty"
	[ "$(ls -A "$T/out")" = note ]
	[ "$(cat "$T/out/note")" = keep ]
}

@test "import of a missing directory fails (exit 1) naming it" {
	copy_store
	before=$(store_snapshot "$T/store")
	run -1 --separate-stderr "$CKV" import "$T/store" "$T/nonexistent"
	assert_stderr_contains "ckv import: $T/nonexistent: No such file or directory"
	assert_equal "$(store_snapshot "$T/store")" "$before"
}

@test "hash and match: unreadable or malformed token files fail (exit 1) naming the file" {
	run -1 --separate-stderr "$CKV" hash -m qwen2.5-0.5b --tokens "$T/nope"
	assert_stderr_contains "$T/nope: No such file or directory"
	printf 'abcdef' >"$T/odd"
	run -1 --separate-stderr "$CKV" hash -m qwen2.5-0.5b --tokens "$T/odd"
	assert_stderr_contains "$T/odd: 2 trailing bytes"
	: >"$T/empty"
	run -1 --separate-stderr "$CKV" hash -m qwen2.5-0.5b --tokens "$T/empty"
	assert_stderr_contains "$T/empty: no tokens"
	echo "1 2 x 4" >"$T/txt"
	run -1 --separate-stderr "$CKV" hash -m qwen2.5-0.5b --tokens-txt "$T/txt"
	assert_stderr_contains "$T/txt: token 2: expected a decimal integer"
	echo "1 4294967296" >"$T/big"
	run -1 --separate-stderr "$CKV" hash -m qwen2.5-0.5b --tokens-txt "$T/big"
	assert_stderr_contains "$T/big: token 1"
	run -1 --separate-stderr "$CKV" match "$F/store" -m qwen2.5-0.5b --tokens "$T/nope"
	assert_stderr_contains "ckv match: $T/nope"
	run -1 --separate-stderr "$CKV" match "$F/store" -m qwen2.5-0.5b --tokens "$T/odd"
	assert_stderr_contains "$T/odd: 2 trailing bytes"
}

# ---- normal paths ------------------------------------------------------------------

@test "init creates the store layout; a second init leaves it as it is" {
	run -0 --separate-stderr "$CKV" init "$T/s"
	[ -z "$output" ]
	assert_stderr_empty
	for d in index seg prefix staging; do
		[ -d "$T/s/$d" ] || fail "no $d/"
	done
	[ -f "$T/s/lock" ]
	run -0 "$CKV" ls "$T/s"
	[ -z "$output" ]
	h=$(gen_hash "$T/s" -m qwen2.5-0.5b -n 20)
	before=$(store_snapshot "$T/s")
	run -0 "$CKV" init "$T/s"
	assert_equal "$(store_snapshot "$T/s")" "$before"
	run -0 "$CKV" ls "$T/s"
	assert_output_contains "$h"
}

@test "hash prints FORMAT.md's known-answer chain (8.2, 8.3, 8.4)" {
	u32le $(seq 0 39) >"$T/t40"
	run -0 --separate-stderr "$CKV" hash -m qwen2.5-0.5b --tokens "$T/t40"
	assert_stderr_empty
	assert_equal "$output" "fingerprint ckv1|model=Qwen/Qwen2.5-0.5B|salt=|dtype=bf16|layers=24|kv_heads=2|head_dim=64|chunk=16
seed 0x855a0030d5ed17a4
chunk 0 16 c33c991be5e460fb11adc02e8272b7b5
chunk 1 16 1783c3b56fd56a89ef1a407411ca7ce2
chunk 2 8 a90a5bfa30e249c0930f50066c55ea3f
prefix a90a5bfa30e249c0930f50066c55ea3f"
	# the same tokens as decimal text, and from stdin
	seq 0 39 | tr '\n' ' ' >"$T/t40.txt"
	run -0 "$CKV" hash -m qwen2.5-0.5b --tokens-txt "$T/t40.txt"
	assert_output_contains "prefix a90a5bfa30e249c0930f50066c55ea3f"
	run -0 "$CKV" hash -m qwen2.5-0.5b --tokens - <"$T/t40"
	assert_output_contains "prefix a90a5bfa30e249c0930f50066c55ea3f"
	u32le $(seq 1000 1015) >"$T/t16"
	run -0 "$CKV" hash -m qwen2.5-0.5b --tokens "$T/t16"
	assert_output_contains "prefix 4113191c1608992a98cf20eafd69ba09"
	run -0 "$CKV" hash --model-id test/odd --salt tenant-a --dtype fp16 --layers 2 --kv-heads 3 --head-dim 80 --chunk 32 --tokens "$T/t40"
	assert_output_contains "fingerprint ckv1|model=test/odd|salt=tenant-a|dtype=fp16|layers=2|kv_heads=3|head_dim=80|chunk=32"
	assert_output_contains "seed 0x227d352d2498c80d"
	assert_output_contains "chunk 0 32 af50b58a98e4d2d97e6dfc04e44f62aa"
	assert_output_contains "prefix 489b15e86b10e7719dc727c18467d462"
}

@test "hash of an exported cache's tokens equals its manifest hash" {
	run -0 "$CKV" hash -m qwen2.5-0.5b --tokens "$F/p.export/tokens.bin"
	assert_output_contains "prefix $P"
	[ "$(jq -r .hash "$F/p.export/manifest.json")" = "$P" ]
}

@test "ls lists every prefix in hash order, one line each" {
	run -0 --separate-stderr "$CKV" ls "$F/store"
	assert_stderr_empty
	[ "${#lines[@]}" -eq 2 ]
	first=$(printf '%s\n' "$P" "$Q" | sort | head -1)
	[[ "${lines[0]}" == "$first "* ]] || fail "not in hash order: $output"
	pl=$(printf '%s\n' "${lines[@]}" | grep "^$P ")
	read -r h model dtype tokens chunks _ <<<"$pl"
	assert_equal "$model $dtype $tokens $chunks" "Qwen/Qwen2.5-0.5B bf16 100 7"
	ql=$(printf '%s\n' "${lines[@]}" | grep "^$Q ")
	read -r h model dtype tokens chunks _ <<<"$ql"
	assert_equal "$model $dtype $tokens $chunks" "Qwen/Qwen2.5-7B bf16 40 3"
}

@test "ls --model filters by preset name or model id" {
	run -0 "$CKV" ls "$F/store" --model qwen2.5-7b
	[ "${#lines[@]}" -eq 1 ]
	assert_output_contains "$Q"
	run -0 "$CKV" ls "$F/store" -m Qwen/Qwen2.5-0.5B
	[ "${#lines[@]}" -eq 1 ]
	assert_output_contains "$P"
	run -0 "$CKV" ls "$F/store" --model qwen/qwen2.5-0.5b
	assert_output_contains "$P"
	run -0 "$CKV" ls "$F/store" --model qwen2.5-72b
	[ -z "$output" ]
}

@test "ls --json prints an array of prefixes with shape and sizes" {
	run -0 --separate-stderr "$CKV" ls "$F/store" --json
	assert_stderr_empty
	[ "$(jq length <<<"$output")" -eq 2 ]
	assert_equal "$(jq -c --arg h "$P" '.[] | select(.hash == $h) | [.model, .dtype, .layers, .kv_heads, .head_dim, .chunk_tokens, .tokens, .chunks, .bytes, .extents]' <<<"$output")" \
		'["Qwen/Qwen2.5-0.5B","bf16",24,2,64,16,100,7,1376256,1]'
	assert_equal "$(jq -c --arg h "$Q" '.[] | select(.hash == $h) | [.layers, .kv_heads, .head_dim, .tokens, .chunks, .bytes]' <<<"$output")" \
		"[28,4,128,40,3,$((3 * 32768 * 28))]"
	[ "$(jq '.[0].created | type' <<<"$output")" = '"number"' ]
	run -0 "$CKV" ls "$F/store" --json --model qwen2.5-7b
	assert_equal "$(jq -r '[.[].hash] | join(",")' <<<"$output")" "$Q"
	"$CKV" init "$T/empty"
	run -0 "$CKV" ls "$T/empty" --json
	assert_equal "$(jq -c . <<<"$output")" "[]"
}

@test "stat shows shape, tokens, extents and bytes" {
	run -0 --separate-stderr "$CKV" stat "$F/store" "$P"
	assert_stderr_empty
	assert_output_contains "prefix      $P"
	assert_output_contains "model       Qwen/Qwen2.5-0.5B"
	assert_output_contains "shape       bf16, 24 layers, 2 kv heads, head dim 64, 16 tokens per chunk"
	assert_output_contains "chunk       8192 bytes (KV-HCD)"
	assert_output_contains "tokens      100 in 7 chunks"
	assert_output_contains "bytes       1.3 MiB (1376256)"
	assert_output_contains "shared      0 B (0)"
	assert_output_contains "extents     1"
	assert_output_contains "segment $P-0  [0, 7)"
}

@test "stat --json gives the record with extents and byte counts" {
	run -0 "$CKV" stat "$F/store" "$P" --json
	assert_equal "$(jq -c '[.hash, .tokens, .chunks, .chunk_bytes, .bytes, .bytes_shared]' <<<"$output")" \
		"[\"$P\",100,7,8192,1376256,0]"
	assert_equal "$(jq -c '.extents' <<<"$output")" "[{\"segment\":\"$P-0\",\"first\":0,\"count\":7}]"
	# on disk: at least the layer bytes, at most those plus side files and slack
	od=$(jq .bytes_on_disk <<<"$output")
	[ "$od" -ge 1376256 ] && [ "$od" -le $((1376256 + 256 * 1024)) ] || fail "bytes_on_disk $od"
}

@test "export writes the cache directory; import reads it into another store" {
	run -0 --separate-stderr "$CKV" export "$F/store" "$P" "$T/out"
	assert_stderr_empty
	[ -z "$output" ]
	want="manifest.json sums.xxh3 tokens.bin $(printf 'layer_%03d.kv ' $(seq 0 23))"
	assert_equal "$(ls "$T/out" | sort | tr '\n' ' ')" "$(tr ' ' '\n' <<<"$want" | grep . | sort | tr '\n' ' ')"
	for l in "$T"/out/layer_*.kv; do
		[ "$(stat -c %s "$l")" -eq $((7 * 8192)) ] || fail "$l size"
	done
	[ "$(stat -c %s "$T/out/tokens.bin")" -eq 400 ]
	[ "$(stat -c %s "$T/out/sums.xxh3")" -eq $((32 + 8 * 24 * 7)) ]
	[ "$(head -c 8 "$T/out/sums.xxh3")" = CKVSUMS1 ]
	"$CKV" init "$T/s2"
	run -0 --separate-stderr "$CKV" import "$T/s2" "$T/out"
	assert_stderr_empty
	assert_equal "$output" "new chunks 7  shared chunks 0  written 1.3 MiB
$P"
	run -0 "$CKV" import -q "$T/s2" "$T/out"
	assert_equal "$output" "$P"
	run -0 "$CKV" import "$T/s2" "$T/out"
	assert_equal "$output" "already stored
$P"
	run -0 "$CKV" import -H "$P" "$T/s2" "$T/out"
	assert_output_contains "$P"
	run -0 "$CKV" ls "$T/s2"
	[ "${#lines[@]}" -eq 1 ]
}

@test "export into an existing empty directory works" {
	mkdir "$T/out"
	run -0 "$CKV" export "$F/store" "$Q" "$T/out"
	[ "$(jq -r .hash "$T/out/manifest.json")" = "$Q" ]
	[ -f "$T/out/layer_027.kv" ] && [ ! -e "$T/out/layer_028.kv" ]
}

@test "match finds a stored prefix" {
	run -0 --separate-stderr "$CKV" match "$F/store" -m qwen2.5-0.5b --tokens "$F/p.export/tokens.bin"
	assert_stderr_empty
	[ "${lines[0]%% (*}" = "matched 100 of 100 tokens" ] || fail "got: $output"
	[ "${lines[1]}" = "$P" ]
}

@test "verify checks the whole store or one prefix" {
	run -0 --separate-stderr "$CKV" verify "$F/store"
	assert_stderr_empty
	assert_equal "$output" ok
	run -0 "$CKV" verify "$F/store" "$Q"
	assert_equal "$output" ok
}

@test "rm removes prefixes (several at once); gc then frees their segments" {
	copy_store
	run -0 --separate-stderr "$CKV" rm "$T/store" "$P"
	assert_stderr_empty
	run -0 "$CKV" ls "$T/store"
	[ "${#lines[@]}" -eq 1 ]
	refute_output_contains "$P"
	[ ! -e "$T/store/prefix/${P:0:2}/$P.json" ]
	run -1 "$CKV" stat "$T/store" "$P"
	run -0 "$CKV" gen -q "$T/store" -m qwen2.5-0.5b -n 30 --seed 9
	R=$output
	run -0 "$CKV" rm "$T/store" "$Q" "$R"
	run -0 "$CKV" ls "$T/store"
	[ -z "$output" ]
	[ -z "$(find "$T/store/prefix" -type f)" ]
	[ "$(seg_count "$T/store")" -eq 3 ]
	run -0 --separate-stderr "$CKV" gc "$T/store"
	assert_stderr_empty
	assert_output_contains "removed 3 segments, 0 staging areas, 0 stray records"
	[ "$(seg_count "$T/store")" -eq 0 ]
	# no empty shard directories left behind
	[ -z "$(find "$T/store/seg" "$T/store/prefix" -mindepth 1)" ]
}

@test "gc on a clean store removes nothing" {
	copy_store
	before=$(store_snapshot "$T/store")
	run -0 "$CKV" gc "$T/store"
	assert_equal "$output" "removed 0 segments, 0 staging areas, 0 stray records; freed 0 B (0 bytes)"
	assert_equal "$(store_snapshot "$T/store")" "$before"
}

@test "reindex rebuilds the index and reports the prefix count" {
	copy_store
	before=$("$CKV" ls "$T/store")
	run -0 --separate-stderr "$CKV" reindex "$T/store"
	assert_stderr_empty
	assert_equal "$output" "indexed 2 prefixes"
	assert_equal "$("$CKV" ls "$T/store")" "$before"
}

@test "key copies: an import that reads the layers back for them writes the same keyq.bin" {
	"$CKV" export "$F/store" "$P" "$T/exp"
	"$CKV" init "$T/a"
	"$CKV" init "$T/b"
	"$CKV" import -q "$T/a" "$T/exp"
	CKV_TEST_KEYQ_READBACK=1 "$CKV" import -q "$T/b" "$T/exp"
	a=$(cd "$T/a" && find seg -name keyq.bin)
	[ -n "$a" ]
	for f in $a; do
		cmp "$T/a/$f" "$T/b/$f"
	done
}

@test "reindex writes the key copies of segments that have none, as an import writes them" {
	copy_store
	mkdir "$T/orig"
	n=0
	for f in "$T"/store/seg/*/*/keyq.bin; do
		n=$((n + 1))
		cp "$f" "$T/orig/$n"
		rm -f "$f"
	done
	[ "$n" -ge 2 ]
	run -0 --separate-stderr "$CKV" reindex "$T/store"
	assert_equal "$output" "indexed 2 prefixes
wrote key copies (keyq.bin) for $n segments"
	n=0
	for f in "$T"/store/seg/*/*/keyq.bin; do
		n=$((n + 1))
		cmp "$f" "$T/orig/$n"
	done
	[ -z "$(find "$T/store/seg" -name '*.tmp')" ]
	# nothing left to write: the plain answer again
	run -0 "$CKV" reindex "$T/store"
	assert_equal "$output" "indexed 2 prefixes"
	run -0 "$CKV" verify "$T/store"
}
