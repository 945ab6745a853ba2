from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest

from api.main import create_app
from flexoraa.settings import Settings
from tests.conftest import free_port
from tests.fakes.graph_api import GraphApiFake

pytestmark = pytest.mark.integration

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def api_factory(test_settings: Settings) -> ApiFactory:
    """An in-process API (lifespan and all) on this session's settings, with overrides."""

    @asynccontextmanager
    async def start(**overrides: object) -> AsyncIterator[httpx.AsyncClient]:
        settings = test_settings.model_copy(update=overrides)
        app = create_app(settings)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://api", timeout=30
            ) as client,
        ):
            yield client

    return start


@pytest.fixture
async def api(api_factory: ApiFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with api_factory() as client:
        yield client


@pytest.fixture(scope="module")
async def graph() -> AsyncIterator[GraphApiFake]:
    """A local server speaking the Graph API's send endpoints, one per test module."""
    fake = GraphApiFake()
    await fake.start(free_port())
    yield fake
    await fake.stop()
