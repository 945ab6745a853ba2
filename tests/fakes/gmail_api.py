"""A local server speaking the parts of the Gmail API and Google's OAuth token endpoint that
the pipeline uses, with the same JSON shapes and error answers.

Mailboxes hold raw RFC 822 messages and a history of `messageAdded` records; history older
than `oldest_history_id` answers 404 like Gmail's. Access tokens can be expired (the client
must refresh) and refresh tokens revoked (`invalid_grant`). Requests in flight per mailbox are
counted, so tests can check that no mailbox is polled twice at once.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web


@dataclass
class FakeMailbox:
    email: str
    history_id: int = 1000
    oldest_history_id: int = 1
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str]] = field(default_factory=list)
    refresh_token: str = field(default_factory=lambda: "1//r-" + secrets.token_urlsafe(12))
    revoked: bool = False
    sent: list[dict[str, Any]] = field(default_factory=list)
    # Deleted messages: still in the history (it records what happened), gone from messages.get.
    deleted: dict[str, dict[str, Any]] = field(default_factory=dict)


MAILBOX = web.RequestKey("mailbox", FakeMailbox)


@dataclass
class GmailFake:
    page_size: int = 2
    mailboxes: dict[str, FakeMailbox] = field(default_factory=dict)
    access_tokens: dict[str, str] = field(default_factory=dict)  # token → mailbox
    codes: dict[str, str] = field(default_factory=dict)  # one-time code → mailbox
    token_requests: list[dict[str, str]] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    request_delay_s: float = 0.0
    token_outages: int = 0  # token requests answered 502 before the endpoint works again
    # Sends that go out but are answered 500 (the answer lost, as after a timeout).
    sends_answered_500: int = 0
    sends_refused_429: int = 0  # sends refused (rate limit) without going out
    send_requests: int = 0
    # What a code exchange says was granted (Google's consent lets the user untick a scope).
    granted_scope: str = ("https://www.googleapis.com/auth/gmail.readonly "
                          "https://www.googleapis.com/auth/gmail.send")  # fmt: skip
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None
    url: str = ""

    # ----------------------------------------------------------------- test controls
    def add_mailbox(self, email: str) -> FakeMailbox:
        mailbox = FakeMailbox(email)
        self.mailboxes[email] = mailbox
        return mailbox

    def issue_code(self, email: str) -> str:
        code = "4/0A" + secrets.token_urlsafe(16)
        self.codes[code] = email
        return code

    def grant(self, email: str) -> tuple[str, str]:
        """An access token and the refresh token of `email` (as a code exchange gives)."""
        token = "ya29." + secrets.token_urlsafe(16)
        self.access_tokens[token] = email
        return token, self.mailboxes[email].refresh_token

    def expire_access_tokens(self, email: str) -> None:
        for token in [t for t, m in self.access_tokens.items() if m == email]:
            del self.access_tokens[token]

    def deliver(
        self, email: str, raw: bytes, thread_id: str | None = None,
        labels: tuple[str, ...] = ("INBOX", "UNREAD"), internal_date_ms: int = 1764000000000,
    ) -> str:  # fmt: skip
        mailbox = self.mailboxes[email]
        message_id = f"18c{next(self._ids):013x}"
        mailbox.history_id += 7
        mailbox.messages[message_id] = {
            "id": message_id, "threadId": thread_id or message_id, "labelIds": list(labels),
            "raw": base64.urlsafe_b64encode(raw).decode().rstrip("="),
            "historyId": str(mailbox.history_id), "internalDate": str(internal_date_ms),
            "sizeEstimate": len(raw),
        }  # fmt: skip
        mailbox.history.append((mailbox.history_id, message_id))
        return message_id

    def delete(self, email: str, message_id: str) -> None:
        """The message deleted for good (messages.get answers 404; history.list still says it
        was added, as Gmail's does between the two calls)."""
        mailbox = self.mailboxes[email]
        mailbox.deleted[message_id] = mailbox.messages.pop(message_id)

    # ----------------------------------------------------------------- HTTP
    @staticmethod
    def _error(status: int, message: str, reason: str) -> web.Response:
        return web.json_response(
            {"error": {"code": status, "message": message,
                       "errors": [{"message": message, "domain": "global", "reason": reason}],
                       "status": {401: "UNAUTHENTICATED", 404: "NOT_FOUND"}.get(status, "")}},
            status=status,
        )  # fmt: skip

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: v[0] for k, v in parse_qs(await request.text()).items()}
        self.token_requests.append(form)
        if self.token_outages:
            # A proxy's page, as Google's front end answers an outage: not JSON.
            self.token_outages -= 1
            return web.Response(text="<html>502 Bad Gateway</html>", status=502,
                                content_type="text/html")  # fmt: skip
        if form.get("grant_type") == "authorization_code":
            email = self.codes.pop(form.get("code", ""), None)
            if email is None:
                return web.json_response(
                    {"error": "invalid_grant", "error_description": "Malformed auth code."},
                    status=400,
                )
        elif form.get("grant_type") == "refresh_token":
            found = [m for m in self.mailboxes.values()
                     if m.refresh_token == form.get("refresh_token")]  # fmt: skip
            if not found or found[0].revoked:
                return web.json_response(
                    {"error": "invalid_grant",
                     "error_description": "Token has been expired or revoked."},
                    status=400,
                )  # fmt: skip
            email = found[0].email
        else:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token, refresh = self.grant(email)
        body = {"access_token": token, "expires_in": 3599, "token_type": "Bearer",
                "scope": self.granted_scope}  # fmt: skip
        if form["grant_type"] == "authorization_code":
            body["refresh_token"] = refresh
        return web.json_response(body)

    def _mailbox(self, request: web.Request) -> FakeMailbox | None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        email = self.access_tokens.get(token)
        return self.mailboxes.get(email) if email else None

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/token":
            return await handler(request)
        mailbox = self._mailbox(request)
        if mailbox is None:
            return self._error(401, "Request had invalid authentication credentials.",
                               "authError")  # fmt: skip
        request[MAILBOX] = mailbox
        self.in_flight[mailbox.email] += 1
        self.max_in_flight[mailbox.email] = max(
            self.max_in_flight[mailbox.email], self.in_flight[mailbox.email]
        )
        try:
            if self.request_delay_s:
                await asyncio.sleep(self.request_delay_s)
            return await handler(request)
        finally:
            self.in_flight[mailbox.email] -= 1

    async def _profile(self, request: web.Request) -> web.Response:
        mailbox: FakeMailbox = request[MAILBOX]
        return web.json_response({"emailAddress": mailbox.email,
                                  "messagesTotal": len(mailbox.messages),
                                  "threadsTotal": len(mailbox.messages),
                                  "historyId": str(mailbox.history_id)})  # fmt: skip

    async def _history(self, request: web.Request) -> web.Response:
        mailbox: FakeMailbox = request[MAILBOX]
        start = int(request.query["startHistoryId"])
        if start < mailbox.oldest_history_id:
            return self._error(404, "Requested entity was not found.", "notFound")
        known = {**mailbox.deleted, **mailbox.messages}
        records = [(h, m) for h, m in mailbox.history if h > start]
        if "INBOX" in request.query.getall("labelId", []):
            records = [(h, m) for h, m in records if "INBOX" in known[m]["labelIds"]]
        offset = int(request.query.get("pageToken", "0"))
        page = records[offset : offset + self.page_size]
        body: dict[str, Any] = {"historyId": str(mailbox.history_id)}
        if page:
            body["history"] = [
                {"id": str(h), "messages": [{"id": m, "threadId": known[m]["threadId"]}],
                 "messagesAdded": [{"message": {
                     "id": m, "threadId": known[m]["threadId"],
                     "labelIds": known[m]["labelIds"]}}]}
                for h, m in page
            ]  # fmt: skip
        if offset + self.page_size < len(records):
            body["nextPageToken"] = str(offset + self.page_size)
        return web.json_response(body)

    async def _list(self, request: web.Request) -> web.Response:
        mailbox: FakeMailbox = request[MAILBOX]
        query = request.query.get("q", "")
        # `in:inbox`, `in:sent`, or either as `{in:inbox in:sent}`: the labels searched.
        searched = {label.upper() for label in re.findall(r"in:(\w+)", query)}
        ids = [m for m, message in mailbox.messages.items()
               if not searched or searched.intersection(message["labelIds"])]  # fmt: skip
        if query.startswith("rfc822msgid:"):
            wanted = query.removeprefix("rfc822msgid:").strip("<>")
            ids = [m for m in ids if _message_id(mailbox.messages[m]) == wanted]
        ids.reverse()  # newest first, as Gmail lists
        offset = int(request.query.get("pageToken", "0"))
        page = ids[offset : offset + self.page_size]
        body: dict[str, Any] = {
            "messages": [{"id": m, "threadId": mailbox.messages[m]["threadId"]} for m in page],
            "resultSizeEstimate": len(ids),
        }
        if offset + self.page_size < len(ids):
            body["nextPageToken"] = str(offset + self.page_size)
        return web.json_response(body)

    async def _get(self, request: web.Request) -> web.Response:
        mailbox: FakeMailbox = request[MAILBOX]
        message = mailbox.messages.get(request.match_info["message_id"])
        if message is None:
            return self._error(404, "Requested entity was not found.", "notFound")
        return web.json_response(message)

    async def _send(self, request: web.Request) -> web.Response:
        mailbox: FakeMailbox = request[MAILBOX]
        body = await request.json()
        self.send_requests += 1
        if self.sends_refused_429:
            self.sends_refused_429 -= 1
            return self._error(429, "User-rate limit exceeded.", "rateLimitExceeded")
        raw = base64.urlsafe_b64decode(body["raw"] + "=" * 3)
        thread_id = body.get("threadId")
        if thread_id and not any(m["threadId"] == thread_id for m in mailbox.messages.values()):
            return self._error(404, "Requested entity was not found.", "notFound")
        message_id = self.deliver(mailbox.email, raw, thread_id, labels=("SENT",))
        mailbox.sent.append({"raw": raw, "threadId": thread_id, "id": message_id})
        if self.sends_answered_500:
            self.sends_answered_500 -= 1
            return self._error(500, "Internal error encountered.", "backendError")
        return web.json_response({"id": message_id, "threadId": thread_id or message_id,
                                  "labelIds": ["SENT"]})  # fmt: skip

    async def start(self, port: int) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/token", self._token)
        base = "/gmail/v1/users/me"
        app.router.add_get(f"{base}/profile", self._profile)
        app.router.add_get(f"{base}/history", self._history)
        app.router.add_get(f"{base}/messages", self._list)
        app.router.add_get(f"{base}/messages/{{message_id}}", self._get)
        app.router.add_post(f"{base}/messages/send", self._send)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _message_id(message: dict[str, Any]) -> str:
    """The Message-ID header of a stored message, without its angle brackets."""
    raw = base64.urlsafe_b64decode(message["raw"] + "=" * 3)
    parsed = BytesParser(policy=policy.default).parsebytes(raw, headersonly=True)
    return str(parsed.get("Message-ID", "")).strip().strip("<>")
