"""What one RL step is made of, shared by grpo.py and ppo.py.

A step is: collect (sample n completions per prompt with the policy's own weights, score them
with the rule reward) -> the algorithm's advantages -> score (per-token log-probs of the reference
and the old policy, a critic's values) -> update (optimizer steps over packed micro-batches).

- `Completion`: one completion with its group (the prompt it answers), reward, and the per-token
  tensors the losses read. One record from sampling to the optimizer.
- `micro_batches`: completions packed back to back (cu_seqlens, no padding) up to a token budget;
  a group's responses share one copy of its prompt (M.SharedPrefix), so scoring and the update
  process each prompt once per micro-batch instead of once per completion.
- `score`: log-probs of the response tokens under any model (or a critic's values). Every rank
  runs the same number of forwards, padding with zero-weight dummy batches.
- `update`: --ppo-epochs passes in --mini-batches optimizer steps. The loss normaliser is global
  (`token_weights`: all ranks, all micro-batches), so any cut into micro-batches or ranks gives
  the same gradient; the loss function gets the weights and returns per-token statistics, which
  the loop sums over real tokens only.
- `Trainable`: a module with its AdamW and LR schedule (the policy; PPO's critic).
"""
import math
import sys
import time
from dataclasses import dataclass, field

import torch

import data
import model as M
import reward
import rollout
from parallel import Dist, Gathered, load_sharded
from reward import RewardInfo


@dataclass
class Completion:
    """One completion and everything the update needs. Tensors are per response token (R,)."""
    question: data.Question
    group: int  # global index of its prompt in the step: the n completions of a prompt share it
    prompt_ids: list[int]
    response_ids: list[int]
    sampler_logprobs: torch.Tensor  # the sampler's log-prob of each response token
    finish_reason: str  # "stop" or "length"
    # what the sampler divided the logits by: the trainer's log-probs divide by the same (from
    # the completion, so that a temperature schedule changes it in one place, the sampling settings)
    temperature: float = 1.0
    text: str = ""
    reward: float = 0.0
    info: RewardInfo | None = None
    advantages: torch.Tensor | None = None  # GRPO: the group advantage on every token
    old_logprobs: torch.Tensor | None = None  # the policy's training forward before the update
    ref_logprobs: torch.Tensor | None = None  # the reference's, when a KL term needs them
    values: torch.Tensor | None = None  # PPO: the critic's value before each response token
    returns: torch.Tensor | None = None  # PPO: GAE returns, the value targets


def collect(policy, tok, questions, first_group: int, sampling: rollout.Sampling, args,
            reward_values: reward.RewardValues, dist: Dist, times: dict | None = None):
    """Sample sampling.n completions per question (prompt-major) with the policy's gathered
    weights, and score each with the rule reward. `first_group` is the global index of
    questions[0] in the step (its random streams and its group number). Adds the seconds spent
    generating and rewarding to `times` (time_generate, time_reward)."""
    start = time.perf_counter()
    prompts = [data.encode_prompt(tok, q, args.prompt_style) for q in questions]
    with Gathered(policy) as m:
        samples = rollout.generate(m, prompts, sampling, stop_ids=rollout.stop_ids_for(m, tok),
                                   prompt_offset=first_group,
                                   progress=dist.main and sys.stderr.isatty())
    generated = time.perf_counter()
    completions = []
    for s in samples:
        q = questions[s.prompt_idx]
        text = tok.decode(s.response_ids, skip_special_tokens=True)
        r, info = reward.grade(text, q, args.format, reward_values)
        r += overlong_penalty(len(s.response_ids), sampling.max_new_tokens, args.overlong_buffer,
                              args.overlong_penalty)
        completions.append(Completion(q, first_group + s.prompt_idx, s.prompt_ids, s.response_ids,
                                      torch.tensor(s.logprobs), s.finish_reason,
                                      sampling.temperature or 1.0, text, r, info))
    if times is not None:
        times["time_generate"] = times.get("time_generate", 0.0) + generated - start
        times["time_reward"] = times.get("time_reward", 0.0) + time.perf_counter() - generated
    return completions


