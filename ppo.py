"""PPO trainer: Med-RLVR's recipe (Qwen2.5-3B base, <think>/<answer> format, reward +1/0/-1).

    torchrun --nproc_per_node 8 ppo.py --model Qwen/Qwen2.5-3B --out runs/medrlvr
    python ppo.py --model tiny --data demo --out runs/ppo-demo      # CPU demo, a few minutes

One step (train_step below): prompts -> completions -> rule reward -> the policy's log-probs from a
training forward (the sampler's differ slightly on GPU, and under the sampler's own samples that
difference is positive on average: a hidden length penalty) and the reference's -> per-token
rewards r_t = -beta * KL_t (every response token) + the rule reward (last token) -> values from
the critic -> GAE advantages (whitened over the whole batch, all ranks) and returns -> PPO
clipped policy loss (grpo.py's, with the KL moved into the reward) and clipped value loss,
--ppo-epochs passes in --mini-batches optimizer steps each. rl.py holds the pieces, loop.py the run.

Algorithmic choices and the flag that changes each (plus grpo.py's shared flags, see --help):
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
steps (10 epochs of MedQA train's 10,178 questions), 1024 new tokens. The critic is saved as
transformers' XForTokenClassification with one label (AutoModelForTokenClassification loads it).
"""
import time

import torch

import flags
import grpo
import loop
import memory
import rl

# Med-RLVR's recipe: the defaults of `python ppo.py`.
MEDRLVR_DEFAULTS = dict(model="Qwen/Qwen2.5-3B", data="medqa_train", format="think_answer",
                        reward_values="1,0,-1", prompt_style="medrlvr", n=1, batch_prompts=256,
                        steps=400, lr=5e-7, kl_coef=0.01, kl_estimator="k1", max_new_tokens=1024,
                        out="runs/ppo")
# `--model tiny` (the CPU demo): the tiny model answers with whole-answer tokens, so the demo keeps
# the boxed format but Med-RLVR's -1 for a bad format and KL 0.01 in the reward. Its answers are 8
# tokens at most, so lambda barely discounts (0.95^8 = 0.66) and the lower-variance advantages of
# 0.95 learn this toy faster (bench/README.md, "CPU demos": lambda 1 against 0.95).
TINY_DEFAULTS = dict(flags.TINY_DEFAULTS, format="boxed", prompt_style="alphamed",
                     reward_values="1,0,-1", n=4, batch_prompts=32, mini_batches=2, steps=200,
                     critic_lr=1e-3, kl_coef=0.01, lam=0.95,
                     entropy_coef=0.05)  # few samples per prompt: without it some answers collapse


