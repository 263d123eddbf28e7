#!/usr/bin/env python3
"""train_tiny_qwen.py — a small Qwen2-architecture causal LM to measure ckvfs with.

No weights can be downloaded on the GPU machine, so the quality harness
(tools/quality) needs a model it can make: this trains transformers'
Qwen2ForCausalLM from scratch, byte-level (vocabulary 256), on the Python source
files of the machine's own Python installation (ckv.codedata: stdlib +
site-packages, deduplicated by content, 10% of the distinct files held out by a hash
of their content — the harness measures on those, so held-out data never overlaps
training data).

Recipe (the default; docs/QUALITY.md): 12 layers, hidden 512, 8 query heads, 2 KV
heads, head_dim 64, SwiGLU 1024, tied embeddings (26.7 M parameters); sequences of
4,096 bytes, batch 16; AdamW (0.9, 0.95), weight decay 0.1, peak lr 2e-3, 100 warm-up
steps, cosine to 10% over the run; bf16 autocast, fp32 master weights; seeded data
order and initialisation. --minutes sets a wall-clock budget (the cosine follows the
elapsed fraction); --steps makes the schedule step-based instead (reproducible step
count). The checkpoint is saved in bf16 with save_pretrained (config.json +
model.safetensors), plus train.json (settings, steps, losses, held-out bits per byte)
and data.json (roots, file counts, the held-out files with their sha1).

    python3 tools/train_tiny_qwen.py --out /tmp/tiny-qwen --minutes 4
"""
import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "gpu", "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402

import ckv.codedata as codedata  # noqa: E402


def corpus(files, max_bytes, seed):
    """uint8 array: the files' bytes, each followed by a 0 byte, in a seeded order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    parts, total = [], 0
    for i in order:
        with open(files[i][0], "rb") as f:
            b = f.read()
        parts.append(np.frombuffer(b, dtype=np.uint8))
        parts.append(np.zeros(1, dtype=np.uint8))
        total += len(b) + 1
        if total >= max_bytes:
            break
    return np.concatenate(parts)


def build_model(a):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=256, hidden_size=a.hidden, intermediate_size=a.inter,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, max_position_embeddings=2 * a.seq,
                      tie_word_embeddings=True, rms_norm_eps=1e-6, use_cache=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(a.seed)
    model = Qwen2ForCausalLM(cfg)
    try:
        model.set_attn_implementation("sdpa")
    except Exception:  # older transformers: sdpa is the default
        pass
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=4.0, help="wall-clock training budget")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (overrides --minutes)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--heldout", type=int, default=10, help="percent of distinct files held out")
    ap.add_argument("--max-mb", type=float, default=600, help="training corpus cap (MB)")
    ap.add_argument("--roots", default="", help="comma list (default: the Python installation)")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()

    t0 = time.time()
    roots = a.roots.split(",") if a.roots else codedata.default_roots()
    train_files, held = codedata.collect(roots, a.heldout)
    data = corpus(train_files, int(a.max_mb * 1e6), a.seed)
    hdata = corpus(held, int(64e6), a.seed + 1)
    print("data: %d train files (%.1f MB used), %d held out (%.1f MB); roots %s; %.1f s"
          % (len(train_files), len(data) / 1e6, len(held), sum(f[2] for f in held) / 1e6,
             roots, time.time() - t0), flush=True)

    dev = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = build_model(a).to(dev)
    nparams = sum(p.numel() for p in model.parameters())
    print("model: Qwen2ForCausalLM, %.1f M parameters" % (nparams / 1e6), flush=True)
    dd = torch.from_numpy(data).to(dev)
    hd = torch.from_numpy(hdata).to(dev)
    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    ar = torch.arange(a.seq + 1, device=dev)

    def batch(src, g, bsz):
        off = torch.randint(0, src.numel() - a.seq - 1, (bsz,), generator=g).to(dev)
        return src[off[:, None] + ar[None]].long()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), fused=dev.type == "cuda")
    model.train()
    budget = a.minutes * 60
    log, step, tstart = [], 0, time.time()
    while True:
        el = time.time() - tstart
        frac = step / a.steps if a.steps else el / budget
        if frac >= 1:
            break
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        x = batch(dd, gen, a.batch)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = Fn.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1:
            lv = loss.item()
            log.append((step, round(time.time() - tstart, 1), round(lv / math.log(2), 4)))
            print("step %d  %.0f s  train %.3f bits/byte  lr %.2e" % (step, log[-1][1], log[-1][2], lr),
                  flush=True)
    train_s = time.time() - tstart

    model.eval()
    hg = torch.Generator(device="cpu").manual_seed(a.seed + 2)
    tot = 0.0
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        for _ in range(8):
            x = batch(hd, hg, 8)
            lg = model(input_ids=x[:, :-1]).logits
            tot += Fn.cross_entropy(lg.float().reshape(-1, 256), x[:, 1:].reshape(-1)).item()
    bpb = tot / 8 / math.log(2)
    print("held-out: %.4f bits/byte (64 windows of %d bytes); %d steps in %.0f s, %.1f M tokens"
          % (bpb, a.seq, step, train_s, step * a.batch * a.seq / 1e6), flush=True)

    os.makedirs(a.out, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(a.out)
    info = {"settings": vars(a), "parameters": nparams, "steps": step, "train_seconds": train_s,
            "tokens": step * a.batch * a.seq, "heldout_bits_per_byte": bpb, "log": log,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    with open(os.path.join(a.out, "train.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(a.out, "data.json"), "w") as f:
        json.dump({"roots": roots, "heldout_percent": a.heldout, "split": "sha1(content)",
                   "train_files": len(train_files), "train_bytes": sum(x[2] for x in train_files),
                   "heldout": held}, f)
    print("saved %s" % a.out, flush=True)


if __name__ == "__main__":
    main()
