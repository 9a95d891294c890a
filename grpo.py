"""GRPO trainer: AlphaMed's recipe (Llama-3.1-8B-Instruct, boxed answer, binary reward, no SFT).

    torchrun --nproc_per_node 8 grpo.py --model meta-llama/Llama-3.1-8B-Instruct --out runs/alphamed
    python grpo.py --model tiny --data demo --out runs/demo          # CPU demo, a few minutes

One step: prompts -> G completions each (rollout.py, the policy's own weights) -> rewards
(reward.py) -> group-normalised advantages on every response token -> reference log-probs (only if
--kl-coef > 0) -> old log-probs (only if a batch feeds more than one optimizer step; otherwise the
ratio is exactly 1) -> clipped surrogate + per-token KL (+ entropy bonus) -> optimizer step(s)
over token-budget packed micro-batches.

Algorithmic choices and the flag that changes each:
  group size G                          --group-size (8)
  advantage (r - mean) / (std + eps)    --adv-norm std | none (Dr. GRPO: none)
  drop groups with one reward value     --drop-zero-var (their advantage is 0 anyway; they still
                                        count in the token normaliser unless dropped)
  clip range [1 - low, 1 + high]        --clip-low 0.2 --clip-high 0.2 (clip-higher: raise high)
  dual clip for negative advantages     --dual-clip 0 (off; verl applies 3.0 always)
  updates per rollout batch             --ppo-epochs 1 --mini-batches 1
  KL to the reference, in the loss      --kl-coef 0.001 --kl-estimator k1 | k2 | k3 (k3 default);
                                        0 loads no reference model at all. As a loss term k1's
                                        expected gradient is zero (it regularises nothing), k2's
                                        is the true gradient of KL(pi || ref), k3's (verl's
                                        "low_var_kl") is that of KL(ref || pi): biased, low variance.
                                        k3 follows the recipe; k2 for the exact KL gradient
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

AlphaMed defaults: the paper states Llama-3.1-8B-Instruct, MedQA train + difficulty-mixed MedMCQA
train (19,178 questions), batch 512 prompts, 300 steps, binary boxed reward, verl's GRPO. It does
not state G, lr, KL, clip, temperature or length. We use verl's defaults and GRPO example scripts
for lr 1e-6, KL in the loss with k3 ("low_var_kl") at 0.001, clip 0.2 and temperature 1.0; G = 8
is TRL's default number of generations (verl's GRPO example scripts use 5); 2048 new tokens
(ample for MCQA reasoning). Activation checkpointing is on (--no-grad-ckpt turns it off).

Memory arithmetic for the default recipe on 8 x 80 GB: README.md, "Memory".
"""
import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import evaluate
import model as M
import reward
import rollout
from reward import RewardInfo


