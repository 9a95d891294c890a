"""Llama-3.x / Qwen2.x decoder in plain PyTorch, Hugging Face checkpoint I/O, token log-probs.

Module names match the HF checkpoints, so loading is a strict key copy from (sharded) safetensors.
One forward serves every use:
  - `model(ids)` with ids `(B, T)`: logits `(B, T, vocab)` (every row a full sequence);
  - packed: ids `(N,)` holding all sequences back to back, `positions (N,)`, `cu_seqlens (S+1,)`
    int32 and `max_seqlen`: no padding anywhere (training and scoring use this);
  - `targets=` turns the output into per-token log-probs (and entropy) computed in chunks, so no
    `[tokens, vocab]` float32 tensor exists; `select=` keeps only some rows' logits (prefill);
  - `attention=` hands attention to a record's `attend(layer, q, k, v)`: the sampler's
    (kvcache.PagedPrefill / PagedDecode, decode_cpu.Prefill / Decode) write k/v into its KV cache
    and attend over it; `SharedPrefix` lets a group's responses attend to one packed copy of
    their prompt (training and scoring);
  - a model built with a value head (PPO critic) returns one value per token instead.
Attention over packed sequences (training, scoring, prefill), picked by `attention_backend`, the
one switch: on CUDA in fp16/bf16, flash-attn's varlen kernel when the package imports, else torch's
own FlashAttention (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10); on the CPU, SDPA over
the sequences padded into one batch. Tests inject pure-PyTorch doubles of either kernel.
Logits are float32 products of the low-precision weights (`logits_fp32`): the sampler and the
trainer take every log-prob from the same unrounded numbers.
"""
import functools
import inspect
import itertools
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:
    import flash_attn as FLASH  # optional, CUDA only
except ImportError as e:
    FLASH = None
    if not (isinstance(e, ModuleNotFoundError) and e.name == "flash_attn"):  # installed, broken
        print(f"note: flash-attn is installed but does not import ({e}); it was probably built "
              f"for another torch. Attention runs through torch.nn.attention.varlen instead.",
              file=sys.stderr)
try:
    from torch.nn.attention import varlen as VARLEN  # torch >= 2.10: FlashAttention-2 in torch
except ImportError:
    VARLEN = None
# Devices whose matmuls take bf16 operands to an fp32 result (mm / addmm's `out_dtype`, torch >=
# 2.8, CUDA only; tests add "cpu" with a double of the kernels)
FP32_OUT_MATMUL = {"cuda"} if "dtype" in torch.ops.aten.mm.overloads() else set()

ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# A critic (PPO's value model) is saved as transformers' token-classification model with one label:
# the same trunk, and a `score` head (hidden -> 1, with bias) giving one value per token.
CRITIC_ARCHS = {"LlamaForTokenClassification": "llama", "Qwen2ForTokenClassification": "qwen2"}


def _runs(kernel, device: str, dtype: torch.dtype) -> bool:
    """Whether a FlashAttention `kernel` (a module, or None when absent) runs on tensors of this
    device type and dtype: CUDA in fp16/bf16, or anywhere for a test double."""
    if kernel is None:
        return False
    if getattr(kernel, "IS_TEST_DOUBLE", False):
        return True
    return device == "cuda" and dtype in (torch.float16, torch.bfloat16)


def attention_backend(device: str, dtype: torch.dtype) -> str:
    """The one place that picks the attention of packed sequences on a device type in a dtype:
    "flash-attn", "varlen" (torch's varlen_attn) or "sdpa" (padded: the CPU's)."""
    if _runs(FLASH, device, dtype):
        return "flash-attn"
    return "varlen" if _runs(VARLEN, device, dtype) else "sdpa"


