"""ckv — Python side of ckvfs. Submodules: format (docs/FORMAT.md)."""
from . import format  # noqa: F401  (pure Python + xxhash)