def overlong_penalty(length: int, max_len: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer tokens, then falling linearly to
    -penalty at max_len (buffer 0: off)."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    return -penalty * (length - (max_len - buffer)) / buffer


def in_loss(completions: list[Completion], args) -> list[Completion]:
    """The completions the loss sees: all, or (--mask-truncated) those not cut at the length cap."""
    return [r for r in completions if not (args.mask_truncated and r.finish_reason == "length")]


def mismatch_metrics(completions: list[Completion], cap: float, dist: Dist) -> dict:
    """Sampler vs trainer log-probs on the same weights (needs .old_logprobs): mean and max
    |log-ratio|, and the truncated importance weights min(pi_old / pi_sampler, cap): the share
    capped and their effective sample size (sum w)^2 / (n sum w^2), in (0, 1]."""
    gaps = [r.old_logprobs - r.sampler_logprobs for r in completions]
    w = [torch.exp(g).clamp(max=cap) if cap else torch.exp(g) for g in gaps]
    sums = dist.sum([sum(len(g) for g in gaps), sum(g.abs().sum().item() for g in gaps),
                     sum(x.sum().item() for x in w), sum((x ** 2).sum().item() for x in w),
                     sum((torch.exp(g) > cap).sum().item() if cap else 0 for g in gaps)])
    n = max(sums[0], 1)
    largest = dist.max(max((g.abs().max().item() for g in gaps if len(g)), default=0.0))
    ess = min(sums[2] ** 2 / (n * sums[3]), 1.0) if sums[3] > 0 else 1.0  # <= 1 but for rounding
    return dict(mismatch_mean_abs=sums[1] / n, mismatch_max_abs=largest,
                tis_capped_frac=sums[4] / n, tis_ess=ess)


def global_std(values: list[float], dist: Dist) -> float:
    """The (unbiased) std of every rank's values together."""
    n, total, squares = dist.sum([len(values), sum(values), sum(v * v for v in values)])
    return max((squares - total * total / n) / max(n - 1, 1), 0.0) ** 0.5


def rollout_metrics(completions: list[Completion], dist: Dist) -> dict:
    """Means over every rank's completions (one all-reduce); the longest response; how many
    completions and tokens were generated; the share of groups whose completions all got the
    same reward (no signal for GRPO)."""
    lens = [len(r.response_ids) for r in completions]
    rewards_of = {}  # group -> the rewards its completions got
    for r in completions:
        rewards_of.setdefault(r.group, set()).add(r.reward)
    dead = sum(len(rewards) == 1 for rewards in rewards_of.values())
    sums = dist.sum([len(completions), sum(r.reward for r in completions),
                     sum(r.info.correct for r in completions),
                     sum(not r.info.format_ok for r in completions), sum(lens),
                     sum(r.finish_reason == "length" for r in completions),
                     sum(r.info.answer_leak for r in completions),
                     sum(r.info.reasoning_chars for r in completions), len(rewards_of), dead])
    total = max(sums[0], 1)
    names = ["reward_mean", "accuracy", "format_fail", "response_len", "truncated", "answer_leak",
             "reasoning_chars"]
    out = {k: v / total for k, v in zip(names, sums[1:8])}
    out.update(response_len_max=dist.max(max(lens, default=0)), completions=int(sums[0]),
               generated_tokens=int(sums[4]), zero_var_frac=sums[9] / max(sums[8], 1))
    return out


# ----------------------------------------------------------------------------- packing

@dataclass
class MicroBatch:
    completions: list[Completion]
    ids: torch.Tensor  # (N,) each prompt once, then its completions' responses, packed
    positions: torch.Tensor  # (N,) a response continues its prompt's positions
    cu_seqlens: torch.Tensor  # (S+1,) int32, the query tokens of each attention sequence
    max_seqlen: int
    select: torch.Tensor  # (R,) rows whose next token is a response token
    targets: torch.Tensor  # (R,) those response tokens
    lengths: list[int] = field(default_factory=list)  # response length of each completion
    attention: M.SharedPrefix | None = None  # None: no prompt is shared, plain causal packing
    temperature: float = 1.0  # the completions' sampling temperature, which log-probs divide by
    # Per response token, (R,) each, concatenated over the completions; None when they have none.
    sampler_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def _shares_prompt(r: Completion, previous: Completion | None) -> bool:
    """Whether r's prompt is the one just packed (the samples of a group are adjacent)."""
    return (previous is not None and len(r.response_ids) > 0
            and r.prompt_ids == previous.prompt_ids)


def micro_batches(completions: list[Completion], token_budget: int, device) -> list[MicroBatch]:
    """Greedy packing in order until the token budget (a shared prompt counted once); an
    over-long completion gets its own batch."""
    batches, current, size = [], [], 0
    for r in completions:
        shared = _shares_prompt(r, current[-1] if current else None)
        n = len(r.response_ids) + (0 if shared else len(r.prompt_ids))
        if current and size + n > token_budget:
            batches.append(current)
            current, size, n = [], 0, len(r.prompt_ids) + len(r.response_ids)
        current.append(r)
        size += n
    if current:
        batches.append(current)
    return [pack(b, device) for b in batches]


def _cat(tensors: list, device) -> torch.Tensor | None:
    if any(t is None for t in tensors):
        return None
    return torch.cat(tensors).float().to(device)


def pack(completions: list[Completion], device) -> MicroBatch:
    """One micro-batch. A completion whose prompt is its predecessor's adds only its response, at
    the positions after the prompt; it attends to the prompt's packed rows (kv_index), and its first
    token is predicted by the prompt's last row, the row that predicts every sibling's first."""
    temperatures = {r.temperature for r in completions}
    if len(temperatures) > 1:  # one temperature divides a micro-batch's logits
        raise ValueError(f"completions sampled at temperatures {sorted(temperatures)} in one batch")
    ids, positions, select, targets = [], [], [], []
    cu_q, cu_k, kv_index, prompt_rows, previous = [0], [0], [], [], None
    for r in completions:
        start, p, n = len(ids), len(r.prompt_ids), len(r.response_ids)
        if _shares_prompt(r, previous):
            ids += r.response_ids
            positions += range(p, p + n)
            kv_index += prompt_rows + list(range(start, start + n))
            select += [prompt_rows[-1], *range(start, start + n - 1)]
        else:
            ids += r.prompt_ids + r.response_ids
            positions += range(p + n)
            prompt_rows = list(range(start, start + p))
            kv_index += range(start, start + p + n)
            select += range(start + p - 1, start + p + n - 1)
        targets += r.response_ids
        cu_q.append(len(ids))
        cu_k.append(len(kv_index))
        previous = r
    max_q = max(b - a for a, b in zip(cu_q, cu_q[1:]))
    cu_q = torch.tensor(cu_q, dtype=torch.int32, device=device)
    attention = None
    if cu_k[-1] != len(ids):  # some prompt is shared
        attention = M.SharedPrefix(cu_q, max_q, torch.tensor(cu_k, dtype=torch.int32,
                                   device=device), max(b - a for a, b in zip(cu_k, cu_k[1:])),
                                   torch.tensor(kv_index, device=device))
    return MicroBatch(
        completions, torch.tensor(ids, device=device), torch.tensor(positions, device=device),
        cu_q, max_q, torch.tensor(select, device=device),
        torch.tensor(targets, device=device), [len(r.response_ids) for r in completions], attention,
        temperatures.pop(),
        sampler_logprobs=_cat([r.sampler_logprobs for r in completions], device),
        advantages=_cat([r.advantages for r in completions], device),
        old_logprobs=_cat([r.old_logprobs for r in completions], device),
        ref_logprobs=_cat([r.ref_logprobs for r in completions], device),
        values=_cat([r.values for r in completions], device),
        returns=_cat([r.returns for r in completions], device))


def sequence_mean(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """x (R,) per token -> (R,): every token holds the mean of its sequence's."""
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=x.device),
                                  torch.tensor(lengths, device=x.device))  # (R,) sequence index
    sums = torch.zeros(len(lengths), dtype=x.dtype, device=x.device).index_add(0, seq, x)
    return (sums / torch.tensor(lengths, dtype=x.dtype, device=x.device))[seq]


