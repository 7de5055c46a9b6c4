"""The ``SweepSpec``: everything a trial needs besides its parameters, stored with the study; study names."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from kvcalib.calib import defaults
from kvcalib.sweep.errors import SweepError
from kvcalib.sweep.space import search_space

STUDY_PREFIX = "kvcalib"
OBJECTIVE_NAMES = ("r_star_mean", "fidelity_loss")
DIRECTIONS = ("maximize", "minimize")


@dataclass
class SweepSpec:
    """Everything a trial needs besides its parameters; stored with the study. Model, method, allocator and τ
    default to the engine's (``calib.defaults``): what the API serves is what a sweep tunes."""

    model: str = defaults.MODEL
    method: str = defaults.METHOD
    allocator: str = defaults.ALLOCATOR
    documents: list[str] = field(default_factory=list)
    ratios: tuple[float, ...] = defaults.RATIOS  # calibration's grid: what the API calibrates with
    tolerance: float = defaults.TOLERANCE
    n_probes: int = 4
    probe_tokens: int = 12
    cue_tokens: int = 8
    holdout_probes: int = 2  # fresh probes re-checking each r* (0 = skip: objective 1 is then identically 0)
    seed: int = 0
    population_size: int = 16  # NSGA-II generation size
    max_retry: int = 2  # re-runs of a trial whose worker died (heartbeat stale)
    corpus_source: str = ""

    # fields that define the experiment (a resumed study must agree on them)
    IDENTITY: ClassVar[tuple[str, ...]] = ("model", "method", "allocator", "ratios", "tolerance", "n_probes",
                                           "probe_tokens", "cue_tokens", "holdout_probes", "seed")

    def __post_init__(self):
        self.ratios = tuple(sorted({float(r) for r in self.ratios}))
        if not self.documents:
            raise SweepError("the sweep corpus holds no documents")
        if not all(isinstance(d, str) and d.strip() for d in self.documents):
            raise SweepError("every corpus document must be a non-empty string")
        if not self.ratios or not all(0.0 < r < 1.0 for r in self.ratios):
            raise SweepError(f"ratios must lie in (0, 1), got {list(self.ratios)}")
        if not 0.0 < self.tolerance <= 1.0:
            raise SweepError(f"tolerance must be in (0, 1], got {self.tolerance}")
        if self.n_probes < 1 or self.holdout_probes < 0 or self.population_size < 2 or self.max_retry < 0:
            raise SweepError("n_probes >= 1, holdout_probes >= 0, population_size >= 2, max_retry >= 0 required")
        search_space(self.method, self.allocator)  # validates method and allocator

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratios"] = list(self.ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SweepSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def corpus_hash(self) -> str:
        return corpus_hash(self.documents)

    def summary(self) -> dict:
        """What the dashboard shows as study user attributes (the documents themselves stay in the system attr)."""
        return {"model": self.model, "method": self.method, "allocator": self.allocator,
                "tolerance": self.tolerance, "ratios": list(self.ratios), "n_documents": len(self.documents),
                "corpus_hash": self.corpus_hash, "corpus_source": self.corpus_source, "n_probes": self.n_probes,
                "holdout_probes": self.holdout_probes, "objectives": list(OBJECTIVE_NAMES)}


def corpus_hash(documents: Sequence[str]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        h.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def study_name(model: str, method: str, allocator: str, suffix: str | None = None) -> str:
    parts = [STUDY_PREFIX, model, method, allocator] + ([suffix] if suffix else [])
    return ":".join(parts)
