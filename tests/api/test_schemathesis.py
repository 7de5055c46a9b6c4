"""Property-based API testing with schemathesis against the app's own OpenAPI schema, in-process (ASGI): whatever
the generated request, the answer is never a 5xx. Examples per operation are bounded to keep the run short; jobs
are accepted but not executed (a recording dispatcher), while predict/compress run the real model."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from tests.support import RecordingDispatcher, isolated_settings

MAX_EXAMPLES = int(os.environ.get("KVCALIB_SCHEMATHESIS_EXAMPLES", "12"))


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, engine):
    from kvcalib.api.app import create_app

    s = isolated_settings(tmp_path_factory.mktemp("schemathesis"), max_document_tokens=48)
    app = create_app(s, dispatcher=RecordingDispatcher())
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx(case):
    case.call_and_validate(checks=[not_a_server_error])
