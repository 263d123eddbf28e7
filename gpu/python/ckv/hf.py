"""ckv.hf — Hugging Face transformers causal LMs (Qwen2 / Qwen2.5 family) on ckvfs.

Save a prompt prefix's KV cache into a store, then Re-Prefill a longer prompt with
only the important 16-token chunks of each layer brought in by the loader:

    import ckv.hf as ckvhf
    from ckv import Loader
    ckvhf.save_prefix(model, prefix_ids, store="/var/lib/ckv", model_id="Qwen/Qwen2.5-7B")
    with Loader("/var/lib/ckv") as ld:
        r = ckvhf.reprefill(model, prompt_ids, ld, mode="layer", budget=0.1,
                            model_id="Qwen/Qwen2.5-7B")
    r.token, r.logits, r.matched, r.stats     # first generated token, [1][S][vocab], ...

How it hooks in (docs/HF.md): ``install(model)`` registers one attention function,
``attention``, with transformers' AttentionInterface (and the sdpa mask function for
its name) and switches the model to it. With no ckv session active it *is* sdpa
(transformers' own sdpa_attention_forward on the mask transformers built), so the
model behaves as before. Inside ``capture_kv`` it records each layer's post-RoPE K
and V on their way into attention. Inside ``reprefill`` the model runs only the
suffix (position ids continuing after the prefix, no transformers cache); when a
layer reaches attention, the function hands that layer's post-RoPE queries to a
*provider* — the loader's pipeline (``LoaderProvider``: identification + chunk
reads for this layer, reads for the next ones already in flight) or an in-memory
selection (``TensorProvider``, for experiments) — gets back the selected prefix
chunks' K and V, and attends over [those tokens | the suffix] with a mask: every
loaded prefix token visible, causal within the suffix. The model code itself is
untouched; projections, RoPE, MLPs and the LM head are transformers'.

transformers is imported lazily: the pure-torch parts (the attention core, the
providers, the cache writer in ckv.kvcache, the selection rules in ckv.prune) work
without it, and CPU tests use them with a small stand-in model.
"""

import contextlib
import math
import shutil
import tempfile
import threading
from collections import namedtuple

import numpy as np
import torch

from . import format as F
from . import kvcache
from . import prune

__all__ = ["ATTN_NAME", "install", "attention", "geometry", "capture_kv", "save_prefix",
           "reprefill", "run_suffix", "full_kv_logits", "PrefixKV", "LoaderProvider",
           "TensorProvider", "ReprefillResult", "transformers_available"]

ATTN_NAME = "ckv_reprefill"

PrefixKV = namedtuple("PrefixKV", "k v bias")
"""What a provider gives one layer: k, v [kv_heads][T][head_dim] (T loaded prefix
tokens, ascending positions) and bias: None, or an additive fp32 logit bias [T] (or
[q_heads][S][T]) for tokens that stand for several (summary tokens)."""

ReprefillResult = namedtuple("ReprefillResult", "logits token matched hash stats")

_tls = threading.local()


def transformers_available():
    try:
        import transformers
    except ImportError:
        return False
    return bool(transformers.__version__)


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("ckv.hf: this needs the transformers package (pip install "
                          "transformers); the pure-torch parts work without it")
    return transformers


@contextlib.contextmanager
def _session(sess):
    prev = getattr(_tls, "session", None)
    _tls.session = sess
    try:
        yield sess
    finally:
        _tls.session = prev


# ---- attention ---------------------------------------------------------------------

def _repeat_kv(x, n):
    if n == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def _math_attention(query, key, value, mask, scaling):
    """Plain attention with an fp32 softmax: query [B][qh][S][D], key/value [B][kvh][T][D],
    mask: bool (True = attend) or float (added), broadcastable to [B][qh][S][T], or None
    for causal aligned to the last key. Returns [B][S][qh][D]."""
    g = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, g), _repeat_kv(value, g)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    s = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scale
    S, T = s.shape[-2], s.shape[-1]
    if mask is None:
        if S > 1:
            i = torch.arange(S, device=s.device)[:, None] + (T - S)
            mask = torch.arange(T, device=s.device)[None, :] <= i
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, -math.inf)
        else:
            s = s + mask.float()
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p, v.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous()


