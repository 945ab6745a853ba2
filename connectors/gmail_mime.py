"""E-mail as the pipeline reads and writes it: parsing a fetched message, composing a reply.

Pure: bytes in, values out (stdlib `email` with the modern policy decodes charsets and
transfer encodings; `html.parser` turns an HTML-only body into text).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage, MIMEPart
from email.utils import getaddresses, make_msgid, parseaddr
from html.parser import HTMLParser


@dataclass(frozen=True)
class ParsedMail:
    sender: str  # lower-case address
    sender_name: str | None
    to: tuple[str, ...]  # To and Cc, lower-case addresses
    subject: str
    text: str
    message_id: str | None  # RFC 822 Message-ID, with angle brackets
    references: str | None
    attachments: tuple[str, ...] = field(default=())
    # Why a machine sent it (an auto-reply, a bounce, a mailing list), or None for a person's.
    automated: str | None = None
    # The one Reply-To address (lower-case) and its name, when there is exactly one.
    reply_to: str | None = None
    reply_to_name: str | None = None
    # The From address (lower-case) as written: `sender` is the Reply-To person's for a
    # form's or platform's notice.
    from_address: str = ""


class _HtmlText(HTMLParser):
    _BLOCKS = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "blockquote"})
    _SKIPPED = frozenset({"script", "style", "head"})

    def __init__(self, skip_quotes: bool) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_quotes = skip_quotes
        self._skip = 0
        # Open blockquotes, and whether each is a reply's quote (then skipped with its inside).
        self._quotes: list[bool] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIPPED:
            self._skip += 1
        elif tag == "blockquote":
            # A reply's quote of the mail before: Apple's and Thunderbird's type="cite",
            # Gmail's class="gmail_quote". Not any blockquote (Gmail's "indent" is one).
            values = dict(attrs)
            quoted = self._skip_quotes and (
                values.get("type") == "cite" or "gmail_quote" in (values.get("class") or "")
            )
            self._quotes.append(quoted)
            self._skip += quoted
            self.parts.append("\n")
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIPPED and self._skip:
            self._skip -= 1
        elif tag == "blockquote":
            if self._quotes and self._quotes.pop():
                self._skip -= 1
            self.parts.append("\n")
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


# Where a reply's quote of the mail before starts: Gmail's and Apple's attribution ("On Mon,
# 1 Dec 2026 at 10:00, Gus <gus@example.com> wrote:", sometimes wrapped over two lines), quoted
# with ">" after it, and Outlook's "-----Original Message-----" or its rule of underscores, the
# whole mail before following unquoted.
_ATTRIBUTION = re.compile(
    r"^On\b[^\n]{0,300}(?:\n[^\n]{0,300})?\bwrote:[ \t]*$", re.MULTILINE | re.IGNORECASE
)
_OUTLOOK_QUOTE = re.compile(r"^(?:-{2,} ?Original Message ?-{2,}|_{10,})[ \t]*$", re.MULTILINE)


def without_quoted(text: str) -> str:
    """The lead's own words of a reply, without the mail before that it quotes at its end.
    Kept, the AI read our own earlier prices and dates as the lead's facts, and the tenant
    paid tokens for the whole thread. Only a quote that ends the message is cut: answers
    written between quoted lines (inline replies) stay, and a message that is all quote (a
    forward) is kept whole."""
    text = text.replace("\r\n", "\n")
    own = text
    outlook = _OUTLOOK_QUOTE.search(own)
    if outlook is not None:
        own = own[: outlook.start()]
    attribution = _ATTRIBUTION.search(own)
    if attribution is not None and all(
        line.lstrip().startswith(">")
        for line in own[attribution.end() :].splitlines()
        if line.strip()
    ):
        own = own[: attribution.start()]
    else:
        # A trailing block of ">" lines without an attribution: the same quote.
        lines = own.rstrip().splitlines()
        while lines and (lines[-1].lstrip().startswith(">") or not lines[-1].strip()):
            lines.pop()
        own = "\n".join(lines)
    return own.strip() or text.strip()


def html_to_text(html: str, *, skip_quotes: bool = True) -> str:
    parser = _HtmlText(skip_quotes)
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    lines = [re.sub(r"[ \t\xa0]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def parse_message(raw: bytes) -> ParsedMail:
    """The sender, subject, text (text/plain preferred, else HTML as text) and attachment names."""
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    name, address = parseaddr(_header_text(message, "From"))
    from_address = address.strip().lower()
    # A web form's or a lead platform's notice comes from its no-reply address with the
    # person in Reply-To: the lead is the person, and replies go to them. Only from such an
    # address: Reply-To is not authenticated (DMARC checks From), and trusted on any mail, a
    # stranger's mail would have joined another lead's history.
    replies_to = getaddresses([_header_text(message, "Reply-To")])
    one_reply_to = replies_to[0] if len(replies_to) == 1 and "@" in replies_to[0][1] else None
    if (
        len(replies_to) == 1
        and "@" in replies_to[0][1]
        and _NO_REPLY.match(address.strip().lower().split("@", 1)[0])
    ):
        reply_name, reply_address = replies_to[0]
        if reply_address.strip().lower() != address.strip().lower():
            name, address = reply_name or name, reply_address
    attachments = tuple(
        part.get_filename() or part.get_content_type()
        for part in message.iter_attachments()
        if part.get_content_disposition() == "attachment" or part.get_filename()
    )
    body = message.get_body(preferencelist=("plain", "html"))
    text = ""
    if body is not None:
        content = _content(body).replace("\x00", "")
        if body.get_content_type() == "text/html":
            # All quote (a forward in a blockquote): kept whole, as a plain one is.
            text = without_quoted(html_to_text(content)) or html_to_text(content, skip_quotes=False)
        else:
            text = without_quoted(content)
    return ParsedMail(
        sender=address.strip().lower(),
        sender_name=name.strip() or None,
        to=tuple(
            a.strip().lower()
            for _, a in getaddresses([_header_text(message, "To"), _header_text(message, "Cc")])
            if a.strip()
        ),
        # One line: a subject is a header again in every reply ("hi=0D=0ABcc: …" decodes to
        # two lines, and composing the reply failed).
        subject=_header_text(message, "Subject"),
        text=text.strip(),
        message_id=_header(message, "Message-ID"),
        references=_header(message, "References"),
        attachments=attachments,
        automated=_automated(message, address.strip().lower()),
        reply_to=one_reply_to[1].strip().lower() if one_reply_to else None,
        reply_to_name=(one_reply_to[0].strip() or None) if one_reply_to else None,
        from_address=from_address,
    )


# Senders that are a mail system, never a person (bounces, delivery reports).
_SYSTEM_SENDERS = frozenset({"mailer-daemon", "postmaster"})
_AUTO_SUBJECT = re.compile(
    r"^\s*(?:auto(?:matic)?[ -]?(?:reply|response)|out of (?:the )?office|away from|on vacation|"
    r"vacation|autoreply)",
    re.IGNORECASE,
)
# Addresses of forms and platforms that send for someone else, who is in Reply-To.
_NO_REPLY = re.compile(
    r"^(?:no-?reply|do-?not-?reply|notifications?|notify|forms?|wordpress|webforms?|mailer)"
    r"(?:[+._-].*)?$"
)


def _automated(message: EmailMessage, sender: str) -> str | None:
    """Why the message is an automatic answer (RFC 3834's Auto-Submitted: auto-replied, an
    auto-reply's Precedence or X- header, a bounce), or None. Such mail is no lead:
    answered, it answers back, and the AI and the auto-responder write to each other. Not a
    mailing list's headers, nor Auto-Submitted: auto-generated: a Google Group delivering
    sales@ and a web form's notice carry those, and their mail is the leads'."""
    auto_submitted = _header_text(message, "Auto-Submitted").lower()
    if auto_submitted.startswith("auto-replied"):
        return f"Auto-Submitted: {auto_submitted}"
    precedence = _header_text(message, "Precedence").lower()
    if precedence in {"junk", "auto_reply"}:
        return f"Precedence: {precedence}"
    # The classic vacation responder marks its answers "bulk" only; a list's mail is bulk too,
    # so its subject tells them apart.
    if precedence == "bulk" and _AUTO_SUBJECT.match(_header_text(message, "Subject")):
        return "Precedence: bulk, an automatic reply's subject"
    for header in ("X-Autoreply", "X-Autorespond"):
        if _header_text(message, header):
            return header
    if message.get_content_type() == "multipart/report":
        return "a delivery report"
    if sender.split("@", 1)[0] in _SYSTEM_SENDERS:
        return "a mail system's address"
    return None


def _content(part: MIMEPart) -> str:
    try:
        content = part.get_content()
    # ValueError: a charset name with a NUL in it.
    except (LookupError, UnicodeDecodeError, ValueError):
        # An unknown or lying charset: keep the text readable rather than lose the message.
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return content if isinstance(content, str) else ""


def _header(message: EmailMessage, name: str) -> str | None:
    return _header_text(message, name) or None


def _header_text(message: EmailMessage, name: str) -> str:
    """A header's text on one line (every occurrence of it, comma-joined); its raw text where
    the parser of its kind fails on hostile mail (`Message-ID: <` raised an IndexError, some
    group addresses an AttributeError), rather than the whole message lost."""
    try:
        values = [str(value) for value in message.get_all(name, [])]
    except (LookupError, AttributeError, ValueError, TypeError):  # the header registry's
        values = [str(value) for key, value in message.raw_items() if key.lower() == name.lower()]
    # No NUL: PostgreSQL's text holds none (a thread's subject with one failed every poll).
    return " ".join(", ".join(values).replace("\x00", "").split())


def compose(
    *,
    sender: str,
    to: str,
    subject: str,
    body: str,
    in_reply_to: str | None = None,
    references: str | None = None,
) -> tuple[str, str]:
    """An RFC 822 message as Gmail's `raw` (base64url) and its Message-ID."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = " ".join(subject.split())  # a line break would end the header
    message_id = make_msgid(_PIPELINE_MARK, domain=sender.rsplit("@", 1)[-1] or None)
    message["Message-ID"] = message_id
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
        message["References"] = f"{references} {in_reply_to}" if references else in_reply_to
    message.set_content(body)
    return base64.urlsafe_b64encode(message.as_bytes()).decode(), message_id


# In the Message-ID of every mail the pipeline composes (make_msgid appends ".flexoraa"
# before the "@"): the poller reads the mailbox's sent mail for the replies reps write in
# Gmail itself, and these it recorded already when it sent them.
_PIPELINE_MARK = "flexoraa"


def composed_here(message_id: str | None) -> bool:
    """Whether a Message-ID is of a mail the pipeline composed (an AI or API send)."""
    return message_id is not None and f".{_PIPELINE_MARK}@" in message_id


def reply_subject(subject: str | None) -> str:
    subject = (subject or "").strip()
    if not subject:
        return "Re: your message"
    return subject if subject.lower().startswith("re:") else f"Re: {subject}"
