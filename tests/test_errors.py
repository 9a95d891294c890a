"""What a user sees when a launch fails: one line `error: ...` (no traceback unless MEDRL_DEBUG=1),
a non-zero exit, no empty --out left behind; a bug keeps its traceback. Also the evaluation
progress bar and the real test model's "missing" message."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

import evaluate
import flags
import model as M
import reward
import rollout
import sampling
import tiny
from tiny import make_tiny_checkpoint, tiny_config


def launch(script, args, cwd, debug=False, torchrun_ranks=0):
    """`python SCRIPT ARGS` (or under torchrun) as a user runs it: (exit status, stderr lines)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MEDRL_DEBUG", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **({"MEDRL_DEBUG": "1"} if debug else {}))
    cmd = [sys.executable, str(ROOT / script), *args]
    if torchrun_ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(torchrun_ranks), str(ROOT / script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr.splitlines()


def one_error_line(rc, err, *words):
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    assert all(w in err[0] for w in words), err[0]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A policy checkpoint with a critic inside (its config alone: it is refused before any
    weights are read) and a training run's dir holding two checkpoints."""
    root = tmp_path_factory.mktemp("errors")
    policy = make_tiny_checkpoint(str(root / "run" / "step-000004"), "llama")
    (root / "run" / "step-000002").mkdir()
    critic = root / "run" / "step-000004" / "critic"
    critic.mkdir()
    cfg = tiny_config("llama", 384, architectures=["LlamaForTokenClassification"], num_labels=1)
    (critic / "config.json").write_text(json.dumps(cfg))
    return dict(root=root, policy=policy, critic=str(critic), run=str(root / "run"))


def test_evaluate_refuses_a_critic_and_a_run_dir_in_one_line(dirs):
    rc, err = launch("evaluate.py", [dirs["critic"]], dirs["root"])
    one_error_line(rc, err, dirs["critic"], "LlamaForTokenClassification",
                   f"pass the policy checkpoint it was saved with, {dirs['policy']}")
    assert not os.path.exists(os.path.join(dirs["critic"], "eval"))  # no empty critic/eval/
    rc, err = launch("evaluate.py", [dirs["run"]], dirs["root"])
    one_error_line(rc, err, f"{dirs['run']}: a training run", "step-000002, step-000004",
                   os.path.join(dirs["run"], "step-000004"))
    assert not os.path.exists(os.path.join(dirs["run"], "eval"))


def test_trainer_errors_are_one_line_and_leave_no_out(dirs, tmp_path):
    rc, err = launch("grpo.py", [], tmp_path)  # offline: the default model is on the hub
    one_error_line(rc, err, "meta-llama/Llama-3.1-8B-Instruct", "pass a local checkpoint")
    assert not os.listdir(tmp_path)  # no runs/grpo
    out = str(tmp_path / "out")
    rc, err = launch("grpo.py", ["--model", str(tmp_path / "nope"), "--out", out], tmp_path)
    one_error_line(rc, err, f"{tmp_path / 'nope'}: no such directory")
    bad = tmp_path / "train.jsonl"  # a bad data line, found after the model's files are checked
    bad.write_text(json.dumps({"question": "q?", "options": {"A": "x", "B": "y"},
                               "answer_idx": "A"}) + "\n{oops\n")
    rc, err = launch("grpo.py", ["--model", dirs["policy"], "--data", f"medqa_train={bad}",
                                 "--exclude", "none", "--out", out], tmp_path)
    one_error_line(rc, err, f"{bad}:2: malformed JSON line")
    assert not os.path.exists(out)  # --out is made only once the checks pass
    rc, err = launch("grpo.py", ["--model", dirs["policy"], "--data", f"medqa_train={bad}",
                                 "--exclude", "none", "--out", out], tmp_path, debug=True)
    assert rc == 1 and err[0].startswith("Traceback") and f"{bad}:2" in err[-1], err


def test_an_out_holding_a_run_is_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    rc, err = launch("ppo.py", ["--model", "tiny", "--out", str(out)], tmp_path)
    one_error_line(rc, err, f"--out {out} already holds a run", "--resume auto")
    assert sorted(os.listdir(out)) == ["metrics.jsonl"]  # no tiny-init, no run.lock left


def test_a_bad_flag_is_one_line_and_a_hint(tmp_path):
    rc, err = launch("grpo.py", ["--model", "tiny", "--steps", "0"], tmp_path)
    assert rc == 2 and err == ["error: --steps 0: must be >= 1",
                               "(python grpo.py --help lists the flags)"], err


def test_under_torchrun_the_error_is_said_once_and_fails_the_launch(dirs):
    rc, err = launch("evaluate.py", [dirs["critic"]], dirs["root"], torchrun_ranks=2)
    assert rc != 0 and not any("model.py" in line for line in err), err  # no rank's traceback
    said = [line for line in err if line.startswith("error: ")]
    assert len(said) == 1 and "a value model" in said[0], err


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
    """Only a message medrl wrote (a `raise` in its own files) or an OSError is one line."""
    def medrl_check():
        reward.RewardValues.parse("1,0")  # raises ValueError in reward.py: the user's
    with pytest.raises(SystemExit) as exit_:
        flags.run_main(medrl_check)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == "error: need three numbers correct,wrong,bad-format\n"
    bad = evaluate.Generation("p", ["a"], [], ["stop"])  # zip(strict=True) fails at once
    for bug in (lambda: evaluate.grade_question(None, bad, "boxed"),  # ValueError, no `raise`
                lambda: [][0],                                        # IndexError
                lambda: __import__("numpy").zeros(2).reshape(3)):     # ValueError in numpy
        with pytest.raises((ValueError, IndexError)):
            flags.run_main(bug)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MEDRL_DEBUG", "1")
    with pytest.raises(ValueError, match="need three numbers"):
        flags.run_main(medrl_check)


class Bar:
    """tqdm stand-in recording each update and when the first completion finished."""
    events: list = []

    def __init__(self, total, **kw):
        self.total, self.n = total, 0
        Bar.events = []

    def update(self, k):
        self.n += k
        Bar.events.append(("update", k))

    def set_postfix_str(self, text, refresh=True):
        Bar.events.append(("done", text))

    def close(self):
        Bar.events.append(("close", self.n, self.total))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return M.load_model(make_tiny_checkpoint(str(tmp_path_factory.mktemp("m") / "c"))).eval()


def test_the_generation_bar_moves_before_any_completion_finishes(tiny_model, monkeypatch):
    monkeypatch.setattr(sampling, "tqdm", Bar)  # (the bar of sampling.Completions)
    prompts, how = [[5, 17, 33], [40, 41]], rollout.Sampling(n=2, max_new_tokens=6)
    rollout.generate(tiny_model, prompts, how, stop_ids=[])  # every completion: 6 tokens
    first_done = next(i for i, e in enumerate(Bar.events) if e[0] == "done")
    assert [e for e in Bar.events[:first_done]] == [("update", 4)] * 5  # a token per slot a step
    assert Bar.events[-1] == ("close", 24, 24)
    # Completions that stop at once give back their unused budget: the bar still ends full.
    rollout.generate(tiny_model, prompts, how,
                     stop_ids=list(range(tiny_model.config.vocab_size)))
    assert Bar.events[-1] == ("close", 4, 4)


def test_real_model_says_what_is_missing_and_where(tmp_path, monkeypatch):
    from conftest import real_model_dir
    monkeypatch.setattr(tiny, "SHARED_MODELS", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} does not exist"):
        tiny.real_model()
    with pytest.raises(pytest.skip.Exception, match=tiny.REAL_GGUF):
        real_model_dir()
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no such file"):
        tiny.real_model()
