#!/usr/bin/env python3
"""CPU tests of the transformers integration's pure-Python parts (tests/bats/hf_cpu.bats).

No GPU and no transformers needed: a Qwen2-shaped stand-in model (tests/hf_tiny_model.py)
calls ckv.hf.attention the way transformers' Qwen2 does. What is covered:
  * ckv.kvcache writes the exact bytes of ckv.format.write_export (every dtype the
    format has a torch type for, padded geometry, partial last chunk) and reads them back;
  * Save -> `ckv import` -> Loader.match -> Re-Prefill through the loader's pipeline (host
    backend) in every mode: budget 1.0 reproduces the full-KV forward exactly; pruned
    budgets load ceil(budget * m) chunks per layer; a prompt equal to the stored prefix
    and a prompt that leaves it inside a chunk;
  * ckv.prune mirrors the C rules (select_topk, digest scores, exact key scores) and the
    Python-side providers choose what the loader chooses in layer, rerank and period mode.
Needs: torch, numpy, xxhash; $CKV (the ckv tool) and $CKV_LIBCKVGPU (libckvgpu.so) for
the store and loader tests (skipped without them).
"""

import math
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "gpu", "python"))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ckv.format as F  # noqa: E402
import ckv.hf as H  # noqa: E402
import ckv.kvcache as KC  # noqa: E402
import ckv.prune as P  # noqa: E402
from hf_tiny_model import TinyQwen  # noqa: E402

CKV = os.environ.get("CKV", "")
HAVE_STORE = bool(CKV) and os.access(CKV, os.X_OK)
HAVE_LOADER = bool(os.environ.get("CKV_LIBCKVGPU")) and os.path.exists(os.environ["CKV_LIBCKVGPU"])


def _loader():
    from ckv import Loader
    return Loader


class Writer(unittest.TestCase):
    def _pairs(self, g, n, seed):
        gen = torch.Generator().manual_seed(seed)
        return [(torch.randn(g.kv_heads, n, g.head_dim, generator=gen),
                 torch.randn(g.kv_heads, n, g.head_dim, generator=gen)) for _ in range(g.layers)]

    def test_layer_bytes_equal_format(self):
        for dt, H_, D, c, n in (("bf16", 2, 64, 16, 100), ("fp16", 3, 80, 32, 40),
                                ("fp32", 1, 8, 4, 6), ("bf16", 4, 16, 16, 16)):
            g = F.Geometry(model="t/w", dtype=dt, layers=1, kv_heads=H_, head_dim=D,
                           chunk_tokens=c)
            (k, v), = self._pairs(g, n, 1)
            tdt = KC.torch_dtype(dt)
            kk, vv = k.to(tdt), v.to(tdt)
            if dt == "bf16":
                ref = F.build_layer(g, n, kk.view(torch.int16).numpy().view(np.uint16),
                                    vv.view(torch.int16).numpy().view(np.uint16))
            else:
                ref = F.build_layer(g, n, kk.numpy(), vv.numpy())
            got = KC.layer_bytes(g, n, k, v)        # fp32 in, converted to dt on the way
            self.assertEqual(got.shape, (g.chunks(n), g.chunk_bytes))
            self.assertEqual(got.tobytes(), ref, "%s H=%d D=%d c=%d n=%d" % (dt, H_, D, c, n))

    def test_write_cache_equals_write_export_and_reads_back(self):
        g = F.Geometry(model="t/w2", salt="s1", dtype="bf16", layers=3, kv_heads=2,
                       head_dim=32, chunk_tokens=16)
        n = 75
        kv = self._pairs(g, n, 2)
        toks = list(range(500, 500 + n))
        d = tempfile.mkdtemp()
        try:
            h1 = KC.write_cache(os.path.join(d, "a"), g, toks, kv)
            h2 = F.write_export(os.path.join(d, "b"), g, toks,
                                [(k.bfloat16().view(torch.int16).numpy().view(np.uint16),
                                  v.bfloat16().view(torch.int16).numpy().view(np.uint16))
                                 for k, v in kv])
            self.assertEqual(h1, h2)
            self.assertEqual(h1, F.prefix_hash(g, toks))
            for f in sorted(os.listdir(os.path.join(d, "b"))):
                with open(os.path.join(d, "a", f), "rb") as fa, \
                        open(os.path.join(d, "b", f), "rb") as fb:
                    self.assertEqual(fa.read(), fb.read(), f)
            geom, t2, _ = F.read_export(os.path.join(d, "a"))
            self.assertEqual((geom, t2), (g, toks))
            back = KC.read_cache_kv(os.path.join(d, "a"))
            for (k, v), (k2, v2) in zip(kv, back):
                self.assertTrue(torch.equal(k.bfloat16(), k2))
                self.assertTrue(torch.equal(v.bfloat16(), v2))
            sub = KC.read_cache_kv(os.path.join(d, "a"), chunks=[1, 4], ntokens=70, layers=[2])
            self.assertEqual(tuple(sub[0][0].shape), (2, 16 + 6, 32))
            self.assertTrue(torch.equal(sub[0][1][:, 16:], kv[2][1][:, 64:70].bfloat16()))
        finally:
            shutil.rmtree(d)

    def test_shape_string(self):
        g = F.preset("qwen2.5-7b")
        self.assertEqual(KC.shape_string(g), "model=Qwen/Qwen2.5-7B,dtype=bf16,layers=28,"
                         "kv_heads=4,head_dim=128,chunk=16")
        self.assertTrue(KC.shape_string(g.replace(salt="t1")).endswith(",salt=t1"))
        with self.assertRaises(ValueError):
            KC.shape_string(g.replace(model="a,b"))

    def test_geometry_from_model(self):
        m = TinyQwen(layers=2, hidden=64, heads=4, kv_heads=2)
        g = H.geometry(m)
        self.assertEqual((g.model, g.dtype, g.layers, g.kv_heads, g.head_dim),
                         ("test/tiny-qwen", "fp32", 2, 2, 16))
        self.assertEqual(H.geometry(m.to(torch.bfloat16), model_id="x/y").dtype, "bf16")

    def test_install_needs_transformers(self):
        if H.transformers_available():
            self.skipTest("transformers is installed here")

        class M(object):
            config = None
        with self.assertRaises(ImportError):
            H.install(M())


