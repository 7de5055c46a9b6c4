"""Compress inside the caller's own transformers prefill (issue 17, item 1), kvpress-style.

>>> from kvcalib.calib import compress
>>> with compress(model, method="compactor", allocator="adakv", ratio="auto", tokenizer=tok) as press:
...     out = model(input_ids, past_key_values=cache)        # cache = new_cache(), filled in place
>>> press.outcome.ratio, cache.report()["bytes_held"]
>>> model(question_ids, past_key_values=cache)             # decoding continues from the kept entries only

During the ``with`` block the first forward of the model (batch 1, no non-empty kvcalib cache) is the prefill: it runs
through kvcalib's attention path with a per-call ``PrefillRecorder`` (``calib.capture``) routed by the re-entrant
capture hooks (``calib.lm.hooks``), so the scorer's statistics are taken from *that* forward — layerwise scorers
(Compactor, SnapKV, ...) score each layer while it runs (``calib.scorers.streaming``) — and no second prefill is run.
After it the scores are allocated (``calib.budget``) and a ``RaggedKVCache`` holding only the kept entries is built
(per-head raggedness through the ``"kvcalib"`` attention path; every layer is its own tensor, so layer budgets free
memory). ``ratio="auto"`` predicts the ratio from features of the same prefill (its logits give the token NLL) with
the shipped predictor (``calib.predictors.bundled``), exactly as ``calibrate.predict`` does from its own prefill;
when none ships for the model, method and allocator, the service's documented fallback (Compactor's parametric
curve at b = 0: r = 1 − τ, version reported in ``outcome.predictor_version``).

Entering ``compress`` the first time installs, once per model: kvcalib's ``"kvcalib"`` attention implementation
(plain causal SDPA whenever no kvcalib state is passed, so the model's other uses are unchanged), the capture hooks,
and the cache-routing hooks below; architectures the attention path does not reproduce are refused
(``calib.lm.support``). The permanent forward pre-hook (state per call only) lets the model's ordinary forward
take a ``RaggedKVCache`` as ``past_key_values`` (or ``cache``): it is routed to the attention path as
``kvcalib_state`` with the original position ids, so ``model(ids, past_key_values=cache)`` or
``calib.cache.decode.greedy_decode`` continue from it.
"""

from __future__ import annotations

import math
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvcalib.calib import budget as budgets
from kvcalib.calib import defaults
from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.capture import Capture, PrefillRecorder
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.integrations.servers import model_name, model_shape
from kvcalib.calib.lm.hooks import install_capture_hooks, recording
from kvcalib.calib.lm.registry import LoadedModel, ModelSpec
from kvcalib.calib.scorers import ScoreContext, Scorer, get_scorer


class IntegrationError(KvcalibError):
    pass


def new_cache() -> RaggedKVCache:
    """An empty kvcalib cache to pass as ``past_key_values``: the prefill under ``compress`` fills it in place."""
    return RaggedKVCache(layers=[], next_position=0)


@dataclass
class CompressionOutcome:
    """What one compressed prefill did."""

    ratio: float  # the target ratio (given, or predicted for "auto")
    achieved_ratio: float  # 1 − kept / full entries
    context_tokens: int
    keep: torch.Tensor  # (L, Hkv, N) bool: the kept positions of every (layer, kv head)
    kv_bytes_held: int  # K/V bytes the compressed cache holds (kept + padding)
    kv_bytes_full: int  # K/V bytes of the full cache of the context
    predicted: bool = False
    features: dict[str, float] = field(default_factory=dict)
    predictor_version: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"ratio": round(self.ratio, 4), "achieved_ratio": round(self.achieved_ratio, 4),
                "context_tokens": self.context_tokens, "kv_bytes_held": self.kv_bytes_held,
                "kv_bytes_full": self.kv_bytes_full, "predicted": self.predicted,
                "predictor_version": self.predictor_version,
                "timings": {k: round(v, 4) for k, v in self.timings.items()}}


@dataclass
class _NoGrad:
    """A ``LayerObserver`` running another one without autograd (the caller's forward may track gradients)."""

    inner: Any

    def observe(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor) -> None:
        with torch.no_grad():
            self.inner.observe(layer_idx, q.detach(), k.detach(), v.detach(),
                               k_pre.detach() if k_pre is not None else None)


_SESSION: ContextVar[KvcalibCompressor | None] = ContextVar("kvcalib_compress_session", default=None)
_MARK = "_kvcalib_integration_hooks"
_LOCK = threading.Lock()


