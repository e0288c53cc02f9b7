"""What mailbox providers and readers see: size, layout without <style>, no external resources,
DKIM signatures that verify, and a signed digest arriving over real SMTP."""

from __future__ import annotations

import base64
import datetime as dt
import re
import subprocess
from pathlib import Path

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digest.core.db import transaction
from digest.core.models import utcnow
from digest.orchestration.pipeline import run_inprocess
from digest.orchestration.runtime import Runtime
from digest.rendering.emails import EmailRenderer
from digest.subscribers.subscriptions import add_confirmed
from digest.transport.dkim import DkimConfigError, DkimSigner, relaxed_body
from tests.support.emails import digest_bytes, html_of, parse, strip_style_blocks
from tests.support.servers import PapersAPI, SMTPSink
from tests.support.settings import make_settings

GMAIL_CLIP_BYTES = 102 * 1024


def test_a_30_paper_digest_stays_under_gmails_clipping_size() -> None:
    data = digest_bytes(30)
    assert len(data) < GMAIL_CLIP_BYTES
    assert len(html_of(parse(data)).encode()) < GMAIL_CLIP_BYTES


def test_layout_is_carried_by_inline_styles() -> None:
    html = strip_style_blocks(html_of(parse(digest_bytes(10))))
    assert "<style" not in html
    container = re.search(r'<table class="container"[^>]*>', html)
    assert container and "max-width:640px" in container.group(0) and "width:100%" in container.group(0)
    assert 'role="presentation"' in container.group(0)
    for cell in re.findall(r'<td class="paper"[^>]*>', html):
        assert "padding:18px 24px" in cell
    for element in re.findall(r"<(?:p|h1|h2|a|td|table|div)\b[^>]*>", html):
        assert "style=" in element, element  # nothing depends on a class rule surviving


def test_style_block_only_adds_dark_mode_and_small_screens() -> None:
    html = html_of(parse(digest_bytes(3)))
    blocks = re.findall(r"<style\b[^>]*>(.*?)</style>", html, flags=re.S)
    assert blocks
    for block in blocks:
        rules = re.sub(r"@media[^{]*\{(?:[^{}]*\{[^{}]*\})*\s*\}", "", block)
        assert not rules.strip(), rules  # nothing outside @media
    assert "prefers-color-scheme: dark" in "".join(blocks) and "max-width: 480px" in "".join(blocks)
    assert '<meta name="color-scheme" content="light dark">' in html


def test_needs_no_external_resource_but_thumbnails_and_has_a_hidden_preheader() -> None:
    html = html_of(parse(digest_bytes(30)))
    assert not re.search(r"<(link|script|iframe|object|embed)\b", html, flags=re.I)
    assert not re.search(r"url\(|@import", html, flags=re.I)
    # The only thing loaded is each paper's thumbnail: decorative (empty alt) with a width
    # but no height, so with images off nothing is labelled and no empty box is reserved.
    images = re.findall(r"<img\b[^>]*>", html)
    assert len(images) == len(re.findall(r"\bsrc=", html)) > 0
    for image in images:
        assert re.search(r'src="https://[^"]+"', image) and 'width="200"' in image
        assert 'alt=""' in image and "height=" not in image and "Preview image" not in image
        assert "height:auto" in image and "max-width:100%" in image
    for href in re.findall(r'href="([^"]*)"', html):
        assert href.startswith(("https://", "http://", "mailto:")), href
    preheader = re.search(r'<div class="preheader" style="([^"]*)">([^<]*)<', html)
    assert preheader and "display:none" in preheader.group(1)
    assert preheader.group(2).startswith("30 trending papers, led by Seedance 2.0")


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("dkim")
    private = folder / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(private), "2048"], check=True, capture_output=True)
    public = subprocess.run(
        ["openssl", "rsa", "-in", str(private), "-pubout", "-outform", "DER"], check=True, capture_output=True
    ).stdout
    return private, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def dns_for(record: bytes, selector: str = "mail", domain: str = "example.org"):  # type: ignore[no-untyped-def]
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == f"{selector}._domainkey.{domain}.".encode() else None

    return lookup


def signed_headers(data: bytes) -> list[str]:
    signature = parse(data)["DKIM-Signature"]
    found = re.search(r"\bh=([^;]+)", "".join(str(signature).split()))
    assert found
    return found.group(1).lower().split(":")


def test_dkim_signature_verifies_and_covers_the_unsubscribe_headers(key_pair: tuple[Path, bytes]) -> None:
    private, record = key_pair
    signer = DkimSigner.from_settings("mail", "example.org", str(private))
    assert signer is not None
    data = signer.sign(digest_bytes(10, EmailRenderer()))
    assert dkim.verify(data, dnsfunc=dns_for(record))
    covered = signed_headers(data)
    for name in (
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "list-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "mime-version",
        "content-type",
    ):
        assert name in covered
    tampered = data.replace(
        b"List-Unsubscribe: <https://papers.example.org/unsubscribe/tok-ada>",
        b"List-Unsubscribe: <https://evil.example.net/unsubscribe/tok-ada>",
    )
    assert tampered != data and not dkim.verify(tampered, dnsfunc=dns_for(record))


TEXT = st.lists(st.sampled_from([b" ", b"\t", b"  ", b"a", b"B", b"\xc3\xa9", b";", b":", b"="]), max_size=12).map(
    b"".join
)


