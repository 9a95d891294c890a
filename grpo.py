"""GRPO trainer: AlphaMed's recipe (Llama-3.1-8B-Instruct, boxed answer, binary reward, no SFT).

    torchrun --nproc_per_node 8 grpo.py --model meta-llama/Llama-3.1-8B-Instruct --out runs/alphamed
    python grpo.py --model tiny --data demo --out runs/demo          # CPU demo, a few minutes

One step (train_step below): prompts -> n completions each, sampled with the policy's own weights
-> rewards -> group-normalised advantages on every response token -> reference log-probs (only if
--kl-coef > 0) -> old log-probs (only if a batch feeds more than one optimizer step; otherwise
the ratio is exactly 1) -> clipped surrogate + per-token KL (+ entropy bonus) -> optimizer
step(s) over token-budget packed micro-batches. rl.py holds the pieces of a step, loop.py the run.

Algorithmic choices and the flag that changes each:
  group size G (completions per prompt) --num-samples 8 (alias --group-size)
  advantage (r - mean) / (std + eps)    --adv-norm std | none (Dr. GRPO: none) | batch-std (the
                                        step's std of all rewards)
  drop groups with one reward value     --drop-zero-var (their advantage is 0 anyway; they still
                                        count in the token normaliser unless dropped)
  clip range [1 - low, 1 + high]        --clip-low 0.2 --clip-high 0.2 (clip-higher: raise high)
  dual clip for negative advantages     --dual-clip 0 (off; verl applies 3.0 always)
  updates per rollout batch             --ppo-epochs 1 --mini-batches 1
  KL to the reference, in the loss      --kl-coef 0.001 --kl-estimator k1 | k2 | k3 (k3 default);
                                        0 loads no reference model at all. As a loss term k1's
                                        expected gradient is zero (it regularises nothing), k2's
                                        is the true gradient of KL(pi || ref), k3's (verl's
                                        "low_var_kl") is that of KL(ref || pi): biased, low
                                        variance. k3 follows the recipe; k2 for the exact KL
                                        gradient
  loss aggregation                      --loss-agg token-mean (over the global token count: all
                                        ranks and micro-batches) | seq-mean-token-mean |
                                        seq-mean-token-sum (Dr. GRPO: token sums / --max-new-tokens)
  entropy bonus                         --entropy-coef 0
  optimizer                             AdamW --lr 1e-6 --weight-decay 0 --grad-clip 1.0,
                                        --warmup-steps 10, --lr-schedule constant | cosine
  sampling                              --temperature 1.0 --top-p 1.0 (the same temperature
                                        divides the logits in the training log-probs)
  reward                                --format boxed --reward-values 1,0,0 (AlphaMed);
                                        Med-RLVR: --format think_answer --reward-values 1,0,-1
  prompt                                --prompt-style alphamed | medrlvr, --shuffle-options (a
                                        new option order each time a question is used)
Ablations (off by default; README "Ablations"):
  GSPO (Zheng et al. 2025)              --policy-loss gspo | gspo-token, --gspo-clip-low 3e-4
                                        --gspo-clip-high 4e-4 (they differ from ppo off-policy only)
  truncated IS, sampler/trainer (TRL)   --tis-cap 2
  DAPO                                  --dynamic-sampling, --overlong-buffer, --mask-truncated
  batch-std advantages (TRL)            --adv-norm batch-std

AlphaMed defaults: the paper states Llama-3.1-8B-Instruct, MedQA train + difficulty-mixed MedMCQA
train (19,178 questions), batch 512 prompts, 300 steps, binary boxed reward, verl's GRPO. It does
not state G, lr, KL, clip, temperature or length. We use verl's defaults and GRPO example scripts
for lr 1e-6, KL in the loss with k3 ("low_var_kl") at 0.001, clip 0.2 and temperature 1.0; G = 8
is TRL's default number of generations (verl's GRPO example scripts use 5); 2048 new tokens
(ample for MCQA reasoning). Activation checkpointing is on (--no-grad-ckpt turns it off). Memory
per phase for 8 x 80 GB: `--plan` (bench/README.md, "Memory plan").
"""
import time

import torch

import flags
import loop
import memory
import rl


