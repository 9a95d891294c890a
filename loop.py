"""The outer run shared by grpo.py and ppo.py: flags, setup, data order, validation, logging;
checkpoints and resume through checkpoint.py. The step itself is the algorithm's, in grpo.py /
ppo.py:

    run = loop.Run(args, "grpo")          # processes, seeds, tokenizer, questions, --out
    policy = run.trainable("policy", run.model_dir, args.lr)
    for step in run.steps():               # resumes from a checkpoint when asked
        metrics, rollouts = train_step(step, policy, ...)
        run.end_step(step, metrics, rollouts)   # validate, log, checkpoint

A run says what it does: the resolved flags (printed, and in --out/run_config.json), the memory
plan, every file it writes and every checkpoint saved. Bad flags and data fail before any model
loads; checkpoint.py's checks on --out and --resume too.
"""
import argparse
import atexit
import json
import os
import random

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import data
import evaluate
import memory
import model as M
import reward
import rollout
from parallel import Gathered, load_sharded, setup_dist
from rl import Trainable

# `--model tiny` (the CPU demo) starts from these defaults instead; flags given still win, and
# `--model tiny --help` shows them.
TINY_DEFAULTS = dict(data="demo", batch_prompts=16, n=16, max_new_tokens=8, lr=1e-3,
                     warmup_steps=0, kl_coef=0.0, steps=200, micro_tokens=4096, save_every=50,
                     samples_every=10, grad_ckpt=False)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default after its help."""


def build_parser(doc: str) -> argparse.ArgumentParser:
    """The flags both trainers take, in --help sections; each entry script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    for add_flags in (_data_flags, _rollout_flags, _objective_flags, _optimisation_flags,
                      _run_flags):
        add_flags(p)
    return p


def _data_flags(p):
    add = p.add_argument_group("model and data").add_argument
    add("--model", default="meta-llama/Llama-3.1-8B-Instruct",
        help="HF id, local dir, or 'tiny' (random-init, CPU demo)")
    add("--data", default="medqa_train,medmcqa_train",
        help="comma-separated data.py names (or 'demo'); NAME=PATH reads a local raw file")
    add("--data-dir", default=None,
        help="folder of raw benchmark files laid out as ../shared/data: every name in --data and "
             "--exclude is read from it, not from the hub (offline training)")
    add("--exclude", default="medqa,medmcqa",
        help="benchmarks whose questions are removed from training (default: the MedQA test and "
             "MedMCQA dev sets the recipe evaluates on); 'none' keeps everything")
    add("--pass-rates", default=None,
        help="JSONL of per-question pass rates (evaluate.py --pass-rates) for the difficulty mix")
    add("--mix", default="easy:3000,medium:3000,hard:3000",
        help="difficulty mix drawn from --mix-source when --pass-rates is given")
    add("--mix-source", default="medmcqa_train",
        help="which --data source the difficulty mix subsamples")
    add("--mix-size", type=int, default=9000,
        help="without --pass-rates: a uniform random subset of --mix-source of this size (0 = all)")
    add("--prompt-style", default="alphamed", choices=["alphamed", "medrlvr"],
        help="prompt template (data.build_messages)")
    add("--shuffle-options", action="store_true",
        help="shuffle answer options each time a question is used")
    add("--val-size", type=int, default=0,
        help="hold out this many training questions for greedy validation")
    add("--val-every", type=int, default=0, help="validate every N steps (0 = never)")


def _rollout_flags(p):
    add = p.add_argument_group("rollout").add_argument
    add("--batch-prompts", type=int, default=512, help="prompts per step, all ranks together")
    add("--num-samples", "--group-size", dest="n", type=int, default=8,
        help="n: completions sampled per prompt (GRPO's group size G)")
    add("--max-new-tokens", type=int, default=2048, help="completion length cap")
    add("--temperature", type=float, default=1.0,
        help="sampling temperature, also used in training log-probs")
    add("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    add("--max-cache-tokens", type=int, default=262144,
        help="KV-cache budget per rank, in tokens: it holds budget / (longest prompt + "
             "--max-new-tokens) sequences at once (fewer: more decode rounds, the same samples)")


