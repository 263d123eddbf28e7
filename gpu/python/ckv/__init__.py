"""ckv — Python side of ckvfs.

Submodules: format (docs/FORMAT.md, pure Python + xxhash) and loader (libckvgpu
through ctypes: Loader, Prefix, Pipeline; docs/LOADER.md). The loader's names
are importable from here (``from ckv import Loader``); they load lazily, so
``import ckv.format`` does not pull in torch or the shared library.
"""
from . import format  # noqa: F401  (pure Python + xxhash)

_LOADER_NAMES = ("CkvError", "Loader", "Prefix", "Pipeline", "LayerView", "Shape", "select",
                 "key_scores", "kv_tensors", "MODES", "PARTS")

__all__ = ["format", "loader"] + list(_LOADER_NAMES)


def __getattr__(name):
    if name == "loader" or name in _LOADER_NAMES:
        import importlib
        mod = importlib.import_module(__name__ + ".loader")  # sets ckv.loader
        return mod if name == "loader" else getattr(mod, name)
    raise AttributeError(f"module 'ckv' has no attribute {name!r}")
