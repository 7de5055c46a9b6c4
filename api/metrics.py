"""Prometheus metrics (``prometheus-client``): HTTP traffic, the process, and the domain.

* HTTP — ``kvcalib_http_requests_total{method,route,status}`` and ``kvcalib_http_request_duration_seconds``: the
  method is one of the known HTTP methods or ``OTHER``, the route the matched template or ``unmatched``
  (``MetricsMiddleware``), so no client can create series at will.
* process — ``process_*`` (CPU, memory, file descriptors), ``python_gc_*``, ``python_info``.
* domain, this process — ``kvcalib_budget_answers_total{route,source}`` (where a budget came from: a stored
  ``profile``, ``predicted``, an explicit ``ratio``), ``kvcalib_predictions_total{predictor}`` (``trained`` or the
  ``fallback``) and the ``kvcalib_predicted_ratio`` histogram.
* domain, the store (read at scrape time, whichever process or worker did the work) — ``kvcalib_jobs{status}``,
  histograms ``kvcalib_profile_r_star`` and ``kvcalib_calibration_seconds`` of the stored profiles.

**Several processes** (``uvicorn --workers N``): set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder before start
(``prometheus-client``'s multiprocess mode); every process then writes its HTTP and domain metrics there and any
one of them serves the sum. Process metrics are per process and are left out in that mode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("kvcalib.api")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATIO_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 … 0.95
SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
BUDGET_SOURCES = ("profile", "predicted", "ratio")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


class StoreCollector(Collector):
    """Figures of the store read at scrape time: jobs by status, r* and calibration seconds of the profiles."""

    def __init__(self, service_of: Callable[[], object]):
        self.service_of = service_of

    def collect(self) -> Iterable[Metric]:
        service = self.service_of()
        up = GaugeMetricFamily("kvcalib_store_up", "1 when the store answered the metrics queries.")
        try:
            counts = service.job_counts()
            r_hist, s_hist = service.profile_histograms(RATIO_BUCKETS, SECONDS_BUCKETS)
        except Exception as exc:  # noqa: BLE001 - metrics never fail because the database is down
            log.warning("store metrics unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("kvcalib_jobs", "Calibration jobs by status.", labels=["status"])
        for status, n in counts.items():
            jobs.add_metric([status], n)
        yield jobs
        for name, doc, h in (("kvcalib_profile_r_star", "r* (largest safe compression ratio) of stored profiles.",
                              r_hist),
                             ("kvcalib_calibration_seconds", "Calibration time of stored profiles (s).", s_hist)):
            fam = HistogramMetricFamily(name, doc)
            fam.add_metric([], [(_le(b), c) for b, c in h.buckets], h.total)
            yield fam


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Metrics:
    """The app's metrics. ``render()`` is the ``/metrics`` body (multiprocess-aware)."""

    def __init__(self, service_of: Callable[[], object]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvcalib_http_requests_total", "HTTP requests.", ["method", "route", "status"],
                                registry=r)
        self.latency = Histogram("kvcalib_http_request_duration_seconds", "HTTP request latency.",
                                 ["method", "route"], registry=r, buckets=LATENCY_BUCKETS)
        self.budget_answers = Counter("kvcalib_budget_answers_total", "Budgets answered, by route and source.",
                                      ["route", "source"], registry=r)
        self.predictions = Counter("kvcalib_predictions_total", "Predicted budgets, by predictor.", ["predictor"],
                                   registry=r)
        self.predicted_ratio = Histogram("kvcalib_predicted_ratio", "Predicted compression ratios.", registry=r,
                                         buckets=RATIO_BUCKETS)
        self.store = StoreCollector(service_of)
        self.multiprocess = multiprocess_dir() is not None
        if not self.multiprocess:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
            r.register(self.store)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_budget(self, route: str, source: str, ratio: float, predictor_version: str | None) -> None:
        """A budget answered on ``route``: its source, and for predictions the predictor and the ratio."""
        self.budget_answers.labels(route, source if source in BUDGET_SOURCES else "other").inc()
        if source == "predicted":
            kind = "fallback" if (predictor_version or "").startswith("fallback") else "trained"
            self.predictions.labels(kind).inc()
            self.predicted_ratio.observe(ratio)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self.store)
        return generate_latest(registry)
