"""ckv.loader — Python binding of libckvgpu (gpu/ckvgpu.h), through ctypes.

Load only the important 16-token chunks of each layer of a stored prefix's KV
cache into GPU (or host) memory, overlapping disk reads with the model's
compute::

    from ckv.loader import Loader
    with Loader("/var/lib/ckv") as ld:                 # a store: embedded engine
        h, n = ld.match("qwen2.5-7b", tokens)          # longest stored prefix
        with ld.open(h) as p, p.pipeline(mode="layer", budget=0.1,
                                         q_heads=28, q_tokens=len(suffix)) as pl:
            for l in range(p.shape.layers):
                view = pl.layer(l, query[l])           # [q_tokens][q_heads][head_dim]
                k, v = view.kv_tensors()               # [n][kv_heads][16][head_dim]
                ...                                    # attention over view.chunks

A mountpoint (a directory with .ckv/ctl) or a control socket talks to the
ckvfs daemon instead. Memory handed out (layer views, fetch results) is torch
tensors when torch is installed, else numpy arrays; CUDA memory needs torch.
Errors raise CkvError (an OSError with the C message).

The shared library is found at $CKV_LIBCKVGPU, else build/libckvgpu.so of
this source tree, else through the dynamic loader (libckvgpu.so).
"""

import ctypes
import ctypes.util
import errno as _errno
import os
from collections import namedtuple

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is required for host memory
    np = None
try:
    import torch
except ImportError:
    torch = None

__all__ = ["CkvError", "Loader", "Prefix", "Pipeline", "LayerView", "Shape",
           "select", "key_scores", "kv_tensors", "library", "MODES", "PARTS"]

MODES = {"full": 0, "period": 1, "layer": 2, "rerank": 3}
PARTS = {"kv": 0, "k": 1, "v": 2}
_BACKENDS = {"auto": 0, "host": 1, "cuda": 2}
_POLICIES = {"attention": 0, "lru": 1}


class CkvError(OSError):
    """A libckvgpu call failed: .errno and the library's message."""


# ---- the C side ----------------------------------------------------------------

class _LoaderOpts(ctypes.Structure):
    _fields_ = [("backend", ctypes.c_int), ("device", ctypes.c_int),
                ("arena_bytes", ctypes.c_uint64), ("policy", ctypes.c_int),
                ("gpu_cache_bytes", ctypes.c_uint64)]


class _Shape(ctypes.Structure):
    _fields_ = [("hash", ctypes.c_char * 33), ("model", ctypes.c_char * 256),
                ("dtype", ctypes.c_char * 16),
                ("layers", ctypes.c_uint32), ("kv_heads", ctypes.c_uint32),
                ("head_dim", ctypes.c_uint32), ("chunk_tokens", ctypes.c_uint32),
                ("tokens", ctypes.c_uint32), ("chunks", ctypes.c_uint32),
                ("chunk_bytes", ctypes.c_uint64), ("half_bytes", ctypes.c_uint64)]


class _LoaderStats(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "hits_gpu", "hits_arena", "misses", "bytes_k", "bytes_v",
        "gpu_tier_bytes", "gpu_tier_used", "gpu_tier_evictions")]


class _PipelineOpts(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_int), ("budget", ctypes.c_double),
                ("period", ctypes.c_uint32), ("subperiod", ctypes.c_uint32),
                ("rerank", ctypes.c_uint32), ("no_prefetch", ctypes.c_bool),
                ("q_heads", ctypes.c_uint32), ("q_tokens", ctypes.c_uint32),
                ("stream", ctypes.c_void_p), ("depth", ctypes.c_uint32),
                ("period_keys", ctypes.c_bool),
                ("budgets", ctypes.POINTER(ctypes.c_double)), ("floor", ctypes.c_double),
                ("score", ctypes.c_int), ("tokens", ctypes.c_uint32)]

SCORES = {"digest": 0, "keyq": 1}


