"""medrl's sampler (rollout.generate) against transformers `generate` on the same model.

Tiny mode (default): a random-init model, --prompts random ragged prompts x --n samples.
Real mode (--real, needs ../shared): SmolLM2-135M-Instruct (30 layers, GQA 9/3 heads, vocab
49,152) on the first MedQA questions as chat prompts, at each --configs PROMPTSxN (default 4x4
and 16x8) with 128 new tokens; medrl and transformers alternate --reps times in the same run.
Both sample (temperature 1, no top-k/top-p) exactly --new-tokens tokens per sample: medrl with
stop_ids=[], transformers with no eos token, left padding + attention mask, its KV cache and
num_return_sequences=n.
Then, per workload: how close medrl's decode steps come to the memory-bandwidth and compute
rooflines, and where a mean decode step's time goes (one more medrl run, with timers).

    OMP_NUM_THREADS=1 python bench/rollout.py [--prompts 32 --n 8 --new-tokens 64]
    OMP_NUM_THREADS=1 python bench/rollout.py --real [--configs 4x4,16x8 --reps 1]
    (--paged times the paged engine, the GPU's, on the CPU: its prefill and decode are not split)
    (--rollout FILE times another rollout.py, e.g. an older copy, for a before/after; the
    kvcache.py, sampling.py and decode_cpu.py beside it, where there are, are the ones it uses)
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root
import torch
import torch.nn.functional as F
# bench/real.py and bench/timing.py (this script's folder is on sys.path)
from real import load_rollout, medqa_workloads, prefilled
from timing import best_seconds

import model as M
import rollout as R
import tiny

MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, vocab_size=8192)
PARTS = ["attention", "matmuls", "lm_head", "other forward", "sampling", "host"]


class Probe:
    """Wraps the rollout module's _prefill / _decode: prefill time and tokens, rows and KV tokens
    per decode step. With parts=True it also times the parts of each decode step (PARTS); the
    timers cost a few microseconds per module call, so time throughput without them."""

    def __init__(self, rollout, model=None, parts=False):
        # the module of the CPU's decode path: decode_cpu.py, or an older rollout.py itself
        self.R, self.model, self.parts = getattr(rollout, "decode_cpu", rollout), model, parts
        # the sampling function that path calls (sample_rows; sample_tokens before it)
        self.sampler = "sample_rows" if hasattr(self.R, "sample_rows") else "sample_tokens"

    def __enter__(self):
        R_, self.prefill_s, self.prefill_tokens = self.R, 0.0, 0
        # KV tokens read (a shared prompt once) and attended (every row's prompt and tokens)
        self.steps, self.rows, self.peak_rows, self.kv_tokens, self.attended = 0, 0, 0, 0, 0
        self.t = dict.fromkeys(["decode", "forward", "attention", "linear", "lm_head",
                                "sample_step", "sampling"], 0.0)
        self.orig = prefill, decode = R_._prefill, R_._decode
        self.orig_parts = R_.Decode.attend, getattr(R_, self.sampler), R_._sample_step

        def timed_prefill(model, run, batch):
            t = time.perf_counter()
            out = prefill(model, run, batch)
            self.prefill_s += time.perf_counter() - t
            self.prefill_tokens += sum(len(run.prompts[b[0]]) for b in prefilled(batch))
            return out

        def counted_decode(model, run, slots, last):
            self.steps, self.rows = self.steps + 1, self.rows + len(slots)
            self.peak_rows = max(self.peak_rows, len(slots))
            self.kv_tokens += kv_tokens_read(run, slots)
            self.attended += attended_tokens(run, slots)
            self.in_decode = True
            t = time.perf_counter()
            out = decode(model, run, slots, last)
            self.t["decode"] += time.perf_counter() - t
            self.in_decode = False
            return out

        R_._prefill, R_._decode = timed_prefill, counted_decode
        self.in_decode, self.hooks = False, []
        if self.parts:
            self._install_timers()
        return self

    def _timed(self, key, fn, always=False):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if always or self.in_decode:
                self.t[key] += time.perf_counter() - t
            return out
        return wrapper

    def _install_timers(self):
        """Timers on Decode.attend, every Linear, the whole forward (decode steps only), and on
        sampling (every step, the one after a prefill included)."""
        R_, started = self.R, {}
        R_.Decode.attend = self._timed("attention", self.orig_parts[0])
        setattr(R_, self.sampler, self._timed("sampling", self.orig_parts[1], always=True))
        R_._sample_step = self._timed("sample_step", self.orig_parts[2], always=True)
        # the lm_head's matmul: model.logits_fp32 where the model has it, else the Linear below
        self.model_module = sys.modules[type(self.model).__module__]
        self.orig_head = getattr(self.model_module, "logits_fp32", None)
        if self.orig_head is not None:
            self.model_module.logits_fp32 = self._timed("lm_head", self.orig_head)
        lm_head = getattr(self.model, "lm_head", None)
        for mod in [self.model] + [m for m in self.model.modules()
                                   if isinstance(m, torch.nn.Linear)]:
            key = ("forward" if mod is self.model else "lm_head" if mod is lm_head
                   else "linear")

            def done(m, args, out, key=key):
                if self.in_decode:
                    self.t[key] += time.perf_counter() - started[m]
            self.hooks += [mod.register_forward_pre_hook(
                lambda m, args: started.__setitem__(m, time.perf_counter())),
                mod.register_forward_hook(done)]

    def breakdown_ms(self) -> dict:
        """Mean milliseconds per decode step of each part of PARTS, and their total."""
        t, n = self.t, max(self.steps, 1)
        attn, lin, head = t["attention"], t["linear"], t["lm_head"]
        ms = {"attention": attn, "matmuls": lin, "lm_head": head,
              "other forward": t["forward"] - attn - lin - head, "sampling": t["sampling"],
              "host": t["decode"] - t["forward"] + t["sample_step"] - t["sampling"]}
        ms = {k: 1e3 * v / n for k, v in ms.items()}
        return dict(ms, total=sum(ms.values()))

    def __exit__(self, *exc):
        self.R._prefill, self.R._decode = self.orig
        self.R.Decode.attend, self.R._sample_step = self.orig_parts[0], self.orig_parts[2]
        setattr(self.R, self.sampler, self.orig_parts[1])
        for h in self.hooks:
            h.remove()
        if self.parts and self.orig_head is not None:
            self.model_module.logits_fp32 = self.orig_head


def attended_tokens(run, slots) -> int:
    """KV tokens a decode step attends to: each row's prompt and sampled tokens."""
    return sum(len(run.prompts[p]) + len(run.tokens[(p, j)])
               for p, j in map(run.slot_of.get, slots))


