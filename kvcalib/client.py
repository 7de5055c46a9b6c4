"""Python client of the kvcalib service, for inference servers and scripts.

>>> from kvcalib.client import KvcalibClient, content_hash
>>> kv = KvcalibClient("http://127.0.0.1:8000", token=None)
>>> b = kv.budget(content_hash(doc))               # stored profile, cached locally (LRU + TTL); None if absent
>>> b = kv.budget(text=doc, predict_missing=True)  # … else the predicted budget (POST /budget)
>>> b = kv.budget(text=doc, predict_missing=True, dtype="bf16", device="cuda")  # predicted in bf16 on the GPU
>>> b.ratio, b.token_budget, b.head_budgets        # r*, mean kept tokens per head, (L, Hkv) counts
>>> ckv = kv.compress(doc)                          # the compressed cache itself (safetensors → CompressedKV)
>>> kv.predictors()["defaults"]                     # model → predictor serving it (shipped by default)
>>> kv.register_predictor("predictors/risk.json")   # a predictor of `kvcalib fit`, served from then on
>>> kv.predictions(text=doc)                        # its stored predictions, newest first

Applying a budget to a transformers ``DynamicCache`` (see ``apply_budget`` / ``to_dynamic_cache``):

* a ``DynamicCache`` is rectangular — every head of a layer holds the same number of positions, and transformers
  builds one attention mask from layer 0 — so per-head budgets are *topped up*: every head keeps its top-scoring
  ``max`` positions (the largest budget, over the model by default). The budgeted positions are always among them,
  so fidelity is at least the calibrated one; memory is that of the largest head. With the ``uniform`` allocator
  all heads have the same budget and nothing is topped up. kvcalib's own ``RaggedKVCache``
  (``CompressedKV.to_ragged_cache()``) holds exact ragged budgets.
* kept keys carry RoPE of their ORIGINAL positions: feed the next tokens with
  ``position_ids = next_position + arange(q)`` (``next_position`` = the uncompressed context length), never the
  cache length. ``cache_position`` may stay the default (it only indexes the compacted cache).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import httpx

from kvcalib.calib.data.hashing import content_hash

__all__ = ["BudgetInfo", "KvcalibClient", "ServiceError", "TTLCache", "apply_budget", "content_hash",
           "to_dynamic_cache"]


class ServiceError(RuntimeError):
    def __init__(self, status_code: int, detail: Any):
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code, self.detail = status_code, detail


@dataclass(frozen=True)
class BudgetInfo:
    source: str  # "profile" or "predicted"
    document_hash: str | None  # None: predicted from token ids
    model: str
    method: str
    allocator: str
    tolerance: float
    ratio: float
    token_budget: int
    context_tokens: int
    layer_budgets: list[int]
    head_budgets: list[list[int]]
    model_revision: str | None = None
    profile_id: int | None = None
    predictor_version: str | None = None
    ids_hash: str | None = None  # token_ids_hash of the context token ids the budget was measured on
    dtype: str | None = None
    model_shape: dict | None = None  # layers, kv_heads, query_heads, head_dim, dtype, model_type
    prompt_format: dict | None = None  # kind (chat_template | token_ids), model, context_tokens, doc_start, ids_hash
    kept_positions: dict | None = None  # encode_kept_positions (include_positions=True only)

    @classmethod
    def from_json(cls, d: dict) -> BudgetInfo:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class TTLCache:
    """A small thread-safe LRU cache whose entries expire after ``ttl`` seconds."""

    def __init__(self, maxsize: int = 1024, ttl: float = 300.0):
        self.maxsize, self.ttl = maxsize, ttl
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    _MISSING = object()

    def get(self, key, default=_MISSING):
        now = time.monotonic()
        with self._lock:
            item = self._data.get(key)
            if item is None or item[0] < now:
                if item is not None:
                    del self._data[key]
                self.misses += 1
                return None if default is TTLCache._MISSING else default
            self._data.move_to_end(key)
            self.hits += 1
            return item[1]

    def contains(self, key) -> bool:
        with self._lock:
            item = self._data.get(key)
            return item is not None and item[0] >= time.monotonic()

    def put(self, key, value, ttl: float | None = None) -> None:
        with self._lock:
            self._data[key] = (time.monotonic() + (self.ttl if ttl is None else ttl), value)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


_NOT_FOUND = ("not-found",)


class KvcalibClient:
    """Synchronous HTTP client. ``budget`` look-ups are cached (found budgets for ``cache_ttl`` seconds, misses for
    ``negative_ttl`` seconds so a document calibrated meanwhile is picked up soon)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 10.0,
                 cache_size: int = 4096, cache_ttl: float = 300.0, negative_ttl: float = 10.0,
                 transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                 transport=transport)
        self.cache = TTLCache(cache_size, cache_ttl)
        self.negative_ttl = negative_ttl

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _raise(r: httpx.Response) -> None:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text
            raise ServiceError(r.status_code, detail)

    # ------------------------------------------------------------------ budgets
    def budget(self, document_hash: str | None = None, *, text: str | None = None, model: str | None = None,
               tolerance: float | None = None, method: str | None = None, allocator: str | None = None,
               dtype: str | None = None, device: str | None = None, predict_missing: bool = False,
               use_cache: bool = True) -> BudgetInfo | None:
        """The budget of a document: its stored profile (``GET /budget``; ``dtype``: only one measured in it), else
        — with ``predict_missing`` and the ``text`` — a predicted budget (``POST /budget``, the model in ``dtype``
        on ``device``: cpu, cuda or cuda:N, one the server allows), else None. The device is not part of the cache
        key: it changes where a budget is computed, not the budget."""
        if document_hash is None:
            if text is None:
                raise ValueError("give document_hash or text")
            document_hash = content_hash(text)
        key = (document_hash, model, tolerance, method, allocator, dtype)
        if use_cache:
            hit = self.cache.get(key)
            if isinstance(hit, BudgetInfo):
                return hit
            if hit == _NOT_FOUND and not (predict_missing and text is not None):
                return None
        params = {"document_hash": document_hash, "model": model, "tolerance": tolerance, "method": method,
                  "allocator": allocator, "dtype": dtype}
        r = self.http.get("/budget", params={k: v for k, v in params.items() if v is not None})
        if r.status_code == 404:
            if predict_missing and text is not None:
                b = self.predict_budget(text, model=model, tolerance=tolerance, method=method, allocator=allocator,
                                        dtype=dtype, device=device)
                self.cache.put(key, b, ttl=self.negative_ttl)  # a prediction is replaced by a profile later
                return b
            self.cache.put(key, _NOT_FOUND, ttl=self.negative_ttl)
            return None
        self._raise(r)
        b = BudgetInfo.from_json(r.json())
        self.cache.put(key, b)
        return b

    def predict_budget(self, text: str, **params) -> BudgetInfo:
        """``POST /budget`` of a document: its stored profile, else a prediction; ``params``: model, tolerance,
        method, allocator, dtype, device."""
        body = {"text": text, **{k: v for k, v in params.items() if v is not None}}
        r = self.http.post("/budget", json=body)
        self._raise(r)
        return BudgetInfo.from_json(r.json())

    def token_ids_budget(self, token_ids: list[int], *, include_positions: bool = False, **params) -> BudgetInfo:
        """The budget of exactly the token ids a server prefills (``POST /budget`` with ``token_ids``): their stored
        profile, else a prediction from a prefill of those ids; ``params``: model, tolerance, method, allocator,
        dtype, device. Not cached."""
        body = {"token_ids": [int(i) for i in token_ids], "include_positions": include_positions,
                **{k: v for k, v in params.items() if v is not None}}
        r = self.http.post("/budget", json=body)
        self._raise(r)
        return BudgetInfo.from_json(r.json())

    # ------------------------------------------------------------------ calibration
    def calibrate(self, text: str | None = None, *, document_id: int | None = None, wait: bool = False,
                  poll: float = 0.5, timeout: float = 600.0, **params) -> dict:
        """Submit a full calibration; with ``wait`` poll the job until it finishes. Returns the job. ``params``:
        model, method, allocator, tolerance, options, dtype, device (where the job runs)."""
        body = {"mode": "full", "text": text, "document_id": document_id, **params}
        r = self.http.post("/calibrate", json={k: v for k, v in body.items() if v is not None})
        self._raise(r)
        job = r.json()
        return self.wait_job(job["id"], poll, timeout) if wait else job

    def job(self, job_id: int) -> dict:
        r = self.http.get(f"/jobs/{job_id}")
        self._raise(r)
        return r.json()

    def wait_job(self, job_id: int, poll: float = 0.5, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
                return job
            time.sleep(poll)

    def predict(self, text: str, **params) -> dict:
        r = self.http.post("/calibrate", json={"mode": "predict", "text": text,
                                               **{k: v for k, v in params.items() if v is not None}})
        self._raise(r)
        return r.json()

    def compress(self, text: str | None = None, *, document_id: int | None = None, ratio: float | None = None,
                 **params):
        """The compressed KV cache of a document (``kvcalib.calib.cache.export.CompressedKV``)."""
        from kvcalib.calib.cache.export import load_compressed

        body = {"mode": "compress", "text": text, "document_id": document_id, "ratio": ratio, **params}
        r = self.http.post("/calibrate", json={k: v for k, v in body.items() if v is not None})
        self._raise(r)
        return load_compressed(r.content)

    def submit_batch(self, documents: list, **params) -> dict:
        r = self.http.post("/batches", json={"documents": documents,
                                             **{k: v for k, v in params.items() if v is not None}})
        self._raise(r)
        return r.json()

    def batch(self, batch_id: int, items: bool = False) -> dict:
        r = self.http.get(f"/batches/{batch_id}", params={"items": str(items).lower()})
        self._raise(r)
        return r.json()

    def profile(self, profile_id: int) -> dict:
        r = self.http.get(f"/profiles/{profile_id}")
        self._raise(r)
        return r.json()

    # ------------------------------------------------------------------ predictors, predictions
    def predictors(self) -> dict:
        """``GET /predictors``: ``{"predictors": [...], "defaults": {model: version}}``."""
        r = self.http.get("/predictors")
        self._raise(r)
        return r.json()

    def register_predictor(self, predictor: dict | str | Path, model: str | None = None) -> dict:
        """``POST /predictors``: register a predictor — its JSON object, or the path of its ``.json`` file (as
        written by ``kvcalib fit``). Returns the registered predictor (``ServiceError`` 422 when malformed)."""
        if isinstance(predictor, (str, Path)):
            predictor = json.loads(Path(predictor).read_text(encoding="utf-8"))
        r = self.http.post("/predictors", json=predictor, params={"model": model} if model else None)
        self._raise(r)
        return r.json()

    def predictions(self, document_hash: str | None = None, *, text: str | None = None, model: str | None = None,
                    method: str | None = None, allocator: str | None = None, limit: int = 100) -> list[dict]:
        """``GET /predictions``: the stored predictions (of a document, given its hash or text), newest first."""
        if document_hash is None and text is not None:
            document_hash = content_hash(text)
        params = {"document_hash": document_hash, "model": model, "method": method, "allocator": allocator,
                  "limit": limit}
        r = self.http.get("/predictions", params={k: v for k, v in params.items() if v is not None})
        self._raise(r)
        return r.json()["predictions"]


# ---------------------------------------------------------------------------------------------------- caches
def _layer_kv(cache, l: int):
    layer = cache.layers[l]
    return layer.keys, layer.values


def apply_budget(cache, head_budgets, scores=None, rectangular: str = "model", protect_first: int = 4,
                 protect_last: int = 8):
    """Compress a transformers ``DynamicCache`` (full prefill of N tokens) to a budget. Returns
    ``(new DynamicCache, next_position)``; feed later tokens at ``position_ids = next_position + arange(q)``.

    * ``head_budgets`` — (L, Hkv) kept positions per head (``BudgetInfo.head_budgets``);
    * ``scores`` — (L, Hkv, N) importance, higher = keep (e.g. kvcalib's scorer on the same prefill). Default: the
      key-norm heuristic (small ‖k‖ kept) with the first ``protect_first`` and last ``protect_last`` positions
      always kept;
    * ``rectangular`` — ``"model"``: every layer gets the width of the largest budget in the model (needed when
      several tokens are fed at once: transformers sizes one mask by layer 0); ``"layer"``: the largest budget of
      each layer (smaller, valid for one-token-at-a-time decoding only). Kept positions stay in original order.
    """
    import torch
    from transformers import DynamicCache

    n_layers = len(cache.layers)
    counts = torch.as_tensor(head_budgets, dtype=torch.long)
    if counts.shape[0] != n_layers:
        raise ValueError(f"head_budgets has {counts.shape[0]} layers, the cache {n_layers}")
    k0, _ = _layer_kv(cache, 0)
    n = k0.shape[2]
    widths = counts.max(dim=1).values.clamp(1, n)
    if rectangular == "model":
        widths = torch.full_like(widths, int(widths.max()))
    elif rectangular != "layer":
        raise ValueError("rectangular must be 'model' or 'layer'")
    out = DynamicCache()
    for l in range(n_layers):
        k, v = _layer_kv(cache, l)  # (B, Hkv, N, d)
        if scores is not None:
            s = torch.as_tensor(scores[l], dtype=torch.float32, device=k.device).expand(k.shape[0], -1, -1)
        else:
            s = -k.float().norm(dim=-1)  # (B, Hkv, N)
        s = s.clone()
        big = torch.finfo(s.dtype).max
        if protect_first:
            s[..., :protect_first] = big
        if protect_last:
            s[..., max(0, n - protect_last):] = big
        w = int(widths[l])
        idx = torch.topk(s, w, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, w), original order
        gi = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
        out.update(torch.gather(k, 2, gi).contiguous(), torch.gather(v, 2, gi).contiguous(), l)
    return out, n


def to_dynamic_cache(compressed, rectangular: str = "model"):
    """A transformers ``DynamicCache`` from a compress response (``kvcalib.calib.cache.export.CompressedKV``).
    Returns ``(DynamicCache, next_position)``.

    A compress response holds exactly the kept entries of every head, left-aligned with padding slots after them.
    A DynamicCache cannot mask padding, so it holds such a cache exactly only when the heads keep equal numbers of
    positions: every head of the model (``rectangular="model"``, the ``uniform`` allocator) or every head of each
    layer (``rectangular="layer"``, one-token-at-a-time decoding only). Otherwise this raises ``ValueError``: use
    ``CompressedKV.to_ragged_cache()`` (exact, kvcalib's decode path) or ``apply_budget`` on your own prefill.
    """
    import torch
    from transformers import DynamicCache

    budgets = torch.as_tensor(compressed.head_budgets)
    if rectangular == "model" and int(budgets.max()) != int(budgets.min()):
        raise ValueError("this compressed cache has unequal per-head budgets (non-uniform allocator): a "
                         "DynamicCache cannot hold it exactly; use CompressedKV.to_ragged_cache() or apply_budget()")
    out = DynamicCache()
    for l, layer in enumerate(compressed.layers):
        per_layer = layer.counts
        if rectangular == "layer" and max(per_layer) != min(per_layer):
            raise ValueError(f"layer {l} has unequal per-head budgets {per_layer}: use to_ragged_cache()")
        w = max(per_layer)
        out.update(layer.keys[:, :w].unsqueeze(0).contiguous(), layer.values[:, :w].unsqueeze(0).contiguous(), l)
    return out, compressed.next_position