class _LayerView(ctypes.Structure):
    _fields_ = [("layer", ctypes.c_uint32), ("nchunks", ctypes.c_uint32),
                ("chunks", ctypes.POINTER(ctypes.c_uint32)), ("kv", ctypes.c_void_p)]


class _PipelineStats(ctypes.Structure):
    _fields_ = [("wait_s", ctypes.c_double), ("total_s", ctypes.c_double)] + [
        (n, ctypes.c_uint64) for n in (
            "bytes_k", "bytes_v", "bytes_needed", "chunks_used", "chunks_read",
            "spec_used", "spec_wasted", "hits_gpu", "hits_arena", "misses",
            "identifications", "bytes_digest")]


_P = ctypes.c_void_p
_U32P = ctypes.POINTER(ctypes.c_uint32)
_F32P = ctypes.POINTER(ctypes.c_float)

_SIGNATURES = {
    "ckv_loader_open": (ctypes.c_int, [ctypes.c_char_p, ctypes.POINTER(_LoaderOpts), ctypes.POINTER(_P)]),
    "ckv_loader_close": (None, [_P]),
    "ckv_loader_error": (ctypes.c_char_p, [_P]),
    "ckv_loader_remote": (ctypes.c_bool, [_P]),
    "ckv_loader_backend": (ctypes.c_int, [_P]),
    "ckv_loader_get_stats": (None, [_P, ctypes.POINTER(_LoaderStats)]),
    "ckv_loader_alloc": (ctypes.c_int, [_P, ctypes.c_uint64, ctypes.POINTER(_P)]),
    "ckv_loader_free": (None, [_P, _P]),
    "ckv_loader_to_host": (ctypes.c_int, [_P, _P, _P, ctypes.c_uint64]),
    "ckv_loader_sync": (ctypes.c_int, [_P, _P]),
    "ckv_loader_match": (ctypes.c_int, [_P, ctypes.c_char_p, _U32P, ctypes.c_uint32,
                                        ctypes.c_char * 33, _U32P]),
    "ckv_prefix_open": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(_P)]),
    "ckv_prefix_close": (None, [_P]),
    "ckv_prefix_shape": (None, [_P, ctypes.POINTER(_Shape)]),
    "ckv_fetch_start": (ctypes.c_int, [_P, ctypes.c_uint32, _U32P, ctypes.c_uint32, ctypes.c_int,
                                       _P, ctypes.POINTER(_P), _P, ctypes.POINTER(_P)]),
    "ckv_fetch_wait": (ctypes.c_int, [_P]),
    "ckv_prefetch": (ctypes.c_int, [_P, ctypes.c_uint32, _U32P, ctypes.c_uint32]),
    "ckv_score_feedback": (ctypes.c_int, [_P, ctypes.c_uint32, _U32P, _F32P, ctypes.c_uint32]),
    "ckv_digest_scores": (ctypes.c_int, [_P, ctypes.c_uint32, _F32P, ctypes.c_uint32,
                                         ctypes.c_uint32, _F32P]),
    "ckv_digest_scores_device": (ctypes.c_int, [_P, ctypes.c_uint32, _P, ctypes.c_uint32,
                                                ctypes.c_uint32, _P, _P]),
    "ckv_key_scores": (ctypes.c_int, [ctypes.POINTER(_Shape), _P, ctypes.c_uint64, _U32P,
                                      ctypes.c_uint32, _F32P, ctypes.c_uint32, ctypes.c_uint32,
                                      _F32P]),
    "ckv_keyq_scores": (ctypes.c_int, [_P, ctypes.c_uint32, _F32P, _F32P, ctypes.c_uint32,
                                       ctypes.c_uint32, _F32P]),
    "ckv_keyq_scores_device": (ctypes.c_int, [_P, ctypes.c_uint32, _P, _P, ctypes.c_uint32,
                                              ctypes.c_uint32, _P, _P]),
    "ckv_select_topk": (ctypes.c_int, [_F32P, ctypes.c_uint32, ctypes.c_double, _U32P]),
    "ckv_pipeline_open": (ctypes.c_int, [_P, ctypes.POINTER(_PipelineOpts), ctypes.POINTER(_P)]),
    "ckv_pipeline_layer": (ctypes.c_int, [_P, ctypes.c_uint32, _F32P, ctypes.POINTER(_LayerView)]),
    "ckv_pipeline_layer_qk": (ctypes.c_int, [_P, ctypes.c_uint32, _F32P, _F32P,
                                             ctypes.POINTER(_LayerView)]),
    "ckv_pipeline_get_stats": (None, [_P, ctypes.POINTER(_PipelineStats)]),
    "ckv_pipeline_close": (None, [_P]),
}

