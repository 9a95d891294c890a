"""Training offline on local files: --data-dir / --exclude decide every benchmark read, bad data
flags fail before any model loads, and a hub checkpoint brings every file it needs."""
import fnmatch
import json
import os
import shutil

import pytest

import grpo
import loop
import model as M
from parallel import Dist
from tiny import make_tiny_checkpoint

OPTIONS = {"A": "heart", "B": "lung", "C": "liver", "D": "kidney"}


def medqa_file(path, questions):
    rows = [{"question": q, "options": OPTIONS, "answer_idx": "A"} for q in questions]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A raw-file folder: a MedQA "test" file and a training file sharing one question. Any hub
    access fails the test."""
    import data
    monkeypatch.setattr(data, "_hub_rows", lambda *a: pytest.fail(f"the hub was asked: {a}"))
    d = tmp_path / "data"
    d.mkdir()
    medqa_file(d / "medqa_us_4opt_test.jsonl", ["Which organ pumps blood?"])
    medqa_file(d / "medqa_us_4opt_train.jsonl", ["Which organ pumps blood?", "Which makes bile?",
                                                 "Which filters urine?"])
    return d


def test_data_dir_reads_training_sources_and_exclusions_locally(data_dir, capsys):
    args = grpo.get_args(["--model", "x", "--data", "medqa_train", "--data-dir", str(data_dir),
                          "--exclude", "medqa"])
    train, _ = loop.training_questions(args, Dist())
    assert sorted(q.question for q in train) == ["Which filters urine?", "Which makes bile?"]
    args = grpo.get_args(["--model", "x", "--data", "medqa_train", "--data-dir", str(data_dir),
                          "--exclude", "none"])
    train, _ = loop.training_questions(args, Dist())
    assert len(train) == 3 and "--exclude none" in capsys.readouterr().out


@pytest.mark.parametrize("flags,needle", [
    (["--data", "medqa_trian"], "--data: unknown medqa_trian"),
    (["--exclude", "medqa,nope"], "--exclude: unknown nope"),
    (["--data", "medqa_train=/no/such/file.jsonl"], "--data medqa_train=/no/such/file.jsonl: no such file"),
    (["--data-dir", "/no/such/dir"], "--data-dir /no/such/dir: no such directory"),
])
def test_bad_data_flags_fail_before_anything_loads(flags, needle, capsys):
    with pytest.raises(SystemExit):
        grpo.get_args(["--model", "x"] + flags)
    assert needle in capsys.readouterr().err


def test_hub_checkpoint_brings_its_chat_template(tmp_path, monkeypatch):
    """model.resolve's download patterns, against a local stand-in for the hub: the checkpoint
    it gets has the chat template (transformers 5 keeps it in chat_template.jinja)."""
    hub = make_tiny_checkpoint(str(tmp_path / "hub" / "org" / "name"), "qwen2")
    assert os.path.exists(os.path.join(hub, "chat_template.jinja"))

    def snapshot_download(repo_id, allow_patterns):
        out = tmp_path / "snapshot"
        out.mkdir()
        for f in os.listdir(tmp_path / "hub" / repo_id):
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                shutil.copy(tmp_path / "hub" / repo_id / f, out / f)
        return str(out)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    local = M.resolve("org/name")
    assert sorted(os.listdir(local)) == sorted(os.listdir(hub))
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(local).chat_template


def test_missing_model_dir_is_named():
    with pytest.raises(FileNotFoundError, match="runs/nope/step-000010: no such directory"):
        M.resolve("runs/nope/step-000010")


def test_an_exclusion_that_removes_everything_says_so(data_dir):
    medqa_file(data_dir / "medqa_us_4opt_train.jsonl", ["Which organ pumps blood?"])
    args = grpo.get_args(["--model", "x", "--data", "medqa_train", "--data-dir", str(data_dir),
                          "--exclude", "medqa"])
    with pytest.raises(ValueError, match="no training questions left after removing --exclude "
                                         "medqa \\(medqa_train: 1 before\\)"):
        loop.training_questions(args, Dist())


def test_a_tokenizer_without_chat_template_is_said(tmp_path, capsys):
    path = make_tiny_checkpoint(str(tmp_path / "m"), "llama")
    os.remove(os.path.join(path, "chat_template.jinja"))
    cfg = os.path.join(path, "tokenizer_config.json")
    with open(cfg) as f:
        tokenizer_config = json.load(f)
    tokenizer_config.pop("chat_template", None)
    with open(cfg, "w") as f:
        json.dump(tokenizer_config, f)
    loop.load_tokenizer(path, say=True)
    assert "has no chat template: prompts are plain" in capsys.readouterr().out
