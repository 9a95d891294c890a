"""PPO trainer: Med-RLVR's recipe (Qwen2.5-3B base, <think>/<answer> format, reward +1/0/-1).

    python ppo.py --model Qwen/Qwen2.5-3B --out runs/medrlvr
    python ppo.py --model tiny --data demo --out runs/ppo-demo      # CPU demo, a few minutes

One step: prompts -> completions (rollout.py) -> rule reward (reward.py) -> the policy's log-probs
from a training forward (the sampler's differ slightly on GPU, and under the sampler's own samples
that difference is positive on average: a hidden length penalty) and the reference's -> per-token
rewards r_t = -beta * KL_t (every response token) + the rule reward (last token) -> values from the
critic -> GAE advantages (whitened over the whole batch, all ranks) and returns -> PPO clipped
policy loss and clipped value loss, --ppo-epochs passes in --mini-batches optimizer steps each.
Rollout, reward, packing, loss aggregation, checkpoint/resume, logging and torchrun/FSDP2 are
grpo.py's; this file adds the critic, the KL-in-reward and GAE.

Algorithmic choices and the flag that changes each (plus every grpo.py flag, see --help):
  critic init                 --critic (default: the policy checkpoint; a scalar head, zero-init)
  critic learning rate        --critic-lr 9e-6
  KL in the reward            --kl-coef 0.01 --kl-estimator k1 (beta; 0 loads no reference)
  adaptive KL controller      --kl-target (off) --kl-horizon 10000 (Ziegler et al.'s controller)
  GAE                         --gamma 1.0 --lam 1.0
  value clipping              --value-clip 0.2 (0 = unclipped squared error)
  advantage whitening         always: (A - mean) / sqrt(max(var, 1e-8)) with the mean and (biased)
                              variance over all response tokens of all ranks, as OpenRLHF does

Med-RLVR defaults: the paper states Qwen2.5-3B (base), PPO with a critic and GAE (OpenRLHF), the
think/answer format with reward -1 / 0 / +1, MedQA train, 10 epochs over it. It does not state the
learning rates, KL, batch or lengths. We use OpenRLHF's values: its PPO example scripts' actor lr
5e-7 (its flag default is 1e-6) and critic lr 9e-6; its flag defaults KL 0.01 with k1, clip 0.2,
gamma 1, lambda 1 (OpenRLHF 0.7 and later; verl also 1), value clip 0.2 (OpenRLHF 0.7; later
OpenRLHF and verl use 0.5), KL horizon 10000. Lambda 1 matters here: the reward comes only at the
last token and the critic starts at 0, so with lambda 0.95 the first token of a 1024-token answer
would get 0.95^1023 ~ 1e-23 of the signal. Batch: 256 prompts x 1 completion per step and 400
steps (10 epochs of MedQA train's 10,178 questions), 1024 new tokens.
"""
import time
from functools import partial

import torch

import grpo
from grpo import Dist, Part, Rollout

# Med-RLVR's recipe: the defaults of `python ppo.py`.
MEDRLVR_DEFAULTS = dict(model="Qwen/Qwen2.5-3B", data="medqa_train", format="think_answer",
                        reward_values="1,0,-1", prompt_style="medrlvr", group_size=1,
                        batch_prompts=256, steps=400, lr=5e-7, kl_coef=0.01, kl_estimator="k1",
                        max_new_tokens=1024, out="runs/ppo")
# `--model tiny` (the CPU demo): the tiny model answers with whole-answer tokens, so the demo keeps
# the boxed format but Med-RLVR's -1 for a bad format and KL 0.01 in the reward. Its answers are 8
# tokens at most, so lambda barely discounts (0.95^8 = 0.66) and the lower-variance advantages of
# 0.95 learn this toy faster (reward 0.92 at step 140 vs 0.65 with lambda 1, README).
TINY_DEFAULTS = dict(grpo.TINY_DEFAULTS, format="boxed", prompt_style="alphamed", reward_values="1,0,-1",
                     group_size=4, batch_prompts=32, mini_batches=2, steps=200, critic_lr=1e-3,
                     kl_coef=0.01, lam=0.95,
                     entropy_coef=0.05)  # few samples per prompt: without it some answers collapse


def get_args(argv=None):
    p = grpo.build_parser(__doc__)
    p.add_argument("--critic", default=None, help="critic init checkpoint (default: --model)")
    p.add_argument("--critic-lr", type=float, default=9e-6, help="critic AdamW learning rate")
    p.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    p.add_argument("--lam", type=float, default=1.0, help="GAE lambda")
    p.add_argument("--value-clip", type=float, default=0.2, help="clip value updates to +-this around the old values (0 = off)")
    p.add_argument("--kl-target", type=float, default=None, help="adaptive KL: target per-token KL (default: fixed --kl-coef)")
    p.add_argument("--kl-horizon", type=int, default=10000, help="adaptive KL: horizon in sequences")
    p.set_defaults(**MEDRLVR_DEFAULTS)
    if grpo.wants_tiny(argv):
        p.set_defaults(**TINY_DEFAULTS)
    args = p.parse_args(argv)
    grpo.check_args(p, args)
    return args


# ----------------------------------------------------------------------------- the math

