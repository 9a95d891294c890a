"""The training passes on the real model: medrl's scoring and update against transformers' forward
and forward + backward on the same tokens, and an update whose groups are all dead (skipped).

    OMP_NUM_THREADS=1 python bench/train_phases.py [--sequences 16 --response 64]

SmolLM2-135M-Instruct from ../shared/models (converted once by tiny.real_model), real MedQA chat
prompts (data.encode_prompt) and random response tokens, fp32 on the CPU. Each timing is the best
of --reps runs after a warm-up, medrl and transformers alternating, so both see the same machine.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import torch
from timing import best_seconds  # bench/timing.py (this script's own folder is on sys.path)

import data
import grpo
import rl
import tiny
from parallel import Dist


def rollouts(path: str, n: int, response: int) -> list[rl.Rollout]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    questions = data.load_benchmark_dir("medqa", tiny.SHARED_MODELS.parent / "data")[:n]
    g = torch.Generator().manual_seed(0)
    out = []
    for i, q in enumerate(questions):
        ids = torch.randint(0, 49152, (response,), generator=g).tolist()
        out.append(rl.Rollout(q, i, data.encode_prompt(tok, q, "alphamed"), ids,
                              torch.zeros(response), "length",
                              advantages=torch.full((response,), 1.0 if i % 2 else -1.0)))
    return out


def hf_logprobs(hf, batch: list[rl.Rollout]):
    """transformers: one forward per sequence (no padding), log-softmax, the response tokens."""
    total = 0.0
    for r in batch:
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        logits = hf(ids).logits[0, len(r.prompt_ids) - 1:-1]  # (R, V)
        total = total + logits.log_softmax(-1).gather(-1, ids[0, len(r.prompt_ids):, None]).sum()
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=16, help="completions (one MedQA prompt each)")
    p.add_argument("--response", type=int, default=64, help="response tokens per completion")
    p.add_argument("--reps", type=int, default=3, help="timed runs (the best is kept)")
    args = p.parse_args()
    path = tiny.real_model()
    if path is None:
        sys.exit("needs ../shared/models (SmolLM2-135M-Instruct)")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = rollouts(path, args.sequences, args.response)
    flags = grpo.get_args(["--model", path, "--micro-tokens", "2048", "--no-grad-ckpt", "--lr",
                           "1e-7", "--kl-coef", "0"])
    part = rl.Trainable.load("policy", path, flags.lr, flags, Dist())
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in batch)

    def update(live: bool):
        for r in batch:
            r.advantages = torch.full((args.response,), (1.0 if r.group % 2 else -1.0) * live)
        rl.update(part, batch, lambda mb, w: grpo.policy_loss(part.module, mb, w, flags, 0.0),
                  flags, Dist(), lambda r: bool(r.advantages.any()))

    def hf_update():
        hf.zero_grad()
        hf_logprobs(hf, batch).backward()

    with torch.no_grad():
        score_s = best_seconds(lambda: rl.score(part.module, batch, flags, Dist()), args.reps)
        hf_score_s = best_seconds(lambda: hf_logprobs(hf, batch), args.reps)
    update_s = best_seconds(lambda: update(True), args.reps)
    hf_update_s = best_seconds(hf_update, args.reps)
    dead_s = best_seconds(lambda: update(False), args.reps)
    print(f"SmolLM2-135M, {args.sequences} sequences, {tokens:,} tokens ({args.response} response "
          f"tokens each), fp32, {torch.get_num_threads()} thread(s)")
    print(f"{'':34}{'medrl s':>10}{'transformers s':>16}{'transformers/medrl':>20}")
    print(f"{'score (forward, log-probs)':34}{score_s:>10.2f}{hf_score_s:>16.2f}"
          f"{hf_score_s / score_s:>20.2f}")
    print(f"{'update (fwd + bwd; medrl + AdamW)':34}{update_s:>10.2f}{hf_update_s:>16.2f}"
          f"{hf_update_s / update_s:>20.2f}")
    print(f"{'update, every group dead':34}{dead_s:>10.2f}{'':>16}"
          f"{'(' + format(update_s / dead_s, '.0f') + 'x faster than live)':>20}")


if __name__ == "__main__":
    main()
