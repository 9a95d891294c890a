"""medrl's sampler (rollout.generate) against transformers `generate` on the same random-init model.

Both sample (temperature 1, no top-k/top-p) exactly --new-tokens tokens for each of --n samples of
--prompts random ragged prompts: medrl with stop_ids=[], transformers with no eos token, left
padding + attention mask, its KV cache and num_return_sequences=n.
Then: how close medrl's decode steps come to the memory-bandwidth and compute rooflines.

    OMP_NUM_THREADS=1 python bench/rollout.py [--prompts 32 --n 8 --new-tokens 64]
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import torch
import torch.nn.functional as F

import model as M
import rollout as R
import tiny

MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, vocab_size=8192)


class Probe:
    """Wraps rollout._prefill / _decode: prefill time and tokens; rows and KV tokens read per decode step."""

    def __enter__(self):
        self.prefill_s, self.prefill_tokens, self.steps, self.rows, self.peak_rows, self.kv_tokens = 0.0, 0, 0, 0, 0, 0
        self.orig = prefill, decode = R._prefill, R._decode

        def timed_prefill(model, run, batch):
            t = time.perf_counter()
            out = prefill(model, run, batch)
            self.prefill_s += time.perf_counter() - t
            self.prefill_tokens += sum(len(run.prompts[p]) for p, _, _ in batch)
            return out

        def counted_decode(model, run, slots, last):  # a row attends over its prompt + tokens so far
            self.steps, self.rows, self.peak_rows = self.steps + 1, self.rows + len(slots), max(self.peak_rows, len(slots))
            self.kv_tokens += sum(len(run.prompts[p]) + len(run.tokens[(p, j)]) for p, j in map(run.slot_of.get, slots))
            return decode(model, run, slots, last)

        R._prefill, R._decode = timed_prefill, counted_decode
        return self

    def __exit__(self, *exc):
        R._prefill, R._decode = self.orig


def run_medrl(model, prompts, args):
    t = time.perf_counter()
    sampling = R.Sampling(n=args.n, max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed,
                          max_cache_tokens=args.max_cache_tokens)
    out = R.generate(model, prompts, sampling, stop_ids=[], progress=False)
    assert all(len(s.response_ids) == args.new_tokens for s in out)
    return time.perf_counter() - t


def run_hf(hf, prompts, args, pad_id=0):
    """Returns (total seconds, seconds until the first logits = prefill)."""
    from transformers import LogitsProcessor, LogitsProcessorList
    longest = max(map(len, prompts))
    ids, mask = torch.full((len(prompts), longest), pad_id), torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, (B, T)
        ids[i, longest - len(p):], mask[i, longest - len(p):] = torch.tensor(p), 1
    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    t = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                      num_return_sequences=args.n, max_new_tokens=args.new_tokens,
                      pad_token_id=pad_id, logits_processor=LogitsProcessorList([Stamp()]))
    assert out.shape == (len(prompts) * args.n, longest + args.new_tokens), out.shape
    return time.perf_counter() - t, stamps[0] - t


def best_seconds(fn, reps: int = 5) -> float:
    """Fastest of `reps` timed calls after a warm-up call (the least disturbed by other load)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def rooflines(model, probe: Probe, decode_tps: float, copy_mb: int):
    """Print how close medrl's decode steps (prefill excluded) come to the bandwidth / compute limits."""
    cfg, rows, mean_rows = model.config, probe.rows, round(probe.rows / probe.steps)
    weight_bytes = (sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size) * 4
    kv_bytes = probe.kv_tokens * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    x = torch.randn(copy_mb * 2**18)
    y = torch.empty_like(x)
    bw = 2 * x.nbytes / best_seconds(lambda: y.copy_(x))  # read + write bytes per second
    mem_tps = rows / ((probe.steps * weight_bytes + kv_bytes) / bw)
    attn_flops = 4 * probe.kv_tokens * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
    flops = rows * weight_bytes / 2 + attn_flops  # 2 FLOPs per weight per row, plus q.k and p.v
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]  # the model's own matmuls
    xs = [torch.randn(mean_rows, w.shape[1]) for w in ws]
    flop_s = sum(2 * mean_rows * w.numel() for w in ws) / best_seconds(lambda: [F.linear(x, w) for x, w in zip(xs, ws)])
    cpu_tps = rows / (flops / flop_s)
    print(f"\nmedrl decode: {probe.steps} steps, active rows peak {probe.peak_rows}, mean {rows / probe.steps:.1f}")
    print(f"memory roofline : {weight_bytes / 2**20:.0f} MiB weights (embedding table excluded) + "
          f"{kv_bytes / probe.steps / 2**20:.0f} MiB KV per step at {bw / 1e9:.1f} GB/s (copy_) "
          f"-> {mem_tps:,.0f} tok/s; medrl decode at {100 * decode_tps / mem_tps:.1f}%")
    print(f"compute roofline: {flops / rows / 1e6:.1f} MFLOP/token at {flop_s / 1e9:.1f} GFLOP/s (the model's "
          f"matmuls at {mean_rows} rows) -> {cpu_tps:,.0f} tok/s; medrl decode at {100 * decode_tps / cpu_tps:.1f}%")
    print(f"bound: {'compute' if cpu_tps < mem_tps else 'memory bandwidth'} (the lower roofline)")


