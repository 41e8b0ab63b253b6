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
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import KernelsearchError, UsageError
from .text import printable

# subcommands that live beside the parts they drive: module -> its register(subparsers)
_REGISTERED = ("kernelsearch.codegen.show_cli", "kernelsearch.codegen.aot_cli", "kernelsearch.tune.cli", "kernelsearch.models.cli")


def _cmd_check(args) -> int:
    from .compiler import check_spec, compile_graph
    for path in args.specs:
        spec = check_spec(path)
        graph = compile_graph(spec, _parse_overrides(args.param, spec))
        # spec text (summary, string values, the path) is shown escaped: it cannot drive the terminal
        print(f"{printable(spec.path)}: ok - {spec.name}: {printable(spec.summary)}")
        for name, param in spec.params.items():
            value = graph.params[name]
            shown = repr(value) if isinstance(value, str) else \
                value if not hasattr(value, "lineno") else __import__("ast").unparse(value)
            print(f"  param  {name:<22} {param.type:<5} = {printable(shown)}")
        for name, decl in spec.inputs.items():
            optional = "  (optional)" if decl.optional else ""
            print(f"  input  {name:<22} {decl.dtype:<5} [{', '.join(decl.shape)}]{optional}")
        stages: dict[str, list[str]] = {}
        for node_id, node in graph.nodes():
            if node.op not in ("const", "size", "input", "index"):
                stages.setdefault(node.stage, []).append(node.name or node.op)
        for stage, names in stages.items():
            print(f"  stage  {stage:<22} {', '.join(names)}")
        from .passes.plan import describe_plan
        for line in describe_plan(graph):   # how it runs: every schedule decision (passes/plan.py)
            print(f"  {printable(line)}")
    return 0


def _parse_overrides(pairs, spec=None, flag: str = "--param") -> dict:
    """NAME=VALUE pairs of every subcommand's --param, values read by `parse_value`."""
    overrides = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise UsageError(f"{flag} takes NAME=VALUE, got {printable(repr(pair))}")
        name, value = pair.split("=", 1)
        overrides[name.strip()] = parse_value(value)
    return overrides


def parse_value(text: str):
    """A command-line value: a JSON or YAML scalar or list (1e-3, .5, true, [1, 2]), else the text itself.

    A value neither reads (`[1`) stays a string: the param it is given to then says what it takes.
    """
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if value is None or isinstance(value, (bool, int, float, str, list)) else text


# ---------------------------------------------------------------------------- argparse types
# `type=positive_int("--trials")`: a bad value raises UsageError naming the flag, the value and what
# it takes (argparse lets it through; `main` prints it as one line, exit code 2)

def positive_int(flag: str):
    return _number_type(flag, int, lambda v: v > 0, "a positive integer")


def non_negative_int(flag: str):
    return _number_type(flag, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(flag: str):
    return _number_type(flag, float, lambda v: v > 0, "a positive number")


def non_negative_float(flag: str):
    return _number_type(flag, float, lambda v: v >= 0, "a number >= 0")


def _number_type(flag: str, kind: type, ok, what: str):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or not ok(value):
            raise UsageError(f"{flag} {printable(text)}: expected {what}")
        return value
    convert.__name__ = what.replace(" ", "_")   # argparse names the type in some messages
    return convert


def _make_directory(directory: Path, flag: str) -> None:
    """Create an output directory when missing (as mkdir -p would); exit 2 naming it when that fails."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag}: cannot create the directory {printable(directory)} ({e.strerror or e})") from None


def _cmd_graph(args) -> int:
    from .compiler import compile_graph
    from .spec import load_spec
    spec = load_spec(args.spec)
    graph = compile_graph(spec, _parse_overrides(args.param, spec))
    out = Path(args.output or f"{spec.name}.dot")
    _make_directory(out.parent, "-o")
    try:
        out.write_text(graph.to_dot() + "\n")
    except OSError as e:
        raise UsageError(f"-o {printable(out)}: cannot write it ({e.strerror or e})") from None
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
    out_dir = Path(args.output_dir)
    _make_directory(out_dir, "--output-dir")
    for path in args.specs:
        written = write_generated(path, out_dir)
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
    try:
        args = parser.parse_args(argv)   # inside: argument types raise UsageError
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        code = int(args.func(args) or 0)
        sys.stdout.flush()   # a closed pipe shows here, not at interpreter exit
        return code
    except KernelsearchError as e:
        print(printable(str(e), keep_newlines=True), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `kernelsearch check specs/*.yaml | head -1`: the reader left; stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141   # 128 + SIGPIPE, what a shell reports for a writer killed by the signal


if __name__ == "__main__":
    sys.exit(main())
