"""A GPU's first minutes: every CUDA path of medrl, checked against references and timed.

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py 2>&1 | tee $OUT/gpu_check.log   # one CUDA GPU
    python bench/gpu_check.py --tiny --out check.json    # CPU: the same stages, tiny shapes

Needs only torch and transformers (flash-attn is used when importable) and no network: the models
are random-init, of real shapes, built here. The run is a list of stages, cheapest correctness
checks first and timings last. Each stage's results go into the JSON report under its name (--out:
$OUT/gpu_check.json when OUT is set), which is rewritten after every stage, and it prints its own
table as soon as it ends. A stage that raises is recorded (error, traceback, seconds) with what it
had found so far, and the next one runs; a check inside a stage that fails is recorded in its place
and marks the stage failed without stopping the stage's other checks. While a stage runs the
report names it ("running"), so a run killed mid-way says where. The exit code is 0 whatever the
stages found (the report says), nonzero only when the report could not be written.

Stages (--stages picks some; on the CPU, --tiny, every stage runs at tiny shapes in fp32 unless
it says otherwise):
 1. environment: versions, the attention backend model.py picks on CUDA in bf16, torch's
    varlen_attn and its parameters, the fp32-output matmul overloads (and whether they run here);
 2. varlen_attention: model.varlen_attention at Llama-8B head shapes in bf16 against an fp32
    per-sequence SDPA with an explicit bottom-right causal mask, output and q/k/v gradients:
    ragged causal packing, fewer queries than keys (a group's responses over a shared prompt);
    the peak memory of a 16,384-token forward + backward against the padded SDPA math path's; and
    whether torch's raw varlen_attn takes k/v with fewer heads than q without enable_gqa. CPU:
    through tests/varlen_attn_double.py injected as model.VARLEN (torch 2.11's and 2.13's
    signatures), so the CUDA branch runs;
 3. parity: medrl's logits and packed log-probs (also a group sharing one packed prompt) against
    transformers on the same weights, at the Llama-3.2-1B and Llama-3.1-8B shapes; greedy tokens
    against transformers `generate`, a divergence judged by transformers' logit gap there;
 4. logprob_precision: a bf16 model's log-probs of its own samples as the sampler took them, as
    the forward's fp32 logits give them and as the trainer computes them (chunked
    token_logprobs), against the same weights upcast; logits sharpened to real models' range; and
    the time and peak memory of token_logprobs forward + backward at 4096 x 128,256 x 4096 (bf16
    on the CPU too: the stage is about bf16);
 5. fsdp_numerics: the FSDP2-sharded model (fp32 master weights, bf16 compute) against the plain
    bf16 model on one rank: packed log-probs, one activation-checkpointed backward against one
    without, greedy generation under parallel.Gathered. CPU: a one-rank gloo group, bf16 compute;
 6. decode_syncs: host synchronisations of rollout.generate per decode step and where they come
    from (torch.cuda.set_sync_debug_mode). CPU: skipped (the counting runs, with no mode to set);
 7. grpo: --grpo-steps GRPO steps of the 1B shape on the demo task through grpo.main (the process
    group of stage 5 reused), each phase's time and peak memory against memory.plan;
 8. throughput: sampling --rows prompts at once (64 and 256) x --new-tokens tokens through the
    paged engine at the 8B shape, CUDA graphs on and off, against transformers `generate` in the
    same run; the decode steps against the bandwidth roofline (weight + KV bytes read per step
    over a measured device copy) and the share its attention over the cache takes. CPU: the paged
    engine too, at both tiny shapes.
"""
import argparse
import contextlib
import copy
import faulthandler
import gc
import inspect
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kvcache  # noqa: E402
import model as M  # noqa: E402
import rl  # noqa: E402
import rollout as R  # noqa: E402
import tiny  # noqa: E402

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
# Below this gap in transformers' logits between its top token and medrl's choice, a greedy
# divergence is a near-tie that rounding decides (bf16 logits of |z| ~ 4 are 1/64 apart).
GREEDY_TIE = {torch.bfloat16: 0.1, torch.float32: 1e-4}
# Attention against its fp32 reference: largest |diff| over the reference's largest |value|
ATTENTION_TOL = {torch.bfloat16: 0.03, torch.float32: 1e-4}
GB = 1e9


@dataclass
class Check:
    """What every stage gets: the flags, the run's device and dtype, a scratch dir, and the
    checkpoints written there (shared by the stages that load one)."""
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    workdir: str
    checkpoints: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def shapes(self) -> list[str]:
        return ["llama-1b", "llama-8b"] if self.cuda else ["tiny", "tiny-wide"]

    def checkpoint(self, shape: str) -> str:
        """A random-init HF checkpoint of `shape` with the tiny tokenizer, written once."""
        if shape not in self.checkpoints:
            path = os.path.join(self.workdir, f"ckpt-{shape}")
            self.checkpoints[shape] = tiny.make_tiny_checkpoint(path, "llama", **SHAPES[shape])
        return self.checkpoints[shape]


# ----------------------------------------------------------------------------- the runner

def stages() -> list:
    """(name, function) in the order they run: looked up when called, so a test can replace one."""
    return [("environment", environment), ("varlen_attention", varlen_attention),
            ("parity", parity_stage), ("logprob_precision", logprob_precision),
            ("fsdp_numerics", fsdp_numerics), ("decode_syncs", decode_syncs),
            ("grpo", grpo_stage), ("throughput", throughput_stage)]


def run_stages(check: Check, chosen: list, report: dict, path: str) -> bool:
    """Run each stage into report["stages"][name], writing the report before and after each;
    returns whether every write succeeded."""
    written = True
    for i, (name, fn) in enumerate(chosen, start=1):
        out = report["stages"][name] = {}
        report["running"] = name  # on disk while it runs: a killed run's report names the stage
        written &= save(report, path)
        print(f"\n== [{i}/{len(chosen)}] {name}", flush=True)
        # a hang shows where, in the log
        faulthandler.dump_traceback_later(check.args.watchdog, file=sys.__stderr__)
        start = time.perf_counter()
        try:
            fn(check, out)
        except (Exception, SystemExit) as e:  # recorded; the next stage still runs
            out.update(failure(e))
        finally:
            faulthandler.cancel_dump_traceback_later()
        mark_failed_checks(out)
        out["seconds"] = round(time.perf_counter() - start, 2)
        after_stage(check, out)
        print(f"-- {name}: {status(out)} ({out['seconds']:.1f} s)", flush=True)
        if "error" in out:
            print("   " + out["traceback"][-1500:].replace("\n", "\n   "), flush=True)
        written &= save(report, path)
    report.pop("running")
    report["finished"] = True
    return save(report, path) and written


