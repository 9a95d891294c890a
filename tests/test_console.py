"""What a run prints and logs means what it says: a line per step, a short start-up, no progress-bar
escape codes in a log file, and metrics that are absent (not 0) when not computed."""
import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

import grpo
import loop
import ppo
import rl
from conftest import read_metrics
from parallel import Dist

FAST = ["--model", "tiny", "--max-new-tokens", "4", "--batch-prompts", "8", "--num-samples", "4"]
STEP_FIELDS = ["reward", "acc", "fmt_fail", "dead", "kl", "ent", "len", "trunc", "clip", "gnorm"]


@pytest.mark.parametrize("main,extra", [(grpo.main, []), (ppo.main, ["vloss", "kl_coef"])])
def test_a_line_per_step_and_no_bar_in_a_log_file(main, extra, tmp_path, capsys):
    """stderr is not a terminal here (as in `> log 2>&1`): plain lines, nothing glued onto a bar."""
    out = tmp_path / "run"
    main(FAST + ["--steps", "3", "--save-every", "2", "--out", str(out)])
    printed = capsys.readouterr()
    assert "\r" not in printed.out + printed.err and "\x1b" not in printed.out + printed.err
    lines = printed.out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"]
    for line in steps:
        labels = line.split()[2::2]
        assert labels[:len(STEP_FIELDS + extra)] == STEP_FIELDS + extra, line
        assert line.endswith(" tok/s") and " s  " in line
    assert f"saved {out / 'step-000002'}" in lines and f"saved {out / 'step-000003'}" in lines


