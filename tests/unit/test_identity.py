import pytest

from streams.rules.identity import (
    InvalidContact,
    inbound_event_id,
    lead_id_for,
    normalize_contact,
)

TENANT = "6b0f0d3e-0000-4000-8000-000000000001"
OTHER_TENANT = "6b0f0d3e-0000-4000-8000-000000000002"


@pytest.mark.parametrize(
    ("channel", "raw", "normal"),
    [
        ("whatsapp", "+91 98000-00001", "919800000001"),
        ("whatsapp", "919800000001", "919800000001"),
        ("sms", "(555) 000-1111", "5550001111"),
        ("email", "  Asha@Example.COM ", "asha@example.com"),
        ("instagram", " 17841400000000 ", "17841400000000"),
        ("webchat", "visitor-42", "visitor-42"),
    ],
)
def test_normalize_contact(channel: str, raw: str, normal: str) -> None:
    assert normalize_contact(channel, raw) == normal


@pytest.mark.parametrize(
    ("channel", "raw"),
    [
        ("whatsapp", "not a number"),
        ("whatsapp", "12345"),
        ("whatsapp", "1" * 16),
        ("email", "no-at-sign"),
        ("email", "a@b@c"),
        ("email", "@example.com"),
        ("facebook", "   "),
        # Past an event's 320 characters: a 500 from the API, a mailbox's intake held.
        ("email", "x" * 400 + "@spam.example.com"),
        ("email", "İ" * 300 + "@x.io"),  # 305 characters, 605 lowered
        ("instagram", "9" * 321),
    ],
)
def test_invalid_contacts_are_refused(channel: str, raw: str) -> None:
    with pytest.raises(InvalidContact):
        normalize_contact(channel, raw)


def test_lead_id_is_stable_and_scoped() -> None:
    lead = lead_id_for(TENANT, "whatsapp", "919800000001")
    assert lead == lead_id_for(TENANT, "whatsapp", "919800000001")
    assert lead != lead_id_for(OTHER_TENANT, "whatsapp", "919800000001")
    assert lead != lead_id_for(TENANT, "sms", "919800000001")
    assert lead != lead_id_for(TENANT, "whatsapp", "919800000002")


def test_event_id_of_a_channel_message_is_deterministic() -> None:
    first = inbound_event_id(TENANT, "whatsapp", "wamid.ABC")
    assert first == inbound_event_id(TENANT, "whatsapp", "wamid.ABC")
    assert first != inbound_event_id(TENANT, "whatsapp", "wamid.ABD")
    assert first != inbound_event_id(OTHER_TENANT, "whatsapp", "wamid.ABC")
