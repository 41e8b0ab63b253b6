"""kernelsearch: a compiler and autotuner for attention kernels.

    import kernelsearch
    attn = kernelsearch.load("specs/cosine_sim.yaml", backend="torch", scale=10.0)
    o = attn(q, k, v, mask=key_padding_mask)
"""
__version__ = "0.1.0"

from .api import Attention, load  # noqa: E402
from .errors import SpecError, UsageError  # noqa: E402
from .spec import load_spec  # noqa: E402

__all__ = ["Attention", "SpecError", "UsageError", "load", "load_spec", "__version__"]
