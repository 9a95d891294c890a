"""The kernels and host syncs of one decode step on the CUDA code path, counted on the CPU.

    OMP_NUM_THREADS=1 python bench/decode_ops.py [--verbose]

A decode step is the paged engine's (rollout.Engine.step: the forward of one new token per row,
the sampling of the next tokens, and the host's read of them), run on the CPU. Counted in it:
- kernels: every aten op that launches work on a GPU (views and other metadata-only ops are not),
  with the attention kernel (flash-attn's or torch's, their doubles standing in), the lm_head's
  fp32-output matmul and RMSNorm (aten's fused kernel on CUDA) as one each;
- host syncs: whatever makes the host wait for the GPU: reading device memory (.tolist(), .item(),
  bool(), .cpu()), a copy from host memory made while building a tensor on the device
  (torch.tensor(..., device=...)), and ops whose output size depends on device values (nonzero,
  masked_select, repeat_interleave without output_size, unique).
Per layer and fixed counts come from the same step at two depths (2 and 4 layers), for each
attention kernel the CUDA path can take (kvcache.decode_kernel). Each prints one line `decode
step: N kernels (P per layer + F fixed), S host syncs`, N at 32 layers. Launches cost the host
~5-8 us each on a GPU, so N per step bounds eager decode from below (a CUDA graph replays them
with one launch); a sync stalls the host until the GPU has caught up.
"""
import argparse
import collections
import contextlib
import functools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import model as M  # noqa: E402
import rollout as R  # noqa: E402
import tiny  # noqa: E402

aten = torch.ops.aten
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
             aten.new_empty_strided.default, aten.empty_like.default, aten.lift_fresh.default,
             aten.detach.default, aten.alias.default, aten.resize_.default,
             aten._unsafe_view.default, aten._local_scalar_dense.default}
SIZE_FROM_VALUES = {aten.nonzero.default, aten.masked_select.default, aten.unique_dim.default,
                    aten._unique2.default, aten.repeat_interleave.Tensor}
STEP = 3  # which decode step is counted (the 3rd: past the first admissions)


class Counter(TorchDispatchMode):
    """Kernels by op name and host syncs by where they happen, while `on`."""

    def __init__(self):
        super().__init__()
        self.on, self.in_kernel = False, False
        self.kernels, self.syncs = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.on or self.in_kernel:
            return out
        if sized_by_values(func, args, kwargs or {}):
            self.syncs[f"{func.__name__} (output size from values)"] += 1
        if func is aten._local_scalar_dense.default:
            self.syncs["item()"] += 1
        if func not in NO_KERNEL and not is_view(func):
            self.kernels[func.__name__] += 1
        return out

    @contextlib.contextmanager
    def one_kernel(self, name: str):
        """A fused kernel (the attention double): one launch, whatever it does inside."""
        if self.on and not self.in_kernel:
            self.kernels[name] += 1
        outer, self.in_kernel = self.in_kernel, True
        try:
            yield
        finally:
            self.in_kernel = outer


def sized_by_values(func, args, kwargs) -> bool:
    """An op whose output size the host must read from the device (a boolean mask is one)."""
    if func is aten.index.Tensor:
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    return func in SIZE_FROM_VALUES and not kwargs.get("output_size")


