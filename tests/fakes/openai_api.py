"""A local OpenAI-compatible server (Chat Completions) with scripted answers."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web


@dataclass
class OpenAIFake:
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Each scripted answer: ("ok", facts dict) | ("status", http status) | ("hang", seconds)
    # | ("content", the message's content as is: what a server ignoring the schema answers)
    # | ("body", a whole 200 body as is: what a compatible proxy answers instead of one)
    script: deque[tuple[str, Any]] = field(default_factory=deque)
    usage: tuple[int, int] = (120, 45)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        kind, value = self.script.popleft() if self.script else ("ok", {})
        value = cast(Any, value)
        if kind == "status":
            return web.json_response(
                {"error": {"message": "scripted failure", "type": "server_error"}},
                status=int(value),
            )
        if kind == "body":
            return web.json_response(value)
        if kind == "hang":
            await asyncio.sleep(float(value))
            value = {}
        facts = {
            "need": None, "budget": None, "timeline": None, "authority": None,
            "objections": [], "next_step": None, "next_question": None,
            **(value if kind != "content" and value else {}),
        }  # fmt: skip
        content = str(value) if kind == "content" else json.dumps(facts)
        prompt, completion = self.usage
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 1732450000,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        )

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