def after_stage(check: Check, out: dict):
    """Free what the stage left; an asynchronous CUDA error (a kernel's illegal access) surfaces
    here, at the synchronisation, and is recorded in place of stopping the run."""
    try:
        free_memory(check.device)
        if check.cuda:
            out["cuda_allocated_gb_after"] = round(torch.cuda.memory_allocated() / GB, 3)
    except Exception as e:
        out.setdefault("error", f"after the stage: {type(e).__name__}: {e}"[:2000])
        out.setdefault("traceback", failure(e)["traceback"])


def failure(e: BaseException) -> dict:
    lines = "".join(traceback.format_exception(e)).splitlines()
    return dict(error=f"{type(e).__name__}: {e}"[:2000], traceback="\n".join(lines[-30:]))


def attempt(out: dict, name: str, fn, *args):
    """One check of a stage: its dict under out[name], or its failure there, so that one failing
    check leaves the stage's others to run (the runner then marks the stage failed)."""
    try:
        out[name] = fn(*args)
    except (Exception, SystemExit) as e:
        out[name] = failure(e)
    return out[name]


def failed_checks(out: dict, where: str = "") -> list:
    """(path, check) of every nested dict holding "error", at any depth."""
    found = []
    for k, v in out.items():
        if isinstance(v, dict):
            path = f"{where}.{k}" if where else k
            found += [(path, v)] if "error" in v else failed_checks(v, path)
    return found


def mark_failed_checks(out: dict):
    """A stage with a failed check (a nested dict holding "error") is a failed stage."""
    failed = failed_checks(out)
    if failed and "error" not in out:
        out["error"] = "; ".join(f"{k}: {v['error'][:300]}" for k, v in failed)
        out["traceback"] = failed[0][1]["traceback"]


def status(out: dict) -> str:
    if "error" in out:
        return "FAILED: " + out["error"].splitlines()[0][:200]
    if "skipped" in out:
        return f"skipped ({out['skipped']})"
    return "ok" + (f": {out['verdict']}" if "verdict" in out else "")


def save(report: dict, path: str) -> bool:
    """The report, atomically (a temp file, then os.replace): a reader never sees half of one."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        return True
    except OSError as e:
        print(f"error: cannot write the report {path}: {e}", file=sys.stderr, flush=True)
        return False


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(header: list[str], rows: list[list]):
    """A small aligned table; floats in short scientific or fixed form, None as '-', text cut to
    60 characters (the report holds it whole)."""
    def cell(x):
        if x is None:
            return "-"
        if isinstance(x, bool):
            return "yes" if x else "NO"
        if isinstance(x, float):
            return f"{x:.2e}" if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e5) else f"{x:.3g}"
        return str(x) if len(str(x)) <= 60 else str(x)[:57] + "..."
    cells = [header] + [[cell(x) for x in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
    sys.stdout.flush()


# ----------------------------------------------------------------------------- models

def random_model(shape: str, device, dtype):
    """medrl's model of `shape` built in `dtype` with random weights (normal 0.02, norms 1), and
    its config.json dict."""
    shape_cfg = dict(SHAPES[shape])
    cfg_dict = tiny.tiny_config("llama", shape_cfg.pop("vocab_size"), **shape_cfg)
    cfg = M.ModelConfig.from_hf(cfg_dict)
    with torch.device("meta"):
        ours = M.CausalLM(cfg).to(dtype)
    ours.to_empty(device=device)
    ours.tie_weights()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=generator)
    ours.inv_freq = M.rope_inv_freq(cfg).to(device)
    return ours.eval(), cfg_dict


def random_pair(shape: str, device, dtype):
    """medrl's model and transformers' with the same random weights, and medrl's config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    ours, cfg_dict = random_model(shape, device, dtype)
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    hf.to_empty(device=device)
    hf.load_state_dict(ours.state_dict(), strict=False, assign=False)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg).to(device)  # buffers to_empty lost
    return ours, hf.eval(), ours.config


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]


def abs_diff(a: torch.Tensor, b: torch.Tensor, name: str) -> dict:
    d = (a.double() - b.double()).abs()
    return {f"{name}_mean_abs_diff": d.mean().item(), f"{name}_max_abs_diff": d.max().item()}


# ----------------------------------------------------------------------------- 1. environment

