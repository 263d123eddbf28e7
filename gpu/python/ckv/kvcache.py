"""ckv.kvcache — KV caches from torch tensors, in the exact format of docs/FORMAT.md.

An engine that has each layer's post-RoPE K and V as tensors [kv_heads][n][head_dim]
(any device, any float dtype) writes the exported cache directory with
``write_cache`` (vectorised: one permute per layer instead of format.py's per-chunk
loop; byte-identical to ``ckv.format.write_export``, tested), then publishes it:

    h = write_cache("out/", geom, tokens, [(K0, V0), (K1, V1), ...])
    import_cache("/var/lib/ckv", "out/")          # `ckv import STORE DIR`
    publish_to_mount("/mnt/ckv", geom, tokens, layers)   # or: the mount's import/ area

and reads one back with ``read_cache_kv`` (np.memmap of the layer files, chunks
gathered with torch), e.g. to check a round trip or to run Re-Prefill from an
exported directory without the loader.

``shape_string`` is the description ``Loader.match`` takes for a geometry that is
not a preset. Needs torch for tensor input; numpy and xxhash always.
"""

import errno
import os
import shutil
import subprocess
import time

import numpy as np

from . import format as F

__all__ = ["shape_string", "torch_dtype", "layer_bytes", "write_cache", "import_cache",
           "find_ckv", "publish_to_mount", "read_cache_kv", "chunk_valid"]

try:
    import torch
except ImportError:  # numpy input still works (through format.build_layer)
    torch = None


def shape_string(geom):
    """Loader.match's shape description of a geometry:
    "model=<id>,dtype=<dtype>,layers=L,kv_heads=H,head_dim=D,chunk=c[,salt=<salt>]"."""
    for what, s in (("model", geom.model), ("salt", geom.salt)):
        if "," in s or "=" in s:
            raise ValueError("geometry %s %r: ',' and '=' cannot travel in a loader shape "
                             "string; choose another model id / salt" % (what, s))
    s = ("model=%s,dtype=%s,layers=%d,kv_heads=%d,head_dim=%d,chunk=%d"
         % (geom.model, geom.dtype, geom.layers, geom.kv_heads, geom.head_dim,
            geom.chunk_tokens))
    if geom.salt:
        s += ",salt=" + geom.salt
    return s


def torch_dtype(name):
    """torch dtype of a format dtype name (bf16, fp16, fp32, fp8_e4m3)."""
    if torch is None:
        raise ImportError("torch is needed")
    m = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name in m:
        return m[name]
    if name == "fp8_e4m3" and hasattr(torch, "float8_e4m3fn"):
        return torch.float8_e4m3fn
    raise ValueError("dtype %r: no torch dtype here" % (name,))


def chunk_valid(n, c, chunk):
    """Valid token slots of chunk `chunk` of an n-token prefix (0 past its end)."""
    return max(0, min(c, n - chunk * c))


def _raw_u8(t):
    """A contiguous CPU torch tensor -> numpy uint8 view of its bytes."""
    if t.element_size() == 2:
        a = t.view(torch.int16).numpy()
    elif t.element_size() == 1:
        a = t.view(torch.uint8).numpy()
    else:
        a = t.view(torch.int32).numpy()
    return a.view(np.uint8)


def layer_bytes(geom, n, k, v):
    """One layer file (m * chunk_bytes bytes, numpy uint8 [m][chunk_bytes]) in KV-HCD
    from K and V [kv_heads][n][head_dim]. torch tensors are converted to the
    geometry's dtype (round to nearest even) on their own device and permuted in one
    go; anything else goes through ckv.format.build_layer."""
    H, D, c = geom.kv_heads, geom.head_dim, geom.chunk_tokens
    m = geom.chunks(n)
    if torch is None or not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return np.frombuffer(F.build_layer(geom, n, k, v), dtype=np.uint8).reshape(
            m, geom.chunk_bytes)
    for what, x in (("K", k), ("V", v)):
        if tuple(x.shape) != (H, n, D):
            raise ValueError("%s: shape %s, expected (%d, %d, %d)"
                             % (what, tuple(x.shape), H, n, D))
    dt = torch_dtype(geom.dtype)
    t = torch.stack([k.detach(), v.detach()]).to(dt)          # [2][H][n][D]
    pad = m * c - n
    if pad:
        t = torch.cat([t, t.new_zeros((2, H, pad, D))], dim=2)
    t = t.reshape(2, H, m, c, D).permute(2, 0, 1, 3, 4).contiguous()  # [m][2][H][c][D]
    raw = _raw_u8(t.cpu()).reshape(m, 2 * geom.half_bytes)
    if geom.chunk_bytes == 2 * geom.half_bytes:
        return raw
    out = np.zeros((m, geom.chunk_bytes), dtype=np.uint8)
    out[:, :2 * geom.half_bytes] = raw
    return out


