"""The outer run shared by grpo.py and ppo.py: setup, data order, validation, logging; its flags
are in flags.py, checkpoints and resume in checkpoint.py. The step itself is the algorithm's, in
grpo.py / ppo.py:

    run = loop.Run(args, "grpo")          # processes, seeds, tokenizer, questions, --out
    policy = run.trainable("policy", run.model_dir, args.lr)
    for step in run.steps():               # resumes from a checkpoint when asked
        metrics, completions = train_step(step, policy, ...)
        run.end_step(step, metrics, completions)   # validate, log, checkpoint

A run says what it does: the flags it changes (flags.say_changed; every flag goes to
--out/run_config.json), its training questions, the memory plan, what it writes when, a line per
step (step_line) and every checkpoint saved; plain lines, and no progress bar when stderr is not
a terminal. Bad flags and data fail before any model loads; checkpoint.py's checks on --out and
--resume too.
"""
import atexit
import collections
import json
import os
import random
import sys
import time

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

# ----------------------------------------------------------------------------- the run

class Run:
    """Everything a training run holds besides the algorithm: see the module docstring."""

    def __init__(self, args, name: str):
        """Everything but the models, each checked before any model loads: processes, --out
        (not another live run's, resumable), seeds, tokenizer, questions, the plan. --out is
        made only once those checks pass (--model tiny's checkpoint is written into it before):
        a launch that fails on bad input leaves no empty --out."""
        self.args, self.name = args, name
        self.out_locked = False
        # A hub model is downloaded before the process group exists, so no collective waits on
        # it: every rank at once, the hub's cache locking each file while one process fetches it.
        for model in (args.model, getattr(args, "critic", None)):
            if model not in (None, "tiny"):
                M.resolve(model)
        self.dist = setup_dist(args.dist_timeout)
        if args.batch_prompts % self.dist.world:
            raise ValueError(f"--batch-prompts {args.batch_prompts} must be a multiple of the "
                             f"{self.dist.world} ranks")
        self.resume_from = self.claim_out()
        args.threads = args.threads or default_threads()
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        self.model_dir = self.local_model(args.model)  # --model tiny: written into --out
        M.read_policy_config(self.model_dir)  # a bad config.json, a run dir, a critic: named
        self.tokenizer = load_tokenizer(self.model_dir, self.dist.main)
        critic = getattr(args, "critic", None)  # PPO's --critic, checked here too: before --out
        if critic not in (None, "tiny"):
            check_compatible(M.resolve(critic), self.model_dir)
        self.reward_values = reward.RewardValues.parse(args.reward_values)
        self.train, self.val = training_questions(args, self.dist)
        self.lock_out()  # the checks passed: the run starts
        self.trainables: dict[str, Trainable] = {}
        self.tracked = {}  # name -> object with state_dict() / load_state_dict(), checkpointed
        if self.dist.main:
            self.describe()

    def claim_out(self) -> str | None:
        """Before any other check: an --out that exists is locked now, so that a live run there
        is what gets said; returns the checkpoint to resume (find_resume only reads --out)."""
        if os.path.isdir(self.args.out):
            self.lock_out()
        self.dist.barrier()
        return checkpoint.find_resume(self.args, self.dist.world)

    def lock_out(self):
        """--out exists, is writable and is this run's alone (run.lock, rank 0)."""
        out = self.args.out
        if not self.dist.main or self.out_locked:
            return
        try:
            os.makedirs(out, exist_ok=True)
            checkpoint.take_lock(out)
        except PermissionError as e:
            raise PermissionError(f"--out {out}: cannot write there ({e.strerror})") from None
        atexit.register(checkpoint.release_lock, out)
        self.out_locked = True

    def describe(self):
        """Every resolved flag into --out/run_config.json (the changed ones were printed:
        flags.say_changed), the memory plan, and which files get what when."""
        args, out = self.args, self.args.out
        with open(os.path.join(out, "run_config.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
        prompt_len = max(len(data.encode_prompt(self.tokenizer, q, args.prompt_style))
                         for q in self.train[:512])  # (shuffled) a fair sample of the longest
        memory.print_plan(args, self.name, M.read_config(self.model_dir), self.dist.world,
                          self.dist.device.type == "cuda", prompt_len, brief=True)
        print(f"writing {os.path.join(out, '')}: {self.files()}", flush=True)

    def files(self) -> str:
        """What the run writes, on which of its --steps (so `--steps 2` never reads "every 50")."""
        args, steps = self.args, range(1, self.args.steps + 1)
        saves = [s for s in steps if falls_on(s, args.save_every, args.steps)]
        samples = [s for s in steps if falls_on(s - 1, args.samples_every)]
        validation = ""
        if args.val_every and self.val:
            vals = [s for s in steps if falls_on(s, args.val_every)]
            validation = (f"; greedy accuracy on the {len(self.val)} held-out questions "
                          f"{when(vals, args.val_every)}")
        return (f"run_config.json (every flag), metrics.jsonl (a row per step{validation}), "
                f"samples.jsonl (2 completions {when(samples, args.samples_every)}), "
                f"step-N/ checkpoints {when(saves, args.save_every)}")

    def local_model(self, name: str) -> str:
        """A local dir for `name`: 'tiny' is written once into --out; a hub id's download (made
        before the process group: __init__)."""
        if name == "tiny":
            path = os.path.join(self.args.out, "tiny-init")
            if self.dist.main and not os.path.exists(os.path.join(path, "config.json")):
                from tiny import make_tiny_checkpoint
                make_tiny_checkpoint(path, "llama", seed=self.args.seed)
            self.dist.barrier()
            return path
        return M.resolve(name)

    def trainable(self, name: str, path: str, lr: float, value_head: bool = False) -> Trainable:
        """A trained model (checkpointed with the run) loaded from `path` (PPO's --critic was
        checked against the policy in __init__, before --out was made)."""
        self.trainables[name] = Trainable.load(name, path, lr, self.args, self.dist, value_head)
        return self.trainables[name]

    def reference(self):
        """The frozen starting policy, sharded, in --reference-dtype."""
        dtype = reference_dtype(self.args, self.dist.device.type == "cuda")
        return load_sharded(self.model_dir, self.dist, dtype,
                            compute_dtype=dtype).requires_grad_(False)  # fp32 asked: fp32

    def track(self, name: str, obj):
        """Checkpoint obj.state_dict() with the run and restore it on resume."""
        self.tracked[name] = obj

    def questions(self, step: int, sampling_round: int = 0, rounds: int = 1):
        """This rank's prompts for a step and the global index of the first in the step: a seeded
        permutation per epoch, read in order (the data position is a function of the step), split
        evenly. Extra sampling rounds (sampling_round > 0 of `rounds`) read another order of the
        questions, their prompts numbered after the earlier rounds'."""
        args, per_rank = self.args, self.args.batch_prompts // self.dist.world
        position, stream = ((step, 0) if sampling_round == 0
                            else (step * (rounds - 1) + sampling_round - 1, 1))
        first = position * args.batch_prompts + self.dist.rank * per_rank
        out = []
        for g in range(first, first + per_rank):
            epoch, i = divmod(g, len(self.train))
            key = [args.seed, epoch] + ([stream] if stream else [])
            order = np.random.default_rng(key).permutation(len(self.train))
            q = self.train[order[i]]
            if args.shuffle_options:
                key = args.seed * 1_000_003 + g if not stream else f"{args.seed}:{stream}:{g}"
                q = data.shuffle_options(q, random.Random(key))
            out.append(q)
        return out, sampling_round * args.batch_prompts + self.dist.rank * per_rank

    def sampling(self, step: int) -> rollout.Sampling:
        a = self.args
        return rollout.Sampling(n=a.n, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                top_p=a.top_p, seed=a.seed * 1_000_003 + step,
                                max_cache_tokens=a.max_cache_tokens, cuda_graphs=a.cuda_graphs)

    def steps(self):
        """The step numbers still to run (from the checkpoint's with --resume), with a progress bar;
        the process group is closed after the last."""
        start = checkpoint.restore(self.resume_from, self) if self.resume_from else 0
        if not self.resume_from and self.args.resume and self.dist.main:
            print(f"--resume {self.args.resume}: no checkpoint in {self.args.out}; starting at "
                  f"step 0", flush=True)
            checkpoint.truncate_logs(self.args.out, 0)
        self.logger = Logger(self.args, self.dist, self.tokenizer)
        # No bar into a log file (stderr not a terminal): its carriage returns and escape codes
        # garble it, and the step lines (end_step) say more.
        self.bar = tqdm(range(start, self.args.steps), initial=start, total=self.args.steps,
                        desc=self.name, disable=not (self.dist.main and sys.stderr.isatty()))
        yield from self.bar
        if self.dist.main:
            checkpoint.release_lock(self.args.out)
        self.dist.close()

    def end_step(self, step: int, metrics: dict, completions: list):
        """Validate, log and checkpoint as the flags say; rank 0 prints the step's line (every
        --log-every steps and the last) and each checkpoint saved, each on a line of its own."""
        args, done = self.args, step + 1
        if falls_on(done, args.val_every) and self.val:
            metrics.update(validate(self))
        show = completions[:2] if falls_on(step, args.samples_every) else None
        self.logger.log(done, metrics, show)
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}",
                             acc=f"{metrics['accuracy']:.3f}", len=f"{metrics['response_len']:.0f}")
        if self.dist.main and falls_on(done, args.log_every, args.steps):
            say(step_line(done, args.steps, metrics, self.name))
        if falls_on(done, args.save_every, args.steps):
            path = checkpoint.save(self, done)
            if self.dist.main:
                say(f"saved {path}")


