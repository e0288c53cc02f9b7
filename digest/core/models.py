"""Database schema: subscribers, papers, digests and the per-recipient delivery ledger."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware timestamps on every backend (SQLite drops the offset on the way back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime stored; use timezone-aware UTC timestamps")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SubscriberStatus(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"


# The states in which nobody may be mailed a digest until the person opts in again
# (``digest.subscribers.subscriptions`` holds the rules; erasure keeps a ``Suppression`` instead of a row).
OPTED_OUT = frozenset({SubscriberStatus.UNSUBSCRIBED, SubscriberStatus.BOUNCED, SubscriberStatus.COMPLAINED})


class Frequency(enum.StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"  # the best of the previous calendar month, on the 1st
    PAUSED = "paused"


class DigestKind(enum.StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"


class EventKind(enum.StrEnum):
    """What a subscriber event records; the values are the stored ``subscriber_events.kind``."""

    HARD_BOUNCE = "hard_bounce"
    SOFT_BOUNCE = "soft_bounce"
    COMPLAINT = "complaint"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # planned, or waiting for a retry at next_attempt_at
    SENDING = "sending"  # claimed by a worker until lease_until
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"  # too late (stale guard), nothing left to send, or sending paused


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK constraint: portable and easy to extend by migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class Subscriber(Base):
    __tablename__ = "subscribers"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    status: Mapped[SubscriberStatus] = mapped_column(
        _enum(SubscriberStatus, "subscriber_status"), default=SubscriberStatus.PENDING
    )
    topics: Mapped[str] = mapped_column(String(500), default="")
    excluded: Mapped[str] = mapped_column(String(500), default="")
    frequency: Mapped[Frequency] = mapped_column(_enum(Frequency, "frequency"), default=Frequency.DAILY)
    digest_size: Mapped[int | None] = mapped_column(Integer, default=None)
    send_hour: Mapped[int] = mapped_column(Integer, default=8)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    weekday: Mapped[int] = mapped_column(Integer, default=0)  # Monday = 0, for weekly digests
    source: Mapped[str] = mapped_column(String(16), default="web")
    soft_bounce_score: Mapped[float] = mapped_column(Float, default=0.0)
    soft_bounce_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    confirmation_sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    confirmed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    unsubscribed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    bounced_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    complained_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    # The digest only on days with at least one paper that passed the reader's bar.
    only_for_you: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The secret part of the reader's own feed URL (random, replaced on request); None until
    # the reader first opens their preferences. Unique: the feed is looked up by it.
    feed_token: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)

    __table_args__ = (
        # The dispatcher walks due subscribers by (status, id) keyset pages.
        Index("ix_subscribers_status_id", "status", "id"),
        Index("ix_subscribers_schedule", "status", "timezone", "send_hour"),
        Index("ix_subscribers_confirmed_at", "confirmed_at"),  # the console's growth chart
    )


class Paper(Base):
    __tablename__ = "papers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # arXiv id
    title: Mapped[str] = mapped_column(Text)
    abstract: Mapped[str] = mapped_column(Text, default="")
    authors: Mapped[list[str]] = mapped_column(JSON, default=list)
    upvotes: Mapped[int] = mapped_column(Integer, default=0)
    num_comments: Mapped[int] = mapped_column(Integer, default=0)
    github_repo: Mapped[str | None] = mapped_column(String(500), default=None)
    github_stars: Mapped[int | None] = mapped_column(Integer, default=None)
    project_page: Mapped[str | None] = mapped_column(String(500), default=None)
    ai_summary: Mapped[str | None] = mapped_column(Text, default=None)
    ai_keywords: Mapped[list[str]] = mapped_column(JSON, default=list)
    thumbnail: Mapped[str | None] = mapped_column(String(500), default=None)
    organization: Mapped[str | None] = mapped_column(String(200), default=None)
    published_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    daily_date: Mapped[dt.date] = mapped_column(Date, index=True)
    submitted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    fetched_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Digest(Base):
    """One edition: the candidate papers of a day (or week) in trending order."""

    __tablename__ = "digests"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    kind: Mapped[DigestKind] = mapped_column(_enum(DigestKind, "digest_kind"))
    date: Mapped[dt.date] = mapped_column(Date)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    items: Mapped[list[DigestItem]] = relationship(
        back_populates="digest", order_by="DigestItem.position", cascade="all, delete-orphan"
    )

    __table_args__ = (UniqueConstraint("kind", "date", name="uq_digests_kind_date"),)


class DigestItem(Base):
    __tablename__ = "digest_items"

    digest_id: Mapped[int] = mapped_column(ForeignKey("digests.id", ondelete="CASCADE"), primary_key=True)
    paper_id: Mapped[str] = mapped_column(ForeignKey("papers.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)

    digest: Mapped[Digest] = relationship(back_populates="items")
    paper: Mapped[Paper] = relationship(lazy="joined")


class Delivery(Base):
    """The ledger: one row per (subscriber, digest), claimed before sending, marked after."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    digest_id: Mapped[int] = mapped_column(ForeignKey("digests.id", ondelete="CASCADE"))
    # Kept (as NULL) when a subscriber erases their data, so counts stay true.
    subscriber_id: Mapped[int | None] = mapped_column(ForeignKey("subscribers.id", ondelete="SET NULL"))
    recipient: Mapped[str | None] = mapped_column(String(254), default=None)
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    message_id: Mapped[str] = mapped_column(String(255), unique=True)
    paper_ids: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    reasons: Mapped[dict[str, list[str]] | None] = mapped_column(JSON, default=None)
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    not_after: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    smtp_reply: Mapped[str | None] = mapped_column(String(500), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)

    __table_args__ = (
        UniqueConstraint("subscriber_id", "digest_id", name="uq_deliveries_subscriber_digest"),
        Index("ix_deliveries_digest_status", "digest_id", "status"),
        # "No repeats" reads a subscriber's recent deliveries.
        Index("ix_deliveries_subscriber_created", "subscriber_id", "created_at"),
        # The complaint-rate guard counts recent sent deliveries before every batch. Partial, so
        # that no query on pending or sending rows can be planned through it.
        Index(
            "ix_deliveries_sent_at",
            "sent_at",
            postgresql_where=text("status = 'sent'"),
            sqlite_where=text("status = 'sent'"),
        ),
    )


