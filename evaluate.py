r"""Score a checkpoint on the medical benchmarks: accuracy, bootstrap std, format failures, pass@n.

    python evaluate.py ckpt/                       # AlphaMed's six benchmarks from the hub, greedy
    python evaluate.py ckpt/ --data-dir ../shared/data --limit 50 --num-samples 8   # pass@8
    torchrun --nproc_per_node 8 evaluate.py ckpt/  # questions split over ranks, the same numbers
    python evaluate.py ckpt/ --num-samples 4 --pass-rates --benchmarks medmcqa_train

Choices and the flag that changes each:
  benchmarks  --benchmarks (data.BENCHMARKS names), --data-dir (raw files, not the hub), --limit.
              gpqa_medical (gated) is skipped with a note when it cannot be loaded.
  prompt      --prompt-style (default follows --format), --format: training's templates and parser.
  sampling    greedy by default; --num-samples n at --temperature (1.0 when n > 1), --top-p, --seed.
  metrics     accuracy: mean over all samples; majority_accuracy: most common parsed letter (ties:
              the one seen first in sample order; nothing parsable = wrong); pass_at_n: any of the
              n samples correct; bootstrap_std: std of accuracy over --bootstrap resamples of
              questions; truncation_rate: completions cut at --max-new-tokens;
              lenient_extra / lenient_accuracy: what reward.lenient_letter reads where strict
              parsing failed (explicit declarations and option texts only, never a bare capital
              letter), so format failures show instead of hiding.
  output      --out DIR: results.json, <benchmark>.jsonl (prompt, completions, parses), a table;
              --pass-rates adds pass_rates.jsonl (correct of n per question) for
              data.difficulty_mix.
"""
import argparse
import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

import data
import flags
import model as M
import reward
import rollout
from parallel import Dist, setup_dist

OPTIONAL = {"gpqa_medical"}  # gated: skipped, not fatal, when it cannot be had


def parse_args(argv=None):
    p = flags.Parser(description=__doc__, formatter_class=flags.HelpFormatter)
    p.add_argument("checkpoint",
                   help="HF-format checkpoint: a local dir (e.g. medrl's out/step-N, the policy; "
                        "not its critic/) or a hub id")
    # data
    p.add_argument("--benchmarks",
                   default="medqa,medmcqa,pubmedqa,mmlu_pro_health,gpqa_medical,medxpertqa",
                   help="comma-separated data.BENCHMARKS names (default: AlphaMed's six)")
    p.add_argument("--data-dir", default=None,
                   help="folder of raw files laid out like ../shared/data (default: the HF hub)")
    p.add_argument("--limit", type=int, default=0,
                   help="only the first N questions of each benchmark (0 = all)")
    # prompt and answer format
    p.add_argument("--format", default="boxed", choices=reward.FORMATS,
                   help="answer format the strict parser reads")
    p.add_argument("--prompt-style", default=None, choices=["alphamed", "medrlvr"],
                   help="prompt template (default: medrlvr for think_answer, else alphamed)")
    # sampling
    p.add_argument("--num-samples", dest="n", type=int, default=1,
                   help="n: samples per question (pass@n, majority vote)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0 = greedy when n == 1, else 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--max-new-tokens", type=int, default=2048,
                   help="completion length cap; 2048 is the GPU recipe's: on a CPU a real model "
                        "decodes far slower, so try 256 (completions cut short show as trunc)")
    p.add_argument("--max-cache-tokens", type=int, default=262144,
                   help="KV-cache budget per rank, in tokens")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay each decode step from a CUDA graph; --no-cuda-graphs: eager")
    p.add_argument("--seed", type=int, default=0, help="sampling noise and bootstrap resamples")
    # metrics and output
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the accuracy std")
    p.add_argument("--pass-rates", action="store_true",
                   help="difficulty labelling: write pass_rates.jsonl (correct of n samples per "
                        "question)")
    p.add_argument("--out", default=None,
                   help="output dir: results.json and one JSONL of samples per benchmark "
                        "(default: CHECKPOINT/eval for a local dir, runs/eval/ORG__NAME for a "
                        "hub id)")
    p.add_argument("--dist-timeout", type=float, default=120,
                   help="under torchrun: minutes a rank waits for the others at a collective")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --out (else a second run is refused)")
    return resolve_args(p, p.parse_args(argv))