# The step's console line: (label, metrics.jsonl key, format); "-" for what the step did not
# compute (absent from its row). PPO adds its critic's loss and the KL coefficient of its reward.
STEP_LINE = [("reward", "reward_mean", ".3f"), ("acc", "accuracy", ".2f"),
             ("fmt_fail", "format_fail", ".2f"), ("dead", "zero_var_frac", ".2f"),
             ("kl", "kl", ".3g"), ("ent", "entropy", ".3g"), ("len", "response_len", ".1f"),
             ("trunc", "truncated", ".2f"), ("clip", "clip_frac", ".3f"),
             ("gnorm", "grad_norm", ".3g")]
PPO_STEP_LINE = [("vloss", "value_loss", ".3g"), ("kl_coef", "kl_coef", ".3g")]


def step_line(step: int, steps: int, metrics: dict, name: str) -> str:
    """e.g. `step 12/200  reward 0.344  acc 0.34 ... gnorm 0.51  3.2 s  1,234 tok/s`: tok/s is
    the tokens every rank generated per second of generation."""
    fields = STEP_LINE + (PPO_STEP_LINE if name == "ppo" else [])
    parts = [f"step {step}/{steps}"]
    parts += [f"{label} {format(metrics[key], spec) if key in metrics else '-'}"
              for label, key, spec in fields]
    if "val_accuracy" in metrics:
        parts.append(f"val_acc {metrics['val_accuracy']:.2f}")
    if metrics.get("update_skipped"):
        parts.append("update skipped")
    if "step_time" in metrics:
        parts.append(f"{metrics['step_time']:.1f} s")
    if metrics.get("time_generate"):
        parts.append(f"{metrics['generated_tokens'] / metrics['time_generate']:,.0f} tok/s")
    return "  ".join(parts)


