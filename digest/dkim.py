"""DKIM signatures (RFC 6376) for outgoing mail, with dkimpy.

Gmail and Yahoo require bulk mail to be authenticated; signing the list headers too means a
forwarder cannot swap the one-click unsubscribe target without breaking the signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dkim

from digest.errors import DigestError

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


class DkimConfigError(DigestError):
    """The DIGEST_DKIM_* settings are incomplete or the key cannot be read."""


@dataclass(frozen=True)
class DkimSigner:
    selector: str
    domain: str
    private_key: bytes  # PEM

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

    def sign(self, message: bytes) -> bytes:
        """The message with a ``DKIM-Signature`` header in front (relaxed/relaxed canonicalisation)."""
        signature = dkim.sign(
            message,
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            self.private_key,
            include_headers=list(SIGNED_HEADERS),
            canonicalize=(b"relaxed", b"relaxed"),
            linesep=b"\n",
        )
        return bytes(signature) + message