class CodeData(unittest.TestCase):
    def test_split_by_content_never_overlaps(self):
        import hashlib
        import ckv.codedata as C
        d = tempfile.mkdtemp()
        try:
            for i in range(60):
                sub = os.path.join(d, "p%d" % (i % 3))
                os.makedirs(sub, exist_ok=True)
                body = ("x = %d\n" % (i % 40)) * (50 + i)      # some contents repeat
                with open(os.path.join(sub, "m%d.py" % i), "w") as f:
                    f.write(body)
            with open(os.path.join(d, "notes.txt"), "w") as f:
                f.write("not python")
            train, held = C.collect([d], heldout_percent=30)
            tr = set(h for _, h, _ in train)
            he = set(h for _, h, _ in held)
            self.assertFalse(tr & he)
            self.assertEqual(len(tr) + len(he), len(train) + len(held))   # deduplicated
            for path, h, size in train + held:
                with open(path, "rb") as f:
                    b = f.read()
                self.assertEqual((hashlib.sha1(b).hexdigest(), len(b)), (h, size))
                self.assertEqual(int(h[:8], 16) % 100 < 30, h in he)
            self.assertTrue(held and train)
            w1 = C.windows(held + train, 300, 5, seed=3)
            self.assertEqual(w1, C.windows(held + train, 300, 5, seed=3))   # seeded
            self.assertTrue(all(len(b) == 300 for _, _, b in w1))
            self.assertEqual(len(set(p for p, _, _ in w1)), len(w1))         # one per file
        finally:
            shutil.rmtree(d)


