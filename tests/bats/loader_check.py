"""Checks of the Python loader binding (gpu/python/ckv/loader.py), run by
tests/bats/loader_python.bats:

    loader_check.py STORE EXPORT_DIR HASH PLANT_JSON BACKEND

STORE holds HASH (made by `ckv gen --plant`), exported to EXPORT_DIR; every
byte the binding hands out is compared with the exported layer files.
Works with torch (tensors) and without (numpy arrays); BACKEND is host or cuda.
"""
import json
import os
import sys

import numpy as np

import ckv
from ckv import loader as L

store, exp, hsh, plant_path, backend = sys.argv[1:6]
have_torch = L.torch is not None
torch = L.torch
cuda = backend == "cuda"


def host(x):
    """numpy copy of a tensor / array."""
    if have_torch and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


with open(os.path.join(exp, "manifest.json")) as f:
    man = json.load(f)
with open(plant_path) as f:
    plant = json.load(f)
layers = [np.fromfile(os.path.join(exp, "layer_%03d.kv" % l), dtype=np.uint8)
          for l in range(man["layers"])]
tokens = np.fromfile(os.path.join(exp, "tokens.bin"), dtype="<u4")

ld = L.Loader(store, backend=backend, gpu_cache_bytes=16 << 20)
assert ld.backend == backend, ld.backend
assert ld.remote is False
assert ckv.Loader is L.Loader  # exported from the package

# match
h, n = ld.match("qwen2.5-0.5b", np.concatenate([tokens, np.array([1, 2, 3], dtype="<u4")]))
assert (h, n) == (hsh, len(tokens)), (h, n)
h, n = ld.match("qwen2.5-0.5b", [5, 6, 7])
assert (h, n) == (None, 0)
try:
    ld.match("no-such-model", [1])
    raise AssertionError("bad shape accepted")
except L.CkvError as e:
    assert "no-such-model" in str(e) and e.errno == 22, e

p = ld.open(hsh)
sh = p.shape
assert sh.hash == hsh and sh.layers == man["layers"] and sh.dtype == "bf16"
assert sh.chunks == (len(tokens) + 15) // 16 and sh.chunk_bytes == man["chunk_bytes"]
cb, hb = sh.chunk_bytes, sh.half_bytes


def expect(layer, j, part):
    off = j * cb + (hb if part == "v" else 0)
    return layers[layer][off:off + (cb if part == "kv" else hb)]


