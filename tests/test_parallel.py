"""Distributed pieces under torchrun (2 CPU ranks, gloo): sharded loading from one host copy and
the gradient memory of the update (tests/fsdp_check.py does the work inside the ranks)."""
import json

from safetensors.torch import load_file, save_file

from conftest import ROOT
from ranks import torchrun
from tiny import make_tiny_checkpoint


def test_sharded_load_and_gradient_memory(tmp_path):
    ckpt = make_tiny_checkpoint(str(tmp_path / "qwen"), "qwen2", seed=3)  # tied embeddings
    broken = tmp_path / "broken"
    make_tiny_checkpoint(str(broken), "qwen2", seed=3)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors")
    out = tmp_path / "out.json"
    torchrun(ROOT / "tests" / "fsdp_check.py", [ckpt, str(broken), str(out)], tmp_path)
    r = json.loads(out.read_text())
    assert r["same_as_single_process"]
    assert r["local_params"] < 0.6 * r["full_params"]  # rank 0 holds about half
    # Gradients stay sharded between micro-batches: about half the fp32 parameter bytes per rank,
    # not the full unsharded gradient that skipping the reduce-scatter would keep.
    assert r["micro_batches"] >= 3
    assert 0.3 * r["full_param_bytes"] < r["grad_bytes_between_micro_batches"] < 0.6 * r["full_param_bytes"]
    assert len(r["load_errors"]) == 2
    assert all("broken" in e and "up_proj" in e for e in r["load_errors"]), r["load_errors"]


def test_bf16_checkpointed_update_under_torch_2_12_recompute(tmp_path):
    """FSDP2 mixed precision (bf16 compute, fp32 master weights) with activation checkpointing,
    FSDP2's casts skipped in the recompute as torch <= 2.12 does: the update completes, in bf16,
    and moves every weight (with FSDP2 casting forward inputs, the recompute's fp32 RoPE tables
    met saved bf16 ones: CheckpointError). Then sampling with the gathered weights runs a plain
    model, exactly as a bf16 model of those weights samples."""
    ckpt = make_tiny_checkpoint(str(tmp_path / "llama"), "llama", seed=1)
    out = tmp_path / "out.json"
    torchrun(ROOT / "tests" / "fsdp_mixed_check.py", [ckpt, str(out)], tmp_path)
    reports = json.loads(out.read_text())
    assert len(reports) == 2
    for r in reports:
        assert "error" not in r, r.get("trace")
        assert r["compute_dtypes"] == ["torch.bfloat16"]
        assert r["finite"] and r["changed"] == r["params"] and r["grad_norm"] > 0
        # sampling under Gathered: a plain bf16 model, no FSDP hooks, as a plain model samples
        assert r["gathered_fsdp_modules"] == 0 and r["gathered_dtype"] == "torch.bfloat16"
        assert r["same_tokens"] and r["logprob_max_diff"] == 0.0
