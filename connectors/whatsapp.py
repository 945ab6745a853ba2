"""The Graph API send endpoints (WhatsApp Cloud API, Instagram and Messenger), over HTTP.

The base URL and version are settings, so tests and the demo talk to a local server that
speaks the same wire format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

# Our code for a send whose request reached Meta but whose answer did not (a read timeout, a
# connection dropped mid-answer): it may have gone out, and Meta takes no idempotency key.
UNCONFIRMED_ERROR = "unconfirmed"

# Failures before any byte of the request could reach Meta: another attempt cannot duplicate.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.WriteTimeout)


class GraphApiError(Exception):
    def __init__(self, status: int | None, code: str | None, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        """429, 5xx and a request that never left are worth another attempt. A request whose
        answer was lost is not: the lead could get the message twice."""
        if self.code == UNCONFIRMED_ERROR:
            return False
        return self.status is None or self.status == 429 or self.status >= 500


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    language: str
    parameters: list[str]


class GraphApiClient:
    def __init__(self, base_url: str, version: str, timeout_s: float = 10.0) -> None:
        self._client = httpx.AsyncClient(
            base_url=f"{base_url.rstrip('/')}/{version}", timeout=timeout_s
        )

    async def send_whatsapp_text(self, phone_number_id: str, token: str, to: str, text: str) -> str:
        return await self._send(
            f"/{phone_number_id}/messages",
            token,
            {
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": to,
                "type": "text",
                "text": {"preview_url": False, "body": text},
            },
        )

    async def send_whatsapp_template(
        self, phone_number_id: str, token: str, to: str, template: Template
    ) -> str:
        components = []
        if template.parameters:
            components.append(
                {
                    "type": "body",
                    "parameters": [{"type": "text", "text": p} for p in template.parameters],
                }
            )
        return await self._send(
            f"/{phone_number_id}/messages",
            token,
            {
                "messaging_product": "whatsapp",
                "to": to,
                "type": "template",
                "template": {
                    "name": template.name,
                    "language": {"code": template.language},
                    "components": components,
                },
            },
        )

    async def send_page_text(self, page_id: str, token: str, recipient: str, text: str) -> str:
        """Instagram / Messenger Send API, as a response inside the standard messaging window."""
        return await self._send(
            f"/{page_id}/messages",
            token,
            {
                "recipient": {"id": recipient},
                "messaging_type": "RESPONSE",
                "message": {"text": text},
            },
        )

    async def _send(self, path: str, token: str, body: dict[str, Any]) -> str:
        try:
            response = await self._client.post(
                path, json=body, headers={"Authorization": f"Bearer {token}"}
            )
        except _NOT_SENT as exc:
            raise GraphApiError(None, None, f"transport error: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise GraphApiError(
                None,
                UNCONFIRMED_ERROR,
                f"sent, but Meta's answer was lost ({exc!r}): not retried, it may have gone out",
            ) from exc
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code >= 400 or "error" in payload:
            error = payload.get("error") or {}
            code = error.get("code")
            raise GraphApiError(
                response.status_code,
                str(code) if code is not None else None,
                str(error.get("message") or response.text[:300]),
            )
        messages = payload.get("messages") or []
        message_id = messages[0].get("id") if messages else payload.get("message_id")
        if not message_id:
            raise GraphApiError(response.status_code, None, "response carried no message id")
        return str(message_id)

    async def close(self) -> None:
        await self._client.aclose()
