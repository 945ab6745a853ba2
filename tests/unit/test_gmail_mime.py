"""Parsing fetched e-mail (MIME variety) and composing replies."""

from __future__ import annotations

import base64
from email import message_from_bytes, policy

import pytest

from connectors.gmail_mime import (
    compose,
    composed_here,
    html_to_text,
    parse_message,
    reply_subject,
)

ALTERNATIVE = b"""From: "Ravi Kumar" <Ravi@Example.com>
To: sales@acme.test
Subject: Pricing for 20 seats
Message-ID: <CAF1@mail.example.com>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="b1"

--b1
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

Hi, we need a CRM for 20 seats =E2=80=94 budget around $5k.
--b1
Content-Type: text/html; charset="utf-8"

<p>Hi, we need a <b>CRM</b> for 20 seats</p>
--b1--
"""

LATIN1_QP = (
    b"From: =?iso-8859-1?q?Jos=E9_Pe=F1a?= <jose@example.es>\n"
    b"To: sales@acme.test\n"
    b"Subject: =?iso-8859-1?q?Informaci=F3n?=\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=ISO-8859-1\n"
    b"Content-Transfer-Encoding: quoted-printable\n\n"
    b"Necesitamos informaci=F3n para el pr=F3ximo a=F1o.\n"
)

BASE64_WITH_ATTACHMENT = (
    b"From: ana@example.com\nTo: sales@acme.test\nSubject: Specs\nMIME-Version: 1.0\n"
    b'Content-Type: multipart/mixed; boundary="m"\n\n'
    b"--m\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
    + base64.encodebytes(b"Attached are our specs. Timeline: Q3.")
    + b'\n--m\nContent-Type: application/pdf; name="specs.pdf"\n'
    b'Content-Disposition: attachment; filename="specs.pdf"\nContent-Transfer-Encoding: base64\n\n'
    + base64.encodebytes(b"%PDF-1.4 fake")
    + b"\n--m--\n"
)

HTML_ONLY = (
    b"From: lee@example.com\nTo: sales@acme.test\nSubject: Re: demo\nMIME-Version: 1.0\n"
    b"References: <a@x> <b@x>\nContent-Type: text/html; charset=utf-8\n\n"
    b"<html><head><style>p{color:red}</style></head><body><p>Can we talk&nbsp;tomorrow?</p>"
    b"<div>I&#39;m the founder</div><script>alert(1)</script></body></html>"
)


def test_multipart_alternative_prefers_the_plain_part() -> None:
    mail = parse_message(ALTERNATIVE)
    assert mail.sender == "ravi@example.com"
    assert mail.sender_name == "Ravi Kumar"
    assert mail.subject == "Pricing for 20 seats"
    assert mail.text == "Hi, we need a CRM for 20 seats — budget around $5k."
    assert mail.message_id == "<CAF1@mail.example.com>"
    assert mail.to == ("sales@acme.test",)


def test_iso_8859_1_quoted_printable_headers_and_body() -> None:
    mail = parse_message(LATIN1_QP)
    assert mail.sender_name == "José Peña"
    assert mail.subject == "Información"
    assert mail.text == "Necesitamos información para el próximo año."


def test_base64_body_and_attachments_named_not_read() -> None:
    mail = parse_message(BASE64_WITH_ATTACHMENT)
    assert mail.text == "Attached are our specs. Timeline: Q3."
    assert mail.attachments == ("specs.pdf",)
    assert "PDF" not in mail.text


def test_html_only_becomes_text_without_scripts_or_styles() -> None:
    mail = parse_message(HTML_ONLY)
    assert mail.text == "Can we talk tomorrow?\n\nI'm the founder"
    assert mail.references == "<a@x> <b@x>"
    assert html_to_text("<ul><li>one</li><li>two</li></ul>") == "one\n\ntwo"


def test_an_unknown_charset_is_read_rather_than_lost() -> None:
    raw = (b"From: x@example.com\nSubject: s\nContent-Type: text/plain; charset=x-unknown\n\n"
           b"hello there\n")  # fmt: skip
    assert parse_message(raw).text == "hello there"


