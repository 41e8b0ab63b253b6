"""The search: an Optuna study per (spec, params, device, shape bucket, dtype, direction), run by workers.

`tune(TuneOptions) -> TuneResult` is the whole `kernelsearch tune` command minus argument
parsing. What it does, in order:

1. resolve the target (``auto``: CUDA when present, else CPU), the backend it tunes (``triton``
   on CUDA, ``torch`` on CPU), the shape, dtype and the search space (`space.py`); ``cuda``
   without a GPU but with ``TRITON_INTERPRET=1`` runs the Triton target's whole pipeline with
   the kernels in Triton's CPU interpreter (a rehearsal: its timings say nothing about a GPU);
2. open the storage (`storage.py`) and create or load the study named
   ``"<spec name>|<sha256[:16]>|<backend>|<device name>|<shape bucket>|<dtype>|<direction>|<params tag>|s<space>"``
   (`records.params_tag`: the resolved params and the optional inputs timed, so that e.g.
   ``--param causal=false`` is a study of its own; `SearchSpace.signature`: Optuna cannot change
   a parameter's choices within a study, so ``--only`` searches in a study of its own, and so on);
3. warm start, once per study: enqueue the default config, the default of each lowering
   (`SearchSpace.lowering_defaults`: PyTorch's own kernels are always compared) and the best
   configs recorded for the nearest shape buckets with the same params (`records.neighbours`);
4. run ``--workers`` worker threads until the study holds ``--trials`` counted trials or
   ``--timeout`` seconds passed (on the CPU their trial processes build side by side but time
   one at a time: `target.CpuLock`). Each worker owns a `trial.TrialRunner` (a child process) and
   loops: under the budget lock, reap trials of dead workers, count, ask the sampler, drop
   duplicates and statically invalid configs (told as uncounted failures); then, outside the
   lock and with a heartbeat, run the trial in its child and tell the result;
5. re-time the top configs and the default round-robin in one child, pick the winner by the
   re-timed median, print the table and the winner as a Python literal, and record it
   (`records.record`) so that ``kernelsearch.load`` uses it.

Samplers: ``tpe`` (default; multivariate, grouped for the conditional knobs, constant liar for
parallel workers), ``random`` (Optuna's), ``gp`` (Optuna's GPSampler; needs scipy) and
``grid`` (every valid config in order, default first, through the study's queue). Whatever
the sampler proposes, a config is evaluated at most once per study: a proposal that repeats an
evaluated config (or breaks a constraint) is told as an uncounted failure and the nearest
config not yet evaluated (fewest knobs changed) is queued in its place, keeping the sampler's
intent; after three such proposals in a row a random unevaluated config is queued.

Trial user attributes (few, because every write is a storage transaction):
``ks_run = {"worker", "key", "config"}`` set when a config is accepted for evaluation;
``ks_heartbeat`` refreshed while it runs; ``ks = {"counted", "status" (ok|fail), "kind"
(failure kind), "reason", "config", "time_ms", "compile_s", "timing", "check", ...}`` set
once when it is told. ``counted`` trials count toward ``--trials``; duplicates, statically
invalid proposals and trials interrupted or orphaned by a dead worker do not.
``ks_retry_of``/``ks_warm``/``ks_grid``/``ks_near``/``ks_fallback`` mark where a queued config
came from.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TextIO

from ..errors import UsageError
from ..runtime import config_store as rec
from .adapter import KernelsearchTarget
from .policy import INTERNAL_ERROR
from .space import SearchSpace, config_key, fix_choices, restrict
from .storage import (GRACE_S, HEARTBEAT_INTERVAL_S, Heartbeat, StorageConfig, budget_lock, open_storage,
                      parse_storage, reap_stale, worker_identity)
from .strategy import SAMPLERS, STRATEGIES, make_strategy
from .target import Problem
from .trial import RunnerError, TrialRunner

__all__ = ["TuneOptions", "TuneResult", "tune", "resolve", "Resolved", "study_name", "DEFAULTS", "SAMPLERS"]

BUDGET_GRACE_S = 15.0

# Per-target defaults: shape (B, H, I, J, D), dtype, trial budget, time budget (s), per-trial limit (s).
DEFAULTS = {
    "cpu": {"shape": (1, 4, 512, 512, 64), "dtype": "float32", "trials": 24, "timeout": 80.0,
            "trial_timeout": 150.0},
    "cuda": {"shape": (4, 16, 2048, 2048, 64), "dtype": "float16", "trials": 100, "timeout": None,
             "trial_timeout": 120.0},
    # --target cuda in Triton's interpreter (no GPU, TRITON_INTERPRET=1): small, to rehearse
    "interpret": {"shape": (1, 2, 64, 64, 32), "dtype": "float16", "trials": 6, "timeout": None,
                  "trial_timeout": 300.0},
}


@dataclass
class TuneOptions:
    spec: str | None
    target: str = "auto"                   # auto | cuda | cpu
    shape: Mapping[str, int] | None = None  # B, H, I, J, D
    dtype: str | None = None
    direction: str = "fwd"                 # fwd | fwd+bwd
    sampler: str = "tpe"
    trials: int | None = None              # counted trials the study should hold in total
    timeout: float | None = None           # seconds for this invocation (None: target default; <=0: none)
    workers: int = 1
    storage: str | None = None
    seed: int | None = None
    trial_timeout: float | None = None
    params: dict = field(default_factory=dict)
    only: dict = field(default_factory=dict)  # knob -> allowed choices (restricts the space)
    top_k: int = 5
    retime_repeats: int = 5
    progress: bool = True
    record: bool = True
    warm_start: bool = True
    optional_inputs: bool = False
    adapter: Any = None                    # evaluates configs in place of kernelsearch's backends (adapter.py;
                                           # tests inject their double); its .defaults replace DEFAULTS
    out: TextIO | None = None              # human-readable output (default stdout)
    grace_s: float = GRACE_S
    heartbeat_s: float = HEARTBEAT_INTERVAL_S


@dataclass
class Resolved:
    target: str
    backend: str
    device: str
    device_name: str
    spec: Any
    spec_path: str | None
    sizes: dict
    bucket: str
    dtype: str
    direction: str
    params: dict           # resolved: the spec's defaults with --param applied
    present: tuple         # the optional inputs given to the timed calls
    params_tag: str        # records.params_tag(params, present)
    space: SearchSpace
    study_name: str
    storage: StorageConfig
    trials: int
    timeout: float | None
    trial_timeout: float
    seed: int
    interpret: bool = False  # the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)
    adapter: Any = None      # what evaluates configs (adapter.py)


@dataclass
class TuneResult:
    study_name: str
    storage: str
    winner: dict | None
    winner_ms: float | None
    default_ms: float | None
    rows: list[dict]
    counts: dict
    records_path: str | None
    interrupted: bool = False
    exhausted: bool = False
    ran: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"study": self.study_name, "storage": self.storage, "winner": self.winner,
                "winner_ms": self.winner_ms, "default_ms": self.default_ms,
                "speedup": (self.default_ms / self.winner_ms) if self.default_ms and self.winner_ms else None,
                "top": self.rows, "counts": self.counts, "records": self.records_path,
                "interrupted": self.interrupted, "exhausted": self.exhausted, "ran": self.ran, "notes": self.notes}


def _parse_dtype(name: str) -> str:
    aliases = {"fp16": "float16", "half": "float16", "float16": "float16", "bf16": "bfloat16",
               "bfloat16": "bfloat16", "fp32": "float32", "float": "float32", "float32": "float32",
               "fp64": "float64", "float64": "float64", "double": "float64"}
    if name not in aliases:
        raise UsageError(f"--dtype {name}: use float16, bfloat16, float32 or float64")
    return aliases[name]


def study_name(spec_name: str, sha256: str, backend: str, device_name: str, bucket: str, dtype: str,
               direction: str, params_tag: str, space_signature: str) -> str:
    return "|".join((spec_name, sha256[:16], backend, device_name, bucket, dtype, direction, params_tag,
                     "s" + space_signature))


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _triton_interpreting() -> bool:
    try:
        from ..backends.triton_backend import interpreting
    except ImportError:  # no triton here
        return False
    return interpreting()


def resolve(opts: TuneOptions) -> Resolved:
    """Check the options and work out everything a study needs (UsageError on bad input)."""
    if opts.direction not in ("fwd", "fwd+bwd"):
        raise UsageError(f"--direction {opts.direction}: use fwd or fwd+bwd")
    if opts.sampler not in SAMPLERS:
        raise UsageError(f"--sampler {opts.sampler}: use one of {', '.join(SAMPLERS)}")
    if opts.trials is not None and opts.trials <= 0:
        raise UsageError(f"--trials {opts.trials}: must be at least 1")
    if opts.workers is None or opts.workers < 1:
        raise UsageError(f"--workers {opts.workers}: must be at least 1")
    if opts.trial_timeout is not None and opts.trial_timeout <= 0:
        raise UsageError(f"--trial-timeout {opts.trial_timeout}: must be positive")
    needs = STRATEGIES[opts.sampler].needs
    if needs is not None and importlib.util.find_spec(needs) is None:
        raise UsageError(f"--sampler {opts.sampler} needs {needs}: pip install {needs}")

    if opts.record:
        rec.check_writable()   # before any trial: an unwritable records file would lose the winner
    if opts.adapter is not None:   # an injected target (tests): its own defaults, on this CPU
        adapter, target, interpret, d = opts.adapter, opts.adapter.target, False, opts.adapter.defaults
    else:
        target = opts.target
        cuda = _cuda_available()
        if target == "auto":
            target = "cuda" if cuda else "cpu"
        if target not in ("cuda", "cpu"):
            raise UsageError(f"--target {opts.target}: use auto, cuda or cpu")
        # --target cuda without a GPU but with TRITON_INTERPRET=1: the same Triton space, AOT checks
        # for sm_90, correctness checks and records, with the kernels run by Triton's CPU interpreter
        # (a rehearsal of the CUDA target's pipeline; its timings say nothing about a GPU).
        interpret = target == "cuda" and not cuda and _triton_interpreting()
        if target == "cuda" and not cuda and not interpret:
            raise UsageError("--target cuda: no CUDA device is available (use --target cpu; or set "
                             "TRITON_INTERPRET=1 to rehearse the CUDA target in Triton's CPU interpreter)")
        adapter = KernelsearchTarget({"cuda": "triton", "cpu": "torch"}[target])
        d = DEFAULTS["interpret" if interpret else target]
        if not opts.spec:
            raise UsageError("missing SPEC: e.g. kernelsearch tune specs/cosine_sim.yaml")
        if not Path(opts.spec).is_file():
            raise UsageError(f"spec file not found: {opts.spec}")
    backend = adapter.backend
    spec_path = str(Path(opts.spec)) if opts.spec else None
    spec, params = adapter.load_spec(spec_path, opts.params)

    if opts.shape is not None:
        sizes = {k: int(opts.shape[k]) for k in ("B", "H", "I", "J", "D")}
        if any(v <= 0 for v in sizes.values()):
            raise UsageError(f"--shape: all sizes must be positive, got {sizes}")
    else:
        sizes = dict(zip("BHIJD", d["shape"]))
    dtype = _parse_dtype(opts.dtype or d["dtype"])
    if target == "cpu" and dtype == "float16":
        warnings.warn("float16 on the CPU is slow and not what the CPU backend is for", stacklevel=2)
    device = "cuda" if target == "cuda" and not interpret else "cpu"
    dev_name = rec.device_name(device)
    present = tuple(sorted(n for n, d in dict(spec.inputs).items() if getattr(d, "optional", False))) \
        if opts.optional_inputs else ()
    # the space of the graph the trials time: these params, these optional inputs (its lowerings,
    # schedule and default config are that graph's, as they are `load`'s for those calls)
    space = adapter.space(spec, sizes, opts.direction, dtype, params=dict(opts.params), present=present,
                          device=device)
    if opts.only:
        try:
            space = fix_choices(space, opts.only)
        except ValueError as e:
            raise UsageError(f"--only: {e}") from None
    size = space.size()
    if size == 0:
        raise UsageError("the search space is empty after its constraints:\n" + space.describe())
    trials = opts.trials if opts.trials is not None else (size if opts.sampler == "grid" and size else d["trials"])
    if size is not None:
        trials = min(trials, size)
    timeout = opts.timeout if opts.timeout is not None else (d["timeout"] if opts.trials is None else None)
    if timeout is not None and timeout <= 0:
        timeout = None
    storage = parse_storage(opts.storage)
    bucket = rec.shape_bucket(sizes)
    tag = rec.params_tag(params, present)
    name = study_name(spec.name, spec.sha256, backend, dev_name, bucket, dtype, opts.direction, tag,
                      space.signature())
    seed = opts.seed if opts.seed is not None else int.from_bytes(os.urandom(4), "little")
    return Resolved(target, backend, device, dev_name, spec, spec_path, sizes, bucket, dtype, opts.direction,
                    params, present, tag, space, name, storage, int(trials), timeout,
                    float(opts.trial_timeout or d["trial_timeout"]), seed, interpret, adapter)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------

def _ks(t) -> dict:
    """A trial's result record (user attr ``ks``), {} while it has none."""
    return t.user_attrs.get("ks") or {}


