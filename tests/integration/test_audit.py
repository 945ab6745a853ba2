"""The append-only audit log, API key management and admin-only access."""

from __future__ import annotations

import uuid

import asyncpg
import httpx
import pytest

from connectors.gmail import Tokens
from connectors.gmail_store import GmailStore
from flexoraa.credits import credit_paid_order
from flexoraa.crypto import load_secret_box
from flexoraa.settings import Settings
from tests.conftest import MakeTenant, Tenant

pytestmark = pytest.mark.integration


async def actions(api: httpx.AsyncClient, tenant: Tenant) -> list[str]:
    response = await api.get("/api/audit-log", headers=tenant.headers)
    assert response.status_code == 200, response.text
    return [entry["action"] for entry in reversed(response.json()["entries"])]


async def test_keys_are_managed_by_admins_and_every_change_is_audited(
    api: httpx.AsyncClient, make_tenant: MakeTenant, test_settings: Settings,
    db: asyncpg.Connection,
) -> None:  # fmt: skip
    admin = await make_tenant()
    created = await api.post("/api/keys", headers=admin.headers, json={"role": "sdr"})
    assert created.status_code == 201
    member = Tenant(admin.tenant_id, created.json()["api_key"])
    assert (await api.get("/api/sdrs", headers=member.headers)).status_code == 200
    for forbidden in ("/api/keys", "/api/audit-log"):
        answer = await api.get(forbidden, headers=member.headers)
        assert answer.status_code == 403, forbidden
    listed = (await api.get("/api/keys", headers=admin.headers)).json()
    assert {k["role"] for k in listed} == {"admin", "sdr"}
    assert all("api_key" not in k and "key_hash" not in k for k in listed)

    channel = await api.post("/api/channels/whatsapp", headers=admin.headers, json={
        "phone_number_id": str(uuid.uuid4().int)[:15], "app_secret": "s", "verify_token": "v",
        "access_token": "EAAG-token"})  # fmt: skip
    assert channel.status_code == 201
    order_id = f"order_AUDIT{uuid.uuid4().hex[:8]}"
    await db.execute(
        "INSERT INTO payment_orders (order_id, tenant_id, receipt, pack, tokens, amount, currency)"
        " VALUES ($1, $2, $3, 'starter', 100, 5000, 'USD')",
        order_id, admin.tenant_id, f"tok_{uuid.uuid4().hex}",
    )  # fmt: skip
    async with db.transaction():
        await credit_paid_order(db, order_id, "pay_AUDIT0001")
    pool = await asyncpg.create_pool(test_settings.database_url, min_size=1, max_size=2)

    async def factory() -> asyncpg.Pool:
        return pool

    try:
        await GmailStore(factory, load_secret_box(test_settings)).connect(
            admin.tenant_id, "audit@acme.test", Tokens("ya29.a", "1//r", None), 42
        )
    finally:
        await pool.close()

    revoked = await api.delete(f"/api/keys/{created.json()['key_id']}", headers=admin.headers)
    assert revoked.status_code == 204
    assert (await api.get("/api/sdrs", headers=member.headers)).status_code == 401
    again = await api.delete(f"/api/keys/{created.json()['key_id']}", headers=admin.headers)
    assert again.status_code == 404

    assert await actions(api, admin) == [
        "tenant.created", "api_key.created", "api_key.created", "channel.registered",
        "payment.credited", "integration.connected", "api_key.revoked",
    ]  # fmt: skip
    entries = (await api.get("/api/audit-log", headers=admin.headers)).json()["entries"]
    payment = next(e for e in entries if e["action"] == "payment.credited")
    assert payment["details"] == {"order_id": order_id, "tokens": 100}
    other = await make_tenant("Other")
    assert "payment.credited" not in await actions(api, other)


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET action = 'nothing'", "DELETE FROM audit_log", "TRUNCATE audit_log"],
)
async def test_the_application_role_cannot_change_the_audit_log(
    make_tenant: MakeTenant, db: asyncpg.Connection, statement: str
) -> None:
    await make_tenant()  # at least one entry
    before = await db.fetchval("SELECT count(*) FROM audit_log")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute(statement)
    assert await db.fetchval("SELECT count(*) FROM audit_log") == before
