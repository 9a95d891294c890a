"""The flags grpo.py and ppo.py share, in --help sections, and their checks: every bad value is
one error naming the flag, before any data or model loads. Each entry script adds its own
algorithm's flags (grpo.get_args, ppo.get_args) and its CPU-demo defaults (`--model tiny`).

How the entry points (grpo.py, ppo.py, evaluate.py) report a user's mistake is here too: a bad
flag, path, checkpoint or data line is one line `error: ...` on stderr (exit status 2 for flags, 1
for the rest), not a traceback; MEDRL_DEBUG=1 shows the traceback (run_main).
"""
import argparse
import linecache
import os
import sys

import torch

import data
import reward

# `--model tiny` (the CPU demo) starts from these defaults instead; flags given still win, and
# `--model tiny --help` shows them.
TINY_DEFAULTS = dict(data="demo", batch_prompts=16, n=16, max_new_tokens=8, lr=1e-3,
                     warmup_steps=0, kl_coef=0.0, steps=200, micro_tokens=4096, save_every=50,
                     samples_every=10, grad_ckpt=False)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default after its help."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and a pointer to --help, not the whole usage (33
    lines for the trainers) with the error at its bottom. Exit status 2: argparse's for usage."""

    def error(self, message):
        say_error(f"error: {message}\n(python {self.prog} --help lists the flags)")
        sys.exit(2)


def build_parser(doc: str) -> argparse.ArgumentParser:
    """The flags both trainers take, in --help sections; each entry script adds its own."""
    p = Parser(description=doc, formatter_class=HelpFormatter)
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
        help="KV-cache budget per rank, in tokens: on a GPU a pool of blocks that sequences take "
             "as they grow (when it runs out, the newest wait and resume); on a CPU it holds "
             "budget / (longest prompt + --max-new-tokens) sequences at once (fewer: more "
             "decode rounds, the same samples)")
    add("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
        help="replay each decode step from a CUDA graph (per batch-size bucket); "
             "--no-cuda-graphs: eager")


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
        help="token budget of one packed training micro-batch, a group's shared prompt counted "
             "once (default: 16384 on CUDA; 2048 on CPU, where a real model's activations cost "
             "~0.1-1.4 MB per token: the run's memory plan shows it)")
    add("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
        help="activation checkpointing per block (an 8B update at --micro-tokens 16384 keeps ~5 GB "
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
    add("--log-every", type=int, default=1,
        help="print a line of the step's metrics every N steps and at the last (0 = never; "
             "metrics.jsonl gets every step)")
    add("--wandb-project", default=None, help="log to wandb (offline without WANDB_API_KEY)")
    add("--dist-timeout", type=float, default=120,
        help="minutes a collective waits for the other ranks (NCCL's own default is 10: less "
             "than rank 0 saving a 16 GB checkpoint while the others wait)")
    add("--threads", type=int, default=None,
        help="torch CPU threads per process (default: $OMP_NUM_THREADS if set, else the cores "
             "this process may use divided by the ranks on this machine: never oversubscribed)")
    add("--reference-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
        help="the reference model's weights (auto: bf16 on CUDA, fp32 on CPU; bf16 on CPU halved "
             "its time on SmolLM2, with log-probs within ~0.05)")
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
    pre = Parser(add_help=False)
    pre.add_argument("--model")
    if pre.parse_known_args(argv)[0].model == "tiny":  # before the real parse: --help shows them
        p.set_defaults(**tiny_defaults)
    args = p.parse_args(argv)
    if args.micro_tokens is None:
        args.micro_tokens = default_micro_tokens(args)
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
             ("--log-every", args.log_every, args.log_every >= 0, "must be >= 0 (0 = never)"),
             ("--entropy-coef", args.entropy_coef, args.entropy_coef >= 0, "must be >= 0"),
             ("--threads", args.threads, args.threads is None or args.threads >= 1,
              "must be >= 1"),
             ("--dist-timeout", args.dist_timeout, args.dist_timeout > 0, "must be > 0"),
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


def default_micro_tokens(args) -> int:
    """--micro-tokens when not given: by the device the run (or --plan) is for."""
    device = args.plan_device or ("cuda" if torch.cuda.is_available() else "cpu")
    return 16384 if device == "cuda" else 2048


def say_changed(p: argparse.ArgumentParser, args, name: str):
    """Print (rank 0) the flags whose value is not this parser's default (with --model tiny: the
    demo's defaults), as on a command line: the run's choices, not 70 lines of defaults. Every
    flag goes to --out/run_config.json."""
    if os.environ.get("RANK", "0") != "0":
        return
    changed = []
    for action in p._actions:
        value = getattr(args, action.dest, None)
        default = p.get_default(action.dest)
        if action.dest == "micro_tokens" and default is None:
            default = default_micro_tokens(args)
        if action.dest == "help" or value == default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):  # --grad-ckpt / --no-grad-ckpt
            changed.append(action.option_strings[0 if value else 1])
        elif action.nargs == 0:  # store_true
            changed.append(action.option_strings[0])
        else:
            changed.append(f"{action.option_strings[0]} {value}")
    defaults = "the --model tiny demo's defaults" if args.model == "tiny" else "their defaults"
    print(f"{name} {' '.join(changed)} (every other flag at {defaults})", flush=True)


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


# ----------------------------------------------------------------------------- user errors

def run_main(main):
    """The `if __name__ == "__main__":` of every entry point. An error the user can fix (see
    user_error) is one line `error: MESSAGE` and exit status 1; anything else is a bug in medrl
    and keeps its traceback, as does everything with MEDRL_DEBUG=1. main() itself still raises,
    so tests and callers see the exception."""
    debug = os.environ.get("MEDRL_DEBUG", "") not in ("", "0")
    try:
        main()
    except KeyboardInterrupt:
        if debug:
            raise
        say_error("interrupted")
        sys.exit(130)  # 128 + SIGINT, as a shell reports Ctrl-C
    except Exception as e:
        if debug or not user_error(e):
            raise
        say_error(f"error: {' '.join(str(e).split()) or type(e).__name__}")  # one line
        sys.exit(1)


def user_error(e: Exception) -> bool:
    """An OSError is the environment's (a path, a permission, a full disk, the hub offline); a
    ValueError or RuntimeError is the user's only when a `raise` in medrl's own code made it:
    those messages name the flag, file or record. The same types raised inside torch, numpy or
    Python itself (an unpacking, a zip(strict=True), a shape) are bugs."""
    if isinstance(e, OSError):
        return True
    if not isinstance(e, (ValueError, RuntimeError)) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:  # the innermost frame: where it was raised
        tb = tb.tb_next
    file = os.path.abspath(tb.tb_frame.f_code.co_filename)
    ours = os.path.dirname(file) == os.path.dirname(os.path.abspath(__file__))
    return ours and linecache.getline(file, tb.tb_lineno).lstrip().startswith("raise ")


def say_error(text: str):
    """To stderr, once per machine: under torchrun every rank checks the same flags and files and
    raises the same error, so local rank 0 alone says it (one line per node, where each node's
    own files were checked); the other ranks still exit non-zero, so torchrun reports failure."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(text, file=sys.stderr, flush=True)
