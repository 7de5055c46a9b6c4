"""Integrations of the engine with inference stacks (engine side: no service import).

* ``hf`` — ``compress(model, ...)``: score, allocate and compress inside the caller's own transformers forward;
* ``pipeline`` — the ``kv-calib-qa`` transformers pipeline task (context + questions over one compressed cache);
* ``kvpress`` — ``KvcalibPress`` and the conversion of a stored budget to kvpress presses (kvpress optional).

Names are imported lazily (PEP 562), as in ``kvcalib.calib``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "compress": "hf",
    "KvcalibCompressor": "hf",
    "CompressionOutcome": "hf",
    "new_cache": "hf",
    "model_shape": "servers",
    "ModelShape": "servers",
    "encode_kept_positions": "servers",
    "decode_kept_positions": "servers",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