def test_a_reply_carries_the_thread_headers() -> None:
    raw, message_id = compose(
        sender="sales@acme.test", to="ravi@example.com", subject=reply_subject("Pricing"),
        body="Thanks Ravi!", in_reply_to="<CAF1@mail.example.com>", references="<CAE0@x>",
    )  # fmt: skip
    message = message_from_bytes(base64.urlsafe_b64decode(raw), policy=policy.default)
    assert message["In-Reply-To"] == "<CAF1@mail.example.com>"
    assert message["References"] == "<CAE0@x> <CAF1@mail.example.com>"
    assert message["Subject"] == "Re: Pricing"
    assert message["Message-ID"] == message_id
    # Marked as the pipeline's: the poller does not take it for a rep's reply in Gmail.
    assert composed_here(message_id)
    assert not composed_here("<CAF1@mail.example.com>")
    assert not composed_here(None)
    assert reply_subject("RE: Pricing") == "RE: Pricing"
    assert reply_subject(None) == "Re: your message"


@pytest.mark.parametrize(
    "raw",
    [
        # Each stopped the Gmail poller, for every tenant, at every restart.
        b"From: ana@example.com\r\nMessage-ID: <\r\nSubject: Quote\r\n\r\nPrice for 20 seats?",
        b'From: ana@example.com\r\nContent-Type: text/plain; charset="ut\x00f8"\r\n'
        b"Subject: Quote\r\n\r\nPrice for 20 seats?",
        # A NUL PostgreSQL's text cannot hold: the thread's subject failed every poll.
        b"From: ana@example.com\r\nSubject: =?utf-8?q?Quo=00te?=\r\n\r\nPrice for 20 seats?",
    ],
)
def test_hostile_headers_leave_the_message_readable(raw: bytes) -> None:
    mail = parse_message(raw)
    assert (mail.sender, mail.subject, mail.text) == ("ana@example.com", "Quote",
                                                      "Price for 20 seats?")  # fmt: skip


def test_a_subject_with_a_line_break_is_one_line_and_a_reply_to_it_composes() -> None:
    mail = parse_message(
        b"From: ana@example.com\r\nSubject: =?utf-8?q?Quote=0D=0ABcc:_spy@example.com?=\r\n\r\nHi"
    )
    assert mail.subject == "Quote Bcc: spy@example.com"
    subject = reply_subject("Quote\r\nBcc: spy@example.com")  # a thread stored before
    raw, _ = compose(sender="sales@acme.test", to="ana@example.com", subject=subject, body="Sure")
    sent = message_from_bytes(base64.urlsafe_b64decode(raw), policy=policy.default)
    assert sent["Subject"] == "Re: Quote Bcc: spy@example.com"
    assert sent["Bcc"] is None


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        (b"Auto-Submitted: auto-replied\r\n", "Auto-Submitted: auto-replied"),
        (b"Precedence: auto_reply\r\n", "Precedence: auto_reply"),
        (b"X-Autoreply: yes\r\n", "X-Autoreply"),
        # The vacation responder's, whose subject is the only other sign.
        (
            b"Precedence: bulk\r\nSubject: Out of Office: back Monday\r\n",
            "Precedence: bulk, an automatic reply's subject",
        ),
    ],
)
def test_machine_mail_says_why_it_is_no_person(headers: bytes, why: str) -> None:
    # Each became a lead the AI answered: an auto-responder then answered back, and the two
    # wrote to each other on the tenant's tokens.
    raw = b"From: ana@example.com\r\n" + headers + b"Subject: Away\r\n\r\nI am out of office."
    assert parse_message(raw).automated == why
    bounce = b"From: MAILER-DAEMON@mx.example.com\r\nSubject: Undelivered\r\n\r\nFailed."
    assert parse_message(bounce).automated == "a mail system's address"
    person = b"From: ana@example.com\r\nAuto-Submitted: no\r\nSubject: Quote\r\n\r\nPrice?"
    assert parse_message(person).automated is None


@pytest.mark.parametrize(
    "headers",
    [
        # A Google Group delivering the tenant's sales@: every lead's mail carries these.
        b"List-ID: <sales.acme.test>\r\nList-Unsubscribe: <mailto:x@acme.test>\r\n"
        b"Precedence: list\r\n",
        # A web form's notice (RFC 3834), and one sent through a mailing service.
        b"Auto-Submitted: auto-generated\r\nList-Unsubscribe: <https://x.example/u>\r\n",
    ],
)
def test_mail_a_list_or_a_form_delivers_is_still_a_lead(headers: bytes) -> None:
    raw = b"From: ana@example.com\r\n" + headers + b"Subject: Quote\r\n\r\nPrice for 20 seats?"
    assert parse_message(raw).automated is None


