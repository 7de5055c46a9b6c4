"""The sweep's capture cache: prefill captures do not depend on the swept hyperparameters, so each process keeps
them in an LRU (``Settings.sweep_capture_cache_mb``, KVCALIB_SWEEP_CAPTURE_CACHE_MB) and every trial after the first
skips the prefill of each corpus document."""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import Any


class _CaptureCache:
    """Per-process LRU of prefill captures keyed by (model, context token ids). ``max_bytes`` None: the settings'
    ``sweep_capture_cache_mb``, read when a capture is stored."""

    def __init__(self, max_bytes: int | None = None):
        self._max_bytes = max_bytes
        self.items: collections.OrderedDict[tuple, tuple[Any, int]] = collections.OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def max_bytes(self) -> int:
        if self._max_bytes is not None:
            return self._max_bytes
        from kvcalib.settings import get_settings

        return int(float(get_settings().sweep_capture_cache_mb) * 2**20)

    @staticmethod
    def size(cap) -> int:
        import torch

        return sum(v.numel() * v.element_size() for v in vars(cap).values() if isinstance(v, torch.Tensor))

    def get(self, key):
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                self.hits += 1
                return hit[0]
            self.misses += 1
            return None

    def put(self, key, cap) -> None:
        n, limit = self.size(cap), self.max_bytes
        if n > limit:
            return
        with self.lock:
            if key in self.items:
                return
            self.items[key] = (cap, n)
            self.bytes += n
            while self.bytes > limit and self.items:
                _, (_, m) = self.items.popitem(last=False)
                self.bytes -= m

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.bytes = 0


CAPTURES = _CaptureCache()

_CACHING_CLASS = None


def caching_engine(engine):
    """``engine`` with ``capture()`` memoised in ``CAPTURES`` (same weights, same tokenizer, same everything)."""
    global _CACHING_CLASS
    if getattr(engine, "_kvcalib_caching", False):
        return engine
    if _CACHING_CLASS is None:
        from kvcalib.calib.pipeline import Engine

        class CachingEngine(Engine):
            _kvcalib_caching = True

            def __init__(self, inner):
                super().__init__(inner.lm)
                self._inner = inner

            def __getattr__(self, name):  # anything the wrapped engine adds
                return getattr(self._inner, name)

            def capture(self, context_ids, compute_nll: bool = False, **kw):
                ids = context_ids.detach().to("cpu").contiguous()
                base = (getattr(self.lm, "name", ""), getattr(getattr(self.lm, "spec", None), "revision", ""),
                        hashlib.sha256(ids.numpy().tobytes()).hexdigest(), tuple(sorted(kw.items())))
                for flag in ((True,) if compute_nll else (False, True)):
                    cap = CAPTURES.get(base + (flag,))
                    if cap is not None:
                        return cap
                cap = self._inner.capture(context_ids, compute_nll=compute_nll, **kw)
                CAPTURES.put(base + (compute_nll,), cap)
                return cap

        _CACHING_CLASS = CachingEngine
    return _CACHING_CLASS(engine)
