"""The ``SweepSpec``: everything a trial needs besides its parameters, stored with the study; study names.

Two objectives (``SweepSpec.objective``): ``"truth"`` (new studies) — the mean recommended ratio and the realised
answer loss on task-truth documents (``evaluation.evaluate_truth_params``) — and ``"reconstruction"`` (the historical
one, what a stored spec without the field is) — the mean r*(τ) and the held-out reconstruction-fidelity loss
(``evaluation.evaluate_params``)."""

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
OBJECTIVES = ("truth", "reconstruction")
OBJECTIVE_NAMES = ("r_star_mean", "fidelity_loss")  # the reconstruction objective's metric names (historical)
TRUTH_OBJECTIVE_NAMES = ("r_star_mean", "answer_loss")  # the truth objective's
DIRECTIONS = ("maximize", "minimize")  # both objectives: the ratio up, the loss down
DEFAULT_MAX_LOSS = {"truth": 0.05, "reconstruction": 0.0}  # promotion's threshold on objective 1
DEFAULT_QUESTIONS = (4, 4, 0, 2)  # QuestionConfig(n_needles, kv_pairs, multi_values, doc_questions)


def _default_fidelity() -> str:
    from kvcalib.calib.calibration.calibrate import CalibrationConfig

    return CalibrationConfig.__dataclass_fields__["fidelity"].default


DEFAULT_FIDELITY = _default_fidelity()


def objective_names(objective: str) -> tuple[str, str]:
    """The Optuna metric names of a study's two objectives."""
    return TRUTH_OBJECTIVE_NAMES if objective == "truth" else OBJECTIVE_NAMES


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
    holdout_probes: int = 2  # reconstruction objective: fresh probes re-checking each r* (0 = skip: loss ≡ 0)
    seed: int = 0
    population_size: int = 16  # NSGA-II generation size
    max_retry: int = 2  # re-runs of a trial whose worker died (heartbeat stale)
    corpus_source: str = ""
    objective: str = "truth"  # "truth" | "reconstruction" (a stored spec without the field: "reconstruction")
    # the calibration's label-free fidelity (calib.calibration.fidelity); None: the objective's own — the library
    # default for truth studies, reconstruction for reconstruction studies (their held-out check re-probes it)
    fidelity: str | None = None
    questions: tuple[int, int, int, int] = DEFAULT_QUESTIONS  # truth: QuestionConfig of every corpus document
    question_seed: int = 0  # truth: document i's questions use seed question_seed + crc32(document)

    # fields that define the experiment (a resumed study must agree on them)
    IDENTITY: ClassVar[tuple[str, ...]] = ("model", "method", "allocator", "ratios", "tolerance", "n_probes",
                                           "probe_tokens", "cue_tokens", "holdout_probes", "seed", "objective",
                                           "fidelity", "questions", "question_seed")

    def __post_init__(self):
        self.ratios = tuple(sorted({float(r) for r in self.ratios}))
        try:
            self.questions = tuple(int(x) for x in self.questions)
        except (TypeError, ValueError):
            raise SweepError(f"questions must be four integers, got {self.questions!r}") from None
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
        from kvcalib.calib.calibration.fidelity import FIDELITIES
        from kvcalib.calib.data.questions import QuestionConfig, QuestionError

        if self.objective not in OBJECTIVES:
            raise SweepError(f"unknown objective {self.objective!r}: expected one of {list(OBJECTIVES)}")
        if self.fidelity is None:
            self.fidelity = "reconstruction" if self.objective == "reconstruction" else DEFAULT_FIDELITY
        if self.fidelity not in FIDELITIES:
            raise SweepError(f"unknown fidelity {self.fidelity!r}: expected one of {list(FIDELITIES)}")
        if self.objective == "reconstruction" and self.fidelity != "reconstruction":
            raise SweepError("the reconstruction objective re-checks r* with held-out reconstruction probes: it "
                             f"needs the reconstruction fidelity, not {self.fidelity!r} (use the truth objective)")
        if len(self.questions) != 4:
            raise SweepError(f"questions must be four integers (needles, kv pairs, multi values, document "
                             f"questions), got {list(self.questions)}")
        try:
            QuestionConfig(*self.questions).validate()
        except QuestionError as exc:
            raise SweepError(f"questions {list(self.questions)}: {exc}") from None
        if not isinstance(self.question_seed, int) or isinstance(self.question_seed, bool):
            raise SweepError(f"question_seed must be an integer, got {self.question_seed!r}")

    @property
    def objective_names(self) -> tuple[str, str]:
        return objective_names(self.objective)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratios"] = list(self.ratios)
        d["questions"] = list(self.questions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SweepSpec:
        """A stored spec. One stored before objectives existed (no ``objective``) is a reconstruction study: it
        resumes unchanged."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("objective", "reconstruction")
        return cls(**kw)

    @property
    def corpus_hash(self) -> str:
        return corpus_hash(self.documents)

    def summary(self) -> dict:
        """What the dashboard shows as study user attributes (the documents themselves stay in the system attr)."""
        return {"model": self.model, "method": self.method, "allocator": self.allocator,
                "tolerance": self.tolerance, "ratios": list(self.ratios), "n_documents": len(self.documents),
                "corpus_hash": self.corpus_hash, "corpus_source": self.corpus_source, "n_probes": self.n_probes,
                "holdout_probes": self.holdout_probes, "objective": self.objective, "fidelity": self.fidelity,
                "questions": list(self.questions), "question_seed": self.question_seed,
                "objectives": list(self.objective_names)}


def corpus_hash(documents: Sequence[str]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        h.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def study_name(model: str, method: str, allocator: str, suffix: str | None = None, *,
               objective: str | None = None, fidelity: str | None = None) -> str:
    """``kvcalib:<model>:<method>:<allocator>[:<suffix>]`` — the historical name, that of a reconstruction study —
    or, for a truth study (``objective="truth"``), ``kvcalib:<model>:<method>:<allocator>:truth-<fidelity>[:<suffix>]``:
    a truth study exists per (model, method, allocator, fidelity)."""
    parts = [STUDY_PREFIX, model, method, allocator]
    if objective == "truth":
        parts.append(f"truth-{fidelity or DEFAULT_FIDELITY}")
    elif objective not in (None, "reconstruction"):
        raise SweepError(f"unknown objective {objective!r}: expected one of {list(OBJECTIVES)}")
    return ":".join(parts + ([suffix] if suffix else []))


def spec_study_name(spec: SweepSpec, suffix: str | None = None) -> str:
    """The derived name of ``spec``'s study."""
    return study_name(spec.model, spec.method, spec.allocator, suffix, objective=spec.objective,
                      fidelity=spec.fidelity)
