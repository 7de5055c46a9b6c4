"""Reading truth-label files (JSONL records written by ``benchmarks/calibration_truth.py`` through
``calibration.suite.truth_record``), re-counted with the document-question confidence gate. Upstream of the
predictors, which fit on the rows read here."""

from __future__ import annotations

from kvcalib.calib.calibration.curve import largest_safe_ratio
from kvcalib.calib.calibration.truth import DOC_MIN_CONFIDENCE, rescore
from kvcalib.calib.defaults import TOLERANCE
from kvcalib.calib.errors import KvcalibError


class TruthLabelError(KvcalibError):
    """A truth-label file that cannot be read as truth records."""


def read_truth_labels(path, doc_min_confidence: float | None = None) -> list[dict]:
    """Truth records (JSONL, ``calibration.suite.truth_record``) re-counted with the document-question confidence
    gate (``calibration.truth.rescore``); documents without a counted answer carry no information and are left out.
    Records with fidelity curves also get ``fidelity_r_star`` {candidate: r*(τ = defaults.TOLERANCE)}."""
    import json
    from pathlib import Path

    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TruthLabelError(f"{path}:{i}: not JSON ({exc.msg})") from None
        if not isinstance(r, dict) or "truth" not in r or "features" not in r:
            raise TruthLabelError(f"{path}:{i}: not a truth record (written by benchmarks/calibration_truth.py)")
        r = rescore(r, DOC_MIN_CONFIDENCE if doc_min_confidence is None else doc_min_confidence)
        if r.get("fidelity"):  # the calibration's own r*(τ) per candidate: the base of mode=full risk control
            r["fidelity_r_star"] = {name: float(largest_safe_ratio(r["ratios"], curve, TOLERANCE)[0])
                                    for name, curve in r["fidelity"].items()}
        rows.append(r)
    last = {(r.get("id") or r.get("content_hash"), r.get("params_hash")): r for r in rows}  # a re-run's record wins
    return [r for r in last.values() if r["n_counted"] > 0]


def is_truth_label_file(path) -> bool:
    """True when the first record of a JSONL file is a truth record (not a ``kvcalib calibrate`` label)."""
    import json
    from pathlib import Path

    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    return isinstance(r := json.loads(line), dict) and "truth" in r and "r_star_task" in r
                except json.JSONDecodeError:
                    return False
    return False
