"""kvcalib side by side with NVIDIA kvpress 0.5.5 on the same model, contexts and captured tensors.

Per pair (kvcalib method [+ allocator] ↔ kvpress press) it prints three tables and writes JSON:

1. scores — Spearman correlation of the two score vectors (per layer and kv head over the positions kvcalib does
   not protect, then averaged) and the overlap of the kept sets at compression 0.5 (|A ∩ B| / |B|);
2. scoring time kvcalib ÷ kvpress, same process, same tensors (medians of ``--repeat`` runs); kvpress scores from
   the attention inputs (hidden states, RoPE, cached keys/values) recorded in one prefill, kvcalib from its capture;
3. passkey accuracy at 0.25 / 0.5 / 0.75 on the same examples, each through its own path: kvcalib capture → scores →
   allocation → ragged cache → greedy decoding; kvpress ``with press(model)`` prefill into a ``DynamicCache`` →
   greedy decoding of the question with the original position ids (its pipeline's loop).

Both sides run with the same hyperparameters (kvpress' where kvcalib's defaults differ: SnapKV w = 64, avg-pool 5;
Compactor λ = 0.3 on both sides). kvpress is a benchmark-only dependency, never a test or install one:

    pip install --no-deps kvpress==0.5.5 cachetools "fire<0.7" termcolor
    python benchmarks/vs_kvpress.py --n 3 --context-tokens 1200

(``datasets``, imported by a press not used here, is stubbed when absent.) transformers ≥ 5.3 no longer passes
``cache_position`` / ``past_key_values`` to the attention modules, which kvpress 0.5.5's hooks read: a forward
pre-hook on every attention module sets them from ``position_ids`` and ``cache``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also under -m
from common import write_report  # noqa: E402

INSTALL = 'pip install --no-deps kvpress==0.5.5 cachetools "fire<0.7" termcolor'
RATIOS = (0.25, 0.5, 0.75)


def import_kvpress():
    """Import kvpress before kvcalib registers its attention function (kvpress wraps every registered one)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")
        stub.load_dataset = None  # only DuoAttentionPress uses it
        sys.modules["datasets"] = stub
    try:
        import kvpress
    except ImportError as exc:
        sys.exit(f"kvpress is not importable ({exc}): {INSTALL}")
    return kvpress


@dataclass
class Pair:
    name: str
    method: str
    params: dict = field(default_factory=dict)
    allocator: str = "uniform"
    press: str = ""  # kvpress class name
    press_params: dict = field(default_factory=dict)
    adakv: bool = False  # wrap the press in AdaKVPress

    def make_press(self, kp, ratio: float):
        press = getattr(kp, self.press)(compression_ratio=ratio, **self.press_params)
        return kp.AdaKVPress(press) if self.adakv else press


PAIRS = [
    Pair("compactor", "compactor", {"blend": 0.3}, press="CompactorPress", press_params={"blending": 0.3}),
    Pair("snapkv", "snapkv", {"window": 64, "kernel": 5, "pooling": "avg"}, press="SnapKVPress"),
    Pair("curdkv", "curdkv", press="CURPress"),
    Pair("keydiff", "keydiff", press="KeyDiffPress"),
    Pair("tova", "tova", press="TOVAPress"),
    Pair("keynorm", "keynorm", press="KnormPress"),
    Pair("streaming", "streaming", press="StreamingLLMPress"),
    Pair("adakv(snapkv)", "snapkv", {"window": 64, "kernel": 5, "pooling": "avg"}, "adakv", "SnapKVPress",
         adakv=True),
    Pair("adakv(compactor)", "compactor", {"blend": 0.3}, "adakv", "CompactorPress", {"blending": 0.3}, adakv=True),
]


# ---------------------------------------------------------------------------------------------------- kvpress path
def compat_hooks(model) -> list:
    """Forward pre-hooks giving kvpress 0.5.5's hooks the ``cache_position`` and ``past_key_values`` keywords."""

    def pre(_module, args, kwargs):
        if "cache_position" not in kwargs and kwargs.get("position_ids") is not None:
            kwargs["cache_position"] = kwargs["position_ids"][0]
        if "past_key_values" not in kwargs and "cache" in kwargs:
            kwargs["past_key_values"] = kwargs.pop("cache")  # the forward renames it back; the hooks read this one
        return args, kwargs

    return [layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True) for layer in model.model.layers]


