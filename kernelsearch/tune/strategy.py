"""Search strategies behind one interface: the worker loop asks, never names a sampler.

A strategy turns a study's history into the next config to evaluate, through Optuna's ask/tell:

- `sampler(trials)`: the Optuna sampler of the study;
- `suggest(trial)`: the config a trial proposes (`SearchSpace.suggest`);
- `queued_before_ask(untried, stuck)`: a config to put in the study's queue before the next ask
  (the next ask then takes it), with the user attrs that say where it came from; or None;
- `queued_after_rejection(proposal, taken)`: a config to queue after a proposal was rejected (a
  duplicate of an evaluated config, or statically invalid), or None.

``untried`` is the list of valid configs not evaluated, running or queued yet, in the space's
order (default first); ``taken`` the keys (`space.config_key`) of the others; ``stuck`` counts
the rejected proposals in a row.

Strategies: ``grid`` (every valid config in order, default first, through the queue), and the
Optuna samplers ``tpe`` (default; multivariate, grouped for the conditional knobs, constant liar
for parallel workers), ``random`` and ``gp`` (GPSampler; needs scipy). Whatever a sampler
proposes, a config is evaluated at most once per study: a rejected proposal is replaced by the
nearest untried config (fewest knobs changed), keeping the sampler's intent ("around here"), and
after three rejections in a row a random untried config is queued.
"""
from __future__ import annotations

import random
from typing import Any, Mapping

from .space import SearchSpace, nearest_untried

__all__ = ["Strategy", "GridStrategy", "SamplerStrategy", "STRATEGIES", "SAMPLERS", "make_strategy",
           "STUCK_AFTER"]

STUCK_AFTER = 3   # rejected proposals in a row after which a random untried config is queued


def _startup_trials(trials: int, space_size: int | None) -> int:
    """Random start-up trials scale with the budget and the space (3 for a dozen configs, 10 for
    hundreds), the default config being the first."""
    return max(3, min(10, trials // 4, (space_size // 8) if space_size else 10))


class Strategy:
    """The interface (see the module docstring); the base proposes nothing of its own."""

    name = ""
    needs: str | None = None   # a module the strategy's sampler imports (checked before a study starts)

    def __init__(self, space: SearchSpace, seed: int):
        self.space = space
        self.seed = seed
        self.rng = random.Random(seed)

    def sampler(self, trials: int) -> Any:
        import optuna

        return optuna.samplers.RandomSampler(seed=self.seed)

    def suggest(self, trial: Any) -> dict:
        return self.space.suggest(trial)

    def queued_before_ask(self, untried: list[dict], stuck: int) -> tuple[dict, dict] | None:
        return None

    def queued_after_rejection(self, proposal: Mapping[str, Any], taken: set[str]) -> dict | None:
        return None


class GridStrategy(Strategy):
    """Every valid config in the space's order (default first), through the study's queue."""

    name = "grid"

    def queued_before_ask(self, untried, stuck):
        return (untried[0], {"ks_grid": True}) if untried else None


class SamplerStrategy(Strategy):
    """An Optuna sampler, with the tuner's proposal policy around it."""

    every_knob = False

    def queued_before_ask(self, untried, stuck):
        if stuck >= STUCK_AFTER and untried:   # a sampler stuck on evaluated configs: a random one
            return self.rng.choice(untried), {"ks_fallback": True}
        return None

    def queued_after_rejection(self, proposal, taken):
        return nearest_untried(self.space, proposal, taken, self.rng)

    def suggest(self, trial):
        return self.space.suggest(trial, every_knob=self.every_knob)


class TPEStrategy(SamplerStrategy):
    name = "tpe"

    def sampler(self, trials):
        import optuna

        return optuna.samplers.TPESampler(seed=self.seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=_startup_trials(trials, self.space.size()))


class RandomStrategy(SamplerStrategy):
    name = "random"


class GPStrategy(SamplerStrategy):
    name = "gp"
    needs = "scipy"
    # Optuna's GPSampler models one fixed set of parameters (a conditional knob would be drawn at
    # random, outside its model): it is asked for every knob, the inactive ones ignored.
    every_knob = True

    def sampler(self, trials):
        import optuna

        return optuna.samplers.GPSampler(seed=self.seed, n_startup_trials=_startup_trials(trials, self.space.size()),
                                         warn_independent_sampling=False)


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (TPEStrategy, RandomStrategy, GridStrategy, GPStrategy)}
SAMPLERS = tuple(STRATEGIES)


def make_strategy(name: str, space: SearchSpace, seed: int) -> Strategy:
    return STRATEGIES[name](space, seed)