def environment(check: Check, out: dict):
    """What this machine offers medrl, read before anything relies on it."""
    import transformers
    out.update(torch=torch.__version__, cuda_runtime=torch.version.cuda,
               transformers=transformers.__version__, python=platform.python_version(),
               device=device_name(check.device), flash_attn=M.FLASH is not None,
               flash_attn_version=getattr(M.FLASH, "__version__", None),
               attention_backend_cuda_bf16=M.attention_backend("cuda", torch.bfloat16))
    if check.cuda:
        props = torch.cuda.get_device_properties(check.device)
        out.update(capability=f"{props.major}.{props.minor}",
                   memory_gb=round(props.total_memory / GB, 1), nccl=torch.cuda.nccl.version())
    try:  # torch's own module, whatever a test injected into model.VARLEN
        from torch.nn.attention import varlen
    except ImportError:
        varlen = None
    out["torch_varlen"] = varlen is not None
    out["varlen_attn_params"] = (list(inspect.signature(varlen.varlen_attn).parameters)
                                 if varlen else None)
    out["varlen_repeats_kv"] = M.varlen_repeats_kv()
    out["fp32_out_matmul"] = sorted(M.FP32_OUT_MATMUL)
    out["mm_overloads"] = list(torch.ops.aten.mm.overloads())
    out["addmm_overloads"] = list(torch.ops.aten.addmm.overloads())
    out["fp32_out_matmul_probe"] = fp32_out_matmul_probe(check.device)
    table(["", "value"], [["device", out["device"]], ["torch", out["torch"]],
                          ["transformers", out["transformers"]],
                          ["flash-attn", out["flash_attn_version"] or out["flash_attn"]],
                          ["backend (cuda, bf16)", out["attention_backend_cuda_bf16"]],
                          ["varlen_attn keywords", ", ".join((out["varlen_attn_params"] or
                                                               [])[7:]) or "-"],
                          ["varlen repeats k/v", out["varlen_repeats_kv"]],
                          ["fp32-out matmul on", ", ".join(out["fp32_out_matmul"]) or "-"],
                          ["fp32-out probe here", out["fp32_out_matmul_probe"]["result"]]])


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def fp32_out_matmul_probe(device) -> dict:
    """Whether bf16 x bf16 -> fp32 matmuls (what model.logits_fp32 and the log-prob backward call
    on CUDA) run on this device, and how far they are from fp32 products of the same numbers."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(64, 96, generator=g, device=device).bfloat16() for _ in range(2))
    exact = a.float() @ b.float().t()
    try:
        z = torch.mm(a, b.t(), out_dtype=torch.float32)
        acc = torch.zeros(96, 96, device=device)
        torch.addmm(acc, a.t(), a, out_dtype=torch.float32, out=acc)
    except Exception as e:  # a result, not a failure: the CPU has no such kernels
        return dict(result=f"raises {type(e).__name__}", exception=str(e)[:300])
    return dict(result="runs", mm_dtype=str(z.dtype),
                mm_max_abs_diff=(z - exact).abs().max().item(),
                addmm_max_abs_diff=(acc - a.float().t() @ a.float()).abs().max().item())


# ----------------------------------------------------------------------------- 2. varlen

def varlen_attention(check: Check, out: dict):
    """model.varlen_attention against an fp32 reference, at Llama-8B's attention shapes on CUDA;
    on the CPU through the varlen_attn test double as torch 2.11 and 2.13 would present it."""
    if check.cuda:
        out["backend"] = M.attention_backend("cuda", check.dtype)
        varlen_checks(check, out, heads=(32, 8, 128), lens=([300, 1024, 2000, 517, 64],
                      [200, 1500, 100, 37], [600, 1500, 900, 1937]), memory=(8, 2048))
    else:
        sys.path.insert(0, os.path.join(ROOT, "tests"))  # the double lives with the tests
        import varlen_attn_double as double
        real = M.VARLEN
        try:
            for version, kernel in (("2.11", double.for_version("2.11")), ("2.13", double)):
                M.VARLEN = kernel
                res = out[f"double-{version}"] = dict(backend=M.attention_backend("cpu",
                                                                                  check.dtype))
                varlen_checks(check, res, heads=(4, 2, 16), lens=([5, 17, 9, 1], [3, 17, 2],
                              [11, 17, 8]), memory=(4, 16))
        finally:
            M.VARLEN = real
    parts = ({"cuda": out} if check.cuda
             else {k: v for k, v in out.items() if k.startswith("double")})
    bad = [f"{label} {k}" for label, p in parts.items() for k in ("packed", "shared_keys")
           if not p[k].get("ok", False)]
    out["verdict"] = "MISMATCH: " + ", ".join(bad) if bad else "within tolerance"
    print_varlen(parts)


def varlen_checks(check: Check, out: dict, heads, lens, memory):
    """(i) ragged causal packing, (ii) fewer queries than keys, (iv) memory at `memory`
    (sequences, length), (iii) torch's raw kernel with fewer k/v heads than q heads."""
    h, hkv, d = heads
    packed, q_lens, k_lens = lens
    dev, dt = check.device, check.dtype

    def ours_square(q, k, v, cu_q, cu_k, max_q, max_k):  # cu_seqlens_k left out: its default
        return M.varlen_attention(q, k, v, cu_q, max_q)

    def ours(q, k, v, cu_q, cu_k, max_q, max_k):
        return M.varlen_attention(q, k, v, cu_q, max_q, cu_k, max_k)
    attempt(out, "packed", attention_vs_reference, ours_square, packed, packed, heads, dev, dt)
    attempt(out, "shared_keys", attention_vs_reference, ours, q_lens, k_lens, heads, dev, dt)
    attempt(out, "memory", packed_memory, memory, heads, dev, dt)
    attempt(out, "gqa_without_enable_gqa", raw_gqa_probe, packed[:2], heads, dev, dt)


def cumulative(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)  # (S+1,)


def attention_vs_reference(attend, q_lens, k_lens, heads, device, dtype) -> dict:
    """attend(q, k, v, cu_q, cu_k, max_q, max_k) against the fp32 reference: the output and the
    gradients of q, k, v for a random upstream gradient."""
    h, hkv, d = heads
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(sum(q_lens), h, d, generator=g, device=device).to(dtype)
    k, v = (torch.randn(sum(k_lens), hkv, d, generator=g, device=device).to(dtype)
            for _ in range(2))
    dout = torch.randn(q.shape, generator=g, device=device).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = attend(*leaves, cumulative(q_lens, device), cumulative(k_lens, device), max(q_lens),
               max(k_lens))
    o.backward(dout)
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_leaves, q_lens, k_lens)
    ref.backward(dout.float())
    res = dict(tokens_q=sum(q_lens), tokens_k=sum(k_lens), **abs_diff(o, ref, "out"),
               out_ref_max_abs=ref.abs().max().item())
    worst = res["out_max_abs_diff"] / res["out_ref_max_abs"]
    for name, a, b in zip("qkv", leaves, ref_leaves):
        res.update(abs_diff(a.grad, b.grad, f"grad_{name}"))
        res[f"grad_{name}_ref_max_abs"] = b.grad.abs().max().item()
        worst = max(worst, res[f"grad_{name}_max_abs_diff"] / res[f"grad_{name}_ref_max_abs"])
    res.update(worst_relative=worst, ok=worst < ATTENTION_TOL[dtype])
    return res


def reference_attention(q, k, v, q_lens, k_lens) -> torch.Tensor:
    """Per-sequence SDPA with an explicit mask: query i of a sequence sees keys j <= i + Lk - Lq
    (bottom-right alignment); k/v repeated to q's heads. q (Nq, H, D), k/v (Nk, Hkv, D)."""
    outs, q0, k0 = [], 0, 0
    g = q.shape[1] // k.shape[1]
    for lq, lk in zip(q_lens, k_lens):
        qi = q[q0:q0 + lq].transpose(0, 1)  # (H, Lq, D)
        ki, vi = (x[k0:k0 + lk].repeat_interleave(g, dim=1).transpose(0, 1)
                  for x in (k, v))  # (H, Lk, D)
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        mask = j <= i + (lk - lq)  # (Lq, Lk)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs)  # (Nq, H, D)