# ----------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    arch: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3 scaling parameters, or None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    value_head: bool = False  # PPO critic: a scalar `score` head instead of logits
    raw: dict = field(default_factory=dict, repr=False)  # config.json as read, written back on save

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "ModelConfig":
        name = (cfg.get("architectures") or [""])[0]
        arch = ARCHS.get(name) or CRITIC_ARCHS.get(name)
        if arch is None:
            raise ValueError(f"{where}: unsupported architecture {cfg.get('architectures')}; "
                             f"medrl supports {sorted(ARCHS) + sorted(CRITIC_ARCHS)}")
        if name in CRITIC_ARCHS and cfg.get("num_labels", len(cfg.get("id2label") or [0])) != 1:
            raise ValueError(f"{where}: a {name} critic needs num_labels 1")
        if cfg.get("mlp_bias") or cfg.get("use_sliding_window"):
            raise ValueError(f"{where}: mlp_bias / sliding-window attention are not supported")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{where}: rope type {rope_type!r} is not supported (default, llama3)")
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            arch=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or attention_bias, o_bias=arch == "llama" and attention_bias,
            value_head=name in CRITIC_ARCHS, raw=dict(cfg))

    def to_hf(self) -> dict:
        """config.json readable by transformers 4 (rope_theta / rope_scaling) and 5
        (rope_parameters)."""
        cfg = dict(self.raw)
        cfg.update(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                   intermediate_size=self.intermediate_size,
                   num_hidden_layers=self.num_hidden_layers,
                   num_attention_heads=self.num_attention_heads, head_dim=self.head_dim,
                   num_key_value_heads=self.num_key_value_heads, rms_norm_eps=self.rms_norm_eps,
                   tie_word_embeddings=self.tie_word_embeddings, rope_theta=self.rope_theta)
        scaling = dict(self.rope_scaling, rope_type="llama3") if self.rope_scaling else None
        cfg["rope_scaling"] = scaling
        cfg["rope_parameters"] = dict(scaling or {"rope_type": "default"},
                                      rope_theta=self.rope_theta)
        names = CRITIC_ARCHS if self.value_head else ARCHS
        cfg["architectures"] = [{v: k for k, v in names.items()}[self.arch]]
        cfg["model_type"] = self.arch
        if self.value_head:  # transformers' token classification with a single label
            cfg.update(num_labels=1, id2label={"0": "value"}, label2id={"value": 0})
        return cfg


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse rotary frequencies `(head_dim/2,)`, with Llama-3's long-context rescaling if set."""
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if cfg.rope_scaling is None:
        return inv.float()
    s = cfg.rope_scaling
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
    scaled = (1 - smooth) * inv / factor + smooth * inv
    return scaled.float()


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor):
    """cos and signed sin (N, 1, D) float32 for `rotate`: [cos, cos] and [-sin, sin] of each
    position's angles."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (N, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved ("rotate half") rotary embedding in float32: halves (x1, x2) become
    (x1 c - x2 s, x2 c + x1 s), computed as x * [c, c] + roll(x) * [-s, s] (the same products and
    sums, bit for bit, in 4 kernels instead of 9; x meets the float32 tables in the products).
    x (N, H, D); cos/sin from rope_tables."""
    return (x * cos + x.roll(x.shape[-1] // 2, -1) * sin).to(x.dtype)


# ----------------------------------------------------------------------------- attention

def varlen_attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int,
                     cu_seqlens_k: torch.Tensor | None = None, max_seqlen_k: int | None = None):
    """Causal attention within each packed sequence. q (Nq, H, D), k/v (Nk, Hkv, D) -> (Nq, H, D).
    Sequence s: queries [cu_seqlens[s], cu_seqlens[s+1]), keys [cu_seqlens_k[s], ...) (by default
    the same tokens). With fewer queries than keys the queries are the last ones: query i sees keys
    j <= i + Lk - Lq (flash-attn's bottom-right causal alignment)."""
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    max_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
    backend = attention_backend(q.device.type, q.dtype)
    if backend == "flash-attn":
        return FLASH.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k,
                                            causal=True)
    if backend == "varlen":
        return torch_varlen(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k)
    if q.is_cuda:
        _say_padded_attention(q.dtype)
    # SDPA fallback: the sequences scattered into a right-padded batch (padded rows are computed
    # and dropped), cost O(S * Tq * Tk). With a shared prefix, sequences whose queries are their
    # keys and those with fewer queries are two batches, so that short queries are not padded to
    # the longest prompt. (One SDPA call per sequence was slower on the CPU: bench/README.md.)
    q_lens, k_lens = cu_seqlens.diff().long(), cu_k.diff().long()
    if cu_seqlens_k is None:
        return _padded_sdpa(q, k, v, q_lens, k_lens, max_seqlen, max_k, square=True)
    q_seq, k_seq = (torch.repeat_interleave(torch.arange(len(q_lens), device=q.device), lens,
                                            output_size=len(x))
                    for lens, x in ((q_lens, q), (k_lens, k)))  # each row's sequence
    out = q.new_empty(q.shape)
    for part, square in ((q_lens == k_lens, True), (q_lens != k_lens, False)):
        if part.any():
            rq, rk = part[q_seq], part[k_seq]  # the rows of these sequences
            out[rq] = _padded_sdpa(q[rq], k[rk], v[rk], q_lens[part], k_lens[part],
                                   int(q_lens[part].max()), int(k_lens[part].max()), square)
    return out