def resolve_args(p: argparse.ArgumentParser, args):
    """Check every flag (one error naming it) and fill the defaults that depend on others."""
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    unknown = [n for n in names if n not in data.BENCHMARKS]
    if unknown or not names:
        p.error(f"--benchmarks: unknown {', '.join(unknown) or 'empty list'}; "
                f"known: {', '.join(data.BENCHMARKS)}")
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir}: no such directory")
    rules = [("--num-samples", args.n, args.n >= 1, ">= 1"),
             ("--max-cache-tokens", args.max_cache_tokens, args.max_cache_tokens >= 1, ">= 1"),
             ("--seed", args.seed, 0 <= args.seed < 2**32, "in [0, 2^32)"),
             ("--limit", args.limit, args.limit >= 0, ">= 0"),
             ("--bootstrap", args.bootstrap, args.bootstrap >= 1, ">= 1"),
             ("--dist-timeout", args.dist_timeout, args.dist_timeout > 0, "> 0"),
             ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
             ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
             ("--temperature", args.temperature, (args.temperature or 0) >= 0, ">= 0")]
    for flag, value, ok, need in rules:
        if not ok:
            p.error(f"{flag} must be {need}, got {value}")
    args.benchmarks = names
    default_style = "medrlvr" if args.format == "think_answer" else "alphamed"
    args.prompt_style = args.prompt_style or default_style
    if args.temperature is None:
        args.temperature = 0.0 if args.n == 1 else 1.0
    if args.out is None:
        local = os.path.isdir(args.checkpoint)
        args.out = (os.path.join(args.checkpoint, "eval") if local
                    else os.path.join("runs", "eval", args.checkpoint.replace("/", "__")))
    return args


def claim_out(args):
    """One evaluation's files per --out: a second one is refused (or, with --overwrite, the
    first one's files are removed first), so results of two runs never mix. The dir itself is
    made by the first write (write_results), so a launch that fails leaves no empty --out."""
    if not os.path.isdir(args.out):
        return
    ours = [f for f in os.listdir(args.out) if f == "results.json" or f.endswith(".jsonl")]
    if ours and not args.overwrite:
        raise FileExistsError(f"--out {args.out} already holds results "
                              f"({', '.join(sorted(ours))}): pass --overwrite to replace them, "
                              f"or another --out")
    for f in ours:
        os.remove(os.path.join(args.out, f))


@dataclass
class Generation:
    """One question's prompt (as text) and its k completions."""
    prompt: str
    completions: list[str]
    tokens: list[int]  # response length of each completion
    finish: list[str]  # "stop" or "length" (hit --max-new-tokens)


def generation_fn(model, tok, sampling: rollout.Sampling, prompt_style: str, progress=True):
    """generate_fn(questions, offset) -> list[Generation] through rollout.generate; `offset` is the
    global index of questions[0], so a rank's slice samples what one process would."""
    stop_ids = rollout.stop_ids_for(model, tok)

    def generate_fn(questions, offset):
        prompts = [data.encode_prompt(tok, q, prompt_style) for q in questions]
        samples = rollout.generate(model, prompts, sampling, stop_ids=stop_ids,
                                   prompt_offset=offset, progress=progress)
        n = sampling.n
        per_q = [samples[i * n:(i + 1) * n] for i in range(len(prompts))]  # prompt-major
        return [Generation(tok.decode(p), [tok.decode(s.response_ids, skip_special_tokens=True)
                                           for s in ss],
                           [len(s.response_ids) for s in ss], [s.finish_reason for s in ss])
                for p, ss in zip(prompts, per_q)]
    return generate_fn


def majority_vote(letters):
    """Most common parsed letter (None = unparsable, ignored); ties go to the letter seen first."""
    counts = Counter(x for x in letters if x is not None)
    return counts.most_common(1)[0][0] if counts else None  # ties: first seen (most_common)


def grade_question(q, gen: Generation, fmt):
    """One JSONL record: the prompt and every completion with its strict and lenient parse."""
    samples = []
    for text, ntok, finish in zip(gen.completions, gen.tokens, gen.finish, strict=True):
        info = reward.grade(text, q, fmt)[1]
        samples.append(dict(completion=text, letter=info.letter, format_ok=info.format_ok,
                            correct=info.correct, reason=info.reason, tokens=ntok, finish=finish,
                            lenient_letter=(None if info.format_ok
                                            else reward.lenient_letter(text, q.options))))
    return dict(id=q.id, benchmark=q.source, answer=q.answer, prompt=gen.prompt,
                majority=majority_vote([s["letter"] for s in samples]), samples=samples)


def bootstrap_std(scores, n_boot=1000, seed=0):
    """Std of the mean of `scores` (one per question) over n_boot resamples of the questions."""
    scores = np.asarray(scores, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(scores), size=(n_boot, len(scores)))  # (B, n)
    return float(scores[idx].mean(axis=1).std())


def summarize(records, n_boot=1000, seed=0):
    """results.json metrics of one benchmark from its records (all questions, in order)."""
    def per_sample(value):  # (n, k) float array of value(record, sample)
        return np.array([[value(r, s) for s in r["samples"]] for r in records], dtype=float)
    correct = per_sample(lambda r, s: s["correct"])
    return dict(questions=len(records), n=correct.shape[1], accuracy=float(correct.mean()),
                bootstrap_std=bootstrap_std(correct.mean(axis=1), n_boot, seed),
                majority_accuracy=float(np.mean([r["majority"] == r["answer"] for r in records])),
                pass_at_n=float(correct.max(axis=1).mean()),
                format_failure_rate=float(1 - per_sample(lambda r, s: s["format_ok"]).mean()),
                lenient_extra=int(per_sample(lambda r, s: s["lenient_letter"] is not None).sum()),
                lenient_accuracy=float(per_sample(
                    lambda r, s: s["correct"] or s["lenient_letter"] == r["answer"]).mean()),
                mean_response_tokens=float(per_sample(lambda r, s: s["tokens"]).mean()),
                truncation_rate=float(per_sample(lambda r, s: s["finish"] == "length").mean()))


