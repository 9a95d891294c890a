"""Pure-PyTorch test double of torch's own FlashAttention, `torch.nn.attention.varlen`.

torch's `varlen_attn` runs only on CUDA, so CPU tests inject this module (or `for_version(v)`, a
namespace with one torch version's signature) in its place. Written from these facts, not copied:

Read from torch/nn/attention/varlen.py in the torch 2.10.0, 2.11.0, 2.12.0 and 2.14.1 wheels
(PyPI) and in the installed 2.13.0; C++ from pytorch/pytorch's vendored FlashAttention-2
(aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp at commit 03b7c19, mask.h,
block_info.h: not at a release tag), plus the error strings in the 2.11.0 linux wheel's
libtorch_cuda.so.
- Signatures. 2.10: (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
  return_aux=None), all positional-or-keyword. 2.11: the seven positional, then keyword-only
  return_aux=None, scale=None, window_size=(-1, -1); no is_causal. 2.12, 2.13 and 2.14: as 2.11
  plus keyword-only enable_gqa=False, seqused_k=None, block_table=None, num_splits=None.
  AuxRequest is a NamedTuple with one field, lse: bool = False, in every version.
- Causal. 2.10 passes is_causal to aten._flash_attention_forward. 2.11+ passes
  is_causal = (window_size == (-1, 0)) with window_size_left/right; the C++ takes left < 0,
  right == 0 as causal (so a list [-1, 0] is causal too). The kernel's mask aligns to the
  BOTTOM-RIGHT corner per sequence: query i sees key j <= i + Lk - Lq, Lk being seqused_k[i]
  when given. Other windows are sliding-window attention, which this double does not implement.
- GQA. 2.12+ checks in Python: Hkv != Hq without enable_gqa, or Hq % Hkv != 0 with it, raises
  ValueError. 2.10/2.11 have no Python check; the C++ kernel only checks Hq % Hkv == 0 (read at
  the commit above, and that message is the only head-count check of flash_api.cpp in the 2.11
  binary), so fewer kv heads probably run there, but this was never run on a GPU and the 2.10/2.11
  docs say k/v have H heads. Unconfirmed, so this double refuses it (NotImplementedError) on
  2.10/2.11: code under test must repeat k/v itself there.
- lse. return_aux=AuxRequest(lse=True) returns (out, lse), lse float32 of shape (H, T_q), read from
  the op's fake/meta implementation and flash_api.cpp's `empty({num_heads, total_q})` (the
  docstrings of 2.11 to 2.13 say (T_q, H); 2.14.1's corrects it to (H_q, T_q)). A row without any
  key gets lse +inf and output 0 (flash_api.cpp fills +inf when max_seqlen_k == 0, and
  FlashAttention's softmax does so for a row whose keys are all masked). The backward ignores
  the lse's gradient (`_backward` uses grad_out only), so this double returns the lse detached.
- Types. fp16/bf16 only, q/k/v one dtype, head dim <= 256 and a multiple of 8, last dim contiguous
  (C++ TORCH_CHECKs). cu_seq_q/cu_seq_k int32 (N+1,) contiguous; seqused_k int32 (N,); max_q,
  max_k ints in the custom op's schema (a float raises RuntimeError; the schema takes a 0-d
  tensor, this double does not). Default scale 1/sqrt(D).
- Backward. Every version registers one (FlashAttention's backward kernel). On 2.12+ seqused_k and
  block_table are inference-only: with grad enabled and an input requiring grad, the call raises
  RuntimeError ("seqused_k is an inference-only parameter.").
- Not established: the exact 2.10/2.11 C++ at their tags (read at a later commit), and the lse
  element order on the decode path that flash_api.cpp reshapes (max_q == 1 with Hq > Hkv).
  2.14 may send non-causal, non-GQA calls with max_q > 128 to cuDNN on sm90/sm100 GPUs.

Like tests/flash_attn_double.py it is stricter than the kernel where the kernel would read out of
bounds (max_q/max_k too small, seqused_k past its sequence, cu_seq not ending at the total) and it
accepts fp32, which the kernel rejects, so CPU tests stay small. Unsupported features (sliding
windows) raise NotImplementedError instead of being ignored.
- Paged KV (2.12+): key/value `(pages, page_size, Hkv, D)`, block_table `(N, max_pages)` int32,
  seqused_k required (the docstring); the page size a multiple of 256 as FlashAttention-2's
  flash_api.cpp demands of a paged cache (torch's vendored copy assumed the same: unconfirmed on
  a GPU).
"""
import itertools
import math
import types
from typing import NamedTuple

