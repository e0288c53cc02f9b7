"""The one place configuration is read: environment variables prefixed ``DIGEST_`` and ``.env``.

Only entry points (CLI, Celery app, web app factory, mail-in listener) build a ``Settings``;
domain code receives plain values.
"""

from __future__ import annotations

import ipaddress
from email.utils import parseaddr
from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

OPERATOR_LINK_DEFAULTS = ("3/hour", "10/hour")  # per network, per address
DEV_SECRET_KEY = "dev-insecure-secret-key-change-me"  # noqa: S105 - the refused placeholder


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIGEST_", env_file=".env", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"

    # Storage and queue
    database_url: str = "sqlite:///digest.db"
    redis_url: str | None = None

    # Outgoing mail
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_security: Literal["none", "starttls", "tls"] = "none"
    smtp_timeout: float = 30.0
    smtp_pool_size: int = Field(default=4, ge=1, le=64)
    mail_from: str = "Daily Papers <papers@localhost>"
    postal_address: str = "Daily Papers, 1 Example Street, 00000 Example City"
    dkim_selector: str | None = None
    dkim_domain: str | None = None
    dkim_private_key_path: str | None = None

    # Web and tokens
    base_url: str = "http://127.0.0.1:8000"
    secret_key: str = DEV_SECRET_KEY
    confirm_token_max_age_hours: int = 48
    max_request_bytes: int = 16_384
    rate_limit_subscribe_per_ip: str = "10/hour"  # requests to /subscribe per client (then 429)
    # Emails a stranger can make us send (confirmations, requested links): digest.subscribers.confirmation_limits.
    # Each is a `limits` string, several joined by ";".
    confirmation_limit_per_source: str = "10/hour;30/day"
    confirmation_limit_per_mailbox: str = "2/hour;5/day"
    confirmation_limit_per_domain: str = "100/hour"
    confirmation_limit_overall: str = "1000/hour"
    # The operator console (/admin): who may sign in (comma-separated addresses), how long a
    # mailed sign-in link and the session it starts last.
    admin_emails: str = ""
    admin_link_minutes: int = Field(default=15, ge=1, le=60)
    admin_session_hours: float = Field(default=8.0, gt=0, le=24)
    # Sign-in links to an operator address have their own budget (strangers can ask for them
    # too): per (address, client network) and per address; windows of at most an hour, so an
    # operator can always get a link within the hour (digest.subscribers.confirmation_limits).
    admin_link_limit_per_source: str = OPERATOR_LINK_DEFAULTS[0]
    admin_link_limit_per_address: str = OPERATOR_LINK_DEFAULTS[1]
    # Proxies whose X-Forwarded-For is believed: comma-separated addresses or networks.
    trusted_proxies: str = ""
    # authserv-ids of the relays whose Authentication-Results header mail-in believes (the
    # relay in front of `digest mailin` that checks SPF/DKIM/DMARC), comma-separated. None by
    # default: when the listener is the MX itself, any such header is the sender's own claim.
    mailin_trusted_authserv_ids: str = ""

    # Paper source
    papers_api_url: str = "https://huggingface.co"
    papers_api_timeout: float = 20.0
    papers_api_retries: int = 4
    papers_api_backoff: float = 1.0

    # Ranking
    digest_size: int = Field(default=10, ge=1, le=30)
    weight_upvotes: float = 1.0
    weight_comments: float = 2.0
    weight_stars: float = 3.0
    gravity: float = 1.5
    age_offset_hours: float = 2.0
    relevance_weight: float = 0.7
    # Folder of the sentence-embedding model (model.onnx + tokenizer.json); unset: the shipped one.
    embedding_model: str | None = None

    # Delivery
    batch_size: int = Field(default=500, ge=1)
    send_max_attempts: int = Field(default=6, ge=1)
    send_retry_base_seconds: float = 2.0
    send_retry_max_seconds: float = 300.0
    lease_seconds: int = 120
    stale_after_hours: float = 20.0
    # Each dispatch run also plans digests of this many earlier hours that were never planned
    # (beat or workers down at the time); 0 turns catching up off. Kept well under a day, so
    # nobody gets two editions in one go, and under the stale limit.
    catch_up_hours: int = Field(default=6, ge=0, le=12)
    rate_limit_per_second: float = 0.0
    rate_limit_per_domain_per_second: float = 0.0
    soft_bounce_threshold: int = 3
    soft_bounce_window_days: int = 7
    complaint_pause_threshold: float = 0.003
    complaint_window_days: int = 7
    complaint_min_sent: int = 200  # judge the complaint rate only past this many sent messages
    # A pause stops everyone's mail, so it needs more than a few forged reports can give
    # (digest.delivery.reputation explains the arithmetic).
    complaint_pause_min_complaints: int = Field(default=10, ge=1)
    complaint_pause_min_domains: int = Field(default=3, ge=1)
    complaint_min_subscriber_age_days: int = Field(default=7, ge=0)
    # Delivery rows of editions older than this are reduced to counts (`digest compact`).
    ledger_retention_days: int = Field(default=30, ge=1)
    task_visibility_timeout: int = 3600
    task_wait_seconds: float = 900.0  # how long `digest run` waits for a worker to answer

    # Mail in
    mailin_host: str = "127.0.0.1"
    mailin_port: int = 2525
    mailin_max_bytes: int = 10 * 1024 * 1024
    inbound_address: str = "papers@localhost"
    imap_host: str | None = None
    imap_port: int = 993
    imap_username: str | None = None
    imap_password: str | None = None
    imap_folder: str = "INBOX"
    imap_done_folder: str | None = None  # handled messages are moved here (created if missing)
    imap_ssl: bool = True

    # Operating: where `digest serve` listens (the Procfile's web line uses $PORT instead when
    # it is set), metrics, health checks and the log format.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    metrics_token: str | None = None  # set: GET /metrics needs "Authorization: Bearer <token>"
    # In production /metrics is refused without a token unless this opens it to anyone (warned
    # at start-up): subscriber counts, complaints and the pause state are not for strangers.
    metrics_public: bool = False
    beat_stale_after_seconds: float = Field(default=300.0, gt=0)  # beat writes its heartbeat every 15 s
    delivery_late_after_minutes: float = Field(default=30.0, gt=0)  # due this long ago and not sent: late
    log_format: Literal["text", "json"] = "text"

    @field_validator("base_url", "papers_api_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("mail_from", "inbound_address")
    @classmethod
    def _must_hold_address(cls, value: str) -> str:
        if "@" not in parseaddr(value)[1]:
            raise ValueError(f"not an email address: {value!r}")
        return value

    @field_validator("admin_emails")
    @classmethod
    def _admins_are_addresses(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip():
                # Imported only when there is an address: email-validator costs every command.
                from digest.core.addresses import normalise_address
                from digest.core.errors import InvalidAddress

                try:
                    normalise_address(part)
                except InvalidAddress as exc:
                    raise ValueError(f"DIGEST_ADMIN_EMAILS: {part.strip()!r}: {exc}") from exc
        return value

    @field_validator("admin_link_limit_per_source", "admin_link_limit_per_address")
    @classmethod
    def _operator_windows_within_an_hour(cls, value: str) -> str:
        if value in OPERATOR_LINK_DEFAULTS:
            return value  # pydantic-settings validates defaults too; these are known good
        from limits import parse_many  # ~25 ms: only for a value someone set

        # The README promises an operator a link within the hour: no window may be longer.
        if any(item.get_expiry() > 3600 for item in parse_many(value)):
            raise ValueError(f"{value!r}: console sign-in limits may count over an hour at most")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip():
                ipaddress.ip_network(part.strip(), strict=False)  # ValueError names the bad one
        return value

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> Settings:
        if self.environment != "development" and (self.secret_key == DEV_SECRET_KEY or len(self.secret_key) < 32):
            raise ValueError("DIGEST_SECRET_KEY must be set to a random value of 32+ characters outside development")
        return self

    @model_validator(mode="after")
    def _retention_outlasts_the_rules(self) -> Settings:
        # Compacted rows no longer answer "no repeats", the stale limit or the windowed trust
        # rules: each must be over before its rows may go.
        from digest.core.retention import NO_REPEAT_LOOKBACK

        needed = {
            "the no-repeats reach": NO_REPEAT_LOOKBACK.days,
            "DIGEST_STALE_AFTER_HOURS": self.stale_after_hours / 24,
            "DIGEST_COMPLAINT_WINDOW_DAYS": self.complaint_window_days,
            "DIGEST_SOFT_BOUNCE_WINDOW_DAYS": self.soft_bounce_window_days,
        }
        name, days = max(needed.items(), key=lambda item: item[1])
        if self.ledger_retention_days <= days:
            raise ValueError(
                f"DIGEST_LEDGER_RETENTION_DAYS ({self.ledger_retention_days}) must exceed {name} ({days:g} days)"
            )
        return self

    @property
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(
            ipaddress.ip_network(p.strip(), strict=False) for p in self.trusted_proxies.split(",") if p.strip()
        )

    @property
    def mailin_trusted_relays(self) -> frozenset[str]:
        return frozenset(i.strip().lower() for i in self.mailin_trusted_authserv_ids.split(",") if i.strip())

    @property
    def admin_addresses(self) -> frozenset[str]:
        """``admin_emails`` normalised as subscriber addresses are (so case does not matter)."""
        from digest.core.addresses import normalise_address

        return frozenset(normalise_address(a) for a in self.admin_emails.split(",") if a.strip())

    @property
    def mail_from_address(self) -> str:
        return parseaddr(self.mail_from)[1]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings for an entry point; cached so a process reads its environment once."""
    return Settings()