def packed_memory(memory, heads, device, dtype) -> dict:
    """Peak memory of one forward + backward of model.varlen_attention over `seqs` packed
    sequences of `length`, and what SDPA's math kernel over the same sequences padded into a
    batch needs: run when its estimate is under 40 GB, else only estimated. CPU: runs the same
    steps at tiny sizes, no memory to read."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    seqs, length = memory
    h, hkv, d = heads
    lens = [length] * seqs
    n = seqs * length
    cu = cumulative(lens, device)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(n, h, d, generator=g, device=device).to(dtype).requires_grad_()
    k, v = (torch.randn(n, hkv, d, generator=g, device=device).to(dtype).requires_grad_()
            for _ in range(2))
    grads = sum(x.nbytes for x in (q, k, v))  # made by every backward, counted in its peak

    def varlen():
        M.varlen_attention(q, k, v, cu, length).backward(torch.ones_like(q))
        q.grad = k.grad = v.grad = None

    def padded():  # (S, H, T, D): the packed rows are exactly S full sequences
        qp, kp, vp = (x.view(seqs, length, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.MATH):
            F.scaled_dot_product_attention(qp, kp, vp, is_causal=True,
                                           enable_gqa=True).backward(torch.ones_like(qp))
        q.grad = k.grad = v.grad = None
    # The math kernel keeps the scores and their softmax (S, H, T, T) and makes their gradient, in
    # fp32 (it upcasts bf16): about 4 such tensors at the peak, besides the gradients.
    padded_estimate = 4 * seqs * h * length * length * 4 + grads
    res = dict(tokens=n, sequences=seqs, varlen=measure(varlen, device),
               padded_math_estimate_gb=padded_estimate / GB)
    if padded_estimate < 40 * GB:
        res["padded_math"] = measure(padded, device)
    return res


def measure(fn, device) -> dict:
    """fn's seconds (its second run) and, on CUDA, the peak memory above what was allocated
    before it (fn leaves no gradients behind, so that their allocation counts)."""
    fn()
    free_memory(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(device) - base) / GB if device.type == "cuda" else None
    return dict(ms=1e3 * seconds, peak_gb=peak)


def raw_gqa_probe(lens, heads, device, dtype) -> dict:
    """Whether torch's varlen_attn itself (model.VARLEN) takes k/v with fewer heads than q when
    not told enable_gqa (torch 2.11 has no such argument; model.torch_varlen repeats k/v there),
    and if it runs, whether it matches the reference. Its exception is a result, not a failure."""
    if M.VARLEN is None:
        return dict(runs=None, note="no torch.nn.attention.varlen here")
    params = inspect.signature(M.VARLEN.varlen_attn).parameters
    causal = dict(window_size=(-1, 0)) if "window_size" in params else dict(is_causal=True)

    def raw(q, k, v, cu_q, cu_k, max_q, max_k):
        return M.VARLEN.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **causal)
    try:
        res = attention_vs_reference(raw, lens, lens, heads, device, dtype)
    except Exception as e:
        return dict(runs=False, exception=f"{type(e).__name__}: {e}"[:500])
    return dict(runs=True, **res)


def print_varlen(parts: dict):
    rows = []
    for label, p in parts.items():
        for name in ("packed", "shared_keys", "gqa_without_enable_gqa"):
            r = p.get(name, {})
            rows.append([f"{label} {name}", p.get("backend"), r.get("out_max_abs_diff"),
                         r.get("grad_q_max_abs_diff"), r.get("grad_k_max_abs_diff"),
                         r.get("grad_v_max_abs_diff"), r.get("ok", r.get("exception",
                                                                         r.get("error")))])
    table(["check", "backend", "out diff", "dq diff", "dk diff", "dv diff", "ok"], rows)
    for p in parts.values():
        m = p.get("memory", {})
        if "varlen" in m:
            pad = m.get("padded_math", {})
            print(f"  {m['tokens']:,} tokens fwd+bwd: varlen {m['varlen']['ms']:.1f} ms, peak "
                  f"{fmt_gb(m['varlen']['peak_gb'])}; padded SDPA math: "
                  f"{fmt_gb(pad.get('peak_gb'))} measured, "
                  f"{m['padded_math_estimate_gb']:.2f} GB estimated", flush=True)


def fmt_gb(x) -> str:
    return "-" if x is None else f"{x:.2f} GB"


# ----------------------------------------------------------------------------- 3. parity

def parity_stage(check: Check, out: dict):
    """medrl against transformers at each shape: forward, log-probs, greedy tokens."""
    for shape in check.shapes:
        attempt(out, shape, parity_of_shape, shape, check)
        free_memory(check.device)
    rows = []
    for shape in check.shapes:
        r, g = out[shape], out[shape].get("greedy", {})
        rows.append([shape, r.get("logits_max_abs_diff"), r.get("logits_max_abs"),
                     r.get("logprob_mean_abs_diff"), r.get("logprob_max_abs_diff"),
                     r.get("shared_prefix_logprob_max_abs_diff"), g.get("greedy_tokens_equal"),
                     g.get("greedy_max_gap"), g.get("greedy_ok")])
    table(["shape", "logit diff", "|logit|", "logp mean", "logp max", "shared max", "greedy=",
           "max gap", "greedy ok"], rows)
    bad = [s for s in check.shapes if not out[s].get("greedy", {}).get("greedy_ok")]
    out["verdict"] = ("greedy divergence above the tie threshold: " + ", ".join(bad) if bad
                      else "greedy agrees up to near-ties")


def parity_of_shape(shape: str, check: Check) -> dict:
    ours, hf, cfg = random_pair(shape, check.device, check.dtype)
    res = parity(ours, hf, cfg, check.device)
    attempt(res, "greedy", greedy, ours, hf, cfg, check)
    if check.cuda:  # the sampler's decode steps eager too (without CUDA graphs)
        attempt(res, "greedy_eager", greedy, ours, hf, cfg, check, 16, False)
    return res


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
    # attending to it (model.SharedPrefix; varlen attention with fewer queries than keys).
    group = [rl.Completion(None, 0, seqs[1], seqs[0][:n], None, "stop") for n in (40, 9, 128)]
    shared, _ = rl.logprobs(ours, rl.pack(group, device))
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
def greedy(ours, hf, cfg, check: Check, new_tokens: int = 16, graphs: bool = True) -> dict:
    """Greedy completions of 4 short prompts against transformers `generate`. Random-init models
    in bf16 have near-ties, so the two may part ways legitimately: where a completion first
    differs, the gap in transformers' logits between its top token and medrl's choice tells a tie
    (below GREEDY_TIE) from a bug. Also the top-1 minus top-2 margin there."""
    prompts = random_prompts(4, cfg.vocab_size, 5, 30, seed=2)
    out = R.generate(ours, prompts, R.Sampling(max_new_tokens=new_tokens, temperature=0,
                                               cuda_graphs=graphs), stop_ids=[], progress=False)
    same = prefix = 0
    divergences = []
    for i, (p, s) in enumerate(zip(prompts, out)):
        ref = hf.generate(torch.tensor([p], device=check.device), max_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)
        theirs = ref.sequences[0, len(p):].tolist()
        same += sum(a == b for a, b in zip(s.response_ids, theirs))
        first = next((t for t, (a, b) in enumerate(zip(s.response_ids, theirs)) if a != b), None)
        prefix += new_tokens if first is None else first
        if first is not None:
            z = ref.scores[first][0].float()  # (V,) transformers' logits where the two part
            top2 = z.topk(2).values
            divergences.append(dict(prompt=i, position=first, margin=(top2[0] - top2[1]).item(),
                                    medrl_token_gap=(top2[0] - z[s.response_ids[first]]).item()))
    tie = GREEDY_TIE[check.dtype]
    total = new_tokens * len(prompts)
    return dict(greedy_tokens_equal=same / total, greedy_prefix_equal=prefix / total,
                greedy_divergences=divergences, greedy_tie_threshold=tie,
                greedy_max_gap=max((d["medrl_token_gap"] for d in divergences), default=0.0),
                greedy_max_margin=max((d["margin"] for d in divergences), default=0.0),
                greedy_ok=all(d["medrl_token_gap"] < tie for d in divergences))


# ----------------------------------------------------------------------------- 4. log-probs

def logprob_precision(check: Check, out: dict):
    """bf16 log-probs of a model's own samples, three ways, against its weights upcast; then the
    cost of the trainer's log-probs at Llama-8B's head."""
    shape = check.shapes[0]  # llama-1b on CUDA: vocabulary 128,256
    model, _ = random_model(shape, check.device, torch.bfloat16)
    out["shape"] = shape
    out.update(sharpen(model, target=25.0))
    attempt(out, "precision", logprob_paths, model, check)
    del model
    free_memory(check.device)
    size = (4096, 128256, 4096) if check.cuda else (256, 512, 64)
    attempt(out, "timing", logprob_timing, size, check.device)
    p, t = out["precision"], out["timing"]
    rows = [[path] + [p.get(f"{path}_vs_{ref}_{stat}_abs_diff") for ref in ("fp32", "head_fp64")
                      for stat in ("mean", "max")] for path in ("sampler", "forward", "trainer")]
    table(["log-probs", "vs fp32 mean", "vs fp32 max", "vs fp64 head mean", "max"], rows)
    print(f"  trainer vs sampler: mean {p.get('trainer_vs_sampler_mean_abs_diff', 0):.2e}, max "
          f"{p.get('trainer_vs_sampler_max_abs_diff', 0):.2e}; {p.get('tokens')} tokens, mean "
          f"log-prob {p.get('mean_logprob', 0):.2f}; logits up to {out['logits_row_max_mean']:.1f}"
          f" (final norm x{out['final_norm_scale']:.1f})", flush=True)
    if "ms" in t:
        print(f"  token_logprobs fwd+bwd {t['tokens']} x {t['vocab']:,} x {t['hidden']}: "
              f"{t['ms']:.1f} ms, peak {fmt_gb(t['peak_gb'])} above its inputs", flush=True)


@torch.no_grad()
def sharpen(model, target: float) -> dict:
    """Random-init weights give logits of |z| ~ 4 at vocabulary 128k; a real model's reach 20-30,
    where rounding costs most. The final norm's weight is scaled so that each row's largest |z|
    averages `target` (the hidden states feeding the head grow; the trunk is untouched)."""
    ids = torch.tensor(random_prompts(1, model.config.vocab_size, 256, 256, seed=5)[0],
                       device=model.inv_freq.device)
    pos = torch.arange(len(ids), device=ids.device)
    cu = torch.tensor([0, len(ids)], dtype=torch.int32, device=ids.device)
    before = model(ids, pos, cu, len(ids)).abs().amax(-1).mean().item()
    scale = target / before
    model.model.norm.weight.mul_(scale)
    z = model(ids, pos, cu, len(ids))  # (N, V) fp32
    return dict(final_norm_scale=scale, logits_row_max_mean=z.abs().amax(-1).mean().item(),
                logits_max_abs=z.abs().max().item(), logits_std=z.std().item())


@torch.no_grad()
def logprob_paths(model, check: Check) -> dict:
    """The model samples (temperature 1); the same tokens' log-probs as the sampler took them, as
    the forward's fp32 logits give them (log_softmax of model(..., select=)), and as the trainer
    computes them (rl.logprobs: chunked token_logprobs), against (a) the model upcast to fp32 and
    (b) its own bf16 final hidden states through the head in float64."""
    vocab = model.config.vocab_size
    prompts = random_prompts(8 if check.cuda else 4, vocab, 64 if check.cuda else 4,
                             256 if check.cuda else 12, seed=6)
    new_tokens = 64 if check.cuda else 12
    samples = R.generate(model, prompts, R.Sampling(max_new_tokens=new_tokens), stop_ids=[],
                         progress=False)
    completions = [rl.Completion(None, i, s.prompt_ids, s.response_ids, torch.tensor(s.logprobs),
                                 s.finish_reason) for i, s in enumerate(samples)]
    mb = rl.pack(completions, check.device)
    hidden = []
    hook = model.model.norm.register_forward_hook(lambda m, i, o: hidden.append(o))
    try:
        trainer = rl.logprobs(model, mb)[0].double()
    finally:
        hook.remove()
    h = hidden[0][mb.select].double()  # (R, H) the bf16 final hidden states the head reads
    paths = dict(sampler=mb.sampler_logprobs.double(), trainer=trainer,
                 forward=pick(model(mb.ids, mb.positions, mb.cu_seqlens, mb.max_seqlen,
                                    attention=mb.attention, select=mb.select), mb.targets))
    refs = dict(head_fp64=pick(h @ model.lm_head.weight.double().t(), mb.targets))
    hidden.clear()  # the trainer forward's activations, freed before the fp32 copy
    del h
    upcast = copy.deepcopy(model).float()  # the same bf16 numbers, computed in fp32
    if check.cuda:
        print("  (the fp32 reference runs the padded SDPA path: a warning from model.py that "
              "neither kernel is here may follow; it is about fp32)", flush=True)
    refs["fp32"] = rl.logprobs(upcast, mb)[0].double()
    del upcast
    res = dict(tokens=len(mb.targets), mean_logprob=refs["fp32"].mean().item())
    for name, x in paths.items():
        for ref_name, ref in refs.items():
            res.update(abs_diff(x, ref, f"{name}_vs_{ref_name}"))
    res.update(abs_diff(paths["trainer"], paths["sampler"], "trainer_vs_sampler"))
    res.update(abs_diff(paths["trainer"], paths["forward"], "trainer_vs_forward"))
    return res


def pick(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[target] in float64. logits (R, V), targets (R,) -> (R,)"""
    return logits.double().log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def logprob_timing(size, device) -> dict:
    """token_logprobs forward + backward in bf16 at (tokens, vocab, hidden): time and the peak
    memory above its inputs (hidden states, head weight, targets)."""
    n, vocab, hidden = size
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(n, hidden, generator=g, device=device)).bfloat16().requires_grad_()
    w = (0.02 * torch.randn(vocab, hidden, generator=g, device=device)).bfloat16()
    w.requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g, device=device)

    def step():
        logp, _ = M.token_logprobs(h, w, targets)
        logp.sum().backward()
        h.grad = w.grad = None
    return dict(tokens=n, vocab=vocab, hidden=hidden, **measure(step, device))