_lib = None


def library(path=None):
    """The loaded libckvgpu (loading it on first use, from path if given)."""
    global _lib
    if _lib is not None and path is None:
        return _lib
    cands = [path] if path else []
    if not path:
        if os.environ.get("CKV_LIBCKVGPU"):
            cands.append(os.environ["CKV_LIBCKVGPU"])
        here = os.path.dirname(os.path.abspath(__file__))
        cands.append(os.path.join(here, "..", "..", "..", "build", "libckvgpu.so"))
        found = ctypes.util.find_library("ckvgpu")
        cands.append(found or "libckvgpu.so")
    errors = []
    for c in cands:
        try:
            lib = ctypes.CDLL(c)
            break
        except OSError as e:
            errors.append(f"{c}: {e}")
    else:
        raise CkvError(_errno.ENOENT, "cannot load libckvgpu.so (set CKV_LIBCKVGPU): "
                       + "; ".join(errors))
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    _lib = lib
    return lib


def _raise(rc, msg):
    msg = msg.decode(errors="replace") if isinstance(msg, bytes) else (msg or "")
    raise CkvError(-rc, msg or os.strerror(-rc))


# ---- memory helpers ------------------------------------------------------------------

def _is_torch(x):
    return torch is not None and isinstance(x, torch.Tensor)


def _u32(seq):
    """A C array of uint32 from a list, numpy array or torch tensor."""
    if _is_torch(seq):
        seq = seq.detach().cpu().numpy()
    if np is not None:
        a = np.ascontiguousarray(np.asarray(seq, dtype=np.int64))
        if a.ndim != 1:
            raise ValueError("expected a 1-D sequence of chunk ids / tokens")
        if a.size and (a.min() < 0 or a.max() > 0xFFFFFFFF):
            raise ValueError("values must fit in uint32")
        a = a.astype(np.uint32)
        return a, a.ctypes.data_as(_U32P), int(a.size)
    vals = [int(v) for v in seq]
    arr = (ctypes.c_uint32 * max(len(vals), 1))(*vals)
    return arr, ctypes.cast(arr, _U32P), len(vals)


def _f32_host(x, shape_msg):
    """Host fp32 contiguous copy/view of a tensor or array; returns (keep, ptr, shape)."""
    if _is_torch(x):
        x = x.detach().to(dtype=torch.float32, device="cpu").contiguous()
        return x, ctypes.cast(ctypes.c_void_p(x.data_ptr()), _F32P), tuple(x.shape)
    if np is None:
        raise TypeError(shape_msg + ": numpy or torch needed")
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    return a, a.ctypes.data_as(_F32P), a.shape


def _stream_ptr(stream):
    if stream is None:
        return None
    if isinstance(stream, int):
        return stream
    s = getattr(stream, "cuda_stream", None)  # torch.cuda.Stream
    if s is None:
        raise TypeError("stream: expected a torch.cuda.Stream, an int handle or None")
    return s


class _CudaArray:
    """Device memory seen through __cuda_array_interface__ (for torch.as_tensor)."""

    def __init__(self, ptr, shape, owner):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": "|u1",
                                         "data": (ptr, False), "version": 2, "strides": None}
        self._owner = owner