def kv_tokens_read(run, slots) -> int:
    """KV tokens a decode step reads: rollout's own count (a shared prompt once), or for an
    older rollout.py (no `_Run.kv_tokens` / `_Engine.kv_tokens`) every attended token."""
    return run.kv_tokens(slots) if hasattr(run, "kv_tokens") else attended_tokens(run, slots)


def run_medrl(rollout, model, prompts, args):
    t = time.perf_counter()
    sampling = rollout.Sampling(n=args.n, max_new_tokens=args.new_tokens, temperature=1.0,
                                seed=args.seed, max_cache_tokens=args.max_cache_tokens)
    out = rollout.generate(model, prompts, sampling, stop_ids=[], progress=False)
    assert all(len(s.response_ids) == args.new_tokens for s in out)
    return time.perf_counter() - t


def run_hf(hf, prompts, args, pad_id=0):
    """Returns (total seconds, seconds until the first logits = prefill)."""
    from transformers import LogitsProcessor, LogitsProcessorList
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad_id)  # (B, T), left padding
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):], mask[i, longest - len(p):] = torch.tensor(p), 1
    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    t = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                      top_k=0, top_p=1.0, num_return_sequences=args.n,
                      max_new_tokens=args.new_tokens, pad_token_id=pad_id,
                      logits_processor=LogitsProcessorList([Stamp()]))
    assert out.shape == (len(prompts) * args.n, longest + args.new_tokens), out.shape
    return time.perf_counter() - t, stamps[0] - t


def machine_limits(model, rows: int, copy_mb: int):
    """(copy bandwidth in bytes/s counting read + write, FLOP/s of the model's own matmuls at
    `rows` rows, the weights cycled as in a forward so they come from memory, not cache)."""
    x = torch.randn(copy_mb * 2**18)
    y = torch.empty_like(x)
    bw = 2 * x.nbytes / best_seconds(lambda: y.copy_(x))
    ws = list({id(m.weight): m.weight for m in model.modules()
               if isinstance(m, torch.nn.Linear)}.values())
    xs = [torch.randn(rows, w.shape[1]) for w in ws]
    secs = best_seconds(lambda: [F.linear(x, w) for x, w in zip(xs, ws)])
    return bw, sum(2 * rows * w.numel() for w in ws) / secs


