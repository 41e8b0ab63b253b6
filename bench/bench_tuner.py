"""How good are the tuner's samplers? Fraction of the exhaustive grid's best reached after N trials.

    python bench/bench_tuner.py                       # CPU target (real timings) + synthetic Triton space
    python bench/bench_tuner.py --only-synthetic      # seconds: the synthetic Triton-like space only
    python bench/bench_tuner.py --spec specs/softmax.yaml --shape 1,4,512,512,64 --seeds 10

Method (a *tabular* benchmark, the standard way to compare samplers fairly):

1. the exhaustive grid is run once with the real tuner (``kernelsearch tune --sampler grid``,
   its own storage under ``$KERNELSEARCH_HOME/bench``, so a rerun resumes instead of
   re-measuring), giving the time of every valid config (or its failure);
2. each sampler (``tpe``, ``random``, ``gp``; ``grid`` = the grid's own order, default first)
   is then replayed against that table with several seeds, through the same proposal policy as
   the tuner (`study.make_sampler`, the default config enqueued first, duplicates not
   re-evaluated but replaced by the nearest untried config), so every sampler sees
   identical timings and noise cannot favour one;
3. for each sampler and budget N (10, 20, 40 evaluations) it prints the fraction
   ``grid best / best found in N``, averaged over seeds (1.0 = found the grid's best), and the
   evaluations needed to come within 5% of the grid's best (median over seeds).

Goal (issue 5): TPE within 5% of the grid's best in at most a quarter of the grid's evaluations.

The second table is the synthetic Triton-like landscape of `tests/tune_fake.py` (tile sizes,
warps, stages: 192 configs), where "a quarter of the grid" is a meaningful budget; the CPU
target's space (lowering x chunk size x torch.compile) is small.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def grid_table_cpu(spec: str, shape: dict, trial_timeout: float, storage: str | None):
    """Run (or resume) the exhaustive grid on the CPU target; {config key: ms or None}."""
    from kernelsearch.tune.space import config_key
    from kernelsearch.tune.storage import home
    from kernelsearch.tune.study import TuneOptions, resolve, tune

    if storage is None:
        (home() / "bench").mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{home() / 'bench' / 'grid.db'}"
    opts = TuneOptions(spec=spec, target="cpu", shape=shape, sampler="grid", storage=storage, seed=0,
                       trial_timeout=trial_timeout, timeout=0, record=False, warm_start=False,
                       progress=True, retime_repeats=0, out=io.StringIO())
    r = resolve(opts)
    t0 = time.monotonic()
    tune(opts)
    import optuna

    from kernelsearch.tune.storage import open_storage, parse_storage

    study = optuna.load_study(study_name=r.study_name, storage=open_storage(parse_storage(storage)))
    table, spans = {}, []
    for t in study.get_trials(deepcopy=False):
        ks = t.user_attrs.get("ks") or {}
        if not ks.get("counted"):
            continue
        key = (t.user_attrs.get("ks_run") or {}).get("key")
        table[key] = t.value if t.state.name == "COMPLETE" else None
        if t.datetime_start and t.datetime_complete:
            spans.append((t.datetime_start, t.datetime_complete))
    valid = r.space.enumerate()
    missing = [c for c in valid if config_key(c) not in table]
    if missing:
        print(f"warning: {len(missing)} grid configs were not evaluated", file=sys.stderr)
    # how long the grid took when it was measured (this run may just have resumed it)
    secs = (max(e for _, e in spans) - min(b for b, _ in spans)).total_seconds() if spans else time.monotonic() - t0
    return r.space, table, secs, r


def grid_table_synthetic(shape: dict):
    from kernelsearch.tune.space import config_key
    from tests import tune_fake as fake

    space = fake.fake_space(None, shape)
    return space, {config_key(c): fake.model_time(c, shape) for c in space.enumerate()}


def replay(space, table: dict, sampler: str, seed: int, budget: int) -> list[float]:
    """Best-so-far time after each evaluation, following the tuner's proposal policy."""
    import optuna
    from optuna.trial import TrialState

    from kernelsearch.tune.space import config_key, nearest_untried
    from kernelsearch.tune.strategy import make_strategy

    valid = space.enumerate()
    keys_in_order = [config_key(c) for c in valid]
    if sampler == "grid":
        best, out = math.inf, []
        for k in keys_in_order[:budget]:
            v = table.get(k)
            best = min(best, v) if v is not None else best
            out.append(best)
        return out
    strategy = make_strategy(sampler, space, seed)
    study = optuna.create_study(direction="minimize", sampler=strategy.sampler(budget))
    study.enqueue_trial(space.default())
    rng = random.Random(seed)
    evaluated: set[str] = set()
    best, out, dups = math.inf, [], 0
    waiting = 1
    while len(out) < min(budget, len(valid)):
        if dups >= 3 and not waiting:
            rest = [c for c, k in zip(valid, keys_in_order) if k not in evaluated]
            study.enqueue_trial(rng.choice(rest))
            waiting += 1
            dups = 0
        trial = study.ask()
        waiting = max(0, waiting - 1)
        cfg = strategy.suggest(trial)
        key = config_key(cfg)
        if space.violations(cfg) or key in evaluated:
            study.tell(trial, state=TrialState.FAIL)
            dups += 1
            if not waiting:
                nxt = nearest_untried(space, cfg, evaluated, rng)
                if nxt is not None:
                    study.enqueue_trial(nxt)
                    waiting += 1
            continue
        dups = 0
        evaluated.add(key)
        v = table.get(key)
        if v is None:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, v)
            best = min(best, v)
        out.append(best)
    return out