def _standard(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """What the model would do with attn_implementation="sdpa". Without a mask, the
    queries are the last ones of the keys (causal aligned to the end: a cache
    continuation), which torch's is_causal would get wrong when there are more keys."""
    S, T = query.shape[2], key.shape[2]
    if attention_mask is None and 1 < S < T:
        i = torch.arange(S, device=query.device)[:, None] + (T - S)
        attention_mask = (torch.arange(T, device=query.device)[None, :] <= i)[None, None]
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        sdpa_attention_forward = None
    if sdpa_attention_forward is not None and hasattr(torch.nn.functional,
                                                      "scaled_dot_product_attention"):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    return _math_attention(query, key, value, attention_mask, scaling), None


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention function registered as ATTN_NAME. query [1][q_heads][S][D], key and
    value [1][kv_heads][S][D] (post-RoPE); module.layer_idx names the layer. Returns
    (out [1][S][q_heads][D], None) as transformers' attention functions do."""
    sess = getattr(_tls, "session", None)
    if sess is not None:
        out = sess.attend(module, query, key, value, attention_mask, scaling)
        if out is not None:
            return out
    return _standard(module, query, key, value, attention_mask, dropout=dropout,
                     scaling=scaling, **kwargs)


def install(model):
    """Route the model's attention through ckv.hf.attention (a no-op for models that
    call it themselves: ``model.ckv_attention = True``). Idempotent."""
    if getattr(model, "ckv_attention", False):
        return model
    _require_transformers()
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    except ImportError:  # older transformers: masks are not per implementation
        pass
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        try:
            model.set_attn_implementation(ATTN_NAME)
        except Exception:  # older transformers, or one that checks names differently
            model.config._attn_implementation = ATTN_NAME
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        raise RuntimeError("ckv.hf.install: the model kept attn_implementation %r"
                           % getattr(model.config, "_attn_implementation", None))
    return model


class _Capture(object):
    """Records every layer's post-RoPE K and V; attention itself is the standard one."""

    def __init__(self):
        self.k, self.v = {}, {}

    def attend(self, module, query, key, value, mask, scaling):
        if key.shape[0] != 1:
            raise ValueError("capture_kv: one sequence at a time (batch %d)" % key.shape[0])
        self.k[module.layer_idx] = key[0]
        self.v[module.layer_idx] = value[0]
        return None


def _suffix_mask(T, S, device):
    """[1][1][S][T+S] bool: every prefix slot visible, causal within the suffix."""
    m = torch.ones(S, T + S, dtype=torch.bool, device=device)
    m[:, T:] = torch.tril(m[:, T:])
    return m[None, None]


class _Reprefill(object):
    """Attention of the suffix over what the provider loads for each layer."""

    def __init__(self, provider):
        self.provider = provider

    def attend(self, module, query, key, value, mask, scaling):
        if query.shape[0] != 1:
            raise ValueError("reprefill: one sequence at a time (batch %d)" % query.shape[0])
        l = module.layer_idx
        S = query.shape[2]
        q = query[0].transpose(0, 1)                       # [S][q_heads][D]
        pk = self.provider.layer(l, q, key[0])
        T = pk.k.shape[1]
        K = torch.cat([pk.k.to(device=key.device, dtype=key.dtype)[None], key], 2)
        V = torch.cat([pk.v.to(device=value.device, dtype=value.dtype)[None], value], 2)
        bmask = _suffix_mask(T, S, query.device)
        if pk.bias is None:
            return _standard(module, query, K, V, bmask, scaling=scaling)
        bias = pk.bias.float().to(query.device)
        fm = torch.zeros((1, 1, S, T + S), dtype=torch.float32, device=query.device)
        fm = fm.masked_fill(~bmask, -math.inf)
        if bias.dim() == 1:
            fm[..., :T] = fm[..., :T] + bias
        else:                                              # [q_heads][S][T]
            fm = fm.expand(1, query.shape[1], S, T + S).clone()
            fm[0, :, :, :T] += bias
        return _math_attention(query, K, V, fm, scaling), None


# ---- geometry, capture, save -------------------------------------------------------

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def geometry(model, model_id=None, salt="", dtype=None, chunk_tokens=16):
    """The cache geometry of a causal LM from its config: layers = num_hidden_layers,
    kv_heads = num_key_value_heads, head_dim = head_dim (or hidden_size /
    num_attention_heads), dtype = the model's (bf16, fp16, fp32) unless given, model id
    = model_id or config._name_or_path."""
    cfg = model.config
    qh = cfg.num_attention_heads
    H = getattr(cfg, "num_key_value_heads", None) or qh
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // qh
    if dtype is None:
        pdt = next(model.parameters()).dtype
        if pdt not in _DTYPE_NAMES:
            raise ValueError("model dtype %s: pass dtype= (bf16, fp16 or fp32)" % pdt)
        dtype = _DTYPE_NAMES[pdt]
    mid = model_id or getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "")
    if not mid:
        raise ValueError("model id: the config has no _name_or_path; pass model_id=")
    types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in types) or (
            getattr(cfg, "use_sliding_window", False) and not types):
        raise NotImplementedError("sliding-window layers are not supported: the cache keeps "
                                  "every token of every layer")
    return F.Geometry(model=mid, salt=salt, dtype=dtype, layers=cfg.num_hidden_layers,
                      kv_heads=H, head_dim=D, chunk_tokens=chunk_tokens)