# ----------------------------------------------------------------------------- 5. FSDP

def fsdp_numerics(check: Check, out: dict):
    """The FSDP2 model that training runs (fp32 master weights, bf16 compute) against the plain
    bf16 model that inference would load, from the same checkpoint, on one rank."""
    import parallel
    ckpt = check.checkpoint(check.shapes[0])
    dist = one_rank_group(check)
    out.update(process_group=torch.distributed.get_backend(), compute_dtype=str(dist.dtype))
    sharded = parallel.load_sharded(ckpt, dist, torch.float32)
    plain = M.load_model(ckpt, check.device, torch.bfloat16)
    mb = rl.pack(group_rollouts(plain.config.vocab_size, check.cuda), check.device)
    attempt(out, "logprobs", sharded_vs_plain, sharded, plain, mb)
    attempt(out, "checkpointed_backward", checkpointed_backward, sharded, mb)
    attempt(out, "gathered_greedy", gathered_greedy, sharded, plain, check)
    r, c, gg = out["logprobs"], out["checkpointed_backward"], out["gathered_greedy"]
    table(["check", "result"], [
        ["log-probs sharded vs plain, max", r.get("logprob_max_abs_diff", r.get("error"))],
        ["loss", c.get("loss")],
        ["grad ckpt vs none, max rel", c.get("grad_max_rel_diff", c.get("error"))],
        ["grads finite", c.get("grads_finite")],
        ["greedy tokens equal", gg.get("tokens_equal", gg.get("error"))],
        ["greedy log-prob max diff", gg.get("logprob_max_abs_diff")]])


