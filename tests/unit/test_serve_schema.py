"""A property-based run of the job service's OpenAPI schema (schemathesis, bounded examples): no input gets a 5xx.

Routes that launch processes (start, resume, sweep relaunches, evaluate) are left out here: random valid overrides
would start real training runs; tests/test_serve.py and test_serve_e2e.py send them their bad input.
"""

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, settings  # noqa: E402

from exp.serve import Settings, create_app  # noqa: E402

_runs = tempfile.TemporaryDirectory(prefix="exp-serve-schema-")
# schemathesis calls the app as Host: testserver, a name the operator would have to allow (--allowed-host)
app = create_app(Settings(runs_dir=Path(_runs.name) / "runs", hosts=("testserver",)))
schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(
    path_regex=r"/(start|resume|rerun-failed|evaluate)$"
)


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_server_error(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
