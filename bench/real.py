"""What the sampler benches share: another rollout.py loaded as a module, and the real
workloads (SmolLM2-135M-Instruct on MedQA chat prompts, from ../shared)."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the modules rollout.py imports from its own folder (in an order they can import each other)
SIBLINGS = ("kvcache", "sampling", "decode_cpu")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_rollout(path: str):
    """The rollout.py at `path` as a module (e.g. an older commit's, to time against). The
    kvcache.py, sampling.py and decode_cpu.py beside it, where there are, are the ones it imports
    (else the repo's)."""
    folder, saved = os.path.dirname(os.path.abspath(path)), {}
    for name in SIBLINGS:
        beside = os.path.join(folder, name + ".py")
        if os.path.exists(beside):
            saved[name] = sys.modules.get(name)
            sys.modules[name] = _load(name + "_under_test", beside)
    try:
        return _load("rollout_under_test", path)
    finally:
        for name, repo_module in saved.items():
            if repo_module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = repo_module


def prefilled(batch) -> list:
    """The admitted items of a rollout `_prefill` batch that run through the model: all of an
    older rollout.py's (4 fields); else those with no source slot (5th field), not samples
    joining their prompt's live entry."""
    return [b for b in batch if len(b) < 5 or b[4] is None]


def medqa_workloads(configs: str):
    """'4x4,16x8' -> (SmolLM2 checkpoint dir, [(prompts, n)], token ids of the first MedQA
    questions as AlphaMed chat prompts, as many as the largest workload needs)."""
    import data
    import tiny
    from transformers import AutoTokenizer
    shared = os.path.join(os.path.dirname(ROOT), "shared", "data")
    if not os.path.isdir(shared):
        sys.exit(f"error: no {shared}: the MedQA prompts are read from ../shared/data")
    try:
        path = tiny.real_model()
    except FileNotFoundError as e:  # it says what is missing and where it was looked for
        sys.exit(f"error: {e}")
    tok = AutoTokenizer.from_pretrained(path)
    pairs = [tuple(map(int, c.split("x"))) for c in configs.split(",")]
    questions = data.load_benchmark_dir("medqa", shared)[:max(p for p, _ in pairs)]
    return path, pairs, [data.encode_prompt(tok, q, "alphamed") for q in questions]
