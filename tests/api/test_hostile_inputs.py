"""No input gives a 5xx (issue 13, item 2), on SQLite and PostgreSQL alike.

A property-based test (hypothesis) walks the app's own OpenAPI schema and sends every operation requests whose
fields — nested ones included (options, method_params, batch documents, JSONL lines, multipart form fields, query
and path parameters) — hold hostile values: NaN / ±Infinity / 1e400 (Python's JSON reader accepts them), integers
beyond 64 bits, NUL characters, lone surrogates, over-long strings, invalid UTF-8 and malformed JSON, mixed with
valid values so that requests also get past the first check. Every answer must be < 500, and every error a JSON
``{"detail": …}``. Jobs are accepted but not executed (a recording dispatcher); predict and compress run the real
model (documents capped at 48 tokens to keep them fast). Then the exact inputs the issue reported as 500s.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import RecordingDispatcher, isolated_settings, pg_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("KVCALIB_HOSTILE_EXAMPLES", "15"))  # per operation and database
TRIED: Counter = Counter()  # requests sent per database (the figure of docs/service.md's guarantees)


class Raw(str):
    """A JSON value already encoded (``NaN``, ``1e400``… have no Python value that ``json.dumps`` writes)."""


def enc(v) -> Raw:
    return Raw(json.dumps(v, ensure_ascii=True))  # lone surrogates and NUL come out as \\udxxx / \\u0000 escapes


SHORT_TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank."
HOSTILE = [Raw(x) for x in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0.0",
                            str(10**20), str(-(10**20)), str(2**63), str(2**64), "-1", "0", "1", "0.5", "1e308")]
HOSTILE += [enc(x) for x in ("\ud800", "a\udfffb", "\x00", "x\x00y", "", " ", "\u202e\ufeff", "é" * 1500,
                             "ab " * 100_000, "word " * 210_000, "null", "NaN", "[]")]
VALID = [enc(x) for x in (SHORT_TEXT, "0" * 64, "a" * 64, "smollm2-135m", "compactor", "lookahead", "snapkv",
                          "streaming", "uniform", "adakv", "predict", "compress", "full", 0.5, 0.95, 1, 8, True,
                          False, None, [0.3, 0.6], [], {})]
LEAF = st.sampled_from(HOSTILE + VALID)
METHOD_PARAMS = ("window", "kernel", "pooling", "gqa", "n_pseudo", "obs_window", "sinks", "rho", "seed",
                 "sketch_dim", "chunk", "blend", "protect_first", "draft_allocator", "bogus\u0000")
QUERY_VALUES = ["NaN", "inf", "-inf", "1e400", "-1", "0", "0.5", "1", "%00", "%ff", "%ED%A0%80", "x" * 5000,
                "a" * 64, "0" * 64, "smollm2-135m", "compactor", "uniform", "true", "", "%0A"]
PATH_VALUES = ["0", "-1", "1", "2", "9223372036854775807", "9223372036854775808", "1" + "0" * 30, "1e400",
               "NaN", "%00", "%ff", "abc", "1.5"]
JSONL_FIELDS = {"text": {"type": "string"}, "document_id": {"type": "integer", "minimum": 1},
                "document_hash": {"type": "string", "pattern": "hex"}, "source": {"type": "string"},
                "id": {"type": "string"}}
RAW_BODIES = [b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe{}", b'{"text": "\xff"}', b"[" * 50_000,
              b'{"a": ' + b"9" * 5000 + b"}", b"\x00"]


def dump(v) -> str:
    if isinstance(v, Raw):
        return v
    if isinstance(v, dict):
        return "{" + ",".join(f"{enc(k)}:{dump(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dump(x) for x in v) + "]"
    raise TypeError(type(v))


class SchemaValues:
    """Hypothesis strategies of hostile values shaped by the OpenAPI schema (objects get their own fields)."""

    def __init__(self, spec: dict):
        self.components = spec["components"]["schemas"]

    def resolve(self, schema: dict) -> list[dict]:
        if "$ref" in schema:
            return self.resolve(self.components[schema["$ref"].rsplit("/", 1)[1]])
        if ("anyOf" in schema or "oneOf" in schema) and "properties" not in schema:  # not DocumentIn's oneOf
            return [r for sub in schema.get("anyOf", schema.get("oneOf")) for r in self.resolve(sub)]
        return [schema]

    def valid(self, schema: dict) -> st.SearchStrategy:
        """Values the field accepts, so that requests also reach the code behind the first check."""
        options = []
        for sub in self.resolve(schema):
            t = sub.get("type")
            if "enum" in sub or "const" in sub:
                options.append(st.sampled_from(sub.get("enum") or [sub.get("const")]).map(enc))
            elif t == "string":
                options.append(st.just(enc("0" * 64 if "pattern" in sub else SHORT_TEXT)))
            elif t == "number":
                lo = sub.get("minimum", sub.get("exclusiveMinimum", 0.0))
                hi = sub.get("maximum", sub.get("exclusiveMaximum", 1.0))
                options.append(st.floats(lo, hi, exclude_min=True, exclude_max=True).map(enc))
            elif t == "integer":
                options.append(st.integers(max(sub.get("minimum", 1), 1), min(sub.get("maximum", 8), 8)).map(enc))
            elif t == "boolean":
                options.append(st.booleans().map(enc))
        return st.one_of(*options) if options else LEAF

    def value(self, schema: dict, depth: int = 0) -> st.SearchStrategy:
        options = [LEAF, self.valid(schema), self.valid(schema)]  # valid twice as likely as hostile
        for sub in self.resolve(schema):
            if depth < 3 and sub.get("type") == "object" and sub.get("properties"):
                options.append(self.obj(sub, depth + 1))
            elif depth < 3 and sub.get("type") == "object":  # free-form (method_params)
                options.append(st.dictionaries(st.sampled_from(METHOD_PARAMS), LEAF, max_size=3))
            elif depth < 3 and sub.get("type") == "array":
                options.append(st.lists(self.value(sub.get("items", {}), depth + 1), max_size=3))
        return st.one_of(*options)

    def obj(self, schema: dict, depth: int = 0) -> st.SearchStrategy:
        """Up to four of the object's fields (few fields: each request gets further than the first bad one)."""
        props = schema.get("properties", {})
        if not props:
            return st.just({})

        doc_keys = [k for k in ("text", "document_id", "document_hash") if k in props]

        @st.composite
        def build(draw):
            keys = draw(st.lists(st.sampled_from(sorted(props)), unique=True, min_size=1, max_size=3))
            keys += [k for k in schema.get("required", []) if k not in keys]
            if doc_keys and not set(keys) & set(doc_keys):  # a document (mostly valid): requests get further
                keys.insert(0, draw(st.sampled_from(doc_keys)))
            return {k: draw(self.value(props[k], depth)) for k in keys}

        return build()