def get_args(argv=None):
    p = flags.build_parser(__doc__)
    add = p.add_argument_group("GRPO").add_argument
    add("--adv-norm", default="std", choices=["std", "none", "batch-std"],
        help="divide group-centred rewards by the group std (none = Dr. GRPO; batch-std: by the "
             "std of every reward of the step, all ranks)")
    add("--drop-zero-var", action="store_true",
        help="drop groups whose completions all got the same reward")
    add("--policy-loss", default="ppo", choices=["ppo", "gspo", "gspo-token"],
        help="ppo: a ratio per token; gspo: one per completion, exp(mean log-ratio), clipped at "
             "--gspo-clip-*; gspo-token: its token-level form (only off-policy does it differ)")
    add("--gspo-clip-low", type=float, default=3e-4, help="GSPO's ratio clip below 1 - this")
    add("--gspo-clip-high", type=float, default=4e-4, help="GSPO's ratio clip above 1 + this")
    add("--dynamic-sampling", action="store_true",
        help="DAPO: sample more prompt groups until --batch-prompts of them have reward variance")
    add("--max-sampling-rounds", type=int, default=4,
        help="--dynamic-sampling: generation rounds per step at most (logged: sampling_rounds)")
    args = flags.parse_args(p, argv, flags.TINY_DEFAULTS)
    if args.n < 2:
        p.error(f"--num-samples {args.n}: GRPO needs >= 2 completions per prompt")
    flags.say_changed(p, args, "grpo")
    return args


# ----------------------------------------------------------------------------- the math

# exp() of a log-ratio beyond this overflows float32 or makes the loss astronomically large: clamp
# first (verl and OpenRLHF clamp at +-20 too). Tokens beyond it get no gradient from the term.
LOG_RATIO_BOUND = 20.0


def group_advantages(rewards: torch.Tensor, norm: str = "std", eps: float = 1e-6,
                     batch_std: float = 0.0) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): centred per group, divided by the group std, or the
    batch's (`batch_std`: every rank's rewards), or nothing."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if norm == "std":
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    elif norm == "batch-std":
        adv = adv / (batch_std + eps)
    return adv


def policy_log_ratio(lp, old, lengths: list[int], kind: str) -> torch.Tensor:
    """Per-token log pi/pi_old the surrogate clips: ppo, a token's own; gspo, its completion's
    mean (the gradient through that mean); gspo-token, the mean's value with the token's own
    gradient: sg[s_i] * pi_t / sg[pi_t] in GSPO's notation."""
    log_ratio = lp - old
    if kind == "ppo":
        return log_ratio
    seq = rl.sequence_mean(log_ratio, lengths)
    return seq if kind == "gspo" else seq.detach() + lp - lp.detach()


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, r = log pi - log pi_ref.

    k1 = r: unbiased value, but as a loss term its expected gradient is zero
    (E_pi[grad log pi] = 0), so it regularises nothing; use it in a reward (PPO), not in a loss.
    k2 = r^2 / 2: its gradient, E_pi[r grad log pi], is the true gradient of KL(pi || pi_ref).
    k3 = exp(-r) + r - 1 >= 0: low variance, but its gradient is that of KL(pi_ref || pi) (biased).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    r = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return (torch.exp(-r) + r - 1).clamp(min=0)  # k3; clamp(min=0): fp rounding near r = 0


def clipped_surrogate(log_ratio, adv, clip_low, clip_high, dual_clip=0.0):
    """PPO's pessimistic clipped policy loss per token from log(pi / pi_old) (policy_log_ratio),
    and where clipping was active."""
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    loss_plain = -adv * ratio
    loss_clip = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(loss_plain, loss_clip)
    if dual_clip > 0:  # bound the loss of a negative advantage when the ratio explodes
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss, (loss_clip > loss_plain).float()


def advantage_free_terms(args, kl_coef: float) -> dict[str, float]:
    """The loss's terms that do not scale with the advantage, and their coefficients: policy_loss
    adds exactly these to the surrogate, and a completion whose advantage is zero changes the
    loss through them alone, so the update skips its forward only while all are 0
    (needs_forward). A new such term goes here and into policy_loss's `terms`."""
    return {"entropy": -args.entropy_coef, "kl": kl_coef}


def needs_forward(args):
    """Whether a completion needs a forward and backward in the update: a zero advantage changes
    the loss only through the advantage-free terms, so with all of them off it is skipped."""
    free = any(advantage_free_terms(args, args.kl_coef).values())
    return lambda r: free or bool(r.advantages.any())


def policy_loss(policy, mb: rl.MicroBatch, weights: torch.Tensor, args, kl_coef: float,
                kind: str = "ppo"):
    """One micro-batch: clipped surrogate (per token, or GSPO's per sequence: `kind`) plus the
    advantage-free terms (kl_coef * KL to the reference, - the entropy bonus), each token
    weighted (rl.token_weights); and per-token statistics for the logs: every term, the clip
    indicator and the sampler-trainer gap (rl.policy_metrics logs whatever is returned)."""
    lp, ent = rl.logprobs(policy, mb, entropy=True)
    old = lp.detach() if mb.old_logprobs is None else mb.old_logprobs  # one update: ratio 1
    clip = (args.clip_low, args.clip_high) if kind == "ppo" else (args.gspo_clip_low,
                                                                  args.gspo_clip_high)
    log_ratio = policy_log_ratio(lp, old, mb.lengths, kind)
    per_token, clipped = clipped_surrogate(log_ratio, mb.advantages, *clip, args.dual_clip)
    if args.tis_cap:  # the sampler's tokens, reweighted towards the trainer's distribution
        per_token = per_token * torch.exp(old - mb.sampler_logprobs).clamp(max=args.tis_cap)
    terms = dict(entropy=ent)  # computed by the forward anyway; KL only when it is in the loss
    if kl_coef > 0:
        terms["kl"] = kl_estimate(lp, mb.ref_logprobs, args.kl_estimator)
    for name, coef in advantage_free_terms(args, kl_coef).items():
        if coef:
            per_token = per_token + coef * terms[name]
    sampler_gap = (lp.detach() - mb.sampler_logprobs).abs()  # first update: the same weights
    stats = dict(terms, clip_frac=clipped, logprob_gap=sampler_gap)
    return (per_token * weights).sum(), stats


