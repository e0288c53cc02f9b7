"""Wiring: turns ``Settings`` into the objects the domain needs. Only entry points call this."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from digest.core.db import make_engine, make_session_factory
from digest.delivery.reputation import PauseRules

# The rest is imported where it is first used: a CLI command builds a Runtime too, and
# `digest status` must not pay for the embedding model, Jinja, SMTP and HTTP clients
# (bench/cli_startup.py).
if TYPE_CHECKING:
    from digest.core.models import Paper
    from digest.core.settings import Settings
    from digest.delivery.policy import DeliveryPolicy
    from digest.papers.embedding import Embedder
    from digest.papers.source import PapersClient
    from digest.ranking.trending import TrendingWeights
    from digest.rendering.emails import EmailRenderer
    from digest.rendering.links import Links
    from digest.rendering.tokens import Tokens
    from digest.subscribers.confirmation_limits import ConfirmationLimits
    from digest.subscribers.recipients import Recipient
    from digest.transport.dkim import DkimSigner
    from digest.transport.limiter import RateLimiter
    from digest.transport.mailer import Mailer, SMTPConfig


DEV_OUTBOX = Path("outbox")  # the demo's folder: one place a newcomer reads all mail


def development_outbox(settings: Settings) -> Path | None:
    """The folder mail goes to when nobody set up a mail server: in development with no
    ``DIGEST_SMTP_HOST``, the demo's ``./outbox/`` (the default 127.0.0.1:1025 has nothing
    listening on a fresh machine, so every confirmation and sign-in link would be lost).
    Elsewhere, or once a host is set, ``None``: SMTP."""
    if settings.environment == "development" and "smtp_host" not in settings.model_fields_set:
        return DEV_OUTBOX.resolve()
    return None


@dataclass
class Runtime:
    settings: Settings
    outbox: Path | None = None  # set: write mail to files instead of SMTP (embedded default)
    _engine: Engine | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.outbox is None:
            self.outbox = development_outbox(self.settings)

    @property
    def mail_destination(self) -> str:
        """Where mail goes, for the start-up log: the outbox folder or the SMTP relay."""
        if self.outbox is not None:
            return f"mail is written to {self.outbox}/ (.eml and .html; set DIGEST_SMTP_HOST to send over SMTP)"
        return f"mail goes to the SMTP server at {self.settings.smtp_host}:{self.settings.smtp_port}"

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.settings.database_url)
        return self._engine

    @cached_property
    def session_factory(self) -> sessionmaker[Session]:
        return make_session_factory(self.engine)

    @cached_property
    def tokens(self) -> Tokens:
        from digest.rendering.tokens import Tokens

        return Tokens(self.settings.secret_key, self.settings.confirm_token_max_age_hours * 3600)

    @cached_property
    def links(self) -> Links:
        from digest.rendering.links import Links

        return Links(self.settings.base_url, self.tokens, self.settings.inbound_address)

    @cached_property
    def renderer(self) -> EmailRenderer:
        from digest.rendering.emails import EmailRenderer

        return EmailRenderer()

    @cached_property
    def dkim_signer(self) -> DkimSigner | None:
        from digest.transport.dkim import DkimSigner

        s = self.settings
        return DkimSigner.from_settings(s.dkim_selector, s.dkim_domain, s.dkim_private_key_path)

    @cached_property
    def embedding_model(self) -> str:
        """The name stored vectors carry; known without loading the model."""
        from digest.papers.embedding import model_name

        return model_name(self.settings.embedding_model)

    @property
    def embedder(self) -> Embedder:
        """The sentence-embedding model, loaded on first use (once per process)."""
        from digest.papers.embedding import load_embedder

        return load_embedder(self.settings.embedding_model)

    def embed_papers(self, session: Session, papers: list[Paper]) -> object:
        """Give newly collected papers their vectors (``digest.papers.source.store_papers``' hook)."""
        from digest.papers.embedding import paper_vectors

        return paper_vectors(session, papers, self.embedding_model, lambda: self.embedder)

    @cached_property
    def weights(self) -> TrendingWeights:
        from digest.ranking.trending import TrendingWeights

        s = self.settings
        return TrendingWeights(
            upvotes=s.weight_upvotes,
            comments=s.weight_comments,
            stars=s.weight_stars,
            gravity=s.gravity,
            age_offset_hours=s.age_offset_hours,
        )

    @cached_property
    def policy(self) -> DeliveryPolicy:
        from digest.delivery.policy import DeliveryPolicy

        s = self.settings
        return DeliveryPolicy(
            digest_size=s.digest_size,
            max_attempts=s.send_max_attempts,
            retry_base_seconds=s.send_retry_base_seconds,
            retry_max_seconds=s.send_retry_max_seconds,
            lease_seconds=s.lease_seconds,
            stale_after=dt.timedelta(hours=s.stale_after_hours),
            relevance_weight=s.relevance_weight,
            soft_bounce_threshold=s.soft_bounce_threshold,
            soft_bounce_window=dt.timedelta(days=s.soft_bounce_window_days),
        )

    @cached_property
    def pause_rules(self) -> PauseRules:
        s = self.settings
        return PauseRules(
            threshold=s.complaint_pause_threshold,
            window=dt.timedelta(days=s.complaint_window_days),
            min_sent=s.complaint_min_sent,
            min_complaints=s.complaint_pause_min_complaints,
            min_domains=s.complaint_pause_min_domains,
            min_subscriber_age=dt.timedelta(days=s.complaint_min_subscriber_age_days),
        )

    @cached_property
    def confirmation_limits(self) -> ConfirmationLimits:
        from digest.subscribers.confirmation_limits import ConfirmationLimits, ConfirmationRules

        s = self.settings
        return ConfirmationLimits(
            s.redis_url,
            ConfirmationRules(
                per_source=s.confirmation_limit_per_source,
                per_mailbox=s.confirmation_limit_per_mailbox,
                per_domain=s.confirmation_limit_per_domain,
                overall=s.confirmation_limit_overall,
                operator_per_source=s.admin_link_limit_per_source,
                operator_per_address=s.admin_link_limit_per_address,
            ),
        )

    @property
    def message_domain(self) -> str:
        return self.settings.mail_from_address.rpartition("@")[2] or "localhost"

    def smtp_config(self) -> SMTPConfig:
        from digest.transport.mailer import SMTPConfig

        s = self.settings
        return SMTPConfig(
            host=s.smtp_host,
            port=s.smtp_port,
            security=s.smtp_security,
            username=s.smtp_username,
            password=s.smtp_password,
            timeout=s.smtp_timeout,
        )

    def mailer_factory(self) -> Callable[[], Mailer]:
        from digest.transport.mailer import OutboxMailer, SMTPPool

        if self.outbox is not None:
            outbox = OutboxMailer(self.outbox)
            return lambda: outbox
        config, size = self.smtp_config(), self.settings.smtp_pool_size
        return lambda: SMTPPool(config, size)

    def bounce_sender(self) -> Callable[[int, Recipient], str]:
        """The VERP envelope sender of a delivery (by its id) to a subscriber."""
        return lambda delivery_id, subscriber: self.links.bounce_address(delivery_id, subscriber)

    def rate_limiter(self) -> RateLimiter:
        from digest.transport.limiter import RateLimiter

        s = self.settings
        if s.redis_url and (s.rate_limit_per_second > 0 or s.rate_limit_per_domain_per_second > 0):
            from digest.transport.ratelimit import RedisSendLimiter

            return RedisSendLimiter(s.redis_url, s.rate_limit_per_second, s.rate_limit_per_domain_per_second)
        return RateLimiter()

    def papers_client(self) -> PapersClient:
        from digest.papers.source import PapersClient

        s = self.settings
        return PapersClient(
            s.papers_api_url,
            timeout=s.papers_api_timeout,
            retries=s.papers_api_retries,
            backoff=s.papers_api_backoff,
        )

    def warm(self) -> None:
        """Load now what a worker process's first tasks would otherwise wait for: the embedding
        model (collecting gives new papers their vectors, planning gives new topics theirs) and
        the email templates. Once per worker process, right after it starts (``workers.tasks``):
        the first edition of the day then leaves without a model load in the way."""
        from digest.papers.embedding import load_embedder

        load_embedder(self.settings.embedding_model)  # cached: `embedder` returns this one
        self.renderer.preload()

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
