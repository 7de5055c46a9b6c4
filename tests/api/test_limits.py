"""Request-side limits (issue 13, items 3, 7 and 10): the body limit counts streamed bytes, the token is checked
before a body is read, method hyperparameters are range-checked, synchronous predict/compress work is capped per
process (429 + Retry-After) and time-limited (503 + Retry-After), full calibrations of too-short documents are
refused up front. The real model answers the synchronous requests."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.support import RecordingDispatcher, isolated_settings

pytestmark = pytest.mark.slow

LIMIT = 64 * 1024
TEXT = ("The committee met on Tuesday to review the harbour plans. After a long debate about costs, the members "
        "agreed to build the new pier in two phases, starting with the northern section next spring.")


def make_app(data_dir, **overrides):
    from kvcalib.api.app import create_app

    return create_app(isolated_settings(data_dir, **overrides), dispatcher=RecordingDispatcher(), resume=False)


def stream(app, method: str, path: str, n_chunks: int, chunk: int = 16 * 1024, headers: dict | None = None,
           prefix: bytes = b""):
    """Send a chunked body (an async generator: no Content-Length) through httpx's ASGI transport, which pulls the
    chunks only when the app reads them. Returns (response, chunks pulled)."""
    pulled = 0

    async def body():
        nonlocal pulled
        for i in range(n_chunks):
            pulled += 1
            yield (prefix if i == 0 else b"") + b"x" * (chunk - (len(prefix) if i == 0 else 0))

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.request(method, path, content=body(),
                                   headers={"content-type": "application/json", **(headers or {})})

    r = asyncio.run(go())
    return r, pulled


# ---------------------------------------------------------------------------------------------------- item 3
def test_streamed_body_over_the_limit_is_413_as_soon_as_passed(tmp_path):
    app = make_app(tmp_path, max_request_bytes=LIMIT)
    r, pulled = stream(app, "POST", "/calibrate", n_chunks=64)  # 1 MiB, chunked: no declared length
    assert r.status_code == 413 and "KVCALIB_MAX_REQUEST_BYTES" in r.json()["detail"]
    assert pulled == LIMIT // (16 * 1024) + 1  # read up to the first chunk past the limit, not one more
    r, pulled = stream(app, "POST", "/batches/upload", n_chunks=64,  # multipart parsing reads through it too
                       headers={"content-type": "multipart/form-data; boundary=kvcalib"},
                       prefix=b'--kvcalib\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n\r\n')
    assert r.status_code == 413 and pulled == LIMIT // (16 * 1024) + 1
    with TestClient(app) as c:  # a declared length over the limit: 413 before reading anything
        assert c.post("/calibrate", content=b"x" * (LIMIT + 1),
                      headers={"content-type": "application/json"}).status_code == 413
        r = c.post("/calibrate", json={"mode": "predict", "text": "x" * (LIMIT // 2), "model": "nope"})
        assert r.status_code == 422  # under the limit: read and validated


def test_token_is_checked_before_the_body_is_read(tmp_path):
    app = make_app(tmp_path, max_request_bytes=LIMIT, api_token="s3cret")
    for path in ("/calibrate", "/batches", "/batches/upload", "/budget", "/jobs/1/retry"):
        r, pulled = stream(app, "POST", path, n_chunks=64)
        assert r.status_code == 401 and pulled == 0, (path, r.status_code, pulled)
        assert r.headers["www-authenticate"] == "Bearer"
    r, pulled = stream(app, "DELETE", "/documents/1", n_chunks=4)
    assert r.status_code == 401 and pulled == 0
    r, pulled = stream(app, "POST", "/calibrate", n_chunks=64, headers={"authorization": "Bearer s3cret"})
    assert r.status_code == 413 and pulled == LIMIT // (16 * 1024) + 1  # with the token: the body limit applies
    with TestClient(app) as c:  # authentication comes before validation (item 10)
        assert c.post("/calibrate", content=b"{not json", headers={"content-type": "application/json"}
                      ).status_code == 401
        assert c.post("/calibrate", json={"text": "hi", "model": "nope"}).status_code == 401
        assert c.post("/calibrate", json={"text": "hi", "model": "nope"},
                      headers={"Authorization": "Bearer s3cret"}).status_code == 422


# ---------------------------------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("method,params,word", [
    ("snapkv", {"window": 0}, "window"), ("snapkv", {"window": -4}, "window"), ("snapkv", {"kernel": 0}, "kernel"),
    ("obcache", {"kernel": -1}, "kernel"), ("lava", {"window": 10**30}, "window"),
    ("streaming", {"sinks": 0}, "sinks"), ("streaming", {"sinks": -1}, "sinks"), ("compactor", {"rho": -1e-3}, "rho"),
    ("compactor", {"pool_kernel": 0}, "pool_kernel"), ("compactor", {"sketch_dim": 0}, "sketch_dim"),
    ("compactor", {"protect_first": -1}, "protect_first"), ("compactor", {"seed": -1}, "seed"),
    ("lookahead", {"n_pseudo": 33}, "KVCALIB_MAX_PSEUDO_TOKENS"), ("lookahead", {"n_pseudo": 256}, "n_pseudo"),
    ("lookahead", {"n_pseudo": 0}, "n_pseudo"), ("lookahead", {"draft_window": 0}, "draft_window"),
    ("lookahead", {"pooling": "median"}, "pooling"), ("lookahead", {"draft_allocator": "nope"}, "uniform"),
    ("curdkv", {"local_window": 0}, "local_window"), ("curdkv", {"leverage": "nope"}, "product"),
    ("obcache", {"saliency": "nope"}, "joint"), ("snapkv", {"gqa": "median"}, "gqa"),
])
def test_method_parameters_are_range_checked(ranges_client, method, params, word):
    c = ranges_client
    for mode in ("predict", "compress", "full"):
        r = c.post("/calibrate", json={"mode": mode, "text": TEXT, "method": method,
                                       "options": {"method_params": params}})
        assert r.status_code == 422 and word in r.json()["detail"], (mode, r.text)
    assert c.app.state.service.dispatcher.submitted == []  # nothing queued


@pytest.fixture(scope="module")
def ranges_client(tmp_path_factory):
    with TestClient(make_app(tmp_path_factory.mktemp("ranges"))) as c:
        yield c


def test_method_parameters_in_range_are_accepted(tmp_path, engine):
    app = make_app(tmp_path, max_pseudo_tokens=2)
    with TestClient(app) as c:
        for method, params in (("lookahead", {"n_pseudo": 2, "obs_window": 0}), ("streaming", {"sinks": 1}),
                               ("compactor", {"rho": 0.0, "protect_first": 0})):
            r = c.post("/calibrate", json={"mode": "predict", "text": TEXT, "method": method,
                                           "options": {"method_params": params}})
            assert r.status_code == 200, r.text


def test_synchronous_work_is_capped_per_process(tmp_path, engine):
    app = make_app(tmp_path, sync_concurrency=1, sync_queue=0)
    limiter = app.state.service.limiter
    release, started = threading.Event(), threading.Event()

    def occupy():  # another request's computation holding the only slot
        started.set()
        release.wait(30)

    holder = threading.Thread(target=limiter.run, args=(occupy,))
    holder.start()
    started.wait(10)
    try:
        with TestClient(app) as c:
            for body in ({"mode": "predict", "text": TEXT}, {"mode": "compress", "text": TEXT, "ratio": 0.5}):
                r = c.post("/calibrate", json=body)
                assert r.status_code == 429 and int(r.headers["retry-after"]) > 0, r.text
                assert "KVCALIB_SYNC_CONCURRENCY" in r.json()["detail"]
            assert c.post("/budget", json={"text": TEXT}).status_code == 429
            assert c.get("/healthz").status_code == 200  # everything else is served
            release.set()
            holder.join(10)
            assert c.post("/calibrate", json={"mode": "predict", "text": TEXT}).status_code == 200
    finally:
        release.set()


def test_waiting_requests_get_the_slot_when_it_frees(tmp_path, engine):
    from kvcalib.service.errors import BusyError
    from kvcalib.service.limits import SyncLimiter

    lim = SyncLimiter(concurrency=1, queue=1, timeout=10)
    gate = threading.Event()
    first = threading.Thread(target=lim.run, args=(lambda: gate.wait(10),))
    first.start()
    time.sleep(0.1)
    results = []
    waiter = threading.Thread(target=lambda: results.append(lim.run(lambda: "served")))
    waiter.start()
    time.sleep(0.1)
    assert lim.waiting == 1
    with pytest.raises(BusyError, match="KVCALIB_SYNC_QUEUE"):  # the queue (1) is full
        lim.run(lambda: "never")
    gate.set()
    first.join(5)
    waiter.join(5)
    assert results == ["served"] and lim.running == 0 and lim.waiting == 0
    lim.close()


def test_synchronous_work_has_a_time_limit(tmp_path, engine):
    app = make_app(tmp_path, sync_timeout=0.02, sync_concurrency=2)
    with TestClient(app) as c:
        r = c.post("/calibrate", json={"mode": "predict", "text": TEXT * 6})  # a real prefill: far over 20 ms
        assert r.status_code == 503 and "KVCALIB_SYNC_TIMEOUT" in r.json()["detail"], r.text
        assert int(r.headers["retry-after"]) > 0
    limiter = app.state.service.limiter
    deadline = time.monotonic() + 60
    while limiter.running and time.monotonic() < deadline:  # the abandoned computation ends, freeing its slot
        time.sleep(0.05)
    assert limiter.running == 0


# ---------------------------------------------------------------------------------------------------- item 10
def test_full_mode_rejects_documents_under_the_minimum_length(tmp_path, tokenizer):
    """A probe needs cue + target tokens and 4 positions clear at the end (calib.calibration.probes): exactly that
    many tokens are accepted, one fewer is a 422 at submission instead of a failed job."""
    text = "The harbour committee met on Tuesday evening."
    n = len(tokenizer(text, add_special_tokens=False).input_ids)
    app = make_app(tmp_path)
    with TestClient(app) as c:
        fits = {"n_probes": 1, "cue_tokens": 2, "probe_tokens": n - 6}
        too_long = {"n_probes": 1, "cue_tokens": 2, "probe_tokens": n - 5}
        r = c.post("/calibrate", json={"mode": "full", "text": text, "options": too_long})
        assert r.status_code == 422 and f"at least {n + 1}" in r.json()["detail"], r.text
        assert "mode=predict" in r.json()["detail"]
        assert c.post("/calibrate", json={"mode": "full", "text": text}).status_code == 422  # defaults: 4 + 6 + 4
        r = c.post("/calibrate", json={"mode": "full", "text": text, "options": fits})
        assert r.status_code == 202, r.text
        r = c.post("/batches", json={"documents": [TEXT, "Short."]})
        assert r.status_code == 422 and r.json()["detail"].startswith("document 1:")
        assert len(app.state.service.dispatcher.submitted) == 1  # only the document that fits was queued