def rooflines(model, probe: Probe, decode_tps: float, copy_mb: int):
    """Print how close medrl's decode steps (prefill excluded) come to the bandwidth / compute
    limits: every weight read once per step (the embedding table only when it is the tied
    lm_head) plus each row's own KV tokens; 2 FLOPs per weight per row plus q.k and p.v."""
    cfg, rows, steps = model.config, probe.rows, probe.steps
    mean_rows = round(rows / steps)
    embed = model.model.embed_tokens.weight
    head = getattr(model, "lm_head", None)
    params = {id(p): p for p in model.parameters()
              if p is not embed or (head is not None and head.weight is embed)}
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    elem = embed.element_size()
    kv_bytes = probe.kv_tokens * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
    kv_bytes *= elem
    bw, flop_s = machine_limits(model, mean_rows, copy_mb)
    mem_tps = rows / ((steps * weight_bytes + kv_bytes) / bw)
    attn_flops = 4 * probe.attended * cfg.num_hidden_layers * cfg.num_attention_heads
    attn_flops *= cfg.head_dim
    matmul_weights = sum(m.weight.numel() for m in model.modules()
                         if isinstance(m, torch.nn.Linear))
    flops = 2 * rows * matmul_weights + attn_flops
    cpu_tps = rows / (flops / flop_s)
    print(f"medrl decode: {steps} steps, active rows peak {probe.peak_rows}, "
          f"mean {rows / steps:.1f}, mean KV tokens per row attended "
          f"{probe.attended / rows:.0f}, read {probe.kv_tokens / rows:.0f} (a shared prompt once)")
    print(f"memory roofline : {weight_bytes / 2**20:.0f} MiB weights + "
          f"{kv_bytes / steps / 2**20:.0f} MiB KV per step at {bw / 1e9:.1f} GB/s (copy_) "
          f"-> {mem_tps:,.0f} tok/s; medrl decode at {100 * decode_tps / mem_tps:.1f}%")
    print(f"compute roofline: {flops / rows / 1e6:.1f} MFLOP/token at {flop_s / 1e9:.1f} GFLOP/s "
          f"(the model's matmuls at {mean_rows} rows) -> {cpu_tps:,.0f} tok/s; medrl decode at "
          f"{100 * decode_tps / cpu_tps:.1f}%")
    bound, step_ms = min(mem_tps, cpu_tps), 1e3 * rows / decode_tps / steps
    print(f"bound: {'compute' if cpu_tps < mem_tps else 'memory bandwidth'} (the lower roofline): "
          f"decode step {step_ms:.0f} ms vs {1e3 * rows / bound / steps:.0f} ms at the roofline "
          f"= {100 * decode_tps / bound:.1f}% of it")
    # One thread runs the weight matmuls and the KV reads one after the other, never overlapped.
    seq_ms = 1e3 * (2 * rows * matmul_weights / flop_s + kv_bytes / bw) / steps
    print(f"sequential bound (matmul FLOPs at the matmul rate, then the KV bytes at copy_ "
          f"bandwidth): {seq_ms:.0f} ms per step = {100 * seq_ms / step_ms:.1f}% of it reached")


def print_breakdown(probe: Probe):
    ms = probe.breakdown_ms()
    print(f"mean decode step, {probe.rows / probe.steps:.1f} rows (a run with per-part timers):")
    for k in PARTS + ["total"]:
        print(f"  {k:16}{ms[k]:9.1f} ms{100 * ms[k] / ms['total']:7.1f}%")


def print_table(cols: dict, header: str):
    print(header)
    print(f"{'':26}" + "".join(f"{k:>14}" for k in cols)
          + ("   medrl/transformers" if len(cols) > 1 else ""))
    names = ["prefill tokens", "total s", "prefill s", "generated tok/s", "decode-phase tok/s"]
    for i, name in enumerate(names):
        vals = [c[i] for c in cols.values()]
        ratio = f"{vals[0] / vals[1]:>21.2f}" if len(vals) > 1 and "tok/s" in name else ""
        print(f"{name:26}" + "".join(f"{v:>14,.{0 if i == 0 else 2}f}" for v in vals) + ratio)


def bench_workload(rollout, model, hf, prompts, args, header: str):
    """medrl and transformers alternately (--reps each, the fastest kept), then the rooflines
    and one more medrl run with per-part timers."""
    tokens, first_tokens = len(prompts) * args.n * args.new_tokens, len(prompts) * args.n
    warm = argparse.Namespace(**{**vars(args), "n": 2, "new_tokens": 4})
    run_medrl(rollout, model, prompts[:2], warm)
    if hf is not None:
        run_hf(hf, prompts[:2], warm)
    medrl, trans = [], []
    for rep in range(args.reps):
        with Probe(rollout) as probe:
            medrl.append((run_medrl(rollout, model, prompts, args), probe))
        if hf is not None:
            trans.append(run_hf(hf, prompts, args))
        print(f"  rep {rep}: medrl {medrl[-1][0]:.1f} s"
              + (f", transformers {trans[-1][0]:.1f} s" if trans else ""), flush=True)
    total, probe = min(medrl, key=lambda r: r[0])
    decode_tps = probe.rows / (total - probe.prefill_s)  # tokens sampled from decode logits
    cols = {"medrl": (probe.prefill_tokens, total, probe.prefill_s, tokens / total, decode_tps)}
    if trans:
        total, prefill = min(trans)
        cols["transformers"] = (first_tokens * max(map(len, prompts)), total, prefill,
                                tokens / total, (tokens - first_tokens) / (total - prefill))
    print_table(cols, header)
    if probe.steps:
        rooflines(model, probe, decode_tps, args.copy_mb)
        with Probe(rollout, model, parts=True) as parts:
            run_medrl(rollout, model, prompts, args)
        print_breakdown(parts)
    return cols