class KvpressRunner:
    """Runs the shared model with SDPA attention and kvpress presses; restores kvcalib's attention afterwards."""

    def __init__(self, model, eos: set[int]):
        self.model, self.eos = model, eos
        self.saved = model.config._attn_implementation

    def __enter__(self):
        self.model.set_attn_implementation("sdpa")
        self.hooks = compat_hooks(self.model)
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        for layer in self.model.model.layers:  # AdaKVPress leaves masked indices on the modules
            layer.self_attn.masked_key_indices = None
        self.model.set_attn_implementation(self.saved)

    @torch.no_grad()
    def record(self, ctx_ids: torch.Tensor) -> list[dict]:
        """One uncompressed prefill; per layer the attention inputs kvpress' ``score`` takes."""
        from transformers import DynamicCache

        rec: list[dict] = []
        hooks = [layer.self_attn.register_forward_hook(
            lambda m, _a, kw, _o: rec.append({"module": m, "hidden": kw["hidden_states"],
                                              "kwargs": {"position_embeddings": kw["position_embeddings"]}}),
            with_kwargs=True) for layer in self.model.model.layers]
        cache = DynamicCache()
        try:
            self.model.model(input_ids=ctx_ids[None], past_key_values=cache, use_cache=True)
        finally:
            for h in hooks:
                h.remove()
        for i, r in enumerate(rec):
            r["keys"], r["values"] = cache.layers[i].keys, cache.layers[i].values  # (1, Hkv, N, d)
        return rec

    @torch.no_grad()
    def answer(self, press, ctx_ids: torch.Tensor, q_ids: torch.Tensor, max_new: int) -> list[int]:
        """kvpress' pipeline: prefill the context under the press, then greedy decoding of question + answer."""
        from transformers import DynamicCache

        cache = DynamicCache()
        with press(self.model):
            self.model.model(input_ids=ctx_ids[None], past_key_values=cache, use_cache=True)
        n = ctx_ids.numel()
        pos = torch.arange(n, n + q_ids.numel())[None]
        out = self.model(input_ids=q_ids[None], past_key_values=cache, position_ids=pos, use_cache=True)
        ids = [int(out.logits[0, -1].argmax())]
        nxt = pos[:, -1:] + 1
        while len(ids) < max_new and ids[-1] not in self.eos:
            out = self.model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, position_ids=nxt,
                             use_cache=True)
            ids.append(int(out.logits[0, -1].argmax()))
            nxt = nxt + 1
        return [t for t in ids if t not in self.eos]


