"""Ahead-of-time compilation of the generated forward kernels, without a GPU.

`aot_check(spec_or_graph, params, config, arch=90)` compiles the kernel of a spec at one config
for `sm_<arch>` with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and
reports what the artifact tells:

    ok          compiled, and its shared memory fits the architecture's per-block limit
    error       the compiler's error (first lines), or "out of resources: shared memory ..."
    shared      bytes of shared memory per program
    n_regs      registers per thread (from the cubin: cuobjdump -res-usage, shipped with triton)
    n_spills    bytes of spill stores (ptxas -v on the PTX); None where the tools are missing
    compile_s   seconds

It is what the tuner calls to drop configs that cannot fit before timing anything. The kernel is
specialised the way Triton's JIT specialises a typical call: contiguous feature dims (stride 1
is a constexpr), 16-byte aligned pointers and strides; `sizes` sets the head dims (default
D = 64) and the number of heads (default H = 8, which matters for heads-in-tile kernels).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# bytes of shared memory one block may use (opt-in maximum), per compute capability
SHARED_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                100: 232448, 103: 232448, 120: 101376}
DEFAULT_SIZES = {"d": 64, "h": 8}
_TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32",
                    "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}


def _graph_of(spec_or_graph, params, present):
    from ..compiler import compile_graph
    from ..ir import Graph
    from ..spec import Spec, load_spec
    if isinstance(spec_or_graph, Graph):
        return spec_or_graph
    spec = spec_or_graph if isinstance(spec_or_graph, Spec) else load_spec(spec_or_graph)
    return compile_graph(spec, params or None, present)


def nvidia_tool(name: str) -> str | None:
    """A CUDA binary shipped in the triton wheel (triton/backends/nvidia/bin), else on PATH."""
    try:
        import triton
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return str(path)
    except Exception:
        pass
    return shutil.which(name)


def _pointer_types(p, elem: str) -> dict:
    from .triton_fwd import KEY_BLOCK_LISTS, QUERY_BLOCK_LISTS, block_list_args
    types = {t.ptr: {"float": f"*{elem}", "bool": "*i1", "int": "*i64"}[t.dtype] for t in p.tensors + p.materialized}
    types.update({"out_ptr": f"*{elem}", "lse_ptr": "*fp32"})
    types.update({t.ptr: "*i32" for t in block_list_args(KEY_BLOCK_LISTS + QUERY_BLOCK_LISTS)})
    return types


def _block_list_strides() -> set:
    """Strides of the block mask's lists: their rows hold 1 + blocks entries (no multiple of 16)."""
    from .triton_fwd import KEY_BLOCK_LISTS, QUERY_BLOCK_LISTS, block_list_args
    return {s for t in block_list_args(KEY_BLOCK_LISTS + QUERY_BLOCK_LISTS) for s in t.strides}


def _unit_strides(tensors) -> set:
    """Stride args of feature dims: rows are contiguous along their feature dim (a constexpr 1)."""
    return {t.strides[-1] for t in tensors if t.dims and t.dims[-1] not in ("b", "h", "i", "j")}


def aot_signature(p, config: dict, sizes: dict, dtype: str, prepass: bool = False):
    """(signature, constexprs, attrs) for ASTSource, mirroring what the JIT specialises at a call.

    prepass: for the k-prologue prepass kernel instead of the forward kernel."""
    from .triton_fwd import PREPASS_BLOCK_N, TensorArg
    elem = _TORCH_TO_TRITON.get(str(dtype), str(dtype))
    args = p.prepass_runtime_args() if prepass else p.runtime_args()
    out = TensorArg("out", "out_ptr", p.out_dims, "float", False, p.out_strides)
    signature, constexprs, attrs = _signature(p, args, _pointer_types(p, elem),
                                              _unit_strides(list(p.tensors) + list(p.materialized) + [out]),
                                              p.prepass_constexpr_args() if prepass else p.constexpr_args(), sizes)
    if prepass:
        constexprs["BLOCK_N"] = PREPASS_BLOCK_N
        return signature, constexprs, attrs
    constexprs["BLOCK_M"] = int(config["BLOCK_M"])
    constexprs["BLOCK_N"] = int(config["BLOCK_N"])
    _channels_and_precision(p, constexprs, sizes, elem)
    constexprs["STORE_LSE"] = bool(config.get("STORE_LSE", False))
    return signature, constexprs, attrs


