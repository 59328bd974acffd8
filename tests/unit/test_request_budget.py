"""One request budget, written down once, sits below every timeout that could cut a request:
gunicorn's graceful_timeout (HUP/TERM), the shipped nginx proxy timeouts, systemd's stop
timeout; and the derived defaults follow it."""

from __future__ import annotations

import re

import pytest

from app.settings import Settings, SettingsError
from tests.conftest import ROOT


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([0-9]+)(ms|s|m)?", text)
    assert match, text
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


def test_the_budget_is_below_gunicorns_graceful_timeout_and_a_dead_holder_is_replaced_inside_it():
    for budget in (3.0, 30.0, 120.0):
        settings = Settings(request_budget=budget)
        assert settings.graceful_seconds > budget
        # SPEC §6 (amended): a short expiry, renewed while held; a dead holder's waiters take
        # over within the expiry plus one wait step, with most of their budget left.
        assert settings.lock_seconds <= 10
        assert settings.lock_seconds + 1 <= budget / 2 or settings.lock_seconds == 2


def test_the_budget_is_below_every_nginx_proxy_timeout():
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    budget = Settings().request_budget
    timeouts = re.findall(r"proxy_(?:read|send)_timeout\s+([0-9]+(?:ms|s|m)?);", conf)
    assert timeouts, "the nginx block sets its proxy timeouts explicitly"
    assert all(_seconds(value) > budget for value in timeouts)


def test_systemd_waits_longer_than_gunicorns_graceful_timeout():
    unit = (ROOT / "deploy" / "image-proxy.service").read_text()
    stop = re.search(r"^TimeoutStopSec=([0-9]+)", unit, re.M)
    assert stop and int(stop.group(1)) > Settings().graceful_seconds


@pytest.mark.parametrize("threads, places", [(4, 3), (8, 7), (64, 56), (2, 1)])
def test_miss_places_follow_threads_alone(threads, places):
    settings = Settings.from_env({"IMAGE_PROXY_THREADS": str(threads)})
    assert settings.miss_places == places < threads


def test_an_explicit_max_queue_at_or_above_threads_is_refused():
    with pytest.raises(SettingsError, match="MAX_QUEUE"):
        Settings.from_env({"IMAGE_PROXY_THREADS": "4", "IMAGE_PROXY_MAX_QUEUE": "4"})


def test_empty_derived_settings_mean_derived():
    settings = Settings.from_env({"IMAGE_PROXY_MAX_QUEUE": "", "IMAGE_PROXY_LOCK_EXPIRE": "",
                                  "IMAGE_PROXY_REQUEST_BUDGET": "12"})
    assert settings.lock_seconds == 4 and settings.miss_places == 56
