"""Hot routes called directly, not through FastAPI's routing and dependency solving.

`POST /api/events/inbound` is the ingest path every connector calls, once per customer
message, and `GET /api/leads/{lead_id}` the live read every dashboard polls. Behind the two
middlewares of our own, FastAPI runs each request through five more layers (exception and
exit-stack middleware, the router matching ~60 routes, the request wrapper and the dependency
solver) before the endpoint runs. Measured with the API alone at 800 requests a second
(bench.ingest, 3 alternating runs): 0.66-0.69 ms of CPU per inbound request through FastAPI,
0.51-0.53 ms called directly (about 0.48 ms without our two middlewares; they stay, as they
count and limit every request).

The routes stay declared in FastAPI (the OpenAPI document and their contract come from it) and
this middleware calls those same endpoint functions, resolving the only parameters such an
endpoint may have: the request, plain string path parameters, the authenticated principal and
the services. It sits inside our metrics and body-limit middleware, so both still apply, and
inside Starlette's server-error middleware, so an unexpected exception is the same JSON 500 as
anywhere else. A route is served here only where FastAPI would pick it: one declared before it
that could match the same requests is refused at start. Requests are matched on the path as
the application sees it: behind a `root_path` they do not match and FastAPI serves them,
correctly but at its own cost.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, get_type_hints

from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from pydantic import BaseModel
from starlette.convertors import (
    FloatConvertor,
    IntegerConvertor,
    StringConvertor,
    UUIDConvertor,
)
from starlette.requests import Request
from starlette.routing import BaseRoute, Route, WebSocketRoute, compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import Services, authenticate, get_services
from api.errors import ApiError

DirectEndpoint = Callable[..., Awaitable[BaseModel]]
_RESOLVED = ("principal", "services")
_JSON_HEADERS = [(b"content-type", b"application/json")]


def direct_endpoint(route: RouteContext) -> DirectEndpoint:
    """The route's endpoint, if calling it directly is what FastAPI would do: a coroutine
    whose parameters are the path's plain string parameters, the request, `principal` and
    `services` (from `authenticate` and `get_services`, and no other dependency on the route,
    its router or where that was included), with nothing else FastAPI would read from the
    request, answering its own response model, as is, with the default response class.
    `route` is the route as the app serves it (prefix, inclusion's dependencies and response
    class). Checked once, at start, so a route that drifts from this fails loudly instead of
    being served differently."""
    function, template_path = route.endpoint, route.path
    if function is None or template_path is None or not isinstance(route.original_route, APIRoute):
        raise TypeError(f"{route.original_route!r} cannot be called directly: not an API route")
    dependant = route.dependant
    parameters = list(inspect.signature(function).parameters)
    path_parameters = [field.name for field in dependant.path_params]
    convertors = compile_path(template_path)[2]
    problems = []
    if not set(_RESOLVED) <= set(parameters) or set(parameters) - {
        "request",
        *_RESOLVED,
        *path_parameters,
    }:
        problems.append(
            f"its endpoint takes {parameters}, not its path parameters, the request, "
            "the principal and the services"
        )
    if set(convertors) != set(path_parameters):
        problems.append(f"its endpoint does not take exactly the parameters of {template_path}")
    if not inspect.iscoroutinefunction(function):
        problems.append("its endpoint is not a coroutine function")
    calls = [dependency.call for dependency in dependant.dependencies]
    if calls != [authenticate, get_services] or route.dependencies:
        problems.append("it has dependencies besides authenticate and get_services")
    if (
        dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
        or dependant.body_params
    ):
        problems.append("FastAPI would read parameters from the request for it")
    for field in dependant.path_params:
        info = field.field_info
        if (
            info.annotation is not str
            or info.metadata
            or field.alias != field.name
            or not isinstance(convertors.get(field.name), StringConvertor)
        ):
            problems.append(f"FastAPI would convert or validate its path parameter {field.name}")
    if not isinstance(route.response_class, DefaultPlaceholder):
        problems.append("it has its own response class")
    answer_type = get_type_hints(function).get("return")
    if route.response_model is None or answer_type is not route.response_model:
        problems.append("it does not return exactly its response model")
    if (
        route.response_model_include is not None
        or route.response_model_exclude is not None
        or not route.response_model_by_alias
        or route.response_model_exclude_unset
        or route.response_model_exclude_defaults
        or route.response_model_exclude_none
    ):
        problems.append("FastAPI would filter its response model")
    if problems:
        raise TypeError(f"{template_path} cannot be called directly: {'; '.join(problems)}")
    endpoint: DirectEndpoint = function
    return endpoint


# Convertors whose values never hold a "/": a parameter of theirs is one path segment.
_ONE_SEGMENT = (StringConvertor, IntegerConvertor, FloatConvertor, UUIDConvertor)


def may_match_the_same_path(template: str, other: str) -> bool:
    """Whether one request path could match both route templates; True when unsure (a
    parameter whose values may span segments)."""
    for convertors in (compile_path(template)[2], compile_path(other)[2]):
        if not all(isinstance(convertor, _ONE_SEGMENT) for convertor in convertors.values()):
            return True
    mine, theirs = template.split("/"), other.split("/")
    return len(mine) == len(theirs) and all(
        "{" in a or "{" in b or a == b for a, b in zip(mine, theirs, strict=True)
    )


@dataclass(frozen=True)
class _Direct:
    # The route as declared: FastAPI puts it in the scope too.
    route: BaseRoute
    endpoint: DirectEndpoint
    takes_request: bool
    status_code: int


def _serve_directly(
    routes: Iterable[APIRoute], declared: Sequence[BaseRoute]
) -> dict[str, list[tuple[str, _Direct]]]:
    """Per method, the routes to serve directly with their paths as the app serves them, in
    the app's order; refuses one that a route declared before it could take requests from
    (any route other than a plain one, such as a mount, counts as one that could)."""
    wanted = {id(route): route for route in routes}
    # (path, methods, name) of each earlier HTTP route; a path of None may take any request.
    earlier: list[tuple[str | None, set[str] | None, str]] = []
    served: dict[str, list[tuple[str, _Direct]]] = {}
    for context in iter_route_contexts(declared):
        original = context.original_route
        path, methods = context.path or "", context.methods
        if wanted.pop(id(original), None) is not None:
            endpoint = direct_endpoint(context)
            # HEAD is served without a body: FastAPI's business.
            direct_methods = set(methods or ()) - {"HEAD"}
            for other_path, other_methods, name in earlier:
                if (other_methods is None or other_methods & direct_methods) and (
                    other_path is None or may_match_the_same_path(path, other_path)
                ):
                    raise TypeError(
                        f"{path} cannot be called directly: {name} ({other_path}), declared "
                        "before it, may take the same requests"
                    )
            takes_request = "request" in inspect.signature(endpoint).parameters
            direct = _Direct(original, endpoint, takes_request, context.status_code or 200)
            for method in direct_methods:
                served.setdefault(method, []).append((path, direct))
        if isinstance(original, Route):
            earlier.append((path, set(methods) if methods is not None else None, original.name))
        elif not isinstance(original, WebSocketRoute):
            earlier.append((None, None, getattr(original, "name", None) or type(original).__name__))
    if wanted:
        missing = ", ".join(route.path for route in wanted.values())
        raise TypeError(f"{missing} cannot be called directly: the app does not serve it")
    return served


class DirectRoutes:
    """Serves the given routes by calling their endpoints; every other request goes on to the
    application. `declared` is the application's routes, for the paths they are served at
    and the order FastAPI matches them in."""

    def __init__(
        self, app: ASGIApp, routes: Iterable[APIRoute], declared: Sequence[BaseRoute]
    ) -> None:
        self.app = app
        self._static: dict[tuple[str, str], _Direct] = {}
        self._templated: dict[str, list[tuple[re.Pattern[str], _Direct]]] = {}
        for method, paths in _serve_directly(routes, declared).items():
            for path, direct in paths:
                if "{" in path:
                    pattern = compile_path(path)[0]
                    self._templated.setdefault(method, []).append((pattern, direct))
                else:
                    # A path without parameters is found by a dictionary lookup.
                    self._static[(method, path)] = direct

    def _match(self, method: str, path: str) -> tuple[_Direct, dict[str, str]] | None:
        direct = self._static.get((method, path))
        if direct is not None:
            return direct, {}
        for pattern, direct in self._templated.get(method, ()):
            if (matched := pattern.match(path)) is not None:
                return direct, matched.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Behind a root_path FastAPI matches the path less that prefix; and dependency
        # overrides (tests) are for FastAPI to apply: both left to it.
        if scope["type"] != "http" or scope.get("root_path") or scope["app"].dependency_overrides:
            await self.app(scope, receive, send)
            return
        found = self._match(scope["method"], scope["path"])
        if found is None:
            await self.app(scope, receive, send)
            return
        direct, path_params = found
        # The metrics middleware labels the request with the route's template.
        scope["route"] = direct.route
        scope["path_params"] = path_params
        request = Request(scope, receive)
        services: Services = scope["app"].state.services
        arguments: dict[str, Any] = dict(path_params)
        if direct.takes_request:
            arguments["request"] = request
        try:
            arguments["principal"] = await authenticate(request, services)
            arguments["services"] = services
            answer = await direct.endpoint(**arguments)
        except ApiError as exc:
            await exc.response()(scope, receive, send)
            return
        body = answer.model_dump_json(by_alias=True).encode()
        await send(
            {
                "type": "http.response.start",
                "status": direct.status_code,
                "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
