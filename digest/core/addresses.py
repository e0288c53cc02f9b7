"""Email address validation and normalisation, with the email-validator library."""

from __future__ import annotations

from email_validator import EmailNotValidError, validate_email

from digest.core.errors import InvalidAddress
from digest.core.text import has_unsafe

MAX_ADDRESS_LENGTH = 254


def normalise_address(raw: str) -> str:
    """The canonical form of an address, or ``InvalidAddress`` saying what is wrong.

    Domains are IDNA-normalised and lower-cased; the local part keeps its case (RFC 5321) but
    the whole address is compared case-insensitively by storing it lower-cased, which is what
    every large mailbox provider does.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidAddress("Please enter an email address.")
    candidate = raw.strip()
    if has_unsafe(candidate):
        # Said plainly, before the validator (which names the code point) or a store sees it.
        raise InvalidAddress("An email address cannot contain control characters.")
    if any(ch in candidate for ch in "\r\n\t ") or len(candidate) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress("That does not look like an email address.")
    try:
        result = validate_email(candidate, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise InvalidAddress(f"That does not look like an email address: {exc}") from exc
    # IDNA domains are kept in their ASCII (punycode) form whenever the local part allows, so
    # the address travels through any SMTP server, not only those that speak SMTPUTF8.
    normalised = result.ascii_email or result.normalized
    if len(normalised) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress("That email address is too long.")
    local, _, domain = normalised.rpartition("@")
    return f"{local.lower()}@{domain.lower()}"
