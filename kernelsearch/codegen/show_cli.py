"""`kernelsearch show SPEC [--backend torch|triton] [--param k=v ...] [--inputs mask,attn_bias]`:
print the generated files that `kernelsearch.load(SPEC, backend=..., **params)` runs when called
with those optional inputs - the same bytes the backend imports (codegen/files.py)."""
from __future__ import annotations

from ..errors import KernelsearchError


def register(subparsers) -> None:
    show = subparsers.add_parser("show", help="print the generated code a load(...) with these arguments runs")
    show.add_argument("spec", metavar="SPEC")
    show.add_argument("--backend", choices=("torch", "triton"), default="torch",
                      help="whose files: torch (default) or triton (inference and training kernels)")
    show.add_argument("--param", action="append", metavar="NAME=VALUE", help="override a param (as load's **params)")
    show.add_argument("--inputs", default="", metavar="NAME,...",
                      help="the optional inputs the call passes, comma-separated (default: none)")
    show.set_defaults(func=run_show)


def files_for(spec, params: dict, present: frozenset, backend: str) -> list:
    """The GeneratedFiles a call with these params and present inputs runs on `backend`."""
    from ..compiler import compile_graph
    from .files import torch_file, triton_file, triton_training_file
    from .triton_fwd import CodegenError
    graph = compile_graph(spec, params, present)
    if backend == "torch":
        return [torch_file(graph)]
    files = [triton_file(graph)]
    from ..passes.split_prologue import split_prologue
    try:
        files.append(triton_training_file(split_prologue(graph).core))
    except CodegenError:
        pass   # no backward for this graph: training with it raises BackwardNotImplemented
    return files


def run_show(args) -> int:
    from ..cli import _parse_overrides
    from ..spec import load_spec
    spec = load_spec(args.spec)
    present = frozenset(name.strip() for name in args.inputs.split(",") if name.strip())
    unknown = sorted(present - set(spec.optional_inputs))
    if unknown:
        raise KernelsearchError(f"--inputs: {', '.join(map(repr, unknown))} not optional inputs of "
                                f"'{spec.name}'; its optional inputs are: {', '.join(spec.optional_inputs) or 'none'}")
    for file in files_for(spec, _parse_overrides(args.param, spec), present, args.backend):
        print(f"# ---- {file.filename}")
        print(file.source, end="")
    return 0
