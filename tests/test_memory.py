"""memory.py: the plan's bytes against the tensors a real run allocates, and --plan for the two
recipes from their public config.json values."""
import json

import pytest
import torch

import grpo
import decode_cpu
import memory
import model as M
import ppo
import rl
import rollout as R
from parallel import Dist
from tiny import make_tiny_checkpoint

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 131072, "tie_word_embeddings": False,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
QWEN_3B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 2048, "intermediate_size": 11008,
           "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
           "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "max_position_embeddings": 32768, "tie_word_embeddings": True,
           "use_sliding_window": False}


def row(plan, prefix, phase):
    """Bytes of the plan's row starting with `prefix` in phase 1 (generate), 2 (score), 3 (update)."""
    hits = [r for r in plan.rows if r[0].startswith(prefix)]
    assert len(hits) == 1, (prefix, [r[0] for r in plan.rows])
    return hits[0][phase]


def test_plan_matches_what_a_small_run_allocates(tmp_path):
    path = make_tiny_checkpoint(str(tmp_path / "m"), "qwen2", seed=0)
    args = grpo.get_args(["--model", path, "--batch-prompts", "3", "--num-samples", "2",
                          "--max-new-tokens", "5", "--max-cache-tokens", "100000"])
    cfg = M.read_config(path)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14]]
    plan = memory.plan(cfg, args, world=1, cuda=False, prompt_len=7)
    policy = rl.Trainable.load("policy", path, args.lr, args, Dist())
    weights = sum(p.numel() * p.element_size() for p in policy.module.parameters())
    caches = []
    real_cache = decode_cpu.KVCache.__init__

    def record(self, *a, **k):
        real_cache(self, *a, **k)
        caches.append(self.nbytes)
    decode_cpu.KVCache.__init__ = record
    try:
        R.generate(policy.module, prompts, R.Sampling(n=2, max_new_tokens=5), stop_ids=[],
                   progress=False)
    finally:
        decode_cpu.KVCache.__init__ = real_cache
    batch = [rl.Completion(None, 0, p, [1, 2], torch.zeros(2), "stop") for p in prompts]
    mb = rl.micro_batches(batch, 10_000, "cpu")[0]
    rl.logprobs(policy.module, mb)[0].sum().backward()
    grads = sum(p.grad.nbytes for p in policy.module.parameters())
    policy.opt.step()
    moments = sum(t.nbytes for s in policy.opt.state.values() for t in s.values() if t.dim() > 0)
    assert row(plan, "policy: fp32 weights", 3) == pytest.approx(weights, rel=0.02)
    assert row(plan, "policy: fp32 gradients", 3) == pytest.approx(grads, rel=0.02)
    assert row(plan, "policy: AdamW moments", 3) == pytest.approx(moments, rel=0.02)
    assert caches and row(plan, "KV cache", 1) == pytest.approx(caches[0], rel=0.02)


def write_config(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_plan_for_the_alphamed_recipe_on_8_gpus(tmp_path, capsys):
    grpo.main(["--model", write_config(tmp_path, LLAMA_8B), "--plan", "--plan-world", "8",
               "--plan-device", "cuda"])
    out = capsys.readouterr().out
    assert "8 x CUDA" in out and "reference (shard)" in out and "planned peak" in out
    weights = next(line for line in out.splitlines() if line.startswith("policy: fp32 weights"))
    assert float(weights.split()[-1]) == pytest.approx(4 * 8.03e9 / 8 / 1e9, rel=0.01)
    peak = float(out.split("planned peak: ")[1].split()[0])
    assert 50 < peak < 80  # fits an 80 GB GPU, generation dominated by the KV cache


def test_plan_for_the_medrlvr_recipe(tmp_path, capsys):
    ppo.main(["--model", write_config(tmp_path, QWEN_3B), "--plan", "--plan-world", "8",
              "--plan-device", "cuda"])
    out = capsys.readouterr().out
    assert "critic: AdamW moments" in out and "policy: AdamW moments" in out
    moments = next(line for line in out.splitlines() if line.startswith("critic: AdamW"))
    assert float(moments.split()[-1]) == pytest.approx(8 * 3.09e9 / 8 / 1e9, rel=0.03)
