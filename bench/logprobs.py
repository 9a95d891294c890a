"""Peak memory and time of token log-probs, forward + backward: chunked vs naive.

  chunked: model.token_logprobs(hidden, weight, targets, entropy=False) (a (chunk, vocab) block at
           a time; the backward recomputes each block from the saved log-sum-exp)
  naive:   torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets) (full (tokens, vocab) blocks)

Each variant runs in its own fresh subprocess, so its peak is not hidden by the other's. The peak is
the rise of the process's peak RSS (ru_maxrss) over its value once the inputs exist; on CUDA,
torch.cuda.max_memory_allocated over memory_allocated. The subprocesses run with a fixed glibc
mmap threshold, so freed large blocks go back to the OS and RSS follows live memory. Weight
gradients (vocab x hidden float32) are part of both peaks.

    OMP_NUM_THREADS=1 python bench/logprobs.py [--tokens 4096 --hidden 1024 --vocab 128256]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import torch

import model as M

VARIANTS = ("naive", "chunked")


def logprobs(variant: str, hidden, weight, targets, chunk: int):
    if variant == "chunked":
        return M.token_logprobs(hidden, weight, targets, entropy=False, chunk=chunk)[0]
    return torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)


def memory_mb(device: str, peak: bool) -> float:
    """MiB: on CUDA the allocator's peak (or current) bytes; on CPU always the process's peak RSS."""
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(args):
    """Run one variant forward + backward; print a JSON line, save the log-probs to args.save."""
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Warm up on tiny inputs first: lazily loaded code (checkpointing, kernels) then sits in the baseline.
    w = torch.randn(64, 8, device=device, requires_grad=True)
    logprobs(args.variant, torch.randn(4, 8, device=device), w, torch.zeros(4, dtype=torch.long, device=device),
             2).sum().backward()
    g = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device).requires_grad_()
    # scaled in place: a temporary would raise the CPU baseline (the RSS high-water mark)
    weight = torch.randn(args.vocab, args.hidden, generator=g).mul_(0.02)
    weight = weight.to(device).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = memory_mb(device, peak=False)
    t = time.perf_counter()
    lp = logprobs(args.variant, hidden, weight, targets, args.chunk)
    lp.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = memory_mb(device, peak=True) - base
    torch.save(dict(lp=lp.detach().cpu(), dh=hidden.grad.cpu(), dw=weight.grad.cpu()), args.save)
    print(json.dumps(dict(peak_mb=peak, seconds=seconds, device=device)))


def main():
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    # problem size
    p.add_argument("--tokens", type=int, default=4096, help="tokens (rows of hidden states)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama-3: 128,256)")
    p.add_argument("--chunk", type=int, default=256, help="token_logprobs chunk size (rows per block)")
    # run
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each subprocess")
    p.add_argument("--variant", choices=VARIANTS, help="internal: run only this variant (the subprocess)")
    p.add_argument("--save", help="internal: where the subprocess saves its log-probs and gradients")
    args = p.parse_args()
    if args.variant:
        return child(args)

    # A fixed glibc mmap threshold: large blocks go back to the OS when freed, so RSS tracks live memory.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in VARIANTS:
            save = os.path.join(tmp, f"{v}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--save", save,
                   *[f"--{k}={getattr(args, k)}" for k in ("tokens", "hidden", "vocab", "chunk", "seed", "threads")]]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{v} subprocess failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results[v] = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[v] = torch.load(save)

    full_mb = args.tokens * args.vocab * 4 / 2**20
    dev = results["chunked"]["device"]
    print(f"\n{args.tokens} tokens x vocab {args.vocab}, hidden {args.hidden}, float32 on {dev}, "
          f"chunk {args.chunk}; one (tokens, vocab) float32 tensor = {full_mb:,.0f} MiB")
    print(f"{'variant':10}{'peak MiB':>12}{'seconds':>10}")
    for v in VARIANTS:
        print(f"{v:10}{results[v]['peak_mb']:>12,.0f}{results[v]['seconds']:>10.1f}")
    ratio = results["naive"]["peak_mb"] / results["chunked"]["peak_mb"]
    print(f"peak memory naive / chunked: {ratio:.2f}x;  time chunked / naive: "
          f"{results['chunked']['seconds'] / results['naive']['seconds']:.2f}x")
    a, b = outputs["naive"], outputs["chunked"]
    print("max abs diff naive vs chunked: " + ", ".join(
        f"{name} {(a[k] - b[k]).abs().max().item():.2e}" for k, name in
        (("lp", "log-probs"), ("dh", "d hidden"), ("dw", "d weight"))))


if __name__ == "__main__":
    main()
