"""``kvcalib demo``: the main job on the embedded defaults, with every stage shown on stderr."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvcalib.calib import defaults
from kvcalib.commands.common import DeviceOpt, DtypeOpt, check_names, console, emit_json, fail, friendly_errors

PASSCODE = "62817"


def kept_summary(cache_report: dict, context_tokens: int) -> tuple[float, float]:
    """(mean kept positions per (layer, kv head), kept fraction of the context) of a cache report."""
    per_head = [k for layer in cache_report["kept_per_head"] for k in layer]  # L·Hkv counts
    mean = sum(per_head) / len(per_head)
    return mean, mean / context_tokens


def _ratios(text: str) -> list[float]:
    try:
        grid = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        grid = []
    if not grid or any(not 0.0 <= r < 1.0 for r in grid):
        fail(f"--ratios must be comma-separated numbers in [0, 1), got {text!r}")
    return grid


@friendly_errors
def demo(
    method: Annotated[str, typer.Option("--method", "-m", help="Scoring method (see `kvcalib methods`).")]
    = defaults.METHOD,
    model: Annotated[str, typer.Option("--model", help="Registry name or local HF model folder.")] = defaults.MODEL,
    serve: Annotated[bool, typer.Option(help="Also calibrate the essay through `kvcalib serve` (embedded).")] = True,
    out_dir: Annotated[Path, typer.Option(help="Where the demo writes its curve plot.")] = Path("kvcalib-demo"),
    ratios: Annotated[str, typer.Option(help="Comma-separated compression ratios in [0, 1) to answer at.")]
    = "0,0.5,0.75,0.9",
    dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
):
    """The main job on the embedded defaults: compress a bundled essay (with a hidden passcode) at several ratios
    and answer from each compressed cache; then calibrate the essay through the embedded service."""
    from kvcalib.calib.budget import Budget
    from kvcalib.calib.data.documents import PACKAGE_DATA
    from kvcalib.calib.data.synthetic import insert_at_depth
    from kvcalib.calib.lm.support import parse_dtype
    from kvcalib.commands.stages import Stages, load_staged_engine

    check_names(method)  # before the model loads
    parse_dtype(dtype)
    grid = _ratios(ratios)
    essay = (PACKAGE_DATA / "hubs.txt").read_text(encoding="utf-8")
    context = insert_at_depth(essay, f"The secret passcode for the blue door is {PASSCODE}.", 0.4)
    question = "What is the secret passcode for the blue door? Answer with the number only."
    rows = []
    with Stages(quiet=as_json) as stages:
        eng = load_staged_engine(model, stages, score_label=f"scoring with {method}", device=device, dtype=dtype)
        for ratio in grid:
            stages.prefix = f"ratio {ratio:.2f} · "
            res = eng.run(context, question, method=method, budget=Budget(ratio=ratio), max_new_tokens=24)
            mean, frac = kept_summary(res.cache_report, res.context_tokens)
            rows.append({"ratio": ratio, "answer": res.answer, "correct": PASSCODE in res.answer,
                         "kept_per_head": round(mean, 2), "kept_fraction": round(frac, 4),
                         "mib_held": round(res.cache_report["bytes_held"] / 2**20, 2),
                         "seconds": round(sum(res.timings.values()), 2)})
    report = {"method": method, "dtype": dtype, "device": device, "context_tokens": res.context_tokens, "rows": rows}
    if not as_json:
        table = Table("ratio", "answer", "correct", "kept per head (mean)", "kept fraction", "MiB held", "seconds",
                      title=f"{method} on a bundled essay ({res.context_tokens} tokens), expected {PASSCODE}")
        for r in rows:
            table.add_row(f"{r['ratio']:.2f}", r["answer"][:48], "yes" if r["correct"] else "no",
                          f"{r['kept_per_head']:.0f} of {res.context_tokens}", f"{r['kept_fraction']:.1%}",
                          f"{r['mib_held']:.2f}", f"{r['seconds']:.2f}")
        Console().print(table)
    if serve:
        report["service"] = _demo_service(essay, method, model, out_dir, quiet=as_json, dtype=dtype, device=device)
    if as_json:
        emit_json(report)


def _start_server(stages, device: str = "cpu") -> tuple:
    """`kvcalib serve` with nothing configured (SQLite, in-process jobs; models on ``device``) on a free port:
    (process, base URL)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stages.begin(f"starting kvcalib serve on 127.0.0.1:{port} (SQLite, in-process jobs)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCALIB_") or k == "KVCALIB_CACHE_DIR"}
    env["KVCALIB_WORKER_DEVICE"] = device
    server = subprocess.Popen([sys.executable, "-m", "kvcalib.cli", "serve", "--port", str(port),
                               "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return server, f"http://127.0.0.1:{port}"


def _wait_healthy(client, server, timeout: float = 120.0) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            fail(f"kvcalib serve exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            fail(f"kvcalib serve did not start within {timeout:.0f} s")
        time.sleep(0.3)


def _demo_service(text: str, method: str, model: str, out_dir: Path, quiet: bool, dtype: str = "fp32",
                  device: str = "cpu") -> dict:
    """Start `kvcalib serve` with nothing configured (SQLite, in-process jobs), calibrate ``text`` through it (in
    ``dtype``, on ``device``)."""
    import time

    import httpx
    from rich.progress import Progress

    from kvcalib.commands.stages import Stages

    server = client = None
    try:
        with Stages(quiet=quiet) as stages:
            server, base = _start_server(stages, device)
            client = httpx.Client(base_url=base, timeout=30)
            _wait_healthy(client, server)
            stages.begin("POST /calibrate (mode full)")
            r = client.post("/calibrate", json={"text": text, "mode": "full", "model": model, "method": method,
                                                "dtype": dtype})
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
        with Stages(quiet=quiet) as stages:
            stages.begin("GET profile, /budget and the curve plot")
            profile = client.get(job["profile_url"].replace(base, "")).json()
            budget = client.get("/budget", params={"document_hash": job["document_hash"], "model": model,
                                                   "method": method, "tolerance": job["tolerance"],
                                                   "dtype": dtype}).json()
            out_dir.mkdir(parents=True, exist_ok=True)
            png = out_dir / "curve.png"
            png.write_bytes(client.get(profile["curve_png_url"].replace(base, "")).content)
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    summary = {"base_url": base, "job": job["id"], "r_star": profile.get("r_star"), "ratio": profile.get("ratio"),
               "controller": profile.get("predictor_version"),
               "curve": profile.get("curve"), "budget": {k: budget.get(k) for k in ("source", "ratio", "token_budget",
                                                                                     "tolerance", "dtype",
                                                                                     "ids_hash")},
               "curve_png": str(png)}
    if not quiet:
        console.print(f"calibrated through kvcalib serve at {base} (SQLite, in-process jobs), job {job['id']}")
        table = Table("ratio", "fidelity", title=f"fidelity curve, τ = {job['tolerance']}")
        for pt in profile.get("curve") or []:
            table.add_row(f"{pt['ratio']:.2f}", f"{pt['fidelity']:.3f}")
        Console().print(table)
        ctrl = profile.get("predictor_version")
        console.print(f"largest safe ratio r* = {profile.get('r_star'):.3f}; served ratio {profile.get('ratio'):.3f} "
                      + (f"(risk controller {ctrl}: expected answer loss ≤ ε); " if ctrl else "(= r*); ")
                      + "GET /budget → ratio "
                      f"{budget.get('ratio'):.3f}, {budget.get('token_budget')} tokens per head "
                      f"(source: {budget.get('source')}); curve plot: {png}")
    return summary


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
