"""bench/gpu_check.py at its tiny CPU shapes, so the GPU check cannot rot between GPU sessions."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny",
                           "--grpo-steps", "2", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for shape in ("tiny", "tiny-wide"):
        r = report["shapes"][shape]
        assert r["logits_max_abs_diff"] < 1e-4 and r["logprob_max_abs_diff"] < 1e-4  # fp32
        assert r["shared_prefix_logprob_max_abs_diff"] < 1e-4
        assert r["greedy_tokens_equal"] == 1.0
        t = r["throughput"]
        assert t["medrl_tok_s"] > 0 and t["transformers_tok_s"] > 0 and t["decode_steps"] > 0
        assert 0 < t["decode_roofline_fraction"] <= 1
        # the steps timed again without attention over the cache: the same steps, faster (at the
        # tiny shapes on one CPU thread attention is ~35-40% of a step; timing noise is ~10%)
        assert t["decode_steps_without_attention"] == t["decode_steps"]
        assert 0.1 < t["attention_fraction"] < 1
    grpo = report["grpo"]
    assert grpo["steps"] == 2 and set(grpo["phases"]) == {"generate", "score", "update"}
    assert all(grpo["plan"][phase] > 0 for phase in ("generate", "score", "update"))
    assert "ratio" in proc.stdout and "report:" in proc.stdout