# `--model tiny` (the CPU demo) starts from these defaults instead; flags given still win, and
# `--model tiny --help` shows them.
TINY_DEFAULTS = dict(data="demo", batch_prompts=16, group_size=16, max_new_tokens=8, lr=1e-3,
                     warmup_steps=0, kl_coef=0.0, steps=200, micro_tokens=4096, save_every=50,
                     samples_every=10, grad_ckpt=False)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default after its help."""


def build_parser(doc: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    # model and data
    p.add_argument("--model", default="meta-llama/Llama-3.1-8B-Instruct", help="HF id, local dir, or 'tiny' (random-init, CPU demo)")
    p.add_argument("--data", default="medqa_train,medmcqa_train", help="comma-separated data.py names (or 'demo'); NAME=PATH reads a local raw file")
    p.add_argument("--pass-rates", default=None, help="JSONL of per-question pass rates (evaluate.py --passk) for the difficulty mix")
    p.add_argument("--mix", default="easy:3000,medium:3000,hard:3000", help="difficulty mix drawn from --mix-source when --pass-rates is given")
    p.add_argument("--mix-source", default="medmcqa_train", help="which --data source the difficulty mix subsamples")
    p.add_argument("--mix-size", type=int, default=9000, help="without --pass-rates: a uniform random subset of --mix-source of this size (0 = all)")
    p.add_argument("--prompt-style", default="alphamed", choices=["alphamed", "medrlvr"], help="prompt template (data.build_messages)")
    p.add_argument("--shuffle-options", action="store_true", help="shuffle answer options each time a question is used")
    p.add_argument("--val-size", type=int, default=0, help="hold out this many training questions for greedy validation")
    p.add_argument("--val-every", type=int, default=0, help="validate every N steps (0 = never)")
    # rollout
    p.add_argument("--batch-prompts", type=int, default=512, help="prompts per step, all ranks together")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="completion length cap")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, also used in training log-probs")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--max-cache-tokens", type=int, default=262144, help="KV-cache budget per rank, in tokens")
    # objective
    p.add_argument("--format", default="boxed", choices=reward.FORMATS, help="answer format the reward parses")
    p.add_argument("--reward-values", default="1,0,0", help="reward for correct,wrong,bad-format (Med-RLVR: 1,0,-1)")
    p.add_argument("--clip-low", type=float, default=0.2, help="ratio clip below 1 - clip_low")
    p.add_argument("--clip-high", type=float, default=0.2, help="ratio clip above 1 + clip_high (clip-higher: > clip_low)")
    p.add_argument("--dual-clip", type=float, default=0.0, help="dual-clip constant c > 1 for negative advantages (0 = off)")
    p.add_argument("--kl-coef", type=float, default=0.001, help="per-token KL penalty to the reference (GRPO: in the loss; PPO: in the reward; 0 = no reference model)")
    p.add_argument("--kl-estimator", default="k3", choices=["k1", "k2", "k3"], help="KL estimator")
    p.add_argument("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"], help="how per-token losses are averaged")
    p.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus coefficient")
    # optimisation
    p.add_argument("--steps", type=int, default=300, help="training steps (rollout batches)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    p.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per pass")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warmup, in optimizer steps")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"], help="after warmup")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = off)")
    p.add_argument("--micro-tokens", type=int, default=16384, help="token budget of one packed training micro-batch")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing per block (an 8B update at --micro-tokens 16384 keeps "
                        "~4 GB of activations with it, ~106 GB without: bench/activations.py)")
    # run
    p.add_argument("--out", default="runs/grpo", help="output dir: checkpoints, metrics.jsonl, samples.jsonl")
    p.add_argument("--seed", type=int, default=0, help="one seed for data order, sampling and init")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", default=None, help="checkpoint dir to resume from, or 'auto' (latest in --out)")
    p.add_argument("--samples-every", type=int, default=10, help="write a few completions every N steps")
    p.add_argument("--wandb-project", default=None, help="log to wandb (offline without WANDB_API_KEY)")
    return p


def wants_tiny(argv) -> bool:
    """--model tiny given? (Looked up before the real parse, so --help shows the demo defaults.)"""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    return pre.parse_known_args(argv)[0].model == "tiny"


def get_args(argv=None):
    p = build_parser()
    p.add_argument("--adv-norm", default="std", choices=["std", "none"], help="divide group-centred rewards by the group std (none = Dr. GRPO)")
    p.add_argument("--drop-zero-var", action="store_true", help="drop groups whose completions all got the same reward")
    if wants_tiny(argv):
        p.set_defaults(**TINY_DEFAULTS)
    args = p.parse_args(argv)
    check_args(p, args)
    if args.group_size < 2:
        p.error(f"--group-size {args.group_size}: GRPO needs >= 2 completions per prompt")
    return args


def check_args(p: argparse.ArgumentParser, args):
    """One clear error naming the flag, before any model is loaded."""
    try:
        args.reward_values = reward.RewardValues(*map(float, args.reward_values.split(",")))
    except (TypeError, ValueError):
        p.error(f"--reward-values {args.reward_values!r}: need three numbers correct,wrong,bad-format")
    rules = [("--group-size", args.group_size >= 1, "must be >= 1"),
             ("--temperature", args.temperature > 0, "must be > 0 (it divides the training logits)"),
             ("--top-p", 0 < args.top_p <= 1, "must be in (0, 1]"),
             ("--batch-prompts", args.batch_prompts >= 1, "must be >= 1"),
             ("--max-new-tokens", args.max_new_tokens >= 1, "must be >= 1"),
             ("--clip-low", 0 < args.clip_low < 1, "must be in (0, 1)"),
             ("--clip-high", args.clip_high > 0, "must be > 0"),
             ("--dual-clip", args.dual_clip == 0 or args.dual_clip > 1, "must be 0 (off) or > 1"),
             ("--kl-coef", args.kl_coef >= 0, "must be >= 0"),
             ("--ppo-epochs", args.ppo_epochs >= 1, "must be >= 1"),
             ("--mini-batches", 1 <= args.mini_batches <= args.batch_prompts * args.group_size,
              "must be between 1 and the number of completions per step"),
             ("--save-every", args.save_every >= 1, "must be >= 1"),
             ("--keep-last", args.keep_last >= 1, "must be >= 1")]
    for flag, ok, why in rules:
        if not ok:
            p.error(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: {why}")


# ----------------------------------------------------------------------------- the math

def group_advantages(rewards: torch.Tensor, norm: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): centred per group, divided by the group std if asked."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if norm == "std":
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return adv


# exp() of a log-ratio beyond this overflows float32 or makes the loss astronomically large: clamp
# first (verl and OpenRLHF clamp at +-20 too). Tokens beyond it get no gradient from the term.
LOG_RATIO_BOUND = 20.0


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, r = log pi - log pi_ref.

    k1 = r: unbiased value, but as a loss term its expected gradient is zero (E_pi[grad log pi] = 0),
    so it regularises nothing; use it in a reward (PPO), not in a loss.
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


def clipped_surrogate(logp, old_logp, adv, clip_low, clip_high, dual_clip=0.0):
    """PPO's pessimistic clipped policy loss per token, and where clipping was active."""
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    loss_plain = -adv * ratio
    loss_clip = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(loss_plain, loss_clip)
    if dual_clip > 0:  # bound the loss of a negative advantage when the ratio explodes
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss, (loss_clip > loss_plain).float()


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


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """All-reduce a list of floats (one collective, same length on every rank)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        t = torch.tensor([value], device=self.device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup_dist() -> Dist:
    """torchrun sets WORLD_SIZE/RANK; NCCL on CUDA, gloo on CPU. Plain `python` is one rank."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        if not cuda:
            return Dist()
        # One GPU without torchrun: a one-rank group, so FSDP2's bf16 mixed precision still applies.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(rank, dist.get_world_size(), device)


