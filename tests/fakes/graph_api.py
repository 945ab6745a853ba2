"""A local server speaking the Graph API's send endpoints (WhatsApp, Instagram, Messenger).

Responses are scripted per business account: a queue of (status, body) answers, after which
every send succeeds with a fresh `wamid`. Every request is recorded for assertions. With
`answer_after_s`, every answer waits that long (a slow Graph API), and `most_in_flight` tells
how many sends overlapped.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class GraphApiFake:
    version: str = "v21.0"
    requests: list[dict[str, Any]] = field(default_factory=list)
    scripted: dict[str, deque[tuple[int, dict[str, Any]]]] = field(
        default_factory=lambda: defaultdict(deque)
    )
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _runner: web.AppRunner | None = None
    url: str = ""
    answer_after_s: float = 0.0
    in_flight: int = 0
    most_in_flight: int = 0

    def script(self, account_id: str, *answers: tuple[int, dict[str, Any]]) -> None:
        self.scripted[account_id].extend(answers)

    @staticmethod
    def error(code: int, message: str, http_status: int = 400) -> tuple[int, dict[str, Any]]:
        return (
            http_status,
            {"error": {"message": message, "type": "OAuthException", "code": code,
                       "error_subcode": 2494010, "fbtrace_id": "Az8or2yhqkZfEZ-_4Qn_Bam"}},
        )  # fmt: skip

    def sent_to(self, account_id: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["account_id"] == account_id]

    async def _messages(self, request: web.Request) -> web.Response:
        account_id = request.match_info["account_id"]
        body = await request.json()
        self.requests.append(
            {
                "account_id": account_id,
                "authorization": request.headers.get("Authorization"),
                "body": body,
            }
        )
        if self.answer_after_s:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.answer_after_s)
            finally:
                self.in_flight -= 1
        if self.scripted[account_id]:
            status, answer = self.scripted[account_id].popleft()
            return web.json_response(answer, status=status)
        message_id = f"wamid.FAKE{next(self._ids):06d}"
        if "messaging_product" in body:
            return web.json_response(
                {
                    "messaging_product": "whatsapp",
                    "contacts": [{"input": body["to"], "wa_id": body["to"]}],
                    "messages": [{"id": message_id}],
                }
            )
        return web.json_response(
            {"recipient_id": body["recipient"]["id"], "message_id": message_id}
        )

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_post(f"/{self.version}/{{account_id}}/messages", self._messages)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
