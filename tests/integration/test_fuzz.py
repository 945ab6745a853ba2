"""Every endpoint of the OpenAPI document, fed arbitrary JSON, parameters and ids: never a 5xx,
never a stack trace in the answer."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.main import create_app
from flexoraa.settings import Settings
from tests.conftest import MakeTenant, Tenant
from tests.integration.conftest import ApiFactory

pytestmark = pytest.mark.integration

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False)
    | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)  # fmt: skip
path_values = st.one_of(
    st.uuids().map(str),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/?#%"),
            min_size=1, max_size=40),
)  # fmt: skip


def operations(settings_: Settings) -> list[tuple[str, str, dict[str, Any]]]:
    document = create_app(settings_).openapi()
    return [
        (method.upper(), path, operation)
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]


def _request_strategy(
    path: str, operation: dict[str, Any], body_fields: list[str]
) -> st.SearchStrategy[tuple[str, dict[str, Any], Any]]:
    names = re.findall(r"\{([^}]+)\}", path)
    query_names = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
    known_body = st.fixed_dictionaries({}, optional={f: json_values for f in body_fields})

    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, dict[str, Any], Any]:
        concrete = path
        for name in names:
            concrete = concrete.replace("{" + name + "}", draw(path_values))
        query = {n: draw(st.text(max_size=30)) for n in query_names if draw(st.booleans())}
        body = draw(st.one_of(json_values, known_body))
        return concrete, query, body

    return build()


def examples(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` inputs from Hypothesis (its generation, edge cases first; the requests are sent
    by the async test itself)."""
    found: list[Any] = []

    @settings(max_examples=count, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(value=strategy)
    def probe(value: Any) -> None:
        found.append(value)

    probe()
    return found


def body_fields(document: dict[str, Any], operation: dict[str, Any]) -> list[str]:
    schema = (operation.get("requestBody", {}).get("content", {})
              .get("application/json", {}).get("schema", {}))  # fmt: skip
    ref = schema.get("$ref", "")
    if ref:
        schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return list(schema.get("properties", {}))


async def test_no_endpoint_answers_5xx_or_a_stack_trace_to_arbitrary_input(
    api_factory: ApiFactory, test_settings: Settings, make_tenant: MakeTenant
) -> None:
    tenant: Tenant = await make_tenant()
    document = create_app(test_settings).openapi()
    failures: list[str] = []
    async with api_factory() as api:
        for method, path, operation in operations(test_settings):
            strategy = _request_strategy(path, operation, body_fields(document, operation))

            samples = examples(strategy, 25)
            for concrete, query, body in samples:
                try:
                    response = await api.request(
                        method, concrete, params=query,
                        content=json.dumps(body).encode(), headers={
                            **tenant.headers, "Content-Type": "application/json"},
                    )  # fmt: skip
                except httpx.InvalidURL:
                    continue
                text = response.text
                # 503 is a documented answer (a dependency such as the worker is away).
                if response.status_code >= 500 and response.status_code != 503:
                    failures.append(
                        f"{method} {concrete} {query} {body!r} → {response.status_code}"
                    )
                if "Traceback" in text or 'File "' in text:
                    failures.append(f"{method} {concrete} leaked a stack trace")
    assert failures == []