def test_log_every(tmp_path, capsys):
    grpo.main(FAST + ["--steps", "3", "--log-every", "2", "--save-every", "0",
                      "--out", str(tmp_path / "run")])
    steps = [line.split()[1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("step ")]
    assert steps == ["2/3", "3/3"]  # every 2nd and the last


def test_start_up_says_what_changed_and_what_fits_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    grpo.main(FAST + ["--steps", "2", "--val-size", "6", "--out", str(out)])
    printed = capsys.readouterr().out
    first = printed.splitlines()[0]
    assert first.startswith("grpo --model tiny ") and first.endswith("demo's defaults)")
    for given in ("--max-new-tokens 4", "--batch-prompts 8", "--steps 2", "--val-size 6"):
        assert given in first
    for default in ("--lr", "--seed", "--clip-low", "--data ", "--save-every", "--kl-coef"):
        assert default not in printed  # at their (--model tiny) defaults
    assert "training questions: demo 256; 250 to train, 6 held out" in printed
    assert "held per process (GB)" not in printed and "memory plan: at most 0.0" in printed
    assert "every 50" not in printed and "checkpoints at step 2" in printed  # --save-every 50
    assert "(2 completions at step 1)" in printed  # --samples-every 10
    assert json.loads((out / "run_config.json").read_text())["lr"] == 1e-3  # every flag


def test_question_counts_per_source_after_exclusion(tmp_path, capsys):
    def medqa(path, questions):
        path.write_text("".join(json.dumps(dict(question=q, options={"A": "x", "B": "y"},
                                                answer_idx="A")) + "\n" for q in questions))
    medqa(tmp_path / "medqa_us_4opt_test.jsonl", ["Which organ pumps blood?"])
    medqa(tmp_path / "medqa_us_4opt_train.jsonl", ["Which organ pumps blood?",
                                                   "Which makes bile?", "Which makes bile?",
                                                   "Which filters urine?"])
    args = grpo.get_args(["--model", "x", "--data", "medqa_train", "--data-dir", str(tmp_path),
                          "--exclude", "medqa", "--val-size", "1"])
    loop.training_questions(args, Dist())
    assert ("training questions: medqa_train 4; after removing repeats and --exclude medqa: "
            "medqa_train 2; 1 to train, 1 held out" in capsys.readouterr().out)


def test_lr_is_the_rate_the_step_used(tmp_path):
    out = str(tmp_path / "run")
    grpo.main(FAST + ["--steps", "2", "--lr", "1e-3", "--warmup-steps", "10", "--save-every", "0",
                      "--out", out])
    assert [r["lr"] for r in read_metrics(out)] == pytest.approx([1e-4, 2e-4])


def test_what_an_all_dead_step_did_not_compute_is_absent(tmp_path, capsys):
    out = str(tmp_path / "run")
    grpo.main(FAST + ["--steps", "1", "--reward-values", "0,0,0", "--save-every", "0",
                      "--out", out])
    row = read_metrics(out)[0]
    assert row["zero_var_frac"] == 1.0 and row["skipped_tokens"] == row["generated_tokens"]
    assert not {"entropy", "logprob_gap", "grad_norm", "kl"} & set(row)
    assert row["reward_mean"] == 0.0 and row["clip_frac"] == 0.0 and row["lr"] == 1e-3
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step 1/1"))
    assert "  ent -  " in line and "  gnorm -  " in line and "  clip 0.000  " in line


def rollout(group, length, advantage):
    return rl.Completion(None, group, [1, 2, 3], list(range(4, 4 + length)), torch.zeros(length),
                         "stop", advantages=torch.full((length,), float(advantage)))


def test_statistics_of_skipped_tokens_and_of_a_new_loss_term():
    """clip_frac counts skipped tokens (never clipped) in its denominator; other statistics are
    means over the computed tokens; a statistic any loss returns is logged."""
    weight = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([weight], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    part = rl.Trainable("policy", SimpleNamespace(parameters=lambda: [weight]), opt, sched, 0.1)
    args = SimpleNamespace(mini_batches=1, ppo_epochs=1, micro_tokens=100, loss_agg="token-mean",
                           max_new_tokens=8, grad_clip=0.0)

    def loss_fn(mb, weights):  # every computed token clipped; a researcher's own statistic
        ones = torch.ones(len(mb.targets))
        return weight * weights.sum(), dict(clip_frac=ones, entropy=3 * ones, my_term=2 * ones)
    live = [rollout(0, 2, 1), rollout(0, 3, -1), rollout(0, 4, 0)]
    dead = [rollout(1, 5, 0), rollout(1, 6, 0)]
    steps = rl.update(part, live + dead, loss_fn, args, Dist(), lambda r: bool(r.advantages.any()))
    row = rl.policy_metrics(steps)
    assert row["skipped_tokens"] == 4 + 5 + 6
    assert row["clip_frac"] == pytest.approx(5 / 20)  # 5 computed tokens of 20 in the loss
    assert row["entropy"] == pytest.approx(3.0) and row["my_term"] == pytest.approx(2.0)
    assert row["lr"] == 0.1 and "grad_norm" in row
    row = rl.policy_metrics(rl.update(part, dead, loss_fn, args, Dist(),
                                      lambda r: bool(r.advantages.any())))
    assert row["clip_frac"] == 0.0 and not {"entropy", "my_term", "grad_norm"} & set(row)


def test_rows_have_a_time_and_samples_their_prompt(tmp_path):
    out = str(tmp_path / "run")
    before = time.time()
    grpo.main(FAST + ["--steps", "2", "--samples-every", "1", "--save-every", "0", "--out", out])
    times = [r["time"] for r in read_metrics(out)]
    assert before - 1 <= times[0] <= times[1] <= time.time() + 1
    samples = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert all(before - 1 <= s["time"] <= time.time() + 1 for s in samples)
    assert all("Question: Which" in s["prompt"] and "Options:" in s["prompt"] for s in samples)


def test_a_default_resolved_by_device_is_not_a_change(capsys):
    """--micro-tokens left unset takes the device's default (2048 on a CPU): not a changed flag."""
    args = grpo.get_args(["--model", "some/model"])
    printed = capsys.readouterr().out
    assert args.micro_tokens == 2048 and "--micro-tokens" not in printed
    assert printed.startswith("grpo --model some/model (every other flag at their defaults)")
    grpo.get_args(["--model", "some/model", "--micro-tokens", "2048"])  # the default, given
    assert "--micro-tokens" not in capsys.readouterr().out
