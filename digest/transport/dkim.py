"""DKIM signatures (RFC 6376) for outgoing mail: rsa-sha256, relaxed/relaxed.

Gmail and Yahoo require bulk mail to be authenticated; signing the list headers too means a
forwarder cannot swap the one-click unsubscribe target without breaking the signature.

Every digest is signed on its own (its To and unsubscribe links are personal), so the signature
is on the sending path of every message. dkimpy does the RSA step in pure Python (~8 ms per
message here, more than everything else about a message together); this module does the same
signature with OpenSSL through ``cryptography`` (~0.5 ms) and keeps the rest small: relaxed
canonicalisation of the signed headers and the body. dkimpy verifies what it produces in the
tests (``tests/rendering/test_email_design.py``); ``bench/signing.py`` measures both.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from digest.core.errors import DigestError
from digest.transport.mailer import wire_form

# From first: it is the one header DKIM requires. The rest are what a receiver shows or acts on.
SIGNED_HEADERS: tuple[bytes, ...] = (
    b"From",
    b"To",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"List-Id",
    b"List-Unsubscribe",
    b"List-Unsubscribe-Post",
    b"MIME-Version",
    b"Content-Type",
    b"Feedback-ID",
)

_WSP_RUN = re.compile(rb"[ \t]+")


class DkimConfigError(DigestError):
    """The DIGEST_DKIM_* settings are incomplete or the key cannot be read."""


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfolded value, runs of WSP as one SP, trimmed."""
    unfolded = value.replace(b"\r\n", b"").replace(b"\n", b"")
    return name.strip().lower() + b":" + _WSP_RUN.sub(b" ", unfolded).strip(b" \t") + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: CRLF lines, runs of WSP as one SP, none at line ends, no empty lines at
    the end; a non-empty body ends with CRLF."""
    if b"\r" not in body:
        body = body.replace(b"\n", b"\r\n")
    elif body and not body.endswith(b"\r\n"):
        body += b"\r\n"  # as SMTP sends it
    # bytes.replace rather than a regex over the whole body: a few C passes (each halves the
    # runs of spaces) instead of ~0.3 ms of regex for a 28 KB digest.
    body = body.replace(b"\t", b" ")
    while b"  " in body:
        body = body.replace(b"  ", b" ")
    body = body.replace(b" \r\n", b"\r\n")
    body = body.rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def _split(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Header fields (name, raw value with folds) in order, and the body, of a message in wire
    form."""
    head, _, body = message.partition(b"\r\n\r\n")
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields, body


def _fold(tags: list[bytes], width: int = 76) -> bytes:
    """Tags joined by "; ", folded between tags and after the colons of h= (white space there
    is ignored by verifiers)."""
    lines: list[bytes] = []
    current = b"DKIM-Signature:"
    for tag in tags:
        words = tag.split(b":") if tag.startswith(b"h=") else [tag]
        pieces = [b" " + words[0], *(b":" + word for word in words[1:])]
        for piece in pieces:
            if len(current) + len(piece) > width and current != b"DKIM-Signature:":
                lines.append(current)
                current = b"\t" + piece.lstrip(b" ")
            else:
                current += piece
    lines.append(current)
    return b"\n".join(lines)


@dataclass(frozen=True)
class DkimSigner:
    selector: str
    domain: str
    private_key: bytes  # PEM
    _key: rsa.RSAPrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            key = serialization.load_pem_private_key(self.private_key, password=None)
        except (ValueError, TypeError) as exc:
            raise DkimConfigError(f"the DKIM private key is not a usable PEM key: {exc}") from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimConfigError("the DKIM private key must be an RSA key (rsa-sha256)")
        object.__setattr__(self, "_key", key)

    @classmethod
    def from_settings(cls, selector: str | None, domain: str | None, key_path: str | None) -> DkimSigner | None:
        """A signer when all three settings are given, None when none is; half a setup is an error."""
        given = [v for v in (selector, domain, key_path) if v]
        if not given:
            return None
        if selector is None or domain is None or key_path is None or len(given) != 3:
            raise DkimConfigError(
                "DKIM needs DIGEST_DKIM_SELECTOR, DIGEST_DKIM_DOMAIN and DIGEST_DKIM_PRIVATE_KEY_PATH together"
            )
        try:
            key = Path(key_path).read_bytes()
        except OSError as exc:
            raise DkimConfigError(f"cannot read the DKIM private key {key_path}: {exc}") from exc
        return cls(selector=selector, domain=domain, private_key=key)

    def sign(self, message: bytes, *, now: float | None = None) -> bytes:
        """The message with a ``DKIM-Signature`` header in front, in wire form (CRLF)."""
        message = wire_form(message)
        fields, body = _split(message)
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        remaining: dict[bytes, list[bytes]] = {}
        for name, value in fields:
            remaining.setdefault(name.strip().lower(), []).append(value)
        # Each name in h= signs that header's last instance not yet signed (RFC 6376 5.4.2), and
        # a name with no instance left signs "absent": listing every name once more than it
        # occurs means nobody can add another From or List-Unsubscribe above ours.
        names = [name.lower() for name in SIGNED_HEADERS for _ in range(len(remaining.get(name.lower(), ())) + 1)]
        signed = b"".join(relaxed_header(name, remaining[name].pop()) for name in names if remaining.get(name))
        tags = [
            b"v=1;",
            b"a=rsa-sha256;",
            b"c=relaxed/relaxed;",
            b"d=" + self.domain.encode("ascii") + b";",
            b"s=" + self.selector.encode("ascii") + b";",
            b"t=%d;" % int(time.time() if now is None else now),
            b"h=" + b":".join(names) + b";",
            b"bh=" + body_hash + b";",
            b"b=",
        ]
        unsigned = _fold(tags)
        name, _, value = unsigned.partition(b":")
        # The signature header itself is hashed last, with an empty b= and no line break.
        to_sign = signed + relaxed_header(name, value)[:-2]
        signature = base64.b64encode(self._key.sign(to_sign, padding.PKCS1v15(), hashes.SHA256()))
        # Folded in the b= value too: verifiers ignore white space there.
        header = unsigned + b"".join(b"\n\t" + signature[i : i + 72] for i in range(0, len(signature), 72))
        return header.replace(b"\n", b"\r\n") + b"\r\n" + message