def _objective_flags(p):
    add = p.add_argument_group("objective").add_argument
    add("--format", default="boxed", choices=reward.FORMATS, help="answer format the reward parses")
    add("--reward-values", default="1,0,0",
        help="reward for correct,wrong,bad-format (Med-RLVR: 1,0,-1)")
    add("--clip-low", type=float, default=0.2, help="ratio clip below 1 - clip_low")
    add("--clip-high", type=float, default=0.2,
        help="ratio clip above 1 + clip_high (clip-higher: > clip_low)")
    add("--dual-clip", type=float, default=0.0,
        help="dual-clip constant c > 1 for negative advantages (0 = off)")
    add("--kl-coef", type=float, default=0.001,
        help="per-token KL penalty to the reference (GRPO: in the loss; PPO: in the reward; 0 = no"
             " reference model)")
    add("--kl-estimator", default="k3", choices=["k1", "k2", "k3"], help="KL estimator")
    add("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean",
        "seq-mean-token-sum"],
        help="how per-token losses are averaged")
    add("--entropy-coef", type=float, default=0.0, help="entropy bonus coefficient")
    add("--tis-cap", type=float, default=0.0,
        help="truncated importance sampling against the sampler/trainer mismatch: weight each "
             "token's policy loss by min(pi_old / pi_sampler, C) (0 = off; TRL's cap is 2)")
    add("--overlong-buffer", type=int, default=0,
        help="DAPO's soft overlong penalty: over the last N tokens before --max-new-tokens the "
             "reward falls linearly by up to --overlong-penalty (0 = off; DAPO: 4096 of 20480)")
    add("--overlong-penalty", type=float, default=1.0, help="the penalty at --max-new-tokens")
    add("--mask-truncated", action="store_true",
        help="DAPO's overlong filtering: completions cut at --max-new-tokens get no loss (they "
             "still count in their group's advantages)")