import torch

__all__ = ["IS_TEST_DOUBLE", "AuxRequest", "for_version", "varlen_attn"]

IS_TEST_DOUBLE = True  # model.py lets a double run on CPU and in fp32

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32: the double only


class AuxRequest(NamedTuple):
    """Which auxiliary outputs varlen_attn returns besides the attention output."""

    lse: bool = False


def _check_tensors(query, key, value):
    """The kernel's checks on q (Tq, H, D), k/v (Tk, Hkv, D)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise RuntimeError(f"varlen_attn double: {name} must be a 3-D tensor (T, H, D)")
        if t.stride(-1) != 1:
            raise RuntimeError("Input tensor must have contiguous last dimension")
    if query.dtype not in _DTYPES:
        raise RuntimeError(f"FlashAttention only support fp16 and bf16 data type "
                           f"(double: also fp32), got {query.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise RuntimeError(f"query and key/value must have the same dtype: "
                           f"{query.dtype}, {key.dtype}, {value.dtype}")
    head_dim = query.shape[-1]
    if head_dim > 256 or head_dim % 8 != 0:
        raise RuntimeError(f"FlashAttention forward only supports head dimension at most 256, "
                           f"a multiple of 8; got {head_dim}")
    if key.shape != value.shape or key.shape[-1] != head_dim:
        raise RuntimeError(f"shape mismatch: q {tuple(query.shape)}, k {tuple(key.shape)}, "
                           f"v {tuple(value.shape)}")
    if query.shape[1] % key.shape[1] != 0:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")


def _check_int(name, value):
    # the custom op's schema types max_q/max_k as int; bool is an int to Python, not to torch
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuntimeError(f"varlen_attn double: expected a value of type 'int' for argument "
                           f"'{name}' but found {type(value).__name__}")


def _lengths(name, cu, total, device):
    """Per-sequence lengths from cumulative int32 offsets cu (N+1,) over `total` tokens."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise RuntimeError(f"{name} must be a 1-D tensor of shape (N + 1,) with N >= 1 "
                           "(batch size must be positive)")
    if cu.dtype != torch.int32:
        raise RuntimeError(f"{name} must have dtype int32, got {cu.dtype}")
    if not cu.is_contiguous():
        raise RuntimeError(f"{name} must be contiguous")
    if cu.device != device:  # the kernel wants every tensor on the one CUDA device
        raise RuntimeError(f"{name} is on {cu.device}, query on {device}")
    bounds = cu.tolist()
    lens = [end - start for start, end in itertools.pairwise(bounds)]
    if bounds[0] != 0 or min(lens) < 0 or bounds[-1] != total:
        raise RuntimeError(f"{name} must start at 0, not decrease and end at the total "
                           f"{total}: {bounds}")
    return bounds, lens


def _attend_one(q, k, v, scale, causal):
    """One sequence: q (Lq, H, D), k/v (Lk, H, D) -> out (Lq, H, D) fp32, lse (H, Lq) fp32."""
    lq, nheads, head_dim = q.shape
    lk = k.shape[0]
    if lk == 0:  # no key at all: the kernel writes zeros and lse +inf
        out = torch.zeros(lq, nheads, head_dim, device=q.device)  # (Lq, H, D)
        return out, torch.full((nheads, lq), math.inf, device=q.device)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # (H, Lq, Lk)
    keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)  # (Lq, Lk)
    if causal:  # bottom-right: the last query lines up with the last key
        rows = torch.arange(lq, device=q.device).unsqueeze(1)  # (Lq, 1)
        cols = torch.arange(lk, device=q.device).unsqueeze(0)  # (1, Lk)
        keep = cols <= rows + (lk - lq)  # (Lq, Lk)
    scores = scores.masked_fill(~keep, -math.inf)  # (H, Lq, Lk)
    has_key = keep.any(dim=1)  # (Lq,)
    # Softmax is shift-invariant, so a detached row max keeps exp finite without touching the
    # gradient; rows without keys shift by 0 and their exp is all zeros.
    shift = torch.where(has_key[None, :, None], scores.amax(dim=-1, keepdim=True), 0.0).detach()
    weights = torch.exp(scores - shift)  # (H, Lq, Lk)
    total = weights.sum(dim=-1)  # (H, Lq), 0 on rows without keys
    probs = weights / torch.where(total > 0, total, 1.0).unsqueeze(-1)  # (H, Lq, Lk)
    out = torch.einsum("hqk,khd->qhd", probs, v.float())  # (Lq, H, D)
    lse = torch.where(has_key[None, :], shift.squeeze(-1) + torch.log(total), math.inf)  # (H, Lq)
    return out, lse.detach()