def one_rank_group(check: Check):
    """parallel.setup_dist's one-rank group: NCCL as it makes it on CUDA; on the CPU a gloo group
    made here, with bf16 compute as on CUDA. Left in place: grpo.main's setup_dist reuses it."""
    import parallel
    if "MASTER_PORT" not in os.environ:  # setup_dist's default port could be taken
        os.environ["MASTER_PORT"] = str(free_port())
    if not check.cuda:
        os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist = parallel.setup_dist()
    dist.dtype = torch.bfloat16  # setup_dist's choice on CUDA; the CPU's fp32 otherwise
    return dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_rollouts(vocab: int, cuda: bool) -> list:
    """Two prompts with three completions each, packed as training packs them (a prompt once)."""
    g = torch.Generator().manual_seed(7)
    prompt_len, lo, hi = (200, 50, 300) if cuda else (7, 3, 9)
    out = []
    for group in range(2):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        for _ in range(3):
            n = int(torch.randint(lo, hi + 1, (1,), generator=g))
            response = torch.randint(0, vocab, (n,), generator=g).tolist()
            out.append(rl.Completion(None, group, prompt, response, torch.zeros(n), "stop"))
    return out


@torch.no_grad()
def sharded_vs_plain(sharded, plain, mb) -> dict:
    a, b = (rl.logprobs(m, mb)[0] for m in (sharded, plain))
    return dict(tokens=len(mb.targets), **abs_diff(a, b, "logprob"))


def checkpointed_backward(module, mb) -> dict:
    """One backward of the log-probs' mean without and one with activation checkpointing (the one
    that raised CheckpointError under FSDP2 on torch 2.11): both complete, same gradients."""
    grads = []
    for ckpt in (False, True):
        module.gradient_checkpointing = ckpt
        module.zero_grad(set_to_none=True)
        loss = -rl.logprobs(module, mb)[0].float().mean()
        loss.backward()
        grads.append([local(p.grad).float().clone() for p in module.parameters()
                      if p.grad is not None])
    module.gradient_checkpointing = False
    module.zero_grad(set_to_none=True)
    plain, ckpt = grads
    scale = max(g.abs().max().item() for g in plain)
    diff = max(((a - b).abs().max().item() for a, b in zip(plain, ckpt)), default=float("nan"))
    return dict(loss=loss.item(), params_with_grad=len(ckpt), grads_finite=all(
        bool(torch.isfinite(g).all()) for g in ckpt), grad_max_abs=scale,
        grad_max_rel_diff=diff / scale, same_count=len(plain) == len(ckpt))


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def gathered_greedy(sharded, plain, check: Check) -> dict:
    """Greedy generation with the sharded model's gathered weights (as rl.collect samples)
    against the plain model's: tokens, and log-probs where the tokens agree so far."""
    import parallel
    prompts = random_prompts(4, plain.config.vocab_size, 8, 40, seed=8)
    sampling = R.Sampling(max_new_tokens=32 if check.cuda else 8, temperature=0)
    with parallel.Gathered(sharded) as g:
        ours = R.generate(g, prompts, sampling, stop_ids=[], progress=False)
    ref = R.generate(plain, prompts, sampling, stop_ids=[], progress=False)
    same = total = 0
    diffs = []
    for a, b in zip(ours, ref):
        first = next((t for t, (x, y) in enumerate(zip(a.response_ids, b.response_ids))
                      if x != y), len(a.response_ids))
        same += sum(x == y for x, y in zip(a.response_ids, b.response_ids))
        total += len(b.response_ids)
        diffs += [abs(x - y) for x, y in zip(a.logprobs[:first], b.logprobs[:first])]
    return dict(tokens_equal=same / total, logprob_max_abs_diff=max(diffs, default=0.0))


# ----------------------------------------------------------------------------- 6. syncs

def decode_syncs(check: Check, out: dict):
    """Host synchronisations while rollout.generate decodes (CUDA's sync debug mode warns at each):
    how many per decode step and from where. It measures; today several per step are expected.
    On the CPU there is no such mode: the same generate runs under the same counting, which then
    sees none, and the stage is recorded as skipped."""
    model, _ = random_model(check.shapes[0], check.device, check.dtype)
    prompts = random_prompts(4, model.config.vocab_size, 8, 64, seed=9)
    new_tokens = 16
    sampling = R.Sampling(max_new_tokens=new_tokens, temperature=1.0)
    R.generate(model, prompts[:1], R.Sampling(max_new_tokens=2), stop_ids=[], progress=False)
    sites = sync_sites(lambda: R.generate(model, prompts, sampling, stop_ids=[], progress=False),
                       debug=check.cuda)
    out.update(summarise_syncs(sites, new_tokens))
    if not check.cuda:
        out["skipped"] = "needs CUDA (torch.cuda.set_sync_debug_mode)"
        return
    table(["where", "phase", "syncs"], [[s["where"], s["phase"], s["count"]]
                                        for s in out["sites"]])
    print(f"  {out['syncs']} syncs over {new_tokens} decode steps: {out['per_step']:.1f} per step "
          f"({out['per_step_in_steps']:.1f} inside the step functions)", flush=True)


STEP_FUNCTIONS = ("prefill", "decode", "step")  # rollout.Engine's parts of a step (innermost)