# fetch: random sets, every part, given and allocated destinations
rng = np.random.default_rng(5)
for it in range(12):
    layer = int(rng.integers(sh.layers))
    part = ("kv", "k", "v")[it % 3]
    ids = np.sort(rng.choice(sh.chunks, size=int(rng.integers(1, sh.chunks // 3)), replace=False))
    if it % 2:
        out = p.fetch(layer, ids, part)
    else:
        per = cb if part == "kv" else hb
        if have_torch:
            out = torch.empty((len(ids), per), dtype=torch.uint8, device="cuda" if cuda else "cpu")
        else:
            out = np.empty((len(ids), per), dtype=np.uint8)
        assert p.fetch(layer, ids.tolist(), part, out=out) is out
    got = host(out)
    for i, j in enumerate(ids):
        assert np.array_equal(got[i], expect(layer, int(j), part)), (layer, j, part)

# errors carry the C message
for bad, what in ((lambda: p.fetch(0, [sh.chunks]), "chunk"),
                  (lambda: p.fetch(sh.layers, [0]), "layer"),
                  (lambda: ld.open("0" * 32), "not stored")):
    try:
        bad()
        raise AssertionError("accepted: " + what)
    except L.CkvError as e:
        assert what in str(e), e
if have_torch and not cuda:
    try:
        p.fetch(0, [0, 1], out=torch.empty((1, cb), dtype=torch.uint8))
        raise AssertionError("small out accepted")
    except ValueError:
        pass

# digest scores + select find the planted chunks (query [1][kv_heads][head_dim])
planted = set(plant["planted"])
for layer in range(sh.layers):
    q = np.array(plant["query"][layer], dtype=np.float32)[None]
    sc = p.digest_scores(layer, torch.from_numpy(q) if have_torch else q)
    if cuda:  # on the device too
        sd = p.digest_scores(layer, torch.from_numpy(q).cuda())
        assert np.allclose(host(sd), host(sc), rtol=1e-4, atol=1e-3)
    sel = set(L.select(sc, plant["fraction"] + 2.0 / sh.chunks).tolist())
    assert 0 in sel and sh.chunks - 1 in sel
    assert len(sel & planted) >= 0.95 * len(planted), (layer, len(sel & planted), len(planted))

# key-copy mass scores: each query row's weights sum to one over the prefix (less with the
# new tokens' keys); a CUDA query on the CUDA backend is scored on the device, to rounding alike
for layer in range(sh.layers):
    rng = np.random.default_rng(100 + layer)
    q = rng.standard_normal((3, 2 * sh.kv_heads, sh.head_dim)).astype(np.float32)
    k = rng.standard_normal((3, sh.kv_heads, sh.head_dim)).astype(np.float32)
    kc = host(p.keyq_scores(layer, torch.from_numpy(q) if have_torch else q))
    kk = host(p.keyq_scores(layer, torch.from_numpy(q) if have_torch else q,
                            torch.from_numpy(k) if have_torch else k))
    assert abs(float(np.sum(kc)) - q.shape[0] * q.shape[1]) < 1e-2, float(np.sum(kc))
    assert 0 < float(np.sum(kk)) < float(np.sum(kc))
    if cuda:
        kd = p.keyq_scores(layer, torch.from_numpy(q).cuda())
        kdk = p.keyq_scores(layer, torch.from_numpy(q).cuda(), torch.from_numpy(k).cuda())
        assert kd.is_cuda and kdk.is_cuda
        assert np.allclose(host(kd), kc, rtol=1e-3, atol=1e-6)
        assert np.allclose(host(kdk), kk, rtol=1e-3, atol=1e-6)

# the pipeline, every mode: views hold the exported bytes of ascending chunk ids
qh = 2 * sh.kv_heads
queries = [np.random.default_rng(l).standard_normal((2, qh, sh.head_dim)).astype(np.float32)
           for l in range(sh.layers)]
for mode, kw in (("full", {}), ("period", {"period": 4, "subperiod": 2}),
                 ("layer", {}), ("rerank", {"rerank": 3}),
                 ("layer", {"no_prefetch": True})):
    with p.pipeline(mode=mode, budget=0.15, q_heads=qh, q_tokens=2, **kw) as pl:
        used = 0
        for layer in range(sh.layers):
            q = queries[layer]
            v = pl.layer(layer, torch.from_numpy(q) if have_torch and layer % 2 else q)
            ids = v.chunks
            assert v.layer == layer and len(v) == len(ids)
            assert np.all(np.diff(ids.astype(np.int64)) > 0) and ids[0] == 0 and ids[-1] == sh.chunks - 1
            if mode == "full":
                assert len(ids) == sh.chunks
            rows = host(v.kv)
            assert rows.shape == (len(ids), cb) and rows.dtype == np.uint8
            for i, j in enumerate(ids):
                assert np.array_equal(rows[i], expect(layer, int(j), "kv")), (mode, layer, j)
            k, vv = v.kv_tensors()
            assert tuple(k.shape) == (len(ids), sh.kv_heads, 16, sh.head_dim)
            if have_torch:
                assert k.dtype == torch.bfloat16 and vv.dtype == torch.bfloat16
                kr = host(k.view(torch.int16)).view(np.uint16)
            else:
                kr = np.asarray(k)
            want = np.frombuffer(expect(layer, int(ids[-1]), "k").tobytes(), dtype="<u2")
            assert np.array_equal(kr[-1].reshape(-1), want)
            used += len(ids)
        st = pl.stats()
    assert st["chunks_used"] == used and st["bytes_needed"] == used * cb
    assert st["chunks_read"] == st["hits_arena"] + st["misses"]
    if mode != "rerank":  # whole chunks: a miss reads chunk_bytes
        assert st["bytes_k"] + st["bytes_v"] == st["misses"] * cb
    if mode == "full" or kw.get("no_prefetch"):  # each used chunk asked for once
        assert st["misses"] + st["hits_arena"] + st["hits_gpu"] == used, st
    print(f"{mode:7s} used {used:5d} read {st['chunks_read']:5d} gpu {st['hits_gpu']:5d} "
          f"amp {st['read_amplification']:.3f} wait {st['wait_s']:.4f}s")

# a second FULL pass comes from the GPU tier... as far as 16 MiB holds
with p.pipeline(mode="full") as pl:
    for layer in range(sh.layers):
        pl.layer(layer)
    st = pl.stats()
assert st["hits_gpu"] > 0, st
print("tier", ld.stats())

p.feedback(1, [0, 1, 2], [1.0, 2.0, 3.0])
p.prefetch(2, np.arange(5))
p.close()
ld.close()
print("ok", "torch" if have_torch else "numpy")
