# ruff: noqa: E501  (table rows read best on one line)
import json
from datetime import UTC, datetime

import pytest

from api.webhook_letters import item_bytes
from connectors.meta import (
    MalformedPayload,
    ParsedWebhook,
    matching_secret,
    parse_messaging,
    parse_whatsapp,
    signature_for,
)
from schemas.events import MAX_NAME_CHARS
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
    parsed = parse_whatsapp(payload)
    messages, statuses = parsed.messages, parsed.statuses
    assert parsed.malformed == []
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
    (message,) = parse_whatsapp(payload).messages
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
    parsed = parse_whatsapp(payload)
    messages, statuses = parsed.messages, parsed.statuses
    assert messages == []
    assert [(s.status, s.error_code) for s in statuses] == [
        ("delivered", None),
        ("failed", "131047"),
    ]
    assert statuses[1].error_title == "Re-engagement message"


@pytest.mark.parametrize(("kind", "channel"), [("instagram", "instagram"), ("page", "facebook")])
def test_instagram_and_messenger_messages(kind: str, channel: str) -> None:
    payload = messaging_payload(kind, "17841400000", "PSID123", "m_abc", 1732450000123)
    (message,) = parse_messaging(payload).messages
    assert message.channel == channel
    assert message.account_id == "17841400000"
    assert message.contact == "PSID123"
    assert message.message_id == "m_abc"
    assert message.occurred_at == datetime.fromtimestamp(1732450000.123, tz=UTC)
    attachment = messaging_payload(kind, "1", "PSID", "m_img", 1, text=None)
    assert parse_messaging(attachment).messages[0].text == "[image]"


def test_echoes_of_the_business_own_messages_are_skipped() -> None:
    payload = messaging_payload("page", "1", "PSID", "m_echo", 1, echo=True)
    assert parse_messaging(payload) == ParsedWebhook()


GOOD = whatsapp_message("wamid.good", "919800000001", 1732450000)


@pytest.mark.parametrize(
    "bad",
    [
        {"id": "wamid.1", "timestamp": "1", "type": "text"},
        whatsapp_message("w", "9198", 0) | {"timestamp": "soon"},
        # Past the times an event can carry (1970 to 2200): a 500 building it, retried by Meta.
        whatsapp_message("w", "9198", 0) | {"timestamp": "-1"},
        whatsapp_message("w", "9198", 0) | {"timestamp": "9999999999"},
        # Hostile shapes that raised TypeError or AttributeError, a 500 for the whole batch.
        whatsapp_message("w", "9198", 0) | {"type": ["text"]},
        whatsapp_message("w", {"n": 1}, 0),  # type: ignore[arg-type]
        whatsapp_message("w", "9198", 0, "interactive", button_reply="Pricing"),
        "not an object",
    ],
    ids=["no-sender", "bad-timestamp", "before-1970", "after-2200", "type-list", "sender-object",
         "reply-not-object", "not-object"],
)  # fmt: skip
def test_a_malformed_message_is_set_aside_and_the_others_are_read(bad: object) -> None:
    payload = whatsapp_payload([whatsapp_change("1", [GOOD, bad])])  # type: ignore[list-item]
    parsed = parse_whatsapp(payload)
    assert [m.message_id for m in parsed.messages] == ["wamid.good"]
    assert [item.item for item in parsed.malformed] == [bad]
    assert parsed.malformed[0].reason


def test_a_change_without_its_number_is_set_aside_whole_and_other_changes_are_read() -> None:
    nameless = {"field": "messages", "value": {"metadata": {}, "messages": [GOOD]}}
    statuses_not_list = whatsapp_change("2", [GOOD])
    statuses_not_list["value"]["statuses"] = "none"
    payload = whatsapp_payload([nameless, whatsapp_change("1", [GOOD]), statuses_not_list])
    payload["entry"].append({"id": "9", "changes": "nope"})
    parsed = parse_whatsapp(payload)
    assert [(m.account_id, m.message_id) for m in parsed.messages] == [("1", "wamid.good")]
    # The change with a bad status list gives none of its messages: set aside as one item.
    assert [item.item for item in parsed.malformed] == [
        nameless,
        statuses_not_list,
        {"id": "9", "changes": "nope"},
    ]


def test_a_contact_entry_that_cannot_be_read_costs_only_the_name() -> None:
    change = whatsapp_change("1", [GOOD])
    change["value"]["contacts"] = [{"wa_id": "919800000001", "profile": "Asha"}, 7]
    (message,) = parse_whatsapp(whatsapp_payload([change])).messages
    assert message.contact_name is None
    long_name = whatsapp_change("1", [GOOD], names={"919800000001": "A" * 500})
    (message,) = parse_whatsapp(whatsapp_payload([long_name])).messages
    assert message.contact_name == "A" * MAX_NAME_CHARS


def test_a_status_with_an_unreadable_id_is_set_aside() -> None:
    bad = whatsapp_status("wamid.9", "read", 10, "919800000001") | {"id": ["x"]}
    good = whatsapp_status("wamid.8", "read", 10, "919800000001")
    parsed = parse_whatsapp(whatsapp_payload([whatsapp_change("1", statuses=[bad, good])]))
    assert [s.message_id for s in parsed.statuses] == ["wamid.8"]
    assert [item.item for item in parsed.malformed] == [bad]


def test_a_messaging_event_without_a_readable_sender_is_set_aside() -> None:
    payload = messaging_payload("instagram", "17841400000", "PSID1", "m_1", 1732450000123)
    bad = messaging_payload("instagram", "17841400000", "PSID2", "m_2", 1)["entry"][0]["messaging"][
        0
    ]
    bad = bad | {"sender": "PSID2"}
    payload["entry"][0]["messaging"].append(bad)
    parsed = parse_messaging(payload)
    assert [m.message_id for m in parsed.messages] == ["m_1"]
    assert [item.item for item in parsed.malformed] == [bad]


@pytest.mark.parametrize(
    "payload",
    [{"object": "whatsapp_business_account", "entry": "nope"}, {"object": "page", "entry": 1}],
)
def test_a_body_without_a_list_of_entries_is_malformed(payload: dict[str, object]) -> None:
    parse = parse_messaging if payload["object"] == "page" else parse_whatsapp
    with pytest.raises(MalformedPayload):
        parse(payload)


def test_an_account_id_postgresql_cannot_hold_sets_its_part_aside() -> None:
    # Looked up as it came, a NUL in it was a 500 from PostgreSQL for the whole batch.
    parsed = parse_whatsapp(whatsapp_payload([whatsapp_change("1\x00", [GOOD]),
                                              whatsapp_change("2", [GOOD])]))  # fmt: skip
    assert [m.account_id for m in parsed.messages] == ["2"]
    assert len(parsed.malformed) == 1
    page = messaging_payload("page", "17841400000", "PSID1", "m_1", 1732450000123)
    page["entry"].insert(0, {"id": 1.5, "messaging": []})
    parsed = parse_messaging(page)
    assert [m.message_id for m in parsed.messages] == ["m_1"]  # the other entry is read
    assert [item.item for item in parsed.malformed] == [{"id": 1.5, "messaging": []}]


def test_a_set_aside_item_with_half_an_emoji_is_kept_as_ascii_json() -> None:
    item = {"id": "wamid.1", "text": {"body": "hi \ud83d"}}
    kept = item_bytes(item)
    assert kept.isascii()
    assert json.loads(kept) == item