def sync_sites(fn, debug: bool = True) -> list[tuple[str, str]]:
    """Run fn with each synchronising CUDA call warned about; return, per warning, where
    (the innermost medrl frame: path:line function) and which rollout.py step function it was
    in ("other" when none). Other warnings pass through to the usual display."""
    sites = []
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return show(message, category, filename, lineno, file, line)
        sites.append(site_of(traceback.extract_stack()[:-1], f"{filename}:{lineno}"))
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every call, not once per place
        warnings.showwarning = record
        if debug:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode(0)
    return sites


def site_of(stack, fallback: str) -> tuple[str, str]:
    """(innermost project frame outside this script, the innermost rollout step function)."""
    here = os.path.abspath(__file__)
    ours = [f for f in stack if os.path.abspath(f.filename).startswith(ROOT + os.sep)
            and os.path.abspath(f.filename) != here]
    where = (f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno} {ours[-1].name}"
             if ours else fallback)
    phase = next((f.name for f in reversed(stack) if f.name in STEP_FUNCTIONS), "other")
    return where, phase


def summarise_syncs(sites: list[tuple[str, str]], steps: int) -> dict:
    counts = {}
    for site in sites:
        counts[site] = counts.get(site, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:20]
    in_steps = sum(c for (_, phase), c in counts.items() if phase != "other")
    return dict(syncs=len(sites), steps=steps, per_step=len(sites) / steps,
                per_step_in_steps=in_steps / steps,
                by_phase={p: sum(c for (_, q), c in counts.items() if q == p)
                          for p in (*STEP_FUNCTIONS, "other")},
                sites=[dict(where=w, phase=p, count=c) for (w, p), c in top])


# ----------------------------------------------------------------------------- 7. GRPO

def grpo_stage(check: Check, out: dict):
    """GRPO on the demo task through grpo.main; per phase: seconds, peak memory, the plan's."""
    with tempfile.TemporaryDirectory(dir=check.workdir) as workdir:
        out.update(grpo_steps(check, check.shapes[0], check.args.grpo_steps, workdir))
    print(f"  {out['shape']}, {out['steps']} steps, process group: {out['process_group']}; "
          f"generated {out['generated_tok_s']:,.0f} tok/s; reward "
          f"{['%.2f' % x for x in out['reward']]}", flush=True)
    table(["phase", "seconds", "peak GB", "planned GB"],
          [[phase, p["seconds"], p["peak_bytes"] / GB, out["plan"][phase] / GB]
           for phase, p in out["phases"].items()])