def _run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, causal, scale, return_aux,
         seqused_k=None):
    """What every version computes once its arguments are mapped: checks, then attention."""
    _check_int("max_q", max_q)
    _check_int("max_k", max_k)
    _check_tensors(query, key, value)
    if cu_seq_k is None:
        raise NotImplementedError("varlen_attn double: cu_seq_k=None is not supported")
    bq, lens_q = _lengths("cu_seq_q", cu_seq_q, query.shape[0], query.device)
    bk, lens_k = _lengths("cu_seq_k", cu_seq_k, key.shape[0], query.device)
    if len(lens_q) != len(lens_k):
        raise RuntimeError(f"cu_seq_q and cu_seq_k hold different batch sizes: "
                           f"{len(lens_q)} and {len(lens_k)}")
    if max_q < max(lens_q) or max_k < max(lens_k):
        raise RuntimeError(f"max_q={max_q} / max_k={max_k} must be >= the longest sequence "
                           f"{max(lens_q)} / {max(lens_k)}")
    used = lens_k
    if seqused_k is not None:
        if not isinstance(seqused_k, torch.Tensor) or seqused_k.dtype != torch.int32:
            raise RuntimeError("seqused_k must have dtype int32")
        if tuple(seqused_k.shape) != (len(lens_k),) or not seqused_k.is_contiguous():
            raise RuntimeError(f"seqused_k must be contiguous with shape ({len(lens_k)},)")
        if seqused_k.device != query.device:
            raise RuntimeError(f"seqused_k is on {seqused_k.device}, query on {query.device}")
        used = seqused_k.tolist()
        if any(not 0 <= u <= n for u, n in zip(used, lens_k)):
            raise RuntimeError(f"seqused_k {used} must lie in [0, sequence length {lens_k}]: "
                               "the kernel would read the next sequence's keys")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    group = query.shape[1] // key.shape[1]  # query head h reads kv head h // group
    outs, lses = [], []
    for b in range(len(lens_q)):
        k_b = key[bk[b]:bk[b] + used[b]].repeat_interleave(group, dim=1)  # (Lk, H, D)
        v_b = value[bk[b]:bk[b] + used[b]].repeat_interleave(group, dim=1)  # (Lk, H, D)
        out_b, lse_b = _attend_one(query[bq[b]:bq[b + 1]], k_b, v_b, scale, causal)
        outs.append(out_b)
        lses.append(lse_b)
    out = torch.cat(outs).to(query.dtype)  # (Tq, H, D)
    if return_aux is not None and return_aux.lse:
        return out, torch.cat(lses, dim=1)  # lse (H, Tq) float32
    return out


def _window_to_causal(window_size):
    """(-1, -1): no mask; (-1, 0): causal (the C++ reads left < 0, right == 0 as causal)."""
    if len(window_size) != 2:
        raise ValueError(f"window_size must have length 2, got {len(window_size)}")
    window = tuple(window_size)
    if window not in ((-1, -1), (-1, 0)):
        raise NotImplementedError(f"varlen_attn double: sliding window_size {window} is not "
                                  "supported, only (-1, -1) and (-1, 0)")
    return window == (-1, 0)


def _refuse_fewer_kv_heads(version, query, key):
    # See the module docstring: unconfirmed on 2.10/2.11, so the code under test must repeat k/v.
    if query.dim() == 3 and key.dim() == 3 and query.shape[1] != key.shape[1]:
        raise NotImplementedError(
            f"varlen_attn double (torch {version}): key/value with fewer heads than query "
            f"(Hq={query.shape[1]}, Hkv={key.shape[1]}) is not confirmed on this version; "
            "repeat k/v to the query's heads")


def varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    return_aux: AuxRequest | None = None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """torch 2.12+ (2.13's signature): q (Tq, H, D), k/v (Tk, Hkv, D) -> out (Tq, H, D),
    and lse (H, Tq) float32 when return_aux.lse. num_splits only changes the kernel's reduction
    order, so it is accepted and ignored."""
    if block_table is not None:
        key, value, cu_seq_k, max_k = _unpage(key, value, cu_seq_q, cu_seq_k, seqused_k,
                                              block_table)
    heads_q, heads_k = query.size(1), key.size(1)
    if not enable_gqa and heads_q != heads_k:
        raise ValueError(f"Expect query and key/value to have the same number of heads but got "
                         f"Hq={heads_q} and Hkv={heads_k}. Try setting enable_gqa=True for GQA.")
    if enable_gqa and heads_q % heads_k != 0:
        raise ValueError(f"Expect number of query heads to be a multiple of kv heads for GQA "
                         f"but got Hq={heads_q} and Hkv={heads_k}.")
    causal = _window_to_causal(window_size)
    if num_splits is not None:
        _check_int("num_splits", num_splits)
    if seqused_k is not None and torch.is_grad_enabled() and any(
            t.requires_grad for t in (query, key, value)):
        raise RuntimeError("seqused_k is an inference-only parameter.")
    return _run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=causal,
                scale=scale, return_aux=return_aux, seqused_k=seqused_k)


