"""Every API route except health, readiness, metrics and the docs requires an API key."""

from __future__ import annotations

import re

import httpx
import pytest

from api.main import create_app
from flexoraa.settings import Settings
from tests.conftest import MakeTenant

pytestmark = pytest.mark.integration

# Google redirects the browser to the OAuth callback, which hands the code back and connects
# nothing (tests/integration/test_gmail.py).
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


# An admin key's alone: configuration, money and the tenant's records. An SDR key works leads;
# a connector key (a channel bridge's) only brings messages in.
ADMIN_ONLY = {
    ("POST", "/api/keys"), ("GET", "/api/keys"), ("DELETE", "/api/keys/{key_id}"),
    ("GET", "/api/audit-log"), ("PUT", "/api/tenant/settings"), ("GET", "/api/dead-letters"),
    ("POST", "/api/channels/whatsapp"), ("POST", "/api/channels/instagram"),
    ("POST", "/api/channels/facebook"), ("POST", "/api/sdrs"), ("PUT", "/api/sdrs/{sdr_id}"),
    ("GET", "/api/integrations/gmail/auth-url"), ("POST", "/api/integrations/gmail/connect"),
    ("POST", "/api/tokens/topup/create-order"),
    ("POST", "/api/tokens/topup/verify"),
}  # fmt: skip
CONNECTOR_ONLY = ("POST", "/api/events/inbound")


async def test_each_role_reaches_only_its_routes(
    api: httpx.AsyncClient, test_settings: Settings, make_tenant: MakeTenant
) -> None:
    # An SDR key replaced a channel's app secret (every real webhook then failed its
    # signature) and edited the roster; a connector key could do all an SDR key could.
    tenant = await make_tenant()
    keys = {
        role: (await api.post("/api/keys", headers=tenant.headers, json={"role": role})).json()
        for role in ("sdr", "connector")
    }
    routes = documented_routes(test_settings)
    assert set(routes) >= ADMIN_ONLY
    for method, path in routes:
        concrete = re.sub(r"\{[^}]+\}", "00000000-0000-4000-8000-000000000000", path)
        for role, key in keys.items():
            headers = {"Authorization": f"Bearer {key['api_key']}"}
            response = await api.request(method, concrete, headers=headers, json={})
            refused = (
                (method, path) in ADMIN_ONLY if role == "sdr" else (method, path) != CONNECTOR_ONLY
            )
            assert (response.status_code == 403) == refused, (role, method, path, response.text)