def evaluate(name: str, space, table: dict, samplers: list[str], seeds: int, budgets: list[int]) -> str:
    ok = [v for v in table.values() if v is not None]
    if not ok:
        return f"{name}: no config succeeded\n"
    grid_best = min(ok)
    n = len(space.enumerate())
    lines = [f"\n{name}: {n} valid configs, {len(ok)} ok; grid best {grid_best:.4g} ms; "
             f"goal: within 5% in <= {max(1, n // 4)} evaluations",
             f"{'sampler':<8} {'seeds':>5} " + " ".join(f"{'@' + str(b):>7}" for b in budgets)
             + f" {'evals to 5% (median)':>22}"]
    for s in samplers:
        runs = [replay(space, table, s, seed, max(budgets)) for seed in range(1 if s == "grid" else seeds)]
        fr = []
        for b in budgets:
            vals = [grid_best / r[min(b, len(r)) - 1] if r and math.isfinite(r[min(b, len(r)) - 1]) else 0.0
                    for r in runs]
            fr.append(statistics.mean(vals))
        to5 = []
        for r in runs:
            hit = next((i + 1 for i, v in enumerate(r) if v <= 1.05 * grid_best), None)
            to5.append(hit if hit is not None else math.inf)
        med = statistics.median(to5)
        lines.append(f"{s:<8} {len(runs):>5} " + " ".join(f"{x:>7.3f}" for x in fr)
                     + f" {f'{med:g}' if math.isfinite(med) else '>' + str(max(budgets)):>22}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="specs/cosine_sim.yaml")
    ap.add_argument("--shape", default="1,4,512,512,64", help="B,H,I,J,D for the CPU grid")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--samplers", default="grid,random,tpe,gp")
    ap.add_argument("--budgets", default="10,20,40")
    ap.add_argument("--trial-timeout", type=float, default=300.0)
    ap.add_argument("--storage", default=None, help="storage of the CPU grid study (default: under KERNELSEARCH_HOME)")
    ap.add_argument("--only-synthetic", action="store_true")
    ap.add_argument("--only-cpu", action="store_true")
    a = ap.parse_args(argv)
    os.chdir(ROOT)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    samplers = [s for s in a.samplers.split(",") if s]
    if "gp" in samplers:
        try:
            import scipy  # noqa: F401
        except ImportError:
            print("(gp skipped: needs scipy)", file=sys.stderr)
            samplers.remove("gp")
    budgets = [int(b) for b in a.budgets.split(",")]
    report = []
    if not a.only_synthetic:
        from kernelsearch.tune.cli import parse_shape

        shape = parse_shape(a.shape)
        space, table, secs, r = grid_table_cpu(a.spec, shape, a.trial_timeout, a.storage)
        report.append(evaluate(f"CPU target, {r.spec.name} torch backend, {r.device_name}, {r.bucket}, "
                               f"{r.dtype} (grid took {secs:.0f} s)", space, table, samplers, a.seeds, budgets))
        print(report[-1], flush=True)
    if not a.only_cpu:
        shape = {"B": 4, "H": 16, "I": 2048, "J": 2048, "D": 64}
        space, table = grid_table_synthetic(shape)
        report.append(evaluate("synthetic Triton-like landscape (tests/tune_fake.py, 4x16x2048x2048x64)",
                               space, table, samplers, a.seeds, budgets))
        print(report[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
