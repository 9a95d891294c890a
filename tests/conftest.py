"""Shared test setup: one CPU thread, the repo root importable, paths to the real benchmark files."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# The real benchmark files live beside the repo (../shared/data); a fresh clone has none, and the
# tests that read them skip.
SHARED_DATA = ROOT.parent / "shared" / "data"


def read_metrics(out):
    """The trainer's metrics.jsonl in `out` as a list of dicts."""
    import json
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timing(rows):
    """Metrics rows minus the wall-clock ones, which differ between identical runs."""
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]


class ThreadRanks:
    """`world` simulated ranks in threads of one process: their Dist.sum / max are real
    all-reduces among the threads, so per-rank code can be checked against global hand values
    without torchrun. run(fn) calls fn(dist) on every rank and returns the results in rank order."""

    def __init__(self, world: int):
        import threading
        self.world = world
        self.wait = threading.Barrier(world, timeout=60)
        self.slots = [None] * world

    def exchange(self, rank, value):
        self.slots[rank] = value
        self.wait.wait()
        everyone = list(self.slots)
        self.wait.wait()  # nobody overwrites a slot before all have read
        return everyone

    def run(self, fn):
        import threading
        from parallel import Dist
        group = self

        class RankDist(Dist):
            def sum(self, values):
                return [sum(col) for col in zip(*group.exchange(self.rank, list(values)))]

            def max(self, value):
                return max(group.exchange(self.rank, value))

            def barrier(self):
                group.exchange(self.rank, None)

        results, errors = [None] * self.world, []

        def target(rank):
            try:
                results[rank] = fn(RankDist(rank, self.world))
            except BaseException as e:  # re-raised in the caller
                errors.append(e)
                self.wait.abort()
        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def real_model_dir():
    """SmolLM2-135M-Instruct as an HF checkpoint (converted once from ../shared/models), or a
    skip saying what is missing and where it was looked for."""
    import pytest
    from tiny import real_model
    try:
        return real_model()
    except FileNotFoundError as e:
        pytest.skip(str(e))