def shard(module: torch.nn.Module, d: Dist):
    """FSDP2: each block, then the root. bf16 compute and fp32 gradient reduction on CUDA."""
    if not dist.is_initialized():  # plain CPU process
        return module.to(d.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if d.device.type == "cuda" else MixedPrecisionPolicy()
    for block in module.model.layers:
        fully_shard(block, mp_policy=mp)
    return fully_shard(module, mp_policy=mp)


def load_sharded(path: str, d: Dist, dtype: torch.dtype, value_head: bool = False):
    """A model from an HF checkpoint, FSDP2-sharded, with one host copy of the weights: every rank
    builds it on the meta device, shards it and allocates only its own shards; rank 0 reads the
    checkpoint and broadcasts it tensor by tensor, each rank keeping its slice. Host memory holds
    one copy of the checkpoint (rank 0's); each device its shards plus one tensor in flight."""
    if not dist.is_initialized():
        return M.load_model(path, d.device, dtype, value_head=value_head)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    model, path, head_new = M.build_model(path, value_head, dtype)
    state, error = {}, [None]
    if d.main:
        try:
            state = M.read_weights(model, path, head_new)
        except (OSError, ValueError) as e:  # every rank raises it, none waits in a broadcast
            error = [e]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]
    shard(model, d)
    model.to_empty(device=d.device)
    # strict=False: a tied lm_head has no key of its own; read_weights has checked every key.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, state, options=options)
    return M.finish_loading(model, path, d.device)


