# ruff: noqa: E501  (table rows read best on one line)
from datetime import UTC, datetime

import pytest

from connectors.meta import (
    MalformedPayload,
    matching_secret,
    parse_messaging,
    parse_whatsapp,
    signature_for,
)
from tests.fakes.meta_payloads import (
    messaging_payload,
    whatsapp_change,
    whatsapp_message,
    whatsapp_payload,
    whatsapp_status,
)

BODY = b'{"object": "whatsapp_business_account", "entry": []}'


def test_signature_matches_the_right_secret_only() -> None:
    header = signature_for(BODY, "secret-b")
    assert matching_secret(BODY, header, ["secret-a", "secret-b"]) == "secret-b"
    assert matching_secret(BODY, header, ["secret-a"]) is None


@pytest.mark.parametrize(
    "header",
    [None, "", "sha256=", "sha1=" + "0" * 40, signature_for(BODY, "secret").replace("sha256=", "")],
    ids=["missing", "empty", "no-digest", "wrong-prefix", "no-prefix"],
)
def test_bad_signature_headers_match_nothing(header: str | None) -> None:
    assert matching_secret(BODY, header, ["secret"]) is None


def test_a_valid_signature_over_a_different_body_matches_nothing() -> None:
    header = signature_for(BODY, "secret")
    assert matching_secret(BODY + b" ", header, ["secret"]) is None


def test_every_message_of_every_entry_and_change() -> None:
    payload = whatsapp_payload(
        [
            whatsapp_change("111", [whatsapp_message("wamid.1", "919800000001", 1732450000)]),
            whatsapp_change(
                "111",
                [
                    whatsapp_message("wamid.2", "919800000002", 1732450001, body="two"),
                    whatsapp_message("wamid.3", "919800000002", 1732450002, body="three"),
                ],
                names={"919800000002": "Ravi"},
            ),
        ],
        [whatsapp_change("222", [whatsapp_message("wamid.4", "15550002222", 1732450003)])],
    )
    messages, statuses = parse_whatsapp(payload)
    assert [(m.account_id, m.message_id) for m in messages] == [
        ("111", "wamid.1"),
        ("111", "wamid.2"),
        ("111", "wamid.3"),
        ("222", "wamid.4"),
    ]
    assert messages[1].contact_name == "Ravi"
    assert messages[1].text == "two"
    assert messages[0].occurred_at == datetime.fromtimestamp(1732450000, tz=UTC)
    assert statuses == []


# fmt: off
MESSAGE_TYPES = [
        ("image", {"id": "m1", "mime_type": "image/jpeg", "caption": "my invoice"}, "[image] my invoice"),
        ("audio", {"id": "m2", "mime_type": "audio/ogg"}, "[audio]"),
        ("video", {"id": "m3", "caption": "demo"}, "[video] demo"),
        ("document", {"id": "m4", "filename": "quote.pdf"}, "[document] quote.pdf"),
        ("sticker", {"id": "m5"}, "[sticker]"),
        ("location", {"latitude": 12.97, "longitude": 77.59, "name": "Office"}, "[location] Office 12.97,77.59"),
        ("button", {"text": "Yes, call me", "payload": "YES"}, "Yes, call me"),
        ("interactive", {"type": "button_reply", "button_reply": {"id": "b1", "title": "Pricing"}}, "Pricing"),
        ("reaction", {"message_id": "wamid.x", "emoji": "👍"}, "[reaction] 👍"),
        ("contacts", {}, "[contacts]"),
        ("unsupported", {}, "[unsupported]"),
]
# fmt: on


@pytest.mark.parametrize(("kind", "content", "text"), MESSAGE_TYPES)
def test_every_message_type_is_a_customer_message(
    kind: str, content: dict[str, object], text: str
) -> None:
    payload = whatsapp_payload(
        [whatsapp_change("111", [whatsapp_message("wamid.t", "919800000001", 1, kind, **content)])]
    )
    (message,), _ = parse_whatsapp(payload)
    assert message.message_type == kind
    assert message.text == text


def test_statuses_are_parsed_with_errors() -> None:
    payload = whatsapp_payload(
        [
            whatsapp_change(
                "111",
                statuses=[
                    whatsapp_status("wamid.9", "delivered", 10, "919800000001"),
                    whatsapp_status("wamid.9", "failed", 11, "919800000001", error_code=131047),
                ],
            )
        ]
    )
    messages, statuses = parse_whatsapp(payload)
    assert messages == []
    assert [(s.status, s.error_code) for s in statuses] == [
        ("delivered", None),
        ("failed", "131047"),
    ]
    assert statuses[1].error_title == "Re-engagement message"


@pytest.mark.parametrize(("kind", "channel"), [("instagram", "instagram"), ("page", "facebook")])
def test_instagram_and_messenger_messages(kind: str, channel: str) -> None:
    payload = messaging_payload(kind, "17841400000", "PSID123", "m_abc", 1732450000123)
    (message,) = parse_messaging(payload)
    assert message.channel == channel
    assert message.account_id == "17841400000"
    assert message.contact == "PSID123"
    assert message.message_id == "m_abc"
    assert message.occurred_at == datetime.fromtimestamp(1732450000.123, tz=UTC)
    attachment = messaging_payload(kind, "1", "PSID", "m_img", 1, text=None)
    assert parse_messaging(attachment)[0].text == "[image]"


def test_echoes_of_the_business_own_messages_are_skipped() -> None:
    payload = messaging_payload("page", "1", "PSID", "m_echo", 1, echo=True)
    assert parse_messaging(payload) == []


@pytest.mark.parametrize(
    "payload",
    [
        {"object": "whatsapp_business_account", "entry": "nope"},
        whatsapp_payload([{"field": "messages", "value": {"metadata": {}, "messages": []}}]),
        whatsapp_payload(
            [whatsapp_change("1", [{"id": "wamid.1", "timestamp": "1", "type": "text"}])]
        ),
        whatsapp_payload(
            [whatsapp_change("1", [whatsapp_message("w", "9198", 0) | {"timestamp": "soon"}])]
        ),
        # Past the times an event can carry (1970 to 2200): a 500 building it, retried by Meta.
        whatsapp_payload(
            [whatsapp_change("1", [whatsapp_message("w", "9198", 0) | {"timestamp": "-1"}])]
        ),
        whatsapp_payload(
            [whatsapp_change("1", [whatsapp_message("w", "9198", 0) | {"timestamp": "9999999999"}])]
        ),
    ],
    ids=[
        "entry-not-list",
        "no-phone-number-id",
        "no-sender",
        "bad-timestamp",
        "before-1970",
        "after-2200",
    ],
)
def test_malformed_payloads_are_refused(payload: dict[str, object]) -> None:
    with pytest.raises(MalformedPayload):
        parse_whatsapp(payload)
