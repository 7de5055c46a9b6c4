"""Search spaces: ONE table of each method's (and allocator's) tunable hyperparameters and their distributions."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

from kvcalib.calib import defaults
from kvcalib.sweep.errors import SweepError


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    step: int = 1
    log: bool = False

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and self.low <= v <= self.high and \
            (v - self.low) % self.step == 0


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def contains(self, v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and self.low <= v <= self.high


@dataclass(frozen=True)
class Choice:
    choices: tuple

    def suggest(self, trial, name: str):
        return trial.suggest_categorical(name, list(self.choices))

    def contains(self, v) -> bool:
        return any(v == c and type(v) is type(c) for c in self.choices)


Distribution = Int | Float | Choice

_WINDOW = Int(8, 64, step=8)
_KERNEL = Choice((1, 3, 5, 7, 9))
_POOLING = Choice(("max", "avg"))

# ONE table: method name -> {hyperparameter (a field of the method's Scorer dataclass): distribution}.
# Methods absent from the table (no tunable hyperparameters: keynorm; random's seed is not one) cannot be swept.
SEARCH_SPACES: dict[str, dict[str, Distribution]] = {
    "compactor": {"blend": Float(0.0, 1.0), "sketch_dim": Choice((16, 32, 48, 64)), "chunk": Choice((64, 128, 256))},
    "snapkv": {"window": _WINDOW, "kernel": _KERNEL, "pooling": _POOLING},
    "lava": {"window": _WINDOW, "kernel": _KERNEL, "pooling": _POOLING},
    "obcache": {"saliency": Choice(("value", "key", "joint")), "window": _WINDOW, "kernel": _KERNEL},
    "curdkv": {"leverage": Choice(("product", "key", "value", "mean")), "local_window": Choice((8, 16, 32, 64)),
               "protect_first": Choice((0, 4, 8))},
    "lookahead": {"n_pseudo": Choice((2, 4, 8)), "obs_window": Choice((0, 8, 16)), "kernel": _KERNEL},
    "streaming": {"sinks": Choice((0, 1, 2, 4, 8, 16))},
    "kvzip": {"n_sink": Choice((0, 4, 8)), "chunk_size": Choice((512, 1024, 2048))},
}
# Allocator hyperparameters (keyword arguments of ``calib.budget.ALLOCATORS[name]``, passed to calibration as
# ``CalibrationConfig.allocator_params``), swept beside the method's.
ALLOCATOR_SPACES: dict[str, dict[str, Distribution]] = {
    "uniform": {},
    "adakv": {"alpha": Float(0.0, 0.6)},
    "lava": {"alpha": Float(0.0, 0.6)},
}
ALLOCATOR_PREFIX = "alloc_"  # allocator parameters are named e.g. ``alloc_alpha`` in the study


def sweepable_methods() -> list[str]:
    from kvcalib.calib.scorers import SCORERS

    return sorted(m for m in SCORERS if m in SEARCH_SPACES)


def search_space(method: str, allocator: str = defaults.ALLOCATOR) -> dict[str, Distribution]:
    """The study's distributions: the method's hyperparameters, then ``alloc_<name>`` for the allocator's."""
    from kvcalib.calib.budget import available_allocators
    from kvcalib.calib.scorers import SCORERS, available_methods

    if method not in SCORERS:
        raise SweepError(f"unknown method {method!r}: expected one of {available_methods()}")
    if method not in SEARCH_SPACES:
        raise SweepError(f"method {method!r} has no search space (no tunable hyperparameters); sweepable methods: "
                         f"{sweepable_methods()}")
    if allocator not in available_allocators():
        raise SweepError(f"unknown allocator {allocator!r}: expected one of {available_allocators()}")
    bad = set(SEARCH_SPACES[method]) - set(SCORERS[method].param_names())
    if bad:
        raise SweepError(f"search space of {method!r} names unknown hyperparameters {sorted(bad)}")
    space = dict(SEARCH_SPACES[method])
    for k, dist in ALLOCATOR_SPACES.get(allocator, {}).items():
        space[ALLOCATOR_PREFIX + k] = dist
    return space


def split_params(params: dict) -> tuple[dict, dict]:
    """(method_params, allocator_params) of a trial's flat parameter dict."""
    mp = {k: v for k, v in params.items() if not k.startswith(ALLOCATOR_PREFIX)}
    ap = {k[len(ALLOCATOR_PREFIX):]: v for k, v in params.items() if k.startswith(ALLOCATOR_PREFIX)}
    return mp, ap


def default_params(method: str, allocator: str) -> dict:
    """The published defaults restricted to the search space (enqueued as a study's first trial, the baseline)."""
    from kvcalib.calib import budget
    from kvcalib.calib.scorers import SCORERS

    space = search_space(method, allocator)
    out = {}
    for f in dataclasses.fields(SCORERS[method]):
        if f.name in space and f.default is not dataclasses.MISSING and space[f.name].contains(f.default):
            out[f.name] = f.default
    sig = inspect.signature(budget.ALLOCATORS[allocator])
    for k in ALLOCATOR_SPACES.get(allocator, {}):
        p = sig.parameters.get(k)
        if p is not None and p.default is not inspect.Parameter.empty and \
                space[ALLOCATOR_PREFIX + k].contains(p.default):
            out[ALLOCATOR_PREFIX + k] = p.default
    return out