@given(st.lists(st.tuples(TEXT, st.sampled_from([b"\n", b"\n\n"])), max_size=8))
def test_body_canonicalisation_is_dkimpys(lines: list[tuple[bytes, bytes]]) -> None:
    from dkim.canonicalization import CanonicalizationPolicy

    body = b"".join(text + end for text, end in lines)
    relaxed = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    assert relaxed_body(body) == relaxed.canonicalize_body(body.replace(b"\n", b"\r\n"))


@settings(max_examples=40, deadline=None)
@given(subject=TEXT, folded=TEXT, to=st.lists(TEXT, min_size=1, max_size=3), body=st.lists(TEXT, max_size=5))
def test_signatures_verify_whatever_the_white_space(
    key_pair: tuple[Path, bytes], subject: bytes, folded: bytes, to: list[bytes], body: list[bytes]
) -> None:
    private, record = key_pair
    signer = DkimSigner.from_settings("mail", "example.org", str(private))
    assert signer is not None
    message = (
        b"From: Papers <papers@example.org>\n"
        + b"".join(b"To: reader" + t + b"@example.net\n" for t in to)
        + b"Subject: "
        + subject
        + b"\n "
        + folded
        + b"\n"
        + b"Message-ID: <a@example.org>\n\n"
        + b"".join(line + b"\n" for line in body)
    )
    signed = signer.sign(message)
    assert signed.endswith(message.replace(b"\n", b"\r\n"))  # as SMTP sends it
    assert dkim.verify(signed, dnsfunc=dns_for(record))
    assert not dkim.verify(signed.replace(b"Message-ID: <a@", b"Message-ID: <b@"), dnsfunc=dns_for(record))


def test_signatures_hold_for_odd_line_ends_and_added_headers(key_pair: tuple[Path, bytes]) -> None:
    private, record = key_pair
    signer = DkimSigner.from_settings("mail", "example.org", str(private))
    assert signer is not None
    # A stray CR (say in a URL from the papers API) becomes a line break on the wire; a body
    # without a final line break gets one: the signature covers the message as sent.
    message = (
        b"From: papers@example.org\nTo: reader@example.net\n"
        b"List-Unsubscribe: <https://papers.example.org/u/tok>\n\nsee https://x.org/a\rb\r\nend "
    )
    signed = signer.sign(message)
    assert dkim.verify(signed, dnsfunc=dns_for(record))
    # Every signed header is signed once more than it occurs: another one added above it breaks
    # the signature (a forwarder cannot add its own unsubscribe target or From).
    for added in (b"List-Unsubscribe: <https://evil.example.net/u>\r\n", b"From: boss@example.org\r\n"):
        assert not dkim.verify(added + signed, dnsfunc=dns_for(record))


def test_a_key_that_is_not_rsa_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "ed25519.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True, capture_output=True)
    with pytest.raises(DkimConfigError, match="RSA"):
        DkimSigner.from_settings("mail", "example.org", str(key))
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(DkimConfigError, match="not a usable PEM key"):
        DkimSigner.from_settings("mail", "example.org", str(tmp_path / "junk.pem"))


def test_dkim_settings_come_all_together_or_not_at_all(tmp_path: Path) -> None:
    assert DkimSigner.from_settings(None, None, None) is None
    with pytest.raises(DkimConfigError):
        DkimSigner.from_settings("mail", None, None)
    with pytest.raises(DkimConfigError):
        DkimSigner.from_settings("mail", "example.org", str(tmp_path / "missing.pem"))


def test_a_sent_digest_arrives_signed(
    database: str, smtp: SMTPSink, papers_api: PapersAPI, key_pair: tuple[Path, bytes]
) -> None:
    private, record = key_pair
    settings = make_settings(
        database,
        smtp,
        papers_api,
        dkim_selector="mail",
        dkim_domain="example.org",
        dkim_private_key_path=str(private),
        mail_from="Daily Papers <papers@example.org>",
        inbound_address="papers@example.org",
    )
    runtime = Runtime(settings)
    try:
        with transaction(runtime.session_factory) as session:
            add_confirmed(session, runtime.tokens, "ada@example.com", now=utcnow())
        summary = run_inprocess(runtime, dt.date(2026, 4, 16))
    finally:
        runtime.dispose()
    assert summary.counts.get("sent") == 1, summary.lines()
    [received] = [m for m in smtp.messages if m.rcpt_tos == ["ada@example.com"]]
    raw = received.data  # the bytes the SMTP server got, CRLF line ends and all
    assert dkim.verify(raw, dnsfunc=dns_for(record))
    assert "list-unsubscribe" in signed_headers(raw) and "list-unsubscribe-post" in signed_headers(raw)


def test_the_web_app_refuses_to_start_with_a_broken_dkim_key(
    database: str, smtp: SMTPSink, papers_api: PapersAPI, tmp_path: Path
) -> None:
    from digest.web.app import create_app

    junk = tmp_path / "dkim.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    settings = make_settings(
        database, smtp, papers_api, dkim_selector="mail", dkim_domain="example.org", dkim_private_key_path=str(junk)
    )
    runtime = Runtime(settings)
    try:
        # Confirmations go out after the answer, where nobody would see this error.
        with pytest.raises(DkimConfigError, match="not a usable PEM key"):
            create_app(runtime)
    finally:
        runtime.dispose()