class SubscriberEvent(Base):
    """Bounces, complaints and other things that happened to a subscriber, for windowed scores."""

    __tablename__ = "subscriber_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    subscriber_id: Mapped[int | None] = mapped_column(ForeignKey("subscribers.id", ondelete="SET NULL"), index=True)
    delivery_id: Mapped[int | None] = mapped_column(ForeignKey("deliveries.id", ondelete="SET NULL"), default=None)
    kind: Mapped[str] = mapped_column(String(32))  # an EventKind
    detail: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_subscriber_events_kind_created", "kind", "created_at"),
        # Deleting ledger rows (compaction) sets this to NULL: without an index every deleted
        # row would scan the table.
        Index("ix_subscriber_events_delivery_id", "delivery_id"),
    )


class DeliveryCount(Base):
    """What stays of an edition's compacted ledger rows: how many ended in each status."""

    __tablename__ = "delivery_counts"

    digest_id: Mapped[int] = mapped_column(ForeignKey("digests.id", ondelete="CASCADE"), primary_key=True)
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus, "delivery_count_status"), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)


class ProcessedMessage(Base):
    """Inbound messages already handled, so an IMAP poll never handles one twice."""

    __tablename__ = "processed_messages"

    message_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Suppression(Base):
    """An address that must never be re-activated by anyone but the person: only a keyed hash.

    Kept for erased and complained addresses, so that an erasure forgets the person yet an
    import or a stranger's request cannot bring the address back (``digest.subscribers.subscriptions``).
    """

    __tablename__ = "suppressions"

    address_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # HMAC-SHA256, hex
    reason: Mapped[str] = mapped_column(String(16))  # erased, complained
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class SendPause(Base):
    """A self-imposed stop of all sending, latched until an operator resumes it."""

    __tablename__ = "send_pauses"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    reason: Mapped[str] = mapped_column(String(500))
    paused_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    resumed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    resumed_by: Mapped[str | None] = mapped_column(String(254), default=None)


class AdminSignIn(Base):
    """One console sign-in link mailed to an operator and, once used, the session it started.

    The link works once (``used_at``) and briefly; the session cookie names this row, so it ends
    at ``expires_at`` or when the operator signs out (``ended_at``), whatever the cookie says.
    """

    __tablename__ = "admin_sign_ins"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    email: Mapped[str] = mapped_column(String(254))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    csrf_token: Mapped[str | None] = mapped_column(String(64), default=None)


# ---------------------------------------------------------------------------------------------
# Semantic ranking and what readers teach it (digest.papers.embedding, digest.subscribers.feedback)


class PaperEmbedding(Base):
    """A paper's sentence vector, computed once when it is collected (float32 bytes)."""

    __tablename__ = "paper_embeddings"

    paper_id: Mapped[str] = mapped_column(ForeignKey("papers.id", ondelete="CASCADE"), primary_key=True)
    model: Mapped[str] = mapped_column(String(32))
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class TopicEmbedding(Base):
    """A topic's vector, shared by everyone who names the same (normalised) topic."""

    __tablename__ = "topic_embeddings"

    model: Mapped[str] = mapped_column(String(32), primary_key=True)
    topic: Mapped[str] = mapped_column(String(80), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class MarkSource(enum.StrEnum):
    EMAIL = "email"  # More like this / Less like this in a digest
    EXAMPLE = "example"  # an example paper given on the preferences page


class PaperMark(Base):
    """One reader's signal on one paper: +1 more like this, -1 less; the last one wins."""

    __tablename__ = "paper_marks"

    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True)
    paper_id: Mapped[str] = mapped_column(ForeignKey("papers.id", ondelete="CASCADE"), primary_key=True)
    signal: Mapped[int] = mapped_column(SmallInteger)
    source: Mapped[MarkSource] = mapped_column(_enum(MarkSource, "mark_source"), default=MarkSource.EMAIL)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ReaderProfile(Base):
    """What the dispatcher needs of a reader's teaching, recomputed when they change it (never
    per message): vectors of the papers they marked, whom they follow, how personal."""

    __tablename__ = "reader_profiles"

    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True)
    follows: Mapped[list[str]] = mapped_column(JSON, default=list)
    personal_weight: Mapped[float | None] = mapped_column(Float, default=None)  # None: the default blend
    model: Mapped[str | None] = mapped_column(String(32), default=None)
    liked: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)  # rows of float32 vectors
    liked_titles: Mapped[list[str]] = mapped_column(JSON, default=list)  # one per liked row
    disliked: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
