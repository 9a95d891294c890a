"""Pure-PyTorch test double of the flash-attn 2.8 API, injected as `flash_attn` in CPU tests.

Written from /work/shared/FLASH_ATTN.md, not from flash-attn's source. It reproduces what medrl relies
on: token-major layouts, GQA head mapping, bottom-right causal alignment, zeros for fully masked
rows, int32 index tensors, and the in-place KV-cache append that does not advance cache_seqlens.
It is stricter than the kernel where the kernel would silently read or write out of bounds
(max_seqlen too small, cache overflow) and it accepts fp32, which the kernel rejects, so CPU tests
stay small. Features medrl does not use raise NotImplementedError instead of being ignored.
"""
import math

import torch

IS_TEST_DOUBLE = True  # model.py lets this double run on CPU and in fp32

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _unsupported(dropout_p=0.0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, **given):
    if dropout_p != 0.0:
        raise NotImplementedError("flash_attn double: dropout_p > 0 is not supported")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError("flash_attn double: sliding window_size is not supported")
    if softcap != 0.0:
        raise NotImplementedError("flash_attn double: softcap is not supported")
    if alibi_slopes is not None:
        raise NotImplementedError("flash_attn double: alibi_slopes is not supported")
    for name, value in given.items():
        if value is not None and value is not False:
            raise NotImplementedError(f"flash_attn double: {name} is not supported")


def _check_qkv(q, k, v, ndim):
    if q.dim() != ndim or k.dim() != ndim or v.dim() != ndim:
        raise RuntimeError(f"q, k, v must have {ndim} dims, got {q.dim()}, {k.dim()}, {v.dim()}")
    if q.dtype not in _DTYPES:
        raise RuntimeError(f"FlashAttention only supports fp16 and bf16 (double: also fp32), got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError(f"query and key/value must have the same dtype: {q.dtype}, {k.dtype}, {v.dtype}")
    nheads, headdim, nheads_k = q.shape[-2], q.shape[-1], k.shape[-2]
    if headdim > 256:
        raise RuntimeError(f"FlashAttention forward only supports head dimension at most 256, got {headdim}")
    if k.shape[-1] != headdim or v.shape[-1] != headdim or v.shape[-2] != nheads_k:
        raise RuntimeError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if nheads % nheads_k != 0:
        raise RuntimeError(f"Number of heads in key/value ({nheads_k}) must divide "
                           f"number of heads in query ({nheads})")


def _check_index(name, t, shape):
    """Index tensors must be int32 of a given shape, as the kernel's TORCH_CHECKs demand."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        raise RuntimeError(f"{name} must have dtype torch.int32, got {getattr(t, 'dtype', type(t))}")
    if tuple(t.shape) != shape:
        raise RuntimeError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_cu_seqlens(name, cu, total, max_seqlen):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise RuntimeError(f"{name} must be a 1-D tensor of shape (batch + 1,)")
    _check_index(name, cu, (cu.numel(),))
    bounds = cu.tolist()
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or min(lens) < 0 or bounds[-1] != total:
        raise RuntimeError(f"{name} must start at 0, not decrease and end at total tokens {total}: {bounds}")
    if not isinstance(max_seqlen, int) or max_seqlen < max(lens):
        raise RuntimeError(f"max_seqlen for {name} must be an int >= the longest sequence "
                           f"{max(lens)}, got {max_seqlen!r}")
    return bounds


def _attend(q, k, v, scale, causal):
    """One sequence. q (Tq, H, D), k/v (Tk, Hk, D) -> out (Tq, H, D) fp32, lse (H, Tq) fp32."""
    tq, nheads, _ = q.shape
    tk, nheads_k, _ = k.shape
    # query head i reads kv head i // (H // Hk)
    k = k.float().repeat_interleave(nheads // nheads_k, dim=1)  # (Tk, H, D)
    v = v.float().repeat_interleave(nheads // nheads_k, dim=1)  # (Tk, H, D)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # (H, Tq, Tk)
    if causal:  # bottom-right: the last query lines up with the last key
        rows = torch.arange(tq, device=q.device)[:, None]
        allowed = torch.arange(tk, device=q.device)[None, :] <= rows + (tk - tq)  # (Tq, Tk)
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (H, Tq), -inf on fully masked rows
    empty = torch.isinf(lse)
    probs = torch.exp(scores - torch.where(empty, 0.0, lse)[..., None])  # fully masked rows -> 0
    out = torch.einsum("hqk,khd->qhd", probs, v)  # (Tq, H, D)
    return out, torch.where(empty, float("inf"), lse)  # the kernel reports +inf lse for empty rows


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """Packed sequences: q (total_q, H, D), k/v (total_k, Hk, D) -> out (total_q, H, D)."""
    _unsupported(dropout_p, window_size, softcap, alibi_slopes,
                 return_attn_probs=return_attn_probs, block_table=block_table)
    _check_qkv(q, k, v, ndim=3)
    bq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    bk = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    if len(bq) != len(bk) or k.shape[0] != v.shape[0]:
        raise RuntimeError(f"cu_seqlens_q/k batch mismatch ({len(bq) - 1} vs {len(bk) - 1}) "
                           "or k/v lengths differ")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outs = [_attend(q[bq[b]:bq[b + 1]], k[bk[b]:bk[b + 1]], v[bk[b]:bk[b + 1]], scale, causal)[0]
            for b in range(len(bq) - 1)]
    return torch.cat(outs).to(q.dtype)  # (total_q, H, D)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Padded batch: q (B, Tq, H, D), k/v (B, Tk, Hk, D) -> out (B, Tq, H, D)."""
    _unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs=return_attn_probs)
    _check_qkv(q, k, v, ndim=4)
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1]:
        raise RuntimeError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outs = [_attend(q[b], k[b], v[b], scale, causal)[0] for b in range(q.shape[0])]
    return torch.stack(outs).to(q.dtype)  # (B, Tq, H, D)


