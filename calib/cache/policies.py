"""Generation-time cache policies (``--decode-policy``): registry of ``DecodePolicy`` factories."""

from __future__ import annotations

from collections.abc import Callable

from kvcalib.calib.cache.decode import DecodePolicy
from kvcalib.calib.cache.morphkv import MorphKV
from kvcalib.calib.errors import KvcalibError

DECODE_POLICIES: dict[str, Callable[..., DecodePolicy]] = {"morphkv": MorphKV}


def get_policy(name: str, budget: int | None = None, recent: int | None = None) -> DecodePolicy:
    if name not in DECODE_POLICIES:
        raise KvcalibError(f"unknown decode policy {name!r}: expected one of {sorted(DECODE_POLICIES)}")
    kwargs = {k: v for k, v in {"budget": budget, "recent": recent}.items() if v is not None}
    return DECODE_POLICIES[name](**kwargs)
