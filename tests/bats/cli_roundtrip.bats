#!/usr/bin/env bats
# import / export round trips: byte-identical files, file times kept.

load test_helper

setup() {
	T=$BATS_TEST_TMPDIR
	"$CKV" init "$T/s1"
	H=$(gen_hash "$T/s1" -m qwen2.5-0.5b -n 500 --seed 11)
	"$CKV" export "$T/s1" "$H" "$T/a"
}

# times DIR: "name mtime-seconds mtime-full" per file, sorted
times() {
	(cd "$1" && stat -c '%n %Y %y' -- * | sort)
}

@test "export -> import -> export is byte-identical, and again one level deeper" {
	"$CKV" init "$T/s2"
	run -0 "$CKV" import -q "$T/s2" "$T/a"
	assert_equal "$output" "$H"
	"$CKV" export "$T/s2" "$H" "$T/b"
	assert_same_dir "$T/a" "$T/b"
	"$CKV" init "$T/s3"
	run -0 "$CKV" import -q "$T/s3" "$T/b"
	assert_equal "$output" "$H"
	"$CKV" export "$T/s3" "$H" "$T/c"
	assert_same_dir "$T/a" "$T/c"
	# and the manifest is the canonical text
	[ "$(tail -c 2 "$T/c/manifest.json" | od -An -c | tr -d ' ')" = '}\n' ]
	assert_equal "$(jq -r 'keys_unsorted | join(",")' "$T/c/manifest.json")" \
		"format,version,model,salt,dtype,layers,kv_heads,head_dim,chunk_tokens,layout,chunk_bytes,tokens,chunks,hash"
	assert_equal "$(jq --indent 2 . "$T/c/manifest.json")" "$(cat "$T/c/manifest.json")"
}

@test "file mtimes (to the nanosecond) survive import -> export" {
	i=0
	for f in "$T"/a/*; do
		i=$((i + 1))
		touch -m -d "2021-03-04 05:06:$((i % 60)).$((100000000 + i * 7654321)) UTC" "$f"
	done
	touch -m -d "1999-12-31 23:59:59.999999999 UTC" "$T/a/manifest.json"
	before=$(times "$T/a")
	"$CKV" init "$T/s2"
	"$CKV" import -q "$T/s2" "$T/a" >/dev/null
	"$CKV" export "$T/s2" "$H" "$T/b"
	assert_equal "$(times "$T/b")" "$before"
	assert_same_dir "$T/a" "$T/b"
	# kept across a second hop too
	"$CKV" init "$T/s3"
	"$CKV" import -q "$T/s3" "$T/b" >/dev/null
	"$CKV" export "$T/s3" "$H" "$T/c"
	assert_equal "$(times "$T/c")" "$before"
}

@test "sums.xxh3 is optional on import; export writes the same sums" {
	cp -a "$T/a" "$T/nosums"
	rm "$T/nosums/sums.xxh3"
	"$CKV" init "$T/s2"
	run -0 "$CKV" import -q "$T/s2" "$T/nosums"
	assert_equal "$output" "$H"
	"$CKV" export "$T/s2" "$H" "$T/b"
	assert_same_dir "$T/a" "$T/b"
}

@test "an import into a store that holds the prefix already writes nothing" {
	before=$(store_snapshot "$T/s1")
	run -0 "$CKV" import "$T/s1" "$T/a"
	assert_equal "$output" "already stored
$H"
	assert_equal "$(store_snapshot "$T/s1")" "$before"
}

@test "a cache with a partial last chunk, odd shape and fp8 round-trips" {
	h=$(gen_hash "$T/s1" --model-id test/odd --salt s1 --layers 3 --kv-heads 3 --head-dim 80 --dtype fp8_e4m3 --chunk 7 -n 101)
	"$CKV" export "$T/s1" "$h" "$T/o1"
	"$CKV" init "$T/s2"
	run -0 "$CKV" import -q "$T/s2" "$T/o1"
	assert_equal "$output" "$h"
	"$CKV" export "$T/s2" "$h" "$T/o2"
	assert_same_dir "$T/o1" "$T/o2"
	run -0 "$CKV" verify "$T/s2"
}
