#!/usr/bin/env bats
# ckv match: longest stored prefix of a token sequence, O(log m) look-ups.

load test_helper

# a small custom shape for long prefixes: one layer, chunk_bytes 4096
MS="--model-id test/match --layers 1 --kv-heads 1 --head-dim 8"

setup_file() {
	local F=$BATS_FILE_TMPDIR S=$BATS_FILE_TMPDIR/s h
	"$CKV" init "$S"
	h=$(gen_hash "$S" -m qwen2.5-0.5b -n 500 --seed 1)
	echo "$h" >"$F/a.hash"
	"$CKV" export "$S" "$h" "$F/e" && mv "$F/e/tokens.bin" "$F/a.tok" && rm -rf "$F/e"
	h=$(gen_hash "$S" --extends "$h" -n 300)
	echo "$h" >"$F/ac.hash"
	"$CKV" export "$S" "$h" "$F/e" && mv "$F/e/tokens.bin" "$F/ac.tok" && rm -rf "$F/e"
	h=$(gen_hash "$S" $MS -n 4100 --seed 2)
	echo "$h" >"$F/b.hash"
	"$CKV" export "$S" "$h" "$F/e" && mv "$F/e/tokens.bin" "$F/b.tok" && rm -rf "$F/e"
	h=$(gen_hash "$S" $MS -n 20000 --seed 3)
	echo "$h" >"$F/l.hash"
	"$CKV" export "$S" "$h" "$F/e" && mv "$F/e/tokens.bin" "$F/l.tok" && rm -rf "$F/e"
}

setup() {
	T=$BATS_TEST_TMPDIR
	F=$BATS_FILE_TMPDIR
	S=$F/s
	A=$(cat "$F/a.hash")
	AC=$(cat "$F/ac.hash")
	B=$(cat "$F/b.hash")
	LH=$(cat "$F/l.hash")
}

# ff N: N tokens 0xffffffff (never produced by ckv gen)
ff() {
	head -c $((4 * $1)) /dev/zero | tr '\0' '\377'
}

# expect_match WANT-MATCHED WANT-N WANT-HASH[|OTHER-HASH...] MATCH-ARGS...
# (where several stored prefixes share the matched tokens, any of them is right)
expect_match() {
	local m=$1 n=$2 h=$3
	shift 3
	run -0 --separate-stderr "$CKV" match "$S" "$@"
	assert_stderr_empty
	[[ "${lines[0]}" =~ ^matched\ $m\ of\ $n\ tokens\ \(([0-9]+)\ look-ups\)$ ]] || fail "want $m of $n; got: $output"
	LOOKUPS=${BASH_REMATCH[1]}
	[[ "|$h|" == *"|${lines[1]}|"* ]] || fail "want hash $h; got: $output"
	[ "${#lines[@]}" -eq 2 ]
}

@test "match: the exact stored prefix" {
	expect_match 500 500 "$A" -m qwen2.5-0.5b --tokens "$F/a.tok"
	expect_match 800 800 "$AC" -m qwen2.5-0.5b --tokens "$F/ac.tok"
	expect_match 4100 4100 "$B" $MS --tokens "$F/b.tok"
}

@test "match: a longer query matches the stored length" {
	{ cat "$F/a.tok"; ff 37; } >"$T/q"
	expect_match 500 537 "$A" -m qwen2.5-0.5b --tokens "$T/q"
	{ cat "$F/ac.tok"; ff 1000; } >"$T/q2"
	expect_match 800 1800 "$AC" -m qwen2.5-0.5b --tokens "$T/q2"
}

@test "match: the longest of several stored prefixes wins" {
	# the parent (500) and its extension (800) share 31 full chunks
	head -c $((600 * 4)) "$F/ac.tok" >"$T/q"
	# 37 full chunks of the child; nothing stored ends inside chunk 37
	expect_match 592 600 "$AC" -m qwen2.5-0.5b --tokens "$T/q"
	{ head -c $((500 * 4)) "$F/ac.tok"; ff 10; } >"$T/q2"
	# the parent ends at 500 (a partial chunk of 4 tokens): its tail matches exactly
	expect_match 500 510 "$A" -m qwen2.5-0.5b --tokens "$T/q2"
}

