"""Timing helpers: warm-up excluded, clocks read after a sync, medians with their spread."""

import statistics
import time
from collections.abc import Callable


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
