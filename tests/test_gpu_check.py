"""bench/gpu_check.py at its tiny CPU shapes, so the GPU check cannot rot between GPU sessions; and
its runner: the report rewritten after every stage, a failing stage recorded and passed, a killed
run's report holding the stages before it, the report under $OUT."""
import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest

from conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"
STAGES = ["environment", "varlen_attention", "parity", "logprob_precision", "fsdp_numerics",
          "decode_syncs", "grpo", "throughput"]
# Cheap stages for the runner tests: a planted stage sits between two that run before it and one
# that runs after it.
FEW = "environment,varlen_attention,logprob_precision,decode_syncs"


def run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


def run_planted(stage_code: str, out) -> subprocess.CompletedProcess:
    """gpu_check imported as a module, its logprob_precision stage replaced by `stage_code` (the
    body of a stage function), then main() on the FEW stages."""
    code = (f"import importlib.util, os, sys\n"
            f"spec = importlib.util.spec_from_file_location('gpu_check', {str(SCRIPT)!r})\n"
            f"gc = importlib.util.module_from_spec(spec)\n"
            f"spec.loader.exec_module(gc)\n"
            f"def planted(check, out):\n"
            f"    {stage_code}\n"
            f"gc.logprob_precision = planted\n"
            f"sys.exit(gc.main(['--tiny', '--stages', {FEW!r}, '--out', {str(out)!r}]))\n")
    return run(["-c", code])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full --tiny run, shared: (report, stdout)."""
    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    proc = run([str(SCRIPT), "--tiny", "--grpo-steps", "2", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_stage_runs_on_cpu(tiny_run):
    report, stdout = tiny_run
    assert list(report["stages"]) == STAGES and report["finished"] and "running" not in report
    for name, stage in report["stages"].items():
        assert "error" not in stage, (name, stage.get("traceback"))
        assert stage["seconds"] > 0
    assert report["stages"]["decode_syncs"]["skipped"].startswith("needs CUDA")
    assert "summary" in stdout and "ratio" in stdout and "report:" in stdout


def test_parity_and_throughput_at_tiny_shapes(tiny_run):
    stages = tiny_run[0]["stages"]
    for shape in ("tiny", "tiny-wide"):
        r = stages["parity"][shape]
        assert r["logits_max_abs_diff"] < 1e-4 and r["logprob_max_abs_diff"] < 1e-4  # fp32
        assert r["shared_prefix_logprob_max_abs_diff"] < 1e-4
        assert r["greedy"]["greedy_tokens_equal"] == 1.0 and r["greedy"]["greedy_ok"]
        assert stages["throughput"][shape]["decode_kernel"] == "gather"  # the paged engine's
        t = stages["throughput"][shape]["rows_8"]
        g, e = t["graphs"], t["eager"]  # the CUDA-graph runs (through the double) and eager
        assert g["tok_s"] > 0 and t["transformers_tok_s"] > 0 and e["tok_s"] > 0
        assert g["decode_steps"] == 15  # 16 tokens: the first from the prefill
        assert 0 < g["decode_roofline_fraction"] <= 1
        # the steps timed again without attention over the cache: the same steps, faster (at the
        # tiny shapes on one CPU thread attention is ~35-40% of a step; timing noise is ~10%)
        assert g["decode_steps_without_attention"] == g["decode_steps"]
        assert 0.1 < g["attention_fraction"] < 1


def test_varlen_attention_through_the_double(tiny_run):
    """The CUDA branch (torch_varlen) ran on the double as torch 2.11 and 2.13 present it, and
    matches the explicit-mask reference in fp32, gradients included."""
    stage = tiny_run[0]["stages"]["varlen_attention"]
    for version in ("2.11", "2.13"):
        r = stage[f"double-{version}"]
        assert r["backend"] == "varlen"
        for check in ("packed", "shared_keys"):
            c = r[check]
            assert c["ok"] and (c["tokens_q"] < c["tokens_k"]) == (check == "shared_keys")
            diffs = [c[f"{x}_max_abs_diff"] for x in ("out", "grad_q", "grad_k", "grad_v")]
            assert max(diffs) < 1e-5
        probe = r["gqa_without_enable_gqa"]
        assert probe["runs"] or probe["exception"]  # an outcome either way
        assert r["memory"]["tokens"] == 64 and r["memory"]["varlen"]["ms"] > 0


def test_logprob_precision_and_fsdp_numerics(tiny_run):
    stages = tiny_run[0]["stages"]
    lp = stages["logprob_precision"]
    assert 20 < lp["logits_row_max_mean"] < 30  # sharpened to a real model's range
    p = lp["precision"]
    # the forward's logits and the trainer's chunks: fp32 sums of the bf16 hidden states' exact
    # products, so within fp32 rounding of the float64 head and of each other
    assert p["forward_vs_head_fp64_max_abs_diff"] < 1e-4
    assert p["trainer_vs_head_fp64_max_abs_diff"] < 1e-4
    assert p["trainer_vs_forward_max_abs_diff"] < 1e-4
    assert p["tokens"] > 0 and p["trainer_vs_sampler_max_abs_diff"] < 1.0
    assert lp["timing"]["ms"] > 0
    f = stages["fsdp_numerics"]
    assert f["process_group"] == "gloo" and f["compute_dtype"] == "torch.bfloat16"
    assert f["logprobs"]["logprob_max_abs_diff"] < 1e-4  # both compute in bf16 from equal weights
    c = f["checkpointed_backward"]
    assert c["grads_finite"] and c["same_count"] and c["grad_max_rel_diff"] < 1e-6
    assert f["gathered_greedy"]["tokens_equal"] == 1.0


def test_grpo_stage_reuses_the_process_group(tiny_run):
    grpo = tiny_run[0]["stages"]["grpo"]
    assert grpo["steps"] == 2 and set(grpo["phases"]) == {"generate", "score", "update"}
    assert all(grpo["plan"][phase] > 0 for phase in ("generate", "score", "update"))
    assert grpo["process_group"] == "gloo (reused)"  # fsdp_numerics' group, kept for grpo.main


def test_report_goes_to_OUT_without_out(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    proc = run([str(SCRIPT), "--tiny", "--stages", "environment"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(report["stages"]) == ["environment"] and report["finished"]


def test_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path):
    out = tmp_path / "report.json"
    proc = run_planted("out['found'] = 1; raise ValueError('planted failure')", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads(out.read_text())["stages"]
    assert list(stages) == FEW.split(",")
    failed = stages["logprob_precision"]
    assert failed["error"] == "ValueError: planted failure" and failed["found"] == 1
    assert "planted" in failed["traceback"] and failed["seconds"] >= 0
    assert stages["environment"]["torch"] and stages["varlen_attention"]["double-2.11"]["packed"]
    assert "error" not in stages["varlen_attention"] and "skipped" in stages["decode_syncs"]
    assert "FAILED: ValueError: planted failure" in proc.stdout


def test_a_killed_run_keeps_the_stages_before(tmp_path):
    out = tmp_path / "report.json"
    proc = run_planted("os._exit(3)", out)
    assert proc.returncode == 3
    report = json.loads(out.read_text())
    assert list(report["stages"]) == ["environment", "varlen_attention", "logprob_precision"]
    assert report["running"] == "logprob_precision" and "finished" not in report
    assert report["stages"]["environment"]["seconds"] > 0
    assert report["stages"]["varlen_attention"]["double-2.13"]["shared_keys"]["ok"]


def test_an_unwritable_report_is_a_nonzero_exit(tmp_path):
    (tmp_path / "file").write_text("")
    proc = run([str(SCRIPT), "--tiny", "--stages", "environment", "--out",
                str(tmp_path / "file" / "report.json")])
    assert proc.returncode != 0 and "cannot write the report" in proc.stderr


def decode():  # named as rollout.Engine's decode step, whose syncs the stage attributes to it
    warnings.warn("called a synchronizing CUDA operation")


def test_sync_sites_names_the_project_frame_and_step():
    """decode_syncs' counting (the stage needs CUDA's sync debug mode; this plants the warning)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)

    def generate():
        for _ in range(3):
            decode()
        warnings.warn("something else")  # passed on, not counted
    with pytest.warns(UserWarning) as shown:
        sites = gc.sync_sites(generate, debug=False)
    line = decode.__code__.co_firstlineno + 1
    assert sites == [(f"tests/test_gpu_check.py:{line} decode", "decode")] * 3
    assert [str(w.message) for w in shown] == ["something else"]
    summary = gc.summarise_syncs(sites, steps=3)
    assert summary["per_step"] == 1.0 and summary["by_phase"]["decode"] == 3
    assert summary["sites"] == [dict(where=sites[0][0], phase="decode", count=3)]


def test_a_failed_check_at_any_depth_fails_its_stage():
    """throughput nests shape -> rows -> mode: a mode's failure (the CUDA-graph runs, say) must
    mark the stage failed, not pass unseen."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    out = {"llama-8b": {"decode_kernel": "gather", "rows_64": {
        "eager": {"tok_s": 1.0}, "graphs": {"error": "RuntimeError: capture", "traceback": "tb"}}}}
    gc.mark_failed_checks(out)
    assert gc.status(out).startswith("FAILED: llama-8b.rows_64.graphs: RuntimeError: capture")
    fine = {"tiny": {"rows_8": {"eager": {"tok_s": 1.0}}}}
    gc.mark_failed_checks(fine)
    assert gc.status(fine) == "ok"