class Unsharded:
    """Context: all FSDP parameters gathered and kept so for generation (no collectives inside,
    so ranks may decode different numbers of steps); resharded on exit."""

    def __init__(self, module):
        from torch.distributed.fsdp import FSDPModule
        self.module = module
        self.fsdp = [m for m in module.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        for m in self.fsdp:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        return self.module

    def __exit__(self, *exc):
        for m in self.fsdp:
            m.reshard()
            m.set_reshard_after_forward(m is not self.module, recurse=False)  # root: FSDP's default


# ----------------------------------------------------------------------------- rollouts

@dataclass
class Rollout:
    """One completion and everything the update needs."""
    question: data.Question
    prompt_ids: list[int]
    response_ids: list[int]
    sampler_logprobs: list[float]
    finish_reason: str
    text: str = ""
    reward: float = 0.0
    info: RewardInfo | None = None
    advantage: float | torch.Tensor = 0.0  # GRPO: one per sequence; PPO: one per token
    old_logprobs: torch.Tensor | None = None  # only when a batch is reused
    ref_logprobs: torch.Tensor | None = None  # only when --kl-coef > 0
    values: torch.Tensor | None = None  # PPO: the critic's value before each response token
    returns: torch.Tensor | None = None  # PPO: GAE returns, the value targets


def collect_rollouts(policy, tok, questions, args, step, d: Dist, prompt_offset: int):
    """Sample --group-size completions per question (prompt-major) and score them."""
    prompts = [data.encode_prompt(tok, q, args.prompt_style) for q in questions]
    with Unsharded(policy) as m:
        samples = rollout.generate(
            m, prompts, n=args.group_size, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, stop_ids=rollout.stop_ids_for(m, tok),
            seed=args.seed * 1_000_003 + step, prompt_offset=prompt_offset,
            max_cache_tokens=args.max_cache_tokens, progress=d.main)
    rollouts = []
    for s in samples:
        q = questions[s.prompt_idx]
        text = tok.decode(s.response_ids, skip_special_tokens=True)
        r, info = reward.score(text, q, args.format, args.reward_values)
        rollouts.append(Rollout(q, s.prompt_ids, s.response_ids, s.logprobs, s.finish_reason,
                                text, r, info))
    return rollouts


def set_group_advantages(rollouts: list[Rollout], args) -> torch.Tensor:
    """GRPO: each completion's advantage from its group; returns which groups have no signal."""
    rewards = torch.tensor([r.reward for r in rollouts]).view(-1, args.group_size)  # (P, G)
    for r, a in zip(rollouts, group_advantages(rewards, args.adv_norm).flatten().tolist()):
        r.advantage = a
    return rewards.max(dim=1).values == rewards.min(dim=1).values  # (P,)


# ----------------------------------------------------------------------------- packed passes

@dataclass
class MicroBatch:
    items: list[Rollout]
    ids: torch.Tensor  # (N,) prompt + response tokens of every item, packed
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    select: torch.Tensor  # (R,) rows whose next token is a response token
    targets: torch.Tensor  # (R,) those response tokens
    lengths: list[int] = field(default_factory=list)  # response length of each item


def micro_batches(items: list[Rollout], token_budget: int, device) -> list[MicroBatch]:
    """Greedy packing in order until the token budget; an over-long item gets its own batch."""
    groups, cur, size = [], [], 0
    for it in items:
        n = len(it.prompt_ids) + len(it.response_ids)
        if cur and size + n > token_budget:
            groups.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    if cur:
        groups.append(cur)
    return [_pack(g, device) for g in groups]


def _pack(items: list[Rollout], device) -> MicroBatch:
    seqs = [it.prompt_ids + it.response_ids for it in items]
    ids, pos, cu, max_seqlen = M.pack(seqs, device)
    select, targets = [], []
    for it, start in zip(items, cu[:-1].tolist()):
        first = start + len(it.prompt_ids) - 1  # the row that predicts the first response token
        select += range(first, first + len(it.response_ids))
        targets += it.response_ids
    return MicroBatch(items, ids, pos, cu, max_seqlen, torch.tensor(select, device=device),
                      torch.tensor(targets, device=device), [len(it.response_ids) for it in items])


def dummy_batch(device) -> MicroBatch:
    """Zero-weight stand-in so every rank runs the same number of forwards/backwards under FSDP."""
    zero = torch.zeros(1)
    fake = Rollout(None, [0], [0], [0.0], "length", ref_logprobs=zero, values=zero, returns=zero)
    return _pack([fake], device)


def logprobs(model, mb: MicroBatch, temperature: float, entropy: bool = False):
    return model(mb.ids, mb.positions, mb.cu_seqlens, mb.max_seqlen, select=mb.select,
                 targets=mb.targets, temperature=temperature, entropy=entropy)


@torch.no_grad()
def score_tokens(model, items: list[Rollout], args, d: Dist, attr: str):
    """Fill items[i].<attr> with per-response-token log-probs under `model` (reference or old
    policy), or values when `model` is a critic. Every rank runs the same number of forwards."""
    mbs = micro_batches(items, args.micro_tokens, d.device)
    for i in range(d.max(len(mbs))):
        mb = mbs[i] if i < len(mbs) else dummy_batch(d.device)
        out = logprobs(model, mb, args.temperature)
        out = out[0] if isinstance(out, tuple) else out  # (log-probs, entropy) or values
        for it, chunk in zip(mb.items, out.float().split(mb.lengths)):
            setattr(it, attr, chunk.cpu())


# ----------------------------------------------------------------------------- update

def update(part: "Part", items: list[Rollout], args, d: Dist, loss_fn) -> dict:
    """--ppo-epochs passes over the batch, each in --mini-batches optimizer steps. loss_fn(mb,
    total_tokens, total_seqs, real, first) -> (loss, stats) for one micro-batch. Returns the stats
    summed over micro-batches and ranks, the mean grad norm and the learning rate."""
    stats, grad_norms, module = {}, [], part.module
    minis = [items[i::args.mini_batches] for i in range(args.mini_batches)]
    for epoch in range(args.ppo_epochs):
        for k, mini in enumerate(minis):
            tot_tokens, tot_seqs = d.sum([sum(len(r.response_ids) for r in mini), len(mini)])
            mbs = micro_batches(mini, args.micro_tokens, d.device)
            n_mb = d.max(len(mbs))
            for i in range(n_mb):
                real = i < len(mbs)
                mb = mbs[i] if real else dummy_batch(d.device)
                first = epoch == 0 and k == 0  # weights still equal the sampler's
                loss, s = loss_fn(mb, max(tot_tokens, 1), max(tot_seqs, 1), real, first)
                (loss * d.world).backward()  # FSDP averages over ranks; the weights already do
                for key, v in s.items():
                    stats[key] = stats.get(key, 0.0) + v
            grad_norms.append(clip_grads(module, args.grad_clip))
            part.opt.step()
            part.sched.step()
            part.opt.zero_grad(set_to_none=True)
    stats = dict(zip(stats, d.sum(list(stats.values()))))
    return dict(stats, grad_norm=sum(grad_norms) / len(grad_norms), lr=part.sched.get_last_lr()[0])


def per_token(mb: MicroBatch, attr: str, device) -> torch.Tensor:
    """An item field (a number per sequence, or a list/tensor per token) laid out per token."""
    return torch.cat([torch.as_tensor(getattr(it, attr), dtype=torch.float32).expand(n)
                      for it, n in zip(mb.items, mb.lengths)]).to(device)


def policy_loss(policy, mb: MicroBatch, tot_tokens, tot_seqs, real: bool, first: bool, *, args,
                kl_coef: float):
    """Clipped surrogate (+ kl_coef * KL to the reference, - entropy bonus) for one micro-batch,
    weighted per --loss-agg; and its statistics, summed."""
    lp, ent = logprobs(policy, mb, args.temperature, entropy=True)
    w = token_weights(mb.lengths, args.loss_agg, tot_tokens, tot_seqs, args.max_new_tokens)
    w = w.to(lp.device) * float(real)
    old = per_token(mb, "old_logprobs", lp.device) if mb.items[0].old_logprobs is not None \
        else lp.detach()  # one update per batch: the ratio is exactly 1
    adv = per_token(mb, "advantage", lp.device)
    pg, clipped = clipped_surrogate(lp, old, adv, args.clip_low, args.clip_high, args.dual_clip)
    loss_tok = pg - args.entropy_coef * ent
    kl = torch.zeros_like(lp)
    if kl_coef > 0:
        kl = kl_estimate(lp, per_token(mb, "ref_logprobs", lp.device), args.kl_estimator)
        loss_tok = loss_tok + kl_coef * kl
    loss = (loss_tok * w).sum()
    mask = torch.full_like(lp, float(real))
    s = dict(loss=loss.item(), kl=(kl * mask).sum().item(), clip_frac=(clipped * mask).sum().item(),
             entropy=(ent * mask).sum().item(), tokens=mask.sum().item(), gap=0.0, gap_tokens=0.0)
    if first and real:  # sampler vs trainer log-probs on the same weights
        s["gap"] = (lp.detach() - per_token(mb, "sampler_logprobs", lp.device)).abs().sum().item()
        s["gap_tokens"] = float(len(lp))
    return loss, s


def policy_metrics(s: dict, args) -> dict:
    n = max(s["tokens"], 1)
    return dict(loss=s["loss"] / (args.ppo_epochs * args.mini_batches), kl=s["kl"] / n,
                clip_frac=s["clip_frac"] / n, entropy=s["entropy"] / n, grad_norm=s["grad_norm"],
                logprob_gap=s["gap"] / max(s["gap_tokens"], 1), lr=s["lr"])


def clip_grads(model, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def lr_lambda(args, total: int):
    def f(i):
        if i < args.warmup_steps:
            return (i + 1) / args.warmup_steps
        if args.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (i - args.warmup_steps) / max(1, total - args.warmup_steps)))
        return 1.0
    return f


