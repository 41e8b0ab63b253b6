"""`kernelsearch aot SPEC... [--arch sm_90] [--all-configs] [--backward]`: compile the Triton
kernels for a GPU architecture without a GPU, and print one table per spec: for every config
whether it compiled (or the compiler's error), its shared memory, registers and spills.
With --backward the training path's kernels (forward saving the log-sum-exp, dq, dkdv) are
compiled too, their *_BWD knobs equal to the forward's; the row shows the largest of all kernels.

Exit code 0 when every config compiled or failed only for lack of resources (a config that does
not fit is what the tuner skips), 1 when a config hit a compiler error, 2 on bad input.
"""
from __future__ import annotations

import argparse
import itertools
import sys

from ..cli import _parse_overrides, parse_value, positive_int
from ..errors import KernelsearchError
from ..text import printable

KNOBS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
BWD_KNOBS = {"BLOCK_M_BWD": "BLOCK_M", "BLOCK_N_BWD": "BLOCK_N", "num_warps_bwd": "num_warps",
             "num_stages_bwd": "num_stages"}
BASE_CHOICES = {"BLOCK_M": [16, 32, 64, 128], "BLOCK_N": [16, 32, 64, 128], "num_warps": [2, 4, 8],
                "num_stages": [1, 2, 3, 4]}


def tune_configs(spec) -> list[dict]:
    """Every config of the spec's tune space (its `tune:` lists, else the usual choices)."""
    tune = dict(getattr(spec, "tune", None) or {})
    lists = [list(tune.get(k) or BASE_CHOICES[k]) for k in KNOBS]
    configs = [dict(zip(KNOBS, values)) for values in itertools.product(*lists)]
    return [c for c in configs if c["BLOCK_M"] % 16 == 0 and c["BLOCK_N"] % 16 == 0]


def corner_configs(spec) -> list[dict]:
    """The smallest and largest config of the tune space (every knob at its min / max)."""
    tune = dict(getattr(spec, "tune", None) or {})
    lists = {k: sorted(tune.get(k) or BASE_CHOICES[k]) for k in KNOBS}
    return [{k: v[0] for k, v in lists.items()}, {k: v[-1] for k, v in lists.items()}]


def parse_arch(text: str) -> int:
    digits = str(text).lower().replace("sm_", "").replace("sm", "").replace("compute_", "").rstrip("a")
    if not digits.isdigit():
        raise KernelsearchError(f"--arch takes sm_80, sm_90, 90, ...; got {text!r}")
    return int(digits)


def _check_one(task):
    spec_path, params, config, arch, sizes, dtype, *rest = task
    direction = rest[0] if rest else "fwd"
    from .triton_aot import aot_check
    return aot_check(spec_path, params, config, arch=arch, sizes=sizes, dtype=dtype, direction=direction)


def _fmt(value, unit="") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def run_aot(args) -> int:
    from ..spec import load_spec
    from .triton_aot import is_resource_error
    arch = parse_arch(args.arch)
    sizes = {"d": args.head_dim, "h": args.heads}
    failed = False
    for path in args.specs:
        spec = load_spec(path)
        params = _parse_overrides(args.param)
        from ..compiler import resolve_params
        resolve_params(spec, params)   # a bad --param is the user's (exit 2), not a compile error per config
        if args.config:
            configs = [_parse_config(args.config)]
        elif args.all_configs:
            configs = tune_configs(spec)
        else:
            from ..backends.triton_backend import default_config
            configs = [default_config(spec)] + (corner_configs(spec) if args.corners else [])
        direction = "fwd+bwd" if args.backward else "fwd"
        if args.backward:
            configs = [{**{k: c[v] for k, v in BWD_KNOBS.items()}, **c} for c in configs]
        tasks = [(path, params, c, arch, sizes, args.dtype, direction) for c in configs]
        what = "forward and backward kernels" if args.backward else "forward kernel"
        print(f"{spec.path}: {spec.name} {what}, sm_{arch}, {args.dtype}, D={args.head_dim}, "
              f"H={args.heads}, {len(configs)} config(s)")
        header = f"  {'BLOCK_M':>7} {'BLOCK_N':>7} {'warps':>5} {'stages':>6}  {'result':<18} {'shared':>9} " \
                 f"{'regs':>5} {'spills':>7} {'compile':>8}"
        print(header)
        errors = []
        if args.jobs > 1 and len(tasks) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = pool.map(_check_one, tasks)
                rows = zip(configs, results)
                for config, result in rows:
                    failed |= _print_row(config, result, errors, is_resource_error)
        else:
            for config, task in zip(configs, tasks):
                failed |= _print_row(config, _check_one(task), errors, is_resource_error)
        for config, error in errors:
            print(f"\n  {config}:\n    " + error.replace("\n", "\n    "))
        print()
    return 1 if failed else 0


