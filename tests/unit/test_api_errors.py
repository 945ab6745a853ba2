"""Every 503 says when to try again, without each route having to remember it."""

from __future__ import annotations

from api.errors import ApiError


def test_a_503_says_when_to_try_again_unless_its_route_said_so() -> None:
    # GET /api/leads, key lookups and the SLA reads answered 503 without it while PostgreSQL
    # was down, though the README promises it.
    assert ApiError(503, "database unreachable").response().headers["retry-after"] == "5"
    said = ApiError(503, "cancel not confirmed", headers={"Retry-After": "30"})
    assert said.response().headers["retry-after"] == "30"
    assert "retry-after" not in ApiError(404, "not found").response().headers