def torch_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int):
    """Causal varlen_attn of torch's own FlashAttention, whose arguments changed between torch
    versions (read from its signature): causal is `is_causal=True` on 2.10, and from 2.11 the
    window (-1, 0), flash-attn's bottom-right alignment when queries are fewer than keys; k/v with
    fewer heads than q need `enable_gqa` (2.12+), before which they are repeated to q's heads."""
    params = varlen_params(VARLEN.varlen_attn)
    kw = dict(window_size=(-1, 0)) if "window_size" in params else dict(is_causal=True)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (Nk, H, D)
    return VARLEN.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


@functools.lru_cache
def _say_padded_attention(dtype: torch.dtype):
    why = (f"FlashAttention needs fp16 or bf16, not {dtype}" if dtype == torch.float32 else
           "neither flash-attn nor torch.nn.attention.varlen (torch >= 2.10) is here")
    print(f"warning: {why}: attention on CUDA runs padded through SDPA, whose memory grows with "
          f"the square of the sequence length", file=sys.stderr)


@functools.lru_cache
def varlen_params(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def varlen_repeats_kv() -> bool:
    """Whether torch_varlen repeats k/v heads for GQA (torch < 2.12): what the plan counts."""
    return VARLEN is not None and "enable_gqa" not in varlen_params(VARLEN.varlen_attn)


def _padded_sdpa(q, k, v, q_lens, k_lens, max_q: int, max_k: int, square: bool):
    """Causal attention of packed sequences through one SDPA call over a right-padded batch.
    Query i of a sequence sees its keys j <= i + Lk - Lq. `square` (every sequence's queries are
    its keys): top-left `is_causal`, exact for every row kept (a real query only sees keys j <= i,
    all real); otherwise an explicit mask."""
    qp, seq, off = _padded(q, q_lens, max_q)  # (S, H, Tq, D)
    kp, vp = (_padded(x, k_lens, max_k)[0] for x in (k, v))  # (S, Hkv, Tk, D)
    mask = None
    if not square:
        i = torch.arange(max_q, device=q.device)[None, :, None]  # query row
        j = torch.arange(max_k, device=q.device)[None, None, :]  # key row
        shift = (k_lens - q_lens)[:, None, None]  # (S, 1, 1)
        mask = ((j <= i + shift) & (j < k_lens[:, None, None]))[:, None]  # (S, 1, Tq, Tk)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=mask is None,
                                         enable_gqa=True)  # (S, H, Tq, D)
    return out.transpose(1, 2)[seq, off]  # (Nq, H, D)


def _padded(x, lens: torch.Tensor, width: int):
    """Packed rows (N, h, D) -> right-padded (S, h, width, D), and each row's (sequence, offset)."""
    n = x.shape[0]
    seq = torch.repeat_interleave(torch.arange(len(lens), device=x.device), lens, output_size=n)
    off = torch.arange(n, device=x.device) - (lens.cumsum(0) - lens)[seq]  # position in its seq
    out = x.new_zeros(len(lens), width, *x.shape[1:])
    out[seq, off] = x
    return out.transpose(1, 2), seq, off


