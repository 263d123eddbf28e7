# Sourced by tools/demo.sh (STORE, child, B, step() in scope): one Re-Prefill
# pass over the demo continuation through the GPU loader (libckvgpu), embedded
# in the process — no daemon, no mount. The loader picks CUDA when a GPU is
# present and the host backend otherwise (the "dev" column says which).
if [ ! -x "$B/ckv-reprefill" ]; then
	step "loader: skipped ($B/ckv-reprefill is not built)"
	return 0
fi
step "Re-Prefill through the loader: every chunk, then 10% of each layer's chunks (period, layer, rerank)"
"$B/ckv-reprefill" -m full -m period -m layer -m rerank -b 0.1 --compute-ms 0.5 "$STORE" "$child"
echo "amp = bytes read from disk / bytes of the chunks used; full reads each chunk once (1.000)."
echo "period/layer/rerank read ahead speculatively; with these random queries most guesses miss."
