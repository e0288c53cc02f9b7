"""Inbound messages shaped like the ones real senders and mailbox providers produce."""

from __future__ import annotations

import datetime as dt
from email.utils import format_datetime, make_msgid

SUBSCRIBER_DOMAIN = "example.net"


def plain(sender: str, to: str, subject: str, body: str = "", headers: dict[str, str] | None = None) -> bytes:
    """A message as a mail client writes it."""
    lines = [
        f"From: {sender}",
        f"To: {to}",
        f"Subject: {subject}",
        f"Date: {format_datetime(dt.datetime.now(dt.UTC))}",
        f"Message-ID: {make_msgid(domain=SUBSCRIBER_DOMAIN)}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body.replace("\n", "\r\n") + "\r\n").encode()


def header_block(original: bytes) -> str:
    """The header section of a message, as reports quote it."""
    text = original.decode("utf-8", "replace").replace("\r\n", "\n")
    return text.split("\n\n", 1)[0].replace("\n", "\r\n")


def dsn(to: str, recipient: str, original: bytes, *, status: str, action: str, diagnostic: str) -> bytes:
    """A delivery-status notification in the shape Postfix sends (RFC 3464)."""
    boundary = "4F3A21C0A1.1714000000/mx.example.net"
    now = format_datetime(dt.datetime.now(dt.UTC))
    intro = (
        "This is the mail system at host mx.example.net.\r\n\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients.\r\n"
        if action == "failed"
        else "This is the mail system at host mx.example.net.\r\n\r\n"
        "####################################################################\r\n"
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n"
        "####################################################################\r\n"
    )
    failed = action == "failed"
    subject = "Undelivered Mail Returned to Sender" if failed else "Delayed Mail (still being retried)"
    parts = [
        f"Return-Path: <>\r\n"
        f"From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        f"Subject: {subject}\r\n"
        f"To: {to}\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"Date: {now}\r\n"
        f"Message-ID: {make_msgid(domain='mx.example.net')}\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"\r\n'
        f"\r\nThis is a MIME-encapsulated message.\r\n",
        f"--{boundary}\r\nContent-Description: Notification\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"{intro}\r\n<{recipient}>: {diagnostic}\r\n",
        f"--{boundary}\r\nContent-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.example.net\r\nX-Postfix-Queue-ID: 4F3A21C0A1\r\n"
        f"X-Postfix-Sender: rfc822; {to}\r\nArrival-Date: {now}\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nOriginal-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\nRemote-MTA: dns; in.{SUBSCRIBER_DOMAIN}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n",
        f"--{boundary}\r\nContent-Description: Undelivered Message Headers\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n"
        f"{header_block(original)}\r\n",
        f"--{boundary}--\r\n",
    ]
    return "\r\n".join(parts).encode()


def arf(to: str, recipient: str, original: bytes) -> bytes:
    """An abuse report from a feedback loop (RFC 5965), with the reported message attached."""
    boundary = "----=_Part_arf_0123456789"
    now = format_datetime(dt.datetime.now(dt.UTC))
    body = original.decode("utf-8", "replace").replace("\r\n", "\n").replace("\n", "\r\n")
    return (
        f"From: Feedback Loop <feedbackloop@fbl.example.com>\r\n"
        f"To: {to}\r\n"
        f"Subject: FW: Daily Papers\r\n"
        f"Date: {now}\r\n"
        f"Message-ID: {make_msgid(domain='fbl.example.com')}\r\n"
        f"Auto-Submitted: auto-generated\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"This is an email abuse report for an email message received from IP 192.0.2.1 on {now}.\r\n\r\n"
        f"--{boundary}\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: abuse\r\nUser-Agent: ExampleFBL/1.0\r\nVersion: 1\r\n"
        f"Original-Mail-From: <papers@digest.example.org>\r\nOriginal-Rcpt-To: <{recipient}>\r\n"
        f"Arrival-Date: {now}\r\nSource-IP: 192.0.2.1\r\n\r\n"
        f"--{boundary}\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
        f"{body}\r\n"
        f"--{boundary}--\r\n"
    ).encode()


def out_of_office(sender: str, to: str) -> bytes:
    """An Exchange-style automatic reply (RFC 3834 headers)."""
    return plain(
        sender,
        to,
        "Automatic reply: Daily Papers",
        "I am out of the office until Monday with limited access to email.",
        {"Auto-Submitted": "auto-replied", "X-Auto-Response-Suppress": "All", "Precedence": "auto_reply"},
    )