def _device(model):
    return next(model.parameters()).device


def _ids(tokens, device):
    if isinstance(tokens, torch.Tensor):
        return tokens.reshape(1, -1).to(device=device, dtype=torch.long)
    return torch.tensor([list(map(int, tokens))], dtype=torch.long, device=device)


def capture_kv(model, tokens):
    """Run the prefill of tokens and return ([(K, V) per layer], logits of the last
    token): K and V [kv_heads][n][head_dim] post-RoPE (positions 0..n-1), in the model's
    dtype on its device — exactly what attention saw."""
    install(model)
    ids = _ids(tokens, _device(model))
    cap = _Capture()
    with torch.no_grad(), _session(cap):
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    L = model.config.num_hidden_layers
    missing = [l for l in range(L) if l not in cap.k]
    if missing:
        raise RuntimeError("capture_kv: layers %s never reached ckv.hf.attention (does this "
                           "model use transformers' AttentionInterface?)" % missing[:8])
    return [(cap.k[l], cap.v[l]) for l in range(L)], out.logits


def save_prefix(model, tokens, store=None, mount=None, export_dir=None, model_id=None, salt="",
                kv=None, fsync=False):
    """Prefill tokens and store their KV: into STORE through `ckv import` (store=), into
    a ckvfs mount through its import/ area (mount=), or only as an exported directory
    (export_dir= alone). kv: [(K, V) per layer] already captured (skips the prefill).
    Returns the prefix hash."""
    if not (store or mount or export_dir):
        raise ValueError("save_prefix: give store=, mount= or export_dir=")
    geom = geometry(model, model_id=model_id, salt=salt)
    toks = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(map(int, tokens))
    if kv is None:
        kv = capture_kv(model, toks)[0]
    if mount:
        return kvcache.publish_to_mount(mount, geom, toks, kv, fsync=True)
    d = export_dir or tempfile.mkdtemp(prefix="ckv-export-")
    try:
        h = kvcache.write_cache(d, geom, toks, kv, fsync=fsync or not store)
        if store:
            kvcache.import_cache(store, d)
        return h
    finally:
        if export_dir is None:
            shutil.rmtree(d, ignore_errors=True)


# ---- providers ---------------------------------------------------------------------

def _valid_slots(chunks, n_used, c):
    """Token slots of the (ascending) chunks that hold one of the first n_used tokens;
    the others are all at the end (only the last chunks can be partial or unused)."""
    ids = np.asarray(chunks, dtype=np.int64)
    return int(np.clip(n_used - ids * c, 0, c).sum())


