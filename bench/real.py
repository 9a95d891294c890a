"""What the sampler benches share: another rollout.py loaded as a module, and the real
workloads (SmolLM2-135M-Instruct on MedQA chat prompts, from ../shared)."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_rollout(path: str):
    """The rollout.py at `path` as a module (e.g. an older commit's, to time against)."""
    spec = importlib.util.spec_from_file_location("rollout_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def medqa_workloads(configs: str):
    """'4x4,16x8' -> (SmolLM2 checkpoint dir, [(prompts, n)], token ids of the first MedQA
    questions as AlphaMed chat prompts, as many as the largest workload needs)."""
    import data
    import tiny
    from transformers import AutoTokenizer
    path, shared = tiny.real_model(), os.path.join(os.path.dirname(ROOT), "shared", "data")
    if path is None or not os.path.isdir(shared):
        sys.exit("the real model needs ../shared (models/ and data/) beside the repo")
    tok = AutoTokenizer.from_pretrained(path)
    pairs = [tuple(map(int, c.split("x"))) for c in configs.split(",")]
    questions = data.load_benchmark_dir("medqa", shared)[:max(p for p, _ in pairs)]
    return path, pairs, [data.encode_prompt(tok, q, "alphamed") for q in questions]
