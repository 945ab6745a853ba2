"""Every API route except health, readiness, metrics and the docs requires an API key."""

from __future__ import annotations

import re

import httpx
import pytest

from api.main import create_app
from flexoraa.settings import Settings

pytestmark = pytest.mark.integration

# Google redirects the browser to the OAuth callback: its one-time state names the tenant
# (tests/integration/test_gmail.py).
PUBLIC = {"/health", "/ready", "/api/integrations/gmail/callback"}


def documented_routes(settings: Settings) -> list[tuple[str, str]]:
    paths = create_app(settings).openapi()["paths"]
    # Webhooks authenticate by signature (their own tests), not by API key.
    return [
        (method.upper(), path)
        for path, operations in paths.items()
        if path not in PUBLIC and not path.startswith("/webhooks/")
        for method in operations
    ]


async def test_every_route_requires_a_key(api: httpx.AsyncClient, test_settings: Settings) -> None:
    routes = documented_routes(test_settings)
    assert ("POST", "/api/events/inbound") in routes
    assert ("GET", "/api/leads/{lead_id}") in routes
    for method, path in routes:
        concrete = re.sub(r"\{[^}]+\}", "00000000-0000-4000-8000-000000000000", path)
        response = await api.request(method, concrete, json={})
        assert response.status_code == 401, (method, path, response.status_code)
