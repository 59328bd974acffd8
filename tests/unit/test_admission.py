"""Admission by time (app/image/admission.py): real render threads, fake renders (callables
that sleep or wait), and an injected clock where time must pass without waiting for it."""

from __future__ import annotations

import io
import threading
import time

import pytest
from PIL import Image

from app.errors import Busy
from app.image.admission import HALF_LIFE_S, INITIAL_S_PER_UNIT, TYPICAL_UNITS, Admission
from app.render.canvas import RenderOptions
from app.render.estimate import estimate


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _wait_for(condition, timeout: float = 20.0) -> None:
    """A hang guard, not a timing assertion: the condition must come true eventually."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the condition never came true"
        time.sleep(0.01)


def admission(**overrides) -> Admission:
    return Admission(**{"max_in_flight": 8, "render_slots": 2, **overrides})


def test_after_renders_longer_than_the_budget_an_idle_worker_still_admits_the_next_small_miss():
    """The lockout, scaled down: a 1 s budget, renders that take 1.5 s. Before, the average
    passed the budget and every later miss was shed with nothing queued."""
    gate = admission()
    budget = 1.0

    def slow() -> str:
        time.sleep(1.5)
        return "slow"

    def one(deadline: float) -> None:
        with gate.miss(deadline):
            gate.render(slow, deadline, units=0.1)

    for _ in range(3):  # each starts (its estimate fits) and then overruns
        deadline = time.monotonic() + budget
        threads = [threading.Thread(target=one, args=(deadline,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert gate.seconds_per_unit > 3 * INITIAL_S_PER_UNIT  # it learned that renders are slow here
    assert gate.queued_seconds() == 0
    called = []
    deadline = time.monotonic() + budget
    with gate.miss(deadline):  # nothing queued ahead: admitted, however slow the last renders were
        assert gate.render(lambda: called.append(1) or "small", deadline, units=0.001) == "small"
    assert called == [1]


def test_the_learned_rate_decays_toward_the_initial_value_with_time():
    clock = Clock()
    gate = admission(clock=clock)
    assert gate.seconds_per_unit == INITIAL_S_PER_UNIT

    def ten_seconds() -> None:
        clock.advance(10 * TYPICAL_UNITS)  # 10 s a unit, 6.7x the initial rate

    gate.render(ten_seconds, clock() + 600, units=TYPICAL_UNITS)
    learned = gate.seconds_per_unit
    assert learned > INITIAL_S_PER_UNIT
    clock.advance(HALF_LIFE_S)
    assert gate.seconds_per_unit == pytest.approx(INITIAL_S_PER_UNIT + (learned - INITIAL_S_PER_UNIT) / 2)
    clock.advance(20 * HALF_LIFE_S)
    assert gate.seconds_per_unit == pytest.approx(INITIAL_S_PER_UNIT, rel=1e-4)


def test_a_small_render_moves_the_rate_less_than_a_typical_one():
    clock = Clock()
    small, typical = admission(clock=clock), admission(clock=clock)
    for gate, units in ((small, TYPICAL_UNITS / 10), (typical, TYPICAL_UNITS)):
        gate.render(lambda units=units: clock.advance(units * 10), clock() + 600, units=units)
    assert INITIAL_S_PER_UNIT < small.seconds_per_unit < typical.seconds_per_unit


def test_a_render_whose_estimate_exceeds_the_budget_left_is_refused_before_it_starts():
    clock = Clock()
    gate = admission(clock=clock)
    calls = []
    deadline = clock() + 5
    with pytest.raises(Busy) as refused:
        gate.render(lambda: calls.append(1), deadline, units=4)  # 4 x 1.5 s = 6 s > 5 s
    assert refused.value.status == 503 and refused.value.retry_after >= 1
    assert "6 s to render" in refused.value.message and "5 s left" in refused.value.message
    assert calls == [] and gate.queued_seconds() == 0
    gate.render(lambda: calls.append(2), deadline, units=3)  # 4.5 s fits
    assert calls == [2]


def test_a_render_waits_for_a_slot_only_while_its_estimate_still_fits():
    gate = admission(render_slots=1)
    release = threading.Event()
    running = threading.Thread(target=gate.render, args=(lambda: release.wait(30), time.monotonic() + 60, 1.0))
    running.start()
    try:
        _wait_for(lambda: gate.queued == 1)
        calls = []
        with pytest.raises(Busy):
            # 0.3 s left, 0.15 s estimated: it may wait 0.15 s for the slot, which stays taken.
            gate.render(lambda: calls.append(1), time.monotonic() + 0.3, units=0.1)
        assert calls == []
    finally:
        release.set()
        running.join(30)


def test_a_miss_is_shed_by_the_estimated_seconds_queued_ahead_not_by_their_count():
    gate = admission(render_slots=1)
    release = threading.Event()

    def queue(units: float) -> threading.Thread:
        thread = threading.Thread(target=gate.render, args=(lambda: release.wait(30), time.monotonic() + 60, units))
        thread.start()
        return thread

    threads = [queue(0.01), queue(0.01)]  # one running, one waiting: 0.03 s of renders ahead
    try:
        _wait_for(lambda: gate.queued == 2)
        with gate.miss(time.monotonic() + 2):
            pass  # two renders queued, but short ones: a miss with 2 s left gets in
        threads.append(queue(10))  # and a long one: 15 s more ahead
        _wait_for(lambda: gate.queued == 3)
        with pytest.raises(Busy) as shed, gate.miss(time.monotonic() + 2):
            pass
        assert shed.value.retry_after >= 1
        with gate.miss(time.monotonic() + 60):
            pass  # enough budget left to wait for them
    finally:
        release.set()
        for thread in threads:
            thread.join(30)


def test_the_places_limit_still_applies_when_nothing_is_queued():
    gate = admission(max_in_flight=2)
    deadline = time.monotonic() + 30
    with gate.miss(deadline), gate.miss(deadline), pytest.raises(Busy), gate.miss(deadline):
        pass
    with gate.miss(deadline):
        assert gate.in_flight == 1


def test_the_worker_recycles_after_n_renders():
    recycled = []
    gate = admission(recycle_after=3, recycle=lambda: recycled.append(1))
    for _ in range(4):
        gate.render(lambda: None, time.monotonic() + 30, units=0.01)
    assert recycled == [1]


def _jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((width, height), 60).convert("RGB").save(out, "JPEG", quality=85)
    return out.getvalue()


def test_the_estimate_scales_with_the_pixels_and_the_format():
    small, large = _jpeg(400, 300), _jpeg(2400, 1800)

    def work(data: bytes, width: int, fmt: str) -> float:
        return estimate(data, RenderOptions(width=width, quality=75, format=fmt)).work_units

    assert work(large, 0, "webp") > 10 * work(small, 0, "webp")  # 36x the pixels
    assert work(large, 0, "webp") > work(large, 640, "webp") > work(large, 320, "webp")
    assert work(large, 0, "avif") > work(large, 0, "webp")
    gate = admission()
    assert gate.estimate_seconds(work(large, 0, "avif")) > gate.estimate_seconds(work(small, 0, "avif"))
    cost = estimate(large, RenderOptions(width=0, quality=75, format="avif"))
    assert cost.peak_bytes > 2400 * 1800 * 4  # one call gives the memory estimate too
