import numpy as np
import pytest

from sim_merlin.training.performance import REFERENCE_RESULT_KEYS, PerformanceCalculator


class FakeClock:
    def __init__(self, start=100.0):
        self.now = start

    def __call__(self):
        return self.now


def _run_steps(calculator, clock, latencies, samples):
    rates = []
    for latency, n in zip(latencies, samples):
        clock.now += latency
        rates.append(calculator.step(n))
    return rates


def _expected(latencies, samples, measured_seconds, window_seconds, total_factor=1):
    latencies = np.asarray(latencies)
    return {
        "throughput": total_factor * np.sum(samples) / measured_seconds,
        "time": window_seconds,
        "latency_mean": 1000 * np.mean(latencies),
        "latency_p90": 1000 * np.percentile(latencies, 90),
        "latency_p95": 1000 * np.percentile(latencies, 95),
        "latency_p99": 1000 * np.percentile(latencies, 99),
    }


def _assert_matches(results, expected):
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, rel=1e-12), key


def _random_steps(seed, n):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.05, 0.5, n), rng.integers(100, 1000, n)


def test_per_step_rate_is_samples_times_ranks_over_time_since_previous_call():
    clock = FakeClock()
    calculator = PerformanceCalculator(warmup_steps=0, num_ranks=4, clock=clock)
    calculator.start()
    rates = _run_steps(calculator, clock, [0.5, 0.25, 2.0], [100, 100, 50])
    assert rates == pytest.approx([800.0, 1600.0, 100.0], rel=1e-12)


def test_warmup_steps_are_left_out_and_time_includes_them():
    clock = FakeClock()
    latencies, samples = _random_steps(0, 12)
    calculator = PerformanceCalculator(warmup_steps=4, clock=clock)
    calculator.start()
    _run_steps(calculator, clock, latencies, samples)
    clock.now += 0.125  # results are asked for a little after the last step
    results = calculator.results()
    _assert_matches(results, _expected(
        latencies[4:], samples[4:],
        measured_seconds=latencies[4:].sum() + 0.125, window_seconds=latencies.sum() + 0.125))
    assert list(results) == list(REFERENCE_RESULT_KEYS) + ["warmup_excluded", "measured_steps"]
    assert results["warmup_excluded"] is True and results["measured_steps"] == 8
    assert all(type(results[key]) is float for key in REFERENCE_RESULT_KEYS)
    assert not calculator.completed  # benchmark_steps = 0: unbounded


def test_without_warmup_every_step_counts():
    clock = FakeClock()
    latencies, samples = _random_steps(1, 7)
    calculator = PerformanceCalculator(warmup_steps=-3, benchmark_steps=-1, clock=clock)
    calculator.start()
    _run_steps(calculator, clock, latencies, samples)
    results = calculator.results()
    _assert_matches(results, _expected(latencies, samples, latencies.sum(), latencies.sum()))
    assert results["warmup_excluded"] is False and results["measured_steps"] == 7


def test_completed_after_warmup_plus_benchmark_steps_and_results_frozen():
    clock = FakeClock()
    latencies, samples = _random_steps(2, 9)
    calculator = PerformanceCalculator(warmup_steps=2, benchmark_steps=5, clock=clock)
    calculator.start()
    _run_steps(calculator, clock, latencies[:6], samples[:6])
    assert not calculator.completed
    _run_steps(calculator, clock, latencies[6:7], samples[6:7])
    assert calculator.completed
    expected = _expected(latencies[2:7], samples[2:7], latencies[2:7].sum(), latencies[:7].sum())
    _assert_matches(calculator.results(), expected)
    clock.now += 10.0
    _run_steps(calculator, clock, latencies[7:], samples[7:])  # later steps change nothing
    _assert_matches(calculator.results(), expected)
    assert calculator.results()["measured_steps"] == 5


def test_reduce_sum_sums_the_samples_over_ranks():
    clock = FakeClock()
    latencies, samples = _random_steps(3, 6)
    reduced = []

    def reduce_sum(value):  # four ranks that each processed as many samples as this one
        reduced.append(value)
        return np.int64(4 * value)

    calculator = PerformanceCalculator(warmup_steps=1, reduce_sum=reduce_sum, num_ranks=4,
                                       clock=clock)
    calculator.start()
    rates = _run_steps(calculator, clock, latencies, samples)
    assert rates == pytest.approx(4 * samples / latencies, rel=1e-12)
    _assert_matches(calculator.results(), _expected(
        latencies[1:], samples[1:], latencies[1:].sum(), latencies.sum(), total_factor=4))
    assert reduced == [samples[1:].sum()]


def test_window_ending_within_warmup_measures_all_its_steps_instead_of_raising():
    clock = FakeClock()
    latencies, samples = _random_steps(4, 5)
    for steps in (3, 5):  # fewer than, and exactly, the warm-up steps
        calculator = PerformanceCalculator(warmup_steps=5, clock=clock)
        calculator.start()
        _run_steps(calculator, clock, latencies[:steps], samples[:steps])
        results = calculator.results()
        _assert_matches(results, _expected(latencies[:steps], samples[:steps],
                                           latencies[:steps].sum(), latencies[:steps].sum()))
        assert results["warmup_excluded"] is False and results["measured_steps"] == steps


def test_new_window_measures_its_own_steps_without_warmup():
    clock = FakeClock()
    latencies, samples = _random_steps(5, 10)
    calculator = PerformanceCalculator(warmup_steps=3, clock=clock)
    calculator.start()
    _run_steps(calculator, clock, latencies[:5], samples[:5])
    first = calculator.results()
    assert first["measured_steps"] == 2

    clock.now += 30.0  # evaluation between epochs is not measured
    calculator.new_window()
    assert calculator.step_count == 0
    _run_steps(calculator, clock, latencies[5:], samples[5:])
    second = calculator.results()
    _assert_matches(second, _expected(latencies[5:], samples[5:], latencies[5:].sum(),
                                      latencies[5:].sum()))
    assert second["warmup_excluded"] is False and second["measured_steps"] == 5


def test_short_first_window_does_not_carry_its_warmup_into_the_next_one():
    clock = FakeClock()
    latencies, samples = _random_steps(6, 6)
    calculator = PerformanceCalculator(warmup_steps=4, clock=clock)
    calculator.start()
    _run_steps(calculator, clock, latencies[:2], samples[:2])
    assert calculator.results()["measured_steps"] == 2
    calculator.new_window()
    _run_steps(calculator, clock, latencies[2:], samples[2:])
    assert calculator.results()["measured_steps"] == 4  # the reference would have dropped 2


def test_warmup_each_window_and_completion_restart_with_each_window():
    clock = FakeClock()
    latencies, samples = _random_steps(7, 10)
    calculator = PerformanceCalculator(warmup_steps=2, benchmark_steps=2,
                                       warmup_each_window=True, clock=clock)
    calculator.start()
    _run_steps(calculator, clock, latencies[:5], samples[:5])
    assert calculator.completed
    calculator.new_window()
    assert not calculator.completed
    _run_steps(calculator, clock, latencies[5:9], samples[5:9])
    assert calculator.completed
    _assert_matches(calculator.results(), _expected(
        latencies[7:9], samples[7:9], latencies[7:9].sum(), latencies[5:9].sum()))


def test_misuse_raises():
    calculator = PerformanceCalculator(warmup_steps=2, clock=FakeClock())
    with pytest.raises(RuntimeError, match="start"):
        calculator.step(10)
    with pytest.raises(RuntimeError, match="start"):
        calculator.results()
    calculator.start()
    with pytest.raises(RuntimeError, match="no step"):
        calculator.results()
