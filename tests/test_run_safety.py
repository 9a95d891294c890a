"""A run says what it does, resumes cleanly, refuses bad input before any model loads, and keeps
one live run per --out."""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import checkpoint
import grpo
import model as M
import parallel
import ppo
from conftest import read_metrics
from tiny import make_tiny_checkpoint

FAST = ["--model", "tiny", "--max-new-tokens", "4", "--batch-prompts", "4", "--num-samples", "2"]


@pytest.mark.parametrize("main,flags,needle", [
    (grpo.main, ["--steps", "0"], "--steps 0: must be >= 1"),
    (grpo.main, ["--steps", "-3"], "--steps -3"),
    (grpo.main, ["--micro-tokens", "0"], "--micro-tokens 0"),
    (grpo.main, ["--warmup-steps", "-2"], "--warmup-steps -2"),
    (grpo.main, ["--grad-clip", "-1"], "--grad-clip -1.0"),
    (grpo.main, ["--samples-every", "-1"], "--samples-every -1"),
    (grpo.main, ["--val-size", "-5"], "--val-size -5"),
    (grpo.main, ["--lr", "-1"], "--lr -1.0"),
    (grpo.main, ["--weight-decay", "-1"], "--weight-decay -1.0"),
    (grpo.main, ["--seed", "-1"], "--seed -1"),
    (grpo.main, ["--data", "foo"], "--data: unknown foo"),
    (ppo.main, ["--kl-horizon", "0"], "--kl-horizon 0"),
    (ppo.main, ["--lam", "5"], "--lam 5.0"),
    (ppo.main, ["--gamma", "-1"], "--gamma -1.0"),
    (ppo.main, ["--value-clip", "-1"], "--value-clip -1.0"),
])
def test_bad_flags_name_the_flag_before_anything_loads(main, flags, needle, capsys, monkeypatch):
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit):
        main(FAST + flags)
    assert needle in capsys.readouterr().err


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return str(dst)