def _write(path, data, fsync):
    with open(path, "wb") as f:
        f.write(data)  # bytes or a C-contiguous numpy array
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_cache(dirpath, geom, tokens, layers, sums=True, fsync=True):
    """Write an exported cache directory (docs/FORMAT.md §4) — the same bytes as
    ckv.format.write_export. layers: L pairs (K, V) or a callable layer -> (K, V),
    each [kv_heads][n][head_dim]. Files go in write_export's order (layers,
    tokens.bin, sums.xxh3, manifest.json last), so a staging area that publishes on a
    complete manifest sees everything before it. Returns the prefix hash."""
    tb = F.tokens_bytes(tokens)
    n = len(tb) // 4
    if n < 1:
        raise ValueError("tokens: a prefix has at least one token")
    if not callable(layers) and len(layers) != geom.layers:
        raise ValueError("layers: %d given, geometry has %d" % (len(layers), geom.layers))
    h = F.chain(geom, tb)[-1].hex()
    m = geom.chunks(n)
    os.makedirs(dirpath, exist_ok=True)
    allsums = []
    for l in range(geom.layers):
        item = layers(l) if callable(layers) else layers[l]
        k, v = item
        data = layer_bytes(geom, n, k, v)
        if sums:
            allsums.append([F.chunk_sum(data[j]) for j in range(m)])
        _write(os.path.join(dirpath, F.layer_name(l)), data, fsync)
    _write(os.path.join(dirpath, "tokens.bin"), tb, fsync)
    if sums:
        _write(os.path.join(dirpath, "sums.xxh3"), F.sums_encode(allsums), fsync)
    _write(os.path.join(dirpath, "manifest.json"),
           F.manifest_json(geom, n, h).encode("ascii"), fsync)
    return h


def find_ckv():
    """The `ckv` tool: $CKV, else build/ckv of this source tree, else PATH."""
    c = os.environ.get("CKV")
    if c and os.access(c, os.X_OK):
        return c
    here = os.path.dirname(os.path.abspath(__file__))
    c = os.path.normpath(os.path.join(here, "..", "..", "..", "build", "ckv"))
    if os.access(c, os.X_OK):
        return c
    c = shutil.which("ckv")
    if c:
        return c
    raise FileNotFoundError(errno.ENOENT, "cannot find the ckv tool (set $CKV or build it)")


def import_cache(store, dirpath, ckv=None):
    """`ckv import -q STORE DIR`: publish an exported directory into a store. Returns the
    prefix hash. RuntimeError carries ckv's message."""
    cmd = [ckv or find_ckv(), "import", "-q", store, dirpath]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise RuntimeError("ckv import %s %s: %s" % (store, dirpath,
                                                     r.stderr.decode(errors="replace").strip()))
    return r.stdout.decode().strip().split()[-1]


def publish_to_mount(mount, geom, tokens, layers, name=None, timeout=30.0, fsync=True):
    """Write a cache into a ckvfs mount's write area MOUNT/import/<name>/ file by file
    (manifest last) and wait until the daemon has published it under
    MOUNT/by-hash/<hash>/. Returns the hash. On a failed verification the daemon
    leaves the staging area with the reason in the xattr user.ckv.error: raised as
    RuntimeError; TimeoutError when nothing happens within timeout seconds."""
    h = F.prefix_hash(geom, tokens)
    name = name or h
    stage = os.path.join(mount, "import", name)
    write_cache(stage, geom, tokens, layers, fsync=fsync)
    done = os.path.join(mount, "by-hash", h, "manifest.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(done):
            return h
        try:
            err = os.getxattr(stage, "user.ckv.error")
            raise RuntimeError("%s: %s" % (stage, err.decode(errors="replace")))
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError("%s: not published under by-hash/%s within %.0f s" % (stage, h, timeout))


def read_cache_kv(dirpath, chunks=None, ntokens=None, device="cpu", layers=None):
    """K and V of an exported cache directory (or a mount's by-hash/<hash>/), through
    np.memmap of the layer files: a list over layers of (K, V) torch tensors
    [kv_heads][T][head_dim] in the cache's dtype, where T are the valid token slots of
    `chunks` (ascending chunk ids; default all) — slots past the prefix's end (or past
    ntokens, to use only its first ntokens) are dropped. Only the bytes of those chunks
    are touched."""
    if torch is None:
        raise ImportError("torch is needed")
    with open(os.path.join(dirpath, "manifest.json"), "rb") as f:
        geom, n, _h = F.parse_manifest(f.read(), what=os.path.join(dirpath, "manifest.json"))
    n_use = n if ntokens is None else min(n, ntokens)
    m, c = geom.chunks(n), geom.chunk_tokens
    ids = np.arange(geom.chunks(n_use)) if chunks is None else np.asarray(chunks, dtype=np.int64)
    valid = sum(chunk_valid(n_use, c, int(j)) for j in ids)
    dt = torch_dtype(geom.dtype)
    out = []
    for l in (range(geom.layers) if layers is None else layers):
        mm = np.memmap(os.path.join(dirpath, F.layer_name(l)), dtype=np.uint8, mode="r",
                       shape=(m, geom.chunk_bytes))
        sel = np.ascontiguousarray(mm[ids, :2 * geom.half_bytes])
        t = torch.from_numpy(sel).to(device)
        kv = t.view(dt).reshape(len(ids), 2, geom.kv_heads, c, geom.head_dim)
        kv = kv.permute(1, 2, 0, 3, 4).reshape(2, geom.kv_heads, len(ids) * c, geom.head_dim)
        out.append((kv[0, :, :valid].contiguous(), kv[1, :, :valid].contiguous()))
        del mm
    return out
