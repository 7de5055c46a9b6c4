"""Core commands: ``generate`` (compress a context and answer), ``eval passkey``, ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from kvcalib.calib import defaults
from kvcalib.commands.common import console, emit_json, fail, friendly_errors, load_engine

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate methods on synthetic tasks.")

MethodOpt = Annotated[str, typer.Option("--method", "-m", help="Scoring method (see `kvcalib methods`).")]
RatioOpt = Annotated[Optional[float], typer.Option("--ratio", "-r", help="Compression ratio in [0, 1).")]
TokensOpt = Annotated[Optional[int], typer.Option("--tokens", help="Absolute kept tokens per head instead.")]
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
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 48,
    decode_policy: Annotated[Optional[str], typer.Option(help="Generation-time cache policy, e.g. morphkv.")] = None,
    decode_budget: Annotated[Optional[int], typer.Option(help="Cache size C of the decode policy.")] = None,
    decode_recent: Annotated[Optional[int], typer.Option(help="Recent window R of the decode policy.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
):
    """Compress CONTEXT's KV cache with METHOD at RATIO and answer QUESTION from the compressed cache."""
    from kvcalib.calib.cache.decode import ReportsDecode

    if not context.is_file():
        fail(f"context file {str(context)!r} does not exist")
    text = context.read_bytes().decode("utf-8")
    if not text.strip():
        fail("context file is empty")
    b = _budget(ratio, tokens)
    policy = _decode_policy(decode_policy, decode_budget, decode_recent)
    eng = load_engine(model)
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
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
):
    """Single-needle passkey retrieval accuracy under query-agnostic compression."""
    from kvcalib.calib.data import synthetic as tasks

    if n < 1:
        fail("--n must be at least 1")
    if not 64 <= context_tokens <= 8192:
        fail("--context-tokens must be within 64..8192")
    b = _budget(ratio, tokens)
    eng = load_engine(model)
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


@friendly_errors
def demo(
    method: MethodOpt = defaults.METHOD,
    model: ModelOpt = defaults.MODEL,
    serve: Annotated[bool, typer.Option(help="Also calibrate the essay through `kvcalib serve` (embedded).")] = True,
    out_dir: Annotated[Path, typer.Option(help="Where the demo writes its curve plot.")] = Path("kvcalib-demo"),
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
):
    """The main job on the embedded defaults: compress a bundled essay (with a hidden passcode) at several ratios
    and answer from each compressed cache; then calibrate the essay through the embedded service."""
    from kvcalib.calib.budget import Budget
    from kvcalib.calib.data.documents import PACKAGE_DATA
    from kvcalib.calib.data.synthetic import insert_at_depth

    essay = (PACKAGE_DATA / "hubs.txt").read_text(encoding="utf-8")
    context = insert_at_depth(essay, "The secret passcode for the blue door is 62817.", 0.4)
    question = "What is the secret passcode for the blue door? Answer with the number only."
    eng = load_engine(model)
    rows = []
    for ratio in (0.0, 0.5, 0.75, 0.9):
        res = eng.run(context, question, method=method, budget=Budget(ratio=ratio), max_new_tokens=24)
        rows.append({"ratio": ratio, "answer": res.answer, "correct": "62817" in res.answer,
                     "kept_tokens": sum(res.cache_report["kept_per_layer"]),
                     "mib_held": round(res.cache_report["bytes_held"] / 2**20, 2),
                     "seconds": round(sum(res.timings.values()), 2)})
    report = {"method": method, "context_tokens": res.context_tokens, "rows": rows}
    if not as_json:
        table = Table("ratio", "answer", "correct", "kept tokens", "MiB held", "seconds",
                      title=f"{method} on a bundled essay ({res.context_tokens} tokens), expected 62817")
        for r in rows:
            table.add_row(f"{r['ratio']:.2f}", r["answer"][:48], "yes" if r["correct"] else "no",
                          str(r["kept_tokens"]), f"{r['mib_held']:.2f}", f"{r['seconds']:.2f}")
        Console().print(table)
    if serve:
        report["service"] = _demo_service(essay, method, model, out_dir, quiet=as_json)
    if as_json:
        emit_json(report)


def _demo_service(text: str, method: str, model: str, out_dir: Path, quiet: bool) -> dict:
    """Start `kvcalib serve` with nothing configured (SQLite, in-process jobs), calibrate ``text`` through it."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx
    from rich.progress import Progress

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCALIB_") or k == "KVCALIB_CACHE_DIR"}
    server = subprocess.Popen([sys.executable, "-m", "kvcalib.cli", "serve", "--port", str(port),
                               "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    fail(f"kvcalib serve exited: {server.stderr.read().decode()[-2000:]}")
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    fail("kvcalib serve did not start within 120 s")
                time.sleep(0.3)
            r = client.post("/calibrate", json={"text": text, "mode": "full", "model": model, "method": method})
            if r.status_code not in (200, 202):
                fail(f"POST /calibrate answered {r.status_code}: {r.text}")
            job = r.json()
            with Progress(transient=True, disable=quiet, console=console) as bar:
                task = bar.add_task("calibrating through the service", total=1.0)
                while job["status"] not in ("succeeded", "failed"):
                    time.sleep(0.5)
                    job = client.get(job["url"].replace(base, "")).json()
                    bar.update(task, completed=job["progress"], description=job.get("message") or "calibrating")
            if job["status"] != "succeeded":
                fail(f"calibration job failed: {job.get('error')}")
            profile = client.get(job["profile_url"].replace(base, "")).json()
            budget = client.get("/budget", params={"document_hash": job["document_hash"], "model": model,
                                                   "method": method, "tolerance": job["tolerance"]}).json()
            out_dir.mkdir(parents=True, exist_ok=True)
            png = out_dir / "curve.png"
            png.write_bytes(client.get(profile["curve_png_url"].replace(base, "")).content)
    finally:
        server.terminate()
        server.wait(timeout=30)
    summary = {"base_url": base, "job": job["id"], "r_star": profile.get("r_star"),
               "curve": profile.get("curve"), "budget": {k: budget.get(k) for k in ("source", "ratio", "token_budget",
                                                                                     "tolerance")},
               "curve_png": str(png)}
    if not quiet:
        console.print(f"calibrated through kvcalib serve at {base} (SQLite, in-process jobs), job {job['id']}")
        table = Table("ratio", "fidelity", title=f"fidelity curve, τ = {job['tolerance']}")
        for pt in profile.get("curve") or []:
            table.add_row(f"{pt['ratio']:.2f}", f"{pt['fidelity']:.3f}")
        Console().print(table)
        console.print(f"largest safe ratio r* = {profile.get('r_star'):.3f}; GET /budget → ratio "
                      f"{budget.get('ratio'):.3f}, {budget.get('token_budget')} tokens per head "
                      f"(source: {budget.get('source')}); curve plot: {png}")
    return summary


@friendly_errors
def methods():
    """List scoring methods, allocators and their hyperparameters with defaults."""
    from kvcalib.calib.budget import available_allocators
    from kvcalib.calib.scorers import SCORERS

    table = Table("method", "hyperparameters (defaults)")
    for name, cls in sorted(SCORERS.items()):
        table.add_row(name, ", ".join(f"{k}={v}" for k, v in cls().params().items()))
    console.print(table)
    console.print("allocators: " + ", ".join(available_allocators()))


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("methods")(methods)
    app.command("demo")(demo)
    app.add_typer(eval_app, name="eval")
