"""The preferences page: change what and when, export my data, delete me."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest
from fastapi.testclient import TestClient

from digest.core.db import transaction
from digest.core.models import Frequency, utcnow
from digest.orchestration.runtime import Runtime
from digest.subscribers import subscriptions
from tests.support.rows import snapshot, subscriber
from tests.support.servers import SMTPSink


def prefs_path(runtime: Runtime, email: str) -> str:
    with transaction(runtime.session_factory) as session:
        sub = subscriptions.add_confirmed(session, runtime.tokens, email, now=utcnow(), topics="diffusion")
        return runtime.links.preferences(sub).removeprefix(runtime.settings.base_url)


GOOD = {
    "frequency": "weekly",
    "digest_size": "12",
    "topics": "LLM agents, robotics",
    "excluded": "survey",
    "send_hour": "7",
    "timezone": "Europe/Berlin",
    "weekday": "4",
}


def test_page_shows_current_settings(client: TestClient, runtime: Runtime) -> None:
    path = prefs_path(runtime, "me@example.org")
    page = client.get(path)
    assert page.status_code == 200
    assert "me@example.org" in page.text
    assert 'value="diffusion"' in page.text
    assert 'value="daily" checked' in page.text
    for field in ("frequency", "digest_size", "topics", "excluded", "send_hour", "timezone", "weekday"):
        assert f'name="{field}"' in page.text
    # The footer link opens no data: export and erase need a fresh link mailed on request.
    assert f"{path}/data-link" in page.text
    assert "/export" not in page.text and "/delete" not in page.text


def test_save_preferences(client: TestClient, runtime: Runtime) -> None:
    path = prefs_path(runtime, "me@example.org")
    page = client.post(path, data=GOOD)
    assert page.status_code == 200
    assert "Saved." in page.text
    sub = subscriber(runtime, "me@example.org")
    assert sub is not None
    assert (sub.frequency, sub.digest_size, sub.send_hour, sub.timezone, sub.weekday) == (
        Frequency.WEEKLY,
        12,
        7,
        "Europe/Berlin",
        4,
    )
    assert sub.topics == "llm agents, robotics"
    assert sub.excluded == "survey"
    paused = client.post(path, data={**GOOD, "frequency": "paused"})
    assert paused.status_code == 200
    assert subscriber(runtime, "me@example.org").frequency is Frequency.PAUSED  # type: ignore[union-attr]


def test_bad_values_are_explained_and_nothing_changes(client: TestClient, runtime: Runtime) -> None:
    path = prefs_path(runtime, "me@example.org")
    before = snapshot(runtime)
    cases = {
        "digest_size": ("4", "Papers per email must be between 5 and 30."),
        "send_hour": ("24", "The delivery hour must be between 0 and 23."),
        "timezone": ("Mars/Olympus", "Unknown time zone"),
        "frequency": ("hourly", "Choose daily, weekly, monthly or paused."),
        "weekday": ("x", "Weekday must be a whole number."),
        "topics": ("t" * 501, "Topics are limited to 500 characters."),
    }
    for field, (value, message) in cases.items():
        page = client.post(path, data={**GOOD, field: value})
        assert page.status_code == 400, field
        assert message in page.text, field
    assert snapshot(runtime) == before


def data_link(client: TestClient, smtp: SMTPSink, prefs: str) -> str:
    """Ask for the data link on the preferences page; the link that arrives by mail."""
    asked = client.post(f"{prefs}/data-link")
    assert asked.status_code == 200 and "It works for one hour" in asked.text
    (mail,) = smtp.wait_for(1)
    body = mail.message.get_body(preferencelist=("plain",))
    assert body is not None
    found = re.search(r"http://digest\.test(/my-data/\S+)", body.get_content())
    assert found is not None
    return found.group(1)


def test_export_my_data(client: TestClient, runtime: Runtime, smtp: SMTPSink) -> None:
    prefs = prefs_path(runtime, "me@example.org")
    assert client.get(f"{prefs}/export").status_code == 404  # the old footer path opens nothing
    path = data_link(client, smtp, prefs)
    assert smtp.messages[0].rcpt_tos == ["me@example.org"]
    download = client.get(f"{path}/export")
    assert download.status_code == 200
    assert download.headers["content-type"].startswith("application/json")
    assert "attachment" in download.headers["content-disposition"]
    data = json.loads(download.content)
    assert data["email"] == "me@example.org" and data["topics"] == "diffusion"
    assert data["deliveries"] == [] and data["marks"] == [] and data["follows"] == []


def test_the_data_link_expires_after_an_hour(client: TestClient, runtime: Runtime, smtp: SMTPSink) -> None:
    import time_machine

    path = data_link(client, smtp, prefs_path(runtime, "me@example.org"))
    with time_machine.travel(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=61)):
        expired = client.get(path)
        assert expired.status_code == 410 and "expired" in expired.text
        assert client.post(f"{path}/delete").status_code == 410
    assert subscriber(runtime, "me@example.org") is not None


def test_delete_me_asks_first_then_erases(client: TestClient, runtime: Runtime, smtp: SMTPSink) -> None:
    prefs = prefs_path(runtime, "me@example.org")
    path = data_link(client, smtp, prefs)
    before = snapshot(runtime)
    ask = client.get(f"{path}/delete")
    assert ask.status_code == 200 and "Yes, delete my data" in ask.text
    assert snapshot(runtime) == before
    done = client.post(f"{path}/delete")
    assert done.status_code == 200 and "Your data is deleted" in done.text
    assert subscriber(runtime, "me@example.org") is None
    assert client.get(prefs).status_code == 404


def test_only_on_days_with_a_paper_for_me_is_a_checkbox_that_saves_both_ways(
    client: TestClient, runtime: Runtime
) -> None:
    path = prefs_path(runtime, "me@example.org")
    page = client.get(path)
    assert re.search(r'<input type="checkbox" name="only_for_you" value="1">', page.text)
    assert "Only on days with a paper for me" in page.text
    ticked = client.post(path, data={**GOOD, "has_only_for_you": "1", "only_for_you": "1"})
    assert ticked.status_code == 200 and 'name="only_for_you" value="1" checked' in ticked.text
    sub = subscriber(runtime, "me@example.org")
    assert sub is not None and sub.only_for_you is True
    # Unticked, a browser sends nothing for the box: the form's marker says it was there.
    assert client.post(path, data={**GOOD, "has_only_for_you": "1"}).status_code == 200
    sub = subscriber(runtime, "me@example.org")
    assert sub is not None and sub.only_for_you is False


def test_time_zone_is_picked_from_a_list_with_the_readers_own_zone_selected(
    client: TestClient, runtime: Runtime
) -> None:
    path = prefs_path(runtime, "zone@example.org")
    client.post(path, data={**GOOD, "timezone": "Asia/Kathmandu"})
    page = client.get(path).text
    select = re.search(r'<select id="timezone" name="timezone"[^>]*>(.*?)</select>', page, re.S)
    assert select is not None, "the time zone is a list, not a free text field"
    options = re.findall(r'<option value="([^"]+)"( selected)?>', select.group(1))
    assert {"Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham", "UTC"} <= {value for value, _ in options}
    assert [value for value, selected in options if selected] == ["Asia/Kathmandu"]


@pytest.mark.settings(confirmation_limit_per_source="2/hour")
def test_the_data_link_says_when_the_networks_mail_budget_is_spent(
    client: TestClient, runtime: Runtime, smtp: SMTPSink
) -> None:
    """Three readers behind one network ask for their data links: two are sent, the third
    page says no mail went out and when to ask again, and nothing more arrives."""
    pages = [prefs_path(runtime, f"reader{n}@example{n}.org") for n in range(3)]
    for prefs in pages[:2]:
        data_link(client, smtp, prefs)
        smtp.messages.clear()
    refused = client.post(f"{pages[2]}/data-link")
    assert refused.status_code == 429
    assert 0 < int(refused.headers["Retry-After"]) <= 3600
    assert re.search(
        r"Not sent: too many emails were asked for from your network\. Ask again after \d\d:\d\d UTC", refused.text
    )
    assert "We sent a link" not in refused.text
    smtp.wait_for(1, timeout=1.5)  # the sends run after the answer: give a stray one time to show
    assert smtp.messages == []
