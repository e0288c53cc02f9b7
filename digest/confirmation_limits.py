"""How many confirmation (and other requested) emails a stranger can make us send.

Anyone can ask us to mail an address: a subscribe form, a mail to ``+subscribe``, an
unsubscribe mail without a token. Each of those mails a third party, so each is limited by every
key a stranger cannot cheaply change, all shared by every process through Redis (``limits``):

* the **source**: the client's network for the web (IPv4 /24, IPv6 /56: rotating addresses
  inside one provider allocation does not help), the SMTP peer's for mail-in;
* the **mailbox**: the destination with its sub-address tag dropped and case folded, so
  ``Inbox+1@victim.example`` … ``inbox+50@victim.example`` are one mailbox;
* the destination **domain**;
* **overall**, so that even a botnet cannot make us a mail cannon.

A request over a limit is answered exactly as one that sent mail (no oracle, and nothing to
retry against), and only the mail is withheld. A confirmation already sent stays valid for
its full lifetime, so filling a victim's limit never locks them out.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from dataclasses import dataclass

from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger(__name__)

NAMESPACE = "digest-confirm"


@dataclass(frozen=True)
class ConfirmationRules:
    per_source: str = "10/hour;30/day"
    per_mailbox: str = "2/hour;5/day"
    per_domain: str = "100/hour"
    overall: str = "1000/hour"


def source_network(host: str) -> str:
    """The limit's key for a client address: its /24 (IPv4) or /56 (IPv6)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64] or "unknown"
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 56
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def mailbox_of(address: str) -> str:
    """``Local+tag@Domain`` -> ``local@domain``: where the mail really lands."""
    local, _, domain = address.rpartition("@")
    return f"{local.partition('+')[0].casefold()}@{domain.casefold()}"


def _hashed(value: str) -> str:
    # The shared store needs a key, not the person's address.
    return hashlib.sha256(value.encode()).hexdigest()[:32]


class ConfirmationLimits:
    """``allow(kind, source, address)``: may we send this requested mail now? Counts it if so."""

    def __init__(self, storage_url: str | None, rules: ConfirmationRules):
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_url or "memory://"))
        self._rules: list[tuple[str, list[RateLimitItem]]] = [
            ("source", parse_many(rules.per_source)),
            ("mailbox", parse_many(rules.per_mailbox)),
            ("domain", parse_many(rules.per_domain)),
            ("overall", parse_many(rules.overall)),
        ]

    def allow(self, kind: str, source: str, address: str) -> bool:
        mailbox = mailbox_of(address)
        keys = {
            "source": _hashed(source),
            "mailbox": _hashed(mailbox),
            "domain": _hashed(mailbox.rpartition("@")[2]),
            "overall": "all",
        }
        # Each hit checks and counts in one atomic step (a Lua script on Redis), so requests that
        # arrive together cannot all pass a check before any is counted. Stopping at the first
        # refusal leaves a refused request counted against the limits before it (the source's
        # first): a flood spends its own budget, and a victim's already-sent link stays valid.
        for name, items in self._rules:
            for item in items:
                if not self._limiter.hit(item, NAMESPACE, kind, name, keys[name]):
                    log.warning("withheld a %s email: the per-%s limit (%s) is reached", kind, name, item)
                    return False
        return True
