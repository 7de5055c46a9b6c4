"""kvpress interop (issue 17, item 3): ``KvcalibPress`` scores with any kvcalib method inside kvpress's pipeline, and
``budget_to_press`` turns a stored kvcalib budget into kvpress presses where kvpress has them.

kvpress is an optional extra (``pip install kvcalib[kvpress]``): this module imports without it; ``KvcalibPress`` is
built on first use of ``kvcalib_press(...)`` and raises a clear error when kvpress is missing. The scoring itself is
``layer_scores`` — kvpress-free, so it is tested without kvpress — which rebuilds one layer's post-RoPE queries and
pre-RoPE keys from the layer's input hidden states (as kvpress's own query-based presses do) and runs the kvcalib
scorer on that one-layer ``Capture``.

>>> from kvpress import KVPressTextGenerationPipeline  # registers "kv-press-text-generation"
>>> press = kvcalib_press("compactor", compression_ratio=0.5, adaptive=True)   # AdaKVPress(KvcalibPress(...))
>>> pipe(context, question=question, press=press)["answer"]
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from kvcalib.calib.capture import Capture
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.scorers import Scorer, get_scorer

# kvcalib method -> the kvpress press implementing the same scoring (class name in the ``kvpress`` package)
KVPRESS_EQUIVALENTS: dict[str, str] = {"snapkv": "SnapKVPress", "tova": "TOVAPress", "keydiff": "KeyDiffPress",
                                       "streaming": "StreamingLLMPress", "keynorm": "KnormPress",
                                       "random": "RandomPress"}


class KvpressMissingError(KvcalibError):
    pass


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def layer_inputs(module: torch.nn.Module, hidden_states: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries (B, Hq, N, d) post-RoPE, keys_pre (B, Hkv, N, d)) of one Llama/Qwen/Mistral attention layer from its
    input ``hidden_states`` (B, N, hidden) and the rotary ``position_embeddings`` (cos, sin) of the forward."""
    b, n, _ = hidden_states.shape
    d = module.head_dim
    q = module.q_proj(hidden_states).view(b, n, -1, d)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    k = module.k_proj(hidden_states).view(b, n, -1, d)
    if hasattr(module, "k_norm"):
        k = module.k_norm(k)
    k_pre = k.transpose(1, 2)
    q = q.transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # (B, 1, N, d)
    return q * cos + _rotate_half(q) * sin, k_pre


def layer_scores(scorer: Scorer, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 keys_pre: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, N) kvcalib scores of one layer: queries (B, Hq, N, d) post-RoPE, keys / values (B, Hkv, N, d) as
    cached, keys_pre (B, Hkv, N, d). Equals row l of the scorer's scores of the full capture for methods whose
    layer-l scores depend on layer l alone (``Scorer.layerwise`` and the key/value-only methods)."""
    out = []
    for i in range(keys.shape[0]):
        cap = Capture(input_ids=torch.zeros(keys.shape[2], dtype=torch.long), keys=keys[i, None].float(),
                      values=values[i, None].float(), keys_pre=keys_pre[i, None].float(),
                      queries=queries[i, None].float(), last_logits=keys.new_zeros(0))
        out.append(scorer.score(cap, None)[0])
    return torch.stack(out).to(keys.dtype)


@functools.lru_cache(maxsize=1)
def _press_class() -> type:
    try:
        from kvpress.presses.scorer_press import ScorerPress
    except ImportError as e:
        raise KvpressMissingError("kvpress is not installed: pip install 'kvcalib[kvpress]'") from e

    @dataclass
    class KvcalibPress(ScorerPress):
        """A kvpress ``ScorerPress`` whose scores are a kvcalib method's (kvcalib.calib.scorers)."""

        method: str = "compactor"
        method_params: dict | None = None

        def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
            scorer = get_scorer(self.method, **(self.method_params or {}))
            q, k_pre = layer_inputs(module, hidden_states, kwargs["position_embeddings"])
            s = layer_scores(scorer, q, keys, values, k_pre)
            return torch.nan_to_num(s, posinf=torch.finfo(s.dtype).max)  # protected entries rank first

    return KvcalibPress


def kvcalib_press(method: str = "compactor", compression_ratio: float = 0.5, adaptive: bool = True,
                  alpha: float = 0.2, **method_params: Any) -> Any:
    """A ``KvcalibPress`` for kvpress's pipeline; wrapped in ``AdaKVPress`` when ``adaptive`` (kvcalib's adakv).
    KVzip is refused: its scores need a second forward of the model, which a per-layer press hook cannot run; use
    kvpress's own ``KVzipPress`` (``budget_to_press`` of a kvzip budget returns it)."""
    if method == "kvzip":
        raise KvcalibError("kvzip cannot run inside a per-layer press (it needs a reconstruction forward): use "
                           "kvpress.KVzipPress, or budget_to_press(budget) of a kvzip budget")
    press = _press_class()(compression_ratio=compression_ratio, method=method, method_params=method_params or None)
    if adaptive:
        from kvpress import AdaKVPress

        press = AdaKVPress(press, alpha_safeguard=alpha)
    return press


def budget_to_press(budget: Any) -> Any:
    """kvpress presses of a stored kvcalib budget (``GET /budget``'s JSON: ratio, method, allocator, layer_budgets,
    context_tokens): ``KVzipPress`` for kvzip (``layerwise=False`` for the ``global`` allocator); the method's kvpress
    equivalent when one exists (else ``KvcalibPress``) at the budget's ratio;
    ``adakv`` → ``AdaKVPress``; layer budgets that differ (``lava``) → ``PerLayerCompressionPress`` with each layer's
    ratio 1 − B_l / (Hkv·N) (``per_head`` list: one ratio per layer)."""
    try:
        import kvpress
    except ImportError as e:
        raise KvpressMissingError("kvpress is not installed: pip install 'kvcalib[kvpress]'") from e
    budget = _as_dict(budget)
    method, allocator = budget.get("method", "compactor"), budget.get("allocator", "adakv")
    ratio = float(budget["ratio"])
    if method == "kvzip":  # KVzip's own press: layerwise=False is the global ranking, True a per-layer budget
        return kvpress.KVzipPress(compression_ratio=ratio, layerwise=allocator != "global")
    name = KVPRESS_EQUIVALENTS.get(method)
    cls = getattr(kvpress, name, None) if name else None
    press = cls(compression_ratio=ratio) if cls else _press_class()(compression_ratio=ratio, method=method)
    layer_ratios = layer_compression_ratios(budget)
    if allocator == "adakv":
        return kvpress.AdaKVPress(press)
    if layer_ratios and len(set(layer_ratios)) > 1:
        return kvpress.PerLayerCompressionPress(press, compression_ratios=layer_ratios)
    return press


def _as_dict(budget: Any) -> dict:
    """A budget as a dict: a dict, or a dataclass such as the client's ``BudgetInfo``."""
    return budget if isinstance(budget, dict) else dataclasses.asdict(budget)


def layer_compression_ratios(budget: Any) -> list[float]:
    """Per-layer compression ratios 1 − B_l / (Hkv·N) of a stored budget (empty without layer budgets)."""
    budget = _as_dict(budget)
    layers, heads = budget.get("layer_budgets") or [], budget.get("head_budgets") or []
    n = int(budget.get("context_tokens") or 0)
    if not layers or not heads or not n:
        return []
    hkv = len(heads[0])
    return [round(1.0 - b / (hkv * n), 6) for b in layers]