def aot_signature_backward(bp, config: dict, sizes: dict, dtype: str):
    """(signature, constexprs, attrs) of the backward kernels (dq and dkdv take the same arguments)."""
    p = bp.forward
    elem = _TORCH_TO_TRITON.get(str(dtype), str(dtype))
    pointers = _pointer_types(p, elem)
    pointers.update({"do_ptr": f"*{elem}", "delta_ptr": "*fp32"})
    for name, g in zip(bp.differentiable, bp.grads):
        pointers[g.ptr] = "*fp32" if name in bp.atomic or name in bp.summed else f"*{elem}"
    signature, constexprs, attrs = _signature(p, bp.runtime_args(), pointers,
                                              _unit_strides(list(p.tensors) + [bp.dout] + list(bp.grads)),
                                              bp.constexpr_args(), sizes)
    constexprs["BLOCK_M"] = int(config["BLOCK_M_BWD"])
    constexprs["BLOCK_N"] = int(config["BLOCK_N_BWD"])
    _channels_and_precision(p, constexprs, sizes, elem)
    return signature, constexprs, attrs


def _channels_and_precision(p, constexprs: dict, sizes: dict, elem: str) -> None:
    if p.channels:
        heads = int(sizes.get("h", DEFAULT_SIZES["h"]))
        constexprs["CP"] = 1 << max(0, p.streams * heads - 1).bit_length()
    constexprs["DOT_PRECISION"] = "ieee" if elem == "fp32" else "tf32"


def _signature(p, args, pointer_type, unit_strides, constexpr_names, sizes):
    from . import names
    from .triton_fwd import MIN_DOT_BLOCK
    signature, constexprs, attrs = {}, {}, {}
    list_strides = _block_list_strides() - set(unit_strides)
    host_type = {a: {"float": "fp32", "int": "i32", "bool": "i1"}.get(dtype_, "fp32") for a, _, dtype_, _ in p.host}
    for index, arg in enumerate(args):
        if arg in pointer_type:
            signature[arg] = pointer_type[arg]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in unit_strides:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg in list_strides:
            signature[arg] = "i32"
        elif arg.startswith("stride_"):
            signature[arg] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in host_type:
            signature[arg] = host_type[arg]
        else:
            signature[arg] = "i32"
    for name in constexpr_names:
        signature[name] = "constexpr"
    for feature, block in p.features:
        size = int(sizes.get(feature, DEFAULT_SIZES["d"]))
        constexprs[block] = max(MIN_DOT_BLOCK, 1 << max(0, size - 1).bit_length())
        constexprs[names.axis_name("EVEN", feature)] = constexprs[block] == size
    return signature, constexprs, attrs


def _short(error: BaseException, lines: int = 12) -> str:
    text = f"{type(error).__name__}: {error}"
    parts = text.strip().splitlines()
    return "\n".join(parts[-lines:]) if len(parts) > lines else text.strip()


def resource_usage(compiled, arch: int) -> dict:
    """Registers and spills of a compiled kernel: cuobjdump on the cubin, ptxas -v on the PTX."""
    out = {"n_regs": None, "n_spills": None, "stack": None}
    cubin = compiled.asm.get("cubin") if hasattr(compiled, "asm") else None
    ptx = compiled.asm.get("ptx") if hasattr(compiled, "asm") else None
    with tempfile.TemporaryDirectory(prefix="kernelsearch-aot-") as tmp:
        cuobjdump = nvidia_tool("cuobjdump")
        if cubin and cuobjdump:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            try:
                text = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True,
                                      timeout=60).stdout
                m = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
                if m:
                    out["n_regs"], out["stack"] = int(m.group(1)), int(m.group(2))
            except (OSError, subprocess.SubprocessError):
                pass
        ptxas = nvidia_tool("ptxas")
        if ptx and ptxas:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
            gpu = target.group(1) if target else f"sm_{arch}"
            try:
                run = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k2.cubin")],
                                     capture_output=True, text=True, timeout=300)
                log = run.stdout + run.stderr
                m = re.search(r"(\d+) bytes spill stores", log)
                if m:
                    out["n_spills"] = int(m.group(1))
                m = re.search(r"Used (\d+) registers", log)
                if m and out["n_regs"] is None:
                    out["n_regs"] = int(m.group(1))
            except (OSError, subprocess.SubprocessError):
                pass
    return out


