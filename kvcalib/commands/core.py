"""Core commands: ``generate`` (compress a context and answer), ``eval passkey``, ``methods``; ``demo`` and
``budget`` register from their own modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from tqdm import tqdm

from kvcalib.calib import defaults
from kvcalib.commands import budget, demo
from kvcalib.commands.common import (
    DeviceOpt,
    DtypeOpt,
    check_names,
    console,
    emit_json,
    fail,
    friendly_errors,
    load_engine,
    read_text_file,
)

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate methods on synthetic tasks.")

MethodOpt = Annotated[str, typer.Option("--method", "-m", help="Scoring method (see `kvcalib methods`).")]
RatioOpt = Annotated[float | None, typer.Option("--ratio", "-r", help="Compression ratio in [0, 1).")]
TokensOpt = Annotated[int | None, typer.Option("--tokens", help="Absolute kept tokens per head instead.")]
AllocOpt = Annotated[str, typer.Option("--allocator", "-a", help="Budget allocator across heads/layers.")]
ModelOpt = Annotated[str, typer.Option("--model", help="Registry name or local HF model folder.")]


def _budget(ratio: float | None, tokens: int | None):
    from kvcalib.calib.budget import Budget

    if ratio is None and tokens is None:
        ratio = 0.5
    return Budget(ratio=ratio, tokens=tokens)


def _decode_policy(name: str | None, budget: int | None, recent: int | None):
    if name is None:
        return None
    from kvcalib.calib.cache.policies import get_policy

    return get_policy(name, budget=budget, recent=recent)


@friendly_errors
def generate(
    context: Annotated[Path, typer.Argument(help="Text file holding the context (UTF-8).", exists=False)],
    question: Annotated[str, typer.Argument(help="Question asked after the compressed context.")],
    method: MethodOpt = defaults.METHOD,
    ratio: RatioOpt = None,
    tokens: TokensOpt = None,
    allocator: AllocOpt = defaults.ALLOCATOR,
    model: ModelOpt = defaults.MODEL,
    dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "cpu",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 48,
    decode_policy: Annotated[str | None, typer.Option(help="Generation-time cache policy, e.g. morphkv.")] = None,
    decode_budget: Annotated[int | None, typer.Option(help="Cache size C of the decode policy.")] = None,
    decode_recent: Annotated[int | None, typer.Option(help="Recent window R of the decode policy.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
):
    """Compress CONTEXT's KV cache with METHOD at RATIO and answer QUESTION from the compressed cache."""
    from kvcalib.calib.cache.decode import ReportsDecode
    from kvcalib.commands.stages import Stages, load_staged_engine

    check_names(method, allocator, decode_policy)  # before the model loads
    text = read_text_file(context, "context file")
    if not text.strip():
        fail(f"context file {str(context)!r} is empty")
    b = _budget(ratio, tokens)
    policy = _decode_policy(decode_policy, decode_budget, decode_recent)
    with Stages(quiet=as_json) as stages:
        eng = load_staged_engine(model, stages, score_label=f"scoring with {method}", device=device, dtype=dtype)
        res = eng.run(text, question, method=method, budget=b, allocator=allocator, max_new_tokens=max_new_tokens,
                      policy=policy)
    if as_json:
        out = res.to_json()
        if isinstance(policy, ReportsDecode):
            out["decode_policy"] = policy.report()
        emit_json(out)
    else:
        console.print(f"[dim]{res.method}/{res.allocator} ratio {res.ratio:.2f} on {res.context_tokens} tokens, "
                      f"{res.cache_report['bytes_held'] / 2**20:.1f} MiB held[/]")
        typer.echo(res.answer)


