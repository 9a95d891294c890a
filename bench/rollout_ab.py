"""Time of the repo's rollout.py against another rollout.py (e.g. an older commit's), both in one
process, alternating, on SmolLM2-135M-Instruct with real MedQA chat prompts (needs ../shared):
the decode steps alone, and the whole generate call (prefills included), best of --reps; and how
many prompts each ran through a prefill.

    mkdir -p /tmp/old && git show COMMIT:rollout.py > /tmp/old/rollout.py
    for m in kvcache sampling decode_cpu; do  # the commit's, where it has them (else the repo's)
      git show COMMIT:$m.py > /tmp/old/$m.py 2>/dev/null || rm /tmp/old/$m.py; done
    OMP_NUM_THREADS=1 python bench/rollout_ab.py /tmp/old/rollout.py [--configs 4x4,16x8,32x1]
    (--stop --max-cache-tokens 16384: natural lengths, fewer slots than samples, as in training)
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
from real import load_rollout, medqa_workloads, prefilled  # bench/real.py (on sys.path)


def timed_generate(rollout, model, prompts, n: int, args):
    """(seconds in the CPU path's _decode, seconds of the whole generate, prompts run through a
    prefill) for one generate of n samples per prompt."""
    generate = rollout
    rollout = getattr(rollout, "decode_cpu", rollout)  # the CPU path: its own file, or in rollout
    real_decode, real_prefill, spent, count = rollout._decode, rollout._prefill, [0.0], [0]

    def timed(*a):
        t = time.perf_counter()
        out = real_decode(*a)
        spent[0] += time.perf_counter() - t
        return out

    def counted(model, run, batch):
        count[0] += len(prefilled(batch))
        return real_prefill(model, run, batch)
    rollout._decode, rollout._prefill = timed, counted
    try:
        sampling = generate.Sampling(n=n, max_new_tokens=args.new_tokens, temperature=1.0,
                                     max_cache_tokens=args.max_cache_tokens)
        t = time.perf_counter()
        generate.generate(model, prompts, sampling, stop_ids=None if args.stop else [],
                          progress=False)
        total = time.perf_counter() - t
    finally:
        rollout._decode, rollout._prefill = real_decode, real_prefill
    return spent[0], total, count[0]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("other", help="the rollout.py to compare with")
    p.add_argument("--configs", default="4x4,16x8,32x1", help="PROMPTSxN workloads")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per sample")
    p.add_argument("--reps", type=int, default=2, help="runs of each, alternating")
    p.add_argument("--stop", action="store_true",
                   help="stop at the model's end-of-turn tokens (completions of natural lengths, "
                   "as in training: slots free at different steps) instead of exactly "
                   "--new-tokens each")
    p.add_argument("--max-cache-tokens", type=int, default=2**18,
                   help="the sampler's KV-cache budget (fewer slots than samples: later samples "
                   "wait for free slots)")
    args = p.parse_args()
    torch.set_num_threads(1)
    path, configs, prompts = medqa_workloads(args.configs)
    model = M.load_model(path).eval()
    other = load_rollout(args.other)
    print(f"other: {os.path.abspath(args.other)}; {args.new_tokens} new tokens"
          f"{' at most (stop tokens)' if args.stop else ''}; KV budget {args.max_cache_tokens} "
          f"tokens; best of {args.reps} (decode: the CPU path's _decode only; generate: the "
          f"whole call)")
    for n_prompts, n in configs:
        runs = {"other": [], "repo": []}
        for rep in range(args.reps):  # alternate which goes first
            order = [("other", other), ("repo", R)]
            for name, mod in order if rep % 2 == 0 else order[::-1]:
                runs[name].append(timed_generate(mod, model, prompts[:n_prompts], n, args))
        line = f"{n_prompts}x{n}:"
        for i, what in enumerate(("decode", "generate")):
            o, r = (min(t[i] for t in runs[k]) for k in ("other", "repo"))
            line += (f" {what} other {o:.2f} s, repo {r:.2f} s, repo speed-up {o / r:.3f}x "
                     f"(all: other {[round(t[i], 1) for t in runs['other']]}, "
                     f"repo {[round(t[i], 1) for t in runs['repo']]});")
        line += (f" prompts prefilled: other {runs['other'][0][2]}, "
                 f"repo {runs['repo'][0][2]}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
