"""Scoring methods: one file each, hyperparameters as dataclass fields with the published defaults.

``get_scorer(name, **params)`` builds one by name (``ALIASES`` maps other names, e.g. the paper's ``laq``, to a
method); ``SCORERS`` lists them.
"""

from __future__ import annotations

from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.scorers.base import PROTECTED, ScoreContext, Scorer
from kvcalib.calib.scorers.baselines import KeyNorm, Random, StreamingLLM
from kvcalib.calib.scorers.compactor import Compactor
from kvcalib.calib.scorers.curdkv import CurDKV
from kvcalib.calib.scorers.keydiff import KeyDiff
from kvcalib.calib.scorers.kvzip import KVzip
from kvcalib.calib.scorers.lava import LAVa
from kvcalib.calib.scorers.lookahead import LookaheadQCache
from kvcalib.calib.scorers.obcache import OBCache
from kvcalib.calib.scorers.snapkv import SnapKV
from kvcalib.calib.scorers.tova import TOVA

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (Compactor, SnapKV, StreamingLLM, KeyNorm, Random, CurDKV, OBCache, LAVa, LookaheadQCache, TOVA,
                KeyDiff, KVzip)
}
ALIASES: dict[str, str] = {"laq": "lookahead"}  # Lookahead Q-Cache's name in its paper


class UnknownMethodError(KvcalibError):
    pass


def available_methods(aliases: bool = False) -> list[str]:
    """The method names (and, with ``aliases``, the other names ``get_scorer`` accepts)."""
    return sorted(SCORERS) + (sorted(ALIASES) if aliases else [])


def canonical_method(name: str) -> str:
    """The method ``name`` refers to (aliases resolved); unknown names raise ``UnknownMethodError``."""
    name = ALIASES.get(name, name)
    if name not in SCORERS:
        raise UnknownMethodError(f"unknown method {name!r}: expected one of {available_methods()}")
    return name


def get_scorer(name: str, **params) -> Scorer:
    cls = SCORERS[canonical_method(name)]
    unknown = set(params) - set(cls.param_names())
    if unknown:
        raise UnknownMethodError(
            f"unknown parameter(s) {sorted(unknown)} for method {name!r}: expected {cls.param_names()}")
    return cls(**params)


__all__ = ["ALIASES", "PROTECTED", "SCORERS", "ScoreContext", "Scorer", "UnknownMethodError", "available_methods",
           "canonical_method", "get_scorer"]
