"""Loader through a ckvfs daemon: fetch random chunk sets and compare bytes.

usage: loader_daemon_check.py MNT EXPORT_DIR HASH MODE [ROUNDS]
MODE: check  - every part of random chunk sets equals the exported layer files
      hold   - fetch forever (for kill -9 tests); prints "fetching" once started
Backend: $CKV_TEST_BACKEND (host, or cuda with torch CUDA tensors).
"""
import os
import random
import sys

import numpy as np

from ckv.loader import Loader

mnt, exp, h, mode = sys.argv[1:5]
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 20
backend = os.environ.get("CKV_TEST_BACKEND", "host")
torch = None
if backend == "cuda":
    import torch

with Loader(mnt, backend=backend) as ld:
    assert ld.remote, "the loader did not connect to the daemon"
    with ld.open(h) as p:
        s = p.shape
        rng = random.Random(os.getpid())
        layers = [np.fromfile(os.path.join(exp, "layer_%03d.kv" % l), dtype=np.uint8)
                  for l in range(s.layers)]
        if mode == "hold":
            print("fetching", flush=True)
        n_done = 0
        while mode == "hold" or n_done < rounds:
            l = rng.randrange(s.layers)
            chunks = sorted(rng.sample(range(s.chunks), rng.randint(1, min(64, s.chunks))))
            part = rng.choice(["kv", "k", "v"])
            per = s.chunk_bytes if part == "kv" else s.half_bytes
            off = 0 if part != "v" else s.half_bytes
            if torch is not None:
                out = torch.empty((len(chunks), per), dtype=torch.uint8, device="cuda")
                got = p.fetch(l, chunks, part, out=out).cpu().numpy()
            else:
                got = p.fetch(l, chunks, part, out=np.empty((len(chunks), per), np.uint8))
            for i, c in enumerate(chunks):
                want = layers[l][c * s.chunk_bytes + off: c * s.chunk_bytes + off + per]
                if not np.array_equal(got[i], want):
                    sys.exit(f"layer {l} chunk {c} part {part}: bytes differ from the export")
            n_done += 1
        st = ld.stats()
        print(f"ok: {n_done} fetches, stats {st}")