@eval_app.command("passkey")
@friendly_errors
def eval_passkey(
    method: MethodOpt = defaults.METHOD,
    ratio: RatioOpt = None,
    tokens: TokensOpt = None,
    allocator: AllocOpt = defaults.ALLOCATOR,
    n: Annotated[int, typer.Option("--n", help="Number of examples.")] = 20,
    seed: Annotated[int, typer.Option(help="Task seed.")] = 0,
    context_tokens: Annotated[int, typer.Option(help="Haystack length in tokens.")] = 1500,
    model: ModelOpt = defaults.MODEL,
    dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
):
    """Single-needle passkey retrieval accuracy under query-agnostic compression."""
    from kvcalib.calib.data import synthetic as tasks
    from kvcalib.commands.stages import Stages

    check_names(method, allocator)  # before the model loads
    if n < 1:
        fail("--n must be at least 1")
    if not 64 <= context_tokens <= 8192:
        fail("--context-tokens must be within 64..8192")
    b = _budget(ratio, tokens)
    with Stages(quiet=as_json) as stages:
        with stages.stage(f"loading model {model}"):
            eng = load_engine(model, device=device, dtype=dtype)
        with stages.stage(f"{n} passkey example(s) of {context_tokens} tokens"):
            examples = tasks.passkey(eng.tokenizer, n, seed=seed, n_tokens=context_tokens)
    rows = []
    for ex in tqdm(examples, desc=f"passkey {method}", disable=as_json, file=None):
        res = eng.run(ex.context, ex.question, method=method, budget=b, allocator=allocator, max_new_tokens=24)
        rows.append({"answer": ex.answer, "output": res.answer, "correct": ex.score(res.answer),
                     "depth": ex.meta["depth"], "ratio": round(res.ratio, 4), "context_tokens": res.context_tokens})
    acc = sum(r["correct"] for r in rows) / len(rows)
    report = {"task": "passkey", "method": method, "allocator": allocator, "budget": b.__dict__, "n": n,
              "seed": seed, "accuracy": acc, "examples": rows}
    if as_json:
        emit_json(report)
    else:
        console.print(f"passkey accuracy {acc:.2%} ({sum(r['correct'] for r in rows)}/{n}) "
                      f"with {method}/{allocator}")


def _allocator_params(name: str) -> dict:
    """Keyword parameters of an allocator with their defaults (after ``scores, per_head``)."""
    import inspect

    from kvcalib.calib.budget import ALLOCATORS

    sig = inspect.signature(ALLOCATORS[name])
    return {k: p.default for k, p in list(sig.parameters.items())[2:]
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty}


@friendly_errors
def methods(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """List scoring methods, allocators, decode policies and their hyperparameters with defaults."""
    from kvcalib.calib.budget import available_allocators
    from kvcalib.calib.cache.policies import DECODE_POLICIES
    from kvcalib.calib.scorers import ALIASES, SCORERS

    rows = [{"name": name, "params": cls().params(), "aliases": sorted(a for a, m in ALIASES.items() if m == name)}
            for name, cls in sorted(SCORERS.items())]
    allocators = [{"name": a, "params": _allocator_params(a)} for a in available_allocators()]
    if as_json:
        emit_json(json.loads(json.dumps({"methods": rows, "allocators": allocators,
                                         "decode_policies": sorted(DECODE_POLICIES),
                                         "defaults": {"method": defaults.METHOD, "allocator": defaults.ALLOCATOR}},
                                        default=str)))
        return
    table = Table("method", "hyperparameters (defaults)")
    for r in rows:
        alias = f" (alias: {', '.join(r['aliases'])})" if r["aliases"] else ""
        table.add_row(r["name"] + alias, ", ".join(f"{k}={v}" for k, v in r["params"].items()))
    console.print(table)
    console.print("allocators: " + ", ".join(
        a["name"] + (f" ({', '.join(f'{k}={v}' for k, v in a['params'].items())})" if a["params"] else "")
        for a in allocators), soft_wrap=True)
    console.print("decode policies: " + ", ".join(sorted(DECODE_POLICIES)), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("methods")(methods)
    demo.register(app)
    budget.register(app)
    app.add_typer(eval_app, name="eval")
