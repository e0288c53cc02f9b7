"""How many confirmation (and other requested) emails a stranger can make us send.

Anyone can ask us to mail an address: a subscribe form, a mail to ``+subscribe``, an
unsubscribe mail without a token, a data link, a console sign-in link. Each of those mails a
third party, so each is limited by every key a stranger cannot cheaply change, all shared by
every process through Redis (``limits``):

* the **source**: the client's network for the web (IPv4 /24, IPv6 /56: rotating addresses
  inside one provider allocation does not help), what mail-in knows of the sender for mail;
* the **mailbox**: the destination with its sub-address tag dropped and case folded, so
  ``Inbox+1@victim.example`` … ``inbox+50@victim.example`` are one mailbox;
* the destination **domain**;
* **overall**, so that even a botnet cannot make us a mail cannon.

The budgets protect the person, not the kind of mail: every kind (web or mail-in confirmation,
unsubscribe link, data link) counts against the same four budgets, so a mailbox gets at most
its per-mailbox number of stranger-triggered mails whatever mix of requests a stranger sends.
The per-source budget is shared too: it measures how much third-party mail one network may
cause, which does not depend on the form it used (and per kind it would be five times larger).

What the answer says depends on whose budget is spent. The **source** budget is the
requester's own (their network's), so it is counted while answering, for every request whatever
the address (counting only requests that mail would tell the requester which addresses are
pending): when it is spent the answer is a 429 that says no mail was sent and when to ask again
(``RateLimited``). The mailbox, domain and overall budgets are about the person or everyone, so
a request over one of them is answered exactly as one that sent mail (no oracle), only the mail
is withheld; the answer pages state those limits instead. A confirmation already sent stays
valid for its full lifetime, so filling a victim's limit never locks them out.

**Console sign-in links** to a configured operator have a budget of their own, apart from the
above (``allow_operator_link``): otherwise strangers asking for an operator's link, or signing
the operator's address up, would spend the day budget the operator needs to get in. It has
only windows of at most an hour (``Settings`` checks), so whatever strangers asked before, the
operator's budget is whole again an hour later; per source network as well as per address, so
a stranger elsewhere cannot spend the operator's share at all, only many networks at once can.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import math
from dataclasses import dataclass

from limits import RateLimitItem, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from digest.core.errors import RateLimited

log = logging.getLogger(__name__)

# A new namespace for the shared keys: counters written per kind under the old one simply expire.
NAMESPACE = "digest-mail"
OPERATOR_NAMESPACE = "digest-operator-link"


@dataclass(frozen=True)
class ConfirmationRules:
    per_source: str = "10/hour;30/day"
    per_mailbox: str = "2/hour;5/day"
    per_domain: str = "100/hour"
    overall: str = "1000/hour"
    # Console sign-in links to an operator address: per (address, source network), and per address.
    operator_per_source: str = "3/hour"
    operator_per_address: str = "10/hour"


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


def longest_window(limits: str) -> dt.timedelta:
    """The longest window among ``limits`` (a ``limits`` string, several joined by ";")."""
    return dt.timedelta(seconds=max(item.get_expiry() for item in parse_many(limits)))


def describe_limits(limits: str) -> str:
    """``"2/hour;5/day"`` -> ``"2 an hour, 5 a day"``, as an answer page states a limit."""
    parts = []
    for item in parse_many(limits):
        seconds = item.get_expiry()
        if seconds == 3600:
            parts.append(f"{item.amount} an hour")
        elif seconds == 86400:
            parts.append(f"{item.amount} a day")
        else:
            parts.append(f"{item.amount} per {seconds // 60} minutes")
    return ", ".join(parts)


def retry_after(now: dt.datetime, window: dt.timedelta) -> dt.datetime:
    """When a moving window of ``window`` has forgotten every request made up to ``now``.

    The next whole minute strictly after ``now + window`` (a request counted at ``now`` still
    counts at exactly ``now + window``), as a page says it. It depends on the clock alone, never
    on what was counted for an address, so saying it tells nobody whether that address is an
    operator's or was asked for before.
    """
    later = (now + window).timestamp()
    return dt.datetime.fromtimestamp((math.floor(later) // 60 + 1) * 60, dt.UTC)


NOT_SENT = "Not sent: too many emails were asked for from your network. Ask again after {at:%H:%M} UTC."


class ConfirmationLimits:
    """May we send this requested mail now? Each check counts the request if so.

    ``take_source`` (while answering) and then ``allow_address`` (after the answer) for the web;
    ``allow`` for mail-in, which has nobody to answer and checks all four after the fact.
    """

    def __init__(self, storage_url: str | None, rules: ConfirmationRules):
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_url or "memory://"))
        self._rules: list[tuple[str, list[RateLimitItem]]] = [
            ("source", parse_many(rules.per_source)),
            ("mailbox", parse_many(rules.per_mailbox)),
            ("domain", parse_many(rules.per_domain)),
            ("overall", parse_many(rules.overall)),
        ]
        self._operator_rules: list[tuple[str, list[RateLimitItem]]] = [
            ("source", parse_many(rules.operator_per_source)),
            ("address", parse_many(rules.operator_per_address)),
        ]
        self.operator_window = max(
            longest_window(rules.operator_per_source), longest_window(rules.operator_per_address)
        )

    def allow(self, kind: str, source: str, address: str) -> bool:
        """Counts against the budgets every kind shares; ``kind`` only names it in the log."""
        keys = {"source": _hashed(source), **self._address_keys(address)}
        return self._hit(NAMESPACE, self._rules, keys, kind)

    def take_source(self, source: str) -> None:
        """Count a request against its network's budget, raising ``RateLimited`` if it is spent.

        Called while answering, for every request a page could turn into mail, so the answer
        (and its retry time, from the network's own requests) says nothing about the address.
        """
        self._take(NAMESPACE, self._rules[:1], {"source": _hashed(source)})

    def allow_address(self, kind: str, address: str) -> bool:
        """The budgets about the person and everyone, after ``take_source`` counted the network."""
        return self._hit(NAMESPACE, self._rules[1:], self._address_keys(address), kind)

    def take_operator_source(self, source: str, address: str) -> None:
        """The sign-in link's (address, network) share, counted while answering for any address.

        Counted whether or not ``address`` is an operator's, so a 429 here tells nobody who is.
        """
        keys = {"source": _hashed(f"{_hashed(mailbox_of(address))}|{source}")}
        self._take(OPERATOR_NAMESPACE, self._operator_rules[:1], keys)

    def allow_operator_address(self, address: str) -> bool:
        """A console sign-in link to ``address``, which the caller knows is an operator's."""
        keys = {"address": _hashed(mailbox_of(address))}
        return self._hit(OPERATOR_NAMESPACE, self._operator_rules[1:], keys, "admin-sign-in")

    @staticmethod
    def _address_keys(address: str) -> dict[str, str]:
        mailbox = mailbox_of(address)
        return {"mailbox": _hashed(mailbox), "domain": _hashed(mailbox.rpartition("@")[2]), "overall": "all"}

    def _take(self, namespace: str, rules: list[tuple[str, list[RateLimitItem]]], keys: dict[str, str]) -> None:
        for name, items in rules:
            for item in items:
                if not self._limiter.hit(item, namespace, name, keys[name]):
                    # The moving window frees a place when its oldest counted request expires.
                    reset = self._limiter.get_window_stats(item, namespace, name, keys[name]).reset_time
                    at = retry_after(dt.datetime.fromtimestamp(reset, dt.UTC), dt.timedelta(0))
                    seconds = max(1, math.ceil(reset - dt.datetime.now(dt.UTC).timestamp()))
                    log.warning("did not send a requested email: the per-%s limit (%s) is reached", name, item)
                    raise RateLimited(seconds, NOT_SENT.format(at=at))

    def _hit(
        self, namespace: str, rules: list[tuple[str, list[RateLimitItem]]], keys: dict[str, str], kind: str
    ) -> bool:
        # Each hit checks and counts in one atomic step (a Lua script on Redis), so requests that
        # arrive together cannot all pass a check before any is counted. Stopping at the first
        # refusal leaves a refused request counted against the limits before it (the source's
        # first): a flood spends its own budget, and a victim's already-sent link stays valid.
        for name, items in rules:
            for item in items:
                if not self._limiter.hit(item, namespace, name, keys[name]):
                    log.warning("withheld a %s email: the per-%s limit (%s) is reached", kind, name, item)
                    return False
        return True
