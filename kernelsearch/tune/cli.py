"""``kernelsearch tune`` and ``kernelsearch report``: argument parsing only.

The top-level CLI calls `register(subparsers)`; each subcommand sets ``func`` to a function
``(args) -> int``. Bad input raises `kernelsearch.errors.UsageError` (the top-level CLI prints
it on one line and exits 2).
"""
from __future__ import annotations

import argparse
import json
import sys

from ..cli import _parse_overrides, non_negative_float, non_negative_int, parse_value, positive_float, positive_int
from ..errors import UsageError
from ..text import printable

__all__ = ["register", "run_tune", "run_report", "parse_shape"]

# far beyond any device's memory, and below what makes torch's storage size overflow
MAX_TENSOR_ELEMENTS = 1 << 40

_EPILOG = """\
The study is stored (default: SQLite at $KERNELSEARCH_HOME/tune.db, KERNELSEARCH_HOME defaulting
to ~/.cache/kernelsearch) and named by the spec's sha256, the device, the shape bucket, the dtype,
the direction and the params (--param, --optional-inputs): run the same command again to resume after Ctrl-C or kill -9, or on several
machines with --storage postgresql://... (or a shared journal file) to share one study.
--trials is the total number of evaluated configs the study should hold.
The winner is recorded in $KERNELSEARCH_HOME/records.json, where kernelsearch.load finds it
(for calls with the same params).
Without a GPU, TRITON_INTERPRET=1 with --target cuda rehearses the CUDA target in Triton's CPU
interpreter (AOT checks for sm_90 at the tuned shape; interpreter timings, recorded for this CPU).
"""


def parse_shape(text: str) -> dict:
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 5:
        raise UsageError(f"--shape {text}: expected B,H,I,J,D (five integers), e.g. 1,4,512,512,64")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--shape {text}: expected integers, e.g. 1,4,512,512,64") from None
    if any(v <= 0 for v in vals):
        raise UsageError(f"--shape {text}: sizes must be positive")
    B, H, I, J, D = vals
    largest = max(B * H * I * D, B * H * J * D, B * H * I * J)   # q, k/v, the scores the check materialises
    if largest > MAX_TENSOR_ELEMENTS:
        raise UsageError(f"--shape {text}: the shape is too large ({largest:.3g} elements in one tensor; "
                         f"at most 2**40)")
    return dict(zip("BHIJD", vals))


def _params(items: list[str] | None) -> dict:
    return _parse_overrides(items)


def _only(items: list[str] | None) -> dict:
    out: dict = {}
    for it in items or []:
        if "=" not in it:
            raise UsageError(f"--only {printable(it)}: expected KNOB=V1,V2")
        k, v = it.split("=", 1)
        out[k.strip()] = [parse_value(x.strip()) for x in v.split(",")]
    return out


