#!/bin/bash
# make demo: the main job on an embedded default.
#
# Builds a demo store under ./demo/ with a Qwen2.5-0.5B-shaped cache (a
# 4,096-token document) and its continuation (the next turn, 1,024 tokens
# more), then lists, stats (showing the shared chunks) and verifies it.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
B=${CKV_BUILD:-$top/build}
CKV="$B/ckv"
STORE=${CKV_DEMO_STORE:-$top/demo/store}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

rm -rf "$STORE" "$top/demo/export" # a run before this one left them
mkdir -p "$(dirname "$STORE")"
step "ckv init $STORE"
"$CKV" init "$STORE"

step "a 4,096-token prefix with Qwen2.5-0.5B's KV shape (24 layers, 2 KV heads, head dim 64, bf16)"
"$CKV" gen "$STORE" --model qwen2.5-0.5b --tokens 4096 --seed 7 | tee "$top/demo/.gen1"
parent=$(tail -n 1 "$top/demo/.gen1")

step "its continuation: the next turn adds 1,024 tokens; only the new chunks are written"
"$CKV" gen "$STORE" --extends "$parent" --tokens 1024 --seed 8 | tee "$top/demo/.gen2"
child=$(tail -n 1 "$top/demo/.gen2")
rm -f "$top/demo/.gen1" "$top/demo/.gen2"

step "ckv ls"
"$CKV" ls "$STORE"

step "ckv stat (the continuation shares the parent's 256 chunks)"
"$CKV" stat "$STORE" "$child"

step "bytes on disk: the parent's segment and the continuation's new chunks"
du -sh "$STORE"/seg/*/* | sed "s|$STORE/||"

step "longest-prefix match of the continuation's tokens plus a new question"
"$CKV" export "$STORE" "$child" "$top/demo/export" >/dev/null
cp "$top/demo/export/tokens.bin" "$top/demo/query.bin"
head -c 400 /dev/urandom >> "$top/demo/query.bin"
"$CKV" match "$STORE" --model qwen2.5-0.5b --tokens "$top/demo/query.bin"

step "ckv verify"
"$CKV" verify "$STORE"

for hook in "$top"/tools/demo.d/*.sh; do
	[ -e "$hook" ] || continue
	# shellcheck source=/dev/null
	. "$hook"
done
printf '\ndemo done: store in %s\n' "$STORE"
