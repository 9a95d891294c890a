"""A GPU's first minutes: every CUDA path of medrl, checked against transformers and timed.

    python bench/gpu_check.py --out gpu_check.json          # one CUDA GPU (a few minutes)
    python bench/gpu_check.py --tiny --out check.json       # CPU: the same checks, tiny shapes

Needs only torch and transformers (flash-attn is used when importable) and no network: the models
are random-init, of real shapes, built here. It writes one JSON report and prints a short table:
1. parity: medrl's forward (logits of packed sequences) and packed log-probs (also with a group's
   completions sharing one packed prompt) against transformers on the same weights, in the run's
   dtype (bf16 on CUDA), at the Llama-3.2-1B and Llama-3.1-8B shapes;
2. sampler: greedy tokens against transformers `generate` on short prompts; then throughput at
   --batch prompts x --new-tokens tokens, medrl against transformers in the same run, and medrl's
   decode steps against the bandwidth roofline (weight + KV bytes read per step over a measured
   device copy), and the share of a decode step its attention over the cache takes (the same
   steps timed again with that attention skipped);
3. training: --grpo-steps GRPO steps of the 1B shape on the demo task through grpo.main (on CUDA:
   the one-rank NCCL group and FSDP2 bf16 mixed precision), with each phase's time, tokens/s and
   peak memory (torch.cuda.max_memory_allocated) against memory.plan.
With --tiny (CPU, fp32, no process group) the shapes are tiny: it checks what a CPU can.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import torch

import kvcache
import model as M
import rl
import rollout as R
import tiny

LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
SHAPES = {  # the public config.json values of the two shapes
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                     rope_scaling=dict(LLAMA3_ROPE, factor=32.0)),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                     rope_scaling=dict(LLAMA3_ROPE, factor=8.0)),
    "tiny": dict(vocab_size=512),
    "tiny-wide": dict(vocab_size=512, hidden_size=128, num_hidden_layers=3),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_pair(shape: str, device, dtype):
    """medrl's model and transformers' with the same random weights (normal 0.02, norms 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    shape_cfg = dict(SHAPES[shape])
    cfg_dict = tiny.tiny_config("llama", shape_cfg.pop("vocab_size"), **shape_cfg)
    cfg = M.ModelConfig.from_hf(cfg_dict)
    with torch.device("meta"):
        ours = M.CausalLM(cfg)
    ours.to_empty(device=device)
    ours.tie_weights()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=generator)
    ours = ours.to(dtype).eval()
    ours.inv_freq = M.rope_inv_freq(cfg).to(device)
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    hf.to_empty(device=device)
    hf.load_state_dict(ours.state_dict(), strict=False, assign=False)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg).to(device)  # buffers to_empty lost
    return ours, hf.eval(), cfg


