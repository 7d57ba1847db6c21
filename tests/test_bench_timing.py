"""Claim 9's ratios must not flip with machine load: ``mmneurons bench`` times each side as the
least of interleaved repeats (A B A B …) in one call and divides those minima.

A real loaded machine would make a flaky test, so the load here is scripted: a fake clock and
timed functions whose durations the test sets (a load factor per call). Each script is chosen
so that a single run, a median, or the repeats run one function after the other (A A A B B B)
give another ratio than the interleaved minima.
"""

from __future__ import annotations

import pytest

from mmneurons_utils.batch import bench


class FakeClock:
    """A clock that moves only when told to (``advance``)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptedClock:
    """A clock read twice per timed call (start, end): the n-th timed call lasts ``durations[n]``."""

    def __init__(self, durations):
        self.durations, self.reads, self.now = list(durations), 0, 0.0

    def __call__(self) -> float:
        if self.reads % 2:                        # an end read: the next scripted duration passes
            self.now += self.durations[self.reads // 2]
        self.reads += 1
        return self.now

    @property
    def timed_calls(self) -> int:
        return self.reads // 2


# the load on the n-th call overall: A is called at 0, 2, 4 and B at 1, 3, 5 when interleaved
LOAD = [3, 1, 1, 3, 2, 3]


def _loaded(clock, calls, name, cost):
    def run():
        calls.append(name)
        clock.advance(cost * LOAD[len(calls) - 1])
    return run


def test_interleaved_takes_the_minimum_of_alternating_runs():
    clock, calls = FakeClock(), []
    a, b = _loaded(clock, calls, "A", 1.0), _loaded(clock, calls, "B", 2.0)
    t_a, t_b = bench._interleaved(a, b, repeats=3, warm_up=False, clock=clock)
    assert calls == ["A", "B"] * 3                          # interleaved: A B A B A B
    assert (t_a, t_b) == (1.0, 2.0) and t_b / t_a == 2.0     # B costs twice A, whatever the load
    # what the other ways of timing the same calls would have said under this load
    a_times = [1.0 * LOAD[i] for i in (0, 2, 4)]
    b_times = [2.0 * LOAD[i] for i in (1, 3, 5)]
    assert b_times[0] / a_times[0] != 2.0                    # a single run
    assert sorted(b_times)[1] / sorted(a_times)[1] != 2.0    # medians
    assert min(2.0 * x for x in LOAD[3:]) / min(LOAD[:3]) != 2.0   # A A A B B B


def test_interleaved_warms_up_untimed_and_takes_any_number_of_functions():
    clock, calls = FakeClock(), []
    fns = [lambda n=n: (calls.append(n), clock.advance(1.0 + n)) for n in range(3)]
    assert bench._interleaved(*fns, repeats=2, clock=clock) == [1.0, 2.0, 3.0]
    assert calls == [0, 1, 2] * 3                            # one warm-up round, then two timed


def test_time_identification_ratios_are_of_interleaved_minima(tiny_llava):
    from mmneurons_utils import make_scenes

    # timed calls in order: (describe, identify) × 3 rounds, then (contribution, gradient,
    # gradient_image) × 3 rounds; base costs 1 and 1.5 s, then 1, 10 and 20 s, under load
    pair = [1.0 * 3, 1.5 * 1, 1.0 * 1, 1.5 * 3, 1.0 * 2, 1.5 * 3]
    triple = [1.0 * 1, 10.0 * 5, 20.0 * 2,
              1.0 * 4, 10.0 * 1, 20.0 * 3,
              1.0 * 3, 10.0 * 2, 20.0 * 1]
    clock = ScriptedClock(pair + triple)
    images = [s.image for s in make_scenes(2, seed=0)]
    result = bench.time_identification(tiny_llava, images, repeats=3, top_k=5, clock=clock)
    assert clock.timed_calls == len(pair) + len(triple)     # warm-ups and set-up are not timed
    assert result["overhead_ratio"] == pytest.approx(1.5)   # medians: 4.5 / 2 = 2.25
    assert result["gradient_speedup"] == pytest.approx(10.0)          # medians: 20 / 3
    assert result["gradient_image_speedup"] == pytest.approx(20.0)    # medians: 40 / 3
    assert result["describe_s"] == pytest.approx(1.0) and result["identify_s"] == pytest.approx(1.5)
    assert result["repeats"] == 3


@pytest.mark.slow
def test_time_causal_compares_the_same_rows(tiny_llava):
    """``causal_speedup`` divides the sequential reference's time by the batched path's on the
    same conditions; both give the same rows (margins within float summation order). No
    timing is asserted (load would make it flaky): the benchmark reports it."""
    from mmneurons_utils import make_scenes

    images = [s.image for s in make_scenes(2, seed=0)]
    result = bench.time_causal(tiny_llava, images, repeats=1)
    assert result["causal_conditions"] > 0 and result["causal_n_images"] == 2
    assert result["causal_max_margin_diff"] < 1e-4
    assert result["causal_speedup"] == pytest.approx(result["causal_sequential_s"] / result["causal_s"],
                                                     rel=0.05)