def dummy_batch(device) -> MicroBatch:
    """One token with every per-token field zero: a rank with fewer micro-batches runs these, at
    weight zero, so that every rank makes the same forwards and backwards (FSDP's collectives)."""
    zero = torch.zeros(1)
    return pack([Completion(None, -1, [0], [0], zero, "length", advantages=zero, old_logprobs=zero,
                            ref_logprobs=zero, values=zero, returns=zero)], device)


# ----------------------------------------------------------------------------- forwards

def logprobs(model, mb: MicroBatch, entropy: bool = False):
    """Per-response-token log-probs (R,) of mb's targets at the temperature they were sampled
    at, and entropies (R,) when asked."""
    return model(mb.ids, mb.positions, mb.cu_seqlens, mb.max_seqlen, attention=mb.attention,
                 select=mb.select, targets=mb.targets, temperature=mb.temperature,
                 entropy=entropy)


def values(critic, mb: MicroBatch) -> torch.Tensor:
    """The critic's value (R,) at each row that predicts a response token."""
    return critic(mb.ids, mb.positions, mb.cu_seqlens, mb.max_seqlen, attention=mb.attention,
                  select=mb.select)


@torch.no_grad()
def score(model, completions: list[Completion], args, dist: Dist) -> list[torch.Tensor]:
    """Each completion's per-response-token log-probs under `model` (a critic: its values), on the
    CPU. Every rank runs the same number of forwards."""
    critic = model.config.value_head
    mbs = micro_batches(completions, args.micro_tokens, dist.device)
    dummy = dummy_batch(dist.device)
    out = []  # on the device until all are done: one read, not one per micro-batch
    for i in range(dist.max(len(mbs))):
        mb = mbs[i] if i < len(mbs) else dummy
        per_token = values(model, mb) if critic else logprobs(model, mb)[0]
        if i < len(mbs):
            out.append(per_token.float())  # (R_i,)
    lengths = [len(r.response_ids) for r in completions]
    return list(torch.cat(out).cpu().split(lengths)) if out else []


