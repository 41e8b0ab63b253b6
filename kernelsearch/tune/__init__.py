"""The autotuner: `kernelsearch tune` on Optuna, correctness-guarded, resumable, multi-worker.

One concern per module:

- `space`   -- the search space from the backends' declared knobs (backends/knobs.py), the Optuna mapping;
- `strategy` -- grid and the Optuna samplers behind one interface;
- `adapter` -- what the tuner needs of a backend (the interface), and kernelsearch's own;
- `policy`  -- which failures are a config's (failed trials) and which are bugs (internal errors);
- `bench`   -- timing (CUDA: ``triton.testing.do_bench``; CPU: monotonic clock), re-timing;
- `check`   -- the correctness guard against the float64 reference, dtype-justified tolerances;
- `target`  -- what one trial does in its child process: feasibility, build, check, time;
- `trial`   -- the child process: time limit, crash and hang handling;
- `storage` -- storage URLs, the budget lock, heartbeats and reaping of dead workers;
- `study`   -- the Optuna study, warm start, workers, the final table;
- `report`  -- plots of a study (history, importances, time per config);
- `cli`     -- ``kernelsearch tune`` / ``kernelsearch report`` argument parsing (`register`);

The test double (a fake target with a synthetic cost model) lives in tests/tune_fake.py and is
injected through the `adapter` interface (``TuneOptions(adapter=...)``).

The tuned winners are written through the runtime's config store (`kernelsearch.runtime.config_store`),
which the backends read; no module outside tune/ imports the tuner.
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
