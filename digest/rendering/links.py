"""Every URL and sub-address a message carries, signed per purpose (see ``digest.rendering.tokens``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Protocol

from digest.rendering.tokens import Purpose, Tokens


class Subscriber(Protocol):
    """What a link needs of a subscriber: a mapped ``digest.core.models.Subscriber`` or the
    plain values sending reads (``digest.subscribers.recipients.Recipient``)."""

    @property
    def id(self) -> int: ...

    @property
    def created_at(self) -> dt.datetime: ...


def subscriber_stamp(subscriber: Subscriber) -> int:
    return int(subscriber.created_at.timestamp())


class Links:
    def __init__(self, base_url: str, tokens: Tokens, inbound_address: str):
        self.base_url = base_url.rstrip("/")
        self.tokens = tokens
        local, _, self.inbound_domain = inbound_address.partition("@")
        self.inbound_local = local

    def _token(self, purpose: Purpose, subscriber: Subscriber) -> str:
        return self.tokens.make(purpose, subscriber.id, subscriber_stamp(subscriber))

    @property
    def home(self) -> str:
        return self.base_url + "/"

    def confirm(self, subscriber: Subscriber, topics: str | None = None) -> str:
        """The double opt-in link; ``topics`` (from the request) apply when it is clicked."""
        token = self.tokens.make(Purpose.CONFIRM, subscriber.id, subscriber_stamp(subscriber), extra=topics)
        return f"{self.base_url}/confirm/{token}"

    def data_access(self, subscriber: Subscriber) -> str:
        """The short-lived link to export or erase one's data, mailed on request."""
        return f"{self.base_url}/my-data/{self._token(Purpose.DATA_ACCESS, subscriber)}"

    def unsubscribe(self, subscriber: Subscriber) -> str:
        return f"{self.base_url}/unsubscribe/{self._token(Purpose.UNSUBSCRIBE, subscriber)}"

    def preferences(self, subscriber: Subscriber) -> str:
        return f"{self.base_url}/preferences/{self._token(Purpose.PREFERENCES, subscriber)}"

    def feedback(self, subscriber: Subscriber, paper_id: str) -> tuple[str, str]:
        """The paper's "More like this" and "Less like this" links for this reader."""
        return self.feedback_for(subscriber, [paper_id])[0]

    def feedback_for(self, subscriber: Subscriber, paper_ids: Iterable[str]) -> tuple[tuple[str, str], ...]:
        """``feedback`` for each of a digest's papers, in their order."""
        make, subscriber_id, stamp = self.tokens.make_for, subscriber.id, subscriber_stamp(subscriber)
        prefix = self.base_url + "/feedback/"
        tokens = [make(Purpose.FEEDBACK, subscriber_id, stamp, paper_id) for paper_id in paper_ids]
        return tuple((f"{prefix}{token}/more", f"{prefix}{token}/less") for token in tokens)

    def digest_view(self, day: dt.date) -> str:
        return f"{self.base_url}/digests/{day.isoformat()}"

    def sub_address(self, tag: str) -> str:
        return f"{self.inbound_local}+{tag}@{self.inbound_domain}"

    def unsubscribe_mailto(self, subscriber: Subscriber) -> str:
        return self.sub_address("unsubscribe-" + self._token(Purpose.MAIL_UNSUBSCRIBE, subscriber))

    def bounce_address(self, delivery_id: int, subscriber: Subscriber) -> str:
        """VERP return path naming one delivery and its subscriber row; the signature stops
        forged bounces (``digest.mailin.classify.delivery_from_bounce_token``)."""
        token = self.tokens.make_bound(Purpose.BOUNCE, delivery_id, subscriber.id, subscriber_stamp(subscriber))
        return self.sub_address("bounce-" + token)

    def list_id(self) -> str:
        return f"Daily Papers <daily-papers.{self.inbound_domain}>"
