"""Timing for the bench scripts: the fastest of several runs after a warm-up, the run least
disturbed by whatever else the machine does."""
import time


def best_seconds(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