def _unpage(k_cache, v_cache, block_table, batch, k, cache_batch_idx):
    """A paged cache (blocks, page_size, Hk, D) read through block_table (B, max_blocks) int32 as
    the per-row cache it stands for (B, max_blocks * page_size, Hk, D), a copy: new k/v (written
    into the pages) and cache_batch_idx with a block table are not used by medrl and refused."""
    if k is not None or cache_batch_idx is not None:
        raise NotImplementedError("flash_attn double: new k/v or cache_batch_idx with a "
                                  "block_table are not supported")
    if k_cache.shape[1] % 256:
        raise RuntimeError("Paged KV cache block size must be divisible by 256")
    if (not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32
            or block_table.dim() != 2 or block_table.shape[0] != batch):
        raise RuntimeError(f"block_table must be int32 of shape ({batch}, max_blocks)")
    pages = block_table.long()
    return (x[pages].reshape(batch, -1, *x.shape[2:]) for x in (k_cache, v_cache))


@torch.no_grad()  # the kernel has no backward pass
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                            softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """q (B, Tq, H, D), caches (Bc, Tc, Hk, D), new k/v (B, Tnew, Hk, D) written in place.

    Row b attends to cache row cache_batch_idx[b] (or b), positions [cache_leftpad[b] (or 0),
    cache_seqlens[b] + Tnew) (or the whole cache when cache_seqlens is None)."""
    _unsupported(0.0, window_size, softcap, alibi_slopes,
                 rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    if block_table is not None:
        k_cache, v_cache = _unpage(k_cache, v_cache, block_table, q.shape[0], k, cache_batch_idx)
    _check_qkv(q, k_cache, v_cache, ndim=4)
    batch, seqlen_q, nheads, _ = q.shape
    batch_cache, seqlen_cache = k_cache.shape[:2]
    if v_cache.shape != k_cache.shape or (k is None) != (v is None):
        raise RuntimeError("k_cache/v_cache shapes differ, or only one of k and v was given")
    if isinstance(cache_seqlens, int):  # as the real wrapper does: one length per CACHE row
        cache_seqlens = torch.full((batch_cache,), cache_seqlens, dtype=torch.int32, device=q.device)
    for name, t in [("cache_seqlens", cache_seqlens), ("cache_batch_idx", cache_batch_idx),
                    ("cache_leftpad", cache_leftpad)]:
        _check_index(name, t, (batch,))
    seqlen_new = 0
    if k is not None:
        _check_qkv(q, k, v, ndim=4)
        if k.shape != v.shape or k.shape[0] != batch or k.shape[2] != k_cache.shape[2]:
            raise RuntimeError(f"new k/v must be (B, Tnew, Hk, D) = ({batch}, *, {k_cache.shape[2]}, *), "
                               f"got {tuple(k.shape)}")
        if cache_seqlens is None:
            raise RuntimeError("If key is supplied, cache_seqlens must also be passed in")
        seqlen_new = k.shape[1]
    rows = cache_batch_idx.tolist() if cache_batch_idx is not None else list(range(batch))
    starts = cache_seqlens.tolist() if cache_seqlens is not None else [seqlen_cache] * batch
    pads = cache_leftpad.tolist() if cache_leftpad is not None else [0] * batch
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty(batch, seqlen_q, nheads, q.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, nheads, seqlen_q, dtype=torch.float32, device=q.device)
    for b, (row, start, pad) in enumerate(zip(rows, starts, pads)):
        end = start + seqlen_new
        if not (0 <= row < batch_cache and 0 <= pad and 0 <= start and end <= seqlen_cache):
            raise RuntimeError(f"batch row {b}: cache row {row}, leftpad {pad}, keys up to {end} "
                               f"out of range for cache ({batch_cache}, {seqlen_cache})")
        if seqlen_new:
            k_cache[row, start:end] = k[b]  # (Tnew, Hk, D), in place; cache_seqlens not advanced
            v_cache[row, start:end] = v[b]
        out[b], lse[b] = _attend(q[b], k_cache[row, pad:end], v_cache[row, pad:end], scale, causal)
    out = out.to(q.dtype)  # (B, Tq, H, D)
    return (out, lse) if return_softmax_lse else out