# ----------------------------------------------------------------------------- checkpoints

@dataclass
class Part:
    """A trained module with its optimizer and LR schedule. In a checkpoint the policy's HF files
    sit at the top of the step dir, any other part's (PPO's critic) in a sub-dir of its name."""
    module: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler


def save_checkpoint(parts: dict[str, Part], tok, step: int, args, d: Dist, extra=None) -> str:
    """out/step-N/: HF model files (evaluate.py, transformers, vLLM) + resume/ (sharded training
    state of every part) + rng-R.pt per rank. Written to step-N.tmp, renamed when complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_state_dict)
    final = os.path.join(args.out, f"step-{step:06d}")
    tmp = final + ".tmp"
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    state = {}
    for name, part in parts.items():
        full = get_model_state_dict(part.module, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
        if d.main:
            M.save_model(part.module, tok, tmp if name == "policy" else os.path.join(tmp, name),
                         state_dict={k: v.to(dtype) for k, v in full.items()})
        state[f"{name}.model"], state[f"{name}.optim"] = get_state_dict(part.module, part.opt)
    d.barrier()
    dcp.save(state, checkpoint_id=os.path.join(tmp, "resume"))
    torch.save(rng_state(), os.path.join(tmp, f"rng-{d.rank}.pt"))
    if d.main:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(dict(step=step, schedulers={n: p.sched.state_dict() for n, p in parts.items()},
                           extra=extra or {},
                           args=vars(args) | dict(reward_values=list(vars(args.reward_values).values()))),
                      f, indent=1)
    d.barrier()
    if d.main:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in sorted(checkpoints(args.out))[:-args.keep_last]:
            shutil.rmtree(old)
    d.barrier()
    return final


def checkpoints(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    return [os.path.join(out, n) for n in os.listdir(out) if n.startswith("step-") and not n.endswith(".tmp")]


def load_checkpoint(path: str, parts: dict[str, Part], d: Dist) -> tuple[int, dict]:
    """Restore weights, optimizers, schedules and RNG from save_checkpoint's dir; returns the step
    and the trainer's `extra` state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if not os.path.exists(os.path.join(path, "trainer_state.json")):
        raise FileNotFoundError(f"--resume {path}: not a checkpoint (no trainer_state.json)")
    state = {}
    for name, part in parts.items():
        state[f"{name}.model"], state[f"{name}.optim"] = get_state_dict(part.module, part.opt)
    dcp.load(state, checkpoint_id=os.path.join(path, "resume"))
    with open(os.path.join(path, "trainer_state.json")) as f:
        meta = json.load(f)
    for name, part in parts.items():
        set_state_dict(part.module, part.opt, model_state_dict=state[f"{name}.model"],
                       optim_state_dict=state[f"{name}.optim"])
        part.sched.load_state_dict(meta["schedulers"][name])
    rng_file = os.path.join(path, f"rng-{d.rank}.pt")
    if not os.path.exists(rng_file):
        raise FileNotFoundError(f"{rng_file} missing: resume with the world size the run was saved with")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return meta["step"], meta["extra"]


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s["cuda"] is not None:
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------- data and logging