@dataclass
class SharedPrefix:
    """Attention for packed groups that hold their prompt once: a group is laid out as
    [prompt, response 1, response 2, ...], each response at the positions after the prompt. Its
    first sequence is prompt + response 1; every later response is a sequence of its own whose
    keys are the prompt's and its own (`kv_index` gathers them), so it attends to the one copy of
    the prompt exactly as if the prompt preceded it. Passed as the forward's `attention=`."""
    cu_q: torch.Tensor  # (S+1,) int32 queries: every packed token once
    max_q: int
    cu_k: torch.Tensor  # (S+1,) int32 into the gathered keys
    max_k: int
    kv_index: torch.Tensor  # (sum of Lk,) int64: packed row of each sequence's keys

    def attend(self, layer: int, q, k, v):
        return varlen_attention(q, k[self.kv_index], v[self.kv_index], self.cu_q, self.max_q,
                                self.cu_k, self.max_k)


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) computed in float32, rounded to x's dtype once (as
        # transformers' LlamaRMSNorm); aten's fused kernel on CUDA
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.h, self.hkv, self.d = (layer_idx, cfg.num_attention_heads,
                                                    cfg.num_key_value_heads, cfg.head_dim)
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, attention):
        n = x.shape[0]
        q = rotate(self.q_proj(x).view(n, self.h, self.d), cos, sin)  # (N, H, D)
        k = rotate(self.k_proj(x).view(n, self.hkv, self.d), cos, sin)  # (N, Hkv, D)
        v = self.v_proj(x).view(n, self.hkv, self.d)  # (N, Hkv, D)
        if attention is not None:
            out = attention.attend(self.layer_idx, q, k, v)
        else:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen)
        return self.o_proj(out.reshape(n, self.h * self.d))  # (N, H * D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, attention=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """Named `model` inside the causal LM, as in HF checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Trunk(cfg)
        if cfg.value_head:  # a critic: one value per token instead of logits
            self.score = nn.Linear(cfg.hidden_size, 1)
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False
        self.generation_config: dict = {}  # generation_config.json as read, written back on save

    def tie_weights(self):
        if self.config.tie_word_embeddings and not self.config.value_head:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions=None, cu_seqlens=None, max_seqlen=None, *,
                attention=None, select=None, targets=None, temperature=1.0, entropy=False):
        """See the module docstring. Returns logits, values, or (logprobs, entropy|None)."""
        batch_shape = None
        if cu_seqlens is None and attention is None:  # (B, T) full rows
            batch_shape = input_ids.shape
            b, t = batch_shape
            input_ids = input_ids.reshape(-1)  # (B * T,)
            positions = torch.arange(t, device=input_ids.device).repeat(b)
            cu_seqlens = torch.arange(0, b * t + 1, t, device=input_ids.device, dtype=torch.int32)
            max_seqlen = t
        # RoPE tables in fp32 whatever the weights' dtype (rotate computes in fp32), made here:
        # an activation-checkpointed block gets the same tensors in its forward and recompute
        cos, sin = rope_tables(positions, self.inv_freq)
        x = self.model.embed_tokens(input_ids)  # (N, hidden)
        for layer in self.model.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, attention,
                               use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen, attention)
        x = self.model.norm(x)
        if select is not None:
            x = x[select]
        if self.config.value_head:
            return self.score(x).squeeze(-1).float()  # (N,)
        if targets is not None:
            return token_logprobs(x, self.lm_head.weight, targets, temperature, entropy)
        logits = logits_fp32(x, self.lm_head.weight)  # (N, V)
        return logits.view(*batch_shape, -1) if batch_shape is not None else logits  # (B, T, V)


# ----------------------------------------------------------------------------- log-probs

def fp32_operand(weight: torch.Tensor) -> torch.Tensor:
    """The weight as logits_fp32 multiplies it: as it is where the GPU multiplies bf16 into fp32
    (or it is fp32 already), else an fp32 copy, made once per call by the caller (the CPU)."""
    if weight.dtype == torch.float32 or weight.device.type in FP32_OUT_MATMUL:
        return weight
    return weight.float()


