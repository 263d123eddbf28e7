#!/usr/bin/env python3
"""measure_compute.py — per-layer Re-Prefill compute of Qwen2.5 models, measured on the GPU.

What is timed (docs/BENCHMARKS.md, "Re-Prefill", has the method): one decoder
layer of the real model shape — RMSNorm, q/k/v projections (with Qwen2's
biases), RoPE, attention of the suffix's queries over the attended prefix
tokens plus the suffix itself (causal inside the suffix, GQA), output
projection, RMSNorm, the SwiGLU MLP, both residual adds — in bf16, with random
weights, for `--suffix` new tokens and each number of attended prefix tokens
in the grid. Weights are random (no checkpoints exist on the machine, and the
time of dense bf16 kernels does not depend on the values); several distinct
layer instances are cycled so that weights do not stay in L2 from one call to
the next, as in a real forward pass.

Also timed, for the IMPRESS-style baseline: identification from probe heads —
3 query heads of the suffix scored against the keys of all n prefix tokens of
one KV head (q . k, summed over queries), then a top-k of the tokens.

Timing: a chain of `--chain` layer calls is captured as a CUDA graph and its
replays are timed with CUDA events (serving engines run decode and prefill
layers from graphs; timing eager launches measured Python's launch overhead,
about 0.8 ms a layer whatever the model, on the first H200 run); after
warm-up, the median over repetitions of (chain time / chain length). Output:
one JSON table, read by tools/bench-reprefill (--compute).

  python3 tools/measure_compute.py --out compute.json
  python3 tools/measure_compute.py --device cpu --models qwen2.5-0.5b --grid 0,64 --suffix 16  # smoke test
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# Qwen2.5 configurations (config.json of each checkpoint).
MODELS = {
    "qwen2.5-0.5b": dict(layers=24, hidden=896, heads=14, kv_heads=2, head_dim=64, inter=4864),
    "qwen2.5-1.5b": dict(layers=28, hidden=1536, heads=12, kv_heads=2, head_dim=128, inter=8960),
    "qwen2.5-3b": dict(layers=36, hidden=2048, heads=16, kv_heads=2, head_dim=128, inter=11008),
    "qwen2.5-7b": dict(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, inter=18944),
    "qwen2.5-14b": dict(layers=48, hidden=5120, heads=40, kv_heads=8, head_dim=128, inter=13824),
    "qwen2.5-32b": dict(layers=64, hidden=5120, heads=40, kv_heads=8, head_dim=128, inter=27648),
    "qwen2.5-72b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, inter=29568),
}
ROPE_THETA = 1000000.0
RMS_EPS = 1e-6


class Layer:
    """One Qwen2 decoder layer's weights (random, bf16)."""

    def __init__(self, cfg, dev, dtype):
        h, nh, kvh, d, it = cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["inter"]
        s = 0.02

        def w(o, i):
            return (torch.randn(o, i, device=dev, dtype=dtype) * s)

        self.wq, self.bq = w(nh * d, h), torch.randn(nh * d, device=dev, dtype=dtype) * s
        self.wk, self.bk = w(kvh * d, h), torch.randn(kvh * d, device=dev, dtype=dtype) * s
        self.wv, self.bv = w(kvh * d, h), torch.randn(kvh * d, device=dev, dtype=dtype) * s
        self.wo = w(h, nh * d)
        self.wg, self.wu, self.wd = w(it, h), w(it, h), w(h, it)
        self.n1 = torch.ones(h, device=dev, dtype=dtype)
        self.n2 = torch.ones(h, device=dev, dtype=dtype)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in vars(self).values())


def rms_norm(x, w):
    v = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(v + RMS_EPS)).to(x.dtype) * w


def rope(x, cos, sin):
    # x [heads, q, d]; rotate-half convention of Qwen2 / Llama
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def layer_forward(L, cfg, x, k_pre, v_pre, cos, sin):
    """x [q, hidden]; k_pre / v_pre [kv_heads, A, d] (the attended prefix chunks, post-RoPE)."""
    nh, kvh, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    q_len = x.shape[0]
    hs = rms_norm(x, L.n1)
    q = F.linear(hs, L.wq, L.bq).view(q_len, nh, d).transpose(0, 1)
    k = F.linear(hs, L.wk, L.bk).view(q_len, kvh, d).transpose(0, 1)
    v = F.linear(hs, L.wv, L.bv).view(q_len, kvh, d).transpose(0, 1)
    q = rope(q, cos, sin)
    k = rope(k, cos, sin)
    if k_pre is not None:
        k = torch.cat((k_pre, k), dim=1)
        v = torch.cat((v_pre, v), dim=1)
    a = ATTN[0](q, k, v, nh // kvh)
    a = a.transpose(0, 1).reshape(q_len, nh * d)
    x = x + F.linear(a, L.wo)
    hs = rms_norm(x, L.n2)
    x = x + F.linear(F.silu(F.linear(hs, L.wg)) * F.linear(hs, L.wu), L.wd)
    return x


# ---- attention of q [heads, q, d] over k, v [kv_heads, A + q, d] -------------
# suffix token i sees every prefix token and suffix tokens <= i: a causal mask
# aligned to the lower right. Implementations in order of preference; the
# first that runs and matches the float32 reference is used (recorded in the
# output as "attention").


def attn_reference(q, k, v, group):
    k = k.float().repeat_interleave(group, dim=0)
    v = v.float().repeat_interleave(group, dim=0)
    ql, kl = q.shape[1], k.shape[1]
    s = torch.matmul(q.float(), k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    keep = torch.ones(ql, kl, dtype=torch.bool, device=q.device)
    keep[:, kl - ql:] = torch.tril(torch.ones(ql, ql, dtype=torch.bool, device=q.device))
    s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v).to(q.dtype)


def attn_lower_right_gqa(q, k, v, group):
    from torch.nn.attention.bias import causal_lower_right
    m = causal_lower_right(q.shape[1], k.shape[1])
    return F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                          attn_mask=m, enable_gqa=True).squeeze(0)