def main():
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    # workload
    p.add_argument("--prompts", type=int, default=32, help="number of random token-id prompts")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sample (exactly)")
    p.add_argument("--min-len", type=int, default=32, help="shortest prompt (lengths are uniform)")
    p.add_argument("--max-len", type=int, default=128, help="longest prompt")
    p.add_argument("--max-cache-tokens", type=int, default=2**18, help="medrl's KV-cache token budget")
    # run
    p.add_argument("--seed", type=int, default=0, help="prompts, model init and sampling seed")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--copy-mb", type=int, default=256, help="size of the bandwidth-probe copy in MiB")
    p.add_argument("--skip-hf", action="store_true", help="time medrl only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = tiny.make_tiny_checkpoint(os.path.join(tempfile.mkdtemp(), "ckpt"), "llama", seed=args.seed, **MODEL)
    model = M.load_model(ckpt).eval()
    assert model.config.vocab_size == 8192 and model.config.head_dim == 64, "config overrides not applied"
    g = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lens]
    warm = argparse.Namespace(**{**vars(args), "n": 2, "new_tokens": 4})
    tokens, first_tokens = args.prompts * args.n * args.new_tokens, args.prompts * args.n

    run_medrl(model, prompts[:2], warm)
    with Probe() as probe:
        total = run_medrl(model, prompts, args)
    decode_tps = probe.rows / (total - probe.prefill_s)  # tokens sampled from decode-step logits
    cols = {"medrl": (probe.prefill_tokens, total, probe.prefill_s, tokens / total, decode_tps)}
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # never stop: exactly --new-tokens tokens
        with torch.no_grad():
            diff = (model(torch.tensor(prompts[:1])) - hf(torch.tensor(prompts[:1])).logits).abs().max()
        run_hf(hf, prompts[:2], warm)
        total, prefill = run_hf(hf, prompts, args)
        cols["transformers"] = (first_tokens * max(lens), total, prefill, tokens / total,
                                (tokens - first_tokens) / (total - prefill))

    print(f"\n{args.prompts} prompts x n={args.n}, prompt lengths {args.min_len}..{args.max_len}, "
          f"{args.new_tokens} new tokens each = {tokens} tokens; {args.threads} thread(s)")
    if not args.skip_hf:
        print(f"same model: max |logits medrl - transformers| on prompt 0 = {diff:.1e}")
    print(f"{'':26}" + "".join(f"{k:>14}" for k in cols) + ("   medrl/transformers" if len(cols) > 1 else ""))
    names = ["prefill tokens", "total s", "prefill s", "generated tok/s", "decode-phase tok/s"]
    for i, name in enumerate(names):
        vals = [c[i] for c in cols.values()]
        ratio = f"{vals[0] / vals[1]:>21.2f}" if len(vals) > 1 and "tok/s" in name else ""
        print(f"{name:26}" + "".join(f"{v:>14,.{0 if i == 0 else 2}f}" for v in vals) + ratio)
    if probe.steps:
        rooflines(model, probe, decode_tps, args.copy_mb)


if __name__ == "__main__":
    main()