class LoaderProvider(object):
    """The loader's pipeline (ckv.loader.Pipeline) as the source of each layer's chunks:
    mode "full", "period", "layer" or "rerank" at a budget; the query of each layer is
    handed to it for identification. n_used: prefix tokens this request may use (the
    stored prefix can be longer than the part of it the prompt shares)."""

    def __init__(self, prefix, n_used, mode, budget, q_heads, q_tokens, **opts):
        self.prefix, self.n_used, self.mode = prefix, n_used, mode
        self.sh = prefix.shape
        self.period = int(opts.get("period", 8))
        self.budgets, self.floor = opts.get("budgets"), float(opts.get("floor", 0.0))
        self.keyq = opts.get("score", "digest") == "keyq"
        # chunks past the tokens this request uses are never selected or read
        self.pl = prefix.pipeline(mode=mode, budget=budget, q_heads=q_heads,
                                  q_tokens=q_tokens, tokens=n_used, **opts)
        self.chunks = []
        self._stats = None

    def _needs_query(self, l):
        if self.mode == "full":
            return False
        if self.mode == "period":
            return l % self.period == 0
        if self.budgets is not None and self.budgets[l] <= self.floor:
            return False                                   # a floor layer: no identification
        return True

    def layer(self, l, q, k_suf):
        need = self._needs_query(l)
        keys = k_suf.permute(1, 0, 2) if need and self.keyq else None   # [S][kvh][D]
        view = self.pl.layer(l, q if need else None, keys)
        K, V = view.kv_tensors()                           # [n][kvh][c][D]
        n, H, c, D = K.shape
        T = _valid_slots(view.chunks, self.n_used, c)
        k = K.permute(1, 0, 2, 3).reshape(H, n * c, D)[:, :T]
        v = V.permute(1, 0, 2, 3).reshape(H, n * c, D)[:, :T]
        if k.device != q.device:
            k, v = k.to(q.device), v.to(q.device)
        self.chunks.append(len(view))
        return PrefixKV(k, v, None)

    def close(self):
        if self._stats is None:
            self._stats = self.pl.stats()
            self._stats["chunks_per_layer"] = list(self.chunks)
            self._stats["bytes_read"] = (self._stats["bytes_k"] + self._stats["bytes_v"]
                                         + self._stats["bytes_digest"])
            self.pl.close()
        return self._stats


class TensorProvider(object):
    """Prefix K and V already in memory ([kv_heads][n][head_dim] per layer) and a
    ckv.prune policy choosing the chunks: Python-side selection experiments. Bytes are
    what a store would read for the same decisions (Choice.bytes)."""

    def __init__(self, kv, n_used, geom, policy):
        self.pt = prune.PrefixTensors([k[:, :n_used] for k, _ in kv],
                                      [v[:, :n_used] for _, v in kv], n_used,
                                      geom.chunk_tokens, geom.chunk_bytes, geom.half_bytes)
        self.policy, self.geom = policy, geom
        self.bytes, self.chunks = 0, []

    def layer(self, l, q, k_suf):
        pt = self.pt
        ch = self.policy.choose(l, q, k_suf, pt)
        ids = ch.chunks.to(q.device)
        c = pt.c
        slots = (ids[:, None] * c + torch.arange(c, device=q.device)[None]).reshape(-1)
        slots = slots[slots < pt.n]
        k, v = pt.ks[l][:, slots], pt.vs[l][:, slots]
        self.bytes += ch.bytes
        self.chunks.append(len(ids))
        if not ch.summary or len(ids) == pt.m:
            return PrefixKV(k, v, None)
        keep = torch.ones(pt.m, dtype=torch.bool, device=q.device)
        keep[ids] = False
        drop = keep.nonzero().reshape(-1)
        mk = pt.digest(l)[drop].permute(1, 0, 2).to(k.dtype)      # [H][Z][D]
        mv = pt.vdigest(l)[drop].permute(1, 0, 2).to(v.dtype)
        bias = torch.cat([torch.zeros(k.shape[1], device=q.device),
                          torch.log(pt.counts[drop])])
        return PrefixKV(torch.cat([k, mk], 1), torch.cat([v, mv], 1), bias)

    def close(self):
        full = self.geom.layers * self.pt.m * self.geom.chunk_bytes
        return {"bytes_read": self.bytes, "bytes_full": full,
                "chunks_per_layer": list(self.chunks)}