def register(subparsers) -> None:
    from .study import DEFAULTS, SAMPLERS

    cpu, cuda = DEFAULTS["cpu"], DEFAULTS["cuda"]
    p = subparsers.add_parser(
        "tune", help="autotune a spec's kernels on this machine (Optuna; checked, resumable, multi-worker)",
        description="Autotune a spec: every config is checked against the reference before it is timed; "
                    "the winner is recorded for kernelsearch.load.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", help="the spec file, e.g. specs/cosine_sim.yaml")
    p.add_argument("--target", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto (default): cuda when a GPU is present, else cpu. cuda tunes the Triton kernels' "
                        "tiles/warps/stages; cpu tunes the torch backend (lowering, chunk size, torch.compile)")
    p.add_argument("--shape", type=str, default=None, metavar="B,H,I,J,D",
                   help=f"problem size (default cpu {','.join(map(str, cpu['shape']))}, "
                        f"cuda {','.join(map(str, cuda['shape']))})")
    p.add_argument("--dtype", default=None, help=f"float16|bfloat16|float32 (default cpu {cpu['dtype']}, cuda {cuda['dtype']})")
    p.add_argument("--direction", default="fwd", choices=["fwd", "fwd+bwd"],
                   help="tune the forward kernel, or forward and backward together (training)")
    p.add_argument("--sampler", default="tpe", choices=list(SAMPLERS), help="search strategy (default tpe)")
    p.add_argument("--trials", type=positive_int("--trials"), default=None,
                   help=f"evaluated configs the study should hold in total (default cpu {cpu['trials']}, "
                        f"cuda {cuda['trials']}; grid: the whole space)")
    p.add_argument("--timeout", type=non_negative_float("--timeout"), default=None,
                   help=f"seconds for this run; in-flight trials finish (default cpu {cpu['timeout']:g} s when "
                        "--trials is not given, else none; 0 = none)")
    p.add_argument("--trial-timeout", type=positive_float("--trial-timeout"), default=None,
                   help=f"time limit per trial, enforced in its child process (default cpu {cpu['trial_timeout']:g} s, "
                        f"cuda {cuda['trial_timeout']:g} s)")
    p.add_argument("--workers", type=positive_int("--workers"), default=1,
                   help="worker threads in this process, each with its own trial process (one per GPU on CUDA; "
                        "on the CPU they build and check side by side but time one at a time)")
    p.add_argument("--storage", default=None,
                   help="FILE.db | sqlite:///FILE | FILE.journal | journal:FILE | postgresql://USER@HOST/DB")
    p.add_argument("--seed", type=non_negative_int("--seed"), default=None, help="sampler seed")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="override a spec param (repeatable)")
    p.add_argument("--only", action="append", metavar="KNOB=V1,V2",
                   help="restrict a knob to some of its choices, e.g. --only compile=False (repeatable)")
    p.add_argument("--optional-inputs", action="store_true",
                   help="time with the spec's optional inputs (mask, bias...) given; they are always checked")
    p.add_argument("--top", type=positive_int("--top"), default=5, help="configs to re-time and show at the end (default 5)")
    p.add_argument("--no-record", action="store_true", help="do not record the winner for kernelsearch.load")
    p.add_argument("--no-warm-start", action="store_true", help="do not enqueue neighbouring shapes' winners")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (text goes to stderr)")
    p.set_defaults(func=run_tune)

    r = subparsers.add_parser(
        "report", help="plot a spec's tuning studies (history, parameter importances, time per config)",
        description="Write PNG plots and an index.html for every study of SPEC found in the storage.")
    r.add_argument("spec", nargs="?", help="the spec file")
    r.add_argument("--storage", default=None, help="as for tune (default: the per-user SQLite database)")
    r.add_argument("--out", default=None, help="output directory (default ./kernelsearch-report/<spec name>)")
    r.add_argument("--json", action="store_true", help="print the written files as JSON")
    r.set_defaults(func=run_report)


def run_tune(args, adapter=None) -> int:
    """``adapter``: evaluates configs instead of kernelsearch's backends (tests inject their double)."""
    from .study import TuneOptions, tune

    _check_home(args.storage, record=not args.no_record)
    if adapter is None and not args.spec:
        raise UsageError("missing SPEC: e.g. kernelsearch tune specs/cosine_sim.yaml")
    opts = TuneOptions(
        spec=args.spec, target=args.target, shape=parse_shape(args.shape) if args.shape else None,
        dtype=args.dtype, direction=args.direction, sampler=args.sampler, trials=args.trials,
        timeout=args.timeout, workers=args.workers, storage=args.storage, seed=args.seed,
        trial_timeout=args.trial_timeout, params=_params(args.param), only=_only(args.only), top_k=args.top,
        progress=not args.no_progress, record=not args.no_record, warm_start=not args.no_warm_start,
        optional_inputs=args.optional_inputs, adapter=adapter, out=sys.stderr if args.json else sys.stdout)
    res = tune(opts)
    if args.json:
        json.dump(res.as_dict(), sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    if res.interrupted:
        return 130
    return 0 if res.winner is not None else 1


def _check_home(storage: str | None, record: bool) -> None:
    """The tuner writes under KERNELSEARCH_HOME (the default storage, the records): one that cannot
    be a directory is the user's to fix, said before anything runs."""
    if storage is not None and not record:
        return
    import os
    from .storage import home
    path = home()
    source = "KERNELSEARCH_HOME" if os.environ.get("KERNELSEARCH_HOME") else "the default KERNELSEARCH_HOME"
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK | os.X_OK)
    except OSError as e:
        raise UsageError(f"{source} = {printable(path)}: cannot create the directory ({e.strerror or e}); "
                         "set KERNELSEARCH_HOME to a writable directory") from None
    if not writable:
        raise UsageError(f"{source} = {printable(path)} is not writable; set KERNELSEARCH_HOME to a writable "
                         "directory")


def run_report(args, adapter=None) -> int:
    from .report import write_report

    _check_home(args.storage, record=False)

    if adapter is None and not args.spec:
        raise UsageError("missing SPEC: e.g. kernelsearch report specs/cosine_sim.yaml")
    files = write_report(args.spec, storage=args.storage, out_dir=args.out, adapter=adapter)
    if args.json:
        json.dump([str(f) for f in files], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for f in files:
            print(f)
    return 0