@torch.no_grad()
def parity(ours, hf, cfg, device) -> dict:
    """Logits of two packed sequences and their log-probs, and log-probs of three completions of
    one prompt packed with the prompt shared, medrl vs transformers."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (128, 77)]
    ids, pos, cu, max_seqlen = M.pack(seqs, device)
    logits = ours(ids, pos, cu, max_seqlen).float()
    ref = torch.cat([hf(torch.tensor([s], device=device)).logits[0] for s in seqs]).float()
    targets = torch.roll(ids, -1)
    logp, _ = ours(ids, pos, cu, max_seqlen, targets=targets)
    ref_logp = ref.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    # One prompt's completions packed as training packs a group: the prompt once, each response
    # attending to it (model.SharedPrefix; flash-attn's varlen kernel with fewer queries than keys).
    group = [rl.Rollout(None, 0, seqs[1], seqs[0][:n], None, "stop") for n in (40, 9, 128)]
    shared, _ = rl.logprobs(ours, rl.pack(group, device), temperature=1.0)
    ref_shared = []
    for r in group:
        full = torch.tensor([r.prompt_ids + r.response_ids], device=device)
        z = hf(full).logits[0, len(r.prompt_ids) - 1:-1].float()  # (R, V)
        ref_shared.append(z.log_softmax(-1).gather(-1, full[0, len(r.prompt_ids):, None])[:, 0])
    shared_diff = (shared.float() - torch.cat(ref_shared)).abs()
    return dict(logits_max_abs_diff=(logits - ref).abs().max().item(),
                logits_max_abs=ref.abs().max().item(),
                logprob_mean_abs_diff=(logp.float() - ref_logp).abs().mean().item(),
                logprob_max_abs_diff=(logp.float() - ref_logp).abs().max().item(),
                shared_prefix_logprob_mean_abs_diff=shared_diff.mean().item(),
                shared_prefix_logprob_max_abs_diff=shared_diff.max().item())


@torch.no_grad()
def greedy(ours, hf, cfg, device, new_tokens: int = 16) -> dict:
    """Greedy completions of 4 short prompts: the share of tokens equal to transformers'."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    out = R.generate(ours, prompts, R.Sampling(max_new_tokens=new_tokens, temperature=0),
                     stop_ids=[], progress=False)
    same = total = 0
    for p, s in zip(prompts, out):
        ref = hf.generate(torch.tensor([p], device=device), max_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        same += sum(a == b for a, b in zip(s.response_ids, ref))
        total += new_tokens
    return dict(greedy_tokens_equal=same / total)


def throughput(ours, hf, cfg, device, batch: int, new_tokens: int) -> dict:
    """Sampling throughput, medrl vs transformers, and medrl's decode steps vs the roofline."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(64, 257, (batch,), generator=g)]
    sampling = R.Sampling(max_new_tokens=new_tokens, temperature=1.0)
    R.generate(ours, prompts[:2], R.Sampling(max_new_tokens=4), stop_ids=[], progress=False)
    # medrl twice, alternating with the same decode steps (exactly new_tokens each, so the same
    # rows) with attention over the cache skipped ("bare"): the difference is what attention costs
    # a step, without per-layer syncs. The faster run of each is kept.
    runs = {contextlib.nullcontext: [], no_attention: []}  # (seconds, DecodeProbe) each
    for _ in range(2):
        for variant, runs_of in runs.items():
            with DecodeProbe() as probe, variant():
                sync(device)
                t = time.perf_counter()
                R.generate(ours, prompts, sampling, stop_ids=[], progress=False)
                sync(device)
                runs_of.append((time.perf_counter() - t, probe))
    (medrl_s, decode), (_, bare) = (min(r, key=lambda run: run[0]) for r in runs.values())
    hf_s = hf_generate_seconds(hf, prompts, new_tokens, device)
    tokens = batch * new_tokens
    step_bytes = weight_bytes(ours) + decode.kv_tokens / max(decode.steps, 1) * kv_bytes(cfg, ours)
    roofline_s = step_bytes / copy_bandwidth(device)
    step_ms, bare_ms = (1e3 * p.seconds / p.steps for p in (decode, bare))
    return dict(batch=batch, new_tokens=new_tokens, medrl_tok_s=tokens / medrl_s,
                transformers_tok_s=tokens / hf_s, ratio=hf_s / medrl_s,
                decode_steps=decode.steps, decode_step_ms=step_ms,
                decode_roofline_ms=1e3 * roofline_s,
                decode_roofline_fraction=1e3 * roofline_s / step_ms,
                decode_steps_without_attention=bare.steps,
                attention_fraction=(step_ms - bare_ms) / step_ms)


@contextlib.contextmanager
def no_attention():
    """Decode steps whose attention over the cache (and its k/v write) returns q unchanged."""
    real = kvcache.Decode.attend
    kvcache.Decode.attend = lambda self, layer, q, k, v: q
    try:
        yield
    finally:
        kvcache.Decode.attend = real


class DecodeProbe:
    """Times rollout._decode (device-synchronised) and counts the KV tokens each step reads (a
    prompt that a group shares once, on the head-major layout)."""

    def __enter__(self):
        self.steps, self.seconds, self.kv_tokens, self.real = 0, 0.0, 0, R._decode

        def timed(model, run, slots, last):
            device = model.model.embed_tokens.weight.device
            sync(device)
            t = time.perf_counter()
            out = self.real(model, run, slots, last)
            sync(device)
            self.seconds += time.perf_counter() - t
            self.steps += 1
            self.kv_tokens += run.kv_tokens(slots)
            return out
        R._decode = timed
        return self

    def __exit__(self, *exc):
        R._decode = self.real


def weight_bytes(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(cfg, model) -> float:
    """Bytes of k and v per cached token."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * \
        next(model.parameters()).element_size()


def copy_bandwidth(device) -> float:
    """Read + write bytes per second of a 1 GiB (CPU: 256 MiB) device copy, best of 5."""
    x = torch.empty((2**30 if device.type == "cuda" else 2**28) // 4, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best


@torch.no_grad()
def hf_generate_seconds(hf, prompts, new_tokens: int, device) -> float:
    longest = max(map(len, prompts))
    ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, longest - len(p):], mask[i, longest - len(p):] = torch.tensor(p), 1
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
              pad_token_id=0)
    hf.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=4, **kw)
    sync(device)
    t = time.perf_counter()
    hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, **kw)
    sync(device)
    return time.perf_counter() - t