def gae(rewards: list[float], values: list[float], gamma: float, lam: float):
    """Generalised advantage estimation for one sequence (the value after the last token is 0).
    Returns (advantages, returns = advantages + values)."""
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def token_rewards(final: float, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """-beta * the per-token KL estimate at every response token, plus the rule reward at the last."""
    r = -beta * kl
    r[-1] += final
    return r


def clipped_value_loss(values, old_values, returns, clip: float):
    """Per-token 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within +-clip of the old v."""
    loss = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * loss


class KLController:
    """Fixed beta, or Ziegler et al.'s adaptive one: beta *= 1 + clip(KL / target - 1, +-0.2) * n / horizon."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int):
        if self.target:
            err = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + err * n / self.horizon


# ----------------------------------------------------------------------------- the step

WHITEN_EPS = 1e-8  # on the variance, as OpenRLHF: (A - mean) * rsqrt(max(var, eps))


def set_advantages(items: list[Rollout], beta: float, args, d: Dist) -> dict:
    """Per-token rewards, GAE and globally whitened advantages on every item. Needs .values, and
    with beta > 0 .old_logprobs (the policy's training forward) and .ref_logprobs."""
    sums = dict.fromkeys(["n", "adv", "adv2", "ret", "ret2", "err2", "kl"], 0.0)
    for it in items:
        if it.ref_logprobs is None:
            kl = torch.zeros(len(it.response_ids))
        else:
            kl = grpo.kl_estimate(it.old_logprobs, it.ref_logprobs, args.kl_estimator)
        r = token_rewards(it.reward, kl, beta)
        adv, ret = gae(r.tolist(), it.values.tolist(), args.gamma, args.lam)
        it.advantage, it.returns = torch.tensor(adv), torch.tensor(ret)
        sums["n"] += len(adv)
        sums["adv"] += it.advantage.sum().item()
        sums["adv2"] += (it.advantage ** 2).sum().item()
        sums["ret"] += it.returns.sum().item()
        sums["ret2"] += (it.returns ** 2).sum().item()
        sums["err2"] += ((it.returns - it.values) ** 2).sum().item()
        sums["kl"] += kl.sum().item()
    g = dict(zip(sums, d.sum(list(sums.values()))))  # global over ranks
    n = max(g["n"], 1)
    mean = g["adv"] / n
    var = max(g["adv2"] / n - mean ** 2, 0.0)
    for it in items:
        it.advantage = (it.advantage - mean) / max(var, WHITEN_EPS) ** 0.5
    var_returns = g["ret2"] / n - (g["ret"] / n) ** 2
    return dict(kl=g["kl"] / n, explained_variance=1 - (g["err2"] / n) / max(var_returns, 1e-8))


def value_loss(critic, mb: grpo.MicroBatch, tot_tokens, tot_seqs, real: bool, first: bool, *, args):
    v = critic(mb.ids, mb.positions, mb.cu_seqlens, mb.max_seqlen, select=mb.select)  # (R,)
    old, ret = grpo.per_token(mb, "values", v.device), grpo.per_token(mb, "returns", v.device)
    w = grpo.token_weights(mb.lengths, args.loss_agg, tot_tokens, tot_seqs, args.max_new_tokens)
    loss = (clipped_value_loss(v, old, ret, args.value_clip) * w.to(v.device) * float(real)).sum()
    return loss, dict(value_loss=loss.item())


def train_step(policy: Part, critic: Part, ref, kl_ctl: KLController, tok, train, step: int, args,
               d: Dist):
    t0 = time.perf_counter()
    questions, offset = grpo.step_questions(train, step, args, d)
    items = grpo.collect_rollouts(policy.module, tok, questions, args, step, d, offset)
    metrics = grpo.rollout_metrics(items, d)
    t1 = time.perf_counter()
    if ref is not None:
        grpo.score_tokens(ref, items, args, d, "ref_logprobs")
    if ref is not None or args.ppo_epochs * args.mini_batches > 1:  # the KL's policy side
        grpo.score_tokens(policy.module, items, args, d, "old_logprobs")
    grpo.score_tokens(critic.module, items, args, d, "values")
    advantage_stats = set_advantages(items, kl_ctl.beta, args, d)
    t2 = time.perf_counter()
    loss_fn = partial(grpo.policy_loss, policy.module, args=args, kl_coef=0.0)  # KL is in the reward
    metrics.update(grpo.policy_metrics(grpo.update(policy, items, args, d, loss_fn), args))
    metrics.update(advantage_stats, kl_coef=kl_ctl.beta)  # the KL to the reference, not the loss's 0
    critic_stats = grpo.update(critic, items, args, d, partial(value_loss, critic.module, args=args))
    metrics.update(value_loss=critic_stats["value_loss"] / (args.ppo_epochs * args.mini_batches),
                   critic_grad_norm=critic_stats["grad_norm"])
    kl_ctl.update(metrics["kl"], int(d.sum([len(items)])[0]))
    t3 = time.perf_counter()
    metrics.update(time_rollout=t1 - t0, time_score=t2 - t1, time_update=t3 - t2, step_time=t3 - t0)
    return metrics, items


def main(argv=None):
    args = get_args(argv)
    d, path, tok = grpo.setup(args)
    policy = grpo.make_part(path, args, d, args.lr)
    critic_path = path if args.critic is None else grpo.model_path(args, d, args.critic)
    critic = grpo.make_part(critic_path, args, d, args.critic_lr, value_head=True)
    ref = grpo.load_reference(path, d) if args.kl_coef > 0 else None
    train, val = grpo.load_questions(args, d)
    kl_ctl = KLController(args.kl_coef, args.kl_target, args.kl_horizon)
    extra = {"kl_coef": kl_ctl.beta}

    def step_fn(step):
        kl_ctl.beta = extra["kl_coef"]  # restored on resume
        out = train_step(policy, critic, ref, kl_ctl, tok, train, step, args, d)
        extra["kl_coef"] = kl_ctl.beta
        return out
    grpo.run(args, d, {"policy": policy, "critic": critic}, tok, val, step_fn, "ppo", extra)


if __name__ == "__main__":
    main()
