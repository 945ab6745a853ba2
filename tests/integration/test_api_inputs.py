"""Inputs the API must refuse with a 4xx (never a 500, never a 2xx it cannot keep), paging
that neither skips nor repeats, and keys that stop at once."""

from __future__ import annotations

import base64
import json
import re

import httpx
import pytest

from tests.conftest import MakeTenant
from tests.integration.conftest import ApiFactory

pytestmark = pytest.mark.integration


def crafted_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode()


async def test_a_nul_anywhere_in_a_request_is_refused_before_it_reaches_a_table(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    # PostgreSQL's text refuses NUL: an inbound message with one got a 202, and its row
    # (and the lead's) could never be written; elsewhere a 500.
    tenant = await make_tenant()
    message = {"channel": "webchat", "contact": "v1", "text": "hi\u0000there"}
    inbound = await api.post("/api/events/inbound", headers=tenant.headers, json=message)
    assert inbound.status_code == 422, inbound.text
    assert "text: Value error, must not contain NUL" in inbound.json()["detail"]
    sdr = await api.post("/api/sdrs", headers=tenant.headers,
                         json={"name": "N\u0000", "email": "n@example.com"})  # fmt: skip
    assert sdr.status_code == 422, sdr.text
    channel = await api.post("/api/channels/whatsapp", headers=tenant.headers, json={
        "phone_number_id": "5550001", "waba_id": "w\u0000", "display_phone_number": "1",
        "app_secret": "s", "verify_token": "v", "access_token": "a"})  # fmt: skip
    assert channel.status_code == 422, channel.text
    for path in ("/api/dead-letters?kind=a%00b", "/api/leads/a%00b", "/api/leads?cursor=%00"):
        response = await api.get(path, headers=tenant.headers)
        assert response.status_code == 400, (path, response.text)
    nul_cursor = crafted_cursor("2026-01-01T00:00:00+00:00", "order\u0000")
    history = await api.get("/api/tokens/payment-history", headers=tenant.headers,
                            params={"cursor": nul_cursor})  # fmt: skip
    assert history.status_code == 400, history.text


@pytest.mark.parametrize(
    "path",
    [
        "/api/tokens/usage?to=0001-01-05T00:00:00Z",
        "/api/monitoring/leakage/stats?to=0001-01-02T00:00:00Z",
        "/api/monitoring/recovery/stats?to=0001-01-02T00:00:00",
        "/api/audit-log?before=9999-12-31T23:00:00-05:00",
        "/api/tokens/payment-history?before=0001-01-01T00:00:00%2B05:00",
        "/api/dead-letters?since=9999-12-31T23:00:00-05:00",
        "/api/leads?cursor=" + crafted_cursor(
            "9999-12-31T23:00:00-05:00", "00000000-0000-4000-8000-000000000000"),
        "/api/audit-log?cursor=" + crafted_cursor("2026-01-01T00:00:00+00:00", str(2**70)),
    ],
)  # fmt: skip
async def test_times_and_cursors_out_of_range_are_refused_not_a_500(
    api: httpx.AsyncClient, make_tenant: MakeTenant, path: str
) -> None:
    # Year 1 less a week, or year 9999 in a zone west of UTC, overflowed converting: a 500.
    tenant = await make_tenant()
    response = await api.get(path, headers=tenant.headers)
    assert response.status_code in (400, 422), (path, response.status_code, response.text)


async def test_an_infinite_number_or_a_contact_longer_lowered_is_refused_not_a_500(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    # 1e309 reads as infinity, which the audit entry's jsonb refused; 300 "İ" lowered are 600
    # characters, past what an event carries.
    tenant = await make_tenant()
    infinite = await api.put(
        "/api/tenant/settings", headers={**tenant.headers, "Content-Type": "application/json"},
        content=b'{"qualification_budget_threshold": 1e309}',
    )  # fmt: skip
    assert infinite.status_code == 422, infinite.text
    message = {"channel": "email", "contact": "İ" * 300 + "@x.io", "text": "hi"}
    lowered = await api.post("/api/events/inbound", headers=tenant.headers, json=message)
    assert lowered.status_code == 422, lowered.text


async def test_the_audit_log_pages_through_entries_of_one_instant(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    # A new tenant's first entries are written in one transaction, so at one time: paging by
    # time alone skipped the rest of them past a page's end.
    tenant = await make_tenant()
    for role in ("sdr", "connector"):
        await api.post("/api/keys", headers=tenant.headers, json={"role": role})
    whole = (await api.get("/api/audit-log", headers=tenant.headers)).json()["entries"]
    assert len(whole) >= 4
    paged: list[int] = []
    cursor = None
    while True:
        params = {"limit": "1"} | ({"cursor": cursor} if cursor else {})
        page = (await api.get("/api/audit-log", headers=tenant.headers, params=params)).json()
        paged += [entry["audit_id"] for entry in page["entries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert paged == [entry["audit_id"] for entry in whole]


async def test_a_key_revoked_by_any_spelling_of_its_id_stops_at_once(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    key = (await api.post("/api/keys", headers=tenant.headers, json={"role": "sdr"})).json()
    headers = {"Authorization": f"Bearer {key['api_key']}"}
    assert (await api.get("/api/leads", headers=headers)).status_code == 200  # now cached
    revoked = await api.delete(f"/api/keys/{{{key['key_id'].upper()}}}", headers=tenant.headers)
    assert revoked.status_code == 204
    assert (await api.get("/api/leads", headers=headers)).status_code == 401


async def test_an_sdr_given_anothers_email_is_a_conflict(
    api: httpx.AsyncClient, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    first, second = [
        (await api.post("/api/sdrs", headers=tenant.headers,
                        json={"name": name, "email": f"{name}@example.com"})).json()
        for name in ("ana", "bo")
    ]  # fmt: skip
    clash = await api.put(f"/api/sdrs/{second['sdr_id']}", headers=tenant.headers,
                          json={"name": "bo", "email": first["email"]})  # fmt: skip
    assert clash.status_code == 409, clash.text


async def test_an_unreachable_worker_is_a_503_that_does_not_name_it(
    api_factory: ApiFactory, make_tenant: MakeTenant
) -> None:
    tenant = await make_tenant()
    async with api_factory(worker_url="http://127.0.0.1:9") as api:
        balance = await api.get("/api/tokens/balance", headers=tenant.headers)
    assert balance.status_code == 503
    assert not re.search(r"127\.0\.0\.1|:9\b", balance.text), balance.text
