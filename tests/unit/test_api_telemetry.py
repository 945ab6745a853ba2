"""The API does not run FastAPI's native OpenTelemetry telemetry: its metrics are Prometheus's.

With telemetry on (FastAPI's default), every request asks OpenTelemetry's global providers
whether one is configured before it reaches the application: 2 % of the API's CPU at 1,000
messages a second, for spans and metrics nothing here exports.
"""

from __future__ import annotations

import pytest
from fastapi.telemetry import _asgi

from api.main import create_app
from flexoraa.settings import Settings


def test_fastapi_telemetry_is_off_even_with_a_provider_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if a library had installed OpenTelemetry providers globally: FastAPI's default
    # configuration would then trace and measure every request.
    monkeypatch.setattr(_asgi, "_unconfigured", lambda provider: False)
    app = create_app(Settings())
    assert app._native_telemetry.enabled() is False
