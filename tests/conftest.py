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