class KvcalibCompressor:
    """The context manager returned by ``compress``: compresses the first prefill run inside its ``with`` block.
    After it, ``cache`` is the compressed ``RaggedKVCache`` and ``outcome`` the ``CompressionOutcome``."""

    def __init__(self, model: torch.nn.Module, method: str | Scorer = defaults.METHOD,
                 allocator: str = defaults.ALLOCATOR, ratio: float | str = 0.5,
                 tolerance: float = defaults.TOLERANCE, *, tokenizer: Any = None, text: str | None = None,
                 name: str | None = None, predictor: Any = None, method_params: dict | None = None,
                 allocator_params: dict | None = None):
        self.scorer = method if isinstance(method, Scorer) else get_scorer(method, **(method_params or {}))
        budgets.check_allocator(allocator)
        if isinstance(ratio, str):
            if ratio != "auto":
                raise IntegrationError(f"ratio must be a number in [0, 1) or 'auto', got {ratio!r}")
        else:
            budgets.Budget(ratio=float(ratio))  # validates the range
        self.model, self.allocator, self.ratio, self.tolerance = model, allocator, ratio, float(tolerance)
        self.allocator_params = dict(allocator_params or {})
        self.tokenizer, self.text, self.name, self.predictor = tokenizer, text, name or model_name(model), predictor
        self.cache: RaggedKVCache | None = None
        self.outcome: CompressionOutcome | None = None
        self._token = None
        self._recording = None
        self._observer = None
        self._recorder: PrefillRecorder | None = None
        self._target: RaggedKVCache | None = None
        self._started = 0.0
        self._config = None
        self._version: str | None = None
        if ratio == "auto":
            self._config, self.predictor = self._auto_config()

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> KvcalibCompressor:
        install(self.model)
        self._token = _SESSION.set(self)
        return self

    def __exit__(self, *exc) -> None:
        self._stop_recording()
        if self._token is not None:
            _SESSION.reset(self._token)
            self._token = None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    # ------------------------------------------------------------------ the prefill
    def _auto_config(self):
        from kvcalib.calib.calibration.calibrate import CalibrationConfig
        from kvcalib.calib.predictors.bundled import default_predictor
        from kvcalib.calib.predictors.io import load_predictor

        cfg = CalibrationConfig(method=self.scorer.name, method_params=self.scorer.params(), allocator=self.allocator,
                                allocator_params=self.allocator_params, tolerance=self.tolerance)
        pred = self.predictor
        if pred is None:
            pred = default_predictor(self.name, cfg.method, cfg.allocator)
            if pred is None:  # the service's documented fallback with no profile: Compactor's curve at b = 0
                from kvcalib.calib.predictors import ParametricPredictor

                pred = ParametricPredictor(alpha=0.0, beta=0.0, tau=cfg.tolerance)
                self._version = "fallback-parametric-b0"
        elif isinstance(pred, (str, Path)):
            pred = load_predictor(pred)
        for key in ("method", "allocator", "tolerance"):
            trained = pred.training_config()
            if key in trained and trained[key] != getattr(cfg, key):
                raise IntegrationError(f"predictor {pred.version} was trained for {key}={trained[key]!r}, "
                                       f"not {getattr(cfg, key)!r}")
        if self.tokenizer is None:
            raise IntegrationError("ratio='auto' needs tokenizer= (the prompt layout and text features)")
        return cfg, pred

    def _begin(self, n: int, device: torch.device) -> PrefillRecorder:
        from kvcalib.calib.calibration.features import feature_query_positions
        from kvcalib.calib.scorers.streaming import LayerwiseScoring, kept_queries

        shape = model_shape(self.model)
        extra = feature_query_positions(n) if self.ratio == "auto" else None
        observers, tail, keep_pre = [], None, True
        if self.scorer.layerwise:
            self._observer = LayerwiseScoring(self.scorer, self._score_context())
            observers, tail, keep_pre = [_NoGrad(self._observer)], 0, self.scorer.stream_keeps_keys_pre
        elif self.scorer.query_tail() is not None:
            tail = self.scorer.query_tail()
        qpos = kept_queries(n, tail, extra)
        rec = PrefillRecorder(shape.layers, None, shape.head_dim, observers, qpos, keep_pre)
        self._recorder, self._started = rec, time.perf_counter()
        self._recording = recording(rec)
        self._recording.__enter__()
        return rec

    def _stop_recording(self) -> None:
        if self._recording is not None:
            self._recording.__exit__(None, None, None)
            self._recording = None

    def _score_context(self, budget: budgets.Budget | None = None) -> ScoreContext:
        shape = model_shape(self.model)
        spec = ModelSpec(name=self.name, num_layers=shape.layers, num_heads=shape.query_heads,
                         num_kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                         max_positions=getattr(self.model.config, "max_position_embeddings", 4096), revision="",
                         model_type=shape.model_type, dtype=shape.dtype)
        lm = LoadedModel(name=self.name, model=self.model, tokenizer=self.tokenizer, spec=spec)
        eos = {getattr(self.tokenizer, "eos_token_id", None)} if self.tokenizer is not None else set()
        return ScoreContext(lm=lm, budget=budget, eos_ids={i for i in eos if i is not None})

    @torch.no_grad()
    def _finish(self, ids: torch.Tensor, logits: torch.Tensor | None) -> RaggedKVCache:
        """ids (N,), logits (N, V) or (1, V) of the prefill -> the compressed cache."""
        self._stop_recording()
        rec, self._recorder = self._recorder, None
        t_forward = time.perf_counter() - self._started
        t0 = time.perf_counter()
        n = int(ids.numel())
        if not all(rec.seen_pre):
            raise IntegrationError("the capture hooks recorded no pre-RoPE keys: the model's layers were replaced")
        logits = logits.detach() if logits is not None else None
        cap = Capture(input_ids=ids.detach().cpu(), keys=rec.stacked("keys").detach(),
                      values=rec.stacked("values").detach(),
                      keys_pre=rec.stacked("keys_pre").detach() if rec.keep_keys_pre else None,
                      queries=rec.stacked("queries").detach(),
                      last_logits=logits[-1].float() if logits is not None else torch.zeros(0),
                      query_positions=rec.query_positions.cpu() if rec.query_positions is not None else None)
        del rec
        timings = {"forward_s": t_forward}
        if self._observer is not None:
            timings["forward_s"] -= self._observer.seconds
        predicted = self.ratio == "auto"
        budget = budgets.Budget(ratio=0.5 if predicted else float(self.ratio))
        if predicted:
            budget = budgets.Budget(ratio=self._config.ratios[len(self._config.ratios) // 2])
        if self._observer is not None:
            scores = self._observer.result(cap)  # (L, Hkv, N)
        else:
            scores = self.scorer.score(cap, self._score_context(budget))
        timings["score_s"] = time.perf_counter() - t0 + (self._observer.seconds if self._observer else 0.0)
        feats, version, ratio = {}, None, float(budget.ratio)
        if predicted:
            t1 = time.perf_counter()
            ratio, feats = self._predict(cap, scores, logits)
            version = self._version or self.predictor.version
            budget = budgets.Budget(ratio=ratio)
            if self.scorer.budget_dependent:
                scores = self.scorer.score(cap, self._score_context(budget))
            timings["predict_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        keep = budgets.allocate(scores, budget, self.allocator, **self.allocator_params)  # (L, Hkv, N)
        cache = RaggedKVCache.from_mask(cap.keys, cap.values, keep)
        full = cap.keys.numel() * 2 * cap.keys.element_size()
        del cap
        timings["compress_s"] = time.perf_counter() - t1
        held = cache.report()["bytes_held"]
        self.outcome = CompressionOutcome(ratio=ratio, achieved_ratio=1.0 - float(keep.float().mean()),
                                          context_tokens=n, keep=keep.cpu(), kv_bytes_held=held, kv_bytes_full=full,
                                          predicted=predicted, features=feats, predictor_version=version,
                                          timings=timings)
        self.cache = cache
        return cache

    def _predict(self, cap: Capture, scores: torch.Tensor, logits: torch.Tensor | None) -> tuple[float, dict]:
        """The shipped predictor's ratio from the features of this prefill (as ``calibrate.predict``)."""
        from kvcalib.calib.calibration.calibrate import NLL_STRIDE
        from kvcalib.calib.calibration.curve import keep_masks
        from kvcalib.calib.calibration.features import context_features
        from kvcalib.calib.data.documents import build_prompt

        cfg, ids, n = self._config, cap.input_ids, cap.num_tokens
        if logits is None or logits.shape[0] != n:
            raise IntegrationError("ratio='auto' needs the logits of every context position (do not pass "
                                   "logits_to_keep to the prefill)")
        at = torch.arange(0, n - 1, NLL_STRIDE)
        cap.token_nll = F.cross_entropy(logits[at.to(logits.device)].float(), ids[at + 1].to(logits.device),
                                        reduction="none")
        head = build_prompt(self.tokenizer, "", "").context_ids
        doc_start = int(head.numel()) if torch.equal(ids[:head.numel()], head) else 0
        text = self.text if self.text is not None else self.tokenizer.decode(ids[doc_start:])
        keep = keep_masks(scores, cfg.ratios, cfg.allocator, **cfg.allocator_params)
        feats = context_features(text, cap, scores, keep[1:], cfg.ratios, doc_start=doc_start,
                                 window=cfg.probe_tokens)
        r = float(self.predictor.predict([feats])[0])
        r = min(max(r, 0.0), max(cfg.ratios), 0.999)
        return (r if math.isfinite(r) else 0.0), feats


def compress(model: torch.nn.Module, method: str | Scorer = defaults.METHOD, allocator: str = defaults.ALLOCATOR,
             ratio: float | str = 0.5, tolerance: float = defaults.TOLERANCE, **kwargs: Any) -> KvcalibCompressor:
    """A context manager compressing the next prefill of ``model`` run inside it (see the module docstring).
    ``ratio``: a compression ratio in [0, 1), or ``"auto"`` (the shipped predictor; needs ``tokenizer=``;
    ``text=`` the raw document for the text features, ``name=`` the registry model name when the model's folder
    is not kvcalib's converted one, ``predictor=`` another predictor or its path)."""
    return KvcalibCompressor(model, method, allocator, ratio, tolerance, **kwargs)


# ---------------------------------------------------------------------------------------------------- model hooks
def _input_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if isinstance(ids, torch.Tensor) else None


_CACHE_KWARGS = ("past_key_values", "cache")  # transformers 5 renames past_key_values to cache


def _take_cache(kwargs: dict) -> Any:
    """The cache the caller passed (under either name); both names are cleared: kvcalib's path keeps its own."""
    found = None
    for key in _CACHE_KWARGS:
        if kwargs.get(key) is not None:
            found = kwargs[key]
    return found


def _clear_cache(kwargs: dict) -> None:
    for key in _CACHE_KWARGS:
        kwargs.pop(key, None)


def _pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict):
    cache = _take_cache(kwargs)
    ids = _input_ids(args, kwargs)
    session = _SESSION.get()
    if isinstance(cache, RaggedKVCache) and cache.layers:  # continue from a kvcalib cache
        if ids is None:
            raise IntegrationError("a kvcalib cache needs input_ids")
        q = ids.shape[-1]
        if kwargs.get("position_ids") is None:
            pos = torch.arange(cache.next_position, cache.next_position + q, device=ids.device)
            kwargs["position_ids"] = pos.unsqueeze(0).expand(ids.shape[0], -1)
        _clear_cache(kwargs)
        kwargs.update(use_cache=False, kvcalib_state=cache, attention_mask=None)
        return args, kwargs
    if session is None or session.done or session._recorder is not None:
        return None
    if ids is None or ids.dim() != 2 or ids.shape[0] != 1:
        raise IntegrationError("compress(): the prefill must be input_ids of shape (1, N) (batch size 1)")
    if cache is not None and not isinstance(cache, RaggedKVCache) and getattr(cache, "get_seq_length", lambda: 0)():
        raise IntegrationError("compress(): the prefill must start from an empty cache")
    n = ids.shape[1]
    rec = session._begin(n, ids.device)
    _clear_cache(kwargs)
    kwargs.update(use_cache=False, kvcalib_state=rec, attention_mask=None,
                  position_ids=torch.arange(n, device=ids.device)[None])
    session._target = cache if isinstance(cache, RaggedKVCache) else None
    return args, kwargs


def _post_hook(_module: torch.nn.Module, args: tuple, kwargs: dict, output: Any):
    state = kwargs.get("kvcalib_state")
    session = _SESSION.get()
    if isinstance(state, PrefillRecorder) and session is not None and state is session._recorder:
        ids = _input_ids(args, kwargs)[0]
        logits = getattr(output, "logits", None)
        built = session._finish(ids, logits[0] if logits is not None else None)
        target, session._target = session._target, None
        if target is not None:  # fill the caller's empty cache in place
            target.layers, target.next_position = built.layers, built.next_position
            session.cache = target
        state = session.cache
    if isinstance(state, RaggedKVCache) and hasattr(output, "past_key_values"):
        output.past_key_values = state
    return output


def install(model: torch.nn.Module) -> None:
    """Install kvcalib's attention path, the capture hooks and the cache-routing hooks on ``model`` (once)."""
    from kvcalib.calib.lm.attention import install_attention
    from kvcalib.calib.lm.support import check_architecture

    if getattr(model, _MARK, False):
        return
    with _LOCK:
        if getattr(model, _MARK, False):
            return
        check_architecture(model.config, model_name(model))
        install_attention(model)
        install_capture_hooks(model)
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        model.register_forward_hook(_post_hook, with_kwargs=True)
        setattr(model, _MARK, True)