def logits_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden (N, H) @ weight.T (V, H) -> (N, V) float32. In bf16 the products accumulate in fp32
    and are not rounded back to bf16 (a 0.1-nat error in a log-prob at vocabulary 128k), so the
    sampler (B rows) and the trainer (chunks of rows) get the same numbers."""
    if weight.dtype == torch.float32:
        return hidden.float() @ weight.t()
    if hidden.device.type in FP32_OUT_MATMUL:
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    return hidden.float() @ weight.float().t()  # exact products of bf16 numbers, fp32 sums


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(h @ W.T / T)[target] and entropy, one `(chunk, vocab)` float32 block at a time.

    Only `lse` and `E[z]` (N floats each) are saved; the backward recomputes each block of logits
    z and turns it in place into dL/dz = g_lp * (onehot - p) - g_ent * p * (z - E[z]). Without
    `entropy` (scoring), E[z] is not computed and the entropies returned are zeros."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, entropy):
        lse, mean_z, logp = [], [], []
        w = fp32_operand(weight)
        for i in range(0, hidden.shape[0], chunk):
            z = logits_fp32(hidden[i:i + chunk], w)  # (C, V)
            if temperature != 1.0:
                z.div_(temperature)
            lse.append(torch.logsumexp(z, dim=-1))
            if entropy:
                mean_z.append((torch.softmax(z, dim=-1) * z).sum(-1))
            logp.append(z.gather(-1, targets[i:i + chunk, None]).squeeze(-1) - lse[-1])
        lse = torch.cat(lse)
        mean_z = torch.cat(mean_z) if entropy else lse  # entropies lse - E[z]: 0 when not asked
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
        ctx.temperature, ctx.chunk, ctx.entropy = temperature, chunk, entropy
        return torch.cat(logp), lse - mean_z  # log-probs, entropies

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, mean_z = ctx.saved_tensors
        grad_h, grad_w = torch.empty_like(hidden), torch.zeros_like(weight, dtype=torch.float32)
        w = fp32_operand(weight)  # bf16 on CUDA: bf16 matmuls accumulating in fp32, no copy
        for i in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(i, i + ctx.chunk)
            z = logits_fp32(hidden[sl], w)  # (C, V), recomputed
            if ctx.temperature != 1.0:
                z.div_(ctx.temperature)
            p = z.sub(lse[sl, None]).exp_()  # one (C, V) block, not two
            if ctx.entropy:
                z.sub_(mean_z[sl, None]).mul_(p).mul_(-g_ent[sl, None])  # entropy part
            else:
                z.zero_()
            z.sub_(p.mul_(g_logp[sl, None]))  # - g * p
            z.scatter_add_(-1, targets[sl, None], g_logp[sl, None])  # + g * onehot
            if ctx.temperature != 1.0:
                z.div_(ctx.temperature)  # dL/d(h @ W.T)
            if w.dtype == torch.float32:
                grad_h[sl] = (z @ w).to(hidden.dtype)
                grad_w.addmm_(z.t(), hidden[sl].float())
            else:  # bf16 operands, fp32 accumulation: grad_w += z.T @ h in fp32
                dz = z.to(w.dtype)
                grad_h[sl] = (dz @ w).to(hidden.dtype)
                torch.addmm(grad_w, dz.t(), hidden[sl], out_dtype=torch.float32, out=grad_w)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None


def token_logprobs(hidden, weight, targets, temperature: float = 1.0, entropy: bool = False,
                   chunk: int = 256):
    """Per-token log-probs of `targets` (and entropies) under softmax(hidden @ weight.T / T),
    without a `[tokens, vocab]` tensor. hidden (N, H), targets (N,) -> (N,), (N,) or None."""
    logp, ent = _TokenLogprobs.apply(hidden, weight, targets, temperature, chunk, entropy)
    return logp, (ent if entropy else None)


def pack(seqs: list[list[int]], device="cpu"):
    """Token lists -> (ids (N,), positions (N,), cu_seqlens (S+1,) int32, max_seqlen)."""
    lens = [len(s) for s in seqs]
    ids = to_device([t for s in seqs for t in s], device)
    positions = to_device([i for n in lens for i in range(n)], device)
    cu = to_device(list(itertools.accumulate(lens, initial=0)), device, torch.int32)
    return ids, positions, cu, max(lens)


def to_device(values: list, device, dtype=torch.long) -> torch.Tensor:
    """Host numbers onto the device without stalling the host: on CUDA staged in pinned memory
    and copied asynchronously (torch's pinned allocator keeps the stage until the copy is done)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------- checkpoint I/O

# What a checkpoint needs from the hub: config and generation config, weights, the tokenizer's
# files (tokenizer.json, merges.txt, ...) and the chat template (transformers 5 keeps it in a
# chat_template.jinja beside tokenizer_config.json).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.jinja"]


def resolve(name_or_path: str) -> str:
    """A local directory as is; otherwise a hub id ("org/name"), downloaded once (HUB_FILES)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    resolve_hub_id(name_or_path)
    from huggingface_hub import snapshot_download
    return _from_hub(name_or_path,
                     lambda: snapshot_download(name_or_path, allow_patterns=HUB_FILES))


def resolve_hub_id(name: str):
    """A name that is not a local dir must look like a hub id (org/name), or it is a missing dir."""
    first = name.split("/")[0]
    looks_local = first in (".", "..") or os.path.isdir(first)  # e.g. runs/x: a missing run dir
    if looks_local or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise FileNotFoundError(f"{name}: no such directory (and not a hub id org/name)")


def _from_hub(name: str, fetch):
    try:
        return fetch()
    except Exception as e:  # offline, unknown, gated: say so and what to pass instead
        raise OSError(f"{name}: not a local directory, and the Hugging Face hub could not provide "
                      f"it ({type(e).__name__}: {str(e)[:200]}); offline, pass a local checkpoint "
                      f"directory") from None


def read_state_dict(path: str) -> dict:
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        file = os.path.join(path, name)
        try:
            tensors = load_file(file)
        except Exception as e:  # truncated or corrupt: safetensors' own error omits the path
            raise ValueError(f"{file}: cannot read the weights ({type(e).__name__}: {e})") from None
        # load_file's tensors are views at their byte offsets in the file: a tensor can start
        # only 4 bytes aligned, and CPU matmul kernels round differently on unaligned memory
        # (a reloaded critic's values moved by ~5e-7 with every tensor equal). Each gets memory
        # of its own, aligned as torch allocates it; one tensor at a time, so the peak grows by
        # the largest one.
        while tensors:
            key, t = tensors.popitem()
            state[key] = t.clone()
    return state


def check_keys(model: CausalLM, state: dict, path: str, value_head_new: bool):
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings or model.config.value_head:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)  # tied checkpoints may store it; a critic has none
    if value_head_new:
        expected.pop("score.weight", None), expected.pop("score.bias", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected)
                        if not k.endswith("rotary_emb.inv_freq"))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
              for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: weights do not match the config: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}, shape mismatches {shapes[:10]}")


def read_config(name_or_path: str) -> ModelConfig:
    """The architecture alone: a local dir's config.json, or a hub id's (nothing else fetched)."""
    if os.path.isdir(name_or_path):
        cfg_file = os.path.join(name_or_path, "config.json")
        if not os.path.exists(cfg_file):
            steps = sorted(n for n in os.listdir(name_or_path) if re.fullmatch(r"step-\d+", n))
            if steps:  # a training run's --out: its checkpoints are inside
                raise FileNotFoundError(
                    f"{name_or_path}: a training run, not a checkpoint (no config.json); it holds "
                    f"{', '.join(steps)}: pass one, e.g. {os.path.join(name_or_path, steps[-1])}")
            raise FileNotFoundError(f"{name_or_path}: no config.json")
    else:
        resolve_hub_id(name_or_path)
        from huggingface_hub import hf_hub_download
        cfg_file = _from_hub(name_or_path, lambda: hf_hub_download(name_or_path, "config.json"))
    try:
        with open(cfg_file) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON (line {e.lineno}: {e.msg})") from None
    try:
        return ModelConfig.from_hf(cfg, cfg_file)
    except KeyError as e:
        raise ValueError(f"{cfg_file}: missing {e.args[0]!r}") from None


def read_policy_config(name_or_path: str) -> ModelConfig:
    """read_config of a model that generates text. A value model (PPO's critic, saved as
    XForTokenClassification) has a scalar head and no lm_head: refused here, naming it, instead
    of failing deep inside the sampler after it loaded."""
    cfg = read_config(name_or_path)
    if cfg.value_head:
        parent = os.path.dirname(os.path.normpath(name_or_path))
        policy = parent and os.path.exists(os.path.join(parent, "config.json"))
        instead = (f"the policy checkpoint it was saved with, {parent}" if policy
                   else "a policy checkpoint (a run's step-N/ dir itself)")
        raise ValueError(f"{name_or_path}: a value model ({cfg.raw['architectures'][0]}, e.g. "
                         f"PPO's critic), which scores tokens but cannot generate them; pass "
                         f"{instead}")
    return cfg


def build_model(name_or_path: str, value_head: bool = False, dtype=torch.float32):
    """(model on the meta device, its local dir, whether its value head is new): the architecture
    from config.json, no weights yet. `value_head=True` makes a critic of a causal LM checkpoint."""
    path = resolve(name_or_path)
    cfg = read_config(path)
    head_new = value_head and not cfg.value_head
    cfg.value_head = cfg.value_head or value_head
    with torch.device("meta"):
        model = CausalLM(cfg).to(dtype)
    model.tie_weights()
    return model, path, head_new


def read_weights(model: CausalLM, path: str, head_new: bool) -> dict:
    """The checkpoint's tensors (as stored), checked against the model; a new value head is zero
    so that the critic's first values are 0 whatever the trunk says."""
    state = read_state_dict(path)
    check_keys(model, state, path, head_new)
    if head_new:
        state["score.weight"] = torch.zeros(1, model.config.hidden_size)
        state["score.bias"] = torch.zeros(1)
    return state


def nonfinite_weights(model: CausalLM) -> list[str]:
    """Parameters (this process's shards) holding NaN or inf: such a checkpoint would otherwise
    only show as 100% format failures."""
    return [name for name, p in model.named_parameters()
            if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]


def finish_loading(model: CausalLM, path: str, device):
    """What a checkpoint's tensors do not hold: the rotary table and the generation config."""
    model.inv_freq = rope_inv_freq(model.config).to(device)
    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen):
        with open(gen) as f:
            model.generation_config = json.load(f)
    return model


