"""Signed link tokens, one salt per purpose, so a token made for one thing opens nothing else.

Tokens carry the subscriber id and the second their row was created: a token made for an
erased subscriber never opens a later row that happens to reuse the id.

Link tokens come from itsdangerous. Tokens that live in an email address's local part (the VERP
bounce address and the List-Unsubscribe mailto) use a compact form instead: lower-case hex with
an 80-bit HMAC-SHA256 tag, because a local part should stay within 64 characters (RFC 5321)
and some mail systems change its case; itsdangerous' base64 would break both.
"""

from __future__ import annotations

import enum
import hashlib
import hmac

from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

from digest.errors import InvalidToken


class Purpose(enum.StrEnum):
    CONFIRM = "confirm"
    UNSUBSCRIBE = "unsubscribe"
    PREFERENCES = "preferences"
    BOUNCE = "bounce"  # VERP return path, names one delivery (compact form)
    MAIL_UNSUBSCRIBE = "mail-unsubscribe"  # the List-Unsubscribe mailto (compact form)
    FEEDBACK = "feedback"  # More/Less like this: one subscriber and one paper (compact form)


# Compact tokens also cost a tenth of itsdangerous' to make: a digest carries one feedback
# token per paper.
COMPACT = frozenset({Purpose.BOUNCE, Purpose.MAIL_UNSUBSCRIBE, Purpose.FEEDBACK})
TAG_HEX_CHARS = 20  # 80 bits: far beyond online guessing through a mail server


AnySerializer = URLSafeSerializer | URLSafeTimedSerializer


class Tokens:
    def __init__(self, secret_key: str, confirm_max_age_seconds: int = 48 * 3600):
        self._secret_key = secret_key
        self.confirm_max_age_seconds = confirm_max_age_seconds
        self._serializers: dict[Purpose, AnySerializer] = {}
        self._compact_keys = {p: hashlib.sha256(f"digest.{p.value}.{secret_key}".encode()).digest() for p in COMPACT}

    def _serializer(self, purpose: Purpose) -> AnySerializer:
        # Built once per purpose: a serializer derives its key on creation, and a digest run
        # makes several tokens per message.
        cached = self._serializers.get(purpose)
        if cached is not None:
            return cached
        # Only confirmation links expire; the others carry no timestamp, so a subscriber's links
        # are the same in every message (and a retried message is byte-identical).
        salt = f"digest.{purpose.value}"
        serializer: AnySerializer = (
            URLSafeTimedSerializer(self._secret_key, salt=salt)
            if purpose is Purpose.CONFIRM
            else URLSafeSerializer(self._secret_key, salt=salt)
        )
        self._serializers[purpose] = serializer
        return serializer

    def _tag(self, purpose: Purpose, object_id: int, stamp: int, item: str = "") -> str:
        message = f"{object_id}.{stamp}" + (f".{item}" if item else "")
        mac = hmac.new(self._compact_keys[purpose], message.encode(), hashlib.sha256).hexdigest()
        return mac[:TAG_HEX_CHARS]

    def make_for(self, purpose: Purpose, object_id: int, stamp: int, item: str) -> str:
        """A compact token that also names ``item`` (a paper id): ``id.stamp.item.tag``, the item
        with "/" (old arXiv ids) written as "~" so the token stays one path segment."""
        return f"{object_id:x}.{stamp:x}.{item.replace('/', '~')}.{self._tag(purpose, object_id, stamp, item)}"

    def read_for(self, purpose: Purpose, token: str) -> tuple[int, int, str]:
        """The (id, stamp, item) of a ``make_for`` token; ``InvalidToken`` if tampered."""
        parts = token.split(".")
        if len(parts) < 4 or len(token) > 120:
            raise InvalidToken("This link is not valid.")
        item = ".".join(parts[2:-1]).replace("~", "/")
        try:
            object_id, stamp = int(parts[0], 16), int(parts[1], 16)
        except ValueError as exc:
            raise InvalidToken("This link is not valid.") from exc
        if not hmac.compare_digest(parts[-1].lower(), self._tag(purpose, object_id, stamp, item)):
            raise InvalidToken("This link is not valid.")
        return object_id, stamp, item

    def make(self, purpose: Purpose, object_id: int, stamp: int) -> str:
        if purpose in COMPACT:
            return f"{object_id:x}.{stamp:x}.{self._tag(purpose, object_id, stamp)}"
        return str(self._serializer(purpose).dumps([object_id, stamp]))

    def read(self, purpose: Purpose, token: str) -> tuple[int, int]:
        """The (id, stamp) a token names; ``InvalidToken`` if tampered, foreign or expired."""
        if purpose in COMPACT:
            return self._read_compact(purpose, token)
        serializer = self._serializer(purpose)
        try:
            if isinstance(serializer, URLSafeTimedSerializer):
                payload = serializer.loads(token, max_age=self.confirm_max_age_seconds)
            else:
                payload = serializer.loads(token)
        except SignatureExpired as exc:
            # The signature was good; the signer hands over the still-encoded payload.
            payload = serializer.load_payload(exc.payload) if exc.payload is not None else None
            subscriber_id = _as_pair(payload)[0] if payload is not None else None
            raise InvalidToken("This link has expired.", expired=True, subscriber_id=subscriber_id) from exc
        except BadSignature as exc:
            raise InvalidToken("This link is not valid.") from exc
        return _as_pair(payload)

    def _read_compact(self, purpose: Purpose, token: str) -> tuple[int, int]:
        parts = token.lower().split(".")
        if len(parts) != 3 or len(token) > 80:
            raise InvalidToken("This address is not valid.")
        try:
            object_id, stamp = int(parts[0], 16), int(parts[1], 16)
        except ValueError as exc:
            raise InvalidToken("This address is not valid.") from exc
        if not hmac.compare_digest(parts[2], self._tag(purpose, object_id, stamp)):
            raise InvalidToken("This address is not valid.")
        return object_id, stamp


def _as_pair(payload: object) -> tuple[int, int]:
    if (
        isinstance(payload, list)
        and len(payload) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in payload)
    ):
        return payload[0], payload[1]
    raise InvalidToken("This link is not valid.")