PAGE_MULTIPLE = 256  # flash_api.cpp: "Paged KV cache block size must be divisible by 256"


def _unpage(key, value, cu_seq_q, cu_seq_k, seqused_k, block_table):
    """A paged call as the packed one it stands for: k/v (pages, page_size, Hkv, D) and
    block_table (N, max_pages) int32 -> each sequence's pages laid end to end (N * max_pages *
    page_size, Hkv, D), its first seqused_k[i] keys used. cu_seq_k (N+1,) int32 is checked for its
    shape and type only (the kernel reads the lengths from seqused_k, which paging requires)."""
    if seqused_k is None:
        raise RuntimeError("block_table requires seqused_k")
    if key.dim() != 4 or value.shape != key.shape:
        raise RuntimeError(f"paged key/value must be (pages, page_size, Hkv, D), got "
                           f"{tuple(key.shape)}, {tuple(value.shape)}")
    if key.shape[1] % PAGE_MULTIPLE:
        raise RuntimeError(f"Paged KV cache block size must be divisible by {PAGE_MULTIPLE}, "
                           f"got {key.shape[1]}")
    n = cu_seq_q.numel() - 1
    if (not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32
            or block_table.dim() != 2 or block_table.shape[0] != n):
        raise RuntimeError(f"block_table must be int32 of shape ({n}, max_pages)")
    if cu_seq_k is not None and (cu_seq_k.dtype != torch.int32 or cu_seq_k.shape != (n + 1,)):
        raise RuntimeError(f"cu_seq_k must be int32 of shape ({n + 1},)")
    pages = block_table.long()
    if pages.min() < 0 or pages.max() >= key.shape[0]:
        raise RuntimeError(f"block_table holds pages outside [0, {key.shape[0]})")
    span = pages.shape[1] * key.shape[1]  # keys a sequence can hold
    key, value = (x[pages].reshape(n * span, *x.shape[2:]) for x in (key, value))
    cu = torch.arange(0, n * span + 1, span, dtype=torch.int32, device=key.device)
    return key, value, cu, span


def _varlen_attn_2_11(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    return_aux: AuxRequest | None = None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """torch 2.11: causal through window_size=(-1, 0); k/v must have the query's heads."""
    _refuse_fewer_kv_heads("2.11", query, key)
    causal = _window_to_causal(window_size)
    return _run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=causal,
                scale=scale, return_aux=return_aux)


def _varlen_attn_2_10(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    is_causal: bool = False,
    return_aux: AuxRequest | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """torch 2.10: causal through is_causal; no scale (1/sqrt(D)); k/v with the query's heads."""
    _refuse_fewer_kv_heads("2.10", query, key)
    return _run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=bool(is_causal),
                scale=None, return_aux=return_aux)


for _fn in (_varlen_attn_2_10, _varlen_attn_2_11):
    _fn.__name__ = _fn.__qualname__ = "varlen_attn"  # as code under test would print it

_BY_VERSION = {"2.10": _varlen_attn_2_10, "2.11": _varlen_attn_2_11, "2.12": varlen_attn,
               "2.13": varlen_attn, "2.14": varlen_attn}


def for_version(version: str) -> types.SimpleNamespace:
    """A stand-in for torch.nn.attention.varlen of torch `version` ("2.11", "2.11.0",
    "2.13.0+cu128"...): varlen_attn with that version's signature, AuxRequest, IS_TEST_DOUBLE."""
    minor = ".".join(version.split("+")[0].split(".")[:2])
    if minor not in _BY_VERSION:
        raise ValueError(f"varlen_attn double: no signature for torch {version!r}; "
                         f"known: {sorted(_BY_VERSION)}")
    return types.SimpleNamespace(varlen_attn=_BY_VERSION[minor], AuxRequest=AuxRequest,
                                 IS_TEST_DOUBLE=True, TORCH_VERSION=minor)
