"""Webhook payloads in Meta's exact shapes (PLATFORM.md), for tests and the benchmark."""

from __future__ import annotations

from typing import Any


def whatsapp_message(
    wamid: str, sender: str, timestamp: int, kind: str = "text", **content: Any
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "from": sender,
        "id": wamid,
        "timestamp": str(timestamp),
        "type": kind,
    }
    if kind == "text":
        message["text"] = {"body": content.get("body", "hello")}
    else:
        message[kind] = content
    return message


def whatsapp_change(
    phone_number_id: str,
    messages: list[dict[str, Any]] | None = None,
    statuses: list[dict[str, Any]] | None = None,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": phone_number_id},
    }
    if messages is not None:
        value["contacts"] = [
            {"profile": {"name": (names or {}).get(m["from"], "Customer")}, "wa_id": m["from"]}
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("from"), str)
        ]
        value["messages"] = messages
    if statuses is not None:
        value["statuses"] = statuses
    return {"field": "messages", "value": value}


def whatsapp_payload(
    *entries: list[dict[str, Any]], waba_id: str = "102290129340398"
) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": waba_id, "changes": changes} for changes in entries],
    }


def whatsapp_status(
    wamid: str, status: str, timestamp: int, recipient: str, error_code: int | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": wamid,
        "status": status,
        "timestamp": str(timestamp),
        "recipient_id": recipient,
        "conversation": {"id": "CONVERSATION_ID", "origin": {"type": "service"}},
        "pricing": {"billable": True, "pricing_model": "CBP", "category": "service"},
    }
    if error_code is not None:
        body["errors"] = [{"code": error_code, "title": "Re-engagement message"}]
    return body


def messaging_payload(
    kind: str,
    page_id: str,
    sender: str,
    mid: str,
    timestamp_ms: int,
    text: str | None = "hi",
    echo: bool = False,
) -> dict[str, Any]:
    message: dict[str, Any] = {"mid": mid}
    if text is not None:
        message["text"] = text
    else:
        message["attachments"] = [
            {"type": "image", "payload": {"url": "https://example.com/a.jpg"}}
        ]
    if echo:
        message["is_echo"] = True
    return {
        "object": kind,
        "entry": [
            {
                "id": page_id,
                "time": timestamp_ms,
                "messaging": [
                    {
                        "sender": {"id": sender},
                        "recipient": {"id": page_id},
                        "timestamp": timestamp_ms,
                        "message": message,
                    }
                ],
            }
        ],
    }  # fmt: skip
