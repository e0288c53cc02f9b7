"""Mail in: what a message to the list's address means, and what we do about it.

Messages reach us through the SMTP listener (``digest.mailin.listener``) or an IMAP poll
(``digest.mailin.imap``); both call ``process``. A message is read once into an ``Inbound`` (what it
is, whom it names), then ``handle`` acts on it in the caller's transaction:

A ``From:`` header proves nothing, so nothing here acts on it alone:

* ``+subscribe`` (or subject / first line "subscribe"): double opt-in for the sender; the
  confirmation goes to that address, so a forged sender cannot subscribe someone else, and it
  changes nothing about an existing address until its link is clicked.
* ``+unsubscribe-<token>`` (the ``List-Unsubscribe`` mailto): unsubscribed at once (the token
  proves whose link it is), with a short confirmation.
* "unsubscribe" without a token: the named address, if subscribed, is mailed its one-click
  link; nothing changes until the mailbox's owner uses it.
* delivery-status reports (RFC 3464) to ``+bounce-<token>``: 5.x.x bounces the subscriber,
  4.x.x counts toward the windowed soft-bounce score.
* abuse reports (ARF, RFC 5965, feedback type abuse or fraud) that name a delivery we signed —
  sent to its ``+bounce-<token>``, or quoting its headers with a token of ours in them: a
  complaint is recorded once per delivery and that recipient stops getting mail.
* everything else (auto-replies, junk, forged tokens, other feedback types): one log line, no
  change, no answer.

Every mail we send in answer (confirmations, links) goes out after the SMTP answer, within the
confirmation limits (``digest.subscribers.confirmation_limits``), so the answer and its timing say nothing
about the address. Messages with too many MIME parts or too deep a nesting are refused as
malformed before the parser sees them.

The standard library's header parser costs about the square of a field's length (a folded
297 kB ``From:`` took 14 s of CPU) and its body parser about 0.2 s per MB, so a stranger's
message must not reach it whole: a header block over ``MAX_HEADER_BLOCK``, a field over
``MAX_HEADER_FIELD`` or more than ``MAX_HEADER_FIELDS`` fields is refused unparsed
(``Kind.OVERSIZE``: the listener answers 552, IMAP skips it), only the first
``MAX_PARSED_BYTES`` are parsed (commands and reports sit at the start), header fields inside
parts are cut to ``MAX_HEADER_FIELD``, and header fields are read as sent (addresses by the
linear ``email.utils`` parser), never by the structured one.

The confirmation limits' per-source key is what the message proves about its sender (``source``):
the mailbox a trusted ``Authentication-Results`` field vouches for, else the envelope sender's
mailbox, never the relay or the mailbox that handed it over, which many senders share.

Only messages that changed something are remembered (``ProcessedMessage``), so junk leaves the
database as it was; a remembered message is never handled twice.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import hashlib
import itertools
import logging
import re
from dataclasses import dataclass, field, replace
from email import message_from_bytes, message_from_string
from email import policy as email_policy
from email.header import decode_header, make_header
from email.message import Message
from email.policy import EmailPolicy
from email.utils import getaddresses, parseaddr

from sqlalchemy.orm import Session

from digest.core.addresses import normalise_address
from digest.core.db import transaction
from digest.core.errors import DigestError, InvalidToken
from digest.core.models import ProcessedMessage, Subscriber, SubscriberStatus, utcnow
from digest.core.text import for_terminal
from digest.delivery import ledger
from digest.delivery.policy import DeliveryPolicy
from digest.orchestration.runtime import Runtime
from digest.rendering.links import subscriber_stamp
from digest.rendering.tokens import Purpose, Tokens
from digest.subscribers import subscriptions
from digest.subscribers.confirmation_limits import mailbox_of, source_network

log = logging.getLogger(__name__)

MAIL_RESEND_AFTER = dt.timedelta(minutes=20)
# Real reports, bounces and requests have a handful of parts; 264 000 parts cost the parser 80 s.
MAX_MIME_PARTS = 64
MAX_MIME_DEPTH = 8
COMPLAINT_TYPES = frozenset({"abuse", "fraud"})
# A real message relayed through Gmail and a forwarder carries 10-20 kB of Received, ARC and
# DKIM headers in 30-60 fields, its longest field (a DKIM or ARC signature, a long Cc) a few kB.
MAX_HEADER_BLOCK = 64 * 1024
MAX_HEADER_FIELD = 8 * 1024  # unfolded; the structured parser takes ~10 ms for the worst 8 kB
MAX_HEADER_FIELDS = 500
MAX_HEADER_LINES = 1000  # the feed parser's cost is per line: 64 kB of 4-byte lines took 7 ms
# Only this much of a message is parsed: a command's text part, a report's status part and the
# headers of the digest it quotes come first (a digest is under 102 kB, so a report quoting it
# whole is only cut in the quoted body); the worst 128 kB (all line breaks) parse in ~25 ms.
MAX_PARSED_BYTES = 128 * 1024
MAX_REPORT_BLOCKS = 64  # field blocks read from a report part (one per recipient, and one more)
# authserv-ids (RFC 8601) of the relays whose Authentication-Results we believe. Such a relay
# removes fields with its own id from the mail it receives, so the topmost field with its id is
# its own. Empty until a setting names them: a listener that is the MX itself must trust none.
TRUSTED_AUTHSERV_IDS: frozenset[str] = frozenset()

STATUS_CODE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
OUT_OF_OFFICE = re.compile(
    r"^\s*(out of (the )?office|automatic reply|auto[- ]?reply|autoreply|auto:|away from|on vacation|"
    r"vacation|abwesenheit|absence|réponse automatique|respuesta automática)",
    re.IGNORECASE,
)
COMMANDS = ("subscribe", "unsubscribe")
# Headers that may name the address a message was delivered to, when there is no SMTP envelope.
RECIPIENT_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "To", "Cc")


class Kind(enum.StrEnum):
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    DSN = "dsn"
    COMPLAINT = "complaint"
    AUTO_REPLY = "auto_reply"
    UNRECOGNISED = "unrecognised"
    MALFORMED = "malformed"
    OVERSIZE = "oversize"  # refused unparsed: see header_problem


@dataclass(frozen=True)
class Inbound:
    """What one inbound message is, read once from its bytes and envelope."""

    kind: Kind
    key: str  # ProcessedMessage key: the Message-ID, or a hash of the bytes
    sender: str | None = None  # where an answer may go; None when we must never answer
    token: str | None = None  # signed part of the sub-address it was sent to
    tag: str = ""  # "subscribe", "unsubscribe", "bounce" or "" (the plain address)
    status: str | None = None  # DSN status code of the failed recipient, e.g. "5.1.1"
    detail: str = ""
    original_message_id: str | None = None  # of the digest a report is about
    feedback_type: str = ""  # of an abuse report
    quoted_tokens: tuple[tuple[str, str], ...] = ()  # (tag, token) of ours in a report's quoted headers
    source: str = ""  # the confirmation limits' per-source key ("" when the message names no sender)


@dataclass(frozen=True)
class Handled:
    """The outcome of one message, and the answer to send after the commit (if any)."""

    outcome: str
    reply: str | None = None  # "confirmation", "unsubscribed" or "unsubscribe-link"
    subscriber_id: int | None = None
    changed: bool = False
    topics: str | None = None


@dataclass(frozen=True)
class MailinConfig:
    """The values mail-in needs from settings."""

    inbound_address: str
    tokens: Tokens
    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    # Deliveries of editions older than this were compacted away (see digest.delivery.compaction).
    ledger_retention_days: int = 30
    trusted_authserv_ids: frozenset[str] = TRUSTED_AUTHSERV_IDS

    @property
    def local(self) -> str:
        return self.inbound_address.rpartition("@")[0].lower()

    @property
    def domain(self) -> str:
        return self.inbound_address.rpartition("@")[2].lower()

    def tag_of(self, address: str) -> tuple[str, str] | None:
        """(tag, token) if ``address`` is ours, else None.

        ``papers@`` gives ("", ""), ``papers+bounce-T@`` gives ("bounce", "T").
        """
        local, _, domain = address.strip().strip("<>").rpartition("@")
        if domain.lower() != self.domain:
            return None
        base, plus, detail = local.partition("+")
        if base.lower() != self.local:
            return None
        if not plus:
            return "", ""
        tag, _, token = detail.partition("-")
        # Tokens are case-sensitive; only the tag is matched without regard to case.
        return tag.lower(), token

    def accepts(self, address: str) -> bool:
        return self.tag_of(address) is not None


# ---------------------------------------------------------------------------------------------
# Reading a message


def message_key(msg: Message | None, data: bytes) -> str:
    message_id = _header(msg, "Message-ID") if msg is not None else ""
    message_id = message_id.strip()
    if message_id and len(message_id) <= 240:
        return "mid:" + message_id
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _raw_headers(msg: Message, name: str) -> list[str]:
    """Every ``name`` field's value as sent, unfolded, without the structured parser; bytes
    that are not ASCII read as UTF-8 (the parser keeps them as surrogate escapes)."""
    lower = name.lower()
    found = []
    for key, value in msg.raw_items():
        if key.lower() == lower:
            text = str(value)
            if not text.isascii():
                text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            found.append(" ".join(text.split()))
    return found


def _header(msg: Message, name: str) -> str:
    """A header as text, whatever its encoding; '' when missing or unreadable.

    Read as sent, not by the structured parser (whose cost grows with the square of a field,
    and which parses again at every read): addresses, Message-IDs, tokens and report fields
    mean the same either way. Only ``Subject`` has its encoded words decoded, by the linear
    ``email.header`` decoder, since a person's client may encode even "subscribe".
    """
    raw = _raw_headers(msg, name)
    if not raw:
        return ""
    if name.lower() != "subject" or "=?" not in raw[0]:
        return raw[0]
    try:
        return " ".join(str(make_header(decode_header(raw[0]))).split())
    except Exception:  # an undecodable encoded word: the text as sent
        return raw[0]


def _fields(part: Message) -> list[Message]:
    """The header blocks of a report part (delivery-status or feedback-report), however parsed."""
    payload = part.get_payload(decode=False)
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    text = payload if isinstance(payload, str) else ""
    # Real reports have a block per recipient and one more; the rest of a long part is ignored.
    blocks = re.split(r"\r?\n\s*\r?\n", text.strip(), maxsplit=MAX_REPORT_BLOCKS)[:MAX_REPORT_BLOCKS]
    return [message_from_string(block + "\n") for block in blocks if block.strip()]


def _report_parts(msg: Message) -> dict[str, Message]:
    parts: dict[str, Message] = {}
    for part in msg.walk():
        parts.setdefault(part.get_content_type(), part)
    return parts


def _quoted_originals(parts: dict[str, Message]) -> list[Message]:
    """The headers of the message a report is about (its attached copy, or its headers part)."""
    found: list[Message] = []
    original = parts.get("message/rfc822")
    if original is not None:
        payload = original.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            found.append(payload[0])
    for name in ("text/rfc822-headers", "message/rfc822-headers"):
        headers = parts.get(name)
        if headers is not None:
            payload = headers.get_payload(decode=True)
            if isinstance(payload, bytes):
                found.append(message_from_bytes(payload, policy=email_policy.compat32))
    return found


def _original_message_id(originals: list[Message]) -> str | None:
    for original in originals:
        value = _header(original, "Message-ID")
        if value:
            return value
    return None


def _quoted_tokens(config: MailinConfig, originals: list[Message]) -> tuple[tuple[str, str], ...]:
    """(tag, token) of every sub-address of ours in the quoted headers (Return-Path, the
    List-Unsubscribe mailto, ...): what proves a report is about a message we really sent."""
    pattern = re.compile(
        rf"{re.escape(config.local)}\+(bounce|unsubscribe)-([a-z0-9.]{{1,80}})@{re.escape(config.domain)}",
        re.IGNORECASE,
    )
    found: list[tuple[str, str]] = []
    for original in originals:
        for name in ("Return-Path", "List-Unsubscribe", "Sender", "Errors-To"):
            for tag, token in pattern.findall(_header(original, name)):
                if (tag.lower(), token) not in found:
                    found.append((tag.lower(), token))
    return tuple(found[:8])


def _failed_status(parts: dict[str, Message]) -> tuple[str, str] | None:
    """The first non-success Status of a delivery-status report, with its diagnostic text."""
    report = parts.get("message/delivery-status") or parts.get("message/global-delivery-status")
    if report is None:
        return None
    for block in _fields(report)[1:] or _fields(report):
        action = _header(block, "Action").lower()
        found = STATUS_CODE.search(_header(block, "Status"))
        if found is None or found.group(1) == "2" or action in ("delivered", "relayed", "expanded"):
            continue
        diagnostic = _header(block, "Diagnostic-Code") or _header(block, "Status")
        return found.group(0), f"{action or 'failed'} {found.group(0)}: {diagnostic}"[:500]
    return None


def _is_auto_reply(msg: Message) -> bool:
    auto = _header(msg, "Auto-Submitted").lower()
    if auto and auto != "no":
        return True
    if any(_header(msg, name) for name in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress")):
        return True
    if _header(msg, "Precedence").lower() in ("auto_reply", "bulk", "junk", "list"):
        return True
    return bool(OUT_OF_OFFICE.match(_header(msg, "Subject")))


def _first_line(msg: Message) -> str:
    try:
        part = msg.get_body(preferencelist=("plain",)) if hasattr(msg, "get_body") else None
        text = part.get_content() if part is not None else ""
    except Exception:  # an undecodable body simply has no command in it
        return ""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip().lower()
    return ""


def _command(msg: Message) -> str | None:
    """'subscribe' or 'unsubscribe' when the subject or first body line is exactly that word."""
    subject = _header(msg, "Subject").strip().lower()
    if subject in COMMANDS:
        return subject
    line = _first_line(msg)
    return line if line in COMMANDS else None


def reply_address(msg: Message, envelope_sender: str | None) -> str | None:
    """Where an answer may go: the From address (else the envelope's); None for a null sender."""
    if envelope_sender is not None and envelope_sender.strip() in ("", "<>"):
        return None
    if _header(msg, "Return-Path").strip() == "<>":
        return None
    from_address = _address(msg, "From")
    return from_address or (envelope_sender or "").strip("<> ") or None


def _address(msg: Message, name: str) -> str:
    """The address in a one-address field ('' when none), by the linear ``email.utils`` parser."""
    try:
        return parseaddr(_header(msg, name))[1]
    except RecursionError:  # comments nested thousands deep: no address anyone could use
        return ""


_COMMENT = re.compile(r"\([^()]*\)")
_RESULT = re.compile(r"\s*(dkim|dmarc|spf)\s*=\s*([a-z]+)", re.IGNORECASE)
_PROPERTY = re.compile(r"\b(header\.d|header\.i|header\.from|smtp\.mailfrom)\s*=\s*\"?([^\s;\"]+)", re.IGNORECASE)


def _trusted_results(config: MailinConfig, msg: Message) -> list[tuple[str, str, dict[str, str]]]:
    """(method, result, properties) of the topmost Authentication-Results field whose
    authserv-id we trust (RFC 8601): that relay removed forged ones carrying its id."""
    for value in _raw_headers(msg, "Authentication-Results"):
        authserv, _, rest = value.partition(";")
        words = authserv.split()
        if not words or words[0].lower() not in config.trusted_authserv_ids:
            continue
        results = []
        for piece in _COMMENT.sub(" ", rest).split(";", 32)[:32]:
            found = _RESULT.match(piece)
            if found is not None:
                properties = {k.lower(): v.lower() for k, v in _PROPERTY.findall(piece, found.end())}
                results.append((found.group(1).lower(), found.group(2).lower(), properties))
        return results
    return []


def _aligned(domain: str, authenticated: str) -> bool:
    """DMARC's relaxed alignment, without a public-suffix list: the same domain or a sub-domain."""
    return bool(domain) and (domain == authenticated or domain.endswith("." + authenticated))


def limit_source(config: MailinConfig, msg: Message, envelope_sender: str | None) -> str:
    """The confirmation limits' per-source key of a message: what it proves about its sender.

    A trusted relay's DKIM or DMARC pass aligned with the From domain proves the From mailbox,
    its SPF pass the envelope sender's: ``auth:<mailbox>``, a budget no forger can spend. Else
    the claimed envelope sender (for a mailbox, the Return-Path its delivery agent wrote):
    ``sender:<mailbox>``, so a forger spends only the budget of the senders it names, never
    that of everyone behind the same relay or in the same IMAP box.
    """
    from_address = _address(msg, "From").lower()
    envelope = (envelope_sender or "").strip("<> ") if envelope_sender is not None else _address(msg, "Return-Path")
    envelope = envelope.lower()
    from_domain = from_address.rpartition("@")[2]
    for method, result, properties in _trusted_results(config, msg):
        if result != "pass":
            continue
        if method == "dmarc" and from_domain and properties.get("header.from") == from_domain:
            return "auth:" + mailbox_of(from_address)
        signer = properties.get("header.d") or properties.get("header.i", "").rpartition("@")[2]
        if method == "dkim" and signer and _aligned(from_domain, signer):
            return "auth:" + mailbox_of(from_address)
        checked = properties.get("smtp.mailfrom", "").rpartition("@")[2]
        if method == "spf" and envelope and checked and checked == envelope.rpartition("@")[2]:
            return "auth:" + mailbox_of(envelope)
    claimed = envelope or from_address
    return "sender:" + mailbox_of(claimed)[:254] if claimed else ""


def our_recipients(config: MailinConfig, msg: Message | None, recipients: list[str] | None) -> list[tuple[str, str]]:
    """(tag, token) of each of our addresses the message went to: the SMTP envelope, else headers."""
    if recipients is None:
        addresses = [a for _, a in getaddresses([_header(msg, h) for h in RECIPIENT_HEADERS])] if msg else []
    else:
        addresses = recipients
    found = [config.tag_of(a) for a in addresses]
    return [t for t in found if t is not None]


_BOUNDARY_PARAM = re.compile(rb"boundary\s*=", re.IGNORECASE)
_DELIMITER_LINE = re.compile(rb"^--", re.MULTILINE)


def _too_complex(data: bytes) -> str | None:
    """Why a message is refused before parsing, or None: a cheap count of MIME structure.

    Every multipart declares a boundary and every part starts with a delimiter line, so
    counting those bounds the parser's work from above (a line starting "--" that is not a
    delimiter only makes the count err on the side of refusing).
    """
    multiparts = len(_BOUNDARY_PARAM.findall(data))
    if multiparts > MAX_MIME_DEPTH * 4:
        return f"too many multipart sections ({multiparts})"
    most = 4 * MAX_MIME_PARTS
    if sum(1 for _ in itertools.islice(_DELIMITER_LINE.finditer(data), most + 1)) > most:
        return f"too many MIME parts (more than {most} delimiter lines)"
    return None


def _nesting_depth(msg: Message, limit: int) -> int:
    """How deep multiparts nest, stopping once past ``limit``."""
    deepest = 0
    stack: list[tuple[Message, int]] = [(msg, 1)]
    seen = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        deepest = max(deepest, depth)
        if deepest > limit or seen > MAX_MIME_PARTS:
            return max(deepest, limit + 1) if seen > MAX_MIME_PARTS else deepest
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            stack.extend((p, depth + 1) for p in payload if isinstance(p, Message))
    return deepest


class _BoundedPolicy(EmailPolicy):
    """``email.policy.default`` with every header field cut to ``MAX_HEADER_FIELD`` as it is read
    (the fields of MIME parts and quoted messages, which ``header_problem`` does not measure)."""

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        name, value = super().header_source_parse(sourcelines)
        return name, value[:MAX_HEADER_FIELD]


BOUNDED = _BoundedPolicy()


def header_problem(data: bytes) -> str | None:
    """Why a message's header block is refused before any parsing, or None.

    Linear and cheap (well under a millisecond): the header block is found with ``bytes.find``
    in the first ``MAX_HEADER_BLOCK`` bytes and its lines counted before they are walked.
    """
    ends = [i for i in (data.find(b"\n\n", 0, MAX_HEADER_BLOCK), data.find(b"\n\r\n", 0, MAX_HEADER_BLOCK)) if i >= 0]
    if data.startswith((b"\n", b"\r\n")):
        return None  # no header block at all: the parser's problem, and a cheap one
    if not ends and len(data) > MAX_HEADER_BLOCK:
        return f"header block over {MAX_HEADER_BLOCK} bytes"
    head = data[: min(ends) + 1] if ends else data
    lines = head.count(b"\n")
    if lines > MAX_HEADER_LINES:
        return f"{lines} header lines (at most {MAX_HEADER_LINES})"
    fields = 0
    name, length = b"", 0
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            length += len(line) + 1  # a folded line: the same field, unfolded
        elif line.strip():
            fields += 1
            name, length = line.partition(b":")[0][:40], len(line) + 1
        if length > MAX_HEADER_FIELD:
            # ASCII and no controls: this goes into the SMTP answer and a log line.
            field_name = for_terminal(name.decode("ascii", "backslashreplace"))
            return f"header field {field_name!r} over {MAX_HEADER_FIELD} bytes"
    if fields > MAX_HEADER_FIELDS:
        return f"{fields} header fields (at most {MAX_HEADER_FIELDS})"
    return None


def classify(
    config: MailinConfig, data: bytes, *, envelope_sender: str | None, recipients: list[str] | None
) -> Inbound:
    """What a message is. Never raises: unreadable input is ``Kind.MALFORMED``, a header block
    the parser must not see is ``Kind.OVERSIZE``."""
    oversize = header_problem(data)
    if oversize is not None:
        return Inbound(Kind.OVERSIZE, "sha256:" + hashlib.sha256(data).hexdigest(), detail=oversize)
    parsed = data[:MAX_PARSED_BYTES]
    too_complex = _too_complex(parsed)
    if too_complex is not None:
        return Inbound(Kind.MALFORMED, "sha256:" + hashlib.sha256(data).hexdigest(), detail=too_complex)
    try:
        msg = message_from_bytes(parsed, policy=BOUNDED)
        key = message_key(msg, data)
    except Exception as exc:  # the parser is lenient; this is for input that still breaks it
        return Inbound(Kind.MALFORMED, "sha256:" + hashlib.sha256(data).hexdigest(), detail=repr(exc)[:200])
    try:
        inbound = _classify(config, msg, key, envelope_sender, recipients)
        if inbound.sender is not None:
            inbound = replace(inbound, source=limit_source(config, msg, envelope_sender))
        return inbound
    except Exception as exc:  # headers or parts that break the parser's lazy decoding
        return Inbound(Kind.MALFORMED, key, detail=repr(exc)[:200])


def _classify(
    config: MailinConfig, msg: Message, key: str, envelope_sender: str | None, recipients: list[str] | None
) -> Inbound:
    if msg.defects and not msg.keys():
        return Inbound(Kind.MALFORMED, key, detail="no headers")
    if _nesting_depth(msg, MAX_MIME_DEPTH) > MAX_MIME_DEPTH:
        return Inbound(Kind.MALFORMED, key, detail="MIME parts nested too deep or too many parts")
    targets = our_recipients(config, msg, recipients)
    priority = {"bounce": 0, "unsubscribe": 1, "subscribe": 2, "": 3}
    targets.sort(key=lambda t: priority.get(t[0], 4))
    tag, token = targets[0] if targets else ("", "")
    # Reports come from machines and carry Auto-Submitted: read them before the auto-reply rule.
    if msg.get_content_type() == "multipart/report":
        parts = _report_parts(msg)
        report_type = str(msg.get_param("report-type", "")).lower()
        originals = _quoted_originals(parts)
        original = _original_message_id(originals)
        if report_type == "feedback-report" or "message/feedback-report" in parts:
            feedback = parts.get("message/feedback-report")
            feedback_type = ""
            if feedback is not None:
                blocks = _fields(feedback)
                feedback_type = _header(blocks[0], "Feedback-Type").lower() if blocks else ""
            return Inbound(
                Kind.COMPLAINT,
                key,
                token=token if tag == "bounce" else None,
                tag=tag,
                detail=f"feedback-type {feedback_type or 'unknown'}",
                original_message_id=original,
                feedback_type=feedback_type,
                quoted_tokens=_quoted_tokens(config, originals),
            )
        failed = _failed_status(parts)
        if failed is not None and tag == "bounce":
            return Inbound(
                Kind.DSN,
                key,
                token=token,
                tag=tag,
                status=failed[0],
                detail=failed[1],
                original_message_id=original,
            )
        return Inbound(
            Kind.UNRECOGNISED,
            key,
            tag=tag,
            detail=f"report {report_type or 'unknown'} without a failure we can use",
        )
    if tag == "unsubscribe" and token:
        # The token proves whose link it is; honoured even from a machine, but never answered.
        sender = None if _is_auto_reply(msg) else reply_address(msg, envelope_sender)
        return Inbound(Kind.UNSUBSCRIBE, key, sender=sender, token=token, tag=tag)
    if _is_auto_reply(msg):
        return Inbound(Kind.AUTO_REPLY, key, tag=tag, detail=_header(msg, "Subject")[:200])
    sender = reply_address(msg, envelope_sender)
    if sender is None:
        return Inbound(Kind.UNRECOGNISED, key, tag=tag, detail="null sender")
    if tag == "bounce":
        return Inbound(Kind.UNRECOGNISED, key, tag=tag, detail="not a delivery-status report")
    command = tag if tag in COMMANDS else _command(msg)
    if command == "subscribe":
        return Inbound(Kind.SUBSCRIBE, key, sender=sender, tag=tag)
    if command == "unsubscribe":
        return Inbound(Kind.UNSUBSCRIBE, key, sender=sender, tag=tag)
    return Inbound(Kind.UNRECOGNISED, key, tag=tag, detail=_header(msg, "Subject")[:200])


# ---------------------------------------------------------------------------------------------
# Acting on it


def handle(session: Session, config: MailinConfig, inbound: Inbound, *, now: dt.datetime) -> Handled:
    """Act on one classified message in the caller's transaction (flushes, never commits)."""
    if session.get(ProcessedMessage, inbound.key) is not None:
        return Handled("duplicate")
    try:
        handled = _act(session, config, inbound, now)
    except InvalidToken:
        return Handled(f"ignored: invalid {inbound.tag or 'unsubscribe'} token")
    except DigestError as exc:  # e.g. an unusable sender address
        return Handled(f"ignored: {exc}")
    if handled.changed:
        session.add(ProcessedMessage(message_key=inbound.key, outcome=handled.outcome[:64], created_at=now))
        session.flush()
    return handled


def _act(session: Session, config: MailinConfig, inbound: Inbound, now: dt.datetime) -> Handled:
    if inbound.kind is Kind.SUBSCRIBE:
        return _subscribe(session, config, inbound, now)
    if inbound.kind is Kind.UNSUBSCRIBE:
        return _unsubscribe(session, config, inbound, now)
    if inbound.kind is Kind.DSN:
        return _bounce(session, config, inbound, now)
    if inbound.kind is Kind.COMPLAINT:
        return _complaint(session, config, inbound, now)
    return Handled(f"ignored: {inbound.kind.value} {inbound.detail}".strip())


def _subscribe(session: Session, config: MailinConfig, inbound: Inbound, now: dt.datetime) -> Handled:
    assert inbound.sender is not None
    address = normalise_address(inbound.sender)
    if config.tag_of(address) is not None or address.rpartition("@")[2] == config.domain:
        return Handled("ignored: mail from our own domain")  # never start a loop with ourselves
    # From is forgeable and mail has no client IP to limit: at most one confirmation per address
    # per MAIL_RESEND_AFTER (as the web's 3 an hour), kept in the database for every listener.
    outcome = subscriptions.subscribe(
        session, config.tokens, address, now=now, source="email", resend_after=MAIL_RESEND_AFTER
    )
    return Handled(
        "confirmation sent" if outcome.send_confirmation else "subscribe: nothing to send",
        reply="confirmation" if outcome.send_confirmation else None,
        subscriber_id=outcome.subscriber_id,
        changed=outcome.send_confirmation,
        topics=outcome.topics,
    )


def _unsubscribe(session: Session, config: MailinConfig, inbound: Inbound, now: dt.datetime) -> Handled:
    if not inbound.token:
        # From proves nothing: ask the named mailbox itself, with its one-click link. Nothing is
        # stored, so the answer and the database look the same whoever is named.
        assert inbound.sender is not None
        found = subscriptions.find_by_email(session, normalise_address(inbound.sender))
        if found is None or found.status not in (SubscriberStatus.ACTIVE, SubscriberStatus.PENDING):
            return Handled("unsubscribe without a token: nothing to do")
        return Handled("unsubscribe without a token: link mailed", reply="unsubscribe-link", subscriber_id=found.id)
    subscriber = subscriptions.subscriber_from_token(session, config.tokens, Purpose.MAIL_UNSUBSCRIBE, inbound.token)
    changed = subscriptions.unsubscribe(session, subscriber, now=now)
    return Handled(
        "unsubscribed" if changed else "unsubscribe: already unsubscribed",
        # The answer goes to the subscriber's own address, never to a (forgeable) sender.
        reply="unsubscribed" if changed and inbound.sender is not None else None,
        subscriber_id=subscriber.id,
        changed=changed,
    )


@dataclass(frozen=True)
class SignedDelivery:
    """A delivery of ours that a token proves a message is about.

    ``delivery_id`` is None when compaction has removed the row: the signed token still names
    the subscriber, so the person's report still counts for them, but never toward the sending
    pause (which only counts reports about deliveries still in the ledger's window).
    """

    subscriber_id: int
    delivery_id: int | None


def delivery_from_bounce_token(session: Session, tokens: Tokens, token: str) -> SignedDelivery:
    """The delivery a VERP token names; ``InvalidToken`` unless it still names that subscriber.

    The token is an HMAC over (delivery, subscriber id, the subscriber row's creation second).
    While the ledger row exists, it says whose delivery it was. A missing row is one we sent
    whose row compaction removed: then the token itself must prove the person, which only the
    bound form does. An id alone does not: SQLite gives an erased newest subscriber's id to the
    next one, and tokens made before the bound form (mail sent by an earlier release) name
    only the id.
    """

    def created(_delivery_id: int, subscriber_id: int) -> int | None:
        subscriber = session.get(Subscriber, subscriber_id)
        return None if subscriber is None else subscriber_stamp(subscriber)

    delivery_id, subscriber_id, bound = tokens.read_bound(Purpose.BOUNCE, token, created)
    found = ledger.entries(session, [delivery_id])
    if not found:
        if not bound:
            raise InvalidToken("This bounce address is not valid.")
        return SignedDelivery(subscriber_id, None)
    (delivery,) = found
    if delivery.subscriber_id is None or delivery.subscriber_id != subscriber_id:
        raise InvalidToken("This bounce address is not valid.")
    return SignedDelivery(subscriber_id, delivery.id)


def _bounce(session: Session, config: MailinConfig, inbound: Inbound, now: dt.datetime) -> Handled:
    assert inbound.token is not None and inbound.status is not None
    delivery = delivery_from_bounce_token(session, config.tokens, inbound.token)
    hard = inbound.status.startswith("5")
    if delivery.delivery_id is None and not hard:
        # A temporary failure of a message that old says nothing about the mailbox today.
        return Handled("ignored: soft bounce of a compacted delivery", subscriber_id=delivery.subscriber_id)
    bounced = subscriptions.record_bounce(
        session,
        delivery.subscriber_id,
        delivery.delivery_id,
        hard=hard,
        detail=inbound.detail if delivery.delivery_id else f"(about a compacted delivery) {inbound.detail}",
        now=now,
        policy=config.policy,
    )
    kind = "hard bounce" if hard else "soft bounce"
    return Handled(f"{kind}{' (bounced)' if bounced else ''}", subscriber_id=delivery.subscriber_id, changed=True)


def _complaint(session: Session, config: MailinConfig, inbound: Inbound, now: dt.datetime) -> Handled:
    if inbound.feedback_type not in COMPLAINT_TYPES:
        return Handled(f"ignored: feedback type {inbound.feedback_type or 'unknown'} is not a complaint")
    delivery = _reported_delivery(session, config, inbound, now)
    if delivery is None:
        return Handled("ignored: complaint names no delivery of ours")
    subscriber = session.get(Subscriber, delivery.subscriber_id)
    assert subscriber is not None
    if not subscriptions.record_complaint(
        session, config.tokens, subscriber, delivery.delivery_id, detail=inbound.detail, now=now
    ):
        return Handled("ignored: this delivery's complaint is already recorded")
    return Handled("complaint (unsubscribed)", subscriber_id=subscriber.id, changed=True)


def _reported_delivery(
    session: Session, config: MailinConfig, inbound: Inbound, now: dt.datetime
) -> SignedDelivery | None:
    """The delivery a report proves it is about, or None: a Message-ID alone proves nothing.

    Proof is a token we made: the VERP address the report was sent to, or one in the quoted
    headers — the VERP Return-Path (names the delivery), or the List-Unsubscribe mailto (names
    the subscriber; the quoted Message-ID must then be one of their live deliveries: a mailto
    token next to a Message-ID proves nothing about whose message it was once the row is gone).
    """
    candidates: list[tuple[str, str]] = []
    if inbound.token and inbound.tag == "bounce":
        candidates.append(("bounce", inbound.token))
    candidates.extend(inbound.quoted_tokens)
    for tag, token in candidates:
        try:
            if tag == "bounce":
                return delivery_from_bounce_token(session, config.tokens, token)
            subscriber = subscriptions.subscriber_from_token(session, config.tokens, Purpose.MAIL_UNSUBSCRIBE, token)
        except InvalidToken:
            continue
        if inbound.original_message_id:
            delivery_id = ledger.with_message_id(session, inbound.original_message_id, subscriber.id)
            if delivery_id is not None:
                return SignedDelivery(subscriber.id, delivery_id)
    return None


# ---------------------------------------------------------------------------------------------
# The boundary both receivers share


@dataclass(frozen=True)
class Reply:
    """An answer to send once the change is committed (built and sent then, not before)."""

    kind: str  # "confirmation", "unsubscribed" or "unsubscribe-link"
    subscriber_id: int
    source: str  # the limits' source key: Inbound.source, else the SMTP peer's network or "imap"
    topics: str | None = None


@dataclass(frozen=True)
class Processed:
    outcome: str
    changed: bool
    replies: list[Reply]


def config_from(runtime: Runtime) -> MailinConfig:
    return MailinConfig(
        runtime.settings.inbound_address,
        runtime.tokens,
        runtime.policy,
        ledger_retention_days=runtime.settings.ledger_retention_days,
        trusted_authserv_ids=runtime.settings.mailin_trusted_relays,
    )


def process(
    runtime: Runtime,
    data: bytes,
    *,
    envelope_sender: str | None,
    recipients: list[str] | None,
    peer: str | None = None,
) -> Processed:
    """Classify and handle one message in its own transaction; logs one line about it.

    ``recipients`` are the SMTP envelope's (None for a mailbox, where headers tell); ``peer`` is
    the SMTP client's address (None for a mailbox). Database errors propagate, so the caller can
    ask the sender to retry (SMTP 451, IMAP: left unseen). Answers are only described here;
    ``send_replies`` renders and sends them after the caller has answered the sender.
    """
    config = config_from(runtime)
    inbound = classify(config, data, envelope_sender=envelope_sender, recipients=recipients)
    return process_classified(runtime, inbound, size=len(data), peer=peer)


def answer_first(inbound: Inbound) -> bool:
    """Whether the listener should answer before even storing: requests anyone can make about
    any address, where the database work itself (a new row or none) would time the answer."""
    return inbound.kind is Kind.SUBSCRIBE or (inbound.kind is Kind.UNSUBSCRIBE and not inbound.token)


def process_classified(runtime: Runtime, inbound: Inbound, *, size: int, peer: str | None = None) -> Processed:
    """``process`` for a message already classified (the listener classifies first)."""
    config = config_from(runtime)
    with transaction(runtime.session_factory) as session:
        handled = handle(session, config, inbound, now=utcnow())
    replies: list[Reply] = []
    if handled.reply is not None and handled.subscriber_id is not None:
        # A sender the message names (proven or claimed) is always there for an answer; the
        # peer or "imap" is only what the key was before, should a caller classify without one.
        source = inbound.source or (source_network(peer) if peer else "imap")
        replies.append(Reply(handled.reply, handled.subscriber_id, source, handled.topics))
    level = logging.INFO if handled.changed or inbound.kind is Kind.AUTO_REPLY else logging.WARNING
    log.log(
        level,
        "mail in %s (%s, %d bytes): %s",
        # The Message-ID and the outcome (a Subject, an address) are the sender's text.
        for_terminal(inbound.key[:80]),
        inbound.kind.value,
        size,
        for_terminal(handled.outcome),
        extra={"subscriber_id": handled.subscriber_id} if handled.subscriber_id is not None else None,
    )
    return Processed(handled.outcome, handled.changed, replies)


async def send_replies(runtime: Runtime, replies: list[Reply]) -> None:
    """Send the answers of a committed change, each within the confirmation limits except the
    note confirming a (token-proven) unsubscribe; a failure is logged, not retried."""
    from digest.subscribers import notifications

    for reply in replies:
        build: notifications.MessageBuilder
        if reply.kind == "confirmation":
            build = functools.partial(_confirmation, topics=reply.topics)
        elif reply.kind == "unsubscribe-link":
            build = notifications.unsubscribe_link_message
        else:
            build = notifications.unsubscribed_message
        await notifications.send_requested(
            runtime, reply.kind, reply.source, reply.subscriber_id, build, limited=reply.kind != "unsubscribed"
        )


def _confirmation(runtime: Runtime, subscriber: Subscriber, *, topics: str | None) -> bytes:
    from digest.subscribers import notifications

    return notifications.confirmation_message(runtime, subscriber, topics)