@torch.no_grad()
def kvpress_scores(pair: Pair, kp, rec: list[dict], ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (L, Hkv, N), kept mask (L, Hkv, N)) of the press on the recorded inputs, through its own code."""
    from kvpress.utils import compute_n_kept

    press = pair.make_press(kp, ratio)
    scores, kept = [], []
    for r in rec:
        inner = press.press if pair.adakv else press
        s = inner.score(r["module"], r["hidden"], r["keys"], r["values"], None, r["kwargs"])[0].float()
        if pair.adakv:
            press.compress(r["module"], r["hidden"], r["keys"], r["values"], None, r["kwargs"])
            _, heads, pos = r["module"].masked_key_indices
            k = torch.ones_like(s, dtype=torch.bool)
            k[heads, pos] = False
            r["module"].masked_key_indices = None
        else:
            k = torch.zeros_like(s, dtype=torch.bool)
            k.scatter_(-1, s.topk(compute_n_kept(s.shape[-1], ratio), dim=-1).indices, True)
        scores.append(s)
        kept.append(k)
    return torch.stack(scores), torch.stack(kept)


@torch.no_grad()
def time_kvpress(pair: Pair, kp, rec: list[dict], ratio: float) -> float:
    t0 = time.perf_counter()
    press = pair.make_press(kp, ratio)
    for r in rec:
        if pair.adakv:
            press.compress(r["module"], r["hidden"], r["keys"], r["values"], None, r["kwargs"])
            r["module"].masked_key_indices = None
        else:
            press.score(r["module"], r["hidden"], r["keys"], r["values"], None, r["kwargs"])
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- comparisons
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over (layer, head) of Spearman's ρ between a and b (L, H, N) where a is finite."""
    from scipy.stats import spearmanr

    rhos = []
    for x, y in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])):
        fin = torch.isfinite(x)
        if int(fin.sum()) > 2 and float(y[fin].std()) > 0 and float(x[fin].std()) > 0:
            rhos.append(float(spearmanr(x[fin].numpy(), y[fin].numpy()).statistic))
    return statistics.fmean(rhos) if rhos else float("nan")


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3, help="passkey examples (the first one also feeds the score tables)")
    ap.add_argument("--context-tokens", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats (median)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--pairs", default="all", help="comma list of pair names or 'all'")
    ap.add_argument("--skip-passkey", action="store_true", help="tables 1 and 2 only (e.g. timing reruns)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="results/vs_kvpress.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    kp = import_kvpress()  # before kvcalib's attention is registered
    from transformers.utils import logging as hf_logging

    from kvcalib.calib.budget import Budget, allocate
    from kvcalib.calib.cache.decode import greedy_decode_batch
    from kvcalib.calib.cache.ragged import RaggedKVCache
    from kvcalib.calib.data import synthetic as tasks
    from kvcalib.calib.pipeline import Engine
    from kvcalib.calib.scorers import get_scorer

    hf_logging.set_verbosity_error()
    pairs = PAIRS if args.pairs == "all" else [p for p in PAIRS if p.name in args.pairs.split(",")]
    eng = Engine.load(args.model)
    model = eng.lm.model
    examples = tasks.passkey(eng.tokenizer, args.n, seed=args.seed, n_tokens=args.context_tokens)
    t_start = time.perf_counter()
    score_rows: dict[str, dict] = {}
    acc = {p.name: {"kvcalib": {str(r): 0 for r in RATIOS}, "kvpress": {str(r): 0 for r in RATIOS}} for p in pairs}
    outputs = []
    for i, ex in enumerate(examples):
        prompt = eng.prompt(ex.context, ex.question)
        ctx, q = prompt.context_ids, prompt.question_ids
        cap = eng.capture(ctx)
        scorers = {p.name: get_scorer(p.method, **p.params) for p in pairs}
        scores = {p.name: scorers[p.name].score(cap) for p in pairs}
        if i == 0:  # tables 1 and 2 on the first example's tensors
            with KvpressRunner(model, eng.eos_ids) as runner:
                rec = runner.record(ctx)
                drift = max(float((r["keys"][0] - cap.keys[l]).abs().max()) for l, r in enumerate(rec))
                for p in pairs:
                    torch.manual_seed(args.seed)  # kvpress' leverage sketch is drawn unseeded
                    kps, kpk = kvpress_scores(p, kp, rec, 0.5)
                    ours = allocate(scores[p.name], Budget(ratio=0.5), p.allocator)
                    def ours_once(p=p, scorer=scorers[p.name], cap=cap):
                        s = scorer.score(cap)
                        return allocate(s, Budget(ratio=0.5), p.allocator) if p.adakv else s

                    t_ours = median_time(ours_once, args.repeat)
                    t_kp = median_time(lambda p=p, rec=rec: time_kvpress(p, kp, rec, 0.5), args.repeat)
                    score_rows[p.name] = {
                        "spearman": round(spearman(scores[p.name], kps), 4),
                        "kept_overlap_0.5": round(float((ours & kpk).sum()) / float(kpk.sum()), 4),
                        "kvcalib_s": round(t_ours, 4), "kvpress_s": round(t_kp, 4),
                        "time_ratio": round(t_ours / t_kp, 3) if t_kp > 0 else None}
                    print(f"  scores {p.name}: {score_rows[p.name]}", file=sys.stderr, flush=True)
        if args.skip_passkey:
            break
        for r in RATIOS:  # kvcalib: every pair's cache at this ratio decodes as one batch row
            keeps = torch.stack([allocate(scores[p.name], Budget(ratio=r), p.allocator) for p in pairs])
            outs = greedy_decode_batch(model, RaggedKVCache.from_mask(cap.keys, cap.values, keeps), q,
                                       args.max_new_tokens, eng.eos_ids)
            for p, ids in zip(pairs, outs):
                text = eng.tokenizer.decode(ids, skip_special_tokens=True).strip()
                ok = ex.score(text)
                acc[p.name]["kvcalib"][str(r)] += ok
                outputs.append({"example": i, "pair": p.name, "side": "kvcalib", "ratio": r, "output": text,
                                "correct": ok})
        with KvpressRunner(model, eng.eos_ids) as runner:
            for p in pairs:
                for r in RATIOS:
                    torch.manual_seed(args.seed)
                    ids = runner.answer(p.make_press(kp, r), ctx, q, args.max_new_tokens)
                    text = eng.tokenizer.decode(ids, skip_special_tokens=True).strip()
                    ok = ex.score(text)
                    acc[p.name]["kvpress"][str(r)] += ok
                    outputs.append({"example": i, "pair": p.name, "side": "kvpress", "ratio": r, "output": text,
                                    "correct": ok})
                print(f"  kvpress passkey {p.name}: {[o['correct'] for o in outputs[-len(RATIOS):]]}", file=sys.stderr,
                      flush=True)
        print(f"[{i + 1}/{len(examples)}] {time.perf_counter() - t_start:.0f}s", file=sys.stderr, flush=True)

    n = len(examples)
    report = {
        "task": "kvcalib vs kvpress", "kvpress_version": getattr(kp, "__version__", "0.5.5"), "model": args.model,
        "n": n, "context_tokens": args.context_tokens, "seed": args.seed, "threads": args.threads,
        "ratios": list(RATIOS), "key_drift_max_abs": drift,
        "pairs": {p.name: {"kvcalib": {"method": p.method, "params": p.params, "allocator": p.allocator},
                           "kvpress": {"press": p.press, "params": p.press_params, "adakv": p.adakv}}
                  for p in pairs},
        "scores": score_rows,
        "passkey": None if args.skip_passkey else {
            name: {side: {r: c / n for r, c in v.items()} for side, v in sides.items()} for name, sides in acc.items()},
        "seconds": round(time.perf_counter() - t_start, 1), "outputs": outputs,
    }
    print_tables(report)
    write_report(report, args.out, stream=sys.stderr)
    return report


def print_tables(report: dict) -> None:
    print(f"kvcalib vs kvpress {report['kvpress_version']}, {report['model']}, {report['context_tokens']} tokens, "
          f"n={report['n']} (max |Δkeys| between the two prefills {report['key_drift_max_abs']:.1e})")
    print(f"\n1. scores at compression 0.5\n{'pair':<18}{'spearman':>10}{'kept overlap':>14}")
    for name, row in report["scores"].items():
        print(f"{name:<18}{row['spearman']:>10.3f}{row['kept_overlap_0.5']:>14.3f}")
    print(f"\n2. scoring time, same tensors\n{'pair':<18}{'kvcalib s':>11}{'kvpress s':>11}{'ratio':>8}")
    for name, row in report["scores"].items():
        print(f"{name:<18}{row['kvcalib_s']:>11.4f}{row['kvpress_s']:>11.4f}{row['time_ratio']:>8.2f}")
    if report["passkey"] is None:
        return
    ratios = [str(r) for r in report["ratios"]]
    head = f"{'pair':<18}{'side':<9}" + "".join(f"{'r=' + r:>8}" for r in ratios)
    print(f"\n3. passkey accuracy, n={report['n']}\n{head}\n" + "-" * len(head))
    for name, sides in report["passkey"].items():
        for side, row in sides.items():
            print(f"{name:<18}{side:<9}" + "".join(f"{row[r]:>8.2f}" for r in ratios))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
