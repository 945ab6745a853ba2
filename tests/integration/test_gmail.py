"""Gmail through `google-api-python-client` against a local server speaking the Gmail API and
Google's token endpoint; real PostgreSQL and Kafka."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email import message_from_bytes, policy
from typing import Any
from urllib.parse import parse_qs, urlparse

import asyncpg
import pytest
from pydantic import SecretStr

from connectors import gmail_poller
from connectors.gmail import Mailbox, MailboxRevoked, OAuthFlow, Tokens
from connectors.gmail_mime import ParsedMail, compose, parse_message
from connectors.gmail_poller import GmailPoller
from connectors.gmail_send import EmailSender
from connectors.gmail_store import GmailStore
from connectors.tenants import TenantSettings
from flexoraa.crypto import load_secret_box
from flexoraa.kafka import EventPublisher
from flexoraa.settings import Settings
from schemas.events import InboundMessage
from schemas.messaging import LeadEvent, OutboundMessage
from schemas.notifications import Notification
from schemas.topics import TopicNames
from streams.rules.identity import lead_id_for
from tests.conftest import MakeTenant, ManagedProcess, StartProcess, free_port, start_worker
from tests.fakes.gmail_api import GmailFake
from tests.integration.conftest import ApiFactory, read_topic
from tests.integration.test_pipeline import eventually
from tests.unit.test_gmail_mime import ALTERNATIVE, BASE64_WITH_ATTACHMENT, LATIN1_QP

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def gmail() -> AsyncIterator[GmailFake]:
    fake = GmailFake()
    await fake.start(free_port())
    yield fake
    await fake.stop()


@pytest.fixture
def gmail_settings(test_settings: Settings, gmail: GmailFake) -> Settings:
    return test_settings.model_copy(
        update={
            "gmail_client_id": "123-fake.apps.googleusercontent.com",
            "gmail_client_secret": SecretStr("GOCSPX-fake"),
            "gmail_token_url": f"{gmail.url}/token",
            "gmail_api_url": f"{gmail.url}/",
            "gmail_auth_url": f"{gmail.url}/o/oauth2/v2/auth",
            "gmail_redirect_uri": "https://app.example.com/api/integrations/gmail/callback",
            "gmail_poll_interval_s": 1.0,
            # Every due mailbox in one pass: the module's earlier tests leave theirs due, and a
            # test's own mailbox must not wait behind 8 of them.
            "gmail_poll_concurrency": 64,
        }
    )


@pytest.fixture
async def store(gmail_settings: Settings) -> AsyncIterator[GmailStore]:
    pool = await asyncpg.create_pool(gmail_settings.database_url, min_size=1, max_size=8)

    async def factory() -> asyncpg.Pool:
        return pool

    yield GmailStore(factory, load_secret_box(gmail_settings))
    await pool.close()


@pytest.fixture
async def publisher(gmail_settings: Settings) -> AsyncIterator[EventPublisher]:
    publisher = EventPublisher(gmail_settings)
    yield publisher
    await publisher.close()


def mail(sender: str, subject: str, body: str, message_id: str | None = None) -> bytes:
    message_id = message_id or f"<{uuid.uuid4().hex}@mail.example.com>"
    return (f"From: {sender}\nTo: sales@acme.test\nSubject: {subject}\nMessage-ID: {message_id}\n"
            f"Content-Type: text/plain; charset=utf-8\n\n{body}\n").encode()  # fmt: skip


def rep_mail(mailbox: str, to: str, body: str, cc: str = "", message_id: str = "") -> bytes:
    """Mail a rep wrote in Gmail itself (its web client's Message-ID), as SENT holds it."""
    message_id = message_id or f"<CAF{uuid.uuid4().hex}@mail.gmail.com>"
    cc_header = f"Cc: {cc}\n" if cc else ""
    return (f"From: Sales <{mailbox}>\nTo: {to}\n{cc_header}Subject: Re: Pricing\n"
            f"Message-ID: {message_id}\nContent-Type: text/plain; charset=utf-8\n\n{body}\n"
            ).encode()  # fmt: skip


async def outbound_events(settings: Settings, lead_id: str) -> list[OutboundMessage]:
    records = await read_topic(settings, [TopicNames(settings.topic_prefix).outbound_messages])
    events = [OutboundMessage.model_validate_json(value) for _, _, value in records]
    return [e for e in events if e.lead_id == lead_id]


async def connected(
    gmail: GmailFake, store: GmailStore, tenant_id: str, email: str | None = None
) -> tuple[str, str]:
    """A mailbox connected as the callback would: (mailbox address, integration id)."""
    email = email or f"sales-{uuid.uuid4().hex[:6]}@acme.test"
    mailbox = gmail.add_mailbox(email)
    token, refresh = gmail.grant(email)
    integration_id = await store.connect(
        tenant_id, email, Tokens(token, refresh, None), mailbox.history_id
    )
    return email, integration_id


async def inbound_events(settings: Settings, tenant_id: str) -> list[InboundMessage]:
    records = await read_topic(settings, [TopicNames(settings.topic_prefix).inbound_messages])
    events = [InboundMessage.model_validate_json(value) for _, _, value in records]
    return [e for e in events if e.tenant_id == tenant_id and e.channel == "email"]


async def due_now(db: asyncpg.Connection, integration_id: str) -> None:
    await db.execute("UPDATE gmail_poll_state SET next_poll_at = now() WHERE integration_id = $1",
                     uuid.UUID(integration_id))  # fmt: skip


async def test_the_oauth_flow_connects_a_mailbox_and_a_state_works_once(
    api_factory: ApiFactory,
    gmail: GmailFake,
    gmail_settings: Settings,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant()
    overrides = {k: getattr(gmail_settings, k) for k in (
        "gmail_client_id", "gmail_client_secret", "gmail_token_url", "gmail_api_url",
        "gmail_auth_url", "gmail_redirect_uri")}  # fmt: skip
    async with api_factory() as unconfigured:
        answer = await unconfigured.get("/api/integrations/gmail/auth-url", headers=tenant.headers)
        assert answer.status_code == 503
    async with api_factory(**overrides) as api:
        consent = (await api.get("/api/integrations/gmail/auth-url", headers=tenant.headers)).json()
        query = {k: v[0] for k, v in parse_qs(urlparse(consent["url"]).query).items()}
        assert query["access_type"] == "offline"
        assert query["prompt"] == "consent"
        assert set(query["scope"].split()) == {
            "https://www.googleapis.com/auth/gmail.readonly",
            "https://www.googleapis.com/auth/gmail.send",
        }
        assert query["redirect_uri"] == gmail_settings.gmail_redirect_uri
        assert query["state"] == consent["state"]

        email = f"owner-{uuid.uuid4().hex[:6]}@acme.test"
        gmail.add_mailbox(email)
        callback, connect = "/api/integrations/gmail/callback", "/api/integrations/gmail/connect"
        forged = await api.get(callback, params={"code": gmail.issue_code(email), "state": "x"})
        assert forged.status_code == 400
        code = gmail.issue_code(email)
        # Google's redirect connects nothing: whoever's browser consented gets the code back.
        handed = await api.get(callback, params={"code": code, "state": consent["state"]})
        assert handed.status_code == 200, handed.text
        assert (handed.json()["status"], handed.json()["code"]) == ("consented", code)
        assert "/api/integrations/gmail/connect" in handed.json()["next"]
        assert await db.fetchval("SELECT count(*) FROM integration_credentials"
                                 " WHERE account = $1", email) == 0  # fmt: skip
        body = {"code": code, "state": consent["state"]}
        # Another tenant's admin cannot finish this tenant's consent (nor use its state up).
        other = await make_tenant("Phisher")
        stolen = await api.post(connect, headers=other.headers, json=body)
        assert stolen.status_code == 400
        # Google's token endpoint down (an HTML error page): a 502, and the same request
        # works once it is back (the state was not used up).
        gmail.token_outages = 1
        down = await api.post(connect, headers=tenant.headers, json=body)
        assert down.status_code == 502, down.text
        done = await api.post(connect, headers=tenant.headers, json=body)
        assert done.status_code == 200, done.text
        assert done.json()["account"] == email
        exchange = gmail.token_requests[-1]
        assert exchange["grant_type"] == "authorization_code"
        assert exchange["redirect_uri"] == gmail_settings.gmail_redirect_uri
        again = {"code": gmail.issue_code(email), "state": consent["state"]}
        reused = await api.post(connect, headers=tenant.headers, json=again)
        assert reused.status_code == 400
        assert (await api.get(callback, params=body)).status_code == 400

        expired = (await api.get("/api/integrations/gmail/auth-url", headers=tenant.headers)).json()
        await db.execute("UPDATE oauth_states SET expires_at = now() - interval '1 second'"
                         " WHERE state = $1", expired["state"])  # fmt: skip
        too_late = {"code": gmail.issue_code(email), "state": expired["state"]}
        late = await api.post(connect, headers=tenant.headers, json=too_late)
        assert late.status_code == 400

        row = await db.fetchrow(
            "SELECT c.encrypted_secret, p.history_id FROM integration_credentials c"
            " JOIN gmail_poll_state p USING (integration_id) WHERE c.account = $1", email
        )  # fmt: skip
        assert row is not None
        assert row["history_id"] == gmail.mailboxes[email].history_id
        assert gmail.mailboxes[email].refresh_token.encode() not in row["encrypted_secret"]
        status = (await api.get("/api/integrations/status", headers=tenant.headers)).json()
        (integration,) = status["integrations"]
        assert integration["account"] == email
        assert integration["connected"] is True
        assert integration["last_successful_poll"] is None


async def test_incremental_sync_follows_pages_and_skips_what_the_mailbox_sent(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant()
    email, integration_id = await connected(gmail, store, tenant.tenant_id)
    raws = [ALTERNATIVE, LATIN1_QP, BASE64_WITH_ATTACHMENT, mail("ana@example.com", "Hi", "1st"),
            mail("ana@example.com", "Re: Hi", "2nd")]  # fmt: skip
    ids = [gmail.deliver(email, raw) for raw in raws]
    gmail.deliver(email, mail(email, "Re: Hello", "our own reply"), labels=("SENT",))
    gmail.deliver(email, mail("spam@example.com", "Win", "spam"), labels=("SPAM",))
    poller = GmailPoller(gmail_settings, store, publisher)
    await poller.poll_due()  # (mailboxes of earlier tests are due as well)
    events = await inbound_events(gmail_settings, tenant.tenant_id)
    assert sorted(e.channel_message_id or "" for e in events) == sorted(ids)  # 3 pages of 2
    by_id = {e.channel_message_id: e for e in events}
    ravi = by_id[ids[0]]
    assert ravi.contact == "ravi@example.com"
    assert ravi.contact_name == "Ravi Kumar"
    assert ravi.text.startswith("Hi, we need a CRM for 20 seats")
    assert by_id[ids[1]].text == "Necesitamos información para el próximo año."
    assert "[attachments: specs.pdf]" in by_id[ids[2]].text
    assert by_id[ids[3]].lead_id == by_id[ids[4]].lead_id  # one lead per sender
    state = await db.fetchrow("SELECT history_id, last_success_at, lease_owner FROM"
                              " gmail_poll_state WHERE integration_id = $1",
                              uuid.UUID(integration_id))  # fmt: skip
    assert state is not None
    assert state["history_id"] == gmail.mailboxes[email].history_id
    assert state["last_success_at"] is not None
    assert state["lease_owner"] is None
    # When due again, nothing new is ingested.
    await due_now(db, integration_id)
    await poller.poll_due()
    polled_again = await db.fetchval(
        "SELECT last_success_at FROM gmail_poll_state WHERE integration_id = $1",
        uuid.UUID(integration_id),
    )
    assert polled_again > state["last_success_at"]
    assert len(await inbound_events(gmail_settings, tenant.tenant_id)) == len(ids)


async def test_a_too_old_history_id_triggers_a_bounded_full_resync_without_duplicates(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant()
    email, integration_id = await connected(gmail, store, tenant.tenant_id)
    first = [gmail.deliver(email, mail("bo@example.com", f"m{i}", f"body {i}")) for i in range(3)]
    poller = GmailPoller(gmail_settings, store, publisher)
    await poller.poll_due()
    later = [gmail.deliver(email, mail("cy@example.com", f"n{i}", f"later {i}")) for i in range(2)]
    # Gmail forgot the history we know: 404, then the full listing (which includes `first`).
    gmail.mailboxes[email].oldest_history_id = gmail.mailboxes[email].history_id
    await due_now(db, integration_id)
    await poller.poll_due()
    events = await inbound_events(gmail_settings, tenant.tenant_id)
    ids = Counter(e.event_id for e in events)
    assert sorted({e.channel_message_id or "" for e in events}) == sorted(first + later)
    # Resync re-published `first` with the same event ids: downstream they are one event each.
    assert len(ids) == len(first) + len(later)
    # Oldest first, as history.list gives them (Gmail lists the newest first); one lead's
    # events share a partition, so their order is the order they were published in.
    resynced = [e.channel_message_id for e in events if e.contact == "bo@example.com"]
    assert resynced[-3:] == first
    state = await db.fetchval("SELECT history_id FROM gmail_poll_state WHERE integration_id = $1",
                              uuid.UUID(integration_id))  # fmt: skip
    assert state == gmail.mailboxes[email].history_id


async def test_a_reps_reply_written_in_gmail_is_the_leads_outbound_message(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    # Read in the same pass as the lead's first mail (a resync, so the sent mail comes from
    # the full listing): the lead is not in PostgreSQL yet, the pass knows it.
    tenant = await make_tenant()
    email, integration_id = await connected(gmail, store, tenant.tenant_id)
    gmail.mailboxes[email].oldest_history_id = gmail.mailboxes[email].history_id + 1
    gmail.deliver(email, mail("dee@example.com", "Pricing", "How much for 5 seats?"))
    quoted = "About 1,000 USD a month.\n\nOn Mon, 1 Dec 2026, Dee wrote:\n> How much?"
    reply = gmail.deliver(email, rep_mail(email, "Dee <dee@example.com>", quoted,
                                          cc="boss@acme.test"), labels=("SENT",))  # fmt: skip
    # Not a lead: a supplier, and a draft to the lead (not sent). And what the pipeline sent
    # itself (its own Message-ID): it recorded that one when it sent it.
    gmail.deliver(email, rep_mail(email, "vendor@example.com", "Invoice?"), labels=("SENT",))
    gmail.deliver(email, rep_mail(email, "dee@example.com", "draft"), labels=("DRAFT",))
    ours, _ = compose(sender=email, to="dee@example.com", subject="Re: Pricing", body="AI")
    gmail.deliver(email, base64.urlsafe_b64decode(ours + "=="), labels=("SENT",))
    away = rep_mail(email, "dee@example.com", "I am away until Monday.")
    gmail.deliver(email, away.replace(b"Subject:", b"Auto-Submitted: auto-replied\nSubject:"),
                  labels=("SENT",))  # the mailbox's vacation responder  # fmt: skip
    await GmailPoller(gmail_settings, store, publisher).poll_due()
    lead_id = lead_id_for(tenant.tenant_id, "email", "dee@example.com")
    (recorded,) = await outbound_events(gmail_settings, lead_id)
    assert (recorded.status, recorded.sent_by, recorded.channel) == ("accepted", "sdr", "email")
    assert recorded.channel_message_id == reply
    assert recorded.text == "About 1,000 USD a month."  # its quote of the lead left out
    assert not await outbound_events(
        gmail_settings, lead_id_for(tenant.tenant_id, "email", "vendor@example.com")
    )
    # Read again (the cursor lost, say): the same event, one message downstream.
    gmail.mailboxes[email].oldest_history_id = gmail.mailboxes[email].history_id + 1
    await due_now(db, integration_id)
    await GmailPoller(gmail_settings, store, publisher).poll_due()
    again = await outbound_events(gmail_settings, lead_id)
    assert {e.event_id for e in again} == {recorded.event_id}
    # A lead whose mail an earlier poll read, before the sink stored it (no worker here):
    # known by its thread.
    gmail.deliver(email, mail("hal@example.com", "Demo", "Can we see a demo?"))
    await due_now(db, integration_id)
    await GmailPoller(gmail_settings, store, publisher).poll_due()
    hal = lead_id_for(tenant.tenant_id, "email", "hal@example.com")
    assert await db.fetchval("SELECT 1 FROM leads WHERE lead_id = $1", uuid.UUID(hal)) is None
    gmail.deliver(email, rep_mail(email, "hal@example.com", "Tuesday?"), labels=("SENT",))
    await due_now(db, integration_id)
    await GmailPoller(gmail_settings, store, publisher).poll_due()
    assert [e.text for e in await outbound_events(gmail_settings, hal)] == ["Tuesday?"]


async def test_a_form_notice_sent_through_the_mailboxs_own_account_is_the_visitors_mail(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
) -> None:
    """A site's form plugin mailing through the business's Gmail account: From and To the
    mailbox, the visitor in Reply-To, labelled SENT and INBOX. It was skipped as the mailbox's
    own mail, and the lead was lost."""
    tenant = await make_tenant()
    email, _ = await connected(gmail, store, tenant.tenant_id)

    def notice(reply_to: str, to: str = "", extra: str = "") -> bytes:
        headers = (f"From: Acme <{email}>\nTo: {to or email}\nReply-To: {reply_to}\n{extra}"
                   f"Subject: New enquiry from the website\n"
                   f"Message-ID: <{uuid.uuid4().hex}@acme.test>\n")  # fmt: skip
        return f"{headers}Content-Type: text/plain; charset=utf-8\n\nWe need 20 seats.\n".encode()

    form = gmail.deliver(email, notice("Vera Visitor <Vera@Example.com>"),
                         labels=("SENT", "INBOX", "UNREAD"))  # fmt: skip
    # Not a visitor's: a rep's mail to a colleague with a Reply-To, a note to itself without
    # one, the mailbox's auto-answer to itself, and a stranger's mail claiming to be From the
    # mailbox (not SENT: anyone can write that From).
    gmail.deliver(email, notice("vera@example.com", to="boss@acme.test"), labels=("SENT",))
    gmail.deliver(email, rep_mail(email, email, "note to self"), labels=("SENT", "INBOX"))
    gmail.deliver(email, notice("vera@example.com", extra="Auto-Submitted: auto-replied\n"),
                  labels=("SENT", "INBOX"))  # fmt: skip
    gmail.deliver(email, notice("mallory@example.com"), labels=("INBOX",))
    # A note a rep wrote in Gmail to the mailbox, the account set to answer to a colleague's
    # address (Gmail's "reply-to address"), or to anyone (its clients' Message-ID).
    note = rep_mail(email, email, "call the bank").replace(
        b"Subject:", b"Reply-To: x@acme.test\nSubject:"
    )
    gmail.deliver(email, note, labels=("SENT", "INBOX"))
    note = rep_mail(email, email, "call the bank").replace(
        b"Subject:", b"Reply-To: me@example.com\nSubject:"
    )
    gmail.deliver(email, note, labels=("SENT", "INBOX"))
    await GmailPoller(gmail_settings, store, publisher).poll_due()
    (event,) = await inbound_events(gmail_settings, tenant.tenant_id)
    assert (event.contact, event.contact_name, event.channel_message_id) == (
        "vera@example.com", "Vera Visitor", form,
    )  # fmt: skip
    assert event.text == "We need 20 seats."
    assert event.lead_id == lead_id_for(tenant.tenant_id, "email", "vera@example.com")
    # Nor is it a rep's reply to the visitor.
    assert not await outbound_events(gmail_settings, event.lead_id)


async def test_a_form_notice_sent_through_a_forms_mailbox_is_the_visitors_mail(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
) -> None:
    # A mailbox named like a form's address (forms@): its notices' sender was already taken
    # from Reply-To, and the check for mail From the mailbox missed them.
    tenant = await make_tenant()
    email, _ = await connected(
        gmail, store, tenant.tenant_id, f"forms-{uuid.uuid4().hex[:6]}@acme.test"
    )
    headers = f"From: {email}\nTo: {email}\nReply-To: Ola <ola@example.com>\nSubject: Enquiry\n"
    raw = f"{headers}Message-ID: <{uuid.uuid4().hex}@acme.test>\n\nA quote for 5 seats.\n"
    gmail.deliver(email, raw.encode(), labels=("SENT", "INBOX"))
    await GmailPoller(gmail_settings, store, publisher).poll_due()
    (event,) = await inbound_events(gmail_settings, tenant.tenant_id)
    assert (event.contact, event.contact_name) == ("ola@example.com", "Ola")


async def test_the_workers_know_whether_a_tenants_e_mail_leads_can_be_written_to(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    make_tenant: MakeTenant,
) -> None:
    # Recovery and re-engagement of e-mail leads ask this before they send and charge.
    tenant = await make_tenant()
    pool = await asyncpg.create_pool(gmail_settings.database_url, min_size=1, max_size=2)
    try:

        async def factory() -> asyncpg.Pool:
            return pool

        tenants = TenantSettings(factory, 1800, ttl_s=0)
        assert await tenants.mailbox_connected(tenant.tenant_id) is False
        _, integration_id = await connected(gmail, store, tenant.tenant_id)
        assert await tenants.mailbox_connected(tenant.tenant_id) is True
        row = await store.mailbox(tenant.tenant_id, integration_id)
        assert row is not None
        await store.disconnect(row, "nobody", "invalid_grant")
        assert await tenants.mailbox_connected(tenant.tenant_id) is False
        assert (await tenants.profile(tenant.tenant_id)).leak_threshold_s > 0
    finally:
        await pool.close()


async def test_an_expired_access_token_is_refreshed_and_stored(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
) -> None:
    tenant = await make_tenant()
    email, _ = await connected(gmail, store, tenant.tenant_id)
    gmail.expire_access_tokens(email)
    message_id = gmail.deliver(email, mail("di@example.com", "Hi", "after expiry"))
    await GmailPoller(gmail_settings, store, publisher).poll_due()
    events = await inbound_events(gmail_settings, tenant.tenant_id)
    assert [e.channel_message_id for e in events] == [message_id]
    assert gmail.token_requests[-1]["grant_type"] == "refresh_token"
    saved = await store.mailbox(tenant.tenant_id)
    assert saved is not None
    assert gmail.access_tokens.get(saved.tokens.access_token) == email  # the refreshed one


async def test_a_revoked_refresh_token_disconnects_and_notifies_the_admins(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant()
    email, integration_id = await connected(gmail, store, tenant.tenant_id)
    gmail.expire_access_tokens(email)
    gmail.mailboxes[email].revoked = True
    poller = GmailPoller(gmail_settings, store, publisher)
    await poller.poll_due()
    status = await db.fetchval("SELECT status FROM integration_credentials"
                               " WHERE integration_id = $1", uuid.UUID(integration_id))  # fmt: skip
    assert status == "disconnected"
    records = await read_topic(
        gmail_settings, [TopicNames(gmail_settings.topic_prefix).notifications], tenant.tenant_id
    )
    notices = [Notification.model_validate_json(v) for _, _, v in records]
    assert [n.category for n in notices] == ["integration_disconnected"]
    assert notices[0].audience == "admins"
    await due_now(db, integration_id)
    claimed = await store.claim_due("someone", 60, 1000)
    assert integration_id not in {m.integration_id for m in claimed}  # no longer polled

    # Connected again, then revoked again: the admins hear of it again (the notice's id was
    # the mailbox's and the reason's alone, and the second one was dropped as a duplicate).
    token, refresh = gmail.grant(email)
    mailbox = gmail.mailboxes[email]
    mailbox.revoked = False
    assert await store.connect(tenant.tenant_id, email, Tokens(token, refresh, None),
                               mailbox.history_id) == integration_id  # fmt: skip
    gmail.expire_access_tokens(email)
    mailbox.revoked = True
    await poller.poll_due()
    records = await read_topic(
        gmail_settings, [TopicNames(gmail_settings.topic_prefix).notifications], tenant.tenant_id
    )
    again = [Notification.model_validate_json(v) for _, _, v in records]
    assert len({n.event_id for n in again}) == 2


async def test_a_crash_before_the_cursor_moves_re_polls_without_ingesting_twice(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant()
    email, integration_id = await connected(gmail, store, tenant.tenant_id)
    ids = [gmail.deliver(email, mail("ed@example.com", f"s{i}", f"b{i}")) for i in range(3)]

    class Crashed(BaseException):
        """The process killed: no error a poller handles."""

    crashing = GmailStore.__new__(GmailStore)
    crashing.__dict__.update(store.__dict__)

    async def crash(*_: Any, **__: Any) -> bool:
        raise Crashed("killed after Kafka acknowledged, before the cursor moved")

    crashing.advance = crash  # type: ignore[method-assign]
    with pytest.raises(Crashed):
        await GmailPoller(gmail_settings, crashing, publisher).poll_due()
    # The dead poller's lease expires; another poller takes the mailbox over.
    await db.execute("UPDATE gmail_poll_state SET lease_expires_at = now() - interval '1 second'"
                     " WHERE integration_id = $1", uuid.UUID(integration_id))  # fmt: skip
    await GmailPoller(gmail_settings, store, publisher).poll_due()
    events = await inbound_events(gmail_settings, tenant.tenant_id)
    assert len(events) == 2 * len(ids)  # published twice …
    assert len({e.event_id for e in events}) == len(ids)  # … as the same three events
    assert {e.channel_message_id for e in events} == set(ids)


async def test_a_deleted_message_hostile_headers_or_a_parser_failure_do_not_hold_the_mailbox(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each failed the mailbox's every poll (a 404 on the deleted message) or stopped the poller
    # for every tenant (an IndexError for `Message-ID: <`), its cursor held for good.
    tenant = await make_tenant()
    email, integration_id = await connected(gmail, store, tenant.tenant_id)
    deleted = gmail.deliver(email, mail("bo@example.com", "Hi", "then deleted"))
    hostile = gmail.deliver(email, mail("cy@example.com", "Quote", "20 seats", message_id="<"))
    breaking = gmail.deliver(email, mail("di@example.com", "Hi", "the parser fails on me"))
    # An event cannot carry it (320 characters at most): it failed every poll of the mailbox.
    endless = gmail.deliver(email, mail("x" * 400 + "@spam.example.com", "Win", "now"))
    # An auto-reply is no lead: answered, it answers back.
    away = gmail.deliver(email, b"From: fay@example.com\nAuto-Submitted: auto-replied\n"
                                b"Subject: Out of office\n\nBack Monday.\n")  # fmt: skip
    good = gmail.deliver(email, mail("ed@example.com", "Hello", "after them"))
    gmail.delete(email, deleted)  # between history.list and messages.get

    def failing_on_one(raw: bytes) -> ParsedMail:
        if b"the parser fails on me" in raw:
            raise RecursionError("a parser bug hostile mail finds")
        return parse_message(raw)

    monkeypatch.setattr(gmail_poller, "parse_message", failing_on_one)
    await GmailPoller(gmail_settings, store, publisher).poll_due()
    events = await inbound_events(gmail_settings, tenant.tenant_id)
    assert sorted(e.channel_message_id or "" for e in events) == sorted([hostile, good])
    assert {breaking, endless, away}.isdisjoint(e.channel_message_id for e in events)
    cursor = await db.fetchval("SELECT history_id FROM gmail_poll_state WHERE integration_id = $1",
                               uuid.UUID(integration_id))  # fmt: skip
    assert cursor == gmail.mailboxes[email].history_id  # moved on


async def test_a_token_endpoint_outage_or_unreadable_tokens_do_not_disconnect_or_stop_anyone(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    # Any refusal of a refresh disconnected the mailbox (a 502 for a few seconds, and every
    # tenant whose token expired then had to connect again by hand); a row whose tokens do not
    # decrypt stopped the poller, every tenant's intake with it.
    tenant = await make_tenant()
    email, integration_id = await connected(gmail, store, tenant.tenant_id)
    _, unreadable = await connected(gmail, store, tenant.tenant_id)
    await db.execute(
        "UPDATE integration_credentials SET encrypted_secret = $2 WHERE integration_id = $1",
        uuid.UUID(unreadable), b"\x01garbage",
    )  # fmt: skip
    gmail.expire_access_tokens(email)
    message_id = gmail.deliver(email, mail("flo@example.com", "Hi", "during the outage"))
    poller = GmailPoller(gmail_settings, store, publisher)
    gmail.token_outages = 5
    try:
        await poller.poll_due()
    finally:
        gmail.token_outages = 0
    rows = await db.fetch(
        "SELECT p.integration_id::text AS id, c.status || ': ' || coalesce(p.last_error, '') AS s"
        " FROM gmail_poll_state p JOIN integration_credentials c USING (integration_id)"
        " WHERE p.integration_id = ANY($1::uuid[])", [integration_id, unreadable],
    )  # fmt: skip
    states = {r["id"]: r["s"] for r in rows}
    assert states[integration_id].startswith("connected: the access token could not be")
    assert states[unreadable].startswith("connected: stored tokens unreadable")
    await due_now(db, integration_id)
    await poller.poll_due()
    events = await inbound_events(gmail_settings, tenant.tenant_id)
    assert [e.channel_message_id for e in events] == [message_id]


async def test_a_consent_without_send_is_refused_at_connect(
    gmail: GmailFake, gmail_settings: Settings
) -> None:
    # Connected read-only, every reply and notice by the mailbox failed while it showed as
    # connected.
    email = f"owner-{uuid.uuid4().hex[:6]}@acme.test"
    gmail.add_mailbox(email)
    gmail.granted_scope = "https://www.googleapis.com/auth/gmail.readonly"
    try:
        with pytest.raises(MailboxRevoked, match=r"gmail\.send"):
            await OAuthFlow(gmail_settings).exchange(gmail.issue_code(email))
    finally:
        gmail.granted_scope = GmailFake.granted_scope


async def test_a_reply_in_a_thread_of_a_mailbox_since_disconnected_goes_out_by_another(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    # The other mailbox's thread id went with it, Gmail refused it, and every reply to the
    # lead failed until the first mailbox was connected again.
    tenant = await make_tenant()
    first, first_id = await connected(gmail, store, tenant.tenant_id)
    original = "<CAF-gone-1@mail.example.com>"
    gmail.deliver(first, mail("ivy@example.com", "Seats", "10 seats?", original),
                  thread_id="thread-ivy")  # fmt: skip
    await GmailPoller(gmail_settings, store, publisher).poll_due()
    await db.execute("UPDATE integration_credentials SET status = 'disconnected'"
                     " WHERE integration_id = $1", uuid.UUID(first_id))  # fmt: skip
    second, _ = await connected(gmail, store, tenant.tenant_id)
    lead_id = lead_id_for(tenant.tenant_id, "email", "ivy@example.com")
    sent = await EmailSender(gmail_settings, store).send(
        tenant.tenant_id, to="ivy@example.com", body="Yes, 10 seats.", lead_id=lead_id
    )
    (out,) = gmail.mailboxes[second].sent
    assert (sent.sender, out["threadId"]) == (second, None)
    assert message_from_bytes(out["raw"], policy=policy.default)["In-Reply-To"] == original


async def test_two_pollers_never_poll_one_mailbox_at_once(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenants = [await make_tenant(f"T{i}") for i in range(3)]
    mailboxes = [await connected(gmail, store, t.tenant_id) for t in tenants for _ in range(2)]
    expected: dict[str, list[str]] = {}
    for email, _ in mailboxes:
        expected[email] = [gmail.deliver(email, mail("fay@example.com", "q", f"to {email} {i}"))
                           for i in range(3)]  # fmt: skip
    gmail.request_delay_s = 0.02
    try:
        pollers = [GmailPoller(gmail_settings, store, publisher, owner=f"poller-{i}")
                   for i in range(2)]  # fmt: skip
        for _ in range(3):
            await asyncio.gather(*(p.poll_due() for p in pollers))
            for _, integration_id in mailboxes:
                await due_now(db, integration_id)
    finally:
        gmail.request_delay_s = 0.0
    assert all(gmail.max_in_flight[email] == 1 for email, _ in mailboxes)
    events = [e for t in tenants for e in await inbound_events(gmail_settings, t.tenant_id)]
    published = Counter(e.channel_message_id for e in events)
    assert set(published) == {m for ids in expected.values() for m in ids}
    assert set(published.values()) == {1}


async def test_a_poll_longer_than_its_lease_keeps_the_mailbox_to_itself(
    gmail: GmailFake,
    gmail_settings: Settings,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    # The lease was never renewed: a long poll (a week's resync) lost its mailbox to another
    # poller, which read it all again, and the first poll's cursor was refused.
    tenant = await make_tenant()
    email, integration_id = await connected(gmail, store, tenant.tenant_id)
    # The earlier tests' mailboxes not due: the slow poller takes this one, not 8 of those.
    await db.execute("UPDATE gmail_poll_state SET next_poll_at = now() + interval '1 hour'"
                     " WHERE integration_id <> $1", uuid.UUID(integration_id))  # fmt: skip
    ids = [gmail.deliver(email, mail("hal@example.com", "q", f"m{i}")) for i in range(6)]
    short_lease = gmail_settings.model_copy(update={"gmail_lease_s": 3})
    gmail.request_delay_s = 0.6  # 8 requests: over half again the lease
    try:
        first = asyncio.create_task(
            GmailPoller(short_lease, store, publisher, owner="slow").poll_due()
        )
        taken = []
        while not first.done():
            await asyncio.sleep(0.4)
            taken += await store.claim_due("other", 60, 1000)
        await first
    finally:
        gmail.request_delay_s = 0.0
    assert integration_id not in {m.integration_id for m in taken}
    events = await inbound_events(gmail_settings, tenant.tenant_id)
    assert [e.channel_message_id for e in events] == ids


@pytest.fixture(scope="module")
def gmail_worker(
    processes: StartProcess, test_settings: Settings, gmail: GmailFake
) -> ManagedProcess:
    return start_worker(
        processes, test_settings, name="gmail-worker",
        GMAIL_CLIENT_ID="123-fake.apps.googleusercontent.com", GMAIL_CLIENT_SECRET="GOCSPX-fake",
        GMAIL_TOKEN_URL=f"{gmail.url}/token", GMAIL_API_URL=f"{gmail.url}/",
        ENABLE_AI_QUALIFICATION="false",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("lost", "refused", "requests"), [(1, 0, 1), (0, 1, 2)], ids=["answer-lost", "rate-limited"]
)
async def test_a_send_gmail_may_have_taken_is_looked_for_before_it_is_sent_again(
    gmail: GmailFake, gmail_settings: Settings, lost: int, refused: int, requests: int
) -> None:
    # Gmail takes no idempotency key: its client library resent after a 500, and the lead got
    # the mail twice. A rate-limited send, which did not go out, is still sent.
    email = f"sales-{uuid.uuid4().hex[:6]}@acme.test"
    gmail.add_mailbox(email)
    token, refresh = gmail.grant(email)
    raw, rfc_message_id = compose(
        sender=email, to="gus@example.com", subject="Pricing", body="About 2,000 USD.",
        in_reply_to=None, references=None,
    )  # fmt: skip
    gmail.sends_answered_500, gmail.sends_refused_429 = lost, refused
    before = gmail.send_requests
    sent = await Mailbox(gmail_settings, Tokens(token, refresh, None)).send(
        raw, None, rfc_message_id
    )
    assert [s["id"] for s in gmail.mailboxes[email].sent] == [sent["id"]]
    assert gmail.send_requests - before == requests


async def test_replies_go_out_in_the_leads_thread_from_the_api_and_the_worker(
    api_factory: ApiFactory,
    gmail: GmailFake,
    gmail_settings: Settings,
    gmail_worker: ManagedProcess,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant()
    email, integration_id = await connected(gmail, store, tenant.tenant_id)
    original = "<CAF-thread-1@mail.example.com>"
    gmail.deliver(email, mail("gus@example.com", "Pricing", "How much for 10 seats?", original),
                  thread_id="thread-gus")  # fmt: skip
    poller = GmailPoller(gmail_settings, store, publisher)

    async def polled() -> Any:
        await poller.poll_due()  # a pass takes GMAIL_POLL_CONCURRENCY due mailboxes
        return await db.fetchval(
            "SELECT last_success_at FROM gmail_poll_state WHERE integration_id = $1",
            uuid.UUID(integration_id),
        )

    await eventually(polled, what="the mailbox polled")
    (event,) = await inbound_events(gmail_settings, tenant.tenant_id)
    worker_url = f"http://127.0.0.1:{gmail_worker.ports['web']}"
    overrides = {k: getattr(gmail_settings, k) for k in (
        "gmail_client_id", "gmail_client_secret", "gmail_token_url", "gmail_api_url")}  # fmt: skip
    async with api_factory(worker_url=worker_url, **overrides) as api:

        async def lead_known() -> Any:
            response = await api.get(f"/api/leads/{event.lead_id}", headers=tenant.headers)
            return response.status_code == 200

        await eventually(lead_known, what="the e-mail lead in the worker")
        bad = await api.post("/api/integrations/gmail/send", headers=tenant.headers,
                             json={"body": "no recipient"})  # fmt: skip
        assert bad.status_code == 422
        sent = await api.post(
            "/api/integrations/gmail/send", headers=tenant.headers,
            json={"lead_id": event.lead_id, "body": "About 2,000 USD."},
        )  # fmt: skip
        assert sent.status_code == 201, sent.text
        assert sent.json()["thread_id"] == "thread-gus"
        assert sent.json()["recorded_in_lead_history"] is True
        # An SDR's reply through the pipeline: the outbound agent sends it by Gmail too.
        reply = await api.post(f"/api/leads/{event.lead_id}/messages", headers=tenant.headers,
                               json={"text": "Shall we book a demo?"})  # fmt: skip
        assert reply.status_code == 202

        async def two_sent() -> Any:
            return gmail.mailboxes[email].sent if len(gmail.mailboxes[email].sent) == 2 else None

        sends = await eventually(two_sent, what="two sends through Gmail")
    for send in sends:
        message = message_from_bytes(send["raw"], policy=policy.default)
        assert send["threadId"] == "thread-gus"
        assert message["In-Reply-To"] == original
        assert message["References"] == original
        assert message["To"] == "gus@example.com"
        assert message["Subject"] == "Re: Pricing"
    bodies = [message_from_bytes(s["raw"], policy=policy.default).get_content().strip()
              for s in sends]  # fmt: skip
    assert bodies == ["About 2,000 USD.", "Shall we book a demo?"]
    records = await read_topic(
        gmail_settings, [TopicNames(gmail_settings.topic_prefix).outbound_messages]
    )
    accepted = [OutboundMessage.model_validate_json(v) for _, _, v in records]
    mine = [m for m in accepted if m.lead_id == event.lead_id and m.status == "accepted"]
    assert sorted(m.sent_by for m in mine) == ["sdr", "sdr"]
    assert {m.channel for m in mine} == {"email"}


async def test_a_reply_a_rep_wrote_in_gmail_ends_the_leads_leak_wait(
    gmail: GmailFake,
    gmail_settings: Settings,
    gmail_worker: ManagedProcess,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant()
    email, integration_id = await connected(gmail, store, tenant.tenant_id)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    for sender in ("eve@example.com", "gil@example.com"):
        gmail.deliver(email, mail(sender, "Pricing", "Price for 3 seats?"),
                      internal_date_ms=now_ms)  # fmt: skip
    poller = GmailPoller(gmail_settings, store, publisher)
    await poller.poll_due()
    lead_id = lead_id_for(tenant.tenant_id, "email", "eve@example.com")
    colleague_id = lead_id_for(tenant.tenant_id, "email", "gil@example.com")

    async def leads_stored() -> Any:
        return await db.fetchval("SELECT count(*) = 2 FROM leads WHERE lead_id = ANY($1)",
                                 [uuid.UUID(lead_id), uuid.UUID(colleague_id)])  # fmt: skip

    await eventually(leads_stored, what="the leads in PostgreSQL")
    # One mail to both (the second in Cc): each lead's reply, in each one's history.
    reply = gmail.deliver(email, rep_mail(email, "eve@example.com", "600 USD a month.",
                                          cc="Gil <gil@example.com>"),
                          labels=("SENT",), internal_date_ms=now_ms + 90_000)  # fmt: skip
    await due_now(db, integration_id)
    await poller.poll_due()
    topic = TopicNames(gmail_settings.topic_prefix).lead_events

    async def first_reply() -> Any:
        # The lead's own records (other tests put records no event reads on the topic).
        events = [LeadEvent.model_validate_json(v)
                  for _, k, v in await read_topic(gmail_settings, [topic])
                  if k == lead_id.encode()]  # fmt: skip
        return [e for e in events if e.type == "first_reply"]

    (answered,) = await eventually(first_reply, what="the lead's wait ended by the rep's reply")
    assert answered.data["sent_by"] == "sdr"
    assert answered.data["waited_ms"] == 90_000
    assert answered.data["leaked"] is False

    async def in_history() -> Any:
        return await db.fetchrow(
            "SELECT sent_by, body, channel_message_id FROM messages"
            " WHERE lead_id = $1 AND direction = 'outbound'", uuid.UUID(lead_id),
        )  # fmt: skip

    row = await eventually(in_history, what="the reply in the lead's history")
    assert dict(row) == {"sent_by": "sdr", "body": "600 USD a month.", "channel_message_id": reply}

    async def in_colleagues_history() -> Any:
        return await db.fetchval(
            "SELECT channel_message_id FROM messages WHERE lead_id = $1 AND direction = 'outbound'",
            uuid.UUID(colleague_id),
        )

    assert await eventually(in_colleagues_history, what="the Cc lead's copy") == reply


async def test_without_smtp_notifications_are_mailed_through_the_tenants_gmail(
    gmail: GmailFake,
    gmail_settings: Settings,
    gmail_worker: ManagedProcess,
    store: GmailStore,
    publisher: EventPublisher,
    make_tenant: MakeTenant,
    db: asyncpg.Connection,
) -> None:
    tenant = await make_tenant()
    await db.execute("INSERT INTO tenant_admins (tenant_id, email) VALUES ($1, 'boss@acme.test')",
                     tenant.tenant_id)  # fmt: skip
    email, _ = await connected(gmail, store, tenant.tenant_id)
    notice = Notification(
        event_id=str(uuid.uuid4()), tenant_id=tenant.tenant_id, occurred_at=datetime.now(UTC),
        audience="admins", category="token_threshold", title="80% of your tokens used",
        body="800 of the 1000 tokens of your last top-up are used.",
    )  # fmt: skip
    topic = TopicNames(gmail_settings.topic_prefix).notifications
    await publisher.publish(topic, tenant.tenant_id.encode(), notice.model_dump_json().encode())

    async def mailed() -> Any:
        return gmail.mailboxes[email].sent or None

    (sent,) = await eventually(mailed, what="the notification sent through Gmail")
    message = message_from_bytes(sent["raw"], policy=policy.default)
    assert message["To"] == "boss@acme.test"
    assert message["From"] == email
    assert message["Subject"] == "80% of your tokens used"
