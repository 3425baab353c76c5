"""Property-based fuzzing of the JSON API from its own OpenAPI spec (schemathesis).

Every operation gets a few generated requests: with an admin API token none
may answer 5xx or break its documented response schema; without credentials
every one must answer 401.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.core.result import Ok
from simline import SimLine

from edge.web.config import PanelConfig
from edge.web.server import create_app

MAX_EXAMPLES = 6


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fuzz")
    line = SimLine(root / "line", parts_per_s=10.0)
    line.start()
    app = create_app(
        line, PanelConfig(password_hash_time_cost=1, password_hash_memory_kib=8192), root / "panel"
    )
    db = app.state.panel.db
    db.create_first_admin("admin", "admin-secret-1")
    token, _ = db.create_token("admin", "fuzz")
    yield {"app": app, "headers": {"Authorization": f"Bearer {token}"}, "line": line}
    line.stop()


@pytest.mark.slow
def test_api_fuzz(fuzz_env: dict[str, Any]) -> None:
    """Each operation: authenticated -> no 5xx and as documented; anonymous -> 401."""
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", fuzz_env["app"])
    tried = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            case.call_and_validate(
                headers=fuzz_env["headers"],
                checks=[
                    checks.not_a_server_error,
                    checks.status_code_conformance,
                    checks.content_type_conformance,
                    checks.response_schema_conformance,
                ],
            )
            anon = case.call()
            assert anon.status_code == 401, (case.method, case.path, anon.status_code)

        run()
        tried.append(op.label)
    assert len(tried) >= 15, tried


def test_spec_covers_the_api(fuzz_env: dict[str, Any], tmp_path: Path) -> None:
    spec = fuzz_env["app"].openapi()
    ops = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    assert ("PUT", "/api/threshold") in ops
    assert ("GET", "/api/parts.csv") in ops
    # every API route of the app is in the spec (nothing hidden from the fuzzer)
    routes = {
        (m, r.path)
        for r in fuzz_env["app"].routes
        if getattr(r, "path", "").startswith("/api/") and r.path != "/api/openapi.json"
        for m in getattr(r, "methods", set())
        if m != "HEAD"
    }
    assert routes <= ops
