import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # specs/ and generated/ paths are relative to the checkout

SEEDS = ["softmax", "cosine_sim", "memory_efficient", "local", "talking_heads"]
GALLERY = ["gqa", "alibi", "softcap", "sliding_window", "document", "prefix_lm", "t5_bias",   # issue 13's, tests/test_gallery.py
           "sinks", "sigmoid", "diff_attn"]                                                 # tests/test_normalisers.py
SPECS = SEEDS + GALLERY


# interpreted kernels may call Triton's @jit standard library whatever imported triton first (the
# backend does this when it imports an interpreted module; the tests set TRITON_INTERPRET late)
from kernelsearch.backends.triton_backend import interpret_stdlib_jit_calls  # noqa: E402

interpret_stdlib_jit_calls()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def spec_path(name: str) -> str:
    return f"specs/{name}.yaml"
