"""How leads and events are identified.

A lead id is derived from (tenant, channel, contact address), so replays and duplicates of a
customer's messages always land on the same lead and the same partition.
"""

from __future__ import annotations

import re
import uuid

from schemas.ids import name_based_id

_LEAD_NAMESPACE = uuid.UUID("6f1c2a53-6a43-4d7e-9d0b-2f5e1b7c9a10")
_EVENT_NAMESPACE = uuid.UUID("0b8f3c1e-52d4-4e8a-a1f7-3c9d6e2b4f81")
_PHONE_CHANNELS = frozenset({"whatsapp", "sms"})
_NON_DIGITS = re.compile(r"\D")


class InvalidContact(ValueError):
    """The contact address cannot identify a customer on its channel."""


# An e-mail address's longest (RFC 3696 errata), and the events' limit.
MAX_CONTACT_LENGTH = 320


def normalize_contact(channel: str, contact: str) -> str:
    """The canonical form of a contact address on a channel.

    Phone numbers keep only their digits (`+91 98000-00001` and `919800000001` are one person);
    e-mail addresses are case-insensitive in practice; other channels' ids are kept as sent.
    """
    normalized = _normalized(channel, contact.strip())
    # Measured normalised: lowering can lengthen a string ("İ" is two characters lowered).
    if len(normalized) > MAX_CONTACT_LENGTH:
        raise InvalidContact(f"contact must be at most {MAX_CONTACT_LENGTH} characters")
    return normalized


def _normalized(channel: str, stripped: str) -> str:
    if channel in _PHONE_CHANNELS:
        digits = _NON_DIGITS.sub("", stripped)
        if not 6 <= len(digits) <= 15:
            raise InvalidContact(f"a {channel} contact must be a phone number of 6 to 15 digits")
        return digits
    if channel == "email":
        if stripped.count("@") != 1 or stripped.startswith("@") or stripped.endswith("@"):
            raise InvalidContact("an email contact must be an address like name@example.com")
        return stripped.lower()
    if not stripped:
        raise InvalidContact("contact must not be blank")
    return stripped


def lead_id_for(tenant_id: str, channel: str, contact: str) -> str:
    """The lead id of a (tenant, channel, contact); `contact` must already be normalised."""
    return name_based_id(_LEAD_NAMESPACE, f"{tenant_id}\x1f{channel}\x1f{contact}")


def inbound_event_id(tenant_id: str, channel: str, channel_message_id: str) -> str:
    """A deterministic event id for a message the channel identified, so a retry is one event."""
    return name_based_id(_EVENT_NAMESPACE, f"{tenant_id}\x1f{channel}\x1f{channel_message_id}")
