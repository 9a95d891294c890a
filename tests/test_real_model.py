"""A real pretrained model (SmolLM2-135M-Instruct from ../shared/models: GQA 9/3 heads, tied
embeddings, vocab 49,152, ChatML) on real benchmark prompts: parity with transformers, stopping on
<|im_end|>, sampler log-probs, checkpoint round trip, evaluate.py, and one GRPO / PPO step each.
Skipped when ../shared is absent."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import evaluate
import grpo
import model as M
import ppo
import rollout as R
from conftest import SHARED_DATA, read_metrics, real_model_dir


@pytest.fixture(scope="module")
def real():
    path = real_model_dir()
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is absent")
    tok = AutoTokenizer.from_pretrained(path)
    questions = data.load_benchmark_dir("medqa", SHARED_DATA)[:2]
    prompts = [data.encode_prompt(tok, q, "alphamed") for q in questions]
    hello = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    add_generation_prompt=True, tokenize=False)
    prompts.append(tok.encode(hello, add_special_tokens=False))  # answers, then <|im_end|>
    return dict(path=path, tok=tok, model=M.load_model(path).eval(), prompts=prompts,
                hf=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())


def test_real_logits_and_packed_logprobs_match_transformers(real):
    torch.manual_seed(0)
    seqs = [p + torch.randint(0, 49152, (12,)).tolist() for p in real["prompts"][:2]]
    ids, pos, cu, max_seqlen = M.pack(seqs)
    ours = real["model"](ids, pos, cu, max_seqlen)  # (N, V)
    with torch.no_grad():
        ref = torch.cat([real["hf"](torch.tensor([s])).logits[0] for s in seqs])
    assert ours.shape == ref.shape and (ours - ref).abs().max() < 1e-3
    targets = torch.roll(ids, -1)
    logp, _ = real["model"](ids, pos, cu, max_seqlen, targets=targets, temperature=0.7)
    ref_logp = (ref / 0.7).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    assert (logp - ref_logp).abs().max() < 1e-4


@pytest.fixture(params=["cpu path", "paged engine"])
def engine(request, monkeypatch):
    """Each sampler engine: decode_cpu.py's (the CPU default) and the paged one (the GPU's)."""
    if request.param == "paged engine":
        monkeypatch.setattr(R, "CPU_DECODE", set())
    return request.param


def test_real_greedy_rollout_equals_transformers_generate(real, engine):
    tok, stop = real["tok"], real["tok"].convert_tokens_to_ids("<|im_end|>")
    assert stop in R.stop_ids_for(real["model"], tok)
    out = R.generate(real["model"], real["prompts"], R.Sampling(max_new_tokens=24, temperature=0),
                     stop_ids=R.stop_ids_for(real["model"], tok), progress=False)
    for prompt, sample in zip(real["prompts"], out):
        ref = real["hf"].generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                  eos_token_id=stop, pad_token_id=stop)[0, len(prompt):].tolist()
        assert sample.response_ids == ref[:len(sample.response_ids)]
        assert sample.finish_reason == ("stop" if stop in ref else "length")
    assert out[-1].finish_reason == "stop" and "Paris" in tok.decode(out[-1].response_ids)
    assert out[-1].response_ids[-1] == stop


def test_real_sampler_logprobs_match_a_fresh_forward(real, engine):
    sampling = R.Sampling(n=2, max_new_tokens=16, temperature=0.7, seed=3)
    out = R.generate(real["model"], real["prompts"][:2], sampling, stop_ids=[], progress=False)
    seqs = [s.prompt_ids + s.response_ids for s in out]
    ids, pos, cu, max_seqlen = M.pack(seqs)
    logp, _ = real["model"](ids, pos, cu, max_seqlen, targets=torch.roll(ids, -1), temperature=0.7)
    for s, start in zip(out, cu[:-1].tolist()):
        first = start + len(s.prompt_ids) - 1  # the row predicting the first response token
        fresh = logp[first:first + len(s.response_ids)]
        assert torch.allclose(fresh, torch.tensor(s.logprobs), atol=1e-4)


def test_real_checkpoint_round_trip_through_transformers(real, tmp_path):
    M.save_model(real["model"], real["tok"], str(tmp_path / "ckpt"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    ids = torch.tensor([real["prompts"][2]])
    with torch.no_grad():
        assert (hf(ids).logits - real["hf"](ids).logits).abs().max() < 1e-5
    assert tok.chat_template == real["tok"].chat_template


def test_real_evaluate_end_to_end(real, tmp_path):
    results = evaluate.main([real["path"], "--data-dir", str(SHARED_DATA), "--benchmarks", "medqa",
                             "--limit", "2", "--max-new-tokens", "16", "--out", str(tmp_path)])
    assert results["medqa"]["questions"] == 2
    records = [json.loads(line) for line in open(tmp_path / "medqa.jsonl")]
    assert all("<|im_start|>assistant" in r["prompt"] for r in records)
    assert all(s["tokens"] == 16 or s["finish"] == "stop" for r in records for s in r["samples"])


REAL_STEP = ["--data-dir", str(SHARED_DATA), "--data",
             f"medmcqa_train={SHARED_DATA / 'medmcqa_dev.jsonl'}", "--exclude", "medqa",
             "--batch-prompts", "2", "--max-new-tokens", "8", "--steps", "1", "--kl-coef", "0.01",
             "--save-every", "0", "--micro-tokens", "1024"]


def test_real_grpo_step(real, tmp_path, engine):
    grpo.main(["--model", real["path"], "--num-samples", "2", "--out", str(tmp_path), *REAL_STEP])
    row = read_metrics(tmp_path)[0]
    assert row["completions"] == 4 and row["generated_tokens"] > 0
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the update
    assert row["logprob_gap"] < 1e-4  # sampler (either engine) and trainer agree


def test_real_ppo_step(real, tmp_path):
    ppo.main(["--model", real["path"], "--num-samples", "1", "--prompt-style", "medrlvr",
              "--out", str(tmp_path), *REAL_STEP])
    row = read_metrics(tmp_path)[0]
    assert row["completions"] == 2 and row["kl"] == 0.0  # the training forward, not the sampler's
    assert row["value_loss"] > 0 and row["logprob_gap"] < 1e-4