def _optimisation_flags(p):
    add = p.add_argument_group("optimisation").add_argument
    add("--steps", type=int, default=300, help="training steps (rollout batches)")
    add("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    add("--mini-batches", type=int, default=1, help="optimizer steps per pass")
    add("--lr", type=float, default=1e-6, help="AdamW learning rate")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    add("--warmup-steps", type=int, default=10, help="linear warmup, in optimizer steps")
    add("--lr-schedule", default="constant", choices=["constant", "cosine"], help="after warmup")
    add("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = off)")
    add("--micro-tokens", type=int, default=None,
        help="token budget of one packed training micro-batch (default: 16384 on CUDA; 2048 on "
             "CPU, where a real model's activations cost ~0.1-1.4 MB per token: the run's memory "
             "plan shows it)")
    add("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
        help="activation checkpointing per block (an 8B update at --micro-tokens 16384 keeps ~4 GB "
             "of activations with it, ~106 GB without: bench/activations.py)")


def _run_flags(p):
    add = p.add_argument_group("run").add_argument
    add("--out", default="runs/grpo", help="output dir: checkpoints, metrics.jsonl, samples.jsonl")
    add("--seed", type=int, default=0, help="one seed for data order, sampling and init")
    add("--save-every", type=int, default=50,
        help="checkpoint every N steps and at the end (0 = never: nothing to resume from)")
    add("--keep-last", type=int, default=2, help="checkpoints kept")
    add("--resume", default=None, help="checkpoint dir to resume from, or 'auto' (latest in --out)")
    add("--allow-flag-changes", action="store_true",
        help="--resume with flags that change the algorithm or data order (said in the log)")
    add("--samples-every", type=int, default=10, help="write a few completions every N steps")
    add("--wandb-project", default=None, help="log to wandb (offline without WANDB_API_KEY)")
    add("--plan", action="store_true",
        help="print the per-phase memory plan for these flags and exit (reads only the model's "
             "config.json); every run prints its own plan at start")
    add("--plan-world", type=int, default=None, help="--plan: ranks (default: this launch's)")
    add("--plan-device", choices=["cuda", "cpu"], default=None,
        help="--plan: the device planned for (default: this machine's)")
    add("--plan-prompt-tokens", type=int, default=512,
        help="--plan: the longest prompt (a run measures its own)")

def parse_args(p: argparse.ArgumentParser, argv, tiny_defaults: dict):
    """Parse, with `tiny_defaults` when --model tiny is given; one clear error naming the flag."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    if pre.parse_known_args(argv)[0].model == "tiny":  # before the real parse: --help shows them
        p.set_defaults(**tiny_defaults)
    args = p.parse_args(argv)
    if args.micro_tokens is None:  # the device the run (or --plan) is for
        device = args.plan_device or ("cuda" if torch.cuda.is_available() else "cpu")
        args.micro_tokens = 16384 if device == "cuda" else 2048
    try:
        reward.RewardValues.parse(args.reward_values)
    except ValueError as e:
        p.error(f"--reward-values {args.reward_values!r}: {e}")
    check_data_flags(p, args)
    rules = [("--steps", args.steps, args.steps >= 1, "must be >= 1"),
             ("--num-samples", args.n, args.n >= 1, "must be >= 1"),
             ("--lr", args.lr, args.lr > 0, "must be > 0"),
             ("--weight-decay", args.weight_decay, args.weight_decay >= 0, "must be >= 0"),
             ("--warmup-steps", args.warmup_steps, args.warmup_steps >= 0, "must be >= 0"),
             ("--grad-clip", args.grad_clip, args.grad_clip >= 0, "must be >= 0 (0 = off)"),
             ("--micro-tokens", args.micro_tokens, args.micro_tokens >= 1, "must be >= 1"),
             ("--max-cache-tokens", args.max_cache_tokens, args.max_cache_tokens >= 1,
              "must be >= 1"),
             ("--seed", args.seed, 0 <= args.seed < 2**32, "must be in [0, 2^32)"),
             ("--val-size", args.val_size, args.val_size >= 0, "must be >= 0"),
             ("--val-every", args.val_every, args.val_every >= 0, "must be >= 0 (0 = never)"),
             ("--samples-every", args.samples_every, args.samples_every >= 0,
              "must be >= 0 (0 = never)"),
             ("--entropy-coef", args.entropy_coef, args.entropy_coef >= 0, "must be >= 0"),
             ("--tis-cap", args.tis_cap, args.tis_cap == 0 or args.tis_cap >= 1,
              "must be 0 (off) or >= 1"),
             ("--overlong-buffer", args.overlong_buffer,
              0 <= args.overlong_buffer <= args.max_new_tokens,
              "must be between 0 and --max-new-tokens"),
             ("--temperature", args.temperature, args.temperature > 0,
              "must be > 0 (it divides the training logits)"),
             ("--top-p", args.top_p, 0 < args.top_p <= 1, "must be in (0, 1]"),
             ("--batch-prompts", args.batch_prompts, args.batch_prompts >= 1, "must be >= 1"),
             ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "must be >= 1"),
             ("--clip-low", args.clip_low, 0 < args.clip_low < 1, "must be in (0, 1)"),
             ("--clip-high", args.clip_high, args.clip_high > 0, "must be > 0"),
             ("--dual-clip", args.dual_clip, args.dual_clip == 0 or args.dual_clip > 1,
              "must be 0 (off) or > 1"),
             ("--kl-coef", args.kl_coef, args.kl_coef >= 0, "must be >= 0"),
             ("--ppo-epochs", args.ppo_epochs, args.ppo_epochs >= 1, "must be >= 1"),
             ("--mini-batches", args.mini_batches,
              1 <= args.mini_batches <= args.batch_prompts * args.n,
              "must be between 1 and the number of completions per step"),
             ("--save-every", args.save_every, args.save_every >= 0, "must be >= 0"),
             ("--keep-last", args.keep_last, args.keep_last >= 1, "must be >= 1")]
    check_rules(p, rules)
    return args


def check_rules(p: argparse.ArgumentParser, rules: list[tuple[str, object, bool, str]]):
    """(flag, value, ok, why) rows: the first failing one is the error, naming the flag."""
    for flag, value, ok, why in rules:
        if not ok:
            p.error(f"{flag} {value}: {why}")


def check_data_flags(p: argparse.ArgumentParser, args):
    """Benchmark names, local paths and --data-dir exist: said before any model or data loads."""
    specs = [spec.partition("=") for spec in args.data.split(",")]
    excluded = [] if args.exclude == "none" else args.exclude.split(",")
    for flag, names in (("--data", [name for name, _, _ in specs]), ("--exclude", excluded)):
        unknown = [n for n in names if n not in data.BENCHMARKS]
        if unknown:
            p.error(f"{flag}: unknown {', '.join(unknown)}; known: {', '.join(data.BENCHMARKS)}")
    for name, _, path in specs:
        if path and not os.path.exists(path):
            p.error(f"--data {name}={path}: no such file")
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir}: no such directory")


# ----------------------------------------------------------------------------- the run

class Run:
    """Everything a training run holds besides the algorithm: see the module docstring."""

    def __init__(self, args, name: str):
        """Everything but the models, each checked before any model loads: processes, --out
        (writable, not another live run's, resumable), seeds, tokenizer, questions, the plan."""
        self.args, self.name = args, name
        self.dist = setup_dist()
        if args.batch_prompts % self.dist.world:
            raise ValueError(f"--batch-prompts {args.batch_prompts} must be a multiple of the "
                             f"{self.dist.world} ranks")
        self.resume_from = self.claim_out()
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        self.model_dir = self.local_model(args.model)
        M.read_config(self.model_dir)  # a bad config.json is named before anything reads it
        self.tokenizer = load_tokenizer(self.model_dir, self.dist.main)
        self.reward_values = reward.RewardValues.parse(args.reward_values)
        self.train, self.val = training_questions(args, self.dist)
        self.trainables: dict[str, Trainable] = {}
        self.tracked = {}  # name -> object with state_dict() / load_state_dict(), checkpointed
        if self.dist.main:
            self.describe()

    def claim_out(self) -> str | None:
        """--out is writable and this run's alone (run.lock); returns the checkpoint to resume."""
        out, dist = self.args.out, self.dist
        if dist.main:
            try:
                os.makedirs(out, exist_ok=True)
                checkpoint.take_lock(out)
            except PermissionError as e:
                raise PermissionError(f"--out {out}: cannot write there ({e.strerror})") from None
            atexit.register(checkpoint.release_lock, out)
        dist.barrier()
        return checkpoint.find_resume(self.args, dist.world)

    def describe(self):
        """The resolved flags (also in --out/run_config.json), the memory plan, the files."""
        args, out = self.args, self.args.out
        flags = vars(args)
        print(f"{self.name} flags:\n" + "".join(f"  {checkpoint.flag(k)} {v}\n"
                                              for k, v in sorted(flags.items())), flush=True)
        with open(os.path.join(out, "run_config.json"), "w") as f:
            json.dump(flags, f, indent=1)
        prompt_len = max(len(data.encode_prompt(self.tokenizer, q, args.prompt_style))
                         for q in self.train[:512])  # (shuffled) a fair sample of the longest
        print_plan(args, self.name, M.read_config(self.model_dir), self.dist.world,
                   self.dist.device.type == "cuda", prompt_len)
        print(f"writing {os.path.join(out, 'run_config.json')}, "
              f"{os.path.join(out, 'metrics.jsonl')}, {os.path.join(out, 'samples.jsonl')}"
              + (f" and step-N/ checkpoints every {args.save_every} steps" if args.save_every
                 else " (no checkpoints: --save-every 0)"), flush=True)

    def local_model(self, name: str) -> str:
        """A local dir for `name`: 'tiny' is written once into --out; hub ids are downloaded on
        rank 0 first."""
        if name == "tiny":
            path = os.path.join(self.args.out, "tiny-init")
            if self.dist.main and not os.path.exists(os.path.join(path, "config.json")):
                from tiny import make_tiny_checkpoint
                make_tiny_checkpoint(path, "llama", seed=self.args.seed)
            self.dist.barrier()
            return path
        if self.dist.main:
            M.resolve(name)
        self.dist.barrier()
        return M.resolve(name)

    def trainable(self, name: str, path: str, lr: float, value_head: bool = False) -> Trainable:
        """A trained model (checkpointed with the run) loaded from `path`."""
        if name != "policy":  # e.g. PPO's critic: it must read the policy's tokens
            check_compatible(path, self.model_dir)
        self.trainables[name] = Trainable.load(name, path, lr, self.args, self.dist, value_head)
        return self.trainables[name]

    def reference(self):
        """The frozen starting policy, sharded, in the inference dtype."""
        return load_sharded(self.model_dir, self.dist, self.dist.dtype).requires_grad_(False)

    def track(self, name: str, obj):
        """Checkpoint obj.state_dict() with the run and restore it on resume."""
        self.tracked[name] = obj

    def questions(self, step: int, stream: int = 0) -> tuple[list[data.Question], int]:
        """This rank's prompts for a step and the global index of the first: a seeded permutation
        per epoch, read in order (the data position is a function of the step), split evenly.
        stream > 0: batch `step` of another order of the questions (extra sampling rounds)."""
        args, per_rank = self.args, self.args.batch_prompts // self.dist.world
        first = step * args.batch_prompts + self.dist.rank * per_rank
        out = []
        for g in range(first, first + per_rank):
            epoch, i = divmod(g, len(self.train))
            key = [args.seed, epoch] + ([stream] if stream else [])
            order = np.random.default_rng(key).permutation(len(self.train))
            q = self.train[order[i]]
            if args.shuffle_options:
                q = data.shuffle_options(q, random.Random(args.seed * 1_000_003 + g))
            out.append(q)
        return out, self.dist.rank * per_rank

    def sampling(self, step: int) -> rollout.Sampling:
        a = self.args
        return rollout.Sampling(n=a.n, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                top_p=a.top_p, seed=a.seed * 1_000_003 + step,
                                max_cache_tokens=a.max_cache_tokens)

    def steps(self):
        """The step numbers still to run (from the checkpoint's with --resume), with a progress bar;
        the process group is closed after the last."""
        start = checkpoint.restore(self.resume_from, self) if self.resume_from else 0
        if not self.resume_from and self.args.resume and self.dist.main:
            print(f"--resume {self.args.resume}: no checkpoint in {self.args.out}; starting at "
                  f"step 0", flush=True)
            checkpoint.truncate_logs(self.args.out, 0)
        self.logger = Logger(self.args, self.dist)
        self.bar = tqdm(range(start, self.args.steps), initial=start, total=self.args.steps,
                        desc=self.name, disable=not self.dist.main)
        yield from self.bar
        if self.dist.main:
            checkpoint.release_lock(self.args.out)
        self.dist.close()

    def end_step(self, step: int, metrics: dict, rollouts: list):
        """Validate, log and checkpoint as the flags say."""
        args = self.args
        if args.val_every and (step + 1) % args.val_every == 0 and self.val:
            metrics.update(validate(self))
        show = rollouts[:2] if args.samples_every and step % args.samples_every == 0 else None
        self.logger.log(step + 1, metrics, show)
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}",
                             acc=f"{metrics['accuracy']:.3f}", len=f"{metrics['response_len']:.0f}")
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            checkpoint.save(self, step + 1)


