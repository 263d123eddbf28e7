"""ckv.format — the ckvfs on-disk format in pure Python.

Reference implementation of docs/FORMAT.md: geometry and presets, the prefix
identity (xxHash token chain), the canonical manifest, the sums/digest side
files, and a writer/reader for the exported cache directory

    DIR/manifest.json  DIR/tokens.bin  DIR/layer_000.kv ...  DIR/sums.xxh3

that ``ckv import`` / ``ckv export`` and the ckvfs mount's ``by-hash/<hash>/``
directories use. An engine can produce and read caches with this module alone:
it needs the ``xxhash`` package (Debian: python3-xxhash); numpy is optional
(it is used when you pass numpy arrays, and for ``layer_arrays`` /
``chunk_digest``).

Layer data given to ``write_export`` is, per layer, a pair (K, V), each of
shape [kv_heads][tokens][head_dim] in the geometry's dtype: a numpy array
(raw bits as uint16 for bf16, or float32 that is rounded to bf16 / fp16), a
torch tensor (moved to the CPU), or a bytes-like object holding the
little-endian elements in that order.
"""

import json
import os
import re
import struct
from collections import OrderedDict

import xxhash

__all__ = [
    "FORMAT_VERSION", "ALIGN", "DTYPES", "PRESETS", "Geometry", "preset",
    "fingerprint", "chain", "chain_step", "prefix_hash", "chunks_for",
    "segment_id", "layer_name", "manifest_dict", "manifest_json",
    "parse_manifest", "chunk_sum", "sums_encode", "sums_decode",
    "side_header_encode", "side_header_decode", "digest_encode",
    "digest_decode", "chunk_digest", "tokens_bytes", "tokens_from_bytes",
    "build_layer", "write_export", "read_export", "layer_kv", "layer_arrays",
    "read_store_prefix",
]

FORMAT_VERSION = 1
ALIGN = 4096
HASH_HEX = 32
SIDE_HEADER = 32
SUMS_MAGIC = b"CKVSUMS1"
DIGEST_MAGIC = b"CKVDGST1"

MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_CHUNK_TOKENS = 4096
MAX_TOKENS = 1 << 26
MAX_CHUNK_BYTES = 1 << 30
MAX_MODEL_ID = 255  # bytes, the C buffer is 256 with its NUL
MAX_SALT = 63       # bytes, the C buffer is 64 with its NUL

# dtype name -> bytes per element
DTYPES = OrderedDict([("bf16", 2), ("fp16", 2), ("fp8_e4m3", 1), ("fp32", 4)])

MANIFEST_KEYS = ("format", "version", "model", "salt", "dtype", "layers",
                 "kv_heads", "head_dim", "chunk_tokens", "layout",
                 "chunk_bytes", "tokens", "chunks", "hash")

_HEX_RE = re.compile(r"^[0-9a-f]{32}$")


def _roundup(x, a):
    return (x + a - 1) // a * a


def chunks_for(ntokens, chunk_tokens):
    """m = ceil(n / c)."""
    return (ntokens + chunk_tokens - 1) // chunk_tokens


def _check_text(what, s, maxlen, allow_empty):
    if not isinstance(s, str):
        raise ValueError("%s: must be a string" % what)
    if not s and not allow_empty:
        raise ValueError("%s: must not be empty" % what)
    if any(not (0x21 <= ord(ch) <= 0x7e) or ch == "|" for ch in s):
        raise ValueError("%s: %r: must be printable ASCII without spaces or '|'"
                         % (what, s))
    if len(s) > maxlen:
        raise ValueError("%s: longer than %d bytes" % (what, maxlen))


