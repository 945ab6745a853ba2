"""api.direct.DirectRoutes: a hot route's endpoint called without FastAPI's routing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import BaseRoute

from api import errors
from api.deps import PrincipalDep, ServicesDep
from api.direct import DirectRoutes, may_match_the_same_path
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


@router.get("/items/{item_id}", response_model=Echo)
async def item(item_id: str, principal: PrincipalDep, services: ServicesDep) -> Echo:
    if item_id == "missing":
        raise ApiError(404, "no such item")
    return Echo(tenant_id=principal.tenant_id, body=item_id)


@router.post("/slow")
async def slow(request: Request, principal: PrincipalDep, services: ServicesDep) -> Echo:
    return Echo(tenant_id=principal.tenant_id, body="through FastAPI")


def declared(path: str, routes: APIRouter = router) -> APIRoute:
    return next(r for r in routes.routes if isinstance(r, APIRoute) and r.path == path)


def build(*, direct: bool, limit: str = "2/minute", prefix: str = "") -> tuple[FastAPI, list[str]]:
    """The app, and the paths FastAPI's own routing served."""
    app = FastAPI()
    errors.install(app)
    app.include_router(router, prefix=prefix)
    principals = PrincipalCache(ttl_s=60)
    principals.put(API_KEY, PRINCIPAL)
    app.state.services = SimpleNamespace(
        principals=principals, rate_limiter=RateLimiter(limit, "100/minute", "100/minute")
    )
    routed: list[str] = []

    @app.middleware("http")
    async def record_routing(request: Request, call_next: Any) -> Any:
        routed.append(request.url.path)
        return await call_next(request)

    if direct:
        app.add_middleware(
            DirectRoutes,
            routes=[declared("/hot"), declared("/items/{item_id}")],
            declared=app.routes,
        )
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


async def get(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers={"Authorization": f"Bearer {API_KEY}"})


async def test_a_route_with_a_path_parameter_answers_as_fastapi_does() -> None:
    direct_app, direct_routed = build(direct=True, limit="100/minute")
    plain_app, plain_routed = build(direct=False, limit="100/minute")
    # Percent-decoded before matching, both ways.
    for path in ("/items/abc", "/items/a%20b", "/items/missing"):
        direct = await get(direct_app, path)
        plain = await get(plain_app, path)
        assert (direct.status_code, direct.json()) == (plain.status_code, plain.json())
    assert (await get(direct_app, "/items/a%20b")).json()["body"] == "a b"
    assert direct_routed == []
    assert len(plain_routed) == 3
    # Paths the template does not match, and HEAD, are FastAPI's to answer.
    for path in ("/items/abc/more", "/items/"):
        assert (await get(direct_app, path)).status_code == (await get(plain_app, path)).status_code
    transport = httpx.ASGITransport(app=direct_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.head("/items/abc")).status_code == 405
    assert direct_routed == ["/items/abc/more", "/items/", "/items/abc"]


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


def refusal(route: APIRoute, declared: list[BaseRoute] | None = None) -> str:
    with pytest.raises(TypeError, match="cannot be called directly") as refused:
        DirectRoutes(FastAPI(), routes=[route], declared=[route] if declared is None else declared)
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


@unfit.get("/number/{number}", response_model=Echo)
async def converted(number: int, principal: PrincipalDep, services: ServicesDep) -> Echo:
    raise AssertionError("never called")


@unfit.get("/slug/{slug}", response_model=Echo)
async def validated(
    slug: Annotated[str, Path(max_length=3)], principal: PrincipalDep, services: ServicesDep
) -> Echo:
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
    assert "convert or validate its path parameter number" in refusal(routes["/number/{number}"])
    assert "convert or validate its path parameter slug" in refusal(routes["/slug/{slug}"])
    # The ones the other tests serve are accepted.
    DirectRoutes(FastAPI(), routes=[declared("/hot")], declared=[declared("/hot")])
    DirectRoutes(FastAPI(), routes=[declared("/items/{item_id}")], declared=router.routes)


def test_a_route_fastapi_would_not_pick_for_its_requests_is_refused() -> None:
    items = declared("/items/{item_id}")
    app = FastAPI()

    @app.get("/items/special")
    async def special() -> dict[str, str]:
        return {}

    app.include_router(router)
    # FastAPI matches in order: /items/special, declared first, takes that request.
    assert "special (/items/special), declared before it" in refusal(items, app.routes)
    assert "the app does not serve it" in refusal(items, [])


async def test_a_route_included_under_a_prefix_is_served_at_its_prefixed_path() -> None:
    app, routed = build(direct=True, limit="100/minute", prefix="/v1")
    assert (await get(app, "/v1/items/abc")).json() == {"tenant_id": "tenant-1", "body": "abc"}
    assert (await get(app, "/items/abc")).status_code == 404
    assert routed == ["/items/abc"]


def test_a_mount_declared_before_it_is_taken_to_overlap() -> None:
    items = declared("/items/{item_id}")
    app = FastAPI()
    app.mount("/items", FastAPI())
    app.include_router(router)
    assert "declared before it, may take the same requests" in refusal(items, app.routes)


def test_what_an_inclusion_adds_is_checked_too() -> None:
    items = declared("/items/{item_id}")
    guarded = FastAPI()
    guarded.include_router(router, dependencies=[Depends(admin_only)])
    assert "dependencies besides" in refusal(items, guarded.routes)
    # A prefix with a parameter the endpoint does not take: FastAPI would refuse to call it.
    per_tenant = FastAPI()
    per_tenant.include_router(router, prefix="/{tenant}")
    assert "does not take exactly the parameters" in refusal(items, per_tenant.routes)


@unfit.get("/sparse/{item_id}", response_model=Echo, response_model_exclude_none=True)
async def sparse(item_id: str, principal: PrincipalDep, services: ServicesDep) -> Echo:
    raise AssertionError("never called")


def test_a_filtered_response_model_is_refused() -> None:
    route = next(
        r for r in unfit.routes if isinstance(r, APIRoute) and r.path == "/sparse/{item_id}"
    )
    assert "filter its response model" in refusal(route)


async def test_overrides_and_a_root_path_are_left_to_fastapi() -> None:
    app, routed = build(direct=True, limit="100/minute")
    app.dependency_overrides[admin_only] = admin_only
    assert (await get(app, "/items/abc")).status_code == 200
    assert routed == ["/items/abc"]
    app.dependency_overrides.clear()
    transport = httpx.ASGITransport(app=app, root_path="/base")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answer = await client.get("/base/items/abc", headers={"Authorization": f"Bearer {API_KEY}"})
    assert answer.json() == {"tenant_id": "tenant-1", "body": "abc"}
    assert routed == ["/items/abc", "/base/items/abc"]
    assert (await get(app, "/items/abc")).status_code == 200
    assert routed == ["/items/abc", "/base/items/abc"]  # served directly again


@pytest.mark.parametrize(
    ("template", "other", "overlap"),
    [
        ("/a/{x}", "/a/b", True),
        ("/a/{x}", "/c/b", False),
        ("/a/{x}", "/a/{y}/c", False),
        ("/a/b", "/a/b", True),
        ("/a/{x}", "/{rest:path}", True),
    ],
)
def test_which_templates_may_match_the_same_path(template: str, other: str, overlap: bool) -> None:
    assert may_match_the_same_path(template, other) is overlap
