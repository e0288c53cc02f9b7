"""Polling an IMAP mailbox for mail to the list's address (beat task ``digest.poll_imap``).

Each unseen message is fetched without marking it (BODY.PEEK), handled by
``digest.mailin.classify.process`` and flagged ``\\Seen`` only after its transaction committed, so a crash
or a database outage leaves it for the next poll. A message too large or with a header block too
large to parse (``digest.mailin.classify.header_problem``) is logged and flagged seen unhandled, so no
poll reads it again. ``ProcessedMessage`` keeps a message that
changed something from being handled again even if someone marks it unread. With
``DIGEST_IMAP_DONE_FOLDER`` set, handled messages are then moved there (created if missing),
which keeps a busy list's inbox small; messages left for the next poll stay where they are.
"""

from __future__ import annotations

import asyncio
import imaplib
import logging
import re
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from digest.core.errors import DigestError
from digest.core.text import for_terminal
from digest.mailin.classify import Reply, process, send_replies
from digest.orchestration.runtime import Runtime

log = logging.getLogger(__name__)

SIZE = re.compile(rb"RFC822\.SIZE (\d+)")


@dataclass
class PollStats:
    seen: int = 0  # unseen messages found
    handled: int = 0  # changed something
    ignored: int = 0  # junk, auto-replies, duplicates, oversized
    failed: int = 0  # left unseen for the next poll

    def line(self) -> str:
        return f"{self.seen} new, {self.handled} handled, {self.ignored} ignored, {self.failed} left for later"


def connect(runtime: Runtime) -> imaplib.IMAP4:
    s = runtime.settings
    if not s.imap_host or not s.imap_username or s.imap_password is None:
        raise DigestError("IMAP polling needs DIGEST_IMAP_HOST, DIGEST_IMAP_USERNAME and DIGEST_IMAP_PASSWORD")
    client = imaplib.IMAP4_SSL(s.imap_host, s.imap_port) if s.imap_ssl else imaplib.IMAP4(s.imap_host, s.imap_port)
    client.login(s.imap_username, s.imap_password)
    return client


def poll_imap(runtime: Runtime) -> PollStats:
    """Handle every unseen message in DIGEST_IMAP_FOLDER once; returns what happened."""
    stats = PollStats()
    limit = runtime.settings.mailin_max_bytes
    client = connect(runtime)
    try:
        status, _ = client.select(_quoted(runtime.settings.imap_folder))
        if status != "OK":
            raise DigestError(f"IMAP folder {runtime.settings.imap_folder!r} cannot be opened")
        _, found = client.uid("SEARCH", "UNSEEN")
        uids = found[0].split() if found and found[0] else []
        done = runtime.settings.imap_done_folder
        moves: str | None = None
        if uids and done:
            if not done.isascii() or not done.isprintable():
                raise DigestError(f"DIGEST_IMAP_DONE_FOLDER {done!r}: use an ASCII folder name")
            client.create(_quoted(done))  # NO when it exists already, which is fine
            moves = _how_to_move(client)
            if moves is None:
                log.warning("mail in: the IMAP server has neither MOVE nor UIDPLUS; handled mail stays in place")
        replies: list[Reply] = []
        for uid in uids:
            stats.seen += 1
            _, sized = client.uid("FETCH", uid, "(RFC822.SIZE)")
            size = _size(sized)
            if size is None or size > limit:
                log.warning(
                    "mail in: IMAP message %s of %s bytes is over the %d byte limit; ignored",
                    uid.decode(),
                    size,
                    limit,
                )
                stats.ignored += 1
                _finish(client, uid.decode(), done, moves)
                continue
            _, fetched = client.uid("FETCH", uid, "(BODY.PEEK[])")
            data = _body(fetched)
            try:
                processed = process(runtime, data, envelope_sender=None, recipients=None)
            except SQLAlchemyError:
                log.exception("mail in: database unavailable; IMAP message %s left for the next poll", uid.decode())
                stats.failed += 1
                continue
            _finish(client, uid.decode(), done, moves)
            replies.extend(processed.replies)
            if processed.changed:
                stats.handled += 1
            else:
                stats.ignored += 1
        if replies:
            asyncio.run(send_replies(runtime, replies))
    finally:
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError):
            log.warning("mail in: IMAP logout failed", exc_info=True)
    return stats


def _how_to_move(client: imaplib.IMAP4) -> str | None:
    """How this server can move a message: "MOVE" (RFC 6851), "UIDPLUS" (COPY, then expunge
    just that message) or None.

    Asked after login: imaplib keeps the greeting's list, and servers announce these only to a
    logged-in client."""
    status, answer = client.capability()
    words = set(answer[0].upper().split()) if status == "OK" and answer and isinstance(answer[0], bytes) else set()
    if b"MOVE" in words:
        return "MOVE"
    return "UIDPLUS" if b"UIDPLUS" in words else None


def _finish(client: imaplib.IMAP4, uid: str, done_folder: str | None, moves: str | None) -> None:
    """Flag a handled message seen and, with a done folder, move it there. Never a bare
    EXPUNGE: that would also remove other messages someone flagged deleted."""
    client.uid("STORE", uid, "+FLAGS", r"(\Seen)")
    if not done_folder or moves is None:
        return
    try:
        if moves == "MOVE":
            status, answer = client.uid("MOVE", uid, _quoted(done_folder))
        else:
            status, answer = client.uid("COPY", uid, _quoted(done_folder))
            if status == "OK":
                status, answer = client.uid("STORE", uid, "+FLAGS", r"(\Deleted)")
                if status == "OK":
                    status, answer = client.uid("EXPUNGE", uid)
                if status != "OK":  # a copy is in the done folder; leave the original unflagged
                    client.uid("STORE", uid, "-FLAGS", r"(\Deleted)")
    except imaplib.IMAP4.error as exc:
        status, answer = "NO", [str(exc).encode()]
    if status != "OK":
        log.warning(
            "mail in: IMAP message %s not moved to %r (%s); left seen in place",
            uid,
            done_folder,
            for_terminal(str(answer)),
        )


def _quoted(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _size(response: list[object]) -> int | None:
    for item in response:
        raw = item[0] if isinstance(item, tuple) else item
        if isinstance(raw, bytes):
            found = SIZE.search(raw)
            if found:
                return int(found.group(1))
    return None


def _body(response: list[object]) -> bytes:
    for item in response:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], bytes):
            return item[1]
    return b""
