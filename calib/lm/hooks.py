"""Capture hooks, installed ONCE per model, that are re-entrant: state per call, never on the shared modules.

A prefill capture needs the pre-RoPE keys, which only exist inside the attention module (the output of ``k_proj``,
or of ``k_norm`` for models that normalise keys). Registering a forward hook per call on the shared model made every
concurrent call's hooks fire on every other call's forward (wrong keys of the same length, shape errors otherwise).
Instead, ``install_capture_hooks`` registers one permanent hook per layer at load time; the hook looks up the
recorder of the *current call* in a ``contextvars.ContextVar`` set by ``recording(...)`` around the forward, and
does nothing when there is none (decode steps, probe forwards, plain model calls).

A ``ContextVar`` is per thread for plain threads, and a thread-pool worker runs each task in its own thread's
context; ``recording`` sets the recorder in the thread that runs the forward and resets it afterwards (also on an
error), so no recorder leaks to the next task of a pool worker and none is ever seen by another thread. (This is the
mechanism transformers uses for its own output-capturing hooks.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch


class KeySourceRecorder(Protocol):
    """What the hooks write into: the raw output of a layer's key source, (B, N, Hkv·d) or (B, N, Hkv, d)."""

    def record_key_source(self, layer_idx: int, out: torch.Tensor) -> None: ...


_ACTIVE: ContextVar[KeySourceRecorder | None] = ContextVar("kvcalib_capture_recorder", default=None)
_INSTALL_LOCK = threading.Lock()
_MARK = "_kvcalib_capture_hooks"


def active_recorder() -> KeySourceRecorder | None:
    """The recorder of the call running in this thread / context, if any."""
    return _ACTIVE.get()


@contextmanager
def recording(recorder: KeySourceRecorder) -> Iterator[None]:
    """Route the capture hooks of forwards run in this context to ``recorder`` (for the ``with`` block only)."""
    token = _ACTIVE.set(recorder)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def key_source(attn: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is a layer's pre-RoPE keys: ``k_norm`` when the model normalises keys, else
    ``k_proj``."""
    return attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj


def _make_hook(layer_idx: int):
    def hook(_module: torch.nn.Module, _inputs, out: torch.Tensor) -> None:
        rec = _ACTIVE.get()
        if rec is not None:
            rec.record_key_source(layer_idx, out)

    return hook


def install_capture_hooks(model: torch.nn.Module) -> None:
    """Register the permanent key-source hooks of every decoder layer (idempotent, thread-safe)."""
    if getattr(model, _MARK, False):
        return
    with _INSTALL_LOCK:
        if getattr(model, _MARK, False):
            return
        for i, layer in enumerate(model.get_decoder().layers):
            key_source(layer.self_attn).register_forward_hook(_make_hook(i))
        setattr(model, _MARK, True)