@test "match: a query that diverges mid-chunk matches the full chunks before" {
	# token 205 differs: chunk 12 (tokens 192..207) differs, chunks 0..11 match
	{ head -c $((205 * 4)) "$F/a.tok"; ff 1; tail -c +$((206 * 4 + 1)) "$F/a.tok"; } >"$T/q"
	[ "$(stat -c %s "$T/q")" -eq 2000 ]
	expect_match 192 500 "$A|$AC" -m qwen2.5-0.5b --tokens "$T/q"
	# diverging exactly at a chunk boundary
	{ head -c $((208 * 4)) "$F/a.tok"; ff 50; } >"$T/q2"
	expect_match 208 258 "$A|$AC" -m qwen2.5-0.5b --tokens "$T/q2"
}

@test "match: the partial tail (stored 4100 tokens, query 4200 sharing them)" {
	{ cat "$F/b.tok"; ff 100; } >"$T/q"
	expect_match 4100 4200 "$B" $MS --tokens "$T/q"
	# a query ending inside the stored partial chunk matches the full chunks only
	head -c $((4099 * 4)) "$F/b.tok" >"$T/q2"
	expect_match 4096 4099 "$B" $MS --tokens "$T/q2"
	# the stored prefix's own tokens, shorter by a whole chunk
	head -c $((4084 * 4)) "$F/b.tok" >"$T/q3"
	expect_match 4080 4084 "$B" $MS --tokens "$T/q3"
}

@test "match: no stored prefix shares a token: exit 1" {
	ff 100 >"$T/q"
	run -1 --separate-stderr "$CKV" match "$S" -m qwen2.5-0.5b --tokens "$T/q"
	[[ "$output" =~ ^no\ stored\ prefix\ matches\ \([0-9]+\ look-ups\)$ ]] || fail "got: $output"
	# the first 10 tokens agree but no stored prefix ends within the first chunk
	{ head -c 40 "$F/a.tok"; ff 90; } >"$T/q2"
	run -1 "$CKV" match "$S" -m qwen2.5-0.5b --tokens "$T/q2"
	assert_output_contains "no stored prefix matches"
	# the same tokens under another geometry (another seed) match nothing
	run -1 "$CKV" match "$S" -m qwen2.5-7b --tokens "$F/a.tok"
	assert_output_contains "no stored prefix matches"
	run -1 "$CKV" match "$S" -m qwen2.5-0.5b --salt other --tokens "$F/a.tok"
	assert_output_contains "no stored prefix matches"
}

@test "match: decimal text tokens (--tokens-txt) and stdin" {
	od -An -v -tu4 "$F/a.tok" >"$T/q.txt"
	expect_match 500 500 "$A" -m qwen2.5-0.5b --tokens-txt "$T/q.txt"
	expect_match 500 500 "$A" -m qwen2.5-0.5b --tokens - <"$F/a.tok"
}

@test "match: O(log m) index look-ups on a 20000-token prefix" {
	m=1250
	log2() { awk -v x="$1" 'BEGIN { print int(log(x) / log(2)) }'; }
	# exact, whole chunks: a binary search over 1250 chunks, no tail
	expect_match 20000 20000 "$LH" $MS --tokens "$F/l.tok"
	echo "exact: $LOOKUPS look-ups"
	[ "$LOOKUPS" -le $(($(log2 $m) + 1)) ]
	# longer query with a partial tail: the search plus at most c tail look-ups
	{ cat "$F/l.tok"; ff 37; } >"$T/q"
	expect_match 20000 20037 "$LH" $MS --tokens "$T/q"
	echo "longer: $LOOKUPS look-ups"
	[ "$LOOKUPS" -le $((2 * $(log2 1253) + 16 + 2)) ]
	# diverging at chunk 700
	{ head -c $((700 * 16 * 4 + 20)) "$F/l.tok"; ff 5000; } >"$T/q2"
	expect_match 11200 16205 "$LH" $MS --tokens "$T/q2"
	echo "diverging: $LOOKUPS look-ups"
	[ "$LOOKUPS" -le $((2 * $(log2 1013) + 16 + 2)) ]
	# a miss costs O(log m) too (the search, then the partial runs of chunk 0)
	ff 20000 >"$T/q3"
	run -1 "$CKV" match "$S" $MS --tokens "$T/q3"
	[[ "$output" =~ \(([0-9]+)\ look-ups\) ]]
	echo "miss: ${BASH_REMATCH[1]} look-ups"
	[ "${BASH_REMATCH[1]}" -le $((2 * $(log2 $m) + 16 + 2)) ]
}
