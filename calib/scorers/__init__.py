"""Scoring methods: one file each, hyperparameters as dataclass fields with the published defaults.

``get_scorer(name, **params)`` builds one by name; ``SCORERS`` lists them.
"""

from __future__ import annotations

from kvcalib.calib.errors import KvcalibError

from kvcalib.calib.scorers.base import PROTECTED, ScoreContext, Scorer
from kvcalib.calib.scorers.baselines import KeyNorm, Random, StreamingLLM
from kvcalib.calib.scorers.compactor import Compactor
from kvcalib.calib.scorers.curdkv import CurDKV
from kvcalib.calib.scorers.lava import LAVa
from kvcalib.calib.scorers.lookahead import LookaheadQCache
from kvcalib.calib.scorers.obcache import OBCache
from kvcalib.calib.scorers.snapkv import SnapKV

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (Compactor, SnapKV, StreamingLLM, KeyNorm, Random, CurDKV, OBCache, LAVa, LookaheadQCache)
}


class UnknownMethodError(KvcalibError):
    pass


def available_methods() -> list[str]:
    return sorted(SCORERS)


def get_scorer(name: str, **params) -> Scorer:
    if name not in SCORERS:
        raise UnknownMethodError(f"unknown method {name!r}: expected one of {available_methods()}")
    cls = SCORERS[name]
    unknown = set(params) - set(cls.param_names())
    if unknown:
        raise UnknownMethodError(
            f"unknown parameter(s) {sorted(unknown)} for method {name!r}: expected {cls.param_names()}")
    return cls(**params)


__all__ = ["PROTECTED", "SCORERS", "ScoreContext", "Scorer", "UnknownMethodError", "available_methods", "get_scorer"]