class CompilerRejected(Exception):
    """triton.compile refused a kernel (its error is the cause): what a config's check reports."""


def aot_check(spec_or_graph, params=None, config=None, arch=90, *, sizes: dict | None = None,
              dtype: str = "float16", present=None, resources: bool = True, direction: str = "fwd") -> dict:
    """Compile the kernels for sm_<arch> without a GPU; see the module docstring.

    direction "fwd": the forward kernel (and its prepass); "fwd+bwd": also the training path's
    kernels - the core graph's forward saving the row log-sum-exp, and the dq and dkdv kernels at
    the *_BWD knobs. `shared`, `n_regs`, `n_spills` are the largest over the kernels; `kernels`
    has each one's."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..backends.triton_backend import default_config, load_module
    from .files import triton_file, triton_training_file
    from .triton_fwd import CodegenError, plan

    arch = int(str(arch).lower().replace("sm_", "").replace("sm", "").rstrip("a"))
    if language_patched_by_interpreter():
        return _aot_check_in_subprocess(spec_or_graph, params, config, arch, sizes, dtype, present, resources,
                                        direction)
    start = time.perf_counter()
    result = {"ok": False, "error": None, "shared": None, "n_regs": None, "n_spills": None, "compile_s": None,
              "arch": arch, "config": None, "kernels": {}}
    target = GPUTarget("cuda", arch, 32)

    def compile_kernel(fn, signature, constexprs, attrs, warps, stages, label=""):
        log = io.StringIO()
        with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            triton.knobs.nvidia.dump_ptxas_log = True    # Triton prints ptxas -v's report: keep it
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                          options={"num_warps": int(warps), "num_stages": int(stages)})
            except Exception as e:   # whatever the compiler says of this config is its answer
                raise CompilerRejected(e) from e
        shared = int(getattr(compiled.metadata, "shared", 0) or 0)
        entry = {"shared": shared, "n_regs": None, "n_spills": None}
        if resources:
            usage = _parse_ptxas_log(log.getvalue()) or _cached_usage(compiled)
            if usage is None:   # compiled earlier (Triton's cache): ask the tools
                usage = resource_usage(compiled, arch)
            _store_usage(compiled, usage)
            entry.update(n_regs=usage["n_regs"], n_spills=usage["n_spills"])
        result["kernels"][getattr(fn, "__name__", str(fn)) + label] = entry

    try:
        graph = _graph_of(spec_or_graph, params, present)
        merged = default_config(graph)
        merged.update({k: v for k, v in (config or {}).items() if k in merged})
        result["config"] = merged
        # callers name the sizes either way (the tuner: B, H, I, J, D; the CLI: d, h)
        all_sizes = {**DEFAULT_SIZES, **{str(k).lower(): int(v) for k, v in (sizes or {}).items()}}
        p = plan(graph)
        module = load_module(triton_file(graph), interpret=False)
        if p.prepass_kernel:     # the k-prologue prepass: it must compile too (its resources are small)
            compile_kernel(getattr(module, p.prepass_kernel), *aot_signature(p, merged, all_sizes, dtype, prepass=True),
                           4, 1)
        compile_kernel(getattr(module, p.kernel), *aot_signature(p, merged, all_sizes, dtype),
                       merged["num_warps"], merged["num_stages"])
        if direction == "fwd+bwd":
            from ..passes.split_prologue import split_prologue
            from .triton_bwd import backward_plan
            core = split_prologue(graph).core
            bp = backward_plan(core)
            module = load_module(triton_training_file(core), interpret=False)
            compile_kernel(getattr(module, bp.forward.kernel),
                           *aot_signature(bp.forward, {**merged, "STORE_LSE": True}, all_sizes, dtype),
                           merged["num_warps"], merged["num_stages"], label=" (training: saves lse)")
            for kernel in (bp.dq_kernel, bp.dkdv_kernel):
                compile_kernel(getattr(module, kernel), *aot_signature_backward(bp, merged, all_sizes, dtype),
                               merged["num_warps_bwd"], merged["num_stages_bwd"])
    except CompilerRejected as e:   # the compiler's error is the answer, not a crash
        result.update(error=_short(e.__cause__), compile_s=time.perf_counter() - start)
        return result
    except CodegenError as e:      # this generator cannot render the graph (names the op): for every config
        result.update(error=_short(e), compile_s=time.perf_counter() - start)
        return result
    # anything else - a bug of the code generator or of this check - propagates: never a "bad config"
    result["compile_s"] = time.perf_counter() - start
    kernels = result["kernels"].values()
    shared = max(k["shared"] for k in kernels)
    result["shared"] = shared
    for key in ("n_regs", "n_spills"):
        known = [k[key] for k in kernels if k[key] is not None]
        result[key] = max(known) if known else None
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and shared > limit:
        result["error"] = f"out of resources: shared memory {shared} B > {limit} B per block on sm_{arch}"
    else:
        result["ok"] = True
    return result


def language_patched_by_interpreter() -> bool:
    """True when real compilation cannot work in this process: Triton's interpreter leaves
    triton.language.core patched after a launch (triton 3.x), and when TRITON_INTERPRET=1 was set
    as triton.language was first imported its @jit standard library (tl.zeros, tl.cdiv, ...) is
    made of InterpretedFunctions, which the code generator cannot inline."""
    try:
        import triton.language as tl
        from triton.runtime.jit import JITFunction
        if getattr(tl.core.program_id, "__name__", "") == "<lambda>":
            return True
        return not isinstance(tl.standard.cdiv, JITFunction)
    except Exception:
        return False


def _aot_check_in_subprocess(spec_or_graph, params, config, arch, sizes, dtype, present, resources,
                             direction="fwd") -> dict:
    """aot_check in a fresh interpreter (this one ran interpreted kernels)."""
    import ast
    import subprocess
    import sys
    from ..ir import Graph
    if isinstance(spec_or_graph, Graph):
        graph = spec_or_graph
        spec_path = graph.spec.path
        params = {k: v for k, v in graph.params.items() if not isinstance(v, ast.expr)}
        present = sorted(graph.present)
    else:
        spec_path = spec_or_graph if isinstance(spec_or_graph, (str, os.PathLike)) else spec_or_graph.path
        present = sorted(present) if present is not None else None
    request = {"spec": str(spec_path), "params": params or {}, "config": config or {}, "arch": arch,
               "sizes": sizes, "dtype": str(dtype), "present": present, "resources": resources,
               "direction": direction}
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-m", "kernelsearch.codegen.triton_aot"], input=json.dumps(request),
                         capture_output=True, text=True, env=env)
    try:
        return json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):   # it crashed: a bug, not the compiler's answer about this config
        raise RuntimeError(f"the AOT check's subprocess failed (exit {run.returncode}):\n{run.stderr[-4000:]}") \
            from None


def _parse_ptxas_log(log: str) -> dict | None:
    regs = re.search(r"Used (\d+) registers", log)
    if not regs:
        return None
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"n_regs": int(regs.group(1)), "n_spills": int(spills.group(1)) if spills else 0}


def _usage_path(compiled) -> Path | None:
    from ..backends.loader import cache_dir
    digest = getattr(compiled, "hash", None)
    return cache_dir() / "aot" / f"{digest}.json" if digest else None


def _cached_usage(compiled) -> dict | None:
    path = _usage_path(compiled)
    if path is not None and path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    return None


def _store_usage(compiled, usage: dict) -> None:
    path = _usage_path(compiled)
    if path is None or usage.get("n_regs") is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"n_regs": usage["n_regs"], "n_spills": usage["n_spills"]}))
    except OSError:
        pass


def is_resource_error(result: dict) -> bool:
    """True when a config failed only because it does not fit (the tuner skips those)."""
    error = (result.get("error") or "").lower()
    return "out of resources" in error or "outofresources" in error.replace(" ", "")


def _main() -> None:
    import sys
    request = json.loads(sys.stdin.read())
    with contextlib.redirect_stdout(sys.stderr):
        result = aot_check(request["spec"], request["params"], request["config"], arch=request["arch"],
                           sizes=request["sizes"], dtype=request["dtype"], present=request["present"],
                           resources=request["resources"], direction=request.get("direction", "fwd"))
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