def attn_lower_right_expand(q, k, v, group):
    from torch.nn.attention.bias import causal_lower_right
    m = causal_lower_right(q.shape[1], k.shape[1])
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    return F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                          attn_mask=m).squeeze(0)


def attn_bool_mask_gqa(q, k, v, group):
    ql, kl = q.shape[1], k.shape[1]
    keep = torch.ones(ql, kl, dtype=torch.bool, device=q.device)
    keep[:, kl - ql:] = torch.tril(torch.ones(ql, ql, dtype=torch.bool, device=q.device))
    return F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                          attn_mask=keep, enable_gqa=True).squeeze(0)


ATTN_IMPLS = [("sdpa causal_lower_right enable_gqa", attn_lower_right_gqa),
              ("sdpa causal_lower_right, K/V expanded to query heads", attn_lower_right_expand),
              ("sdpa boolean mask enable_gqa", attn_bool_mask_gqa),
              ("float32 reference", attn_reference)]
ATTN = [attn_reference, "float32 reference"]


def choose_attention(dev, dtype, log):
    """Pick the first implementation that runs and matches the reference (fresh random inputs)."""
    torch.manual_seed(7)
    for name, fn in ATTN_IMPLS:
        ok = True
        for heads, kvh, d, A, ql in ((8, 2, 64, 200, 48), (28, 4, 128, 1000, 256)):
            q = torch.randn(heads, ql, d, device=dev, dtype=dtype)
            k = torch.randn(kvh, A + ql, d, device=dev, dtype=dtype)
            v = torch.randn(kvh, A + ql, d, device=dev, dtype=dtype)
            try:
                out = fn(q, k, v, heads // kvh)
            except Exception as e:  # noqa: BLE001 - any failure means: try the next one
                log(f"attention: {name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                ok = False
                break
            ref = attn_reference(q, k, v, heads // kvh).float()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            if not (err < 2e-2):
                log(f"attention: {name}: relative error {err:.2e} against the reference")
                ok = False
                break
        if ok:
            log(f"attention: {name}")
            ATTN[0], ATTN[1] = fn, name
            return name
    raise SystemExit("no attention implementation works")


def probe_identify(cfg, q_probe, k_probe, k_top):
    """IMPRESS-style: 3 probe query heads' scores on one KV head's keys, top-k tokens."""
    s = torch.matmul(q_probe, k_probe.transpose(-1, -2))  # [3, q, n]
    s = s.float().sum(dim=(0, 1))
    return torch.topk(s, k_top).indices


class Timer:
    """Median seconds per call of fn(chain) / chain. On CUDA the chain is captured
    once as a CUDA graph and its replays are timed (an engine runs its layers
    from graphs too; eager launches would time Python, not the GPU); where
    capture fails, eager launches are timed and the table says so."""

    def __init__(self, dev, use_graphs, log):
        self.dev = dev
        self.use_graphs = use_graphs and dev.type == "cuda"
        self.log = log
        self.modes = set()

    def _events(self, run, reps):
        res = []
        for _ in range(reps):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            res.append(a.elapsed_time(b) / 1000.0)
        return res

    def __call__(self, fn, chain, reps, warm):
        if self.dev.type != "cuda":
            for _ in range(warm):
                fn(chain)
            res = []
            for _ in range(reps):
                t = time.perf_counter()
                fn(chain)
                res.append(time.perf_counter() - t)
            self.modes.add("cpu wall clock")
        else:
            res = None
            if self.use_graphs:
                try:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(max(warm, 2)):
                            fn(chain)
                    torch.cuda.current_stream().wait_stream(side)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        fn(chain)
                    for _ in range(warm):
                        g.replay()
                    res = self._events(g.replay, reps)
                    self.modes.add("cuda graph replay")
                    del g
                except Exception as e:  # noqa: BLE001 - capture is optional
                    self.log(f"graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); eager")
                    torch.cuda.synchronize()
                    res = None
            if res is None:
                for _ in range(warm):
                    fn(chain)
                res = self._events(lambda: fn(chain), reps)
                self.modes.add("eager launches")
        res = [r / chain for r in res]
        return statistics.median(res), min(res), max(res)


def measure_model(name, cfg, args, dev, dtype, timer, log):
    q_len = args.suffix
    d, kvh = cfg["head_dim"], cfg["kv_heads"]
    torch.manual_seed(1)
    one = Layer(cfg, dev, dtype)
    lb = one.nbytes()
    ninst = max(2, min(cfg["layers"], math.ceil(args.l2_bytes * 4 / lb)))
    layers = [one] + [Layer(cfg, dev, dtype) for _ in range(ninst - 1)]
    grid = [a for a in args.grid if a <= args.max_tokens]
    pos0 = max(grid) if grid else 0
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    pos = torch.arange(pos0, pos0 + q_len, device=dev, dtype=torch.float32)
    fr = torch.outer(pos, inv)
    emb = torch.cat((fr, fr), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    out = {"layers": cfg["layers"], "hidden": cfg["hidden"], "heads": cfg["heads"],
           "kv_heads": kvh, "head_dim": d, "intermediate": cfg["inter"],
           "layer_weight_bytes": lb, "distinct_layers_cycled": ninst, "layer_s": [], "probe_s": []}
    x0 = torch.randn(q_len, cfg["hidden"], device=dev, dtype=dtype)
    for A in grid:
        kp = [torch.randn(kvh, A, d, device=dev, dtype=dtype) if A else None for _ in range(ninst)]
        vp = [torch.randn(kvh, A, d, device=dev, dtype=dtype) if A else None for _ in range(ninst)]

        def run(chain):
            x = x0
            for i in range(chain):
                j = i % ninst
                x = layer_forward(layers[j], cfg, x, kp[j], vp[j], cos, sin)
            return x

        # sanity: the layer output is finite (attention was checked against the reference)
        y = run(1)
        if not torch.isfinite(y).all():
            raise SystemExit(f"{name}: non-finite layer output at {A} attended tokens")
        med, lo, hi = timer(run, args.chain, args.reps, args.warmup)
        out["layer_s"].append([A, med])
        log(f"{name:13s} attended {A:6d} + suffix {q_len}: {med * 1e3:8.3f} ms/layer "
            f"(min {lo * 1e3:.3f}, max {hi * 1e3:.3f})")
        del kp, vp
    for n in args.probe_tokens:
        if n > args.max_tokens:
            continue
        qp = torch.randn(3, q_len, d, device=dev, dtype=dtype)
        kpr = [torch.randn(n, d, device=dev, dtype=dtype) for _ in range(4)]
        k_top = max(1, n // 20)

        def run_p(chain):
            r = None
            for i in range(chain):
                r = probe_identify(cfg, qp, kpr[i % 4], k_top)
            return r

        med, lo, hi = timer(run_p, args.chain, args.reps, args.warmup)
        out["probe_s"].append([n, med])
        log(f"{name:13s} probe identification over {n:6d} tokens: {med * 1e3:8.3f} ms/layer")
    del layers
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-7b,qwen2.5-14b")
    ap.add_argument("--suffix", type=int, default=256, help="new tokens (default 256)")
    ap.add_argument("--grid", default="0,256,512,1024,2048,4096,8192,16384,32768",
                    help="attended prefix tokens to measure (comma list)")
    ap.add_argument("--probe-tokens", default="4096,16384,32768")
    ap.add_argument("--max-tokens", type=int, default=1 << 30)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--chain", type=int, default=8, help="layer calls per timed chain")
    ap.add_argument("--l2-bytes", type=float, default=60e6)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-graphs", action="store_true", help="time eager launches, not graph replays")
    ap.add_argument("--out", default="-")
    args = ap.parse_args()
    args.grid = sorted({int(v) for v in args.grid.split(",") if v != ""})
    args.probe_tokens = [int(v) for v in args.probe_tokens.split(",") if v != ""]
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("measure_compute: no CUDA device", file=sys.stderr)
        return 77
    dtype = torch.bfloat16

    def log(s):
        print(s, file=sys.stderr, flush=True)

    res = {"version": 1, "what": "per-layer Re-Prefill compute of the suffix, seconds",
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": "bf16", "suffix_tokens": args.suffix,
           "timing": f"median of {args.reps} chains of {args.chain} layer calls, {args.warmup} warm-up",
           "models": {}}
    timer = Timer(dev, not args.no_graphs, log)
    with torch.inference_mode():
        res["attention"] = choose_attention(dev, dtype, log)
        for name in args.models.split(","):
            if name not in MODELS:
                print(f"measure_compute: --models {name}: unknown (known: {', '.join(MODELS)})",
                      file=sys.stderr)
                return 2
            res["models"][name] = measure_model(name, MODELS[name], args, dev, dtype, timer, log)
    res["timing"] = (f"median of {args.reps} timed chains of {args.chain} layer calls "
                     f"({', '.join(sorted(timer.modes))}), {args.warmup} warm-up")
    text = json.dumps(res, indent=1)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
