import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # specs/ and generated/ paths are relative to the checkout

SPECS = ["softmax", "cosine_sim", "memory_efficient", "local", "talking_heads"]


def _interpret_stdlib_jit_calls() -> None:
    """Let interpreted kernels call Triton's @jit standard library whatever the import order.

    Triton's own helpers (tl.zeros, tl.max, tl.sum, tl.sigmoid, tl.cdiv, ...) are @triton.jit
    functions, decorated once when triton.language is first imported: as InterpretedFunction if
    TRITON_INTERPRET=1 then, else as JITFunction. Whatever first imports triton without it - torch.compile /
    inductor does, as does any compiled-kernel test - leaves JITFunctions behind, and an interpreted kernel
    calling one hits JITFunction.__call__, which always raises "Cannot call @triton.jit'd outside of the
    scope of a kernel" (the interpreter patches only builtins, not these). Here such a call, made while
    the interpreter is on, runs the function as the interpreter would have wrapped it. Compilation never
    goes through __call__ (the code generator inlines JITFunctions), so compiled kernels are unaffected.
    """
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    original = JITFunction.__call__
    if getattr(original, "_kernelsearch_interprets", False):
        return
    interpreted = {}

    def __call__(self, *args, **kwargs):
        if not triton.knobs.runtime.interpret:
            return original(self, *args, **kwargs)
        if self.fn not in interpreted:
            interpreted[self.fn] = InterpretedFunction(self.fn)
        return interpreted[self.fn](*args, **kwargs)

    __call__._kernelsearch_interprets = True
    JITFunction.__call__ = __call__


_interpret_stdlib_jit_calls()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def spec_path(name: str) -> str:
    return f"specs/{name}.yaml"