# ----------------------------------------------------------------------------- update

def token_weights(lengths: list[int], mode: str, total_tokens: int, total_seqs: int,
                  max_new_tokens: int) -> torch.Tensor:
    """The weight of each token in the loss, so that summing over micro-batches and ranks gives the
    chosen aggregation exactly (total_* are global counts for the optimizer step)."""
    if mode == "token-mean":
        per_seq = [1.0 / total_tokens] * len(lengths)
    elif mode == "seq-mean-token-mean":
        per_seq = [1.0 / (n * total_seqs) for n in lengths]
    else:  # seq-mean-token-sum: Dr. GRPO's constant normaliser
        per_seq = [1.0 / (max_new_tokens * total_seqs)] * len(lengths)
    return torch.cat([torch.full((n,), w) for n, w in zip(lengths, per_seq)])


@dataclass
class Trainable:
    """A trained model (fp32 master weights, FSDP2-sharded) with its AdamW and LR schedule. In a
    checkpoint the policy's HF files sit at the top of step-N/, others in step-N/<name>/."""
    name: str
    module: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    lr: float  # the flag's: a resumed run's schedule follows it

    @classmethod
    def load(cls, name: str, path: str, lr: float, args, dist: Dist, value_head: bool = False):
        module = load_sharded(path, dist, torch.float32, value_head)
        module.gradient_checkpointing = args.grad_ckpt
        # fused: one kernel for every parameter's update on CUDA (the CPU keeps the default)
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=args.weight_decay,
                                fused=dist.device.type == "cuda" or None)
        total = args.steps * args.ppo_epochs * args.mini_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args, total))
        return cls(name, module, opt, schedule, lr)


