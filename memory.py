"""What a training run holds in memory, per GPU (or per CPU process), phase by phase.

    python grpo.py --model meta-llama/Llama-3.1-8B-Instruct --plan --plan-world 8   # config only
    (every run prints the same plan for its own flags at start)

Sizes are counted, not estimated by hand: parameters from the model built on the meta device;
the KV cache and optimizer state from their shapes; the activations the update keeps per token
from a real training forward of a 1- and a 2-layer model of the same widths, with autograd's
saved tensors counted (the difference is one layer's; the rest is the embedding, final norm and
chunked log-probs). On CUDA that forward counts what the attention backend that will run there
saves (model.attention_backend: flash-attn's or torch's varlen_attn: q, k, v, output, lse; k and v
repeated to q's heads where torch's lacks GQA), so a CPU can plan a GPU run; on CPU it runs the
real SDPA path at the run's sequence length.
"""
import os
from dataclasses import dataclass

import torch

import kvcache
import model as M
import rollout

GB = 1e9


class _FlashLikeAttention(torch.autograd.Function):
    """Saves for backward what flash_attn_varlen_func saves: q, k, v, the output and the lse."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.clone()
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:2], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _saved_bytes(cfg: M.ModelConfig, layers: int, dtype, grad_ckpt: bool, seq_len: int,
                 flash_like: bool) -> float:
    """Bytes saved for backward per token by a training forward of `layers` blocks."""
    small = M.ModelConfig(**{**vars(cfg), "num_hidden_layers": layers, "vocab_size": 512,
                             "tie_word_embeddings": False, "value_head": False})
    with torch.device("meta"):  # no random init: only the shapes of what is saved matter
        model = M.CausalLM(small).to(dtype)
    model.to_empty(device="cpu")
    model.inv_freq = M.rope_inv_freq(small)
    model.gradient_checkpointing = grad_ckpt
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    ids = torch.randint(0, 512, (seq_len,))
    cu = torch.tensor([0, seq_len], dtype=torch.int32)
    real_attention = M.varlen_attention
    if flash_like:
        repeat = M.attention_backend("cuda", dtype) == "varlen" and M.varlen_repeats_kv()

        def flash_like_attention(q, k, v, cu, max_seqlen):
            if repeat:  # (N, H, D): as torch_varlen hands them to the kernel
                g = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            return _FlashLikeAttention.apply(q, k, v)
        M.varlen_attention = flash_like_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, torch.arange(seq_len), cu, seq_len, targets=ids, entropy=True)
    finally:
        M.varlen_attention = real_attention
    return sum(saved.values()) / seq_len


def activation_bytes(cfg: M.ModelConfig, dtype, grad_ckpt: bool, seq_len: int,
                     flash_like: bool) -> tuple[float, float]:
    """(bytes per token per layer, bytes per token for the rest) that the update keeps."""
    one, two = (_saved_bytes(cfg, n, dtype, grad_ckpt, seq_len, flash_like) for n in (1, 2))
    return two - one, 2 * one - two


def parameter_count(cfg: M.ModelConfig, value_head: bool = False) -> int:
    with torch.device("meta"):
        model = M.CausalLM(M.ModelConfig(**{**vars(cfg), "value_head": value_head}))
    model.tie_weights()
    return sum(p.numel() for p in model.parameters())


@dataclass
class Plan:
    rows: list[tuple[str, float, float, float]]  # (what, generation, scoring, update) in bytes

    def peak(self) -> float:
        return max(sum(r[i] for r in self.rows) for i in (1, 2, 3))

    def table(self) -> str:
        lines = [f"{'held per process (GB)':<52}{'generate':>10}{'score':>10}{'update':>10}"]
        for what, *phases in self.rows:
            lines.append(f"{what:<52}" + "".join(f"{b / GB:>10.2f}" for b in phases))
        sums = [sum(r[i] for r in self.rows) / GB for i in (1, 2, 3)]
        lines.append(f"{'sum':<52}" + "".join(f"{s:>10.2f}" for s in sums))
        return "\n".join(lines)


def plan(cfg: M.ModelConfig, args, world: int, cuda: bool, prompt_len: int,
         critic: bool = False, reference: bool = False) -> Plan:
    """Per-phase bytes for one rank of `world` running `args` (grpo.py / ppo.py flags) on a model
    of `cfg`, with prompts of at most `prompt_len` tokens."""
    infer = 2 if cuda else 4  # bf16 on CUDA, fp32 on CPU (parallel.Dist.dtype)
    n_policy = parameter_count(cfg)
    trained = [("policy", n_policy)] + ([("critic", parameter_count(cfg, True))] if critic else [])
    seq_len = prompt_len + args.max_new_tokens
    dtype = torch.bfloat16 if cuda else torch.float32
    # FlashAttention's saves grow linearly with tokens: 64 measure them; the padded SDPA path
    # (the CPU's, or CUDA with neither kernel) needs the run's own sequence length.
    flash_like = cuda and M.attention_backend("cuda", dtype) != "sdpa"
    measure_len = 64 if flash_like else min(seq_len, args.micro_tokens)
    full_layer, rest = activation_bytes(cfg, dtype, False, measure_len, flash_like)
    kept_layer = full_layer
    if args.grad_ckpt:  # the block inputs only
        kept_layer = activation_bytes(cfg, dtype, True, measure_len, flash_like)[0]
    layers = cfg.num_hidden_layers
    kept = layers * kept_layer + rest
    prompts = args.batch_prompts // world
    # a micro-batch never holds more than the step's tokens (but at least one whole sequence)
    micro = max(min(args.micro_tokens, prompts * args.n * seq_len), seq_len)
    if cuda:  # the paged engine: a pool of blocks, up to 512 rows decoding at once
        size = kvcache.block_size(kvcache.decode_kernel("cuda", dtype))
        kv_tokens = size * kvcache.pool_blocks(args.max_cache_tokens, prompts * args.n, seq_len,
                                               size)
        slots = min(rollout.BUCKETS[-1], prompts * args.n)
    else:  # decode_cpu.py: a slot per sequence decoding at once
        kv_tokens = min(args.max_cache_tokens, prompts * args.n * seq_len)
        slots = min(args.max_cache_tokens // seq_len, prompts * args.n)
    kv = kv_tokens * 2 * layers * cfg.num_key_value_heads * cfg.head_dim * infer
    rows = []
    for name, count in trained:
        rows.append((f"{name}: fp32 weights (shard)", 4 * count / world, 4 * count / world,
                     4 * count / world))
        rows.append((f"{name}: AdamW moments (shard)", 8 * count / world, 8 * count / world,
                     8 * count / world))
        rows.append((f"{name}: fp32 gradients (shard)", 0.0, 0.0, 4 * count / world))
    if reference:
        bf16 = args.reference_dtype == "bfloat16" or (cuda and args.reference_dtype == "auto")
        ref = 2 if bf16 else 4
        rows.append(("reference (shard)", ref * n_policy / world, ref * n_policy / world,
                     ref * n_policy / world))
    if world > 1:
        root = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        block = (n_policy - root) / layers
        rows.append(("policy gathered to sample", infer * n_policy, 0.0, 0.0))
        rows.append(("unsharded in flight: root (embeddings) + one block", 0.0,
                     infer * (root + block), infer * (root + block)))
        rows.append(("one block's fp32 gradient before its reduce-scatter", 0.0, 0.0,
                     4 * block))
    rows.append((f"KV cache: {kv_tokens:,} tokens", kv, 0.0, 0.0))
    # fp32 logits, scaled, softmax; float64 probabilities and their CDF; and at most one live
    # prompt per row has its prefill logits kept (its later samples start from them)
    rows.append((f"decode logits and sampling: {slots} rows", slots * cfg.vocab_size * 32,
                 0.0, 0.0))
    # model.token_logprobs' backward: two (chunk, vocab) fp32 blocks, and with low-precision
    # weights an fp32 accumulator of the lm_head's gradient (with fp32 weights it is the gradient)
    head = cfg.vocab_size * cfg.hidden_size * 4 if dtype != torch.float32 else 0.0
    rows.append(("log-prob backward: fp32 lm_head gradient, 2 blocks", 0.0, 0.0,
                 head + 2 * 256 * cfg.vocab_size * 4))
    rows.append((f"one block's activations at {micro:,} tokens", 0.0, micro * full_layer,
                 micro * full_layer if args.grad_ckpt else 0.0))  # recomputed in the backward
    rows.append((f"kept activations: {micro:,} tokens x {kept / 1e3:,.1f} kB", 0.0, 0.0,
                 micro * kept))
    return Plan(rows)


# A run whose planned peak is under this (the tiny demo model) says it in one line: the table's
# rows would all read 0.00.
SMALL_PEAK = 0.1 * GB


def print_plan(args, name: str, cfg: M.ModelConfig, world: int, cuda: bool, prompt_len: int,
               brief: bool = False):
    """The memory plan of a grpo / ppo run with these flags, and its peak; brief: one line
    instead when the peak is under SMALL_PEAK."""
    held = plan(cfg, args, world, cuda, prompt_len, critic=name == "ppo",
                reference=args.kl_coef > 0)
    where = f"{world} x {'CUDA' if cuda else 'CPU'}"
    if brief and held.peak() < SMALL_PEAK:
        print(f"memory plan: at most {held.peak() / GB:.2f} GB per process ({where}; --plan "
              f"prints the table)", flush=True)
        return
    print(f"memory plan ({where}, prompts up to {prompt_len} tokens, attention: "
          f"{attention(cuda)}):\n{held.table()}\n"
          f"planned peak: {held.peak() / GB:.2f} GB per process", flush=True)


def attention(cuda: bool) -> str:
    """The attention kernel the plan counts: the one a run there gets."""
    backend = M.attention_backend("cuda" if cuda else "cpu", torch.bfloat16 if cuda else
                                  torch.float32)
    if backend == "varlen" and M.varlen_repeats_kv():
        return "torch varlen_attn, k/v repeated to q's heads (no enable_gqa before torch 2.12)"
    return {"flash-attn": "flash-attn", "varlen": "torch varlen_attn",
            "sdpa": "SDPA over padded sequences"}[backend]


def plan_only(args, name: str):
    """--plan: the plan from the model's config alone, for --plan-world ranks on --plan-device."""
    if args.model == "tiny":
        from tiny import tiny_config
        cfg = M.ModelConfig.from_hf(tiny_config("llama", 384))
    else:
        cfg = M.read_config(args.model)
    world = args.plan_world or int(os.environ.get("WORLD_SIZE", 1))
    cuda = (args.plan_device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    print_plan(args, name, cfg, world, cuda, args.plan_prompt_tokens)