def test_reply_to_is_trusted_only_from_a_no_reply_address() -> None:
    # Not authenticated: from anyone, a stranger's mail joined another lead's history.
    raw = (b"From: x@evil.example\r\nReply-To: victim@bigcorp.example\r\n"
           b"Subject: Not interested\r\n\r\nCancel everything.")  # fmt: skip
    assert parse_message(raw).sender == "x@evil.example"


def test_a_form_notice_is_the_lead_of_its_reply_to() -> None:
    # From a form's no-reply address with the person in Reply-To: every such lead was one
    # "noreply" lead, and replies went to the form.
    raw = (
        b"From: Site Forms <noreply@forms.example.com>\r\n"
        b"Reply-To: Gus Lee <Gus@Example.com>\r\nSubject: New enquiry\r\n\r\n10 seats?"
    )
    mail = parse_message(raw)
    assert (mail.sender, mail.sender_name, mail.automated) == ("gus@example.com", "Gus Lee", None)


@pytest.mark.parametrize(
    "raw",
    [
        # Gmail's plain part: the attribution wrapped over two lines, then "> " lines.
        b"From: gus@example.com\r\nSubject: Re: Pricing\r\n\r\nSounds good, 10 seats.\r\n\r\n"
        b"On Mon, 1 Dec 2026 at 10:00, Acme Sales <sales@acme.test>\r\nwrote:\r\n"
        b"> Pro is 2,000 USD a month, from next week.\r\n",
        # Its HTML part alone: the quote in a blockquote.
        b"From: gus@example.com\r\nSubject: Re: Pricing\r\nContent-Type: text/html\r\n\r\n"
        b'<div dir="ltr">Sounds good, 10 seats.</div><div class="gmail_quote">'
        b'<div class="gmail_attr">On Mon, 1 Dec 2026, Acme Sales wrote:</div>'
        b'<blockquote class="gmail_quote" style="margin:0 0 0 .8ex">Pro is 2,000 USD a month,'
        b" from next week.</blockquote></div>",
        # Outlook's.
        b"From: gus@example.com\r\nSubject: RE: Pricing\r\n\r\nSounds good, 10 seats.\r\n"
        b"-----Original Message-----\r\nFrom: Acme Sales\r\nPro is 2,000 USD a month.\r\n",
    ],
    ids=["gmail-plain", "gmail-html", "outlook"],
)
def test_a_reply_is_its_own_words_without_the_quoted_mail(raw: bytes) -> None:
    # The whole thread went to the AI: our own quoted price became the lead's budget.
    assert parse_message(raw).text == "Sounds good, 10 seats."


def test_a_message_that_is_all_quote_is_kept_whole() -> None:
    raw = b"From: gus@example.com\r\nSubject: Fwd\r\n\r\n> Pro is 2,000 USD a month.\r\n"
    assert parse_message(raw).text == "> Pro is 2,000 USD a month."
    forward = (b"From: gus@example.com\r\nSubject: Fwd\r\nContent-Type: text/html\r\n\r\n"
               b'<blockquote type="cite">Need 20 seats by March.</blockquote>')  # fmt: skip
    assert parse_message(forward).text == "Need 20 seats by March."


def test_answers_between_quoted_lines_and_an_own_greater_than_stay() -> None:
    # Cut at the attribution, an inline reply lost every answer; a line of the lead's own
    # beginning with ">" was dropped too.
    inline = (b"From: gus@example.com\r\nSubject: Re: Questions\r\n\r\nHi,\r\n\r\n"
              b"On Mon, 1 Dec 2026, Acme Sales wrote:\r\n> What is your budget?\r\n"
              b"About $20,000.\r\n> When would you start?\r\nNext month.\r\n")  # fmt: skip
    text = parse_message(inline).text
    assert "About $20,000." in text
    assert "Next month." in text
    own = (b"From: gus@example.com\r\nSubject: Size\r\n\r\n"
           b"We have\r\n> 200 employees in 3 cities.\r\nThanks")  # fmt: skip
    assert parse_message(own).text == "We have\n> 200 employees in 3 cities.\nThanks"