def lr_lambda(args, total: int):
    def factor(i):
        if i < args.warmup_steps:
            return (i + 1) / args.warmup_steps
        if args.lr_schedule == "cosine":
            progress = (i - args.warmup_steps) / max(1, total - args.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    return factor


def update(part: Trainable, completions: list[Completion], loss_fn, args, dist: Dist,
           needs_forward=None) -> list[dict]:
    """--ppo-epochs passes over the completions, each in --mini-batches optimizer steps.
    loss_fn(mb, weights) -> (loss, {name: per-token tensor}); returns one dict per optimizer step:
    the loss and each statistic summed over the computed tokens of every rank, `tokens`,
    `skipped_tokens`, the learning rate the step used and the grad norm (absent when no rank
    computed a token: nothing was differentiated). needs_forward(completion) False: the
    completion cannot change the loss (GRPO: zero advantage and no KL or entropy term), so it gets
    no forward or backward, but still counts in the loss normaliser."""
    minis = [completions[i::args.mini_batches] for i in range(args.mini_batches)]
    steps = [optimizer_step(part, mini, loss_fn, args, dist, needs_forward)
             for _ in range(args.ppo_epochs) for mini in minis]
    return [s for s in steps if s is not None]


def optimizer_step(part: Trainable, completions: list[Completion], loss_fn, args, dist: Dist,
                   needs_forward=None) -> dict | None:
    """One optimizer step on `completions` (all ranks' together); None, with nothing changed, when
    no rank has any (e.g. --drop-zero-var dropped every group): AdamW would still decay weights."""
    computed = [r for r in completions if needs_forward is None or needs_forward(r)]
    tokens, seqs, skipped = dist.sum([sum(len(r.response_ids) for r in completions),
                                      len(completions),
                                      sum(len(r.response_ids) for r in completions)
                                      - sum(len(r.response_ids) for r in computed)])
    if seqs == 0:
        return None
    # Everything a micro-batch needs is on the device before the first forward, and its
    # statistics stay there: the host reads the device once per optimizer step (grad norm and
    # sums), so it never waits for a micro-batch to finish before queueing the next.
    mbs = micro_batches(computed, args.micro_tokens, dist.device)
    weights = [token_weights(mb.lengths, args.loss_agg, max(tokens, 1), max(seqs, 1),
                             args.max_new_tokens).to(dist.device) for mb in mbs]
    dummy = dummy_batch(dist.device)  # zero weight: keeps this rank's forwards and backwards
    zero = torch.zeros(1, device=dist.device)  # matched with the others'
    sums = {"loss": torch.zeros((), device=dist.device)}
    computed_tokens = sum(len(mb.targets) for mb in mbs)
    # At least one (dummy) micro-batch: with every completion skipped, zero gradients still make
    # AdamW take the step it would have taken (its moments decay), as without the skip.
    for i in range(max(dist.max(len(mbs)), 1)):
        real = i < len(mbs)
        loss, per_token = loss_fn(mbs[i] if real else dummy, weights[i] if real else zero)
        (loss * dist.world).backward()  # FSDP averages over ranks; the weights are global already
        sums["loss"] = sums["loss"] + loss.detach().float()
        for key, t in per_token.items():  # every rank adds every key: the all-reduce below matches
            sums[key] = sums.get(key, 0.0) + (t.detach().float().sum() if real else zero.sum())
    grad_norm = clip_grads(part.module, args.grad_clip)
    lr = part.opt.param_groups[0]["lr"]  # the rate this step uses; the schedule moves on below
    part.opt.step()
    part.sched.step()
    part.opt.zero_grad(set_to_none=True)
    totals = dist.sum(torch.stack([*sums.values(), torch.tensor(float(computed_tokens),
                                                                device=dist.device)]))
    out = dict(zip([*sums, "tokens"], totals), skipped_tokens=skipped, lr=lr)
    if out["tokens"] > 0:  # otherwise no rank ran a backward that could give a gradient
        out["grad_norm"] = grad_norm
    return out


def clip_grads(module, max_norm: float) -> float:
    limit = max_norm if max_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), limit)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# Per-token statistics that are 0 on a token the update skipped (its advantage is 0, so its ratio
# is never clipped): averaged over every response token in the loss, as verl and TRL report them.
ZERO_WHEN_SKIPPED = ("clip_frac",)
# Means "sampler vs trainer on the same weights" only in an update's first optimizer step.
FIRST_STEP_ONLY = ("logprob_gap",)
STEP_KEYS = ("loss", "tokens", "skipped_tokens", "grad_norm", "lr")  # optimizer_step's own


def policy_metrics(steps: list[dict]) -> dict:
    """An update's optimizer steps in one row: every per-token statistic the loss returned,
    averaged over the tokens the update computed (ZERO_WHEN_SKIPPED ones over every token in the
    loss; FIRST_STEP_ONLY ones over the first step); the loss and grad norm averaged over the
    steps; the skipped tokens; the first step's learning rate (the schedule moves on after each
    optimizer step). What no step computed (a statistic of no token, the grad norm without a
    backward) is absent, not 0. No steps: update_skipped."""
    if not steps:
        return dict(update_skipped=1)
    out = dict(loss=sum(s["loss"] for s in steps) / len(steps),
               skipped_tokens=sum(s["skipped_tokens"] for s in steps), lr=steps[0]["lr"])
    norms = [s["grad_norm"] for s in steps if "grad_norm" in s]
    if norms:
        out["grad_norm"] = sum(norms) / len(norms)
    for key in [k for k in steps[0] if k not in STEP_KEYS]:
        over = steps[:1] if key in FIRST_STEP_ONLY else steps
        skipped = sum(s["skipped_tokens"] for s in over) if key in ZERO_WHEN_SKIPPED else 0
        tokens = sum(s["tokens"] for s in over) + skipped
        if tokens > 0:
            out[key] = sum(s[key] for s in over) / tokens
    return out
