"""evaluate.py: metrics against hand-computed values (scripted generation), the CLI on the real
benchmark files, torchrun parity, pass-rate files for the difficulty mix, and flag errors."""
import json

import numpy as np
import pytest
from conftest import ROOT, SHARED_DATA
from ranks import torchrun

import data
import evaluate
import reward
from evaluate import Generation
from tiny import make_tiny_checkpoint

OPTIONS = {"A": "heart", "B": "lung", "C": "liver", "D": "kidney"}
# Three scripted completions per question, with what the strict parser (boxed) makes of them.
SCRIPT = [
    ("A", ["\\boxed{A}", "\\boxed{A}", "\\boxed{B}"]),      # right, right, wrong; majority A
    ("B", ["\\boxed{C}", "The answer is B", "\\boxed{C}"]),  # wrong, format (lenient B), wrong
    ("A", ["\\boxed{C}", "\\boxed{A}", "no idea"]),         # tie C/A: C was seen first -> wrong
    ("D", ["garbage", "I pick D", "\\boxed{E}"]),           # all format failures, none lenient
]


def scripted(questions, offset):
    """Stand-in for generation: the SCRIPT completions of each question, 10/20/30 tokens."""
    return [Generation(f"prompt {q.id}", SCRIPT[int(q.id[1:])][1], [10, 20, 30], ["stop", "stop", "length"])
            for q in questions]


def questions():
    return [data.Question(f"q{i}", f"question {i}", dict(OPTIONS), key, "scripted")
            for i, (key, _) in enumerate(SCRIPT)]


def test_metrics_match_hand_computed_values():
    metrics, records = evaluate.evaluate_benchmark(questions(), scripted, "boxed", n_boot=1000, seed=0)
    # correct: q0 [1 1 0], q1 [0 0 0], q2 [0 1 0], q3 [0 0 0]
    assert metrics["questions"] == 4 and metrics["n"] == 3
    assert metrics["accuracy"] == pytest.approx(3 / 12)
    assert metrics["majority_accuracy"] == pytest.approx(1 / 4)  # only q0; q2's tie goes to C
    assert metrics["pass_at_n"] == pytest.approx(2 / 4)
    assert metrics["format_failure_rate"] == pytest.approx(5 / 12)
    assert metrics["lenient_extra"] == 1  # "The answer is B" ("I pick D" declares nothing)
    assert metrics["lenient_accuracy"] == pytest.approx(4 / 12)
    assert metrics["mean_response_tokens"] == pytest.approx(20.0)
    assert metrics["truncation_rate"] == pytest.approx(1 / 3)
    assert [r["majority"] for r in records] == ["A", "C", "C", None]
    assert [s["lenient_letter"] for s in records[1]["samples"]] == [None, "B", None]
    assert [s["lenient_letter"] for s in records[3]["samples"]] == [None, None, None]
    # Bootstrap: recomputed with the same seed by an explicit loop, and near the analytic value.
    per_q = np.array([2 / 3, 0, 1 / 3, 0])
    rng = np.random.default_rng(0)
    means = [per_q[rng.integers(0, 4, size=4)].mean() for _ in range(1000)]
    assert metrics["bootstrap_std"] == pytest.approx(np.std(means), rel=1e-12)
    assert metrics["bootstrap_std"] == pytest.approx(np.sqrt(per_q.var() / 4), rel=0.1)


def test_bootstrap_std_analytic_and_degenerate():
    scores = (np.random.default_rng(1).random(400) < 0.3).astype(float)
    p = scores.mean()
    assert evaluate.bootstrap_std(scores, 1000, seed=0) == pytest.approx(np.sqrt(p * (1 - p) / 400), rel=0.1)
    assert evaluate.bootstrap_std(np.ones(10)) == 0.0


def test_majority_and_lenient_rules():
    assert evaluate.majority_vote(["B", None, "A", "A", "B"]) == "B"  # tie: B was seen first
    assert evaluate.majority_vote([None, None]) is None
    assert reward.lenient_letter("so the answer is (C), not A", OPTIONS) == "C"
    assert reward.lenient_letter("between A and B ... B", OPTIONS) is None  # no declaration
    assert reward.lenient_letter("I think E", OPTIONS) is None  # "I", "E" are not options


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ckpt"), "llama")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