def request_strategy(values: SchemaValues, method: str, path: str, op: dict) -> st.SearchStrategy:
    """(url, keyword arguments of ``TestClient.request``) of one hostile request to the operation."""
    params = op.get("parameters", [])
    path_params = [p["name"] for p in params if p["in"] == "path"]
    query_params = [p["name"] for p in params if p["in"] == "query"]
    content = op.get("requestBody", {}).get("content", {})

    def query_value(name: str) -> st.SearchStrategy:
        schema = next(p["schema"] for p in params if p["name"] == name)
        valid = values.valid(schema).map(lambda raw: str(json.loads(raw)).lower() if raw in ("true", "false")
                                          else str(json.loads(raw)))
        return st.one_of(st.sampled_from(QUERY_VALUES), valid, valid)

    @st.composite
    def build(draw):
        url = path
        for name in path_params:
            url = url.replace("{" + name + "}", draw(st.sampled_from(PATH_VALUES)))
        chosen = draw(st.lists(st.sampled_from(query_params), unique=True)) if query_params else []
        if chosen:
            url += "?" + "&".join(f"{n}={draw(query_value(n))}" for n in chosen)
        kwargs: dict = {}
        if "application/json" in content:
            if draw(st.integers(0, 9)) == 0:
                kwargs["content"] = draw(st.sampled_from(RAW_BODIES))
            else:
                body = draw(values.obj(values.resolve(content["application/json"]["schema"])[0]))
                kwargs["content"] = dump(body).encode()
            kwargs["headers"] = {"content-type": "application/json"}
        elif "multipart/form-data" in content:
            line = st.one_of(values.obj({"properties": JSONL_FIELDS}).map(dump), LEAF)
            lines = draw(st.lists(line, min_size=0, max_size=3))
            data = "\n".join(lines).encode() + draw(st.sampled_from([b"", b"\n\xff\xfe", b"\n\x00", b"\n{"]))
            form = {"file": ("corpus.jsonl", data)}
            for name in draw(st.lists(st.sampled_from(["model", "method", "allocator", "tolerance", "options"]),
                                      unique=True)):
                form[name] = (None, draw(st.sampled_from(QUERY_VALUES[:8] + ["{\"seed\": NaN}", "\xed\xa0\x80"]))
                              .encode("utf-8", "surrogatepass"))
            kwargs["files"] = form
        return url, kwargs

    return build()