def load_questions(args, d: Dist):
    """Training questions (deduplicated, benchmark overlap removed, mixed) and a held-out slice."""
    if args.data == "demo":
        qs = data.load_benchmark("demo")
    else:
        sources = {}
        for spec in args.data.split(","):
            name, _, path = spec.partition("=")
            sources[name] = data.load_benchmark(name, path or None)
        if args.mix_source in sources:
            sources[args.mix_source] = subsample(sources[args.mix_source], args, d)
        exclude = [data.load_benchmark(n) for n in ("medqa", "medmcqa")]  # their test/dev splits
        qs = data.build_train_set(list(sources.values()), exclude=exclude)
    qs = [qs[i] for i in np.random.default_rng(args.seed).permutation(len(qs))]
    val, train = qs[:args.val_size], qs[args.val_size:]
    if len(train) < 1:
        raise ValueError(f"--data {args.data}: no training questions left after --val-size {args.val_size}")
    return train, val


def subsample(qs, args, d: Dist):
    if args.pass_rates:
        return data.difficulty_mix(qs, args.pass_rates, args.mix, seed=args.seed)
    if args.mix_size and args.mix_size < len(qs):
        if d.main:
            print(f"note: no --pass-rates, so {args.mix_source} is a uniform random {args.mix_size}; "
                  f"run `python evaluate.py {args.model} --passk 4 --benchmarks {args.mix_source}` "
                  f"for AlphaMed's difficulty mix")
        return [qs[i] for i in sorted(np.random.default_rng(args.seed).permutation(len(qs))[:args.mix_size])]
    return qs