def load_tokenizer(model_dir: str, say: bool):
    """The checkpoint's tokenizer; says so when it has no chat template (prompts become plain
    "User: ... Assistant:" text) and names the dir when it has no tokenizer at all."""
    from transformers import AutoTokenizer
    files = os.listdir(model_dir)
    if not any(f.startswith("tokenizer") or f in ("vocab.json", "merges.txt") for f in files):
        raise FileNotFoundError(f"{model_dir}: no tokenizer files (tokenizer.json, "
                                f"tokenizer_config.json, ...): a checkpoint needs its tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if say and not getattr(tokenizer, "chat_template", None):
        print(f"warning: {model_dir} has no chat template: prompts are plain 'User: ... "
              f"Assistant:' text", flush=True)
    return tokenizer


def check_compatible(path: str, policy_dir: str):
    """A second model (the critic) of the policy's architecture and vocabulary."""
    mine, policy = M.read_config(path), M.read_config(policy_dir)
    if (mine.arch, mine.vocab_size) != (policy.arch, policy.vocab_size):
        raise ValueError(f"{path}: a {mine.arch} model with vocabulary {mine.vocab_size}, but the "
                         f"policy is {policy.arch} with {policy.vocab_size}: the critic must read "
                         f"the policy's tokens")


def print_plan(args, name: str, cfg: M.ModelConfig, world: int, cuda: bool, prompt_len: int):
    """The memory plan (memory.py) of a grpo / ppo run with these flags, and its peak."""
    plan = memory.plan(cfg, args, world, cuda, prompt_len, critic=name == "ppo",
                       reference=args.kl_coef > 0)
    where = f"{world} x {'CUDA' if cuda else 'CPU'}"
    print(f"memory plan ({where}, prompts up to {prompt_len} tokens):\n{plan.table()}\n"
          f"planned peak: {plan.peak() / memory.GB:.2f} GB per process", flush=True)


def plan_only(args, name: str):
    """--plan: the plan from the model's config alone, for --plan-world ranks on --plan-device."""
    if args.model == "tiny":
        from tiny import tiny_config
        cfg = M.ModelConfig.from_hf(tiny_config("llama", 384))
    else:
        cfg = M.read_config(args.model)
    world = args.plan_world or int(os.environ.get("WORLD_SIZE", 1))
    cuda = (args.plan_device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    print_plan(args, name, cfg, world, cuda, args.plan_prompt_tokens)


@torch.no_grad()
def validate(run: Run) -> dict:
    """Greedy accuracy and format failures on the held-out questions, through evaluate.py with the
    training prompt and format. Every rank gathers the weights, even one with no questions."""
    a = run.args
    greedy = rollout.Sampling(n=1, max_new_tokens=a.max_new_tokens, temperature=0.0,
                              seed=a.seed, max_cache_tokens=a.max_cache_tokens)
    with Gathered(run.trainables["policy"].module) as m:
        generate_fn = evaluate.generation_fn(m, run.tokenizer, greedy, a.prompt_style,
                                             progress=False)
        res, _ = evaluate.evaluate_benchmark(run.val, generate_fn, a.format, run.dist)
    return {} if res is None else dict(val_accuracy=res["accuracy"],
                                       val_format_fail=res["format_failure_rate"])


# ----------------------------------------------------------------------------- data and logging

def training_questions(args, dist):
    """Training questions (deduplicated, benchmark overlap removed, mixed) and a held-out slice."""
    if args.data == "demo":
        qs = data.load_benchmark("demo")
    else:
        sources = {}
        for spec in args.data.split(","):
            name, _, path = spec.partition("=")
            sources[name] = read_benchmark(name, path or None, args.data_dir)
        if args.mix_source in sources:
            sources[args.mix_source] = subsample(sources[args.mix_source], args, dist)
        if args.exclude == "none" and dist.main:
            print("warning: --exclude none: training questions may include evaluation questions")
        names = [] if args.exclude == "none" else args.exclude.split(",")
        exclude = [read_benchmark(n, None, args.data_dir) for n in names]
        qs = data.build_train_set(list(sources.values()), exclude=exclude)
        if not qs:
            counts = ", ".join(f"{n}: {len(q)}" for n, q in sources.items())
            raise ValueError(f"--data {args.data}: no training questions left after removing "
                             f"--exclude {args.exclude} ({counts} before)")
    qs = [qs[i] for i in np.random.default_rng(args.seed).permutation(len(qs))]
    val, train = qs[:args.val_size], qs[args.val_size:]
    if len(train) < 1:
        raise ValueError(f"--val-size {args.val_size} holds out all {len(qs)} training questions")
    return train, val


def read_benchmark(name: str, path: str | None, data_dir: str | None):
    """A local file when given, else the raw file in --data-dir, else the hub."""
    if path:
        return data.load_benchmark(name, path)
    if data_dir:
        return data.load_benchmark_dir(name, data_dir)
    return data.load_benchmark(name)


def subsample(qs, args, dist):
    if args.pass_rates:
        return data.difficulty_mix(qs, args.pass_rates, args.mix, seed=args.seed)
    if args.mix_size and args.mix_size < len(qs):
        if dist.main:
            print(f"note: no --pass-rates, so {args.mix_source} is a uniform random "
                  f"{args.mix_size}; "
                  f"run `python evaluate.py {args.model} --num-samples 4 --pass-rates --benchmarks "
                  f"{args.mix_source}` for AlphaMed's difficulty mix")
        keep = np.random.default_rng(args.seed).permutation(len(qs))[:args.mix_size]
        return [qs[i] for i in sorted(keep)]
    return qs


class Logger:
    """metrics.jsonl (one JSON object per step), samples.jsonl, wandb if configured; rank 0 only."""

    def __init__(self, args, dist):
        self.on, self.prompt_style = dist.main, args.prompt_style
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
            row = dict(step=step, question=r.question.id, prompt_style=self.prompt_style,
                       gold=r.question.answer, letter=r.info.letter, reward=r.reward,
                       format_ok=r.info.format_ok, reason=r.info.reason,
                       answer_leak=r.info.answer_leak, finish=r.finish_reason, completion=r.text)
            self.samples.write(json.dumps(row) + "\n")
        self.samples.flush()
