"""Signed link tokens, one salt per purpose, so a token made for one thing opens nothing else.

Tokens carry the subscriber id and the second their row was created: a token made for an
erased subscriber never opens a later row that happens to reuse the id. Both numbers travel
encrypted (one AES block, a pseudo-random permutation under a key derived from the secret), so
no link, VERP address or mailto reveals how many subscribers or deliveries there are, and
neighbouring ids give unrelated tokens.

Timed tokens (confirmation and data-access links) come from itsdangerous. The rest use a
compact form: lower-case base32 of the block and an 80-bit HMAC-SHA256 tag. It fits an email
address's local part (the VERP bounce address and the List-Unsubscribe mailto: within 64
characters, RFC 5321, and immune to mail systems that change case, which itsdangerous' base64
is not), and it is several times cheaper to make for the links every message carries.

Links already sent in the earlier form (ids in the clear) keep working: unsubscribe links never
expire, and a person must be able to leave from any digest they ever got.

Addresses that must stay suppressed after erasure are kept only as a keyed hash
(``address_fingerprint``), made here with the other keyed constructions.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import hmac
import struct
import threading
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

from digest.core.errors import InvalidToken


class Purpose(enum.StrEnum):
    CONFIRM = "confirm"
    UNSUBSCRIBE = "unsubscribe"
    PREFERENCES = "preferences"
    DATA_ACCESS = "data-access"  # export and erase: short-lived, mailed on request
    BOUNCE = "bounce"  # VERP return path, names one delivery (compact form)
    MAIL_UNSUBSCRIBE = "mail-unsubscribe"  # the List-Unsubscribe mailto (compact form)
    FEEDBACK = "feedback"  # More/Less like this: one subscriber and one paper (compact form)
    # The operator console: the mailed one-time link and the session cookie, both naming one
    # AdminSignIn row, whose timestamps (not the token) decide how long each is good for.
    ADMIN_SIGN_IN = "admin-sign-in"
    ADMIN_SESSION = "admin-session"


# Compact tokens also cost a tenth of itsdangerous' to make: a digest carries one feedback
# token per paper.
# Unsubscribe and preferences links too: itsdangerous' zlib attempt alone cost ~40 us a token,
# several times a message. Links sent in its form (they contain a ".") are still read.
COMPACT = frozenset(
    {Purpose.BOUNCE, Purpose.MAIL_UNSUBSCRIBE, Purpose.FEEDBACK, Purpose.UNSUBSCRIBE, Purpose.PREFERENCES}
)
LEGACY_LINK = frozenset({Purpose.UNSUBSCRIBE, Purpose.PREFERENCES})  # earlier: itsdangerous
TIMED = frozenset({Purpose.CONFIRM, Purpose.DATA_ACCESS})
TAG_BYTES = 10  # 80 bits: far beyond online guessing through a mail server
LEGACY_TAG_HEX_CHARS = 20
DATA_ACCESS_MAX_AGE_SECONDS = 3600


AnySerializer = URLSafeSerializer | URLSafeTimedSerializer


_B32_PAIRS = tuple(a + b for a in "abcdefghijklmnopqrstuvwxyz234567" for b in "abcdefghijklmnopqrstuvwxyz234567")


def _b32_ten(chunk: bytes) -> str:
    value, pairs = int.from_bytes(chunk, "big"), _B32_PAIRS
    return (
        pairs[value >> 70]
        + pairs[(value >> 60) & 1023]
        + pairs[(value >> 50) & 1023]
        + pairs[(value >> 40) & 1023]
        + pairs[(value >> 30) & 1023]
        + pairs[(value >> 20) & 1023]
        + pairs[(value >> 10) & 1023]
        + pairs[value & 1023]
    )


_B32_LAYOUT: dict[int, tuple[int, tuple[int, ...], int]] = {}


def _b32(data: bytes) -> str:
    """``base64.b32encode`` in lower case without padding, the same text, ten bits at a time
    from one table of character pairs: ``base64``'s loop in Python was the largest part of
    making a message's tokens (a 10-byte tag 1.2 -> 0.6 us, a 26-byte token 2.7 -> 1.8 us).
    Zero bits after the data only fill the last character, as base32's padding does."""
    size = len(data)
    if size == 10:  # a tag
        return _b32_ten(data)
    layout = _B32_LAYOUT.get(size)
    if layout is None:
        pad_bits = 8 * (-size % 5)
        layout = _B32_LAYOUT[size] = (pad_bits, tuple(range(size * 8 + pad_bits - 10, -1, -10)), (size * 8 + 4) // 5)
    pad_bits, shifts, length = layout
    value, pairs = int.from_bytes(data, "big") << pad_bits, _B32_PAIRS
    return "".join([pairs[(value >> shift) & 1023] for shift in shifts])[:length]


def _unb32(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    return base64.b32decode(padded)


class Tokens:
    def __init__(self, secret_key: str, confirm_max_age_seconds: int = 48 * 3600):
        self._secret_key = secret_key
        self.confirm_max_age_seconds = confirm_max_age_seconds
        self._serializers: dict[Purpose, AnySerializer] = {}
        self._compact_keys = {p: hashlib.sha256(f"digest.{p.value}.{secret_key}".encode()).digest() for p in COMPACT}
        block_key = hashlib.sha256(f"digest.id-block.{secret_key}".encode()).digest()[:16]
        # One block, always 16 bytes of two unique numbers: ECB of a single block is exactly a
        # keyed permutation, which is what hiding the ids needs (integrity comes from the tag or
        # the itsdangerous signature around it).
        self._cipher = Cipher(algorithms.AES(block_key), modes.ECB())  # noqa: S305
        self._address_key = hashlib.sha256(f"digest.address.{secret_key}".encode()).digest()
        self._item_key_base = hashlib.sha256(f"digest.item-key.{secret_key}".encode()).digest()
        self._per_thread = threading.local()  # one AES encryptor per thread (they keep state)
        # A message's links all name the same (subscriber, stamp): seal it once, and write it
        # out once for the per-paper links (two per paper, twenty a message).
        self._seal = functools.lru_cache(maxsize=4096)(self._seal_block)
        self._sealed_text = functools.lru_cache(maxsize=4096)(self._sealed_block_text)
        self._item_key = functools.lru_cache(maxsize=4096)(self._item_key_of)

    # ------------------------------------------------------------------ the hidden id block

    def _seal_block(self, object_id: int, stamp: int) -> bytes:
        # ECB over exactly one block returns it whole from update(), so a thread's encryptor
        # is never finalised and serves every block: making one cost ten times the encryption.
        encryptor = getattr(self._per_thread, "encryptor", None)
        if encryptor is None:
            encryptor = self._per_thread.encryptor = self._cipher.encryptor()
        return bytes(encryptor.update(struct.pack(">QQ", object_id, stamp)))

    def _sealed_block_text(self, object_id: int, stamp: int) -> str:
        return _b32(self._seal(object_id, stamp))

    def _open(self, block: bytes) -> tuple[int, int]:
        if len(block) != 16:
            raise InvalidToken("This link is not valid.")
        decryptor = self._cipher.decryptor()
        object_id, stamp = struct.unpack(">QQ", decryptor.update(block) + decryptor.finalize())
        return int(object_id), int(stamp)

    def _serializer(self, purpose: Purpose) -> AnySerializer:
        # Built once per purpose: a serializer derives its key on creation, and a digest run
        # makes several tokens per message.
        cached = self._serializers.get(purpose)
        if cached is not None:
            return cached
        # Only confirmation and data-access links expire; the others carry no timestamp, so a
        # subscriber's links are the same in every message (a retried message is byte-identical).
        salt = f"digest.{purpose.value}"
        serializer: AnySerializer = (
            URLSafeTimedSerializer(self._secret_key, salt=salt)
            if purpose in TIMED
            else URLSafeSerializer(self._secret_key, salt=salt)
        )
        self._serializers[purpose] = serializer
        return serializer

    def _tag(self, purpose: Purpose, block: bytes) -> bytes:
        # hmac.digest: the same HMAC-SHA256 as hmac.new(...).digest(), in one C call.
        return hmac.digest(self._compact_keys[purpose], block, "sha256")[:TAG_BYTES]

    def make(self, purpose: Purpose, object_id: int, stamp: int, *, extra: str | None = None) -> str:
        """A token naming (``object_id``, ``stamp``) for ``purpose``.

        ``extra`` rides along signed (not secret) in link tokens: the topics a subscribe request
        asked for, applied only when the person confirms.
        """
        block = self._seal(object_id, stamp)
        if purpose in COMPACT:
            return _b32(block + self._tag(purpose, block))
        payload: str | list[str] = _b32(block) if extra is None else [_b32(block), extra]
        return str(self._serializer(purpose).dumps(payload))

    def make_bound(self, purpose: Purpose, object_id: int, stamp: int, bound: int) -> str:
        """A compact token naming (``object_id``, ``stamp``) whose tag also covers ``bound``, a
        number the reader looks up again rather than reads from the token (the VERP address
        names a delivery and a subscriber id, and binds the subscriber row's creation second:
        an erased subscriber's id reused by a later row must not open it). Same length."""
        block = self._seal(object_id, stamp)
        return _b32(block + self._tag(purpose, block + struct.pack(">q", bound)))

    def read_bound(
        self, purpose: Purpose, token: str, bound_of: Callable[[int, int], int | None]
    ) -> tuple[int, int, bool]:
        """The (id, stamp) of a ``make_bound`` token, and True; or of a token made before the
        bound form (plain ``make``, or the older hex form), and False: it proves less.
        ``bound_of(id, stamp)`` gives the bound number now (None: nothing to bind to)."""
        if len(token) > 80:
            raise InvalidToken("This address is not valid.")
        if "." not in token:
            try:
                raw = _unb32(token)
            except (ValueError, TypeError) as exc:
                raise InvalidToken("This address is not valid.") from exc
            block, tag = raw[:16], raw[16:]
            if len(block) == 16 and len(tag) == TAG_BYTES:
                object_id, stamp = self._open(block)
                bound = bound_of(object_id, stamp)
                if bound is not None and hmac.compare_digest(tag, self._tag(purpose, block + struct.pack(">q", bound))):
                    return object_id, stamp, True
        return (*self._read_compact(purpose, token), False)

    def _item_key_of(self, purpose: Purpose, object_id: int, stamp: int) -> bytes:
        block = self._seal(object_id, stamp)
        return hmac.digest(self._item_key_base, purpose.value.encode() + b"\0" + block, "sha256")

    def _item_tag(self, purpose: Purpose, object_id: int, stamp: int, item: str) -> bytes:
        return hashlib.blake2s(
            item.encode(), key=self._item_key(purpose, object_id, stamp), digest_size=TAG_BYTES
        ).digest()

    def make_for(self, purpose: Purpose, object_id: int, stamp: int, item: str) -> str:
        """A compact token that also names ``item`` (a paper id): ``block.item.tag``, the item
        with "/" (old arXiv ids) written as "~" so the token stays one path segment.

        One HMAC per (purpose, id, stamp) gives a key of that reader's own, and each item's tag
        is keyed BLAKE2s under it (a MAC by design, a third of an HMAC's cost): a digest's ten
        papers cost one HMAC, not ten. Tags made before (an HMAC over block and item) still
        read."""
        tag = self._item_tag(purpose, object_id, stamp, item)
        return f"{self._sealed_text(object_id, stamp)}.{item.replace('/', '~')}.{_b32(tag)}"

    def read_for(self, purpose: Purpose, token: str) -> tuple[int, int, str]:
        """The (id, stamp, item) of a ``make_for`` token; ``InvalidToken`` if tampered."""
        parts = token.split(".")
        if len(parts) < 3 or len(token) > 120:
            raise InvalidToken("This link is not valid.")
        item = ".".join(parts[1:-1]).replace("~", "/")
        try:
            block, tag = _unb32(parts[0]), _unb32(parts[-1])
        except (ValueError, TypeError) as exc:
            raise InvalidToken("This link is not valid.") from exc
        if len(block) != 16 or len(tag) != TAG_BYTES:
            raise InvalidToken("This link is not valid.")
        object_id, stamp = self._open(block)
        if not hmac.compare_digest(tag, self._item_tag(purpose, object_id, stamp, item)) and not hmac.compare_digest(
            tag,
            self._tag(purpose, block + item.encode()),  # the form digests carried before
        ):
            raise InvalidToken("This link is not valid.")
        return object_id, stamp, item

    def read(self, purpose: Purpose, token: str) -> tuple[int, int]:
        """The (id, stamp) a token names; ``InvalidToken`` if tampered, foreign or expired."""
        return self.read_with_extra(purpose, token)[0]

    def read_with_extra(self, purpose: Purpose, token: str) -> tuple[tuple[int, int], str | None]:
        if purpose in COMPACT and not ("." in token and purpose in LEGACY_LINK):
            return self._read_compact(purpose, token), None
        serializer = self._serializer(purpose)
        try:
            if isinstance(serializer, URLSafeTimedSerializer):
                max_age = self.confirm_max_age_seconds if purpose is Purpose.CONFIRM else DATA_ACCESS_MAX_AGE_SECONDS
                payload = serializer.loads(token, max_age=max_age)
            else:
                payload = serializer.loads(token)
        except SignatureExpired as exc:
            # The signature was good; the signer hands over the still-encoded payload.
            payload = serializer.load_payload(exc.payload) if exc.payload is not None else None
            subscriber_id = self._payload(payload)[0][0] if payload is not None else None
            raise InvalidToken("This link has expired.", expired=True, subscriber_id=subscriber_id) from exc
        except BadSignature as exc:
            raise InvalidToken("This link is not valid.") from exc
        return self._payload(payload)

    def issued_at(self, purpose: Purpose, token: str) -> float:
        """When a (valid) timed token was made, as a UNIX time; ``InvalidToken`` otherwise."""
        serializer = self._serializer(purpose)
        if not isinstance(serializer, URLSafeTimedSerializer):
            raise InvalidToken("This link is not valid.")
        try:
            _, stamp = serializer.loads(token, return_timestamp=True)
        except BadSignature as exc:
            raise InvalidToken("This link is not valid.") from exc
        return float(stamp.timestamp())

    def _payload(self, payload: object) -> tuple[tuple[int, int], str | None]:
        if isinstance(payload, str):
            return self._open_text(payload), None
        if isinstance(payload, list) and len(payload) == 2 and all(isinstance(v, str) for v in payload):
            return self._open_text(payload[0]), payload[1]
        return _legacy_pair(payload), None

    def _open_text(self, text: str) -> tuple[int, int]:
        try:
            return self._open(_unb32(text))
        except (ValueError, TypeError) as exc:
            raise InvalidToken("This link is not valid.") from exc

    def _read_compact(self, purpose: Purpose, token: str) -> tuple[int, int]:
        if len(token) > 80:
            raise InvalidToken("This address is not valid.")
        if "." in token:
            return self._read_legacy_compact(purpose, token)
        try:
            raw = _unb32(token)
        except (ValueError, TypeError) as exc:
            raise InvalidToken("This address is not valid.") from exc
        block, tag = raw[:16], raw[16:]
        if len(block) != 16 or not hmac.compare_digest(tag, self._tag(purpose, block)):
            raise InvalidToken("This address is not valid.")
        return self._open(block)

    def _read_legacy_compact(self, purpose: Purpose, token: str) -> tuple[int, int]:
        """``id.stamp.tag`` in hex, as messages sent before the ids were hidden carry."""
        parts = token.lower().split(".")
        if len(parts) != 3:
            raise InvalidToken("This address is not valid.")
        try:
            object_id, stamp = int(parts[0], 16), int(parts[1], 16)
        except ValueError as exc:
            raise InvalidToken("This address is not valid.") from exc
        mac = hmac.new(self._compact_keys[purpose], f"{object_id}.{stamp}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(parts[2], mac[:LEGACY_TAG_HEX_CHARS]):
            raise InvalidToken("This address is not valid.")
        return object_id, stamp

    # ------------------------------------------------------------------ suppression

    def address_fingerprint(self, normalised_address: str) -> str:
        """A keyed hash of an address: recognises it again without keeping it (HMAC-SHA256)."""
        return hmac.new(self._address_key, normalised_address.encode(), hashlib.sha256).hexdigest()


def _legacy_pair(payload: object) -> tuple[int, int]:
    if (
        isinstance(payload, list)
        and len(payload) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in payload)
    ):
        return payload[0], payload[1]
    raise InvalidToken("This link is not valid.")
