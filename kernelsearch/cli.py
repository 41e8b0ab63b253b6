"""The `kernelsearch` command.

    kernelsearch check SPEC...        parse and compile; print params, inputs, stages, schedule
    kernelsearch graph SPEC           write the dataflow graph (DOT, and SVG/PNG when `dot` exists)
    kernelsearch compile SPEC...      write generated/<name>.py
    kernelsearch aot SPEC...          compile the Triton kernels for a GPU architecture, no GPU needed
    kernelsearch tune SPEC            tune the kernel's knobs with Optuna (the main command)
    kernelsearch report SPEC          plots of a tuning study
    kernelsearch lm SPEC              train a seed language model around the spec's attention

Exit codes: 0 success, 1 failure (a check that did not pass), 2 bad input (spec, arguments).
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import KernelsearchError

# subcommands that live beside the parts they drive: module -> its register(subparsers)
_REGISTERED = ("kernelsearch.codegen.show_cli", "kernelsearch.codegen.aot_cli", "kernelsearch.tune.cli", "kernelsearch.models.cli")


def _cmd_check(args) -> int:
    from .compiler import check_spec, compile_graph
    for path in args.specs:
        spec = check_spec(path)
        graph = compile_graph(spec, _parse_overrides(args.param, spec))
        print(f"{spec.path}: ok - {spec.name}: {spec.summary}")
        for name, param in spec.params.items():
            value = graph.params[name]
            shown = value if not hasattr(value, "lineno") else __import__("ast").unparse(value)
            print(f"  param  {name:<22} {param.type:<5} = {shown}")
        for name, decl in spec.inputs.items():
            optional = "  (optional)" if decl.optional else ""
            print(f"  input  {name:<22} {decl.dtype:<5} [{', '.join(decl.shape)}]{optional}")
        stages: dict[str, list[str]] = {}
        for node_id, node in graph.nodes():
            if node.op not in ("const", "size", "input", "index"):
                stages.setdefault(node.stage, []).append(node.name or node.op)
        for stage, names in stages.items():
            print(f"  stage  {stage:<22} {', '.join(names)}")
        bounds = graph.key_bounds
        from .passes.bounds import render_bound
        if bounds.skips_blocks:
            from .codegen.torch_module import scalar_expression
            render = lambda n: scalar_expression(graph, n, row="i")  # noqa: E731
            lo = render_bound(bounds.lower, render) if bounds.lower else "0"
            hi = render_bound(bounds.upper, render) if bounds.upper else "J - 1"
            print(f"  keys   row i keeps keys {lo} .. {hi}  (whole key blocks outside are skipped)")
        print(f"  schedule {graph.schedule}")
    return 0


def _parse_overrides(pairs, spec) -> dict:
    import yaml
    overrides = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise KernelsearchError(f"--param takes NAME=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        overrides[name] = yaml.safe_load(value)
    return overrides


def _cmd_graph(args) -> int:
    from .compiler import compile_graph
    from .spec import load_spec
    spec = load_spec(args.spec)
    graph = compile_graph(spec, _parse_overrides(args.param, spec))
    out = Path(args.output or f"{spec.name}.dot")
    out.write_text(graph.to_dot() + "\n")
    print(f"wrote {out}")
    if shutil.which("dot"):
        for fmt in ("svg", "png"):
            subprocess.run(["dot", f"-T{fmt}", str(out), "-o", str(out.with_suffix('.' + fmt))], check=False)
            print(f"wrote {out.with_suffix('.' + fmt)}")
    else:
        print("(install graphviz for an image: apt-get install graphviz)")
    return 0


def _cmd_compile(args) -> int:
    from .codegen.module import write_generated
    for path in args.specs:
        written = write_generated(path, Path(args.output_dir))
        print(f"wrote {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelsearch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `kernelsearch COMMAND --help` for a command's options.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"kernelsearch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser("check", help="parse and compile specs, print a summary")
    check.add_argument("specs", nargs="+", metavar="SPEC")
    check.add_argument("--param", action="append", metavar="NAME=VALUE", help="override a param")
    check.set_defaults(func=_cmd_check)
    graph = sub.add_parser("graph", help="write the dataflow graph as DOT (and an image with graphviz)")
    graph.add_argument("spec", metavar="SPEC")
    graph.add_argument("-o", "--output", help="DOT file to write (default: <name>.dot)")
    graph.add_argument("--param", action="append", metavar="NAME=VALUE", help="override a param")
    graph.set_defaults(func=_cmd_graph)
    comp = sub.add_parser("compile", help="write generated/<name>.py for each spec")
    comp.add_argument("specs", nargs="+", metavar="SPEC")
    comp.add_argument("--output-dir", default="generated", help="where to write (default: generated/)")
    comp.set_defaults(func=_cmd_compile)
    for module_name in _REGISTERED:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            if e.name and e.name.startswith("kernelsearch"):
                continue  # that part is not built yet
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KernelsearchError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