def step_questions(train, step: int, args, d: Dist):
    """This rank's prompts for a step: a seeded permutation per epoch, read in order (so the data
    position is a function of the step), split evenly over ranks. Returns (questions, offset)."""
    per_rank = args.batch_prompts // d.world
    first = step * args.batch_prompts + d.rank * per_rank  # global index of our first prompt
    out = []
    for g in range(first, first + per_rank):
        epoch, i = divmod(g, len(train))
        q = train[np.random.default_rng([args.seed, epoch]).permutation(len(train))[i]]
        if args.shuffle_options:
            q = data.shuffle_options(q, random.Random(args.seed * 1_000_003 + g))
        out.append(q)
    return out, d.rank * per_rank


class Logger:
    """metrics.jsonl (one JSON object per step), samples.jsonl, wandb if configured; rank 0 only."""

    def __init__(self, args, d: Dist):
        self.on = d.main
        self.wandb = None
        if self.on:
            os.makedirs(args.out, exist_ok=True)
            self.metrics = open(os.path.join(args.out, "metrics.jsonl"), "a")
            self.samples = open(os.path.join(args.out, "samples.jsonl"), "a")
            if args.wandb_project:
                import wandb
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
                self.wandb = wandb.init(project=args.wandb_project, config=vars(args), mode=mode,
                                        dir=args.out)

    def log(self, step: int, metrics: dict, rollouts=None):
        if not self.on:
            return
        self.metrics.write(json.dumps(dict(step=step, **metrics)) + "\n")
        self.metrics.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)
        for r in rollouts or []:
            self.samples.write(json.dumps(dict(step=step, question=r.question.id, reward=r.reward,
                                               completion=r.text)) + "\n")
        self.samples.flush()


# ----------------------------------------------------------------------------- the loop

def rollout_metrics(rollouts: list[Rollout], d: Dist) -> dict:
    """Means over every rank's completions (one all-reduce), plus the longest response."""
    n = len(rollouts)
    lens = [len(r.response_ids) for r in rollouts]
    sums = d.sum([n, sum(r.reward for r in rollouts), sum(r.info.correct for r in rollouts),
                  sum(not r.info.format_ok for r in rollouts), sum(lens),
                  sum(r.finish_reason == "length" for r in rollouts),
                  sum(r.info.answer_leak for r in rollouts), sum(r.info.reasoning_chars for r in rollouts)])
    total = max(sums[0], 1)
    names = ["reward_mean", "accuracy", "format_fail", "response_len", "truncated", "answer_leak",
             "reasoning_chars"]
    out = {k: v / total for k, v in zip(names, sums[1:])}
    out["response_len_max"] = d.max(max(lens, default=0))
    return out


@torch.no_grad()
def validate(policy, tok, val, args, d: Dist) -> dict:
    """Greedy accuracy and format failures on the held-out questions, through evaluate.py with the
    training prompt and format. Every rank gathers the weights, even one with no questions."""
    greedy = argparse.Namespace(**{**vars(args), "k": 1, "temperature": 0.0})
    with Unsharded(policy) as m:
        generate_fn = evaluate.rollout_generate_fn(m, tok, greedy, progress=False)
        res, _ = evaluate.evaluate_benchmark(val, generate_fn, args.format, d.rank, d.world)
    return {} if res is None else dict(val_accuracy=res["accuracy"],
                                       val_format_fail=res["format_failure_rate"])