def say(text: str):
    """A whole line on stdout, above the progress bar when one is drawn: never glued onto it."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def falls_on(step: int, every: int, last: int | None = None) -> bool:
    """Whether an every-N event (0: never) falls on `step`: its multiples, and the run's `last`
    step when given. end_step acts on it; Run.files says in advance when it will."""
    return every > 0 and (step % every == 0 or step == last)


def when(steps: list[int], every: int) -> str:
    """The steps an every-N event falls on, in words that fit the run: "at step 2", "every 50
    steps (4: 50, 100, 150, 200)", "never"."""
    if not steps:
        return "never"
    if len(steps) <= 3:
        return f"at step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}"
    return f"every {every} steps ({len(steps)}: {steps[0]}, {steps[1]}, ..., {steps[-1]})"


def default_threads() -> int:
    """$OMP_NUM_THREADS, else the cores this process may run on over the ranks on this machine."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def reference_dtype(args, cuda: bool) -> torch.dtype:
    if args.reference_dtype == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, args.reference_dtype)


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


@torch.no_grad()
def validate(run: Run) -> dict:
    """Greedy accuracy and format failures on the held-out questions, through evaluate.py with the
    training prompt and format. Every rank gathers the weights, even one with no questions."""
    a = run.args
    greedy = rollout.Sampling(n=1, max_new_tokens=a.max_new_tokens, temperature=0.0,
                              seed=a.seed, max_cache_tokens=a.max_cache_tokens,
                              cuda_graphs=a.cuda_graphs)
    with Gathered(run.trainables["policy"].module) as m:
        generate_fn = evaluate.generation_fn(m, run.tokenizer, greedy, a.prompt_style,
                                             progress=False)
        res, _ = evaluate.evaluate_benchmark(run.val, generate_fn, a.format, run.dist)
    return {} if res is None else dict(val_accuracy=res["accuracy"],
                                       val_format_fail=res["format_failure_rate"])


# ----------------------------------------------------------------------------- data and logging

def training_questions(args, dist):
    """Training questions (deduplicated, benchmark overlap removed, mixed) and a held-out slice;
    rank 0 says how many each source gave and how many are left."""
    if args.data == "demo":
        qs = data.load_benchmark("demo")
        counts = f"demo {len(qs):,}"
    else:
        sources, loaded = {}, {}
        for spec in args.data.split(","):
            name, _, path = spec.partition("=")
            sources[name] = read_benchmark(name, path or None, args.data_dir)
            loaded[name] = len(sources[name])
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
        counts = source_counts(loaded, sources, qs, args.exclude)
    qs = [qs[i] for i in np.random.default_rng(args.seed).permutation(len(qs))]
    val, train = qs[:args.val_size], qs[args.val_size:]
    if len(train) < 1:
        raise ValueError(f"--val-size {args.val_size} holds out all {len(qs)} training questions")
    if dist.main:
        print(f"training questions: {counts}; {len(train):,} to train, {len(val):,} held out for "
              f"validation (--val-size)", flush=True)
    return train, val


def source_counts(loaded: dict[str, int], sources: dict[str, list], kept: list,
                  exclude: str) -> str:
    """Questions per source as loaded (and subsampled), and what is left of each in `kept`."""
    before = ", ".join(f"{name} {n:,}" + (f" ({len(sources[name]):,} subsampled)"
                                          if len(sources[name]) != n else "")
                       for name, n in loaded.items())
    left = collections.Counter(q.source for q in kept)
    removed = "repeats" + ("" if exclude == "none" else f" and --exclude {exclude}")
    return (f"{before}; after removing {removed}: "
            + ", ".join(f"{name} {left[name]:,}" for name in loaded))


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
    """metrics.jsonl (one JSON object per step), samples.jsonl (a few completions with their
    prompt as the model read it), wandb if configured; rank 0 only. Every row has `time`: the
    wall clock when it was written, Unix seconds (0.1 s)."""

    def __init__(self, args, dist, tokenizer):
        self.on, self.prompt_style, self.tokenizer = dist.main, args.prompt_style, tokenizer
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

    def log(self, step: int, metrics: dict, completions=None):
        if not self.on:
            return
        now = round(time.time(), 1)
        self.metrics.write(json.dumps(dict(step=step, time=now, **metrics)) + "\n")
        self.metrics.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)
        for r in completions or []:
            row = dict(step=step, time=now, question=r.question.id,
                       prompt=self.tokenizer.decode(r.prompt_ids), prompt_style=self.prompt_style,
                       gold=r.question.answer, letter=r.info.letter, reward=r.reward,
                       format_ok=r.info.format_ok, reason=r.info.reason,
                       answer_leak=r.info.answer_leak, finish=r.finish_reason, completion=r.text)
            self.samples.write(json.dumps(row) + "\n")
        self.samples.flush()
