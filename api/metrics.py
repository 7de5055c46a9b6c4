"""Prometheus metrics: request counts and latency per route template, jobs by status (read at scrape time)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("kvcalib_http_requests_total", "HTTP requests.", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("kvcalib_http_request_duration_seconds", "HTTP request latency.",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.jobs = Gauge("kvcalib_jobs", "Calibration jobs by status.", ["status"], registry=self.registry)

    def render(self, job_counts: dict[str, int] | None) -> bytes:
        if job_counts is not None:
            for status, n in job_counts.items():
                self.jobs.labels(status=status).set(n)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware overhead on the hot /budget path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            self.metrics.requests.labels(method, template, str(status_holder["status"])).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - t0)


class BodyLimitMiddleware:
    """Answer 413 before reading a body whose declared length is over the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                if name == b"content-length":
                    try:
                        n = int(value)
                    except ValueError:
                        n = 0
                    if n > self.max_bytes:
                        from starlette.responses import JSONResponse

                        resp = JSONResponse({"detail": f"request body of {n} bytes is over the limit of "
                                                       f"{self.max_bytes} bytes"}, status_code=413)
                        await resp(scope, receive, send)
                        return
        await self.app(scope, receive, send)