# ----------------------------------------------------------------------------- the step

def set_group_advantages(completions: list[rl.Completion], norm: str, dist) -> set[int]:
    """Each completion's advantage from its group, on every response token; returns the groups
    whose completions all got the same reward (no signal)."""
    groups = sorted({r.group for r in completions})
    members = [[r for r in completions if r.group == g] for g in groups]
    rewards = torch.tensor([[r.reward for r in m] for m in members])  # (P, G)
    scale = rl.global_std([r.reward for r in completions], dist) if norm == "batch-std" else 0.0
    for m, row in zip(members, group_advantages(rewards, norm, batch_std=scale).tolist()):
        for r, a in zip(m, row):
            r.advantages = torch.full((len(r.response_ids),), a)
    return {g for g, row in zip(groups, rewards) if row.max() == row.min()}


def sample_groups(step: int, policy: rl.Trainable, run: loop.Run, times: dict):
    """(every completion sampled, those to train on, the dead groups: one reward value, rounds).
    --dynamic-sampling: further rounds of new prompts (another order of the questions) until
    --batch-prompts groups with signal are kept, at most --max-sampling-rounds; the decision is
    global, so every rank makes the same rounds."""
    args, dist = run.args, run.dist
    sampled, kept, dead = [], [], set()
    rounds = args.max_sampling_rounds if args.dynamic_sampling else 1
    for r in range(rounds):
        questions, first_group = run.questions(step, r, rounds)
        new = rl.collect(policy.module, run.tokenizer, questions, first_group,
                         run.sampling(step), args, run.reward_values, dist, times)
        dead |= set_group_advantages(new, args.adv_norm, dist)
        sampled += new
        kept += [x for x in new if not (args.dynamic_sampling and x.group in dead)]
        if dist.sum([len({x.group for x in kept})])[0] >= args.batch_prompts:
            break
    return sampled, kept, dead, r + 1


def train_step(step: int, policy: rl.Trainable, ref, run: loop.Run) -> tuple[dict, list]:
    args, dist, t0 = run.args, run.dist, time.perf_counter()
    times = {}  # time_generate, time_reward
    completions, kept, dead, rounds = sample_groups(step, policy, run, times)
    metrics = dict(rl.rollout_metrics(completions, dist), sampling_rounds=rounds, **times)
    batch = [r for r in rl.in_loss(kept, args) if not (args.drop_zero_var and r.group in dead)]
    t1 = time.perf_counter()
    if ref is not None:
        for r, lp in zip(batch, rl.score(ref, batch, args, dist)):
            r.ref_logprobs = lp
    t2 = time.perf_counter()
    if args.ppo_epochs * args.mini_batches > 1 or args.tis_cap:  # ratios need old log-probs
        for r, lp in zip(batch, rl.score(policy.module, batch, args, dist)):
            r.old_logprobs = lp
        metrics.update(rl.mismatch_metrics(batch, args.tis_cap, dist))
    t3 = time.perf_counter()

    def loss_fn(mb, weights):  # a reference is loaded exactly when --kl-coef > 0
        return policy_loss(policy.module, mb, weights, args, args.kl_coef, args.policy_loss)

    steps = rl.update(policy, batch, loss_fn, args, dist, needs_forward(args))
    metrics.update(rl.policy_metrics(steps))
    t4 = time.perf_counter()
    metrics.update(time_rollout=t1 - t0, time_reference=t2 - t1, time_old=t3 - t2,
                   time_update=t4 - t3, step_time=t4 - t0,
                   rollout_tokens_per_s=metrics["generated_tokens"] / (t1 - t0))
    return metrics, completions


def main(argv=None):
    args = get_args(argv)
    if args.plan:
        return memory.plan_only(args, "grpo")
    run = loop.Run(args, "grpo")
    policy = run.trainable("policy", run.model_dir, args.lr)
    ref = run.reference() if args.kl_coef > 0 else None  # KL 0: no reference model at all
    for step in run.steps():
        metrics, completions = train_step(step, policy, ref, run)
        run.end_step(step, metrics, completions)


if __name__ == "__main__":
    flags.run_main(main)