# ---- Re-Prefill --------------------------------------------------------------------

def run_suffix(model, suffix, start, provider, logits_to_keep=0):
    """Forward of the suffix tokens at positions start.. with each layer's prefix KV from
    provider. Returns the logits [1][S or logits_to_keep][vocab]."""
    install(model)
    dev = _device(model)
    ids = _ids(suffix, dev)
    pos = torch.arange(start, start + ids.shape[1], device=dev)[None]
    with torch.no_grad(), _session(_Reprefill(provider)):
        out = model(input_ids=ids, position_ids=pos, use_cache=False,
                    logits_to_keep=logits_to_keep)
    return out.logits


def _check_shape(sh, geom):
    for f in ("layers", "kv_heads", "head_dim", "chunk_tokens", "dtype"):
        if getattr(sh, f) != getattr(geom, f):
            raise ValueError("prefix %s: %s is %r, the model has %r"
                             % (sh.hash, f, getattr(sh, f), getattr(geom, f)))


def reprefill(model, tokens, loader, mode="layer", budget=0.1, model_id=None, salt="",
              geom=None, logits_to_keep=0, **pipeline_opts):
    """Re-Prefill of a prompt whose prefix may be stored: Loader.match finds the longest
    stored prefix, the suffix runs with each layer attending over the chunks the
    loader's pipeline brings in (mode "full", "period", "layer", "rerank"; budget: the
    fraction of chunks per layer; pipeline_opts: period, subperiod, rerank, depth,
    no_prefetch, period_keys, and for layer mode budgets (one fraction per layer, e.g.
    from `tools/quality calibrate`), floor and score ("digest" or "keyq")). With nothing
    stored the whole prompt is computed.
    Returns ReprefillResult(logits [1][S][vocab] (the last logits_to_keep if > 0),
    token (argmax of the last logits), matched (prefix tokens used), hash, stats (the
    pipeline's counters, bytes_read = K + V + digest bytes))."""
    geom = geom or geometry(model, model_id=model_id, salt=salt)
    toks = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(map(int, tokens))
    if not toks:
        raise ValueError("reprefill: no tokens")
    h, matched = loader.match(kvcache.shape_string(geom), toks)
    n_used = min(matched, len(toks) - 1) if h else 0
    if n_used == 0:
        with torch.no_grad():
            out = model(input_ids=_ids(toks, _device(model)), use_cache=False,
                        logits_to_keep=logits_to_keep)
        return ReprefillResult(out.logits, int(out.logits[0, -1].argmax()), 0, h, {})
    with loader.open(h) as p:
        _check_shape(p.shape, geom)
        prov = LoaderProvider(p, n_used, mode, budget, q_heads=model.config.num_attention_heads,
                              q_tokens=len(toks) - n_used, **pipeline_opts)
        try:
            logits = run_suffix(model, toks[n_used:], n_used, prov, logits_to_keep)
        finally:
            stats = prov.close()
    return ReprefillResult(logits, int(logits[0, -1].argmax()), n_used, h, stats)


def full_kv_logits(model, tokens, n_prefix, logits_to_keep=0):
    """The reference: logits of tokens[n_prefix:] continuing from the whole prefix's KV
    in a transformers cache (prefill of the prefix, then the suffix with
    past_key_values) — what Re-Prefill at budget 1.0 must reproduce."""
    dev = _device(model)
    ids = _ids(tokens, dev)
    with torch.no_grad():
        pre = model(input_ids=ids[:, :n_prefix], use_cache=True, logits_to_keep=1)
        out = model(input_ids=ids[:, n_prefix:], past_key_values=pre.past_key_values,
                    use_cache=True, logits_to_keep=logits_to_keep)
    return out.logits
