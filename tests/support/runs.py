"""Pipeline steps run in the test's own process, as beat would run them."""

from __future__ import annotations

import datetime as dt

import time_machine

from digest.orchestration import pipeline, schedule
from digest.orchestration.runtime import Runtime


def deliver_due(runtime: Runtime, now: dt.datetime) -> int:
    """The hourly beat task, run in this process at ``now`` with delivery right away."""
    with time_machine.travel(now, tick=False):
        return schedule.dispatch_due(runtime, now, pipeline.InProcess(runtime))
