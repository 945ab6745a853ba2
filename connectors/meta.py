"""Meta webhooks (WhatsApp Cloud API, Instagram, Messenger): signatures and normalisation.

Pure functions: the raw body and the candidate secrets in, plain records out. The API route
does the I/O around them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas.events import MAX_NAME_CHARS, is_supported_time

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
    # As received: set aside as it came if the event built from it is refused.
    item: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


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
    item: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


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


def _whatsapp_text(message: dict[str, Any], kind: str) -> str:
    """A readable text for every WhatsApp message type (non-text ones still count as replies)."""
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
        reply = _object(body, "button_reply") or _object(body, "list_reply")
        return str(reply.get("title", "[interactive]"))
    if kind == "reaction":
        return f"[reaction] {body.get('emoji', '')}".strip()
    if kind == "contacts":
        return "[contacts]"
    return f"[{kind}]"


@dataclass(frozen=True, slots=True)
class MalformedItem:
    """A part of a verified webhook that is not what Meta documents, kept as received."""

    reason: str
    item: Any


@dataclass(slots=True)
class ParsedWebhook:
    """What a verified webhook carried. A malformed part is set aside alone: answering the
    whole batch with an error would hold its valid messages in Meta's retries, which would
    fail the same way each time."""

    messages: list[MetaMessage] = field(default_factory=list)
    statuses: list[MetaStatus] = field(default_factory=list)
    malformed: list[MalformedItem] = field(default_factory=list)

    def set_aside(self, item: Any, exc: MalformedPayload) -> None:
        self.malformed.append(MalformedItem(str(exc), item))


def parse_whatsapp(payload: dict[str, Any]) -> ParsedWebhook:
    """Every message and status of every entry and change of a WhatsApp webhook; raises
    MalformedPayload only when the body has no readable list of entries."""
    parsed = ParsedWebhook()
    for entry in _objects(payload, "entry", parsed):
        try:
            changes = _objects(entry, "changes", parsed)
        except MalformedPayload as exc:
            parsed.set_aside(entry, exc)
            continue
        for change in changes:
            try:
                _parse_whatsapp_change(change, parsed)
            except MalformedPayload as exc:
                parsed.set_aside(change, exc)
    return parsed


def _parse_whatsapp_change(change: dict[str, Any], parsed: ParsedWebhook) -> None:
    value = change.get("value")
    if not isinstance(value, dict) or change.get("field", "messages") != "messages":
        return
    account_id = _text(_object(value, "metadata").get("phone_number_id"))
    if not account_id:
        raise MalformedPayload("value.metadata.phone_number_id is missing")
    # Read before any message is taken, so a change is either parsed or set aside whole.
    messages = _objects(value, "messages", parsed)
    statuses = _objects(value, "statuses", parsed)
    names = _contact_names(value)
    for message in messages:
        try:
            parsed.messages.append(_whatsapp_message(account_id, message, names))
        except MalformedPayload as exc:
            parsed.set_aside(message, exc)
    for status in statuses:
        try:
            parsed.statuses.append(_whatsapp_status(account_id, status))
        except MalformedPayload as exc:
            parsed.set_aside(status, exc)


def _contact_names(value: dict[str, Any]) -> dict[str, str]:
    """Profile names by wa_id. Display only: a contact entry that cannot be read costs its
    name, never its message."""
    contacts = value.get("contacts")
    names: dict[str, str] = {}
    for contact in contacts if isinstance(contacts, list) else []:
        profile = contact.get("profile") if isinstance(contact, dict) else None
        name = profile.get("name") if isinstance(profile, dict) else None
        if isinstance(name, str) and name:
            names[str(contact.get("wa_id"))] = name[:MAX_NAME_CHARS]
    return names


def _whatsapp_message(
    account_id: str, message: dict[str, Any], names: dict[str, str]
) -> MetaMessage:
    sender = _text(message.get("from"))
    message_id = _text(message.get("id"))
    if not sender or not message_id:
        raise MalformedPayload("a message without from or id")
    kind = message.get("type", "unsupported")
    if not isinstance(kind, str):
        raise MalformedPayload(f"message type {kind!r} is not a string")
    return MetaMessage(
        channel="whatsapp",
        account_id=account_id,
        contact=sender,
        contact_name=names.get(sender),
        message_id=message_id,
        message_type=kind,
        text=_whatsapp_text(message, kind),
        occurred_at=_from_unix_s(message.get("timestamp")),
        item=message,
    )


def _whatsapp_status(account_id: str, status: dict[str, Any]) -> MetaStatus:
    errors = _objects(status, "errors")
    first_error = errors[0] if errors else {}
    title = first_error.get("title") or first_error.get("message")
    return MetaStatus(
        channel="whatsapp",
        account_id=account_id,
        recipient=_text(status.get("recipient_id")),
        message_id=_text(status.get("id")),
        status=_text(status.get("status")),
        occurred_at=_from_unix_s(status.get("timestamp")),
        error_code=str(first_error["code"]) if "code" in first_error else None,
        error_title=str(title) if title else None,
        item=status,
    )


def parse_messaging(payload: dict[str, Any]) -> ParsedWebhook:
    """Customer messages of an Instagram (`object: instagram`) or Messenger (`page`) webhook;
    raises MalformedPayload only when the body has no readable list of entries.

    Echoes (the business's own sends) and delivery/read receipts are not customer messages.
    """
    channel = "instagram" if payload.get("object") == "instagram" else "facebook"
    parsed = ParsedWebhook()
    for entry in _objects(payload, "entry", parsed):
        try:
            events = _objects(entry, "messaging", parsed)
            account_id = _text(entry.get("id"))
        except MalformedPayload as exc:
            parsed.set_aside(entry, exc)
            continue
        for event in events:
            try:
                message = _messaging_message(channel, account_id, event)
            except MalformedPayload as exc:
                parsed.set_aside(event, exc)
                continue
            if message is not None:
                parsed.messages.append(message)
    return parsed


def _messaging_message(channel: str, account_id: str, event: dict[str, Any]) -> MetaMessage | None:
    message = event.get("message")
    if not isinstance(message, dict) or message.get("is_echo"):
        return None
    sender = _text(_object(event, "sender").get("id"))
    message_id = _text(message.get("mid"))
    if not sender or not message_id:
        raise MalformedPayload("a messaging event without sender.id or message.mid")
    attachments = _objects(message, "attachments")
    kind = (
        "text"
        if "text" in message
        else (attachments[0].get("type") if attachments else "unsupported")
    )
    text = message.get("text") or f"[{kind}]"
    return MetaMessage(
        channel=channel,
        account_id=account_id or _text(_object(event, "recipient").get("id")),
        contact=sender,
        contact_name=None,
        message_id=message_id,
        message_type=str(kind),
        text=str(text),
        occurred_at=_from_unix_ms(event.get("timestamp")),
        item=event,
    )


def _objects(
    container: dict[str, Any], key: str, parsed: ParsedWebhook | None = None
) -> list[dict[str, Any]]:
    """The objects listed under `key`; an item that is not an object is set aside in `parsed`
    (ignored without it: a detail of an item), a value that is not a list makes the container
    malformed."""
    value = container.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedPayload(f"{key} must be a list of objects")
    objects = []
    for item in value:
        if isinstance(item, dict):
            objects.append(item)
        elif parsed is not None:
            parsed.set_aside(item, MalformedPayload(f"an item of {key} is not an object"))
    return objects


def _object(container: dict[str, Any], key: str) -> dict[str, Any]:
    value = container.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedPayload(f"{key} must be an object")
    return value


def _text(value: Any) -> str:
    """An identifier Meta sends as a string (or, for some ids, a number); '' when absent."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MalformedPayload(f"{value!r} is not an identifier")
    text = str(value)
    # Looked up in PostgreSQL, whose text holds neither a NUL nor a lone surrogate (a 500).
    if "\x00" in text or not text.isprintable():
        raise MalformedPayload(f"{text!r} is not an identifier")
    return text