def load_model(name_or_path: str, device="cpu", dtype=torch.float32, value_head: bool = False):
    """Build the model from an HF checkpoint (local dir or hub id). `value_head=True` builds a
    critic: the trunk with a scalar head (zero-init unless the checkpoint has one), no lm_head."""
    model, path, head_new = build_model(name_or_path, value_head, dtype)
    state = read_weights(model, path, head_new)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    cfg = model.config
    tied_head = cfg.tie_word_embeddings and not cfg.value_head  # no lm_head key of its own
    model.load_state_dict(state, strict=not tied_head, assign=True)
    model.tie_weights()
    bad = nonfinite_weights(model)
    if bad:
        raise ValueError(f"{path}: non-finite weights (NaN or inf) in {bad[:5]}")
    return finish_loading(model, path, device)


def save_model(model: CausalLM, tokenizer, out_dir: str, state_dict: dict | None = None,
               max_shard_bytes: int = 5 * 2**30):
    """Write an HF checkpoint (config, safetensors shards + index, tokenizer) atomically;
    `state_dict`: a distributed caller's gathered full state dict (rank 0 only)."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous()
             for k, v in (state_dict or model.state_dict()).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards, cur, size = [], {}, 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = state[k], size + nbytes
    shards.append(cur)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    cfg = dict(model.config.to_hf(), torch_dtype=dtype, dtype=dtype)
    _write_json(os.path.join(tmp, "config.json"), cfg)
    if model.generation_config:
        _write_json(os.path.join(tmp, "generation_config.json"), model.generation_config)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, out_dir)


def _write_json(path: str, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _replace_dir(tmp: str, out_dir: str):
    """Swap a finished temp dir into place; an existing out_dir is removed only after."""
    old = out_dir.rstrip("/") + ".old"
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