def _key(t) -> str | None:
    """The config key of a trial that was accepted for evaluation (user attr ``ks_run``)."""
    return (t.user_attrs.get("ks_run") or {}).get("key")


def _fmt_ms(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.4g}"


def _params_in_words(params: Mapping[str, Any]) -> dict:
    """Resolved params for JSON and people: expressions as their source text."""
    from ..compiler import params_key

    return dict(params_key(dict(params)))


def _literal(config: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in config.items()) + "}"


class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self.lock = threading.Lock()
        self.bar = None
        self.best: float | None = None
        self.fails = 0
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=min(initial, total), desc=desc, unit="trial",
                                file=sys.stderr, dynamic_ncols=True, leave=True)
            except ImportError:   # tqdm is optional: no bar
                self.bar = None

    def update(self, done: int, best: float | None, fails: int, note: str = "") -> None:
        with self.lock:
            self.best = best
            self.fails = fails
            if self.bar is None:
                return
            self.bar.n = min(done, self.bar.total)
            post = {"best": f"{_fmt_ms(best)} ms", "failed": fails}
            if note:
                post["last"] = note
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Study:
    """Shared state of one tuning run in this process."""

    def __init__(self, opts: TuneOptions, r: Resolved):
        import optuna

        self.opts, self.r = opts, r
        self.out = opts.out or sys.stdout
        self.storage = open_storage(r.storage)
        self.stop = threading.Event()
        self.interrupted = False
        self.exhausted = False
        self.deadline = (time.monotonic() + r.timeout) if r.timeout else None
        self.runners: list[TrialRunner] = []
        self.errors: list[BaseException] = []
        self.ran = 0
        self.notes: list[str] = []
        self.identity = worker_identity()
        self.valid = r.space.enumerate()
        try:
            self.study = optuna.create_study(storage=self.storage, study_name=r.study_name, direction="minimize",
                                             sampler=make_strategy(opts.sampler, r.space, r.seed).sampler(r.trials),
                                             load_if_exists=True)
        except Exception as e:
            raise UsageError(f"--storage {r.storage.display}: cannot create the study: {e}") from None
        self.progress: _Progress | None = None

    # -- helpers ---------------------------------------------------------------------------
    def lock(self):
        return budget_lock(self.r.storage, self.r.study_name)

    def problem(self, idx: int) -> Problem:
        r = self.r
        device, cpu_lock = r.device, None
        if r.device == "cuda":
            import torch

            n = torch.cuda.device_count()
            device = f"cuda:{idx % max(n, 1)}"
        else:
            # the CPU is one shared device: workers compile side by side but time one at a time,
            # with every core (target.CpuLock), also against other tune runs on this machine. The
            # lock file is machine-local (a shared KERNELSEARCH_HOME on NFS would couple machines)
            cpu_lock = os.path.join(tempfile.gettempdir(), f"kernelsearch-{os.getuid()}", "cpu.lock")
        return Problem(spec_path=r.spec_path, backend=r.backend, sizes=dict(r.sizes), dtype=r.dtype,
                       direction=r.direction, device=device, params=dict(self.opts.params),
                       optional_inputs=self.opts.optional_inputs, seed=r.seed % 100000, cpu_lock=cpu_lock,
                       target=r.adapter)

    def snapshot(self):
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.is_finished() and _ks(t).get("counted")]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        return trials, done, running, waiting

    def best_and_fails(self, done) -> tuple[float | None, int]:
        from optuna.trial import TrialState

        vals = [t.value for t in done if t.state == TrialState.COMPLETE and t.value is not None]
        return (min(vals) if vals else None), sum(1 for t in done if t.state == TrialState.FAIL)

    def _keys(self, ts, waiting=()) -> set[str]:
        keys = {_key(t) for t in ts}
        for t in waiting:
            fp = t.system_attrs.get("fixed_params")
            if fp:
                keys.add(config_key(self.r.space.canonical(fp)))
        keys.discard(None)
        return keys

    def _untried(self, taken: set[str]) -> list[dict]:
        """Valid configs not evaluated, running or queued, in the space's order (default first)."""
        return [c for c in self.valid or () if config_key(c) not in taken]

    def _tell_uncounted(self, trial, kind: str, reason: str, config: dict, dup_of: int | None = None) -> None:
        from optuna.trial import TrialState

        ks = {"counted": False, "status": "fail", "kind": kind, "reason": reason, "config": config}
        if dup_of is not None:
            ks["duplicate_of"] = dup_of
        trial.set_user_attr("ks", ks)
        self.study.tell(trial, state=TrialState.FAIL)

    # -- warm start ------------------------------------------------------------------------
    def warm_start(self) -> None:
        r, study = self.r, self.study
        with self.lock():
            if study.user_attrs.get("ks_meta"):
                return
            meta = {"spec_name": r.spec.name, "spec_sha256": r.spec.sha256, "spec_path": r.spec_path,
                    "backend": r.backend, "target": r.target, "device": r.device_name, "bucket": r.bucket,
                    "sizes": r.sizes, "dtype": r.dtype, "direction": r.direction,
                    "params": _params_in_words(r.params), "present": list(r.present), "params_tag": r.params_tag,
                    "space": r.space.as_dict(), "default": r.space.default(), "created": time.time()}
            configs = [r.space.default()] + r.space.lowering_defaults()
            if self.opts.warm_start:
                for bucket, cs in rec.neighbours(r.spec.sha256, r.backend, r.device_name, r.bucket, r.dtype,
                                                 r.direction, k=3, params_tag=r.params_tag):
                    configs += cs[:2]
            queued = max(1, min(r.trials, max(len(r.space.lowering_defaults()), r.trials // 3 + 1)))
            for c in restrict(r.space, configs)[:queued]:
                study.enqueue_trial(c, user_attrs={"ks_warm": True}, skip_if_exists=True)
            study.set_user_attr("ks_meta", meta)

    # -- worker ----------------------------------------------------------------------------
    def worker(self, idx: int) -> None:
        r, study, space = self.r, self.study, self.r.space
        strategy = make_strategy(self.opts.sampler, space, r.seed * 7919 + idx)
        runner = TrialRunner(self.problem(idx))
        if idx == 0:
            self.runners.insert(0, runner)  # kept for re-timing and the final check
        else:
            self.runners.append(runner)
        rejected_in_a_row = sampler_failures = 0
        try:
            while not self.stop.is_set():
                if self.deadline is not None and time.monotonic() > self.deadline:
                    break
                trial = None
                wait = False
                with self.lock():
                    reap_stale(study, grace_s=self.opts.grace_s)
                    trials, done, running, waiting = self.snapshot()
                    best, fails = self.best_and_fails(done)
                    if self.progress:
                        self.progress.update(len(done), best, fails)
                    if len(done) >= r.trials:
                        break
                    evaluated = self._keys(list(done) + list(running))
                    size = len(self.valid) if self.valid is not None else None
                    if size is not None and len(evaluated) >= size:
                        self.exhausted = True
                        if running:
                            wait = True
                        else:
                            break
                    elif len(done) + len(running) >= r.trials:
                        wait = True
                    else:
                        taken = self._keys(list(done) + list(running), waiting)
                        queued = None if waiting else strategy.queued_before_ask(self._untried(taken),
                                                                                  rejected_in_a_row)
                        if queued is not None:
                            study.enqueue_trial(queued[0], user_attrs=queued[1])
                            rejected_in_a_row = 0
                        trial = study.ask()
                        try:
                            config = strategy.suggest(trial)
                        except Exception as e:  # a sampler failure must not kill the study...
                            self._tell_uncounted(trial, "sampler_error", f"sampler: {type(e).__name__}: {e}", {})
                            rejected_in_a_row += 1
                            sampler_failures += 1
                            if sampler_failures >= 10:  # ...but one that always fails must end it
                                raise RuntimeError(f"the {self.opts.sampler} sampler failed 10 times in a row; "
                                                   f"last: {type(e).__name__}: {e}") from e
                            continue
                        sampler_failures = 0
                        key = config_key(config)
                        viol = space.violations(config)
                        dup = None if viol else next((t for t in list(done) + list(running) if _key(t) == key), None)
                        if viol or dup is not None:
                            if viol:
                                self._tell_uncounted(trial, "infeasible", "; ".join(viol), config)
                            else:
                                self._tell_uncounted(trial, "duplicate", f"same config as trial {dup.number}",
                                                     config, dup_of=dup.number)
                            rejected_in_a_row += 1
                            nearest = strategy.queued_after_rejection(config, taken)
                            if nearest is not None:   # the next ask takes it
                                study.enqueue_trial(nearest, user_attrs={"ks_near": trial.number})
                            continue
                        rejected_in_a_row = 0
                        trial.set_user_attr("ks_run", {"worker": {**self.identity, "thread": idx}, "key": key,
                                                                "config": config})
                if wait:
                    time.sleep(0.5)
                    continue
                if trial is None:
                    break
                self.run_trial(runner, trial, config)
        except BaseException as e:  # noqa: BLE001 - raised by run() in the main thread
            self.errors.append(e)
            self.stop.set()
        finally:
            if idx != 0:
                runner.close()

    def run_trial(self, runner: TrialRunner, trial, config: dict) -> None:
        from optuna.trial import TrialState

        seed = int(hashlib.sha256(f"{self.r.study_name}#{trial.number}".encode()).hexdigest()[:8], 16)
        limit, budget_cut = self.r.trial_timeout, False
        if self.deadline is not None:
            # --timeout bounds the run: a trial still running BUDGET_GRACE_S after it is cut off
            # and re-queued (not counted), rather than keeping the user waiting.
            left = self.deadline - time.monotonic() + BUDGET_GRACE_S
            if left < limit:
                limit, budget_cut = max(left, 1.0), True
        with Heartbeat(self.storage, trial._trial_id, self.opts.heartbeat_s):
            try:
                out = runner.run(config, seed=seed, timeout_s=limit, on_phase=None)
            except RunnerError:
                self._requeue(trial, config, "interrupted", "the trial process could not be started")
                raise
        if self.stop.is_set() and out.get("status") != "ok":
            # Ctrl-C killed the child: not the config's fault; run it again on resume.
            self._requeue(trial, config, "interrupted", "interrupted (Ctrl-C); re-queued for the next run")
            return
        if budget_cut and out.get("kind") == "timeout":
            self._requeue(trial, config, "interrupted", "cut off by --timeout; re-queued for the next run")
            self.notes.append(f"trial {trial.number} was cut off by --timeout and re-queued")
            return
        self.ran += 1
        attrs = {"status": out.get("status"), "counted": True, "config": config, "compile_s": out.get("compile_s"),
                 "wall_s": out.get("wall_s"), "aot": out.get("aot"), "spans": out.get("spans")}
        if out.get("status") == "ok":
            attrs.update(time_ms=out["time_ms"], timing=out.get("timing"), check=out.get("check"),
                         used_config=out.get("used_config"))
        else:
            attrs.update(kind=out["kind"], reason=str(out.get("reason", ""))[:4000], phase=out.get("phase"))
            if out.get("traceback"):
                attrs["traceback"] = out["traceback"][-8000:]
            if out["kind"] == INTERNAL_ERROR:
                self.report_internal_error(trial.number, config, out)
        try:
            trial.set_user_attr("ks", {k: v for k, v in attrs.items() if v is not None})
            if out.get("status") == "ok":
                self.study.tell(trial, float(out["time_ms"]))
            else:
                self.study.tell(trial, state=TrialState.FAIL)
        except Exception as e:  # reaped meanwhile by another worker (false stale): drop it
            self.notes.append(f"trial {trial.number}: result dropped ({type(e).__name__}: {e})")
        if self.progress:
            _, done, _, _ = self.snapshot()
            best, fails = self.best_and_fails(done)
            note = _fmt_ms(out.get("time_ms")) + " ms" if out.get("status") == "ok" else out.get("kind", "fail")
            self.progress.update(len(done), best, fails, note)

    def report_internal_error(self, number: int, config: dict, out: dict) -> None:
        """A bug, not a bad config: said at once, with its traceback, whatever --no-progress says."""
        with self.progress.lock if self.progress else threading.Lock():
            self.out.write(f"\nINTERNAL ERROR in trial {number} (a bug in kernelsearch, not a bad config; "
                           f"config {_literal(config)}, phase {out.get('phase')}):\n"
                           f"{out.get('traceback') or out.get('reason')}\n")
            self.out.flush()

    def _requeue(self, trial, config: dict, kind: str, reason: str) -> None:
        from optuna.trial import TrialState

        try:
            trial.set_user_attr("ks", {"counted": False, "status": "fail", "kind": kind, "reason": reason,
                                       "config": config})
            self.study.tell(trial, state=TrialState.FAIL)
            self.study.enqueue_trial(config, user_attrs={"ks_retry_of": trial.number})
        except Exception as e:  # reaped meanwhile by another worker, which re-queued it: say so
            self.notes.append(f"trial {trial.number}: not re-queued here ({type(e).__name__}: {e})")

    # -- orchestration -----------------------------------------------------------------------
    def run(self) -> None:
        _, done, _, _ = self.snapshot()
        self.progress = _Progress(self.r.trials, len(done), self.opts.progress,
                                  f"tune {self.r.spec.name} [{self.r.target}]")
        threads = [threading.Thread(target=self.worker, args=(i,), name=f"tune-worker-{i}", daemon=True)
                   for i in range(self.opts.workers)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.2)
        except KeyboardInterrupt:
            self.interrupted = True
            self.stop.set()
            for rn in list(self.runners):
                rn.close(kill=True)
            for t in threads:
                t.join(timeout=30)
        finally:
            self.progress.close()
        for e in self.errors:
            if isinstance(e, RunnerError):
                raise UsageError(f"cannot run trials: {e.message}") if e.kind in ("SpecError", "UsageError") \
                    else RuntimeError(f"cannot start the trial process ({e.kind}): {e.message}")
        for e in self.errors:
            raise e

    # -- results -----------------------------------------------------------------------------
    def finish(self) -> TuneResult:
        from optuna.trial import TrialState

        r = self.r
        trials, done, running, waiting = self.snapshot()
        complete = sorted((t for t in done if t.state == TrialState.COMPLETE and t.value is not None),
                          key=lambda t: t.value)
        counts: dict[str, int] = {"counted": len(done), "complete": len(complete)}
        for t in done:
            if t.state == TrialState.FAIL:
                k = _ks(t).get("kind", "fail")
                counts[k] = counts.get(k, 0) + 1
        counts["uncounted"] = sum(1 for t in trials if t.state.is_finished() and not _ks(t).get("counted"))
        if self.valid is not None and len(self._keys(done)) >= len(self.valid):
            self.exhausted = True
        result = TuneResult(r.study_name, r.storage.display, None, None, None, [], counts, None,
                            self.interrupted, self.exhausted, self.ran, list(self.notes))
        if not complete:
            return result
        seen, top = set(), []
        for t in complete:
            k = _key(t)
            if k in seen:
                continue
            seen.add(k)
            top.append(t)
            if len(top) >= self.opts.top_k:
                break
        default = r.space.default()
        dkey = config_key(default)
        default_trial = next((t for t in done if _key(t) == dkey), None)
        default_ok = default_trial is not None and default_trial.state == TrialState.COMPLETE
        configs = [dict(_ks(t)["config"]) for t in top]
        retime_list = list(configs)
        if default_ok and dkey not in seen:
            retime_list.append(default)
        retimed: list[dict] = [{} for _ in retime_list]
        if not self.interrupted and self.opts.retime_repeats > 0:
            runner = self.runner0()
            try:
                retimed = runner.retime(retime_list, repeat=self.opts.retime_repeats,
                                        timeout_s=max(120.0, 10 * self.r.trial_timeout))
            except RunnerError as e:
                result.notes.append(f"re-timing skipped: {e.message}")
        by_key = {config_key(c): rt for c, rt in zip(retime_list, retimed)}

        def med(t) -> float:
            rt = by_key.get(_key(t), {})
            return rt.get("median_ms", t.value) if "median_ms" in rt else t.value

        default_ms = None
        if default_ok:
            rt = by_key.get(dkey, {})
            default_ms = rt.get("median_ms", default_trial.value)
        elif default_trial is not None:
            result.notes.append(f"the default config failed ({_ks(default_trial).get('kind')}): "
                                f"{str(_ks(default_trial).get('reason', ''))[:300]}")
        rows = []
        for t in top:
            rt = by_key.get(_key(t), {})
            m = med(t)
            rows.append({
                "trial": t.number, "config": dict(_ks(t)["config"]), "median_ms": m,
                "trial_ms": t.value, "spread": rt.get("spread") if "median_ms" in rt else
                (_ks(t).get("timing") or {}).get("spread"),
                "retimed": "median_ms" in rt,
                "speedup": (default_ms / m) if default_ms and m else None,
                "compile_s": _ks(t).get("compile_s"),
                "is_default": _key(t) == dkey,
            })
        rows.sort(key=lambda x: x["median_ms"])
        # The would-be winner's final check (optional inputs, when the trials did not check
        # them); a config that fails it is dropped and the next one is tried.
        win = None
        if not self.interrupted:
            runner = self.runner0()
            for i, row in enumerate(list(rows)):
                v = runner.validate(row["config"], seed=104729 + i, timeout_s=max(60.0, 2 * self.r.trial_timeout))
                row["validated"] = bool(v.get("ok"))
                if v.get("ok"):
                    win = row
                    break
                result.notes.append(f"trial {row['trial']} rejected by the final check with optional inputs: "
                                    f"{str(v.get('error'))[:300]}")
                rows.remove(row)
        else:
            win = rows[0] if rows else None
        if win is None:
            result.rows = rows
            result.notes.append("no config passed the final check; nothing recorded")
            return result
        result.rows, result.winner, result.winner_ms, result.default_ms = rows, win["config"], win["median_ms"], default_ms
        try:
            self.study.set_user_attr("ks_final", {"rows": rows, "default_ms": default_ms, "time": time.time()})
        except Exception as e:  # the table is printed and recorded anyway; only the study's copy is missing
            result.notes.append(f"the final table was not stored in the study ({type(e).__name__}: {e})")
        if self.interrupted:
            result.notes.append("interrupted: the best config below was neither re-timed nor finally checked, "
                                "and is not recorded; run the same command again to finish")
        elif self.opts.record:
            p = rec.record(r.spec.sha256, r.backend, r.device_name, r.bucket, r.dtype, r.direction, win["config"],
                           params_tag=r.params_tag, params=_params_in_words(r.params), present=list(r.present),
                           time_ms=win["median_ms"], default_ms=default_ms,
                           speedup=win["speedup"], spec=r.spec.name, spec_path=r.spec_path, sizes=r.sizes,
                           study=r.study_name, storage=r.storage.display, trials=len(done),
                           top=[x["config"] for x in rows[1:]])
            result.records_path = str(p)
        return result

    def runner0(self) -> TrialRunner:
        if not self.runners:
            self.runners.append(TrialRunner(self.problem(0)))
        return self.runners[0]

    def close(self) -> None:
        for rn in self.runners:
            rn.close()


def print_result(res: TuneResult, r: Resolved, out: TextIO) -> None:
    w = out.write
    c = res.counts
    fails = {k: v for k, v in c.items() if k not in ("counted", "complete", "uncounted", INTERNAL_ERROR)}
    w(f"\nstudy   {res.study_name}\nstorage {res.storage}\n")
    w(f"trials  {c.get('counted', 0)} evaluated ({c.get('complete', 0)} ok"
      + "".join(f", {v} {k.replace('_', ' ')}" for k, v in sorted(fails.items())) + ")"
      + (f"; {c['uncounted']} not counted (duplicate or invalid proposals, interrupted trials)" if c.get("uncounted") else "")
      + (f"; ran {res.ran} now" if res.ran else "") + "\n")
    if c.get(INTERNAL_ERROR):
        w(f"        {c[INTERNAL_ERROR]} INTERNAL ERROR(S): bugs in kernelsearch, not bad configs (tracebacks "
          "above and in the trials' user attrs); please report them\n")
    if res.exhausted:
        w("        every valid config has been evaluated\n")
    if res.interrupted:
        w("        interrupted: run the same command again to resume\n")
    for n in res.notes:
        w(f"note    {n}\n")
    if not res.rows:
        w("no config passed its check and timing; nothing recorded\n")
        return
    names = list(r.space.names)
    hdr = ["#", "median ms", "spread", "speedup", "compile s"] + names
    table = []
    for i, row in enumerate(res.rows, 1):
        cfg = row["config"]
        table.append([str(i) + ("*" if row["is_default"] else ""), _fmt_ms(row["median_ms"]),
                      f"±{100 * row['spread']:.1f}%" if row.get("spread") is not None and math.isfinite(row["spread"]) else "-",
                      f"{row['speedup']:.2f}x" if row.get("speedup") else "-",
                      f"{row['compile_s']:.2f}" if row.get("compile_s") is not None else "-"]
                     + [repr(cfg[n]) if n in cfg else "" for n in names])
    widths = [max(len(h), *(len(x[i]) for x in table)) for i, h in enumerate(hdr)]
    w("\n" + "  ".join(h.rjust(wd) for h, wd in zip(hdr, widths)) + "\n")
    for row in table:
        w("  ".join(x.rjust(wd) for x, wd in zip(row, widths)) + "\n")
    w("(* = the default config; median and spread from re-timing the top configs round-robin)\n")
    sp = f", {res.default_ms / res.winner_ms:.2f}x the default config ({_fmt_ms(res.default_ms)} ms)" \
        if res.default_ms and res.winner_ms else ""
    w(f"\nbest config for {r.spec.name} on {r.device_name}, {r.bucket}, {r.dtype}, {r.direction}: "
      f"{_fmt_ms(res.winner_ms)} ms{sp}\n\n")
    spec_arg = repr(r.spec_path) if r.spec_path else "'<fake>'"
    w(f"    config = {_literal(res.winner)}\n")
    w(f"    attn = kernelsearch.load({spec_arg}, backend={r.backend!r}, config=config)\n\n")
    if res.records_path:
        w(f"recorded in {res.records_path}: kernelsearch.load({spec_arg}, backend={r.backend!r}) "
          f"uses it on this device for shapes in {r.bucket}"
          + (f" with params {_params_in_words(r.params)}" if r.params else "")
          + (f" and the optional inputs {', '.join(r.present)}" if r.present else "") + "\n")


def tune(opts: TuneOptions) -> TuneResult:
    """Run (or resume) a study; see the module docstring."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    r = resolve(opts)
    out = opts.out or sys.stdout
    size = r.space.size()
    out.write(f"tuning {r.spec.name} ({r.spec_path or 'fake'}) with the {r.backend} backend on {r.device_name}\n"
              f"shape {r.sizes} (bucket {r.bucket}), {r.dtype}, {r.direction}; sampler {opts.sampler}, "
              f"{r.trials} trials" + (f", {r.timeout:g} s budget" if r.timeout else "")
              + f", {r.trial_timeout:g} s per trial, {opts.workers} worker(s)\n"
              f"search space ({size if size is not None else 'many'} valid configs):\n{r.space.describe()}\n"
              + ("note: no GPU, TRITON_INTERPRET=1: the Triton kernels run in Triton's CPU interpreter and are "
                 "compiled for sm_90 only to check that they fit; the timings are the interpreter's, not a "
                 "GPU's (records go under this CPU's name, where only interpreted calls look)\n"
                 if r.interpret else ""))
    out.flush()
    # SIGTERM (kill, a batch system's time limit) is handled like Ctrl-C: in-flight trials are
    # re-queued, finished ones are kept, and the summary of what exists is printed.
    old_term = None
    if threading.current_thread() is threading.main_thread():
        def _term(signum, frame):
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, _term)
    st = None
    try:
        st = _Study(opts, r)
        st.warm_start()
        _, done, _, _ = st.snapshot()
        if len(done) >= r.trials:
            out.write(f"the study already holds {len(done)} evaluated trials (--trials {r.trials}); "
                      "nothing to run. Give a larger --trials to continue.\n")
        else:
            st.run()
        res = st.finish()
    finally:
        if st is not None:
            st.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    print_result(res, r, out)
    out.flush()
    return res
