"""The autotuner: `kernelsearch tune` on Optuna, correctness-guarded, resumable, multi-worker.

One concern per module:

- `space`   -- the search space: knobs, choices, constraints, the Optuna mapping, defaults;
- `bench`   -- timing (CUDA: ``triton.testing.do_bench``; CPU: monotonic clock), re-timing;
- `check`   -- the correctness guard against the float64 reference, dtype-justified tolerances;
- `target`  -- what one trial does in its child process: feasibility, build, check, time;
- `trial`   -- the child process: time limit, crash and hang handling;
- `storage` -- storage URLs, the budget lock, heartbeats and reaping of dead workers;
- `study`   -- the Optuna study, samplers, warm start, workers, the final table;
- `report`  -- plots of a study (history, importances, time per config);
- `cli`     -- ``kernelsearch tune`` / ``kernelsearch report`` argument parsing (`register`);
- `fake`    -- a fake target for tests and the tuner benchmark.

The tuned winners are written through the runtime's config store (`kernelsearch.runtime.config_store`),
which the backends read; nothing outside this package imports it.
"""
from __future__ import annotations

__all__ = ["tune", "TuneOptions", "TuneResult", "register"]


def __getattr__(name: str):
    if name in ("tune", "TuneOptions", "TuneResult"):
        from . import study

        return getattr(study, name)
    if name == "register":
        from .cli import register

        return register
    raise AttributeError(name)
