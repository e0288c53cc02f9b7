"""All domain errors derive from ``DigestError`` so boundaries can report them in one line."""


class DigestError(Exception):
    """A failure the operator or user should read about, not a bug."""


class RateLimited(DigestError):
    """Too many requests: answered 429 with ``Retry-After`` (seconds) and the message."""

    def __init__(self, retry_after: int, message: str = "Too many requests. Please try again later."):
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamError(DigestError):
    """The papers API could not be read (after retries)."""


class InvalidAddress(DigestError):
    """An email address that cannot be used."""


class InvalidToken(DigestError):
    """A link token that is tampered, unknown, expired or meant for something else."""

    def __init__(self, message: str, *, expired: bool = False, subscriber_id: int | None = None):
        super().__init__(message)
        self.expired = expired
        self.subscriber_id = subscriber_id


class NotFound(DigestError):
    """The thing asked for does not exist."""


class SendingPaused(DigestError):
    """Sending stopped itself (e.g. complaint rate over the threshold)."""
