"""The engine's defaults, in ONE place: what a calibration uses when nothing else is chosen.

The service settings (``kvcalib.settings``), the CLI and the sweeps (``kvcalib.sweep.SweepSpec``) read these instead of
repeating the literals, so that a sweep tunes the configuration the API actually serves.
"""

from __future__ import annotations

MODEL = "smollm2-135m"  # registry name of the default model
METHOD = "compactor"  # scoring method (calib.scorers)
ALLOCATOR = "adakv"  # head-adaptive allocator: larger r* and passkey kept at r* (docs/calibration.md §9–10)
TOLERANCE = 0.95  # fidelity tolerance τ of r*(τ)
# label-free fidelity of the calibration curve: salient-span probes ranked contexts by answer survival and allowed
# the best answer-loss trade-off on 145 essay documents (reconstruction probes: no rank signal); docs/calibration.md §11
FIDELITY = "salient"
LEGACY_FIDELITY = "reconstruction"  # what a stored config without the field means (the only fidelity before it)
RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # calibration grid of ratios
N_PROBES = 6  # reconstruction probes per document (spans of the document)
PROBE_TOKENS = 6  # scored target tokens per probe
CUE_TOKENS = 4  # document tokens fed before each probe's target