def load_hf(path):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # never stop: exactly --new-tokens tokens
    return hf


def main_tiny(args, rollout):
    ckpt = tiny.make_tiny_checkpoint(os.path.join(tempfile.mkdtemp(), "ckpt"), "llama",
                                     seed=args.seed, **MODEL)
    model = M.load_model(ckpt).eval()
    assert model.config.vocab_size == 8192 and model.config.head_dim == 64, "overrides not applied"
    g = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lens]
    hf = None if args.skip_hf else load_hf(ckpt)
    if hf is not None:
        with torch.no_grad():
            diff = (model(torch.tensor(prompts[:1])) - hf(torch.tensor(prompts[:1])).logits)
        print(f"same model: max |logits medrl - transformers| on prompt 0 = "
              f"{diff.abs().max():.1e}")
    bench_workload(rollout, model, hf, prompts, args,
                   f"\n{args.prompts} prompts x n={args.n}, prompt lengths {args.min_len}.."
                   f"{args.max_len}, {args.new_tokens} new tokens each = "
                   f"{args.prompts * args.n * args.new_tokens} tokens; {args.threads} thread(s)")


def main_real(args, rollout):
    path, configs, all_prompts = medqa_workloads(args.configs)
    model = M.load_model(path).eval()
    hf = None if args.skip_hf else load_hf(path)
    summary = []
    for n_prompts, n in configs:
        args.n, prompts = n, all_prompts[:n_prompts]
        lens = sorted(map(len, prompts))
        print(f"\n== SmolLM2-135M-Instruct, {n_prompts} MedQA prompts ({lens[0]}..{lens[-1]} "
              f"tokens) x n={n} x {args.new_tokens} new tokens; {args.threads} thread(s)",
              flush=True)
        cols = bench_workload(rollout, model, hf, prompts, args, "")
        summary.append((f"{n_prompts}x{n}", cols))
    print("\nsummary (generated tok/s):")
    for name, cols in summary:
        ratio = (f"  medrl/transformers {cols['medrl'][3] / cols['transformers'][3]:.2f}x"
                 if "transformers" in cols else "")
        print(f"  {name:6} medrl {cols['medrl'][3]:8.1f}" + "".join(
            f"  {k} {v[3]:8.1f}" for k, v in cols.items() if k != "medrl") + ratio)


def main():
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter,
                       argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    # workload
    p.add_argument("--real", action="store_true",
                   help="SmolLM2-135M-Instruct on MedQA prompts from ../shared (else tiny mode)")
    p.add_argument("--configs", default="4x4,16x8", help="--real: PROMPTSxN workloads")
    p.add_argument("--prompts", type=int, default=32, help="tiny: number of random prompts")
    p.add_argument("--n", type=int, default=8, help="tiny: samples per prompt")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="tokens generated per sample (exactly); default 64 tiny, 128 --real")
    p.add_argument("--min-len", type=int, default=32, help="tiny: shortest prompt (uniform)")
    p.add_argument("--max-len", type=int, default=128, help="tiny: longest prompt")
    p.add_argument("--max-cache-tokens", type=int, default=2**18, help="medrl's KV-cache budget")
    # run
    p.add_argument("--reps", type=int, default=1, help="timed runs of each, alternating")
    p.add_argument("--rollout", default=None,
                   help="time this rollout.py instead of the repo's (with the kvcache.py and "
                   "sampling.py beside it, if any)")
    p.add_argument("--seed", type=int, default=0, help="prompts, model init and sampling seed")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--copy-mb", type=int, default=256, help="bandwidth-probe copy size in MiB")
    p.add_argument("--skip-hf", action="store_true", help="time medrl only")
    p.add_argument("--paged", action="store_true",
                   help="time the paged engine (the GPU's, rollout.Engine) on the CPU instead of "
                        "decode_cpu.py's path: total and generated tok/s only")
    args = p.parse_args()
    args.new_tokens = args.new_tokens or (128 if args.real else 64)
    torch.set_num_threads(args.threads)
    rollout = load_rollout(args.rollout) if args.rollout else R
    if args.paged:
        rollout.CPU_DECODE = set()
    if args.rollout:
        print(f"rollout under test: {os.path.abspath(args.rollout)}")
    (main_real if args.real else main_tiny)(args, rollout)


if __name__ == "__main__":
    main()