def hostile_app(data_dir, database_url: str | None = None):
    from kvcalib.api.app import create_app

    s = isolated_settings(data_dir, database_url=database_url, max_document_tokens=48)
    return create_app(s, dispatcher=RecordingDispatcher(), resume=False)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def client(request, tmp_path_factory, engine):
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    with TestClient(hostile_app(tmp_path_factory.mktemp("hostile"), url), raise_server_exceptions=False) as c:
        c.db = request.param
        yield c
    print(f"\nhostile inputs tried on {request.param}: {TRIED[request.param]}, 5xx seen: 0")


def operations(client) -> list[tuple[str, str, dict]]:
    spec = client.app.openapi()
    return [(m.upper(), p, op) for p, ops in spec["paths"].items() for m, op in ops.items()]


def check_answer(r, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:500]}"
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        assert "detail" in r.json(), f"{what}: {r.text[:300]}"


def hostile_requests(client, values: SchemaValues, method: str, path: str, op: dict):
    """A hypothesis test sending ``EXAMPLES`` hostile requests to one operation."""

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(req=request_strategy(values, method, path, op))
    def send(req):
        url, kwargs = req
        TRIED[client.db] += 1
        check_answer(client.request(method, url, **kwargs), f"{client.db} {method} {url[:120]}")

    return send


def test_every_operation_never_answers_5xx(client):
    spec = client.app.openapi()
    values = SchemaValues(spec)
    ops = operations(client)
    assert len(ops) >= 14  # every operation of the schema, DELETE /documents/{id} included
    for method, path, op in ops:
        hostile_requests(client, values, method, path, op)()
    assert TRIED[client.db] >= len(ops) * min(EXAMPLES, 5)


# ---------------------------------------------------------------------------------------------------- the 500s
def test_reported_inputs_are_422(client):
    raw = lambda body: client.post("/calibrate", content=body, headers={"content-type": "application/json"})  # noqa
    for bad in (b'{"text": "hi", "tolerance": NaN}', b'{"text": "hi", "tolerance": Infinity}',
                b'{"text": "hi", "tolerance": -Infinity}', b'{"text": "hi", "tolerance": 1e400}',
                b'{"text": "hi", "ratio": NaN, "mode": "compress"}', b'{"text": "hi", "options": {"seed": 1e400}}'):
        r = raw(bad)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["detail"][0]["loc"][0] == "body"  # the echo of the input went through
    r = raw(b'{"text": "hi", "tolerance": NaN}')
    assert r.json()["detail"][0]["input"] == "NaN"
    for source in ("\\ud800", "x\\udfffy", "a\\u0000b"):
        r = raw(b'{"mode": "predict", "text": "hello there", "source": "' + source.encode() + b'"}')
        assert r.status_code == 422 and r.json()["detail"], r.text
    upload = lambda data: client.post("/batches/upload", files={"file": ("c.jsonl", data)})  # noqa: E731
    for line, word in ((b'{"document_id": 100000000000000000000}', "document_id"),
                       (b'{"text": "hello there", "id": "\\ud800"}', "surrogate"),
                       (b'{"text": "hello there", "source": "a\\u0000"}', "NUL"),
                       (b'{"document_hash": "\\u0000"}', "document_hash"),
                       (b'{"text": "x", "id": ' + b"9" * 5000 + b"}", "invalid JSON")):
        r = upload(line + b"\n")
        assert r.status_code == 422 and word in r.json()["detail"], r.text
    r = client.post("/calibrate", content=b'{"text": "\xff\xfe not utf-8"}', headers={"content-type":
                                                                                       "application/json"})
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"]  # as documented (was 400)