class Selection(unittest.TestCase):
    def test_select_count(self):
        self.assertEqual(P.select_count(320, 0.1), 32)
        self.assertEqual(P.select_count(10, 0.01), 2)
        self.assertEqual(P.select_count(1, 0.5), 1)
        self.assertEqual(P.select_count(7, 1.0), 7)

    def test_topk_rules(self):
        s = torch.tensor([0.0, 5, 5, float("nan"), 9, 1, 0])
        self.assertEqual(P.select_topk(s, 4 / 7).tolist(), [0, 1, 4, 6])  # tie: lower id
        self.assertEqual(P.select_topk(s, 5 / 7).tolist(), [0, 1, 2, 4, 6])
        self.assertEqual(P.select_top_p(torch.tensor([1.0, 0, 8, 1, 0, 0]), 0.7).tolist(),
                         [0, 2, 5])

    @unittest.skipUnless(HAVE_LOADER, "no $CKV_LIBCKVGPU")
    def test_topk_equals_c(self):
        from ckv.loader import select
        g = torch.Generator().manual_seed(3)
        for m in (1, 2, 3, 17, 240):
            for b in (0.01, 0.05, 0.1, 0.33, 0.5, 1.0):
                s = torch.randint(0, 6, (m,), generator=g).float()   # many ties
                if m > 4:
                    s[2] = float("nan")
                self.assertEqual(P.select_topk(s, b).tolist(), select(s, b).tolist(),
                                 "m=%d budget=%g" % (m, b))

    def test_mass_logits(self):
        torch.manual_seed(0)
        Hh, n, D, c = 2, 37, 8, 16
        ks = [torch.randn(Hh, n, D)]
        pt = P.PrefixTensors(ks, ks, n, c, 4096, Hh * c * D * 2)
        q = torch.randn(5, 4, D)
        ex = pt.exact_chunk_logits(0, q)                          # [H*S*g][m]
        qg = q.reshape(5, Hh, 2, D).permute(1, 0, 2, 3).reshape(Hh, 10, D)
        for h in range(Hh):
            for j in range(pt.m):
                lo, hi = j * c, min(n, (j + 1) * c)
                want = torch.logsumexp(qg[h] @ ks[0][h, lo:hi].T / math.sqrt(D), -1)
                self.assertTrue(torch.allclose(ex[h * 10:(h + 1) * 10, j], want, atol=1e-5))
        same = [torch.ones(Hh, n, D)]                              # identical keys: the digest is exact
        pt2 = P.PrefixTensors(same, same, n, c, 4096, 1)
        self.assertTrue(torch.allclose(pt2.digest_chunk_logits(0, q), pt2.exact_chunk_logits(0, q),
                                       atol=1e-5))
        self.assertTrue(torch.allclose(pt2.digest_chunk_logits(0, q, var=True),
                                       pt2.exact_chunk_logits(0, q), atol=1e-5))