def _check_int(what, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("%s: must be an integer" % what)
    if not lo <= v <= hi:
        raise ValueError("%s: %d is outside [%d, %d]" % (what, v, lo, hi))


class Geometry(object):
    """Shape of a cache: model id, salt, dtype, layers, kv_heads, head_dim,
    chunk_tokens. Immutable; validated on construction (ValueError)."""

    __slots__ = ("model", "salt", "dtype", "layers", "kv_heads", "head_dim",
                 "chunk_tokens")

    def __init__(self, model, salt="", dtype="bf16", layers=1, kv_heads=1,
                 head_dim=1, chunk_tokens=16, what="geometry"):
        _check_text(what + ": model", model, MAX_MODEL_ID, False)
        _check_text(what + ": salt", salt, MAX_SALT, True)
        if dtype not in DTYPES:
            raise ValueError("%s: dtype: %r is not one of %s"
                             % (what, dtype, ", ".join(DTYPES)))
        _check_int(what + ": layers", layers, 1, MAX_LAYERS)
        _check_int(what + ": kv_heads", kv_heads, 1, MAX_KV_HEADS)
        _check_int(what + ": head_dim", head_dim, 1, MAX_HEAD_DIM)
        _check_int(what + ": chunk_tokens", chunk_tokens, 1, MAX_CHUNK_TOKENS)
        for k, v in (("model", model), ("salt", salt), ("dtype", dtype),
                     ("layers", layers), ("kv_heads", kv_heads),
                     ("head_dim", head_dim), ("chunk_tokens", chunk_tokens)):
            object.__setattr__(self, k, v)
        if self.chunk_bytes > MAX_CHUNK_BYTES:
            raise ValueError("%s: chunk_bytes %d exceeds %d"
                             % (what, self.chunk_bytes, MAX_CHUNK_BYTES))

    def __setattr__(self, k, v):
        raise AttributeError("Geometry is immutable")

    def _key(self):
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other):
        return isinstance(other, Geometry) and self._key() == other._key()

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return ("Geometry(model=%r, salt=%r, dtype=%r, layers=%d, kv_heads=%d, "
                "head_dim=%d, chunk_tokens=%d)" % self._key())

    def replace(self, **kw):
        d = dict((k, getattr(self, k)) for k in self.__slots__)
        d.update(kw)
        return Geometry(**d)

    @property
    def esize(self):
        return DTYPES[self.dtype]

    @property
    def half_bytes(self):
        """K (or V) of one chunk: kv_heads * chunk_tokens * head_dim * esize."""
        return self.kv_heads * self.chunk_tokens * self.head_dim * self.esize

    @property
    def chunk_bytes(self):
        """roundup(2 * half_bytes, 4096)."""
        return _roundup(2 * self.half_bytes, ALIGN)

    @property
    def fingerprint(self):
        return fingerprint(self)

    @property
    def seed(self):
        """XXH3-64 (seed 0) of the ASCII fingerprint."""
        return xxhash.xxh3_64_intdigest(self.fingerprint.encode("ascii"))

    def chunks(self, ntokens):
        return chunks_for(ntokens, self.chunk_tokens)


# name -> (model, layers, kv_heads, head_dim); all bf16, chunk 16, salt ""
_PRESET_SHAPES = OrderedDict([
    ("qwen2.5-0.5b", ("Qwen/Qwen2.5-0.5B", 24, 2, 64)),
    ("qwen2.5-1.5b", ("Qwen/Qwen2.5-1.5B", 28, 2, 128)),
    ("qwen2.5-3b", ("Qwen/Qwen2.5-3B", 36, 2, 128)),
    ("qwen2.5-7b", ("Qwen/Qwen2.5-7B", 28, 4, 128)),
    ("qwen2.5-14b", ("Qwen/Qwen2.5-14B", 48, 8, 128)),
    ("qwen2.5-32b", ("Qwen/Qwen2.5-32B", 64, 8, 128)),
    ("qwen2.5-72b", ("Qwen/Qwen2.5-72B", 80, 8, 128)),
])

PRESETS = OrderedDict(
    (name, Geometry(model=m, salt="", dtype="bf16", layers=l, kv_heads=h,
                    head_dim=d, chunk_tokens=16))
    for name, (m, l, h, d) in _PRESET_SHAPES.items())


def preset(name, salt=None, chunk_tokens=None):
    """A preset Geometry by name (e.g. "qwen2.5-7b"), optionally re-salted."""
    try:
        g = PRESETS[name]
    except KeyError:
        raise ValueError("unknown model preset %r (known: %s)"
                         % (name, ", ".join(PRESETS)))
    kw = {}
    if salt is not None:
        kw["salt"] = salt
    if chunk_tokens is not None:
        kw["chunk_tokens"] = chunk_tokens
    return g.replace(**kw) if kw else g


