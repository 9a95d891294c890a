"""Decode time of the repo's rollout.py against another rollout.py (e.g. an older commit's), both
in one process, alternating, on SmolLM2-135M-Instruct with real MedQA chat prompts (needs
../shared). Only decode steps are timed (prefill and sampling setup excluded); best of --reps.

    mkdir -p /tmp/old && git show COMMIT:rollout.py > /tmp/old/rollout.py
    git show COMMIT:kvcache.py > /tmp/old/kvcache.py  # commits that have one (it is used if there)
    OMP_NUM_THREADS=1 python bench/rollout_ab.py /tmp/old/rollout.py [--configs 4x4,16x8,32x1]
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root
import torch

import model as M
import rollout as R
from real import load_rollout, medqa_workloads  # bench/real.py (this folder is on sys.path)


def decode_seconds(rollout, model, prompts, n: int, new_tokens: int) -> float:
    """Seconds spent in rollout._decode while sampling exactly new_tokens per sample."""
    real, spent = rollout._decode, [0.0]

    def timed(*a):
        t = time.perf_counter()
        out = real(*a)
        spent[0] += time.perf_counter() - t
        return out
    rollout._decode = timed
    try:
        sampling = rollout.Sampling(n=n, max_new_tokens=new_tokens, temperature=1.0)
        rollout.generate(model, prompts, sampling, stop_ids=[], progress=False)
    finally:
        rollout._decode = real
    return spent[0]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("other", help="the rollout.py to compare with")
    p.add_argument("--configs", default="4x4,16x8,32x1", help="PROMPTSxN workloads")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per sample")
    p.add_argument("--reps", type=int, default=2, help="runs of each, alternating")
    args = p.parse_args()
    torch.set_num_threads(1)
    path, configs, prompts = medqa_workloads(args.configs)
    model = M.load_model(path).eval()
    other = load_rollout(args.other)
    print(f"other: {os.path.abspath(args.other)}; {args.new_tokens} new tokens; best of "
          f"{args.reps}, decode seconds")
    for n_prompts, n in configs:
        times = {"other": [], "repo": []}
        for rep in range(args.reps):  # alternate which goes first
            order = [("other", other), ("repo", R)]
            for name, mod in order if rep % 2 == 0 else order[::-1]:
                times[name].append(decode_seconds(mod, model, prompts[:n_prompts], n,
                                                  args.new_tokens))
        o, r = min(times["other"]), min(times["repo"])
        print(f"{n_prompts}x{n}: other {o:.2f} s, repo {r:.2f} s, repo speed-up {o / r:.3f}x "
              f"(all: other {[round(t, 1) for t in times['other']]}, "
              f"repo {[round(t, 1) for t in times['repo']]})", flush=True)


if __name__ == "__main__":
    main()
