"""Settings refuse what the README promises they refuse, defaults included."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from digest.core.settings import OPERATOR_LINK_DEFAULTS, Settings


def test_the_shipped_operator_link_limits_are_accepted() -> None:
    settings = Settings(_env_file=None)
    assert (settings.admin_link_limit_per_source, settings.admin_link_limit_per_address) == OPERATOR_LINK_DEFAULTS


@pytest.mark.parametrize("value", ["1/day", "5/hour;1/2 hours", "not a limit"])
def test_an_operator_link_limit_over_more_than_an_hour_is_refused(value: str) -> None:
    # An operator must always be able to get a sign-in link within the hour.
    with pytest.raises(ValidationError, match="admin_link_limit_per_source"):
        Settings(_env_file=None, admin_link_limit_per_source=value)


def test_a_window_within_the_hour_is_accepted() -> None:
    assert Settings(_env_file=None, admin_link_limit_per_address="2/minute;20/hour").admin_link_limit_per_address
