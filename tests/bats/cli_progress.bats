#!/usr/bin/env bats
# Progress output: on a terminal (stderr a tty) long operations show a
# progress line; piped or redirected, stderr stays clean.

load test_helper

setup_file() {
	local F=$BATS_FILE_TMPDIR h
	"$CKV" init "$F/src"
	h=$(gen_hash "$F/src" -m qwen2.5-7b -n 1000 --seed 3)
	echo "$h" >"$F/h"
	"$CKV" export "$F/src" "$h" "$F/cache"
	rm -rf "$F/src"
}

setup() {
	T=$BATS_TEST_TMPDIR
	F=$BATS_FILE_TMPDIR
	H=$(cat "$F/h")
	command -v script >/dev/null || skip "script(1) from util-linux is not installed"
	"$CKV" init "$T/s"
}

# on_tty CMD...: run CMD with stdin, stdout and stderr on a pseudo-terminal
on_tty() {
	local cmd
	printf -v cmd '%q ' "$@"
	run script -qec "$cmd" /dev/null </dev/null
}

@test "progress: import on a terminal shows a progress line on stderr" {
	on_tty "$CKV" import -q "$T/s" "$F/cache"
	[ "$status" -eq 0 ] || fail "exit $status: $output"
	assert_output_contains $'\rimport '
	assert_output_contains "100.0%"
	assert_output_contains "MiB / "
	assert_output_contains "MiB/s"
	# the line is cleared at the end, before the hash
	assert_output_contains $'\r\e[K'"$H"
	run -0 "$CKV" ls "$T/s"
	assert_output_contains "$H"
}

@test "progress: export, verify and gen on a terminal show progress too" {
	"$CKV" import -q "$T/s" "$F/cache" >/dev/null
	on_tty "$CKV" export "$T/s" "$H" "$T/out"
	[ "$status" -eq 0 ] || fail "exit $status: $output"
	assert_output_contains $'\rexport '
	assert_output_contains "100.0%"
	on_tty "$CKV" verify "$T/s"
	[ "$status" -eq 0 ] || fail "exit $status: $output"
	assert_output_contains $'\rverify '
	on_tty "$CKV" gen "$T/s" -m qwen2.5-7b -n 1000 --seed 4
	[ "$status" -eq 0 ] || fail "exit $status: $output"
	assert_output_contains $'\rimport '
}

@test "progress: piped, stderr has no progress output at all" {
	run -0 --separate-stderr "$CKV" import "$T/s" "$F/cache"
	assert_stderr_empty
	[[ "$output" != *$'\r'* ]] || fail "carriage return on stdout: $output"
	assert_output_contains "$H"
	run -0 --separate-stderr "$CKV" export "$T/s" "$H" "$T/out"
	assert_stderr_empty
	run -0 --separate-stderr "$CKV" verify "$T/s"
	assert_stderr_empty
	run -0 --separate-stderr "$CKV" gen "$T/s" -m qwen2.5-7b -n 1000 --seed 4
	assert_stderr_empty
	# stdout a terminal but stderr redirected: still no progress
	run -0 script -qec "$(printf '%q ' "$CKV" import "$T/s" "$F/cache") 2>$T/err" /dev/null </dev/null
	[ ! -s "$T/err" ] || fail "progress went to a redirected stderr: $(od -c "$T/err" | head)"
}

@test "progress: errors on a terminal are not mangled by the progress line" {
	cp -a "$F/cache" "$T/bad"
	flip_byte "$T/bad/layer_020.kv" 100
	on_tty "$CKV" import "$T/s" "$T/bad"
	[ "$status" -eq 1 ] || fail "exit $status: $output"
	assert_output_contains "ckv import: $T/bad/layer_020.kv: chunk 0 does not match its checksum"
}