def _wrap(ptr, nbytes, rows, cuda, owner):
    """A [rows, nbytes/rows] uint8 view of memory at ptr (not a copy)."""
    cols = nbytes // rows if rows else 0
    if cuda:
        if torch is None:
            raise CkvError(_errno.ENOTSUP, "CUDA memory needs torch")
        if rows == 0:
            return torch.empty((0, 0), dtype=torch.uint8, device="cuda")
        return torch.as_tensor(_CudaArray(ptr, (rows, cols), owner), device="cuda")
    if rows == 0 or nbytes == 0:
        a = np.zeros((0, cols), dtype=np.uint8)
    else:
        buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
        a = np.ctypeslib.as_array(buf).reshape(rows, cols)
    return torch.from_numpy(a) if torch is not None else a


def _dtype_of(name):
    if torch is not None:
        m = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "fp8_e4m3": getattr(torch, "float8_e4m3fn", torch.uint8)}
        return m[name]
    m = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32, "fp8_e4m3": np.uint8}
    return m[name]


def _esize(name):
    return {"bf16": 2, "fp16": 2, "fp32": 4, "fp8_e4m3": 1}[name]


def kv_tensors(rows, shape):
    """(K, V) views [n][kv_heads][chunk_tokens][head_dim] of rows [n, chunk_bytes] (uint8)
    holding KV-HCD chunks, in the model's dtype (numpy without torch: bf16 as raw
    uint16, fp8 as raw uint8)."""
    n = rows.shape[0]
    half = shape.half_bytes
    dt = _dtype_of(shape.dtype)
    dims = (n, shape.kv_heads, shape.chunk_tokens, shape.head_dim)
    out = []
    for lo in (0, half):
        part = rows[:, lo:lo + half]
        if _is_torch(part):
            if dt is torch.uint8:
                t = part
            else:
                t = part.view(dt)
            out.append(t.reshape(dims))
        else:
            out.append(np.ascontiguousarray(part).view(dt).reshape(dims))
    return tuple(out)


# ---- the API --------------------------------------------------------------------------

Shape = namedtuple("Shape", "hash model dtype layers kv_heads head_dim chunk_tokens tokens "
                            "chunks chunk_bytes half_bytes")


def select(scores, budget):
    """Top ceil(budget * m) chunk ids (ascending), always 0 and m-1 (ckv_select_topk)."""
    lib = library()
    keep, ptr, shp = _f32_host(scores, "scores")
    m = int(np.prod(shp)) if np is not None else len(scores)
    if m == 0:
        raise ValueError("select: no scores")
    out = (ctypes.c_uint32 * m)()
    rc = lib.ckv_select_topk(ptr, m, float(budget), out)
    if rc < 0:
        _raise(rc, f"select: budget {budget}: expected a fraction in (0, 1]")
    ids = list(out[:rc])
    return np.array(ids, dtype=np.uint32) if np is not None else ids


def key_scores(shape, keys, chunks, query, stride=None):
    """Exact chunk scores from K halves in host memory (ckv_key_scores): keys is a
    uint8 array/tensor whose row i (stride bytes, default half_bytes) holds chunk
    chunks[i]'s K half; query [q_tokens][q_heads][head_dim]."""
    lib = library()
    cs = _shape_c(shape)
    ids, idp, n = _u32(chunks)
    if _is_torch(keys):
        keys = keys.detach().cpu().contiguous()
        kp = keys.data_ptr()
    else:
        keys = np.ascontiguousarray(keys)
        kp = keys.ctypes.data
    q, qp, qs = _f32_host(query, "query")
    if len(qs) != 3:
        raise ValueError("query: expected [q_tokens][q_heads][head_dim]")
    out = (ctypes.c_float * max(n, 1))()
    rc = lib.ckv_key_scores(ctypes.byref(cs), kp, stride or shape.half_bytes, idp, n, qp,
                            qs[0], qs[1], out)
    if rc < 0:
        _raise(rc, "key_scores: bad shape, stride, chunk id or query")
    return np.array(out[:n], dtype=np.float32)


def _shape_c(s):
    c = _Shape()
    c.hash = s.hash.encode()
    c.model = s.model.encode()
    c.dtype = s.dtype.encode()
    for f in Shape._fields[3:]:
        setattr(c, f, getattr(s, f))
    return c


