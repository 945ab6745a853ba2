"""Hot routes called directly, not through FastAPI's routing and dependency solving.

`POST /api/events/inbound` is the ingest path every connector calls, once per customer
message. Behind the two middlewares of our own, FastAPI runs it through five more layers
(exception and exit-stack middleware, the router matching ~60 routes, the request wrapper
and the dependency solver) before the endpoint runs. Measured with the API alone at 800
requests a second (bench.ingest, 3 alternating runs): 0.66-0.69 ms of CPU per request through
FastAPI, 0.51-0.53 ms called directly (about 0.48 ms without our two middlewares; they stay,
as they count and limit every request).

The route stays declared in FastAPI (the OpenAPI document and its contract come from it) and
this middleware calls that same endpoint function, resolving the only dependencies such an
endpoint may have itself: the request, the authenticated principal and the services. It sits
inside our metrics and body-limit middleware, so both still apply, and inside Starlette's
server-error middleware, so an unexpected exception is the same JSON 500 as anywhere else.
Requests are matched on the path as the application sees it: behind a `root_path` they do not
match and FastAPI serves them, correctly but at its own cost.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import get_type_hints

from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import Services, authenticate, get_services
from api.errors import ApiError
from api.tenants import Principal

DirectEndpoint = Callable[[Request, Principal, Services], Awaitable[BaseModel]]
_DIRECT_PARAMETERS = ["request", "principal", "services"]
_JSON_HEADERS = [(b"content-type", b"application/json")]


def direct_endpoint(route: APIRoute) -> DirectEndpoint:
    """The route's endpoint, if calling it directly is what FastAPI would do: a coroutine
    taking exactly (request, principal, services), with no other dependency (on the route or
    its router) and no parameters FastAPI would read from the request, answering its own
    response model with the default response class. Checked once, at start, so a route that
    drifts from this fails loudly instead of being served differently."""
    dependant = route.dependant
    parameters = list(inspect.signature(route.endpoint).parameters)
    problems = []
    if parameters != _DIRECT_PARAMETERS:
        problems.append(f"its endpoint takes {parameters}, not {_DIRECT_PARAMETERS}")
    if not inspect.iscoroutinefunction(route.endpoint):
        problems.append("its endpoint is not a coroutine function")
    calls = [dependency.call for dependency in dependant.dependencies]
    if calls != [authenticate, get_services] or route.dependencies:
        problems.append("it has dependencies besides authenticate and get_services")
    if (
        dependant.path_params
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
        or dependant.body_params
    ):
        problems.append("FastAPI would read parameters from the request for it")
    if not isinstance(route.response_class, DefaultPlaceholder):
        problems.append("it has its own response class")
    answer_type = get_type_hints(route.endpoint).get("return")
    if route.response_model is None or answer_type is not route.response_model:
        problems.append("it does not return exactly its response model")
    if problems:
        raise TypeError(f"{route.path} cannot be called directly: {'; '.join(problems)}")
    endpoint: DirectEndpoint = route.endpoint
    return endpoint


class DirectRoutes:
    """Serves the given routes' (method, path) by calling their endpoints; every other request
    goes on to the application."""

    def __init__(self, app: ASGIApp, routes: list[APIRoute]) -> None:
        self.app = app
        self._routes: dict[tuple[str, str], tuple[APIRoute, DirectEndpoint]] = {}
        for route in routes:
            endpoint = direct_endpoint(route)
            for method in route.methods or ():
                self._routes[(method, route.path)] = (route, endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = self._routes.get((scope["method"], scope["path"]))
        if found is None:
            await self.app(scope, receive, send)
            return
        route, endpoint = found
        # The metrics middleware labels the request with the route's template.
        scope["route"] = route
        request = Request(scope, receive)
        services: Services = scope["app"].state.services
        try:
            principal = await authenticate(request, services)
            answer = await endpoint(request, principal, services)
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        body = answer.model_dump_json().encode()
        await send(
            {
                "type": "http.response.start",
                "status": route.status_code or 200,
                "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