def get_args(argv=None):
    p = flags.build_parser(__doc__)
    add = p.add_argument_group("PPO").add_argument
    add("--critic", default=None, help="critic init checkpoint (default: --model)")
    add("--critic-lr", type=float, default=9e-6, help="critic AdamW learning rate")
    add("--gamma", type=float, default=1.0, help="GAE discount")
    add("--lam", type=float, default=1.0, help="GAE lambda")
    add("--value-clip", type=float, default=0.2,
        help="clip value updates to +-this around the old values (0 = off)")
    add("--kl-target", type=float, default=None,
        help="adaptive KL: target per-token KL (default: fixed --kl-coef)")
    add("--kl-horizon", type=int, default=10000, help="adaptive KL: horizon in sequences")
    p.set_defaults(**MEDRLVR_DEFAULTS)
    args = flags.parse_args(p, argv, TINY_DEFAULTS)
    flags.check_rules(p, [
        ("--critic-lr", args.critic_lr, args.critic_lr > 0, "must be > 0"),
        ("--gamma", args.gamma, 0 <= args.gamma <= 1, "must be in [0, 1]"),
        ("--lam", args.lam, 0 <= args.lam <= 1, "must be in [0, 1]"),
        ("--value-clip", args.value_clip, args.value_clip >= 0, "must be >= 0 (0 = off)"),
        ("--kl-target", args.kl_target, args.kl_target is None or args.kl_target > 0,
         "must be > 0 (or unset: a fixed --kl-coef)"),
        ("--kl-horizon", args.kl_horizon, args.kl_horizon >= 1, "must be >= 1")])
    flags.say_changed(p, args, "ppo")
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
    """-beta * the per-token KL estimate at every response token, plus the rule reward at the
    last."""
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
    """Fixed beta, or Ziegler et al.'s adaptive one:
    beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int):
        if self.target:
            err = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + err * n / self.horizon

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict):
        self.beta = state["beta"]


WHITEN_EPS = 1e-8  # on the variance, as OpenRLHF: (A - mean) * rsqrt(max(var, eps))


def set_advantages(completions: list[rl.Completion], beta: float, args, dist) -> dict:
    """Per-token rewards, GAE and globally whitened advantages on every completion. Needs .values,
    and with beta > 0 .old_logprobs (the policy's training forward) and .ref_logprobs."""
    sums = dict.fromkeys(["n", "adv", "adv2", "ret", "ret2", "err2", "kl"], 0.0)
    for r in completions:
        if r.ref_logprobs is None:
            kl = torch.zeros(len(r.response_ids))
        else:
            kl = grpo.kl_estimate(r.old_logprobs, r.ref_logprobs, args.kl_estimator)
        adv, ret = gae(token_rewards(r.reward, kl, beta).tolist(), r.values.tolist(), args.gamma,
                       args.lam)
        r.advantages, r.returns = torch.tensor(adv), torch.tensor(ret)
        sums["n"] += len(adv)
        sums["adv"] += r.advantages.sum().item()
        sums["adv2"] += (r.advantages ** 2).sum().item()
        sums["ret"] += r.returns.sum().item()
        sums["ret2"] += (r.returns ** 2).sum().item()
        sums["err2"] += ((r.returns - r.values) ** 2).sum().item()
        sums["kl"] += kl.sum().item()
    g = dict(zip(sums, dist.sum(list(sums.values()))))  # global over ranks
    n = max(g["n"], 1)
    mean = g["adv"] / n
    var = max(g["adv2"] / n - mean ** 2, 0.0)
    for r in completions:
        r.advantages = (r.advantages - mean) / max(var, WHITEN_EPS) ** 0.5
    var_returns = g["ret2"] / n - (g["ret"] / n) ** 2
    return dict(kl=g["kl"] / n, explained_variance=1 - (g["err2"] / n) / max(var_returns, 1e-8))


def value_loss(critic, mb: rl.MicroBatch, weights: torch.Tensor, args):
    v = rl.values(critic, mb)  # (R,)
    loss = (clipped_value_loss(v, mb.values, mb.returns, args.value_clip) * weights).sum()
    return loss, {}


# ----------------------------------------------------------------------------- the step

def train_step(step: int, policy: rl.Trainable, critic: rl.Trainable, ref, kl_ctl: KLController,
               run: loop.Run) -> tuple[dict, list]:
    args, dist, t0 = run.args, run.dist, time.perf_counter()
    questions, first_group = run.questions(step)
    times = {}  # time_generate, time_reward
    completions = rl.collect(policy.module, run.tokenizer, questions, first_group,
                             run.sampling(step), args, run.reward_values, dist, times)
    metrics = dict(rl.rollout_metrics(completions, dist), **times)
    t1 = time.perf_counter()
    if ref is not None:
        for r, lp in zip(completions, rl.score(ref, completions, args, dist)):
            r.ref_logprobs = lp
    if ref is not None or args.ppo_epochs * args.mini_batches > 1 or args.tis_cap:
        for r, lp in zip(completions, rl.score(policy.module, completions, args, dist)):
            r.old_logprobs = lp  # the training forward's: the KL's policy side, the old ratios
        metrics.update(rl.mismatch_metrics(completions, args.tis_cap, dist))
    for r, v in zip(completions, rl.score(critic.module, completions, args, dist)):
        r.values = v
    advantage_stats = set_advantages(completions, kl_ctl.beta, args, dist)
    t2 = time.perf_counter()

    def actor_loss(mb, weights):  # the KL is in the reward, not the loss
        return grpo.policy_loss(policy.module, mb, weights, args, kl_coef=0.0)

    def critic_loss(mb, weights):
        return value_loss(critic.module, mb, weights, args)
    batch = rl.in_loss(completions, args)
    metrics.update(rl.policy_metrics(rl.update(policy, batch, actor_loss, args, dist)))
    critic_steps = rl.update(critic, batch, critic_loss, args, dist)
    metrics.update(advantage_stats, kl_coef=kl_ctl.beta)  # the reward's KL, not the loss's 0
    critic_stats = rl.policy_metrics(critic_steps)  # what it did not compute stays absent
    for key, name in (("loss", "value_loss"), ("grad_norm", "critic_grad_norm"),
                      ("lr", "critic_lr")):
        if key in critic_stats:
            metrics[name] = critic_stats[key]
    kl_ctl.update(metrics["kl"], metrics["completions"])
    t3 = time.perf_counter()
    metrics.update(time_rollout=t1 - t0, time_score=t2 - t1, time_update=t3 - t2, step_time=t3 - t0)
    return metrics, completions


def main(argv=None):
    args = get_args(argv)
    if args.plan:
        return memory.plan_only(args, "ppo")
    run = loop.Run(args, "ppo")
    policy = run.trainable("policy", run.model_dir, args.lr)
    critic_dir = run.model_dir if args.critic is None else run.local_model(args.critic)
    critic = run.trainable("critic", critic_dir, args.critic_lr, value_head=True)
    ref = run.reference() if args.kl_coef > 0 else None
    kl_ctl = KLController(args.kl_coef, args.kl_target, args.kl_horizon)
    run.track("kl_controller", kl_ctl)
    for step in run.steps():
        metrics, completions = train_step(step, policy, critic, ref, kl_ctl, run)
        run.end_step(step, metrics, completions)


if __name__ == "__main__":
    flags.run_main(main)
