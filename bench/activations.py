"""Bytes of activations the update keeps per token, measured on a real forward (no arithmetic).

    OMP_NUM_THREADS=1 python bench/activations.py                 # Llama-3.1-8B widths
    OMP_NUM_THREADS=1 python bench/activations.py --hidden 2048 --intermediate 11008 --heads 16 \\
        --kv-heads 2 --head-dim 128                                # Qwen2.5-3B widths

memory.activation_bytes (what every run's memory plan uses): 1- and 2-layer models of the given
widths run the training forward in bf16 over --tokens packed tokens, with autograd's saved-tensor
hooks counting every distinct storage saved for backward (parameters excluded); the difference
is one layer's bytes per token, the rest the embedding, final norm and chunked log-probs.
Attention is counted as flash-attn saves it (q, k, v, output, lse); the CPU SDPA fallback keeps
more.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import memory  # noqa: E402
import model as M  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    cfg = M.ModelConfig.from_hf(dict(
        architectures=["LlamaForCausalLM"], vocab_size=1024, hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_hidden_layers=1,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim))
    print(f"{'':24}{'per layer B/token':>20}{'rest B/token':>15}")
    for checkpointing in (False, True):
        per_layer, rest = memory.activation_bytes(cfg, torch.bfloat16, checkpointing, args.tokens,
                                                  flash_like=True)
        name = "--grad-ckpt" if checkpointing else "--no-grad-ckpt"
        print(f"{name:<24}{per_layer:>20,.0f}{rest:>15,.0f}")


if __name__ == "__main__":
    main()