def grpo_steps(check: Check, shape: str, steps: int, workdir: str) -> dict:
    import grpo
    ckpt = check.checkpoint(shape)
    cuda, device = check.cuda, check.device
    flags = ["--model", ckpt, "--data", "demo", "--steps", str(steps), "--batch-prompts",
             "64" if cuda else "8", "--num-samples", "8" if cuda else "4", "--max-new-tokens",
             "128" if cuda else "8", "--kl-coef", "0.001", "--lr", "1e-5", "--save-every", "0",
             "--out", os.path.join(workdir, "run")]
    group = (torch.distributed.get_backend() + " (reused)" if torch.distributed.is_initialized()
             else "made by grpo.main" if cuda else "none")
    phases = {}
    real = rl.collect, rl.score, rl.update
    rl.collect, rl.score, rl.update = (phase_meter(phases, "generate", real[0], device),
                                       phase_meter(phases, "score", real[1], device),
                                       phase_meter(phases, "update", real[2], device))
    try:
        grpo.main(flags)
    finally:
        rl.collect, rl.score, rl.update = real
    with open(os.path.join(workdir, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    generated = sum(r["generated_tokens"] for r in rows)
    return dict(shape=shape, steps=len(rows), process_group=group, phases=phases,
                reward=[r["reward_mean"] for r in rows],
                generated_tok_s=generated / phases["generate"]["seconds"],
                plan=planned(ckpt, grpo.get_args(flags), cuda))


def phase_meter(phases: dict, name: str, fn, device):
    """fn, timed (device-synchronised) into phases[name] with its peak memory."""
    def wrapper(*a, **k):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t = time.perf_counter()
        result = fn(*a, **k)
        sync(device)
        entry = phases.setdefault(name, dict(seconds=0.0, peak_bytes=0))
        entry["seconds"] += time.perf_counter() - t
        if device.type == "cuda":
            entry["peak_bytes"] = max(entry["peak_bytes"], torch.cuda.max_memory_allocated(device))
        return result
    return wrapper


def planned(ckpt, args, cuda: bool) -> dict:
    import memory
    plan = memory.plan(M.read_config(ckpt), args, 1, cuda, prompt_len=128,
                       reference=args.kl_coef > 0)
    return {phase: sum(r[i] for r in plan.rows) for i, phase in
            enumerate(("generate", "score", "update"), start=1)}


# ----------------------------------------------------------------------------- 8. throughput

def throughput_stage(check: Check, out: dict):
    """Sampling speed at --rows concurrent sequences through the paged engine, CUDA graphs on
    and off: medrl against transformers and against the roofline. CUDA: the 8B shape (the
    recipe's); CPU: both tiny shapes."""
    shapes = check.shapes[-1:] if check.cuda else check.shapes
    for shape in shapes:
        attempt(out, shape, throughput_of_shape, shape, check)
        free_memory(check.device)
    rows = []
    for shape in shapes:
        for t in out[shape].values() if isinstance(out[shape], dict) else ():
            if isinstance(t, dict) and "rows" in t:
                g, e = t.get("graphs", {}), t.get("eager", {})
                rows.append([shape, t["rows"], g.get("tok_s"), e.get("tok_s"),
                             t.get("transformers_tok_s"), t.get("ratio"), g.get("step_ms"),
                             e.get("step_ms"), g.get("decode_roofline_fraction"),
                             g.get("attention_fraction")])
    table(["shape", "rows", "graphs tok/s", "eager tok/s", "hf tok/s", "ratio", "step ms",
           "eager ms", "roofline", "attention"], rows)


def throughput_of_shape(shape: str, check: Check) -> dict:
    ours, hf, cfg = random_pair(shape, check.device, check.dtype)
    out = dict(decode_kernel=kvcache.decode_kernel(check.device.type, check.dtype))
    for rows in check.args.rows:
        out[f"rows_{rows}"] = {}
        attempt(out, f"rows_{rows}", throughput, ours, hf, cfg, check.device, rows,
                check.args.new_tokens)
    return out


def throughput(ours, hf, cfg, device, rows: int, new_tokens: int) -> dict:
    """Sampling throughput of `rows` prompts sampled at once, medrl (the paged engine, eager and
    with CUDA graphs, each attempted on its own) vs transformers, and medrl's decode steps vs the
    roofline."""
    prompts = random_prompts(rows, cfg.vocab_size, 64, 256, seed=3)
    result = dict(rows=rows, new_tokens=new_tokens)
    with paged_engine():
        R.generate(ours, prompts[:2], R.Sampling(max_new_tokens=4), stop_ids=[], progress=False)
        for mode in ("eager", "graphs"):
            attempt(result, mode, engine_speed, ours, cfg, device, prompts, new_tokens,
                    mode == "graphs")
    hf_s = hf_generate_seconds(hf, prompts, new_tokens, device)
    result["transformers_tok_s"] = rows * new_tokens / hf_s
    if "tok_s" in result["graphs"]:  # (the default mode against transformers)
        result["ratio"] = result["graphs"]["tok_s"] / result["transformers_tok_s"]
    return result


def engine_speed(ours, cfg, device, prompts, new_tokens: int, graphs: bool) -> dict:
    """medrl twice, then once with the same decode steps (exactly new_tokens each, so the same
    rows) with attention over the cache skipped ("bare"): the difference is what attention costs
    a step. The faster run is kept; a step's time is the median step's (the first step of a
    bucket and width captures its graph)."""
    sampling = R.Sampling(max_new_tokens=new_tokens, temperature=1.0, cuda_graphs=graphs)
    runs = {contextlib.nullcontext: [], no_attention: []}  # (seconds, DecodeProbe) each
    doubled = graph_double if graphs and device.type != "cuda" else contextlib.nullcontext
    for variant in (contextlib.nullcontext, contextlib.nullcontext, no_attention):
        with DecodeProbe() as probe, variant(), doubled():
            sync(device)
            t = time.perf_counter()
            R.generate(ours, prompts, sampling, stop_ids=[], progress=False)
            sync(device)
            runs[variant].append((time.perf_counter() - t, probe))
    (seconds, decode), (_, bare) = (min(r, key=lambda run: run[0]) for r in runs.values())
    step_ms, bare_ms = decode.median_ms(), bare.median_ms()
    step_bytes = (weight_bytes(ours) + decode.kv_tokens / max(decode.steps, 1)
                  * kv_bytes(cfg, ours))
    roofline_ms = 1e3 * step_bytes / copy_bandwidth(device)
    return dict(tok_s=len(prompts) * new_tokens / seconds, decode_steps=decode.steps,
                step_ms=step_ms, decode_roofline_ms=roofline_ms,
                decode_roofline_fraction=roofline_ms / step_ms,
                decode_steps_without_attention=bare.steps,
                attention_fraction=(step_ms - bare_ms) / step_ms)


@contextlib.contextmanager
def graph_double():
    """CPU: decode steps captured and replayed through tests/cuda_graph_double.py (the CUDA
    graph branch runs; its timings mean nothing there)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import cuda_graph_double
    real = R.GRAPH_DEVICES, R.GRAPHS
    R.GRAPH_DEVICES, R.GRAPHS = {"cpu"}, cuda_graph_double
    try:
        yield
    finally:
        R.GRAPH_DEVICES, R.GRAPHS = real


@contextlib.contextmanager
def paged_engine():
    """The paged engine (rollout.Engine) on every device: on the CPU (--tiny) too."""
    real = R.CPU_DECODE
    R.CPU_DECODE = set()
    try:
        yield
    finally:
        R.CPU_DECODE = real


@contextlib.contextmanager
def no_attention():
    """Decode steps whose attention over the cache (and its k/v write) returns q unchanged."""
    real = kvcache.PagedDecode.attend
    kvcache.PagedDecode.attend = lambda self, layer, q, k, v: q
    try:
        yield
    finally:
        kvcache.PagedDecode.attend = real


class DecodeProbe:
    """Times rollout.Engine.decode (device-synchronised; the step's replay, or its forward and
    sampling eager) and counts the KV tokens its steps read (each row's, shared prompt blocks
    once per row: the paged kernels read a row's blocks whoever shares them)."""

    def __enter__(self):
        self.times, self.kv_tokens, self.real = [], 0, R.Engine.decode

        def timed(engine, rows):
            sync(engine.device)
            t = time.perf_counter()
            out = self.real(engine, rows)
            sync(engine.device)
            self.times.append(time.perf_counter() - t)
            self.kv_tokens += sum(r.length for r in rows)  # (each row's, the new token's too)
            return out
        R.Engine.decode = timed
        return self

    @property
    def steps(self) -> int:
        return len(self.times)

    def median_ms(self) -> float:
        return 1e3 * sorted(self.times)[len(self.times) // 2] if self.times else float("nan")

    def __exit__(self, *exc):
        R.Engine.decode = self.real


def weight_bytes(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(cfg, model) -> float:
    """Bytes of k and v per cached token."""
    per_layer = cfg.num_key_value_heads * cfg.head_dim * next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * per_layer


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


# ----------------------------------------------------------------------------- main

def get_args(argv=None):
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter,
                       argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    names = [name for name, _ in stages()]
    p.add_argument("--tiny", action="store_true", help="CPU check at tiny shapes (the test suite)")
    p.add_argument("--stages", default=",".join(names),
                   help="comma-separated stages to run, in their fixed order")
    p.add_argument("--rows", type=lambda v: [int(x) for x in v.split(",")], default=[64, 256],
                   help="concurrent sequences of the throughput runs, comma-separated")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per prompt, exactly")
    p.add_argument("--grpo-steps", type=int, default=2, help="GRPO steps at the 1B shape")
    p.add_argument("--watchdog", type=float, default=240,
                   help="seconds after which a stage still running dumps every thread's stack")
    where = os.environ.get("OUT")
    out = os.path.join(where, "gpu_check.json") if where else "gpu_check.json"
    p.add_argument("--out", default=out,
                   help="the JSON report ($OUT/gpu_check.json when OUT is set)")
    args = p.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(names)
    if unknown:
        p.error(f"--stages: unknown {sorted(unknown)}; the stages are {', '.join(names)}")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        args.rows, args.new_tokens = [min(r, 8) for r in args.rows][:1], min(args.new_tokens, 16)
    wanted = args.stages.split(",")
    chosen = [(name, fn) for name, fn in stages() if name in wanted]
    report = dict(device=device_name(device), dtype=str(dtype), torch=torch.__version__,
                  flash_attn=M.FLASH is not None, argv=sys.argv[1:] if argv is None else argv,
                  started=time.strftime("%Y-%m-%d %H:%M:%S"), stages={})
    print(f"{report['device']}, {dtype}, torch {torch.__version__}; report: {args.out}",
          flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        written = run_stages(Check(args, device, dtype, workdir), chosen, report, args.out)
    if torch.distributed.is_initialized():  # fsdp_numerics' group, when grpo.main did not close it
        torch.distributed.destroy_process_group()
    print("\nsummary")
    for name, out in report["stages"].items():
        print(f"  {name:<18} {out['seconds']:7.1f} s  {status(out)}")
    print(f"\nreport: {args.out}" + ("" if written else " (NOT WRITTEN: see the errors above)"),
          flush=True)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
