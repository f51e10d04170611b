"""A bounded schemathesis run over every service's OpenAPI document, against a real
`leaky-tokens up` in both shapes (issue 9): no answer is a server error and every answer with a
documented status matches its documented schema.

Requests carry an ADMIN's token, so the generated data reaches past authentication. Two kinds
of operations are left out because they degrade the system on purpose, by design answering 5xx
afterwards: the provider stubs' fault switch and the token service's feature flags (purchases
switched off are a documented 503).

The provider stubs' emulated APIs (`/v1/...`, `/compatible-mode/...`, `/v1beta/...` on the stub
ports) answer errors in each real provider's own shape, which their OpenAPI documents do not
describe yet; there only "no server error" is checked (see the closing note of issue 9)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import Stack
from tests.e2e.journeys import ADMIN_PASSWORD, admin_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADMIN_USERNAME = "e2e_fuzz_admin"
SERVICES = ("gateway", "auth", "tokens", "analytics", "qwen", "gemini", "openai")
EXAMPLES_PER_OPERATION = 4
# (method, path) of operations that switch faults on or features off (see the module docstring).
DEGRADING = (("PUT", "/faults"), ("PUT", "/admin/flags/"))


@pytest.fixture(scope="module")
def system(stack_env: tuple[Path, dict[str, str], str]) -> Iterator[Stack]:
    workdir, env, shape = stack_env
    running = Stack(workdir, env, shape)
    running.up(extra_env=admin_env(ADMIN_USERNAME))
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def admin_headers(system: Stack) -> dict[str, str]:
    with system.client("auth") as auth:
        response = auth.post(
            "/api/v1/auth/login", json={"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}
        )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


STUBS = ("qwen", "gemini", "openai")


def _degrading(method: str, path: str) -> bool:
    return any(method.upper() == m and p in path for m, p in DEGRADING)


def _checks(service: str, path: str) -> list[object]:
    from schemathesis.checks import not_a_server_error, response_schema_conformance

    if service in STUBS and not path.startswith("/api/v1/"):
        return [not_a_server_error]
    return [not_a_server_error, response_schema_conformance]


@pytest.mark.parametrize("service", SERVICES)
def test_no_generated_request_gets_a_server_error_or_an_undocumented_body(
    system: Stack, admin_headers: dict[str, str], service: str
) -> None:
    import schemathesis

    base_url = system.url(service)
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if not _degrading(op.method, op.path)]
    assert operations, f"{service} documents no operation"

    @settings(
        max_examples=EXAMPLES_PER_OPERATION * len(operations),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        operation = data.draw(st.sampled_from(operations), label="operation")
        case = data.draw(operation.as_strategy(), label="case")
        case.call_and_validate(
            base_url=base_url,
            headers=admin_headers,
            checks=_checks(service, operation.path),  # type: ignore[arg-type]
            timeout=30,
        )

    fuzz()
