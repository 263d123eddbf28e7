"""ckv.codedata — text that exists on any Python machine: its own Python source files.

The tiny model of tools/train_tiny_qwen.py is trained on, and tools/quality measures
on, the .py files under the Python installation (the standard library under
/usr/lib/python3*/ and the interpreter's own, and site-packages). Files are
deduplicated by content and split by a hash of their content, so a held-out file
never shares its bytes with a training file (two copies of one file land on the
same side). Tokens are bytes (vocabulary 256).
"""

import glob
import hashlib
import os
import site
import sysconfig

__all__ = ["default_roots", "collect", "windows"]


def default_roots():
    """Directories holding Python source on this machine (real paths, no repeats)."""
    cands = sorted(glob.glob("/usr/lib/python3*"))
    for key in ("stdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            cands.append(p)
    try:
        cands += site.getsitepackages()
    except AttributeError:
        pass
    out = []
    for c in cands:
        r = os.path.realpath(c)
        if os.path.isdir(r) and not any(r == o or r.startswith(o + os.sep) for o in out):
            out = [o for o in out if not o.startswith(r + os.sep)] + [r]
    return sorted(out)


def collect(roots=None, heldout_percent=10, max_file_bytes=1 << 20):
    """Walk roots for *.py files (no symlinks, at most max_file_bytes each), keep one file
    per distinct content, split by sha1(content): held out when int(sha1[:8], 16) % 100 <
    heldout_percent. Returns (train, heldout): lists of (path, sha1 hex, size), sorted by
    path."""
    seen = set()
    train, held = [], []
    for root in roots or default_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                if not fn.endswith(".py"):
                    continue
                p = os.path.join(dirpath, fn)
                try:
                    if os.path.islink(p) or os.path.getsize(p) > max_file_bytes:
                        continue
                    with open(p, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                if not data:
                    continue
                h = hashlib.sha1(data).hexdigest()
                if h in seen:
                    continue
                seen.add(h)
                (held if int(h[:8], 16) % 100 < heldout_percent else train).append(
                    (p, h, len(data)))
    train.sort()
    held.sort()
    return train, held


def windows(files, length, count, seed):
    """count windows of `length` bytes from distinct files at least that long (one window
    per file, files and offsets drawn with a seeded generator). Returns a list of
    (path, offset, bytes)."""
    import random
    rng = random.Random(seed)
    long_enough = [f for f in files if f[2] >= length]
    rng.shuffle(long_enough)
    out = []
    for path, h, size in long_enough:
        if len(out) >= count:
            break
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha1(data).hexdigest() != h:    # changed since the split
            continue
        off = rng.randrange(0, size - length + 1)
        out.append((path, off, data[off:off + length]))
    return out
