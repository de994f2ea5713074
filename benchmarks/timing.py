"""Timing helpers: warm-up excluded, clocks read after a sync, medians with their spread."""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def time_repeats(run: Callable[[], None], sync: Callable[[], None], *, warmup: int, repeats: int) -> dict:
    """Seconds per call of ``run``: median, min and max over ``repeats`` after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        seconds.append(time.perf_counter() - start)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "repeats": repeats}


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(result, seconds) of one call: for compile times."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@dataclass
class Case:
    """One implementation ready to time: compiled and warmed up.

    ``run`` is one repeat, ``calls`` the steps (or sampler batches) it does, so that times are
    per call; ``info`` goes into the result row as it is (compile time, FLOPs, devices).
    """
    run: Callable[[], None]
    sync: Callable[[], None]
    calls: int = 1
    info: dict = field(default_factory=dict)


def time_in_turns(cases: dict[str, Case], repeats: int) -> dict[str, dict]:
    """ms per call of each case: the median and min-max over ``repeats`` rounds, in each of which
    every case runs one repeat in turn.

    On a shared machine a burst of load then falls on every case alike, where timing one case's
    repeats after another's hands it to whichever ran then, and the ratios between rows, which
    are the benchmark's result, swing with it.
    """
    ms: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            case.sync()
            start = time.perf_counter()
            case.run()
            case.sync()
            ms[name].append(1e3 * (time.perf_counter() - start) / case.calls)
    return {name: {"ms": statistics.median(m), "ms_min": min(m), "ms_max": max(m), "repeats": repeats,
                   **cases[name].info} for name, m in ms.items()}
