"""Throughput and step latency, as the reference's ``PerformanceCalculator`` measures them.

What is kept from DeepLearningExamples ``TensorFlow2/Recommendation/SIM/sim/utils/benchmark.py``:

* Call ``step(samples)`` once per training step, after the step's result has been synchronised;
  a step's latency is the wall time since the previous call (or since ``start()``), so it
  includes data fetching and logging. ``step`` returns that step's
  ``samples * num_ranks / latency`` (the reference's ``len(batch) * hvd.size() / latency``).
* The first ``warmup_steps`` steps are warm-up: when the step count reaches ``warmup_steps`` the
  sample count and the latency list are emptied and the post-warm-up clock starts.
* ``throughput`` = ``reduce_sum(samples since warm-up)`` / seconds since warm-up ended;
  ``latency_mean`` and ``latency_p90/p95/p99`` = ``1000 * np.mean`` and
  ``1000 * np.percentile`` (numpy's default, linear) of the post-warm-up latencies in seconds,
  so in ms; ``time`` = seconds since the window started, warm-up included.
* ``benchmark_steps <= 0`` measures every step after warm-up and never completes; otherwise
  ``completed`` turns true at step ``warmup_steps + benchmark_steps`` and ``results()`` is frozen
  at that moment (the reference's ``results`` property, which main.py uses once completed).

Deliberate differences, each fixing a quirk of the reference:

* Measurement windows. ``start()`` opens the first window, ``new_window()`` the next one (the
  reference's ``init()``, called after each epoch), and the step count is per window. The
  reference never resets its step counter, which is how only epoch 0 excludes warm-up; here
  warm-up applies to the first window only as well (``warmup_each_window=True`` applies it to
  every window). The reference's counter also carried a short epoch 0's warm-up into epoch 1
  (with 20 warm-up steps and a 15-step epoch 0, epoch 1 dropped its first 5 steps); here a
  window's warm-up never leaks into the next one.
* No RuntimeError for a window that ended within its warm-up (``steps <= warmup_steps``): the
  window's results then cover all of its steps, from the start of the window. Every result has
  two extra keys saying what was measured: ``warmup_excluded`` (True when the warm-up steps were
  left out) and ``measured_steps``. ``REFERENCE_RESULT_KEYS`` lists the reference's six keys
  for logs that must carry only those.
* ``results()`` is one call for both cases: the frozen results once completed, the current ones
  otherwise (main.py picks between ``results`` and ``get_current_benchmark_results()``).
* The next step is timed from the same clock reading that ended this one (the reference reads
  ``perf_counter()`` again at the end of its bookkeeping, a few microseconds later).
* The clock is injectable, ``reduce_sum`` replaces the hard-wired Horovod allreduce (identity by
  default), and the numbers returned are Python floats.

``samples`` is what THIS rank processed in the step. On one process that is the global batch.
Under Horovod pass the local batch, ``num_ranks=hvd.size()`` and a ``reduce_sum`` that
allreduce-sums a number over ranks. ``reduce_sum`` is collective: every rank must call
``results()`` together (and ``step()`` at the completing step, as in the reference).

Example (a fake clock: one second a step, 100 samples a step, 2 warm-up steps)::

    >>> ticks = iter(range(100))
    >>> calculator = PerformanceCalculator(warmup_steps=2, clock=lambda: float(next(ticks)))
    >>> calculator.start()
    >>> [calculator.step(100) for _ in range(5)]
    [100.0, 100.0, 100.0, 100.0, 100.0]
    >>> result = calculator.results()
    >>> result["throughput"], result["time"], result["latency_p90"], result["measured_steps"]
    (75.0, 6.0, 1000.0, 3)
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

#: The keys of the reference's performance results, in its order.
REFERENCE_RESULT_KEYS = (
    "throughput", "time", "latency_mean", "latency_p90", "latency_p95", "latency_p99",
)
LATENCY_PERCENTILES = (90, 95, 99)


def _identity(value):
    return value


class PerformanceCalculator:
    """Per-step samples/s, and throughput and latency statistics over a measurement window.

    Args:
        warmup_steps: steps at the start of the first window left out of the statistics
            (``<= 0``: none).
        benchmark_steps: steps to measure after warm-up before ``completed``; ``<= 0`` measures
            every step and never completes.
        reduce_sum: sums a number over ranks (Horovod allreduce Sum); identity by default.
        num_ranks: multiplies ``samples`` in the per-step rate that ``step`` returns.
        warmup_each_window: apply the warm-up to every window, not only the first.
        clock: seconds as a float, ``time.perf_counter`` as in the reference.
    """

    def __init__(self, warmup_steps: int, benchmark_steps: int = 0,
                 reduce_sum: Callable[[Any], Any] | None = None, num_ranks: int = 1,
                 warmup_each_window: bool = False,
                 clock: Callable[[], float] = time.perf_counter):
        self.warmup_steps = max(int(warmup_steps), 0)
        self.benchmark_steps = max(int(benchmark_steps), 0)
        self.reduce_sum = reduce_sum if reduce_sum is not None else _identity
        self.num_ranks = num_ranks
        self.warmup_each_window = warmup_each_window
        self.clock = clock
        self._window_start: float | None = None

    def start(self) -> None:
        """Open the first window, warm-up included; call right before the first step."""
        self._open_window(warmup=self.warmup_steps)

    def new_window(self) -> None:
        """Open the next window (next epoch): warm-up only with ``warmup_each_window``."""
        self._open_window(warmup=self.warmup_steps if self.warmup_each_window else 0)

    def _open_window(self, warmup: int) -> None:
        now = self.clock()
        self._window_start = now
        self._step_start = now
        self._measure_start = now  # moved to the end of warm-up when it ends
        self._window_warmup = warmup
        self._latencies: list[float] = []  # every step of the window, warm-up included
        self._samples: list[int] = []
        self._frozen: dict | None = None

    @property
    def step_count(self) -> int:
        """Steps recorded in the current window."""
        return len(self._latencies) if self._window_start is not None else 0

    @property
    def completed(self) -> bool:
        """True once ``warmup + benchmark_steps`` steps of this window are done."""
        return self._window_start is not None and self._frozen is not None

    def step(self, samples: int) -> float:
        """Record one finished step of ``samples`` samples on this rank; return its samples/s."""
        if self._window_start is None:
            raise RuntimeError("PerformanceCalculator.start() must be called before step()")
        now = self.clock()
        latency = now - self._step_start
        self._latencies.append(latency)
        self._samples.append(samples)
        steps = len(self._latencies)
        if self._window_warmup and steps == self._window_warmup:
            self._measure_start = now
        elif (self.benchmark_steps and self._frozen is None
              and steps == self._window_warmup + self.benchmark_steps):
            self._frozen = self._current_results(now)
        self._step_start = now
        return float(samples * self.num_ranks / latency) if latency > 0 else math.inf

    def results(self) -> dict:
        """``throughput`` (samples/s over all ranks), ``time`` (s), ``latency_mean``,
        ``latency_p90``, ``latency_p95``, ``latency_p99`` (ms), plus ``warmup_excluded`` and
        ``measured_steps``: frozen once ``completed``, else measured up to now."""
        if self._window_start is None:
            raise RuntimeError("PerformanceCalculator.start() must be called before results()")
        if self._frozen is not None:
            return dict(self._frozen)
        if not self._latencies:
            raise RuntimeError("no step was recorded in this measurement window")
        return self._current_results(self.clock())

    def _current_results(self, now: float) -> dict:
        warmup_excluded = 0 < self._window_warmup < len(self._latencies)
        skipped = self._window_warmup if warmup_excluded else 0
        measure_start = self._measure_start if warmup_excluded else self._window_start
        latencies = self._latencies[skipped:]
        total_samples = self.reduce_sum(sum(self._samples[skipped:]))
        results = {
            "throughput": float(total_samples) / float(now - measure_start),
            "time": float(now - self._window_start),
            "latency_mean": float(1000 * np.mean(latencies)),
        }
        for percentile in LATENCY_PERCENTILES:
            results[f"latency_p{percentile}"] = float(1000 * np.percentile(latencies, percentile))
        results["warmup_excluded"] = warmup_excluded
        results["measured_steps"] = len(latencies)
        return results
