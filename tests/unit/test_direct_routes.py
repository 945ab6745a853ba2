"""api.direct.DirectRoutes: a hot route's endpoint called without FastAPI's routing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel

from api import errors
from api.deps import PrincipalDep, ServicesDep
from api.direct import DirectRoutes
from api.errors import ApiError
from api.middleware import REQUESTS, MetricsMiddleware
from api.rate_limits import RateLimiter
from api.tenants import Principal, PrincipalCache

API_KEY = "key-1"
PRINCIPAL = Principal(tenant_id="tenant-1", key_id="key-id-1", role="admin")


class Echo(BaseModel):
    tenant_id: str
    body: str


class Wider(Echo):
    secret: str


router = APIRouter()


@router.post("/hot", status_code=202, response_model=Echo)
async def hot(request: Request, principal: PrincipalDep, services: ServicesDep) -> Echo:
    body = (await request.body()).decode()
    if body == "refuse":
        raise ApiError(409, "refused", headers={"X-Why": "asked to"})
    if body == "crash":
        raise RuntimeError("a bug, with a secret in its message")
    return Echo(tenant_id=principal.tenant_id, body=body)


@router.post("/slow")
async def slow(request: Request, principal: PrincipalDep, services: ServicesDep) -> Echo:
    return Echo(tenant_id=principal.tenant_id, body="through FastAPI")


def build(*, direct: bool) -> tuple[FastAPI, list[str]]:
    """The app, and the paths FastAPI's own routing served."""
    app = FastAPI()
    errors.install(app)
    app.include_router(router)
    principals = PrincipalCache(ttl_s=60)
    principals.put(API_KEY, PRINCIPAL)
    app.state.services = SimpleNamespace(
        principals=principals, rate_limiter=RateLimiter("2/minute", "100/minute")
    )
    routed: list[str] = []

    @app.middleware("http")
    async def record_routing(request: Request, call_next: Any) -> Any:
        routed.append(request.url.path)
        return await call_next(request)

    if direct:
        hot_route = next(r for r in router.routes if isinstance(r, APIRoute) and r.path == "/hot")
        app.add_middleware(DirectRoutes, routes=[hot_route])
    app.add_middleware(MetricsMiddleware)
    return app, routed


async def post(app: FastAPI, path: str, body: str, key: str = API_KEY) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path, content=body, headers={"Authorization": f"Bearer {key}"})


async def test_the_direct_route_answers_as_fastapi_does_without_its_routing() -> None:
    answered = REQUESTS.labels("POST", "/hot", "202")
    before = answered._value.get()
    direct_app, direct_routed = build(direct=True)
    plain_app, plain_routed = build(direct=False)
    for body in ("hello", "refuse"):
        direct = await post(direct_app, "/hot", body)
        plain = await post(plain_app, "/hot", body)
        assert (direct.status_code, direct.json()) == (plain.status_code, plain.json())
        assert direct.headers.get("x-why") == plain.headers.get("x-why")
    assert direct_routed == []  # never reached FastAPI's middleware and router
    # Labelled with the route's template by the metrics middleware, both ways.
    assert answered._value.get() - before == 2
    assert plain_routed == ["/hot", "/hot"]


async def test_an_unexpected_error_is_the_same_json_500_without_its_trace() -> None:
    app, _ = build(direct=True)
    # The server-error middleware answers, then re-raises for the server to log.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answer = await client.post(
            "/hot", content="crash", headers={"Authorization": f"Bearer {API_KEY}"}
        )
    assert (answer.status_code, answer.json()) == (500, {"detail": "internal error"})
    assert "secret" not in answer.text
    assert REQUESTS.labels("POST", "/hot", "500")._value.get() >= 1


async def test_other_routes_and_methods_go_through_fastapi() -> None:
    app, routed = build(direct=True)
    answer = await post(app, "/slow", "x")
    assert answer.json() == {"tenant_id": "tenant-1", "body": "through FastAPI"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/hot")).status_code == 405
    assert routed == ["/slow", "/hot"]


async def test_auth_and_rate_limits_apply_to_the_direct_route() -> None:
    app, _ = build(direct=True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        missing = await client.post("/hot", content="x")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert (await post(app, "/hot", "1")).status_code == 202
    assert (await post(app, "/hot", "2")).status_code == 202
    limited = await post(app, "/hot", "3")  # the limit is 2 a minute
    assert limited.status_code == 429
    assert "retry-after" in limited.headers


def refusal(route: APIRoute) -> str:
    with pytest.raises(TypeError, match="cannot be called directly") as refused:
        DirectRoutes(FastAPI(), routes=[route])
    return str(refused.value)


# Routes FastAPI would serve differently from a direct call (module level: FastAPI resolves
# their annotations from this module's globals).
unfit = APIRouter()


async def admin_only(principal: PrincipalDep) -> Principal:
    return principal


AdminDep = Annotated[Principal, Depends(admin_only)]


@unfit.post("/other")
async def needs_more(request: Request, principal: PrincipalDep, limit: int) -> Echo:
    raise AssertionError("never called")


@unfit.post("/limited", dependencies=[Depends(admin_only)])
async def limited(request: Request, principal: PrincipalDep, services: ServicesDep) -> Echo:
    raise AssertionError("never called")


@unfit.post("/admin")
async def stricter(request: Request, principal: AdminDep, services: ServicesDep) -> Echo:
    raise AssertionError("never called")


@unfit.post("/filtered", response_model=Echo)
async def wider(request: Request, principal: PrincipalDep, services: ServicesDep) -> Wider:
    raise AssertionError("never called")


@unfit.post("/plain")
def plain(request: Request, principal: PrincipalDep, services: ServicesDep) -> Echo:
    raise AssertionError("never called")


def test_endpoints_fastapi_would_serve_differently_are_refused_at_start() -> None:
    routes = {route.path: route for route in unfit.routes if isinstance(route, APIRoute)}
    assert "takes ['request', 'principal', 'limit']" in refusal(routes["/other"])
    assert "dependencies besides" in refusal(routes["/limited"])
    assert "dependencies besides" in refusal(routes["/admin"])
    assert "exactly its response model" in refusal(routes["/filtered"])
    assert "not a coroutine" in refusal(routes["/plain"])
    hot_route = next(r for r in router.routes if isinstance(r, APIRoute) and r.path == "/hot")
    DirectRoutes(FastAPI(), routes=[hot_route])  # the one the other tests serve is accepted