class Loader:
    """ckv_loader: a store directory (embedded engine) or a ckvfs mountpoint."""

    def __init__(self, path, backend="auto", gpu_cache_bytes=0, arena_bytes=0, device=0,
                 policy="attention"):
        self._h = None
        self._prefixes = []
        lib = library()
        if backend not in _BACKENDS:
            raise ValueError(f"backend {backend!r}: expected one of {list(_BACKENDS)}")
        if policy not in _POLICIES:
            raise ValueError(f"policy {policy!r}: expected one of {list(_POLICIES)}")
        o = _LoaderOpts(_BACKENDS[backend], int(device), int(arena_bytes), _POLICIES[policy],
                        int(gpu_cache_bytes))
        h = _P()
        rc = lib.ckv_loader_open(os.fsencode(path), ctypes.byref(o), ctypes.byref(h))
        if rc < 0:
            _raise(rc, lib.ckv_loader_error(None))
        self._lib = lib
        self._h = h

    def _check(self, rc):
        if rc < 0:
            _raise(rc, self._lib.ckv_loader_error(self._h))
        return rc

    @property
    def handle(self):
        if not self._h:
            raise CkvError(_errno.EBADF, "the loader is closed")
        return self._h

    @property
    def backend(self):
        return {1: "host", 2: "cuda"}[self._lib.ckv_loader_backend(self.handle)]

    @property
    def remote(self):
        return bool(self._lib.ckv_loader_remote(self.handle))

    def stats(self):
        st = _LoaderStats()
        self._lib.ckv_loader_get_stats(self.handle, ctypes.byref(st))
        return {f: getattr(st, f) for f, _ in _LoaderStats._fields_}

    def match(self, shape, tokens):
        """Longest stored prefix of tokens: (hash or None, tokens matched)."""
        arr, ptr, n = _u32(tokens)
        out = (ctypes.c_char * 33)()
        matched = ctypes.c_uint32()
        self._check(self._lib.ckv_loader_match(self.handle, shape.encode(), ptr, n, out,
                                               ctypes.byref(matched)))
        return (out.value.decode() or None, matched.value)

    def open(self, hash):
        return Prefix(self, hash)

    def close(self):
        for p in list(self._prefixes):
            p.close()
        if self._h:
            self._lib.ckv_loader_close(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # memory of the backend's kind, for fetch destinations without torch
    def _empty(self, rows, cols):
        if self.backend == "cuda":
            if torch is None:
                raise CkvError(_errno.ENOTSUP, "CUDA destinations need torch")
            return torch.empty((rows, cols), dtype=torch.uint8, device="cuda")
        if torch is not None:
            return torch.empty((rows, cols), dtype=torch.uint8)
        return np.empty((rows, cols), dtype=np.uint8)


class Prefix:
    """ckv_prefix: one stored prefix opened for chunk access."""

    def __init__(self, loader, hash):
        self._l = loader
        h = _P()
        loader._check(loader._lib.ckv_prefix_open(loader.handle, hash.encode(), ctypes.byref(h)))
        self._h = h
        self._pipelines = []
        s = _Shape()
        loader._lib.ckv_prefix_shape(h, ctypes.byref(s))
        self.shape = Shape(s.hash.decode(), s.model.decode(), s.dtype.decode(), s.layers,
                           s.kv_heads, s.head_dim, s.chunk_tokens, s.tokens, s.chunks,
                           s.chunk_bytes, s.half_bytes)
        loader._prefixes.append(self)

    @property
    def handle(self):
        if not self._h:
            raise CkvError(_errno.EBADF, "the prefix is closed")
        return self._h

    def _dest(self, out, nbytes):
        """(pointer, keep) of a destination; checks its device and size."""
        cuda = self._l.backend == "cuda"
        if _is_torch(out):
            if out.is_cuda != cuda:
                raise ValueError(f"out: a {'CUDA' if out.is_cuda else 'CPU'} tensor for the "
                                 f"{self._l.backend} backend")
            if not out.is_contiguous():
                raise ValueError("out: must be contiguous")
            if out.numel() * out.element_size() < nbytes:
                raise ValueError(f"out: {out.numel() * out.element_size()} bytes, need {nbytes}")
            return out.data_ptr()
        if cuda:
            raise ValueError("out: the CUDA backend needs a CUDA torch tensor")
        if np is None or not isinstance(out, np.ndarray):
            raise TypeError("out: expected a torch tensor or a numpy array")
        if not out.flags["C_CONTIGUOUS"] or not out.flags["WRITEABLE"]:
            raise ValueError("out: must be C-contiguous and writeable")
        if out.nbytes < nbytes:
            raise ValueError(f"out: {out.nbytes} bytes, need {nbytes}")
        return out.ctypes.data

    def fetch(self, layer, chunks, part="kv", out=None, stream=None):
        """Copy chunks of a layer (part "kv", "k" or "v") into out ([n, bytes] uint8 by
        default, allocated on the backend's device) on stream; returns out. The copy
        is complete in the order of stream (host backend: complete)."""
        if part not in PARTS:
            raise ValueError(f"part {part!r}: expected 'kv', 'k' or 'v'")
        ids, idp, n = _u32(chunks)
        per = self.shape.chunk_bytes if part == "kv" else self.shape.half_bytes
        if out is None:
            out = self._l._empty(n, per)
        ptr = self._dest(out, n * per)
        if stream is None and _is_torch(out) and out.is_cuda:
            stream = torch.cuda.current_stream()
        f = _P()
        lib = self._l._lib
        self._l._check(lib.ckv_fetch_start(self.handle, layer, idp, n, PARTS[part], ptr, None,
                                           _stream_ptr(stream), ctypes.byref(f)))
        self._l._check(lib.ckv_fetch_wait(f))
        return out

    def prefetch(self, layer, chunks):
        ids, idp, n = _u32(chunks)
        self._l._check(self._l._lib.ckv_prefetch(self.handle, layer, idp, n))

    def feedback(self, layer, chunks, scores):
        """Attention mass per chunk, for retention (the arena's and the GPU tier's)."""
        ids, idp, n = _u32(chunks)
        sc, sp, shp = _f32_host(scores, "scores")
        if int(np.prod(shp)) != n:
            raise ValueError("feedback: one score per chunk")
        self._l._check(self._l._lib.ckv_score_feedback(self.handle, layer, idp, sp, n))

    def digest_scores(self, layer, query, stream=None):
        """Scores of every chunk of a layer from the key digests and query
        [q_tokens][q_heads][head_dim]. A CUDA tensor query on the CUDA backend is
        scored on the device (returns a CUDA tensor); otherwise on the CPU."""
        lib = self._l._lib
        m = self.shape.chunks
        if _is_torch(query) and query.is_cuda and self._l.backend == "cuda":
            q = query.detach().to(torch.float32).contiguous()
            if q.dim() != 3:
                raise ValueError("query: expected [q_tokens][q_heads][head_dim]")
            out = torch.empty(m, dtype=torch.float32, device=q.device)
            if stream is None:
                stream = torch.cuda.current_stream()
            self._l._check(lib.ckv_digest_scores_device(self.handle, layer, q.data_ptr(),
                                                        q.shape[0], q.shape[1], out.data_ptr(),
                                                        _stream_ptr(stream)))
            return out
        q, qp, qs = _f32_host(query, "query")
        if len(qs) != 3 or qs[2] != self.shape.head_dim:
            raise ValueError(f"query: expected [q_tokens][q_heads][{self.shape.head_dim}], got {qs}")
        out = np.empty(m, dtype=np.float32)
        self._l._check(lib.ckv_digest_scores(self.handle, layer, qp, qs[0], qs[1],
                                             out.ctypes.data_as(_F32P)))
        return torch.from_numpy(out) if _is_torch(query) else out

    def keyq_scores(self, layer, query, keys=None, stream=None):
        """Attention mass of every chunk of a layer over the store's low-bit key copy
        (ckv_keyq_scores): query [q_tokens][q_heads][head_dim], keys (the new tokens'
        post-RoPE keys) [q_tokens][kv_heads][head_dim] or None. A CUDA tensor query on
        the CUDA backend is scored on the device (returns a CUDA tensor; keys, if given,
        must be on the same device); otherwise on the CPU."""
        lib = self._l._lib
        sh = self.shape
        if _is_torch(query) and query.is_cuda and self._l.backend == "cuda":
            q = query.detach().to(torch.float32).contiguous()
            if q.dim() != 3 or q.shape[2] != sh.head_dim:
                raise ValueError(f"query: expected [q_tokens][q_heads][{sh.head_dim}], got {tuple(q.shape)}")
            k, kp = None, None
            if keys is not None:
                if not (_is_torch(keys) and keys.device == q.device):
                    raise ValueError("keys: expected a tensor on the query's device")
                k = keys.detach().to(torch.float32).contiguous()
                if tuple(k.shape) != (q.shape[0], sh.kv_heads, sh.head_dim):
                    raise ValueError(f"keys: expected {(q.shape[0], sh.kv_heads, sh.head_dim)}, "
                                     f"got {tuple(k.shape)}")
                kp = k.data_ptr()
            out = torch.empty(sh.chunks, dtype=torch.float32, device=q.device)
            if stream is None:
                stream = torch.cuda.current_stream()
            self._l._check(lib.ckv_keyq_scores_device(self.handle, layer, q.data_ptr(), kp,
                                                      q.shape[0], q.shape[1], out.data_ptr(),
                                                      _stream_ptr(stream)))
            return out
        q, qp, qs = _f32_host(query, "query")
        if len(qs) != 3 or qs[2] != sh.head_dim:
            raise ValueError(f"query: expected [q_tokens][q_heads][{sh.head_dim}], got {qs}")
        k, kp = None, None
        if keys is not None:
            k, kp, ks = _f32_host(keys, "keys")
            if tuple(ks) != (qs[0], sh.kv_heads, sh.head_dim):
                raise ValueError(f"keys: expected {(qs[0], sh.kv_heads, sh.head_dim)}, got {tuple(ks)}")
        out = np.empty(sh.chunks, dtype=np.float32)
        self._l._check(lib.ckv_keyq_scores(self.handle, layer, qp, kp, qs[0], qs[1],
                                           out.ctypes.data_as(_F32P)))
        del q, k
        return torch.from_numpy(out) if _is_torch(query) else out

    @staticmethod
    def select(scores, budget):
        return select(scores, budget)

    def pipeline(self, mode="layer", budget=0.1, q_heads=None, q_tokens=1, period=8,
                 subperiod=4, rerank=2, no_prefetch=False, stream=None, depth=2,
                 period_keys=False, budgets=None, floor=0.0, score="digest", tokens=0):
        """A layer pipeline (ckv_pipeline_open). Layer mode also takes budgets (one
        fraction per layer), floor (layers whose budget is <= floor take chunk 0 and the
        most recent chunks, unidentified) and score ("digest" or "keyq"). tokens > 0:
        only the prefix's first `tokens` tokens are used (chunks past them are never
        selected or read)."""
        return Pipeline(self, mode, budget, q_heads, q_tokens, period, subperiod, rerank,
                        no_prefetch, stream, depth, period_keys, budgets, floor, score, tokens)

    def kv_tensors(self, rows):
        return kv_tensors(rows, self.shape)

    def close(self):
        for pl in list(self._pipelines):
            pl.close()
        if self._h:
            self._l._lib.ckv_prefix_close(self._h)
            self._h = None
            self._l._prefixes.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LayerView:
    """What a layer gets: .chunks (ascending ids, numpy uint32 copy) and .kv, a
    [n, chunk_bytes] uint8 tensor (numpy array without torch) over the pipeline's
    layer buffer — valid until `depth` layers later or the pipeline's close
    (clone it to keep it)."""

    def __init__(self, layer, chunks, kv, shape):
        self.layer = layer
        self.chunks = chunks
        self.kv = kv
        self._shape = shape

    def kv_tensors(self):
        """(K, V), each [n][kv_heads][chunk_tokens][head_dim] in the model's dtype."""
        return kv_tensors(self.kv, self._shape)

    def __len__(self):
        return len(self.chunks)


class Pipeline:
    """ckv_pipeline: layer by layer, identification and reads overlapped with compute."""

    def __init__(self, prefix, mode, budget, q_heads, q_tokens, period, subperiod, rerank,
                 no_prefetch, stream, depth, period_keys, budgets=None, floor=0.0,
                 score="digest", tokens=0):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {list(MODES)}")
        if score not in SCORES:
            raise ValueError(f"score {score!r}: expected one of {list(SCORES)}")
        bud = None
        if budgets is not None:
            budgets = [float(b) for b in budgets]
            if len(budgets) != prefix.shape.layers:
                raise ValueError(f"budgets: {len(budgets)} values for {prefix.shape.layers} layers")
            bud = (ctypes.c_double * len(budgets))(*budgets)
        self._p = prefix
        self._lib = prefix._l._lib
        sh = prefix.shape
        self._cuda = prefix._l.backend == "cuda"
        if stream is None and self._cuda and torch is not None:
            stream = torch.cuda.current_stream()
        self._stream = stream
        o = _PipelineOpts(MODES[mode], float(budget), int(period), int(subperiod), int(rerank),
                          bool(no_prefetch), int(q_heads if q_heads is not None else sh.kv_heads),
                          int(q_tokens), _stream_ptr(stream), int(depth), bool(period_keys),
                          ctypes.cast(bud, ctypes.POINTER(ctypes.c_double)) if bud else None,
                          float(floor), SCORES[score], int(tokens))
        self._q = (o.q_tokens, o.q_heads, sh.head_dim)
        self._k = (o.q_tokens, sh.kv_heads, sh.head_dim)
        h = _P()
        prefix._l._check(self._lib.ckv_pipeline_open(prefix.handle, ctypes.byref(o), ctypes.byref(h)))
        self._h = h
        prefix._pipelines.append(self)

    def layer(self, layer, query=None, keys=None):
        """Layer `layer` (in order) is about to compute: returns its LayerView. query
        [q_tokens][q_heads][head_dim]; keys, the new tokens' keys [q_tokens][kv_heads]
        [head_dim], are used by score "keyq"."""
        if not self._h:
            raise CkvError(_errno.EBADF, "the pipeline is closed")
        qp = kp = None
        keep = kkeep = None
        if query is not None:
            keep, qp, qs = _f32_host(query, "query")
            if tuple(qs) != self._q:
                raise ValueError(f"query: expected shape {self._q}, got {tuple(qs)}")
        if keys is not None:
            kkeep, kp, ks = _f32_host(keys, "keys")
            if tuple(ks) != self._k:
                raise ValueError(f"keys: expected shape {self._k}, got {tuple(ks)}")
        v = _LayerView()
        self._p._l._check(self._lib.ckv_pipeline_layer_qk(self._h, layer, qp, kp, ctypes.byref(v)))
        del keep, kkeep
        n = v.nchunks
        ids = np.ctypeslib.as_array(v.chunks, shape=(n,)).copy() if n else np.zeros(0, np.uint32)
        kv = _wrap(v.kv, n * self._p.shape.chunk_bytes, n, self._cuda, self)
        return LayerView(v.layer, ids, kv, self._p.shape)

    def stats(self):
        st = _PipelineStats()
        self._lib.ckv_pipeline_get_stats(self._h, ctypes.byref(st))
        d = {f: getattr(st, f) for f, _ in _PipelineStats._fields_}
        d["read_amplification"] = ((d["bytes_k"] + d["bytes_v"]) / d["bytes_needed"]
                                   if d["bytes_needed"] else 0.0)
        return d

    def close(self):
        if self._h:
            self._lib.ckv_pipeline_close(self._h)
            self._h = None
            self._p._pipelines.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
