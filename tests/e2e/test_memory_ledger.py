"""The gunicorn master makes one memory ledger for all its workers (gunicorn.conf.py, app/memory.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from app.memory import MB, read_ledger_budget
from tests.conftest import ROOT, free_port, gunicorn_env

pytestmark = pytest.mark.e2e


def test_the_master_makes_one_ledger_with_the_budget_and_removes_it_on_exit(start_gunicorn):
    server = start_gunicorn(memory_budget="3G")
    match = re.search(r"memory budget 3072 MB, ([0-9]+) MB of it for renders.*; ledger (\S+)", server.log())
    assert match, server.log()
    assert 2000 < int(match.group(1)) < 3072  # the idle baseline (workers, embedded Redis) is taken off
    ledger = match.group(2)
    budget, baseline = read_ledger_budget(ledger)
    assert budget == 3072 * MB and (budget - baseline) // MB == int(match.group(1))
    assert oct(os.stat(os.path.dirname(ledger)).st_mode & 0o777) == "0o700"
    assert server.stop() == 0
    assert not os.path.exists(ledger)


def test_a_budget_below_the_idle_service_stops_startup_with_a_clear_message():
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env=gunicorn_env(memory_budget="100M", bind=f"127.0.0.1:{free_port()}"),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "IMAGE_PROXY_MEMORY_BUDGET=100M leaves nothing for renders" in result.stderr