def train_step(policy: Part, ref, tok, train, step: int, args, d: Dist) -> tuple[dict, list]:
    t0 = time.perf_counter()
    questions, offset = step_questions(train, step, args, d)
    rollouts = collect_rollouts(policy.module, tok, questions, args, step, d, offset)
    zero_var = set_group_advantages(rollouts, args)
    metrics = rollout_metrics(rollouts, d)
    metrics["zero_var_frac"] = d.sum([zero_var.float().mean().item()])[0] / d.world
    items = [r for i, r in enumerate(rollouts) if not (args.drop_zero_var and zero_var[i // args.group_size])]
    t1 = time.perf_counter()
    if ref is not None:
        score_tokens(ref, items, args, d, "ref_logprobs")
    t2 = time.perf_counter()
    if args.ppo_epochs * args.mini_batches > 1:
        score_tokens(policy.module, items, args, d, "old_logprobs")
    t3 = time.perf_counter()
    loss_fn = partial(policy_loss, policy.module, args=args, kl_coef=args.kl_coef)
    metrics.update(policy_metrics(update(policy, items, args, d, loss_fn), args))
    t4 = time.perf_counter()
    gen_tokens = d.sum([sum(len(r.response_ids) for r in rollouts)])[0]
    metrics.update(time_rollout=t1 - t0, time_reference=t2 - t1, time_old=t3 - t2, time_update=t4 - t3,
                   rollout_tokens_per_s=gen_tokens / (t1 - t0), step_time=t4 - t0)
    return metrics, rollouts


def model_path(args, d: Dist, name: str | None = None) -> str:
    """A local dir for `name` (default --model): 'tiny' is written once into --out; hub ids are
    downloaded on rank 0 first."""
    name = name or args.model
    if name == "tiny":
        path = os.path.join(args.out, "tiny-init")
        if d.main and not os.path.exists(os.path.join(path, "config.json")):
            from tiny import make_tiny_checkpoint
            make_tiny_checkpoint(path, "llama", seed=args.seed)
        d.barrier()
        return path
    if d.main:
        M.resolve(name)
    d.barrier()
    return M.resolve(name)


def setup(args):
    """Process group, seeds, model dir and tokenizer: what every entry point starts with."""
    d = setup_dist()
    if args.batch_prompts % d.world:
        raise ValueError(f"--batch-prompts {args.batch_prompts} must be a multiple of the {d.world} ranks")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    from transformers import AutoTokenizer
    path = model_path(args, d)
    return d, path, AutoTokenizer.from_pretrained(path)


def make_part(path: str, args, d: Dist, lr: float, value_head: bool = False) -> Part:
    """A trainable model (fp32 master weights, FSDP2-sharded) with AdamW and the LR schedule."""
    module = load_sharded(path, d, torch.float32, value_head)
    module.gradient_checkpointing = args.grad_ckpt
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=args.weight_decay)
    total = args.steps * args.ppo_epochs * args.mini_batches
    return Part(module, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args, total)))


def load_reference(path: str, d: Dist):
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    return load_sharded(path, d, dtype).requires_grad_(False)


def run(args, d: Dist, parts: dict[str, Part], tok, val, step_fn, name: str, extra=None):
    """The outer loop: resume, steps, validation, logging, checkpoints. step_fn(step) -> (metrics,
    rollouts); `extra` is a dict of trainer state that step_fn updates, saved and restored too."""
    start, extra = 0, {} if extra is None else extra
    if not args.resume and os.path.exists(os.path.join(args.out, "metrics.jsonl")):
        raise FileExistsError(f"--out {args.out} already holds a run: pass --resume auto to continue "
                              f"it, or choose another --out")
    d.barrier()  # every rank has looked before rank 0's Logger creates metrics.jsonl
    if args.resume:
        found = sorted(checkpoints(args.out)) if args.resume == "auto" else [args.resume]
        if found:
            start, saved = load_checkpoint(found[-1], parts, d)
            extra.update(saved)
    logger = Logger(args, d)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=name, disable=not d.main)
    for step in bar:
        metrics, rollouts = step_fn(step)
        if args.val_every and (step + 1) % args.val_every == 0 and val:
            metrics.update(validate(parts["policy"].module, tok, val, args, d))
        show = rollouts[:2] if args.samples_every and step % args.samples_every == 0 else None
        logger.log(step + 1, metrics, show)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                        len=f"{metrics['response_len']:.0f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(parts, tok, step + 1, args, d, extra)
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None):
    args = get_args(argv)
    d, path, tok = setup(args)
    policy = make_part(path, args, d, args.lr)
    ref = load_reference(path, d) if args.kl_coef > 0 else None  # KL 0: no reference at all
    train, val = load_questions(args, d)
    run(args, d, {"policy": policy}, tok, val,
        lambda step: train_step(policy, ref, tok, train, step, args, d), "grpo")


if __name__ == "__main__":
    main()
