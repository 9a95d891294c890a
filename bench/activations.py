"""Bytes of activations the update keeps per token, measured on a real forward (no arithmetic).

    OMP_NUM_THREADS=1 python bench/activations.py                 # Llama-3.1-8B widths
    OMP_NUM_THREADS=1 python bench/activations.py --hidden 2048 --intermediate 11008 --heads 16 \
        --kv-heads 2 --head-dim 128                                # Qwen2.5-3B widths

Builds 1- and 2-layer models of the given widths (a small vocabulary: the chunked log-probs never
hold more than one 256-row block of logits, whatever the vocabulary), runs the training forward in
bf16 over --tokens packed tokens with autograd's saved-tensor hooks counting every distinct storage
saved for backward (parameters excluded), and prints the bytes per token per layer (the 2-layer
count minus the 1-layer count) and the rest (embedding, final norm, log-probs), with and without
activation checkpointing. Attention is counted as flash-attn saves it (q, k, v, output, lse); the
CPU SDPA fallback keeps more.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M  # noqa: E402


class FlashLikeAttention(torch.autograd.Function):
    """Saves what flash_attn_varlen_func saves for backward: q, k, v, output and the lse."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.clone()
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def saved_bytes_per_token(args, layers: int, checkpointing: bool) -> float:
    cfg = M.ModelConfig.from_hf(dict(
        architectures=["LlamaForCausalLM"], vocab_size=1024, hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim))
    m = M.CausalLM(cfg).to(torch.bfloat16)
    m.inv_freq = M.rope_inv_freq(cfg)
    m.gradient_checkpointing = checkpointing
    param_storage = {p.untyped_storage().data_ptr() for p in m.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storage:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    n = args.tokens
    ids = torch.randint(0, cfg.vocab_size, (n,))
    cu = torch.tensor([0, n], dtype=torch.int32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(ids, torch.arange(n), cu, n, targets=ids, entropy=True)
    return sum(saved.values()) / n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    M.varlen_attention = lambda q, k, v, cu, max_seqlen: FlashLikeAttention.apply(q, k, v)
    print(f"{'':24}{'per layer B/token':>20}{'rest B/token':>15}")
    for checkpointing in (False, True):
        one, two = (saved_bytes_per_token(args, n, checkpointing) for n in (1, 2))
        name = "--grad-ckpt" if checkpointing else "--no-grad-ckpt"
        print(f"{name:<24}{two - one:>20,.0f}{2 * one - two:>15,.0f}")


if __name__ == "__main__":
    main()