def fingerprint(geom):
    """The canonical fingerprint string of a geometry."""
    return ("ckv1|model=%s|salt=%s|dtype=%s|layers=%d|kv_heads=%d|head_dim=%d"
            "|chunk=%d" % (geom.model, geom.salt, geom.dtype, geom.layers,
                           geom.kv_heads, geom.head_dim, geom.chunk_tokens))


# ---------------------------------------------------------------- tokens


def tokens_bytes(tokens):
    """u32 little-endian bytes of a token sequence (list, array, bytes)."""
    if isinstance(tokens, (bytes, bytearray, memoryview)):
        b = bytes(tokens)
        if len(b) % 4:
            raise ValueError("tokens: %d bytes is not a multiple of 4" % len(b))
        return b
    if hasattr(tokens, "dtype") and hasattr(tokens, "astype"):  # numpy
        import numpy as np
        a = np.asarray(tokens)
        if a.ndim != 1:
            raise ValueError("tokens: expected a 1-d array, got shape %r"
                             % (a.shape,))
        if a.size and (a.min() < 0 or a.max() > 0xFFFFFFFF):
            raise ValueError("tokens: values must fit in u32")
        return a.astype("<u4").tobytes()
    toks = list(tokens)
    for i, t in enumerate(toks):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= 0xFFFFFFFF:
            raise ValueError("tokens[%d]: %r is not a u32" % (i, t))
    return struct.pack("<%dI" % len(toks), *toks)