REAL = ["medqa", "medmcqa", "pubmedqa", "mmlu_medical", "mmlu_pro_health", "medxpertqa"]


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs the real benchmark files in ../shared/data")
def test_cli_on_real_files(ckpt, tmp_path, capsys):
    default = evaluate.parse_args([ckpt]).benchmarks
    assert default == ["medqa", "medmcqa", "pubmedqa", "mmlu_pro_health", "gpqa_medical", "medxpertqa"]
    names = ",".join(REAL + ["gpqa_medical"])
    evaluate.main([ckpt, "--data-dir", str(SHARED_DATA), "--limit", "3", "--max-new-tokens", "8",
                   "--benchmarks", names, "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())["benchmarks"]
    assert list(results) == REAL + ["gpqa_medical"]
    for name in REAL:
        assert results[name]["questions"] == 3 and results[name]["n"] == 1
        assert set(results[name]) >= {"accuracy", "bootstrap_std", "format_failure_rate", "majority_accuracy",
                                      "pass_at_n", "lenient_extra", "lenient_accuracy", "mean_response_tokens"}
        records = read_jsonl(tmp_path / f"{name}.jsonl")
        assert len(records) == 3 and all(len(r["samples"]) == 1 for r in records)
        assert {"prompt", "answer", "samples"} <= set(records[0])
        assert {"completion", "letter", "correct"} <= set(records[0]["samples"][0])
    assert results["gpqa_medical"]["skipped"] and "gpqa_main.csv" in results["gpqa_medical"]["reason"]
    out = capsys.readouterr().out
    assert "skipping gpqa_medical" in out and out.splitlines()[-2].startswith("gpqa_medical")
    assert out.splitlines()[-1].startswith(f"results: {tmp_path / 'results.json'}")


MEDQA_ROWS = [
    {"question": "Which organ pumps blood?", "options": OPTIONS, "answer_idx": "A"},
    {"question": "Which organ takes in air?", "options": OPTIONS, "answer_idx": "B"},
    {"question": "Which organ makes bile?", "options": OPTIONS, "answer_idx": "C"},
    {"question": "Which organ filters urine?", "options": OPTIONS, "answer_idx": "D"},
    {"question": "Which organ is the largest gland?", "options": OPTIONS, "answer_idx": "C"},
]


@pytest.fixture
def data_dir(tmp_path):
    """A medqa test file (5 questions) laid out like ../shared/data."""
    d = tmp_path / "data"
    d.mkdir()
    lines = [json.dumps(r) for r in MEDQA_ROWS]
    (d / data.BENCHMARKS["medqa"]["file"]).write_text("\n".join(lines) + "\n")
    return d


def test_torchrun_two_processes_match_one(ckpt, data_dir, tmp_path):
    flags = ["--data-dir", str(data_dir), "--benchmarks", "medqa,demo", "--limit", "5", "--num-samples", "2",
             "--temperature", "1", "--max-new-tokens", "6", "--seed", "3"]
    evaluate.main([ckpt, *flags, "--out", str(tmp_path / "one")])
    torchrun(ROOT / "evaluate.py", [ckpt, *flags, "--out", str(tmp_path / "two")], tmp_path)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["benchmarks"] == two["benchmarks"]
    for name in ("medqa", "demo"):
        a, b = (read_jsonl(tmp_path / d / f"{name}.jsonl") for d in ("one", "two"))
        assert a == b and len(a) == 5
    assert len({s["completion"] for r in a for s in r["samples"]}) > 1  # really sampled


def test_pass_rates_for_difficulty_mix(ckpt, data_dir, tmp_path):
    evaluate.main([ckpt, "--data-dir", str(data_dir), "--benchmarks", "medqa", "--num-samples", "3", "--pass-rates",
                   "--max-new-tokens", "6", "--out", str(tmp_path)])
    records = read_jsonl(tmp_path / "medqa.jsonl")
    rates = read_jsonl(tmp_path / "pass_rates.jsonl")
    assert [r["id"] for r in rates] == [r["id"] for r in records] and all(r["n"] == 3 for r in rates)
    assert [r["correct"] for r in rates] == [sum(s["correct"] for s in r["samples"]) for r in records]
    # data.difficulty_mix reads the file back: every question, with its pass rate.
    qs = data.load_benchmark_dir("medqa", data_dir)
    levels = {"easy": 0, "medium": 0, "hard": 0}
    for r in rates:
        levels["hard" if r["correct"] <= 1 else "easy" if r["correct"] >= 2 else "medium"] += 1
    mixed = data.difficulty_mix(qs, tmp_path / "pass_rates.jsonl", levels)
    got = {q.id: q.meta["pass_rate"] for q in mixed}
    assert got == {r["id"]: r["correct"] / 3 for r in rates}


def test_bad_flags_and_missing_files(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args([ckpt, "--benchmarks", "medqa,nope"])
    err = capsys.readouterr().err
    assert "nope" in err and "known: medqa, medmcqa" in err
    with pytest.raises(SystemExit):
        evaluate.parse_args([ckpt, "--num-samples", "0"])
    assert "--num-samples must be >= 1, got 0" in capsys.readouterr().err
    args = evaluate.parse_args([ckpt, "--num-samples", "4", "--pass-rates"])
    assert args.n == 4 and args.temperature == 1.0 and args.pass_rates
    args = evaluate.parse_args([ckpt, "--format", "think_answer"])
    assert args.prompt_style == "medrlvr" and args.temperature == 0.0
    with pytest.raises(FileNotFoundError, match="medqa_us_4opt_test.jsonl"):  # only GPQA is optional
        evaluate.main([ckpt, "--data-dir", str(tmp_path), "--benchmarks", "medqa,gpqa_medical",
                       "--out", str(tmp_path / "out")])


def test_results_live_beside_their_checkpoint_and_never_mix(data_dir, tmp_path, monkeypatch):
    ckpt = make_tiny_checkpoint(str(tmp_path / "ckpt"), "llama")
    flags = ["--data-dir", str(data_dir), "--benchmarks", "medqa,demo", "--limit", "2",
             "--max-new-tokens", "4"]
    evaluate.main([ckpt, *flags])
    out = tmp_path / "ckpt" / "eval"  # the default: beside the checkpoint
    assert json.loads((out / "results.json").read_text())["checkpoint"] == ckpt
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate.main([ckpt, *flags])
    # --overwrite removes the first run's files: a run on medqa alone leaves no stale demo.jsonl.
    # It crashes on its second benchmark: the first one's results are on disk already.
    real = evaluate.benchmark_questions
    monkeypatch.setattr(evaluate, "benchmark_questions",
                        lambda name, args: real(name, args) if name == "medqa" else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        evaluate.main([ckpt, *flags, "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["medqa.jsonl", "results.json"]
    assert list(json.loads((out / "results.json").read_text())["benchmarks"]) == ["medqa"]


def test_an_empty_benchmark_file_is_named(tmp_path):
    (tmp_path / data.BENCHMARKS["medqa"]["file"]).write_text("")
    args = evaluate.parse_args(["x", "--data-dir", str(tmp_path), "--benchmarks", "medqa"])
    with pytest.raises(ValueError, match=f"medqa: no questions in {tmp_path}"):
        evaluate.benchmark_questions("medqa", args)
