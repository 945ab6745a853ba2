"""Meta webhooks (WhatsApp Cloud API, Instagram, Messenger): signatures and normalisation.

Pure functions: the raw body and the candidate secrets in, plain records out. The API route
does the I/O around them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from schemas.events import is_supported_time

SIGNATURE_HEADER = "x-hub-signature-256"
_PREFIX = "sha256="


def signature_for(body: bytes, app_secret: str) -> str:
    """The `X-Hub-Signature-256` value Meta sends for `body`."""
    return _PREFIX + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def matching_secret(body: bytes, header: str | None, app_secrets: Iterable[str]) -> str | None:
    """The app secret whose HMAC of the raw body equals the header, compared in constant time.

    Several tenants may register numbers under different Meta apps, and the body cannot be
    trusted (or parsed) before it is verified, so every distinct secret is tried.
    """
    if not header or not header.startswith(_PREFIX):
        return None
    received = header.encode()
    found = None
    for secret in app_secrets:
        # No early exit: the time taken does not reveal which secret matched.
        if hmac.compare_digest(signature_for(body, secret).encode(), received):
            found = secret
    return found


@dataclass(frozen=True, slots=True)
class MetaMessage:
    """A customer's message, normalised; `account_id` is the business side that received it."""

    channel: str  # whatsapp | instagram | facebook
    account_id: str
    contact: str
    contact_name: str | None
    message_id: str
    message_type: str
    text: str
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class MetaStatus:
    channel: str
    account_id: str
    recipient: str
    message_id: str
    status: str
    occurred_at: datetime
    error_code: str | None
    error_title: str | None


class MalformedPayload(ValueError):
    """The verified body is not a Meta webhook payload we understand."""


def _from_unix_s(value: Any) -> datetime:
    try:
        return _supported(datetime.fromtimestamp(int(value), tz=UTC), value)
    except (TypeError, ValueError, OverflowError, OSError) as exc:
        raise MalformedPayload(f"bad timestamp {value!r}") from exc


def _from_unix_ms(value: Any) -> datetime:
    try:
        return _supported(datetime.fromtimestamp(int(value) / 1000, tz=UTC), value)
    except (TypeError, ValueError, OverflowError, OSError) as exc:
        raise MalformedPayload(f"bad timestamp {value!r}") from exc


def _supported(at: datetime, value: Any) -> datetime:
    # Outside the times an event can carry, the event's model refused it later, as a 500 that
    # Meta would retry for days.
    if not is_supported_time(at):
        raise MalformedPayload(f"timestamp {value!r} out of range")
    return at


def _whatsapp_text(message: dict[str, Any]) -> str:
    """A readable text for every WhatsApp message type (non-text ones still count as replies)."""
    kind = message.get("type", "unsupported")
    body = message.get(kind) if isinstance(message.get(kind), dict) else {}
    assert isinstance(body, dict)
    if kind == "text":
        return str(body.get("body", ""))
    if kind in {"image", "video", "document", "audio", "sticker"}:
        caption = body.get("caption") or body.get("filename") or ""
        return f"[{kind}] {caption}".strip()
    if kind == "location":
        place = body.get("name") or body.get("address") or ""
        where = f"{body.get('latitude')},{body.get('longitude')}"
        return f"[location] {place} {where}".replace("  ", " ").strip()
    if kind == "button":
        return str(body.get("text", "[button]"))
    if kind == "interactive":
        reply = body.get("button_reply") or body.get("list_reply") or {}
        return str(reply.get("title", "[interactive]"))
    if kind == "reaction":
        return f"[reaction] {body.get('emoji', '')}".strip()
    if kind == "contacts":
        return "[contacts]"
    return f"[{kind}]"


def parse_whatsapp(payload: dict[str, Any]) -> tuple[list[MetaMessage], list[MetaStatus]]:
    """Every message and status of every entry and change of a WhatsApp webhook."""
    messages: list[MetaMessage] = []
    statuses: list[MetaStatus] = []
    for entry in _list(payload, "entry"):
        for change in _list(entry, "changes"):
            value = change.get("value")
            if not isinstance(value, dict) or change.get("field", "messages") != "messages":
                continue
            metadata = value.get("metadata") or {}
            account_id = str(metadata.get("phone_number_id") or "")
            if not account_id:
                raise MalformedPayload("value.metadata.phone_number_id is missing")
            names = {
                str(c.get("wa_id")): (c.get("profile") or {}).get("name")
                for c in _list(value, "contacts")
            }
            for message in _list(value, "messages"):
                sender = str(message.get("from") or "")
                if not sender or not message.get("id"):
                    raise MalformedPayload("a message without from or id")
                messages.append(
                    MetaMessage(
                        channel="whatsapp",
                        account_id=account_id,
                        contact=sender,
                        contact_name=names.get(sender),
                        message_id=str(message["id"]),
                        message_type=str(message.get("type", "unsupported")),
                        text=_whatsapp_text(message),
                        occurred_at=_from_unix_s(message.get("timestamp")),
                    )
                )
            for status in _list(value, "statuses"):
                errors = _list(status, "errors")
                first_error = errors[0] if errors else {}
                statuses.append(
                    MetaStatus(
                        channel="whatsapp",
                        account_id=account_id,
                        recipient=str(status.get("recipient_id") or ""),
                        message_id=str(status.get("id") or ""),
                        status=str(status.get("status") or ""),
                        occurred_at=_from_unix_s(status.get("timestamp")),
                        error_code=str(first_error["code"]) if "code" in first_error else None,
                        error_title=first_error.get("title") or first_error.get("message"),
                    )
                )
    return messages, statuses


def parse_messaging(payload: dict[str, Any]) -> list[MetaMessage]:
    """Customer messages of an Instagram (`object: instagram`) or Messenger (`page`) webhook.

    Echoes (the business's own sends) and delivery/read receipts are not customer messages.
    """
    channel = "instagram" if payload.get("object") == "instagram" else "facebook"
    messages: list[MetaMessage] = []
    for entry in _list(payload, "entry"):
        account_id = str(entry.get("id") or "")
        for event in _list(entry, "messaging"):
            message = event.get("message")
            if not isinstance(message, dict) or message.get("is_echo"):
                continue
            sender = str((event.get("sender") or {}).get("id") or "")
            if not sender or not message.get("mid"):
                raise MalformedPayload("a messaging event without sender.id or message.mid")
            attachments = _list(message, "attachments")
            kind = (
                "text"
                if "text" in message
                else (attachments[0].get("type") if attachments else "unsupported")
            )
            text = message.get("text") or f"[{kind}]"
            messages.append(
                MetaMessage(
                    channel=channel,
                    account_id=account_id or str((event.get("recipient") or {}).get("id") or ""),
                    contact=sender,
                    contact_name=None,
                    message_id=str(message["mid"]),
                    message_type=str(kind),
                    text=str(text),
                    occurred_at=_from_unix_ms(event.get("timestamp")),
                )
            )
    return messages


def _list(container: Any, key: str) -> list[dict[str, Any]]:
    value = container.get(key) if isinstance(container, dict) else None
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise MalformedPayload(f"{key} must be a list of objects")
    return value