def evaluate_benchmark(questions, generate_fn, fmt="boxed", dist: Dist = Dist(), n_boot=1000,
                       seed=0):
    """This rank generates and scores its contiguous block of questions; rank 0 gathers every
    block in rank order (= the single-process order) and returns (metrics, records); others
    (None, None)."""
    lo = len(questions) * dist.rank // dist.world
    hi = len(questions) * (dist.rank + 1) // dist.world
    gens = generate_fn(questions[lo:hi], lo) if hi > lo else []  # a rank may have none
    records = [grade_question(q, g, fmt) for q, g in zip(questions[lo:hi], gens, strict=True)]
    blocks = dist.gather(records)
    if not dist.main:
        return None, None
    records = [r for block in blocks for r in block]
    return summarize(records, n_boot, seed), records


def benchmark_questions(name, args):
    """(questions, None), or (None, reason) when an OPTIONAL benchmark cannot be had."""
    try:
        if args.data_dir:
            qs = data.load_benchmark_dir(name, args.data_dir)
        else:
            qs = data.load_benchmark(name)
        if not qs:
            raise ValueError(f"{name}: no questions in {args.data_dir or 'the hub split'}")
    except (OSError, ImportError) as e:  # no file, no network, gated (hub errors are OSErrors)
        if name not in OPTIONAL:
            raise
        return None, f"cannot be loaded ({type(e).__name__}: {e})"
    return (qs[:args.limit] if args.limit else qs), None


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # --out is made by its first write
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# The stdout table: (column, results.json key, format).
TABLE = [("questions", "questions", "{}"), ("acc", "accuracy", "{:.2%}"),
         ("±std", "bootstrap_std", "{:.2%}"), ("maj", "majority_accuracy", "{:.2%}"),
         ("pass@n", "pass_at_n", "{:.2%}"), ("fmt_fail", "format_failure_rate", "{:.2%}"),
         ("trunc", "truncation_rate", "{:.2%}"), ("lenient+", "lenient_extra", "{}"),
         ("len_acc", "lenient_accuracy", "{:.2%}"), ("tokens", "mean_response_tokens", "{:.1f}")]


def print_table(results):
    print(f"{'benchmark':<16}" + "".join(f"{col:>10}" for col, _, _ in TABLE))
    for name, r in results.items():
        if r.get("skipped"):
            cells = [f"skipped: {r['reason']}"]
        else:
            cells = [f.format(r[key]) for _, key, f in TABLE]
        print(f"{name:<16}" + "".join(f"{c:>10}" for c in cells))


def main(argv=None):
    args = parse_args(argv)
    model_dir = M.resolve(args.checkpoint)  # a hub download before any collective can wait
    M.read_policy_config(model_dir)  # a run dir or a critic is named before anything loads
    dist = setup_dist(args.dist_timeout)
    log = print if dist.main else (lambda *a: None)
    if dist.main:
        claim_out(args)
    from transformers import AutoTokenizer
    model = M.load_model(model_dir, dist.device, dist.dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    sampling = rollout.Sampling(n=args.n, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                max_cache_tokens=args.max_cache_tokens,
                                cuda_graphs=args.cuda_graphs)
    generate_fn = generation_fn(model, tok, sampling, args.prompt_style, progress=dist.main)
    results, pass_rates = {}, []
    log(f"writing results to {args.out}")
    for name in args.benchmarks:
        questions, reason = benchmark_questions(name, args)
        if reason is not None:
            results[name] = dict(skipped=True, reason=reason)
            log(f"note: skipping {name}: {reason}")
            continue
        log(f"{name}: {len(questions)} questions x {args.n} samples")
        metrics, records = evaluate_benchmark(questions, generate_fn, args.format, dist,
                                              args.bootstrap, args.seed)
        if dist.main:  # each benchmark's results are on disk as soon as it is done
            results[name] = metrics
            write_jsonl(os.path.join(args.out, f"{name}.jsonl"), records)
            pass_rates += [dict(id=r["id"], n=args.n,
                                correct=sum(s["correct"] for s in r["samples"])) for r in records]
            write_results(args, results)
    if dist.main:
        write_results(args, results)
        if args.pass_rates:
            write_jsonl(os.path.join(args.out, "pass_rates.jsonl"), pass_rates)
        print_table(results)
        print(f"results: {os.path.join(args.out, 'results.json')}; samples: "
              f"{os.path.join(args.out, '<benchmark>.jsonl')}"
              + (f"; pass rates: {os.path.join(args.out, 'pass_rates.jsonl')}"
                 if args.pass_rates else ""))
    dist.close()
    return results


def write_results(args, results: dict):
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(checkpoint=args.checkpoint, args=vars(args), benchmarks=results), f,
                  indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    flags.run_main(main)
