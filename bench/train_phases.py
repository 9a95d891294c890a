"""The training passes on the real model: medrl's scoring and update against transformers' forward
and forward + backward on the same tokens, with a group's responses sharing one packed copy of
their prompt and without (the same completions ordered so that no neighbours share a prompt), and an
update whose groups are all dead (skipped).

    OMP_NUM_THREADS=1 python bench/train_phases.py [--prompts 4 --group 4 --response 128]

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


def completions(path: str, prompts: int, group: int, response: int) -> list[rl.Completion]:
    """`group` completions of each of the first `prompts` MedQA questions, adjacent."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    questions = data.load_benchmark_dir("medqa", tiny.SHARED_MODELS.parent / "data")[:prompts]
    g = torch.Generator().manual_seed(0)
    out = []
    for i, q in enumerate(questions):
        prompt = data.encode_prompt(tok, q, "alphamed")
        for _ in range(group):
            ids = torch.randint(0, 49152, (response,), generator=g).tolist()
            out.append(rl.Completion(q, i, prompt, ids, torch.zeros(response), "length",
                                     advantages=torch.zeros(response)))
    return out


def hf_logprobs(hf, batch: list[rl.Completion]):
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
    p.add_argument("--prompts", type=int, default=4, help="MedQA prompts")
    p.add_argument("--group", type=int, default=4, help="completions per prompt")
    p.add_argument("--response", type=int, default=128, help="response tokens per completion")
    p.add_argument("--reps", type=int, default=3, help="timed runs (the best is kept)")
    args = p.parse_args()
    try:
        path = tiny.real_model()
    except FileNotFoundError as e:  # it says what is missing and where it was looked for
        sys.exit(f"error: {e}")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = completions(path, args.prompts, args.group, args.response)
    # the same completions, sample-major: no two neighbours share a prompt, so none is shared
    apart = [batch[i * args.group + j] for j in range(args.group) for i in range(args.prompts)]
    flags = grpo.get_args(["--model", path, "--micro-tokens", "2048", "--no-grad-ckpt", "--lr",
                           "1e-7", "--kl-coef", "0"])
    part = rl.Trainable.load("policy", path, flags.lr, flags, Dist())
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in batch)
    unique = sum(len(mb.ids) for mb in rl.micro_batches(batch, flags.micro_tokens, "cpu"))

    def update(completions, live: bool):
        for k, r in enumerate(completions):
            r.advantages = torch.full((args.response,), (1.0 if k % 2 else -1.0) * live)
        rl.update(part, completions, lambda mb, w: grpo.policy_loss(part.module, mb, w, flags, 0.0),
                  flags, Dist(), lambda r: bool(r.advantages.any()))

    def hf_update():
        hf.zero_grad()
        hf_logprobs(hf, batch).backward()

    with torch.no_grad():
        score_s = best_seconds(lambda: rl.score(part.module, batch, flags, Dist()), args.reps)
        apart_score_s = best_seconds(lambda: rl.score(part.module, apart, flags, Dist()),
                                     args.reps)
        hf_score_s = best_seconds(lambda: hf_logprobs(hf, batch), args.reps)
    update_s = best_seconds(lambda: update(batch, True), args.reps)
    apart_update_s = best_seconds(lambda: update(apart, True), args.reps)
    hf_update_s = best_seconds(hf_update, args.reps)
    dead_s = best_seconds(lambda: update(batch, False), args.reps)
    print(f"SmolLM2-135M, {args.prompts} MedQA prompts x {args.group} completions of "
          f"{args.response} tokens: {tokens:,} tokens, {unique:,} with each prompt packed once; "
          f"fp32, {torch.get_num_threads()} thread(s)")
    print(f"{'':36}{'medrl s':>9}{'unshared s':>12}{'transformers s':>16}"
          f"{'transformers/medrl':>20}")
    for name, ours, apart_s, theirs in [
            ("score (forward, log-probs)", score_s, apart_score_s, hf_score_s),
            ("update (fwd + bwd; medrl + AdamW)", update_s, apart_update_s, hf_update_s)]:
        print(f"{name:36}{ours:>9.2f}{apart_s:>12.2f}{theirs:>16.2f}{theirs / ours:>20.2f}")
    print(f"{'update, every group dead':36}{dead_s:>9.2f}"
          f"   ({update_s / dead_s:.0f}x faster than live)")


if __name__ == "__main__":
    main()
