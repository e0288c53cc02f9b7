"""Per-message cost of DKIM-signing a 10-paper digest: ours (OpenSSL via cryptography) against
dkimpy's ``dkim.sign`` (pure-Python RSA), the reference, in the same run with the same key.

    .venv/bin/python bench/signing.py [--messages 300] [--bits 2048]

Both signatures are checked with ``dkim.verify`` before timing.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dkim  # noqa: E402

from digest.rendering.emails import EmailRenderer  # noqa: E402
from digest.transport.dkim import SIGNED_HEADERS, DkimSigner  # noqa: E402
from tests.support.emails import digest_bytes  # noqa: E402


def per_message_ms(sign: Callable[[bytes], bytes], message: bytes, count: int) -> float:
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(max(1, count // 5)):
            sign(message)
        rounds.append((time.perf_counter() - start) / max(1, count // 5) * 1000)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--bits", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        key_path = Path(folder) / "dkim.pem"
        subprocess.run(["openssl", "genrsa", "-out", str(key_path), str(args.bits)], check=True, capture_output=True)
        public = subprocess.run(
            ["openssl", "rsa", "-in", str(key_path), "-pubout", "-outform", "DER"], check=True, capture_output=True
        ).stdout
        pem = key_path.read_bytes()
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == b"mail._domainkey.example.org." else None

    message = digest_bytes(10, EmailRenderer())
    ours = DkimSigner("mail", "example.org", pem)

    def reference(data: bytes) -> bytes:
        signature = dkim.sign(
            data,
            b"mail",
            b"example.org",
            pem,
            include_headers=list(SIGNED_HEADERS),
            canonicalize=(b"relaxed", b"relaxed"),
            linesep=b"\n",
        )
        return bytes(signature) + data

    for sign in (ours.sign, reference):
        assert dkim.verify(sign(message), dnsfunc=dns), "signature does not verify"
    ours_ms = per_message_ms(ours.sign, message, args.messages)
    reference_ms = per_message_ms(reference, message, args.messages // 10 or 1)
    print(f"{len(message)} byte digest, RSA {args.bits} bits, relaxed/relaxed")
    print(f"ours (cryptography/OpenSSL): {ours_ms:7.3f} ms/message")
    print(f"dkimpy dkim.sign (reference): {reference_ms:7.3f} ms/message  ({reference_ms / ours_ms:.1f}x)")
    summary = {
        "bench": "dkim",
        "message_bytes": len(message),
        "bits": args.bits,
        "ours_ms": round(ours_ms, 3),
        "dkimpy_ms": round(reference_ms, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