def edit_config(change):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        change(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def truncate_weights(d):
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[:len(blob) // 2])


def remove_tokenizer(d):
    for f in os.listdir(d):
        if f.startswith("tokenizer") or f == "chat_template.jinja":
            os.remove(d / f)


def nan_weights(d):
    state = load_file(d / "model.safetensors")
    state["model.norm.weight"][0] = float("nan")
    save_file(state, d / "model.safetensors")


@pytest.mark.parametrize("edit,words", [
    (lambda d: (d / "config.json").write_text("{not json"), ["config.json", "not valid JSON"]),
    (edit_config(lambda c: c.pop("hidden_size")), ["config.json", "missing 'hidden_size'"]),
    (truncate_weights, ["model.safetensors", "cannot read the weights"]),
    (remove_tokenizer, ["no tokenizer files"]),
    (nan_weights, ["non-finite weights", "model.norm.weight"]),
])
def test_bad_checkpoint_files_are_named(tmp_path, edit, words):
    good = make_tiny_checkpoint(str(tmp_path / "good"), "llama")
    bad = broken_copy(good, tmp_path / "bad", edit)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        grpo.main(FAST[2:] + ["--model", bad, "--data", "demo", "--steps", "1",
                              "--out", str(tmp_path / "run")])
    assert all(w in str(err.value) for w in words) and bad in str(err.value), str(err.value)


def test_a_missing_model_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        grpo.main(FAST[2:] + ["--model", str(tmp_path / "nope"), "--data", "demo",
                              "--out", str(tmp_path / "run")])


def test_critic_must_read_the_policys_tokens(tmp_path):
    other = make_tiny_checkpoint(str(tmp_path / "qwen"), "qwen2", vocab_size=400)
    with pytest.raises(ValueError, match="the critic must read the policy's tokens"):
        ppo.main(FAST + ["--critic", other, "--steps", "1", "--out", str(tmp_path / "run")])


def test_a_run_says_what_it_does(tmp_path, capsys):
    out = tmp_path / "run"
    grpo.main(FAST + ["--steps", "2", "--save-every", "1", "--samples-every", "1",
                      "--out", str(out)])
    printed = capsys.readouterr().out
    assert "--max-new-tokens 4" in printed and "memory plan" in printed
    assert f"saved {out / 'step-000001'}" in printed and "metrics.jsonl (a row per step)" in printed
    assert json.loads((out / "run_config.json").read_text())["max_new_tokens"] == 4
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert {"question", "prompt", "prompt_style", "gold", "letter", "format_ok", "reason",
            "answer_leak", "finish", "reward", "completion", "time"} <= set(sample)
    assert not (out / "run.lock").exists()  # released at exit


def test_resume_keeps_each_step_once_and_checks_the_flags(tmp_path, capsys):
    out = str(tmp_path / "run")
    grpo.main(FAST + ["--steps", "4", "--save-every", "2", "--keep-last", "5", "--out", out,
                      "--samples-every", "1"])
    shutil.rmtree(os.path.join(out, "step-000004"))  # killed after logging step 4: resume at 2
    with pytest.raises(ValueError) as err:
        grpo.main(FAST + ["--steps", "4", "--lr", "0.5", "--num-samples", "4", "--out", out,
                          "--resume", "auto"])
    assert "--lr 0.5 (was 0.001)" in str(err.value) and "--num-samples 4 (was 2)" in str(err.value)
    grpo.main(FAST + ["--steps", "5", "--save-every", "3", "--out", out, "--resume", "auto",
                      "--samples-every", "1"])
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    samples = [json.loads(line)["step"] for line in open(os.path.join(out, "samples.jsonl"))]
    assert samples == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # two per step, none twice
    grpo.main(FAST + ["--steps", "6", "--lr", "0.002", "--out", out, "--resume", "auto",
                      "--allow-flag-changes"])
    assert "--lr 0.002 (was 0.001)" in capsys.readouterr().out
    assert read_metrics(out)[-1]["lr"] == pytest.approx(0.002)


def test_resume_refuses_another_world_size(tmp_path):
    out = tmp_path / "run"
    grpo.main(FAST + ["--steps", "1", "--out", str(out)])
    state = out / "step-000001" / "trainer_state.json"
    state.write_text(json.dumps(dict(json.loads(state.read_text()), world=2)))
    with pytest.raises(ValueError, match="saved by 2 ranks, this launch has 1"):
        grpo.main(FAST + ["--steps", "2", "--out", str(out), "--resume", "auto"])


def test_a_launch_that_failed_before_its_first_step_does_not_block(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        grpo.main(FAST + ["--steps", "1", "--max-cache-tokens", "1", "--out", out])
    grpo.main(FAST + ["--steps", "1", "--out", out])  # not refused: no step was logged
    with pytest.raises(FileExistsError, match="--resume auto"):
        grpo.main(FAST + ["--steps", "1", "--out", out])


def test_one_live_run_per_out(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(str(sleeper.pid))
        with pytest.raises(RuntimeError, match=f"another run \\(PID {sleeper.pid}\\)"):
            grpo.main(FAST + ["--steps", "1", "--out", str(out)])
    finally:
        sleeper.kill()
        sleeper.wait()
    grpo.main(FAST + ["--steps", "1", "--out", str(out)])  # a dead PID's lock is stale


def test_a_full_disk_during_a_checkpoint_is_said(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(M, "save_model", full)
    with pytest.raises(OSError, match="disk full while writing .*step-000001.tmp"):
        grpo.main(FAST + ["--steps", "1", "--out", str(tmp_path / "run")])


def test_an_unwritable_out_is_said_before_models_load(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(checkpoint, "take_lock", denied)
    monkeypatch.setattr(parallel, "load_sharded", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(PermissionError, match="cannot write there"):
        grpo.main(FAST + ["--steps", "1", "--out", str(tmp_path / "run")])


def test_drop_zero_var_when_every_group_is_dead(tmp_path):
    out = str(tmp_path / "run")
    grpo.main(FAST + ["--steps", "1", "--reward-values", "0,0,0", "--drop-zero-var", "--out", out])
    row = read_metrics(out)[0]
    assert row["zero_var_frac"] == 1.0 and row["update_skipped"] == 1