def grpo_steps(shape: str, steps: int, device, workdir: str) -> dict:
    """GRPO on the demo task through grpo.main; per phase: seconds, tokens/s, peak memory."""
    import grpo
    import rl
    ckpt = tiny.make_tiny_checkpoint(os.path.join(workdir, "ckpt"), "llama", **SHAPES[shape])
    cuda = device.type == "cuda"
    flags = ["--model", ckpt, "--data", "demo", "--steps", str(steps), "--batch-prompts",
             "64" if cuda else "8", "--num-samples", "8" if cuda else "4", "--max-new-tokens",
             "128" if cuda else "8", "--kl-coef", "0.001", "--lr", "1e-5", "--save-every", "0",
             "--out", os.path.join(workdir, "run")]
    phases = {}

    def measured(name, fn):
        def wrapper(*a, **k):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t = time.perf_counter()
            out = fn(*a, **k)
            sync(device)
            seconds = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated(device) if cuda else 0
            entry = phases.setdefault(name, dict(seconds=0.0, peak_bytes=0))
            entry["seconds"] += seconds
            entry["peak_bytes"] = max(entry["peak_bytes"], peak)
            return out
        return wrapper
    real = rl.collect, rl.score, rl.update
    rl.collect, rl.score, rl.update = (measured("generate", real[0]), measured("score", real[1]),
                                       measured("update", real[2]))
    try:
        grpo.main(flags)
    finally:
        rl.collect, rl.score, rl.update = real
    rows = [json.loads(line) for line in open(os.path.join(workdir, "run", "metrics.jsonl"))]
    generated = sum(r["generated_tokens"] for r in rows)
    plan = planned(ckpt, grpo.get_args(flags), cuda)
    return dict(steps=len(rows), phases=phases, reward=[r["reward_mean"] for r in rows],
                generated_tok_s=generated / phases["generate"]["seconds"], plan=plan)


def planned(ckpt, args, cuda: bool) -> dict:
    import memory
    plan = memory.plan(M.read_config(ckpt), args, 1, cuda, prompt_len=128,
                       reference=args.kl_coef > 0)
    return {phase: sum(r[i] for r in plan.rows) for i, phase in
            enumerate(("generate", "score", "update"), start=1)}


def check_shape(shape: str, device, dtype, args) -> dict:
    ours, hf, cfg = random_pair(shape, device, dtype)
    out = dict(parity(ours, hf, cfg, device), **greedy(ours, hf, cfg, device))
    out["throughput"] = throughput(ours, hf, cfg, device, args.batch, args.new_tokens)
    del ours, hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def print_table(report: dict):
    print(f"\n{report['device']}, {report['dtype']}, flash-attn: {report['flash_attn']}")
    print(f"{'shape':<10}{'logit diff':>12}{'logp diff':>11}{'shared':>9}{'greedy=':>9}"
          f"{'medrl tok/s':>13}"
          f"{'hf tok/s':>10}{'ratio':>7}{'step ms':>9}{'roofline':>10}{'attention':>11}")
    for shape, r in report["shapes"].items():
        t = r["throughput"]
        print(f"{shape:<10}{r['logits_max_abs_diff']:>12.2e}{r['logprob_mean_abs_diff']:>11.2e}"
              f"{r['shared_prefix_logprob_mean_abs_diff']:>9.1e}{r['greedy_tokens_equal']:>9.0%}"
              f"{t['medrl_tok_s']:>13,.0f}"
              f"{t['transformers_tok_s']:>10,.0f}{t['ratio']:>7.2f}{t['decode_step_ms']:>9.2f}"
              f"{t['decode_roofline_fraction']:>10.0%}{t['attention_fraction']:>11.0%}")
    g = report.get("grpo")
    if g:
        print(f"\nGRPO {report['grpo_shape']}, {g['steps']} steps: generated "
              f"{g['generated_tok_s']:,.0f} tok/s; reward {['%.2f' % x for x in g['reward']]}")
        for phase, p in g["phases"].items():
            print(f"  {phase:<9} {p['seconds']:8.1f} s   peak {p['peak_bytes'] / 1e9:7.2f} GB   "
                  f"planned {g['plan'][phase] / 1e9:7.2f} GB")


def main():
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter,
                       argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    p.add_argument("--tiny", action="store_true", help="CPU check at tiny shapes (the test suite)")
    p.add_argument("--batch", type=int, default=128, help="prompts in the throughput run")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens per prompt, exactly")
    p.add_argument("--grpo-steps", type=int, default=3, help="GRPO steps at the 1B shape")
    p.add_argument("--out", default="gpu_check.json", help="the JSON report")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = ["llama-1b", "llama-8b"] if cuda else ["tiny", "tiny-wide"]
    if not cuda:
        args.batch, args.new_tokens = min(args.batch, 8), min(args.new_tokens, 16)
    report = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", dtype=str(dtype),
                  flash_attn=M.FLASH is not None, torch=torch.__version__, shapes={})
    for shape in shapes:
        report["shapes"][shape] = check_shape(shape, device, dtype, args)
    report["grpo_shape"] = shapes[0]
    with tempfile.TemporaryDirectory() as workdir:
        report["grpo"] = grpo_steps(shapes[0], args.grpo_steps, device, workdir)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print_table(report)
    print(f"\nreport: {args.out}")


if __name__ == "__main__":
    main()
