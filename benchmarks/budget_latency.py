"""GET /budget latency under concurrent load on loopback, against /healthz as the baseline.

Starts the API (uvicorn subprocess on 127.0.0.1, one process) on a fresh database seeded with synthetic profiles
(SQLite in a temp dir by default, or ``--database-url`` e.g. a PostgreSQL database), then fires a bounded number of
requests from ``--concurrency`` asyncio httpx clients at ``/budget?document_hash=…`` (stored profiles) and at
``/healthz`` (no database, no model: the cost of the HTTP stack itself). Prints a table and a JSON record:
p50/p90/p99 latency, throughput, and the budget/healthz latency ratio.

    python benchmarks/budget_latency.py --requests 2000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed(db_url: str, n_profiles: int, n_layers: int = 30, n_heads: int = 3) -> list[str]:
    """Insert ``n_profiles`` synthetic calibrated profiles; returns their document hashes."""
    from kvcalib.calib.data.documents import content_hash
    from kvcalib.service import repository as repo
    from kvcalib.service.db import Database, upgrade
    from kvcalib.service.orm import RunStatus

    upgrade(db_url)
    db = Database(db_url)
    hashes = []
    rng = random.Random(0)
    with db.session() as s:
        model = repo.get_or_create_model(s, name="smollm2-135m", revision="benchmark")
        for i in range(n_profiles):
            text = f"benchmark document {i}: " + " ".join(rng.choice("abcdefgh") * 3 for _ in range(40))
            h = content_hash(text)
            doc = repo.get_or_create_document(s, text=text, content_hash=h, source="benchmark", token_count=200)
            run, _ = repo.get_or_create_run(s, document=doc, model=model, params={"tolerance": 0.95},
                                            params_hash=f"bench{i:06d}", method="compactor", allocator="uniform",
                                            tolerance=0.95)
            r = rng.choice([0.3, 0.5, 0.7])
            per_head = int(200 * (1 - r))
            result = SimpleNamespace(ratios=[0.3, 0.5, 0.7], fidelity=[0.99, 0.97, 0.9], kl=[0.01, 0.03, 0.1],
                                     r_star=r, ratio=r, controller=None, context_tokens=200, monotone=True,
                                     layer_budgets=[per_head * n_heads] * n_layers,
                                     head_budgets=[[per_head] * n_heads] * n_layers, features={"nll": 2.0},
                                     seconds=1.0)
            repo.save_result(s, run=run, result=result, token_budget=per_head)
            repo.set_run(s, run_id=run.id, status=RunStatus.succeeded.value, progress=1.0)
            hashes.append(h)
    db.dispose()
    return hashes


async def load(base: str, paths: list[str], concurrency: int) -> tuple[list[float], float, int]:
    import httpx

    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in paths:
        queue.put_nowait(p)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient):
        nonlocal errors
        while True:
            try:
                p = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            r = await client.get(p)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors += 1

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        await client.get("/healthz")
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, wall, errors


def summary(name: str, lat: list[float], wall: float, errors: int) -> dict:
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"endpoint": name, "requests": len(lat), "errors": errors, "p50_ms": q[49] * 1e3, "p90_ms": q[89] * 1e3,
            "p99_ms": q[98] * 1e3, "mean_ms": statistics.fmean(lat) * 1e3, "throughput_rps": len(lat) / wall}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="Requests per endpoint (bounded).")
    ap.add_argument("--concurrency", type=int, default=16, help="Concurrent in-flight requests.")
    ap.add_argument("--profiles", type=int, default=200, help="Synthetic profiles to seed.")
    ap.add_argument("--database-url", default=None, help="Default: a SQLite file in a temp dir.")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="kvcalib-bench-"))
    db_url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"
    hashes = seed(db_url, args.profiles)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCALIB_") or k == "KVCALIB_CACHE_DIR"}
    env.update({"KVCALIB_DATABASE_URL": db_url, "KVCALIB_DATA_DIR": str(tmp)})
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "kvcalib.api.app:create_app",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                             "--no-access-log"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the API did not start")
            time.sleep(0.2)
        rng = random.Random(1)
        budget_paths = [f"/budget?document_hash={rng.choice(hashes)}&model=smollm2-135m&tolerance=0.95"
                        for _ in range(args.requests)]
        asyncio.run(load(base, budget_paths[: min(100, len(budget_paths))], args.concurrency))  # warm-up
        health = summary("/healthz", *asyncio.run(load(base, ["/healthz"] * args.requests, args.concurrency)))
        budget = summary("/budget", *asyncio.run(load(base, budget_paths, args.concurrency)))
    finally:
        proc.terminate()
        proc.wait(10)
    record = {"benchmark": "budget_latency", "database": db_url.split(":", 1)[0], "concurrency": args.concurrency,
              "profiles": args.profiles, "cpus": os.cpu_count(), "results": [health, budget],
              "p50_ratio_budget_over_healthz": budget["p50_ms"] / health["p50_ms"],
              "p99_ratio_budget_over_healthz": budget["p99_ms"] / health["p99_ms"]}
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table("endpoint", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "req/s",
                  title=f"GET latency, {args.concurrency} concurrent clients, loopback, 1 uvicorn process")
        for r in (health, budget):
            t.add_row(r["endpoint"], str(r["requests"]), str(r["errors"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['throughput_rps']:.0f}")
        Console(stderr=True).print(t)
        Console(stderr=True).print(f"budget/healthz p50 ratio {record['p50_ratio_budget_over_healthz']:.2f}, "
                                   f"p99 ratio {record['p99_ratio_budget_over_healthz']:.2f}")
    except ImportError:
        pass
    print(json.dumps(record, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