def is_view(func) -> bool:
    """An op whose output aliases its input without writing it: metadata only, no kernel."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


@contextlib.contextmanager
def host_syncs(counter: Counter):
    """Count reads of device memory, and tensors built from host data with a device given (the
    sampler's code gives its device only for tensors it computes with)."""
    patched = {}

    def wrap(owner, name, label, when=lambda *a, **k: True):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            if counter.on and not counter.in_kernel and when(*args, **kwargs):
                counter.syncs[label] += 1
            return real(*args, **kwargs)
        patched[(owner, name)] = real
        setattr(owner, name, counted)
    for name in ("tolist", "cpu", "numpy", "__bool__"):
        wrap(torch.Tensor, name, f".{name}()")
    wrap(torch, "tensor", "torch.tensor(host data, device=...)",
         lambda *a, device=None, **k: device is not None)
    try:
        yield
    finally:
        for (owner, name), real in patched.items():
            setattr(owner, name, real)


def build(layers: int) -> M.CausalLM:
    """A random-init Llama of 8B's structure (GQA 4:1, llama3 RoPE) in bf16 (the GPU's dtype),
    small widths: the ops of a step do not depend on the widths."""
    cfg = M.ModelConfig.from_hf(tiny.tiny_config("llama", 512, hidden_size=64,
                                                 num_hidden_layers=layers))
    torch.manual_seed(0)
    model = M.CausalLM(cfg)
    model.tie_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.to(torch.bfloat16).eval()


KERNELS = {"flash-attn": "flash-attn installed",
           "varlen": "torch >= 2.12, no flash-attn",
           "gather": "torch <= 2.11, no flash-attn: the H200 test machine's"}


def count_step(layers: int, kernel: str) -> Counter:
    """Kernels and syncs of decode step STEP of a sampler run (8 prompts x 4 samples) through
    the paged engine with this attention `kernel` (kvcache.decode_kernel), eager: from the step
    (rollout.Engine.step) to the next admit, the host's read of its results included."""
    import flash_attn_double
    import varlen_attn_double
    model = build(layers)
    counter = Counter()
    steps = collections.Counter()
    real_step, real_admit = R.Engine.step, R.Engine.admit
    real_attn = flash_attn_double.flash_attn_with_kvcache, varlen_attn_double.varlen_attn

    def step(self):
        steps["step"] += 1
        counter.on = steps["step"] == STEP
        return real_step(self)

    def admit(self):
        counter.on = False
        return real_admit(self)

    def fused(name, real):
        @functools.wraps(real)  # (its signature read by model.torch_varlen)
        def attention(*args, **kwargs):
            with counter.one_kernel(name):
                return real(*args, **kwargs)
        return attention
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (int(n),), generator=g).tolist()
               for n in torch.randint(5, 40, (8,), generator=g)]
    saved = (R.Engine.step, R.Engine.admit, R.CPU_DECODE, M.FLASH, M.VARLEN, M.logits_fp32,
             M.F.rms_norm)
    R.Engine.step, R.Engine.admit, R.CPU_DECODE = step, admit, set()
    # the lm_head: one bf16 matmul into fp32 on CUDA; the CPU upcasts the weight instead
    M.logits_fp32 = fused("mm (fp32 out)", M.logits_fp32)
    # RMSNorm: aten's fused kernel on CUDA (_fused_rms_norm); the CPU runs its decomposition
    M.F.rms_norm = fused("_fused_rms_norm", M.F.rms_norm)
    flash_attn_double.flash_attn_with_kvcache = fused("flash_attn_with_kvcache", real_attn[0])
    varlen_attn_double.varlen_attn = fused("varlen_attn", real_attn[1])
    M.FLASH = flash_attn_double if kernel == "flash-attn" else None
    M.VARLEN = varlen_attn_double if kernel == "varlen" else None
    try:
        with counter, host_syncs(counter):
            R.generate(model, prompts, R.Sampling(n=4, max_new_tokens=STEP + 3, seed=0),
                       stop_ids=[], progress=False)
    finally:
        (R.Engine.step, R.Engine.admit, R.CPU_DECODE, M.FLASH, M.VARLEN, M.logits_fp32,
         M.F.rms_norm) = saved
        flash_attn_double.flash_attn_with_kvcache, varlen_attn_double.varlen_attn = real_attn
    return counter


def report(kernel: str, verbose: bool):
    two, four = count_step(2, kernel), count_step(4, kernel)
    n2, n4 = sum(two.kernels.values()), sum(four.kernels.values())
    per_layer = (n4 - n2) // 2
    fixed = n2 - 2 * per_layer
    syncs = sum(four.syncs.values())
    print(f"{kernel} ({KERNELS[kernel]}): decode step: {fixed + 32 * per_layer} kernels "
          f"({per_layer} per layer + {fixed} fixed), {syncs} host syncs (32 layers, as 8B)")
    if verbose:
        layer_ops = four.kernels - two.kernels
        print("  per layer (x2 layers):", dict(sorted(layer_ops.items(), key=lambda kv: -kv[1])))
        print("  fixed:", dict(sorted((two.kernels - layer_ops).items(), key=lambda kv: -kv[1])))
        print("  syncs:", dict(four.syncs))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help="the ops per layer and the syncs")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; rows: 8 prompts x 4 samples; decode step {STEP}, eager "
          f"(a CUDA graph replays the same kernels with one launch)")
    for kernel in KERNELS:
        report(kernel, args.verbose)


if __name__ == "__main__":
    main()
