"""Fuzz every /v1 route from the OpenAPI schema with schemathesis: no 5xx, no hang (reliability A16).

A real server on loopback over the tiny model. Requests come from a non-admin key, so the admin
routes answer 403 instead of starting real training runs; their input checks are covered by
tests/unit/test_api_hardening.py. About 25 generated examples per operation.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from bot.api import create_app
from tests.helpers import build_test_runtime, running_server

KEY = "fuzz-key"
CALLS: list[str] = []


@pytest.fixture(scope="module")
def api(tiny_model_dir, tmp_path_factory):
    runtime = build_test_runtime(tiny_model_dir, tmp_path_factory.mktemp("fuzz-home"), max_new_tokens_cap=4,
                                 api_keys=f"admin:admin-key,fuzz:{KEY}", admins="admin")
    with running_server(create_app(runtime)) as url:
        yield url
    runtime.engine.close()


@pytest.fixture(scope="module")
def api_schema(api):
    return schemathesis.openapi.from_url(api + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_route_answers_5xx_or_hangs(case, api):
    CALLS.append(f"{case.method} {case.path}")
    response = case.call(base_url=api, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"


def test_the_fuzzer_reached_every_route(api_schema):
    """Runs after the fuzz test (file order): every operation got generated requests."""
    operations = {f"{op.method.upper()} {op.path}" for op in (r.ok() for r in api_schema.get_all_operations())}
    reached = {c.upper().split(" ", 1)[0] + " " + c.split(" ", 1)[1] for c in CALLS}
    print(f"fuzz: {len(CALLS)} requests over {len(operations)} operations")
    assert len(CALLS) >= 200, len(CALLS)
    assert operations <= reached, sorted(operations - reached)
