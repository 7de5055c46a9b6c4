"""The API's enumerations follow the library's registries (a new fidelity candidate is selectable through the API
the day it exists in ``calib``)."""

from __future__ import annotations

import typing


def test_fidelity_option_lists_every_candidate():
    from kvcalib.api.schemas import CalibrationOptions
    from kvcalib.calib.calibration.fidelity import FIDELITIES

    ann = CalibrationOptions.model_fields["fidelity"].annotation
    literal = next(a for a in typing.get_args(ann) if typing.get_origin(a) is typing.Literal)
    assert tuple(typing.get_args(literal)) == tuple(FIDELITIES)
