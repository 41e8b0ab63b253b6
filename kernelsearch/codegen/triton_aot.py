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


def aot_signature(p, config: dict, sizes: dict, dtype: str, prepass: bool = False):
    """(signature, constexprs, attrs) for ASTSource, mirroring what the JIT specialises at a call.

    prepass: for the k-prologue prepass kernel instead of the forward kernel."""
    from .triton_fwd import MIN_DOT_BLOCK, PREPASS_BLOCK_N
    elem = _TORCH_TO_TRITON.get(str(dtype), str(dtype))
    signature, constexprs, attrs = {}, {}, {}
    args = p.prepass_args() if prepass else p.runtime_args()
    pointer_type = {t.ptr: {"float": f"*{elem}", "bool": "*i1", "int": "*i64"}[t.dtype]
                    for t in p.tensors + p.materialized}
    pointer_type["out_ptr"] = f"*{elem}"
    pointer_type["lse_ptr"] = "*fp32"
    unit_strides = set()
    for t in list(p.tensors) + list(p.materialized) + [None]:
        dims = p.out_dims if t is None else t.dims
        strides = p.out_strides if t is None else t.strides
        if dims and dims[-1] not in ("b", "h", "i", "j"):
            unit_strides.add(strides[-1])     # rows are contiguous along their feature dim
    host_type = {a: {"float": "fp32", "int": "i32", "bool": "i1"}.get(dtype_, "fp32") for a, _, dtype_, _ in p.host}
    for index, arg in enumerate(args):
        if arg in pointer_type:
            signature[arg] = pointer_type[arg]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in unit_strides:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg.startswith("stride_"):
            signature[arg] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in host_type:
            signature[arg] = host_type[arg]
        else:
            signature[arg] = "i32"
    for name in (p.prepass_constexpr_args() if prepass else p.constexpr_args()):
        signature[name] = "constexpr"
    for feature, block in p.features:
        size = int(sizes.get(feature, sizes.get(feature.upper(), DEFAULT_SIZES["d"])))
        constexprs[block] = max(MIN_DOT_BLOCK, 1 << max(0, size - 1).bit_length())
        constexprs[f"EVEN_{feature.upper()}"] = constexprs[block] == size
    if prepass:
        constexprs["BLOCK_N"] = PREPASS_BLOCK_N
        return signature, constexprs, attrs
    constexprs["BLOCK_M"] = int(config["BLOCK_M"])
    constexprs["BLOCK_N"] = int(config["BLOCK_N"])
    if p.channels:
        heads = int(sizes.get("h", sizes.get("H", DEFAULT_SIZES["h"])))
        constexprs["CP"] = 1 << max(0, p.streams * heads - 1).bit_length()
    constexprs["DOT_PRECISION"] = "ieee" if elem == "fp32" else "tf32"
    constexprs["STORE_LSE"] = bool(config.get("STORE_LSE", False))
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


def aot_check(spec_or_graph, params=None, config=None, arch=90, *, sizes: dict | None = None,
              dtype: str = "float16", present=None, resources: bool = True) -> dict:
    """Compile the forward kernel for sm_<arch> without a GPU; see the module docstring."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..backends.triton_backend import default_config, load_module
    from .triton_fwd import _sanitize, plan, triton_source

    arch = int(str(arch).lower().replace("sm_", "").replace("sm", "").rstrip("a"))
    if language_patched_by_interpreter():
        return _aot_check_in_subprocess(spec_or_graph, params, config, arch, sizes, dtype, present, resources)
    start = time.perf_counter()
    result = {"ok": False, "error": None, "shared": None, "n_regs": None, "n_spills": None, "compile_s": None,
              "arch": arch, "config": None}
    try:
        graph = _graph_of(spec_or_graph, params, present)
        merged = default_config(graph)
        merged.update({k: v for k, v in (config or {}).items() if k in merged})
        result["config"] = merged
        p = plan(graph)
        module = load_module(triton_source(graph), f"{_sanitize(graph.spec.name)}_fwd", interpret=False)
        all_sizes = {**DEFAULT_SIZES, **(sizes or {})}
        if p.prepass_kernel:     # the k-prologue prepass: it must compile too (its resources are small)
            signature, constexprs, attrs = aot_signature(p, merged, all_sizes, dtype, prepass=True)
            triton.compile(ASTSource(getattr(module, p.prepass_kernel), signature, constexprs, attrs),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 1})
        fn = getattr(module, p.kernel)
        signature, constexprs, attrs = aot_signature(p, merged, all_sizes, dtype)
        source = ASTSource(fn, signature, constexprs, attrs)
        log = io.StringIO()
        with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            triton.knobs.nvidia.dump_ptxas_log = True    # Triton prints ptxas -v's report: keep it
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": int(merged["num_warps"]),
                                               "num_stages": int(merged["num_stages"])})
    except NotImplementedError as e:
        result.update(error=_short(e), compile_s=time.perf_counter() - start)
        return result
    except Exception as e:   # the compiler's error is the answer, not a crash
        result.update(error=_short(e), compile_s=time.perf_counter() - start)
        return result
    result["compile_s"] = time.perf_counter() - start
    shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    result["shared"] = shared
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and shared > limit:
        result["error"] = f"out of resources: shared memory {shared} B > {limit} B per block on sm_{arch}"
    else:
        result["ok"] = True
    if resources:
        usage = _parse_ptxas_log(log.getvalue()) or _cached_usage(compiled)
        if usage is None:   # compiled earlier (Triton's cache): ask the tools
            usage = resource_usage(compiled, arch)
        _store_usage(compiled, usage)
        result["n_regs"], result["n_spills"] = usage["n_regs"], usage["n_spills"]
    return result


def language_patched_by_interpreter() -> bool:
    """Triton's interpreter leaves triton.language.core patched after a launch (triton 3.x): real
    compilation in the same process then fails. True when that has happened here."""
    try:
        import triton.language as tl
        return getattr(tl.core.program_id, "__name__", "") == "<lambda>"
    except Exception:
        return False


def _aot_check_in_subprocess(spec_or_graph, params, config, arch, sizes, dtype, present, resources) -> dict:
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
               "sizes": sizes, "dtype": str(dtype), "present": present, "resources": resources}
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-m", "kernelsearch.codegen.triton_aot"], input=json.dumps(request),
                         capture_output=True, text=True, env=env)
    try:
        return json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": f"AOT subprocess failed (exit {run.returncode}): {run.stderr[-2000:]}",
                "shared": None, "n_regs": None, "n_spills": None, "compile_s": None, "arch": arch, "config": config}


def _parse_ptxas_log(log: str) -> dict | None:
    regs = re.search(r"Used (\d+) registers", log)
    if not regs:
        return None
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"n_regs": int(regs.group(1)), "n_spills": int(spills.group(1)) if spills else 0}


def _usage_path(compiled) -> Path | None:
    from ..backends.triton_backend import cache_dir
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
                           resources=request["resources"])
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