def _print_row(config, result, errors, is_resource_error) -> bool:
    if result["ok"]:
        status, bad = "compiled", False
    elif is_resource_error(result):
        status, bad = "out of resources", False
    else:
        status, bad = "compile error", True
        errors.append((config, result.get("error") or "?"))
    shared = result.get("shared")
    print(f"  {config['BLOCK_M']:>7} {config['BLOCK_N']:>7} {config['num_warps']:>5} {config['num_stages']:>6}  "
          f"{status:<18} {_fmt(shared, ' B'):>9} {_fmt(result.get('n_regs')):>5} "
          f"{_fmt(result.get('n_spills'), ' B'):>7} {result.get('compile_s') or 0:>7.1f}s", flush=True)
    return bad


def _parse_config(text: str):
    """--config K=V,...: the triton backend's knobs, checked by their declaration (backends/knobs.py)."""
    from ..backends.knobs import validate_config
    config = {}
    for part in text.split(","):
        if "=" not in part:
            raise KernelsearchError(f"--config takes BLOCK_M=64,BLOCK_N=64,num_warps=4,num_stages=2; "
                                    f"got {printable(repr(text))}")
        key, value = part.split("=", 1)
        config[key.strip()] = parse_value(value.strip())
    full = validate_config("triton", config)   # ConfigError (exit 2) naming the knob, the value and what is allowed
    # knobs left out take their defaults; *_BWD knobs left out follow the forward's (see --backward)
    return {k: full[k] for k in KNOBS} | {k: full[k] for k in config if k in BWD_KNOBS}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "aot", help="compile the Triton kernels for a GPU architecture (no GPU needed); table per config",
        description="Ahead-of-time compile each spec's Triton forward kernel with triton.compile for a CUDA "
                    "architecture, on any machine. Prints, per config: compiled or the compiler's error, shared "
                    "memory, registers and spills (from ptxas/cuobjdump shipped with triton; n/a without them).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.add_argument("--arch", default="sm_90", help="target architecture: sm_80, sm_90, ... (default sm_90)")
    p.add_argument("--all-configs", action="store_true",
                   help="every config of the spec's tune space (default: the default config)")
    p.add_argument("--corners", action="store_true",
                   help="also the smallest and largest config of the tune space")
    p.add_argument("--config", default=None, metavar="K=V,...", help="one config, e.g. BLOCK_M=64,BLOCK_N=32")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="override a spec param")
    p.add_argument("--backward", action="store_true",
                   help="also the training kernels (forward saving lse, dq, dkdv), *_BWD knobs = forward knobs")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--head-dim", type=positive_int("--head-dim"), default=64, help="D the kernel is specialised for (default 64)")
    p.add_argument("--heads", type=positive_int("--heads"), default=8, help="H (matters for heads-in-tile kernels; default 8)")
    p.add_argument("--jobs", "-j", type=positive_int("--jobs"), default=1, help="compile configs in parallel processes")
    p.set_defaults(func=run_aot)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kernelsearch")
    register(parser.add_subparsers())
    sys.exit(run_aot(parser.parse_args()))
