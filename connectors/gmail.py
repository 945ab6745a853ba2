"""Gmail: the OAuth code flow, and a mailbox client on `google-api-python-client`.

The Google client is synchronous (httplib2), so every call runs in a worker thread; one
`Mailbox` is used by one task at a time (the client is not thread-safe). Refresh of an expired
access token is the client's own (google-auth, against `GMAIL_TOKEN_URL`); a refresh token
Google no longer accepts surfaces as `MailboxRevoked`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlencode

import httplib2
import httpx
from google.auth.exceptions import RefreshError, TransportError
from google.oauth2.credentials import Credentials
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

from flexoraa.settings import Settings

SCOPES = (
    "https://www.googleapis.com/auth/gmail.readonly",
    "https://www.googleapis.com/auth/gmail.send",
)
T = TypeVar("T")
logger = logging.getLogger(__name__)
# A send that may have failed is looked for, then sent again, this many times in all; the first
# look waits this long (doubling), so a message Gmail took has time to show in its search.
SEND_ATTEMPTS = 3
SEND_BACKOFF_S = 1.0


# The labels whose new mail a poll reads: the leads' mail, and what the mailbox sent.
_READ_LABELS = frozenset({"INBOX", "SENT"})

GMAIL_NOT_CONFIGURED = "Gmail is not configured: set GMAIL_CLIENT_ID and GMAIL_CLIENT_SECRET"


class GmailNotConfigured(RuntimeError):
    """GMAIL_CLIENT_ID / GMAIL_CLIENT_SECRET are unset."""


class MailboxRevoked(RuntimeError):
    """Google refused the refresh token (revoked or expired): the mailbox must reconnect."""


class HistoryExpired(RuntimeError):
    """history.list answered 404: the stored historyId is too old; a full sync is needed."""


class GmailApiError(RuntimeError):
    """Any other Gmail API failure (retried on the next poll)."""


class MessageGone(GmailApiError):
    """messages.get answered 404: the message was deleted after history.list named it."""


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str
    expiry: datetime | None

    def to_json(self) -> str:
        return json.dumps(
            {
                "access_token": self.access_token,
                "refresh_token": self.refresh_token,
                "expiry": self.expiry.isoformat() if self.expiry else None,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Tokens:
        data = json.loads(text)
        expiry = datetime.fromisoformat(data["expiry"]) if data.get("expiry") else None
        return cls(data["access_token"], data["refresh_token"], expiry)


class OAuthFlow:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    @property
    def configured(self) -> bool:
        return self._settings.gmail_configured

    def _client(self) -> tuple[str, str]:
        client_id, secret = self._settings.gmail_client_id, self._settings.gmail_client_secret
        if not client_id or secret is None:
            raise GmailNotConfigured(GMAIL_NOT_CONFIGURED)
        return client_id, secret.get_secret_value()

    def consent_url(self, state: str) -> str:
        client_id, _ = self._client()
        query = urlencode(
            {
                "client_id": client_id,
                "redirect_uri": self._settings.gmail_redirect_uri,
                "response_type": "code",
                "scope": " ".join(SCOPES),
                # A refresh token is issued only with offline access, and again on a reconnect
                # only when consent is prompted.
                "access_type": "offline",
                "prompt": "consent",
                "include_granted_scopes": "true",
                "state": state,
            }
        )
        return f"{self._settings.gmail_auth_url}?{query}"

    async def exchange(self, code: str) -> Tokens:
        client_id, secret = self._client()
        try:
            async with httpx.AsyncClient(timeout=15) as client:
                response = await client.post(
                    self._settings.gmail_token_url,
                    data={
                        "code": code,
                        "client_id": client_id,
                        "client_secret": secret,
                        "redirect_uri": self._settings.gmail_redirect_uri,
                        "grant_type": "authorization_code",
                    },
                )
            body = response.json() if response.content else {}
        except (httpx.HTTPError, ValueError) as exc:
            # Unreachable, or an outage's page instead of JSON: Google's trouble, not the code's.
            raise GmailApiError(f"Google's token endpoint did not answer: {exc!r}") from exc
        if response.status_code >= 500 or not isinstance(body, dict):
            raise GmailApiError(f"Google's token endpoint answered {response.status_code}")
        if response.status_code != 200:
            raise MailboxRevoked(f"Google refused the code: {body.get('error', response.text)}")
        if not body.get("refresh_token"):
            raise MailboxRevoked("Google issued no refresh token (offline access not granted)")
        # Google's consent lets the user untick a scope: without send, every reply and notice
        # by this mailbox would fail while it showed as connected.
        missing = set(SCOPES) - set(str(body.get("scope", "")).split())
        if missing:
            raise MailboxRevoked(
                "the consent left out "
                + ", ".join(sorted(s.rsplit("/", 1)[-1] for s in missing))
                + ": connect again and allow reading and sending mail"
            )
        expires_in = int(body.get("expires_in", 3600))
        return Tokens(
            body["access_token"],
            body["refresh_token"],
            datetime.now(UTC) + timedelta(seconds=expires_in),
        )


class Mailbox:
    """One connected mailbox ("me" of its tokens)."""

    def __init__(self, settings: Settings, tokens: Tokens) -> None:
        client_id, secret = settings.gmail_client_id, settings.gmail_client_secret
        if not client_id or secret is None:
            raise GmailNotConfigured(GMAIL_NOT_CONFIGURED)
        self._credentials = Credentials(  # type: ignore[no-untyped-call]
            token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            token_uri=settings.gmail_token_url,
            client_id=client_id,
            client_secret=secret.get_secret_value(),
            scopes=list(SCOPES),
            # google-auth compares expiry with a naive UTC now.
            expiry=tokens.expiry.astimezone(UTC).replace(tzinfo=None) if tokens.expiry else None,
        )
        self._service = build(
            "gmail",
            "v1",
            credentials=self._credentials,
            static_discovery=True,
            cache_discovery=False,
            client_options={"api_endpoint": settings.gmail_api_url},
        )
        self._initial = tokens

    @property
    def tokens(self) -> Tokens:
        """The current tokens (a refresh changes the access token)."""
        expiry = self._credentials.expiry
        return Tokens(
            self._credentials.token or self._initial.access_token,
            self._credentials.refresh_token or self._initial.refresh_token,
            expiry.replace(tzinfo=UTC) if expiry else None,
        )

    async def _call(
        self,
        request: Callable[[], T],
        *,
        history_id: int | None = None,
        message_id: str | None = None,
    ) -> T:
        try:
            return await asyncio.to_thread(request)
        except RefreshError as exc:
            if _grant_refused(exc):
                raise MailboxRevoked(f"Google refused the refresh token: {exc}") from exc
            # An outage of the token endpoint (google-auth calls a 502 final), or our client's
            # own credentials refused: not the mailbox's, which a disconnect would make its
            # admins connect again by hand.
            raise GmailApiError(f"the access token could not be refreshed: {exc}") from exc
        except HttpError as exc:
            if exc.resp.status == 404 and history_id is not None:
                raise HistoryExpired(f"historyId {history_id} is no longer available") from exc
            if exc.resp.status == 404 and message_id is not None:
                raise MessageGone(f"message {message_id} no longer exists") from exc
            if exc.resp.status == 401:
                raise MailboxRevoked(f"Gmail refused the credentials: {exc}") from exc
            raise GmailApiError(f"Gmail API answered {exc.resp.status}: {exc}") from exc
        # httplib2's and google-auth's own network errors are not OSErrors: a DNS failure
        # ("Unable to find the server") escaped every handler and stopped the worker.
        except (OSError, httplib2.HttpLib2Error, TransportError) as exc:
            raise GmailApiError(f"Gmail API unreachable: {exc!r}") from exc

    async def profile(self) -> tuple[str, int]:
        """The mailbox's address and current historyId."""
        users = self._service.users()
        profile = await self._call(lambda: users.getProfile(userId="me").execute(num_retries=2))
        return str(profile["emailAddress"]).lower(), int(profile["historyId"])

    async def added_since(self, history_id: int) -> tuple[list[str], int]:
        """Ids of messages added to the INBOX or SENT after `history_id` (every page), and the
        newest historyId seen.

        Sent mail too: a rep who answers a lead in Gmail itself answered it (its leak wait
        ends). One unfiltered listing, not one per label: a poll a minute per mailbox is the
        quota's largest user, and drafts, spam and chats are left out here."""
        history = self._service.users().history()
        ids: list[str] = []
        newest = history_id
        page_token: str | None = None
        while True:
            request = history.list(
                userId="me",
                startHistoryId=str(history_id),
                historyTypes=["messageAdded"],
                pageToken=page_token,
            )
            page: dict[str, Any] = await self._call(
                partial(request.execute, num_retries=2), history_id=history_id
            )
            for record in page.get("history", []):
                for added in record.get("messagesAdded", []):
                    message = added.get("message", {})
                    labels = message.get("labelIds", ["INBOX"])
                    if _READ_LABELS.intersection(labels) and message["id"] not in ids:
                        ids.append(message["id"])
            newest = max(newest, int(page.get("historyId", newest)))
            page_token = page.get("nextPageToken")
            if not page_token:
                return ids, newest

    async def mail_since(self, since: datetime) -> list[str]:
        """Ids of INBOX and SENT messages after `since` (every page), oldest first, for a full
        resync."""
        messages = self._service.users().messages()
        ids: list[str] = []
        page_token: str | None = None
        while True:
            request = messages.list(
                userId="me",
                q=f"{{in:inbox in:sent}} after:{int(since.timestamp())}",
                pageToken=page_token,
                maxResults=500,
            )
            page: dict[str, Any] = await self._call(partial(request.execute, num_retries=2))
            ids.extend(m["id"] for m in page.get("messages", []))
            page_token = page.get("nextPageToken")
            if not page_token:
                # Gmail lists the newest first. Read so, a lead's events went out newest
                # first, and the thread remembered for its replies was its oldest.
                ids.reverse()
                return ids

    async def fetch(self, message_id: str) -> dict[str, Any]:
        """The message in `raw` format: {id, threadId, labelIds, raw, internalDate}."""
        messages = self._service.users().messages()
        request = messages.get(userId="me", id=message_id, format="raw")
        result: dict[str, Any] = await self._call(
            lambda: request.execute(num_retries=2), message_id=message_id
        )
        return result

    async def send(self, raw: str, thread_id: str | None, rfc_message_id: str) -> dict[str, Any]:
        """Sends the message once: {id, threadId}.

        Gmail takes no idempotency key, and its client library sends again after a timeout or
        a 5xx, when the first request may have gone out. So the library never retries here;
        after a failure that may have sent it, the mailbox is searched for the message's own
        Message-ID, and only a message not found there is sent again. A search that fails too
        raises: the lead might get it twice otherwise."""
        body: dict[str, Any] = {"raw": raw}
        if thread_id:
            body["threadId"] = thread_id
        messages = self._service.users().messages()
        delay_s = SEND_BACKOFF_S
        failure: GmailApiError | None = None
        for _ in range(SEND_ATTEMPTS):
            request = messages.send(userId="me", body=body)
            try:
                result: dict[str, Any] = await self._call(request.execute)
                return result
            except MailboxRevoked:
                raise
            except GmailApiError as exc:
                if not _may_have_sent(exc):
                    raise
                logger.warning("Gmail send failed (%s); looking for it before a retry", exc)
                failure = exc
            await asyncio.sleep(delay_s)
            delay_s *= 2
            # Looked for after the last attempt too: gone out after all, a 502 would invite
            # the caller to send it again.
            found = await self._sent_copy(rfc_message_id)
            if found is not None:
                return found
        assert failure is not None  # every attempt that did not return failed
        raise failure

    async def _sent_copy(self, rfc_message_id: str) -> dict[str, Any] | None:
        """The mailbox's message with this Message-ID header, if Gmail has it."""
        query = f"rfc822msgid:{rfc_message_id.strip('<>')}"
        messages = self._service.users().messages()
        request = messages.list(userId="me", q=query, includeSpamTrash=True)
        page: dict[str, Any] = await self._call(request.execute)
        found = page.get("messages") or []
        return dict(found[0]) if found else None


def _grant_refused(exc: RefreshError) -> bool:
    """Whether Google's token endpoint refused the refresh token itself (`invalid_grant`:
    revoked, expired, the password changed), the one answer that ends a mailbox's grant."""
    details = exc.args[1] if len(exc.args) > 1 else None
    return isinstance(details, dict) and details.get("error") == "invalid_grant"


def _may_have_sent(exc: GmailApiError) -> bool:
    """False for an answer that proves the send was refused (a 4xx other than 429)."""
    cause = exc.__cause__
    if isinstance(cause, HttpError):
        status = int(cause.resp.status)
        return status >= 500 or status == 429
    return True
