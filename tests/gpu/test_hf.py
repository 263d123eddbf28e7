#!/usr/bin/env python3
"""GPU test of the transformers integration (ckv.hf) with transformers' own Qwen2.

A randomly initialised Qwen2ForCausalLM (small, GQA, Qwen2's q/k/v biases) on the GPU:
  * capture_kv records exactly the post-RoPE K and V that transformers caches;
  * save_prefix -> `ckv import` stores them under the prefix hash of docs/FORMAT.md;
  * Re-Prefill through the loader's CUDA backend in every mode at budget 1.0 gives the
    logits of the transformers DynamicCache continuation (prefill of the prefix, then
    the suffix with past_key_values) — expected bit for bit, since the hook hands
    transformers' sdpa_attention_forward the same keys, values and mask; tolerances
    below — and close to the one-shot forward of the whole prompt;
  * pruned budgets load ceil(budget * m) chunks per layer and pick the first token;
  * the Python-side selection (ckv.prune) picks what the loader picks in layer mode;
  * a cache saved through a ckvfs mount's import/ area is Re-Prefilled through the
    mount (when FUSE works here).
Exit status: 0 pass, 1 fail, 77 skip (no CUDA GPU or no transformers).
Run: python3 tests/gpu/test_hf.py  (needs build/ckv and build/libckvgpu.so, or $CKV and
$CKV_LIBCKVGPU).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(SRC, "gpu", "python"))

try:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    HAVE = torch.cuda.is_available()
except ImportError:
    HAVE = False

import ckv.format as F  # noqa: E402
import ckv.kvcache as KC  # noqa: E402

# |logits - reference| bounds. Against the DynamicCache continuation the computation is
# the same (transformers' sdpa_attention_forward on equal keys, values and mask), so the
# difference is expected to be 0; the bound allows a kernel that reduces in another
# order: fp32 1e-5, bf16 0.0625 (two bf16 ulps at logits of magnitude 4-8). Against one
# forward of the whole prompt, matrix products of other shapes round differently.
TOL_CACHE = {"fp32": 1e-5, "bf16": 0.0625}
TOL_ONESHOT = {"fp32": 1e-3, "bf16": 0.25}


def small_qwen(dtype, seed=0):
    cfg = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(cfg).to("cuda", dtype).eval()
    with torch.no_grad():                      # sharper attention than the 0.02 init
        for n, p in m.named_parameters():
            if "q_proj.weight" in n or "k_proj.weight" in n:
                p.mul_(8)
    return m


@unittest.skipUnless(HAVE, "needs torch with CUDA and transformers")
class HF(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import ckv.hf as H
        cls.H = H
        from ckv import Loader
        cls.Loader = Loader
        cls.tmp = tempfile.mkdtemp(prefix="ckv-test-hf-")
        cls.store = os.path.join(cls.tmp, "store")
        subprocess.run([KC.find_ckv(), "init", cls.store], check=True, stdout=subprocess.DEVNULL)
        g = torch.Generator().manual_seed(1)
        cls.toks = torch.randint(0, 512, (437,), generator=g).tolist()
        cls.n = 390                     # 25 chunks, the last one partial (6 tokens)
        cls.models = {}
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            m = small_qwen(dt)
            H.install(m)
            kv, _ = H.capture_kv(m, cls.toks[:cls.n])
            h = H.save_prefix(m, cls.toks[:cls.n], store=cls.store, kv=kv,
                              model_id="test/qwen2-small-" + name)
            ref = H.full_kv_logits(m, cls.toks, cls.n)
            cls.models[name] = (m, kv, h, ref, "test/qwen2-small-" + name)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_capture_is_what_transformers_caches(self):
        for name, (m, kv, h, ref, mid) in self.models.items():
            with torch.no_grad():
                out = m(input_ids=torch.tensor([self.toks[:self.n]], device="cuda"), use_cache=True)
            pkv = out.past_key_values
            for l, (k, v) in enumerate(kv):
                if hasattr(pkv, "layers"):
                    ck, cv = pkv.layers[l].keys, pkv.layers[l].values
                else:
                    ck, cv = pkv.key_cache[l], pkv.value_cache[l]
                self.assertTrue(torch.equal(ck[0], k), "%s layer %d K" % (name, l))
                self.assertTrue(torch.equal(cv[0], v), "%s layer %d V" % (name, l))

    def test_stored_bytes_and_hash(self):
        for name, (m, kv, h, ref, mid) in self.models.items():
            g = self.H.geometry(m, model_id=mid)
            self.assertEqual((g.layers, g.kv_heads, g.head_dim, g.dtype), (4, 2, 32, name))
            self.assertEqual(h, F.prefix_hash(g, self.toks[:self.n]))
            geom, toks, layers = F.read_store_prefix(self.store, h)
            self.assertEqual(geom, g)
            for l in (0, 3):
                want = KC.layer_bytes(g, self.n, *kv[l]).tobytes()
                self.assertEqual(layers[l], want)

    def test_budget_1_equals_full_kv(self):
        report = []
        for name, (m, kv, h, ref, mid) in self.models.items():
            with torch.no_grad():
                one = m(input_ids=torch.tensor([self.toks], device="cuda")).logits[:, self.n:]
            e1 = (one.float() - ref.float()).abs().max().item()
            self.assertLessEqual(e1, TOL_ONESHOT[name], "%s: one-shot vs cache continuation" % name)
            with self.Loader(self.store) as ld:
                self.assertEqual(ld.backend, "cuda")
                for mode in ("full", "period", "layer", "rerank"):
                    r = self.H.reprefill(m, self.toks, ld, mode=mode, budget=1.0, model_id=mid)
                    self.assertEqual((r.hash, r.matched), (h, self.n))
                    self.assertEqual(r.stats["chunks_per_layer"], [25] * 4)
                    e = (r.logits.float() - ref.float()).abs().max().item()
                    eo = (r.logits.float() - one.float()).abs().max().item()
                    report.append("%s %s: |Re-Prefill - cache continuation| %.3g, - one-shot %.3g"
                                  % (name, mode, e, eo))
                    self.assertLessEqual(e, TOL_CACHE[name], report[-1])
                    self.assertLessEqual(eo, TOL_ONESHOT[name], report[-1])
                    self.assertEqual(r.token, int(ref[0, -1].argmax()))
        print("\n  " + "\n  ".join(report), file=sys.stderr)

    def test_pruned_budgets(self):
        m, kv, h, ref, mid = self.models["bf16"]
        for mode in ("period", "layer", "rerank"):
            with self.Loader(self.store) as ld:
                r = self.H.reprefill(m, self.toks, ld, mode=mode, budget=0.2, model_id=mid,
                                     period=2)
            self.assertEqual(r.stats["chunks_per_layer"], [5] * 4, mode)
            self.assertTrue(torch.isfinite(r.logits.float()).all())
            self.assertGreater(r.stats["bytes_read"], 0)
            agree = (r.logits[0].argmax(-1) == ref[0].argmax(-1)).float().mean().item()
            print("  %s@0.2: next-token agreement with full KV %.2f, %d bytes read"
                  % (mode, agree, r.stats["bytes_read"]), file=sys.stderr)

    def test_python_selection_mirrors_loader(self):
        import ckv.prune as P
        m, kv, h, ref, mid = self.models["fp32"]
        g = self.H.geometry(m, model_id=mid)
        with self.Loader(self.store) as ld:
            r = self.H.reprefill(m, self.toks, ld, mode="layer", budget=0.25, model_id=mid)
        prov = self.H.TensorProvider(kv, self.n, g, P.TopK(0.25, "linear"))
        lg = self.H.run_suffix(m, self.toks[self.n:], self.n, prov)
        self.assertLessEqual((lg - r.logits).abs().max().item(), 1e-4)

    def test_prompt_equal_to_prefix(self):
        m, kv, h, ref, mid = self.models["fp32"]
        with self.Loader(self.store) as ld:
            r = self.H.reprefill(m, self.toks[:self.n], ld, budget=1.0, model_id=mid)
        self.assertEqual(r.matched, self.n - 1)
        with torch.no_grad():
            one = m(input_ids=torch.tensor([self.toks[:self.n]], device="cuda")).logits[:, -1]
        self.assertLessEqual((r.logits[:, -1] - one).abs().max().item(), TOL_ONESHOT["fp32"])

    def test_through_a_mount(self):
        ckvfs = os.path.join(SRC, "build", "ckvfs")
        if not (os.access(ckvfs, os.X_OK) and os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
            self.skipTest("no ckvfs, /dev/fuse or fusermount3")
        m, kv, h, ref, mid = self.models["bf16"]
        st = os.path.join(self.tmp, "mstore")
        mnt = os.path.join(self.tmp, "mnt")
        os.makedirs(mnt)
        subprocess.run([KC.find_ckv(), "init", st], check=True, stdout=subprocess.DEVNULL)
        r = subprocess.run([ckvfs, st, mnt, "-o", "publish_delay=100"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        if r.returncode != 0:
            self.skipTest("mount failed: %s" % r.stderr.decode(errors="replace").strip())
        try:
            h2 = self.H.save_prefix(m, self.toks[:self.n], mount=mnt, kv=kv, model_id=mid)
            self.assertEqual(h2, h)
            with self.Loader(mnt) as ld:
                self.assertTrue(ld.remote)
                res = self.H.reprefill(m, self.toks, ld, mode="layer", budget=1.0, model_id=mid)
            self.assertLessEqual((res.logits.float() - ref.float()).abs().max().item(),
                                 TOL_CACHE["bf16"])
        finally:
            subprocess.run(["fusermount3", "-u", mnt])
            time.sleep(0.2)


def main():
    if not HAVE:
        print("skip: needs torch with CUDA and transformers")
        return 77
    lib = os.environ.get("CKV_LIBCKVGPU") or os.path.join(SRC, "build", "libckvgpu.so")
    if not os.path.exists(lib):
        print("skip: no %s" % lib)
        return 77
    r = unittest.main(exit=False, verbosity=2).result
    return 0 if r.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