@unittest.skipUnless(HAVE_STORE and HAVE_LOADER, "needs $CKV and $CKV_LIBCKVGPU")
class ReprefillHost(unittest.TestCase):
    """Save -> ckv import -> match -> pipeline (host backend) -> attention."""

    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.tmp = tempfile.mkdtemp()
        cls.store = os.path.join(cls.tmp, "store")
        subprocess.run([CKV, "init", cls.store], check=True, stdout=subprocess.DEVNULL)
        cls.model = TinyQwen(layers=3, hidden=64, heads=4, kv_heads=2).eval()
        cls.n = 150                                    # 10 chunks, the last partial
        cls.toks = torch.randint(0, 97, (cls.n + 29,)).tolist()
        cls.kv, _ = H.capture_kv(cls.model, cls.toks[:cls.n])
        cls.hash = H.save_prefix(cls.model, cls.toks[:cls.n], store=cls.store, kv=cls.kv)
        cls.ref = H.full_kv_logits(cls.model, cls.toks, cls.n)
        cls.Loader = _loader()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def loader(self):
        return self.Loader(self.store, backend="host")

    def test_saved_kv_is_what_attention_saw(self):
        g = H.geometry(self.model)
        geom, toks, layers = F.read_store_prefix(self.store, self.hash)
        self.assertEqual((geom, toks), (g, self.toks[:self.n]))
        for l, (k, v) in enumerate(self.kv):
            K, V = F.layer_arrays(geom, self.n, layers[l])
            self.assertTrue(np.array_equal(K, k.numpy()))
            self.assertTrue(np.array_equal(V, v.numpy()))

    def test_one_shot_equals_cache_continuation(self):
        one = self.model(torch.tensor([self.toks])).logits[:, self.n:]
        self.assertLess((one - self.ref).abs().max().item(), 1e-4)

    def test_budget_1_equals_full_kv_every_mode(self):
        with self.loader() as ld:
            for mode in ("full", "period", "layer", "rerank"):
                r = H.reprefill(self.model, self.toks, ld, mode=mode, budget=1.0)
                self.assertEqual((r.matched, r.hash), (self.n, self.hash))
                self.assertEqual(r.stats["chunks_per_layer"], [10, 10, 10])
                err = (r.logits - self.ref).abs().max().item()
                self.assertLessEqual(err, 1e-5, mode)
                self.assertEqual(r.token, int(self.ref[0, -1].argmax()))

    def test_pruned_budgets_load_the_budget(self):
        for mode in ("period", "layer", "rerank"):
            with self.loader() as ld:
                r = H.reprefill(self.model, self.toks, ld, mode=mode, budget=0.3, period=2)
            self.assertEqual(r.stats["chunks_per_layer"], [3, 3, 3], mode)
            self.assertTrue(torch.isfinite(r.logits).all())
            self.assertGreater(r.stats["bytes_read"], 0)

    def test_python_selection_mirrors_loader(self):
        g = H.geometry(self.model)
        cases = (("layer", {}, P.TopK(0.3, "linear")),
                 ("period", {"period": 2}, P.TopK(0.3, "linear", period=2)),
                 ("rerank", {"rerank": 2}, P.Rerank(0.3, r=2)))
        for mode, opts, pol in cases:
            with self.loader() as ld:
                r = H.reprefill(self.model, self.toks, ld, mode=mode, budget=0.3, **opts)
            prov = H.TensorProvider(self.kv, self.n, g, pol)
            lg = H.run_suffix(self.model, self.toks[self.n:], self.n, prov)
            self.assertLessEqual((lg - r.logits).abs().max().item(), 1e-5, mode)

    def test_tensor_provider_full_and_summary(self):
        g = H.geometry(self.model)
        for pol in (P.Full(), P.TopK(1.0, "mass", summary=True), P.TopP(1.0)):
            prov = H.TensorProvider(self.kv, self.n, g, pol)
            lg = H.run_suffix(self.model, self.toks[self.n:], self.n, prov)
            self.assertLessEqual((lg - self.ref).abs().max().item(), 1e-5, pol.name)
        prov = H.TensorProvider(self.kv, self.n, g, P.TopK(0.2, "mass", summary=True))
        lg = H.run_suffix(self.model, self.toks[self.n:], self.n, prov)
        self.assertTrue(torch.isfinite(lg).all())
        st = prov.close()
        self.assertEqual(st["chunks_per_layer"], [2, 2, 2])
        self.assertEqual(st["bytes_full"], 3 * 10 * g.chunk_bytes)

    def test_digest_and_key_scores_equal_c(self):
        from ckv.loader import key_scores
        g = H.geometry(self.model)
        pt = P.PrefixTensors([k for k, _ in self.kv], [v for _, v in self.kv], self.n, 16,
                             g.chunk_bytes, g.half_bytes)
        q = torch.randn(7, 4, 16)
        with self.loader() as ld, ld.open(self.hash) as p:
            for l in range(3):
                c = torch.as_tensor(p.digest_scores(l, q.numpy()))
                self.assertTrue(torch.allclose(c, P.linear_scores(pt.digest(l), q),
                                               rtol=1e-4, atol=1e-4))
                ids = torch.tensor([0, 3, 9])
                rows = p.fetch(l, ids.tolist(), part="k")
                ck = torch.as_tensor(key_scores(p.shape, rows, ids.tolist(), q.numpy()))
                self.assertTrue(torch.allclose(ck, P.max_key_scores(pt.ks[l], q, ids, 16, self.n),
                                               rtol=1e-4, atol=1e-4))

    def test_keyq_scores_equal_python(self):
        # the store's 3-bit key copy (keyq.bin) scored by the C loader = ckv.prune's lowbit3
        g = H.geometry(self.model)
        pt = P.PrefixTensors([k for k, _ in self.kv], [v for _, v in self.kv], self.n, 16,
                             g.chunk_bytes, g.half_bytes)
        gen = torch.Generator().manual_seed(11)
        S = 7
        for l in range(3):
            q = torch.randn(S, 4, 16, generator=gen) * 2
            ks = torch.randn(2, S, 16, generator=gen)              # [kvh][S][D]
            want = P.mass_from_logits(pt.lowbit_chunk_logits(l, q, 3),
                                      P.suffix_logits(q, ks, 2))
            alone = P.mass_from_logits(pt.lowbit_chunk_logits(l, q, 3))
            with self.loader() as ld, ld.open(self.hash) as p:
                got = torch.as_tensor(p.keyq_scores(l, q, ks.permute(1, 0, 2)))
                got0 = torch.as_tensor(p.keyq_scores(l, q))
            self.assertTrue(torch.allclose(got, want, rtol=1e-4, atol=1e-6), (l, got, want))
            self.assertTrue(torch.allclose(got0, alone, rtol=1e-4, atol=1e-6), (l, got0, alone))
            # every query row's weights sum to 1 over the prefix alone; less with the suffix
            self.assertAlmostEqual(float(got0.sum()), S * 4, places=3)
            self.assertLess(float(got.sum()), S * 4)
            # the copy is a copy: ranks agree with the exact keys' mass on most chunks
            exact = P.mass_from_logits(pt.exact_chunk_logits(l, q), P.suffix_logits(q, ks, 2))
            top = set(P.select_topk(exact, 0.3).tolist())
            self.assertGreaterEqual(len(top & set(P.select_topk(got, 0.3).tolist())), 2)

    def test_schedule_and_keyq_mirror_loader(self):
        # per-layer budgets, floor layers (chunk 0 + most recent, unidentified) and keyq
        # scores in the C layer mode choose what ckv.prune's FloorRecent(TopK lowbit3) does
        g = H.geometry(self.model)
        budgets, floor = [0.05, 0.5, 0.2], 0.05
        for score, pol in (("keyq", P.TopK(budgets, "lowbit3")),
                           ("digest", P.TopK(budgets, "linear"))):
            with self.loader() as ld:
                r = H.reprefill(self.model, self.toks, ld, mode="layer", budget=0.1,
                                budgets=budgets, floor=floor, score=score)
            self.assertEqual(r.stats["chunks_per_layer"], [2, 5, 2], score)
            self.assertEqual(r.stats["identifications"], 2, score)
            prov = H.TensorProvider(self.kv, self.n, g, P.FloorRecent(pol, budgets, floor))
            lg = H.run_suffix(self.model, self.toks[self.n:], self.n, prov)
            self.assertLessEqual((lg - r.logits).abs().max().item(), 1e-5, score)
        with self.loader() as ld, ld.open(self.hash) as p:
            with self.assertRaises(ValueError):
                p.pipeline(mode="layer", budgets=[0.1, 0.1], q_heads=4)
            with self.assertRaises(ValueError):
                p.pipeline(mode="layer", score="mass", q_heads=4)
            with self.assertRaisesRegex(Exception, "layer mode, not period"):
                p.pipeline(mode="period", budgets=budgets, q_heads=4)

    def test_prompt_equal_to_prefix_and_diverging_prompt(self):
        with self.loader() as ld:
            r = H.reprefill(self.model, self.toks[:self.n], ld, mode="layer", budget=1.0)
            self.assertEqual(r.matched, self.n - 1)
            one = self.model(torch.tensor([self.toks[:self.n]])).logits[:, -1]
            self.assertLess((r.logits[:, -1] - one).abs().max().item(), 1e-4)
            p2 = self.toks[:70] + [1, 2, 3]                 # leaves the prefix inside chunk 4
            r = H.reprefill(self.model, p2, ld, mode="layer", budget=1.0)
            self.assertEqual((r.matched, r.hash), (64, self.hash))
            one = self.model(torch.tensor([p2])).logits[:, 64:]
            self.assertLess((r.logits - one).abs().max().item(), 1e-4)
            # only the 4 chunks the prompt shares are selected and asked for, not all 10
            self.assertEqual(r.stats["chunks_per_layer"], [4, 4, 4])
            self.assertEqual(r.stats["chunks_read"], 3 * 4)
            r = H.reprefill(self.model, [5, 6, 7], ld)      # nothing stored: computed whole
            self.assertEqual(r.matched, 0)

    def test_bf16_model(self):
        m = TinyQwen(layers=2, hidden=64, heads=4, kv_heads=2, seed=5).to(torch.bfloat16).eval()
        toks = self.toks[:140]
        h = H.save_prefix(m, toks[:100], store=self.store, model_id="test/tiny-bf16")
        ref = H.full_kv_logits(m, toks, 100)
        with self.loader() as ld:
            r = H.reprefill(m, toks, ld, mode="layer", budget=1.0, model_id="test/tiny-bf16")
        self.assertEqual((r.hash, r.matched), (h, 100))
        self.assertEqual((r.logits.float() - ref.float()).abs().max().item(), 0.0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