def tokens_from_bytes(b):
    if len(b) % 4:
        raise ValueError("tokens: %d bytes is not a multiple of 4" % len(b))
    return list(struct.unpack("<%dI" % (len(b) // 4), b))


# ---------------------------------------------------------------- chain


def chain_step(prev, token_bytes, seed):
    """One link: XXH3-128(prev || tokens, seed) in canonical (big-endian)
    16-byte form. prev is None for chunk 0, else the previous 16 bytes."""
    data = token_bytes if prev is None else bytes(prev) + token_bytes
    return xxhash.xxh3_128(data, seed=seed).digest()  # digest() is canonical BE


def chain(geom, tokens):
    """Canonical 16-byte chain hashes h_0 .. h_{m-1} of a token sequence."""
    tb = tokens_bytes(tokens)
    n = len(tb) // 4
    if n < 1:
        raise ValueError("tokens: a prefix has at least one token")
    seed = geom.seed
    step = 4 * geom.chunk_tokens
    out, prev = [], None
    for off in range(0, len(tb), step):
        prev = chain_step(prev, tb[off:off + step], seed)
        out.append(prev)
    return out


def prefix_hash(geom, tokens):
    """The prefix hash: 32 lowercase hex digits of h_{m-1}."""
    return chain(geom, tokens)[-1].hex()


def segment_id(last_hash, first):
    """Segment id: "<hex of the hash of the segment's last chunk>-<index of
    its first chunk in the prefix>"."""
    if isinstance(last_hash, (bytes, bytearray)):
        last_hash = bytes(last_hash).hex()
    return "%s-%d" % (last_hash.lower(), first)


def layer_name(layer):
    return "layer_%03u.kv" % layer


# ---------------------------------------------------------------- manifest


def manifest_dict(geom, ntokens, hash_hex):
    """The exported manifest as an ordered dict (canonical key order)."""
    if isinstance(hash_hex, (bytes, bytearray)):
        hash_hex = bytes(hash_hex).hex()
    if not _HEX_RE.match(hash_hex.lower()):
        raise ValueError("manifest: hash: %r is not 32 hex digits" % (hash_hex,))
    _check_int("manifest: tokens", ntokens, 1, MAX_TOKENS)
    return OrderedDict([
        ("format", "ckv-prefix"),
        ("version", FORMAT_VERSION),
        ("model", geom.model),
        ("salt", geom.salt),
        ("dtype", geom.dtype),
        ("layers", geom.layers),
        ("kv_heads", geom.kv_heads),
        ("head_dim", geom.head_dim),
        ("chunk_tokens", geom.chunk_tokens),
        ("layout", "KV-HCD"),
        ("chunk_bytes", geom.chunk_bytes),
        ("tokens", ntokens),
        ("chunks", geom.chunks(ntokens)),
        ("hash", hash_hex.lower()),
    ])


def manifest_json(geom, ntokens, hash_hex):
    """Canonical manifest.json text (str; ASCII, 2-space indent, final \\n)."""
    return json.dumps(manifest_dict(geom, ntokens, hash_hex), indent=2) + "\n"


def _no_dup_pairs(what):
    def hook(pairs):
        d = {}
        for k, v in pairs:
            if k in d:
                raise ValueError("%s: duplicate key %r" % (what, k))
            d[k] = v
        return d
    return hook


def parse_manifest(text, what="manifest.json"):
    """Parse and validate a manifest (any key order / whitespace; unknown keys
    ignored). Returns (geom, ntokens, hash_hex). ValueError names `what` and
    the field."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as ex:
            raise ValueError("%s: not UTF-8 (%s)" % (what, ex))
    try:
        obj = json.loads(text, object_pairs_hook=_no_dup_pairs(what))
    except ValueError as ex:
        if str(ex).startswith(what + ":"):
            raise
        raise ValueError("%s: not valid JSON (%s)" % (what, ex))
    if not isinstance(obj, dict):
        raise ValueError("%s: top level must be an object" % what)

    def need(key):
        if key not in obj:
            raise ValueError("%s: missing field \"%s\"" % (what, key))
        return obj[key]

    fmt = need("format")
    if fmt != "ckv-prefix":
        raise ValueError("%s: format: %r, expected \"ckv-prefix\"" % (what, fmt))
    ver = need("version")
    _check_int("%s: version" % what, ver, 1, 0x7FFFFFFF)
    if ver > FORMAT_VERSION:
        raise ValueError("%s: version: %d is newer than supported (%d)"
                         % (what, ver, FORMAT_VERSION))
    layout = obj.get("layout", "KV-HCD")  # optional; when present must be KV-HCD
    if layout != "KV-HCD":
        raise ValueError("%s: layout: %r, expected \"KV-HCD\"" % (what, layout))
    geom = Geometry(model=need("model"), salt=obj.get("salt", ""), dtype=need("dtype"),
                    layers=need("layers"), kv_heads=need("kv_heads"),
                    head_dim=need("head_dim"), chunk_tokens=need("chunk_tokens"),
                    what=what)
    n = need("tokens")
    _check_int("%s: tokens" % what, n, 1, MAX_TOKENS)
    m = geom.chunks(n)
    if "chunk_bytes" in obj:
        cb = obj["chunk_bytes"]
        _check_int("%s: chunk_bytes" % what, cb, 0, 1 << 62)
        if cb != geom.chunk_bytes:
            raise ValueError("%s: chunk_bytes: %d, expected %d"
                             % (what, cb, geom.chunk_bytes))
    if "chunks" in obj:
        c = obj["chunks"]
        _check_int("%s: chunks" % what, c, 0, 1 << 62)
        if c != m:
            raise ValueError("%s: chunks: %d, expected %d" % (what, c, m))
    h = need("hash")
    if not isinstance(h, str) or not _HEX_RE.match(h):
        raise ValueError("%s: hash: %r is not 32 lowercase hex digits" % (what, h))
    return geom, n, h


# ---------------------------------------------------------------- side files


def side_header_encode(magic, layers, chunks, per_chunk, version=FORMAT_VERSION):
    assert len(magic) == 8
    return struct.pack("<8sIIIIQ", magic, version, layers, chunks, per_chunk, 0)


def side_header_decode(b, magic, what):
    """-> (version, layers, chunks, per_chunk). The reserved field is ignored."""
    if len(b) < SIDE_HEADER:
        raise ValueError("%s: header: %d bytes, expected %d"
                         % (what, len(b), SIDE_HEADER))
    mg, ver, layers, chunks, per, _res = struct.unpack("<8sIIIIQ", b[:SIDE_HEADER])
    if mg != magic:
        raise ValueError("%s: magic: %r, expected %r" % (what, mg, magic))
    if ver < 1 or ver > FORMAT_VERSION:
        raise ValueError("%s: version: %d, expected %d" % (what, ver, FORMAT_VERSION))
    return ver, layers, chunks, per


def chunk_sum(chunk):
    """XXH3-64 (seed 0) of one whole chunk (chunk_bytes, padding included)."""
    return xxhash.xxh3_64_intdigest(bytes(chunk))


def sums_encode(sums):
    """sums: list over layers of lists over chunks of u64 -> sums.xxh3 bytes."""
    layers = len(sums)
    chunks = len(sums[0]) if layers else 0
    out = [side_header_encode(SUMS_MAGIC, layers, chunks, 1)]
    for l, row in enumerate(sums):
        if len(row) != chunks:
            raise ValueError("sums: layer %d has %d chunks, expected %d"
                             % (l, len(row), chunks))
        out.append(struct.pack(">%dQ" % chunks, *row))
    return b"".join(out)


def sums_decode(b, what="sums.xxh3", layers=None, chunks=None):
    """sums.xxh3 bytes -> list over layers of lists over chunks of u64."""
    _v, L, m, per = side_header_decode(b, SUMS_MAGIC, what)
    if per != 1:
        raise ValueError("%s: per_chunk: %d, expected 1" % (what, per))
    if layers is not None and L != layers:
        raise ValueError("%s: layers: %d, expected %d" % (what, L, layers))
    if chunks is not None and m != chunks:
        raise ValueError("%s: chunks: %d, expected %d" % (what, m, chunks))
    want = SIDE_HEADER + 8 * L * m
    if len(b) != want:
        raise ValueError("%s: size: %d bytes, expected %d" % (what, len(b), want))
    flat = struct.unpack(">%dQ" % (L * m), b[SIDE_HEADER:])
    return [list(flat[l * m:(l + 1) * m]) for l in range(L)]


def _f32_from_raw(dtype, raw):
    """numpy float32 array from raw little-endian dtype elements."""
    import numpy as np
    if dtype == "fp32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if dtype == "fp16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if dtype == "bf16":
        u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32)
    if dtype == "fp8_e4m3":  # OCP E4M3 "FN": bias 7, no infinities, S.1111.111 = NaN
        u = np.frombuffer(raw, dtype=np.uint8).astype(np.int32)
        s = np.where(u & 0x80, -1.0, 1.0).astype(np.float32)
        e = (u >> 3) & 0xF
        f = (u & 7).astype(np.float32)
        v = np.where(e == 0, f / 8.0 * 2.0 ** -6,
                     (1.0 + f / 8.0) * np.exp2(e.astype(np.float32) - 7.0))
        v = (s * v).astype(np.float32)
        v[(u & 0x7F) == 0x7F] = np.nan
        return v
    raise ValueError("dtype: %r" % dtype)


def chunk_digest(geom, chunk, valid):
    """Digest of one chunk: float32 [kv_heads][head_dim], the mean of the K
    vectors of its first `valid` token slots (fp32 arithmetic). numpy."""
    import numpy as np
    if not 1 <= valid <= geom.chunk_tokens:
        raise ValueError("digest: valid %d outside [1, %d]" % (valid, geom.chunk_tokens))
    k = _f32_from_raw(geom.dtype, bytes(chunk[:geom.half_bytes]))
    k = k.reshape(geom.kv_heads, geom.chunk_tokens, geom.head_dim)[:, :valid, :]
    return (k.sum(axis=1, dtype=np.float32) / np.float32(valid)).astype(np.float32)


def digest_encode(geom, digests):
    """digests: float32 array-like [layers][chunks][kv_heads][head_dim]."""
    import numpy as np
    a = np.asarray(digests, dtype=np.float32)
    if a.ndim != 4 or a.shape[2:] != (geom.kv_heads, geom.head_dim):
        raise ValueError("digest: shape %r, expected [L][m][%d][%d]"
                         % (a.shape, geom.kv_heads, geom.head_dim))
    return (side_header_encode(DIGEST_MAGIC, a.shape[0], a.shape[1],
                               geom.kv_heads * geom.head_dim)
            + a.astype("<f4").tobytes())


def digest_decode(b, geom, what="digest.bin"):
    import numpy as np
    _v, L, m, per = side_header_decode(b, DIGEST_MAGIC, what)
    if per != geom.kv_heads * geom.head_dim:
        raise ValueError("%s: per_chunk: %d, expected %d"
                         % (what, per, geom.kv_heads * geom.head_dim))
    want = SIDE_HEADER + 4 * L * m * per
    if len(b) != want:
        raise ValueError("%s: size: %d bytes, expected %d" % (what, len(b), want))
    return np.frombuffer(b, dtype="<f4", offset=SIDE_HEADER).astype(np.float32).reshape(
        L, m, geom.kv_heads, geom.head_dim)


# ---------------------------------------------------------------- layer data


def _bf16_bits(a):
    """float32 numpy array -> uint16 bf16 bits, round to nearest even."""
    import numpy as np
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    nan = np.isnan(a)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaN a (quiet) NaN
    return r


def _as_raw(x, geom, ntokens, what):
    """K or V of one layer -> bytes, [kv_heads][ntokens][head_dim] LE elements."""
    want = geom.kv_heads * ntokens * geom.head_dim * geom.esize
    if isinstance(x, (bytes, bytearray, memoryview)):
        b = memoryview(x).cast("B")
        if b.nbytes != want:
            raise ValueError("%s: %d bytes, expected %d" % (what, b.nbytes, want))
        return b
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor
        t = x.detach().cpu().contiguous()
        name = str(t.dtype)
        if name == "torch.bfloat16":
            import torch
            t = t.view(torch.int16)
        elif name.startswith("torch.float8"):
            import torch
            t = t.view(torch.uint8)
        x = t.numpy()
    import numpy as np
    a = np.asarray(x)
    shape = (geom.kv_heads, ntokens, geom.head_dim)
    if a.shape != shape:
        raise ValueError("%s: shape %r, expected %r" % (what, a.shape, shape))
    kind, isz, dname = a.dtype.kind, a.dtype.itemsize, a.dtype.name
    dt = geom.dtype
    if dt == "bf16":
        if kind in "ui" and isz == 2 or dname == "bfloat16":
            a = a.view("<u2") if a.dtype.byteorder != ">" else a.astype("<u2")
        elif kind == "f" and isz >= 4:
            a = _bf16_bits(a.astype(np.float32))
        else:
            raise ValueError("%s: numpy dtype %s cannot hold bf16 (use uint16 bits "
                             "or float32)" % (what, a.dtype))
    elif dt == "fp16":
        if kind == "f" or (kind in "ui" and isz == 2):
            a = a.astype("<f2") if kind == "f" else a.astype("<u2")
        else:
            raise ValueError("%s: numpy dtype %s cannot hold fp16" % (what, a.dtype))
    elif dt == "fp8_e4m3":
        if isz == 1 and (kind in "ui" or "float8" in dname):
            a = a.view(np.uint8)
        else:
            raise ValueError("%s: numpy dtype %s cannot hold fp8_e4m3 (use uint8 "
                             "bits)" % (what, a.dtype))
    elif dt == "fp32":
        if kind == "f":
            a = a.astype("<f4")
        elif kind in "ui" and isz == 4:
            a = a.astype("<u4")
        else:
            raise ValueError("%s: numpy dtype %s cannot hold fp32" % (what, a.dtype))
    return memoryview(np.ascontiguousarray(a).tobytes())


def build_layer(geom, ntokens, k, v, what="layer"):
    """KV-HCD bytes of one layer file (m * chunk_bytes) from K and V."""
    H, D, c, es = geom.kv_heads, geom.head_dim, geom.chunk_tokens, geom.esize
    kb = _as_raw(k, geom, ntokens, what + ": K")
    vb = _as_raw(v, geom, ntokens, what + ": V")
    m = geom.chunks(ntokens)
    cbytes, half = geom.chunk_bytes, geom.half_bytes
    out = bytearray(m * cbytes)
    row = D * es
    for j in range(m):
        t0 = j * c
        nt = min(c, ntokens - t0)
        for part, src in ((0, kb), (1, vb)):
            base = j * cbytes + part * half
            for h in range(H):
                s = (h * ntokens + t0) * row
                d = base + h * c * row
                out[d:d + nt * row] = src[s:s + nt * row]
    return bytes(out)


def _layer_pair(layers, l):
    item = layers(l) if callable(layers) else layers[l]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    # a single [2][H][n][D] array
    if hasattr(item, "shape") and len(item.shape) == 4 and item.shape[0] == 2:
        return item[0], item[1]
    raise ValueError("layer %d: expected a (K, V) pair" % l)


def _write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_export(dirpath, geom, tokens, layers, sums=True):
    """Write an exported cache directory. layers: a sequence of L (K, V) pairs
    or a callable layer -> (K, V); K and V shaped [kv_heads][n][head_dim].
    Writes layer files, tokens.bin, sums.xxh3 (unless sums=False) and
    manifest.json last. Returns the prefix hash (hex)."""
    tb = tokens_bytes(tokens)
    n = len(tb) // 4
    _check_int("tokens", n, 1, MAX_TOKENS)
    if not callable(layers) and len(layers) != geom.layers:
        raise ValueError("layers: %d given, geometry has %d" % (len(layers), geom.layers))
    h = chain(geom, tb)[-1].hex()
    m = geom.chunks(n)
    os.makedirs(dirpath, exist_ok=True)
    allsums = []
    cb = geom.chunk_bytes
    for l in range(geom.layers):
        k, v = _layer_pair(layers, l)
        data = build_layer(geom, n, k, v, what="layer %d" % l)
        allsums.append([chunk_sum(data[j * cb:(j + 1) * cb]) for j in range(m)])
        _write_file(os.path.join(dirpath, layer_name(l)), data)
    _write_file(os.path.join(dirpath, "tokens.bin"), tb)
    if sums:
        _write_file(os.path.join(dirpath, "sums.xxh3"), sums_encode(allsums))
    _write_file(os.path.join(dirpath, "manifest.json"),
                manifest_json(geom, n, h).encode("ascii"))
    return h


def read_export(dirpath, verify_sums=True):
    """Read and validate an exported cache directory.
    Returns (geom, tokens (list of int), layers (list of bytes, each
    m * chunk_bytes)). ValueError names the file and field on bad input."""
    def p(name):
        return os.path.join(dirpath, name)

    def slurp(name):
        try:
            with open(p(name), "rb") as f:
                return f.read()
        except OSError as ex:
            raise ValueError("%s: cannot read (%s)" % (p(name), ex.strerror or ex))

    geom, n, h = parse_manifest(slurp("manifest.json"), what=p("manifest.json"))
    tb = slurp("tokens.bin")
    if len(tb) != 4 * n:
        raise ValueError("%s: size: %d bytes, expected %d (tokens = %d)"
                         % (p("tokens.bin"), len(tb), 4 * n, n))
    got = chain(geom, tb)[-1].hex()
    if got != h:
        raise ValueError("%s: hash: manifest says %s, tokens.bin hashes to %s"
                         % (p("manifest.json"), h, got))
    m = geom.chunks(n)
    cb = geom.chunk_bytes
    layers = []
    for l in range(geom.layers):
        data = slurp(layer_name(l))
        if len(data) != m * cb:
            raise ValueError("%s: size: %d bytes, expected %d (%d chunks of %d)"
                             % (p(layer_name(l)), len(data), m * cb, m, cb))
        layers.append(data)
    if verify_sums and os.path.exists(p("sums.xxh3")):
        what = p("sums.xxh3")
        sums = sums_decode(slurp("sums.xxh3"), what, layers=geom.layers, chunks=m)
        for l in range(geom.layers):
            for j in range(m):
                s = chunk_sum(layers[l][j * cb:(j + 1) * cb])
                if s != sums[l][j]:
                    raise ValueError("%s: layer %d chunk %d: sum %016x, %s has %016x"
                                     % (what, l, j, sums[l][j], layer_name(l), s))
    return geom, tokens_from_bytes(tb), layers


def layer_kv(geom, ntokens, data):
    """Inverse of build_layer: (K bytes, V bytes), each [kv_heads][n][head_dim]."""
    H, D, c, es = geom.kv_heads, geom.head_dim, geom.chunk_tokens, geom.esize
    cbytes, half = geom.chunk_bytes, geom.half_bytes
    row = D * es
    out = (bytearray(H * ntokens * row), bytearray(H * ntokens * row))
    mv = memoryview(data)
    for j in range(geom.chunks(ntokens)):
        t0 = j * c
        nt = min(c, ntokens - t0)
        for part in (0, 1):
            base = j * cbytes + part * half
            for h in range(H):
                s = base + h * c * row
                d = (h * ntokens + t0) * row
                out[part][d:d + nt * row] = mv[s:s + nt * row]
    return bytes(out[0]), bytes(out[1])


_NP_RAW = {"bf16": "<u2", "fp16": "<f2", "fp8_e4m3": "u1", "fp32": "<f4"}


def layer_arrays(geom, ntokens, data):
    """(K, V) numpy arrays [kv_heads][n][head_dim] from a layer file's bytes.
    bf16 comes back as uint16 bits, fp8_e4m3 as uint8 bits."""
    import numpy as np
    k, v = layer_kv(geom, ntokens, data)
    shape = (geom.kv_heads, ntokens, geom.head_dim)
    dt = _NP_RAW[geom.dtype]
    return (np.frombuffer(k, dtype=dt).reshape(shape),
            np.frombuffer(v, dtype=dt).reshape(shape))


# ---------------------------------------------------------------- store


def read_store_prefix(store, hash_hex):
    """Read a published prefix straight from a store's files (no LMDB):
    STORE/prefix/<2 hex>/<hash>.json and its segments. Returns (geom, tokens,
    layers) like read_export. For debugging and cross-checks."""
    hash_hex = hash_hex.lower()
    rec_path = os.path.join(store, "prefix", hash_hex[:2], hash_hex + ".json")
    try:
        with open(rec_path, "rb") as f:
            raw = f.read()
    except OSError as ex:
        raise ValueError("%s: cannot read (%s)" % (rec_path, ex.strerror or ex))
    geom, n, h = parse_manifest(raw, what=rec_path)
    rec = json.loads(raw.decode("utf-8"))
    ext = rec.get("extents")
    if not isinstance(ext, list) or not ext:
        raise ValueError("%s: extents: missing or empty" % rec_path)
    m, cb, c = geom.chunks(n), geom.chunk_bytes, geom.chunk_tokens
    tb = bytearray()
    layers = [bytearray() for _ in range(geom.layers)]
    done = 0
    for i, e in enumerate(ext):
        try:
            seg, first, count = e["segment"], e["first"], e["count"]
        except (TypeError, KeyError):
            raise ValueError("%s: extents[%d]: needs segment, first, count" % (rec_path, i))
        if not isinstance(seg, str) or "/" in seg or len(seg) < 3:
            raise ValueError("%s: extents[%d].segment: %r" % (rec_path, i, seg))
        _check_int("%s: extents[%d].first" % (rec_path, i), first, 0, MAX_TOKENS)
        _check_int("%s: extents[%d].count" % (rec_path, i), count, 1, MAX_TOKENS)
        sdir = os.path.join(store, "seg", seg[:2], seg)
        with open(os.path.join(sdir, "tokens.bin"), "rb") as f:
            stoks = f.read()
        lo = first * c * 4
        hi = min((first + count) * c * 4, len(stoks))
        tb += stoks[lo:hi]
        for l in range(geom.layers):
            with open(os.path.join(sdir, layer_name(l)), "rb") as f:
                f.seek(first * cb)
                d = f.read(count * cb)
            if len(d) != count * cb:
                raise ValueError("%s: short (%d bytes at chunk %d, want %d)"
                                 % (os.path.join(sdir, layer_name(l)), len(d), first, count * cb))
            layers[l] += d
        done += count
    if done != m:
        raise ValueError("%s: extents: cover %d chunks, expected %d" % (rec_path, done, m))
    if len(tb) != 4 * n:
        raise ValueError("%s: tokens from segments: %d bytes, expected %d"
                         % (rec_path, len(tb), 4 * n))
    got = chain(geom, bytes(tb))[-1].hex()
    if got != h:
        raise ValueError("%s: hash: %s, segments' tokens hash to %s" % (rec_path, h, got))
    return geom, tokens_from_bytes(bytes(tb)), [bytes(x) for x in layers]
