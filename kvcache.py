"""The sampler's paged KV cache and decode attention over it (the GPU's path; decode_cpu.py holds
the CPU's).

- BlockPool: k and v for every layer in fixed-size blocks of `block_size` tokens, handed out one
  at a time as sequences grow, with a reference count each so that a group's samples share the
  blocks of their prompt. Block 0 is never handed out: padded rows of a decode step write there.
  Token-major `(layers, blocks, block_size, Hkv, D)`, the paged kernels' layout; head-major
  `(layers, Hkv, blocks, block_size, D)` for the gather kernel, whose gathered blocks are then
  each KV head's keys for its batched matmuls as they come (no copy but the gather).
- A sequence's `table` lists its blocks: position t lives in block table[t // block_size], at
  t % block_size ("slot" table[t // block_size] * block_size + t % block_size).
- PagedPrefill: the record a packed prefill passes as `attention=`: every layer writes the
  prompts' k/v to their slots, then attends within each prompt (model.varlen_attention).
- PagedDecode: one new token per row: its k/v written to its slot, then attention over the row's
  blocks, through `decode_kernel`, the one switch: flash-attn's `flash_attn_with_kvcache
  (block_table=)`, torch's `varlen_attn(seqused_k=, block_table=)` (2.12+), or, where neither is
  (the CPU, torch <= 2.11), the row's blocks gathered and read by batched matmuls. Every input is a
  device tensor and every shape fixed by the step's bucket: a step can be captured as a CUDA
  graph.
"""
from dataclasses import dataclass

import torch

import model as M

# flash-attn's and torch's paged kernels need a block size that is a multiple of 256; the gather
# path reads whole blocks (up to the bucket's width), so it takes smaller ones
PAGED_BLOCK, GATHER_BLOCK = 256, 32


def decode_kernel(device: str, dtype: torch.dtype) -> str:
    """Attention of a decode step over the paged cache: "flash-attn", "varlen" or "gather"."""
    if M._runs(M.FLASH, device, dtype):
        return "flash-attn"
    if M._runs(M.VARLEN, device, dtype) and "block_table" in M.varlen_params(M.VARLEN.varlen_attn):
        return "varlen"
    return "gather"


def block_size(kernel: str) -> int:
    return GATHER_BLOCK if kernel == "gather" else PAGED_BLOCK


def pool_blocks(max_cache_tokens: int, sequences: int, longest: int, size: int) -> int:
    """Blocks of the pool: as many as `max_cache_tokens` fill, or fewer when `sequences` of
    `longest` tokens all fit at once (and block 0, padding rows')."""
    return min(max_cache_tokens // size, sequences * -(-longest // size) + 1)


class BlockPool:
    """k and v `(layers, blocks, block_size, Hkv, D)` (head_major: `(layers, Hkv, blocks,
    block_size, D)`); blocks handed out and shared by count."""

    def __init__(self, cfg: M.ModelConfig, blocks: int, block_size: int, device, dtype,
                 head_major: bool = False):
        hkv, d = cfg.num_key_value_heads, cfg.head_dim
        shape = ((cfg.num_hidden_layers, hkv, blocks, block_size, d) if head_major else
                 (cfg.num_hidden_layers, blocks, block_size, hkv, d))
        # zeros: the gather path multiplies keys past a row's end by 0, which must meet no NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size, self.head_major = block_size, head_major
        self.free = list(range(blocks - 1, 0, -1))  # pop() hands out the lowest; 0: padding rows
        self.refs = [0] * blocks

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def take(self, n: int) -> list[int]:
        assert n <= len(self.free), "the caller checks the room first"
        blocks = [self.free.pop() for _ in range(n)]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def hold(self, blocks: list[int]):
        for b in blocks:
            self.refs[b] += 1

    def drop(self, blocks: list[int]):
        for b in blocks:
            self.refs[b] -= 1
            if not self.refs[b]:
                self.free.append(b)

    def copy(self, src: list[int], dst: list[int]):
        """Blocks dst get src's k/v, every layer at once."""
        s, d = (M.to_device(x, self.k.device) for x in (src, dst))
        at = (slice(None),) * (2 if self.head_major else 1)  # the blocks dimension
        self.k[at + (d,)] = self.k[at + (s,)]
        self.v[at + (d,)] = self.v[at + (s,)]

    def slots(self, table: list[int], start: int, end: int) -> list[int]:
        """The slots of positions [start, end) of a sequence whose blocks are `table`."""
        bs = self.block_size
        return [table[t // bs] * bs + t % bs for t in range(start, end)]


@dataclass
class PagedPrefill:
    """A packed forward over new prompts: each layer writes k/v at `slots` (N,), one per packed
    token, then attends within each prompt."""
    pool: BlockPool
    slots: torch.Tensor  # (N,) int64
    cu_seqlens: torch.Tensor
    max_seqlen: int

    def attend(self, layer: int, q, k, v):
        write(self.pool, layer, self.slots, k, v)
        return M.varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen)


def write(pool: BlockPool, layer: int, slots, k, v):
    """k, v (N, Hkv, D) into their slots (N,) of one layer."""
    hkv, d = k.shape[1:]
    if pool.head_major:
        pool.k[layer].view(hkv, -1, d).index_copy_(1, slots, k.transpose(0, 1))
        pool.v[layer].view(hkv, -1, d).index_copy_(1, slots, v.transpose(0, 1))
    else:
        pool.k[layer].view(-1, hkv, d).index_copy_(0, slots, k)
        pool.v[layer].view(-1, hkv, d).index_copy_(0, slots, v)


@dataclass
class PagedDecode:
    """One decode step's attention: row b's new token is at position lens[b] - 1 of the sequence
    whose blocks are table[b] (its k/v go to slots[b]), and attends to positions [0, lens[b]).
    Built once per step from device tensors; `kernel` from decode_kernel, `mask` (B, W *
    block_size) float32 for the gather kernel (0 before a row's end, -inf past it)."""
    pool: BlockPool
    kernel: str
    table: torch.Tensor  # (B, W) int32
    lens: torch.Tensor  # (B,) int32
    slots: torch.Tensor  # (B,) int64
    cu_q: torch.Tensor | None = None  # (B+1,) int32, varlen's: a query per row
    cu_k: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @classmethod
    def build(cls, pool: BlockPool, kernel: str, table, positions):
        """From the step's block tables (B, W) int64 and positions (B,) int64."""
        bs = pool.block_size
        slots = table.gather(1, (positions // bs)[:, None]).squeeze(1) * bs + positions % bs
        lens = (positions + 1).int()
        step = cls(pool, kernel, table.int(), lens, slots)
        if kernel == "varlen":
            step.cu_k = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
            step.cu_q = torch.arange(len(lens) + 1, dtype=torch.int32, device=lens.device)
        if kernel == "gather":
            width = torch.arange(table.shape[1] * bs, device=table.device)
            step.mask = torch.zeros(len(lens), len(width), device=table.device)
            step.mask.masked_fill_(width >= positions[:, None] + 1, float("-inf"))
        return step

    def attend(self, layer: int, q, k, v):  # q (B, H, D), k/v (B, Hkv, D)
        write(self.pool, layer, self.slots, k, v)
        kc, vc = self.pool.k[layer], self.pool.v[layer]  # (blocks, block_size, Hkv, D)
        if self.kernel == "flash-attn":
            return M.FLASH.flash_attn_with_kvcache(q[:, None], kc, vc, cache_seqlens=self.lens,
                                                   block_table=self.table, causal=True)[:, 0]
        if self.kernel == "varlen":  # one query per row: causal or not, it sees all its keys
            return M.VARLEN.varlen_attn(q, kc, vc, self.cu_q, self.cu_k, 1, self.mask_width(),
                                        seqused_k=self.lens, block_table=self.table,
                                        enable_gqa=q.shape[1] != kc.shape[2])
        return gather_attention(q, kc, vc, self.table, self.mask)

    def mask_width(self) -> int:
        return self.table.shape[1] * self.pool.block_size


def gather_attention(q, kc, vc, table, mask):
    """Attention of q (B, H, D) over each row's blocks gathered from the head-major kc, vc (Hkv,
    blocks, block_size, D): (Hkv, B, L, D) each, L = W * block_size, read as they come by batched
    matmuls (K/V never repeated nor transposed; q and the output are the small copies); `mask`
    (B, L) hides the positions past a row's end. The g = H / Hkv query heads of a KV head are the
    rows of one matmul. Scores in float32: on CUDA straight from the bf16 products."""
    b, h, d = q.shape
    hkv = kc.shape[0]
    g = h // hkv
    keys = kc[:, table].view(hkv * b, -1, d)  # (Hkv * B, L, D)
    values = vc[:, table].view(hkv * b, -1, d)
    q = (q * d ** -0.5).view(b, hkv, g, d).transpose(0, 1).reshape(hkv * b, g, d)
    if q.device.type in M.FP32_OUT_MATMUL and q.dtype != torch.float32:
        scores = torch.bmm(q, keys.transpose(1, 2), out_dtype=torch.float32)
    else:
        scores = torch.bmm(q, keys.transpose(1, 2)).float()  # (Hkv * B, g, L)
    scores = scores.view(hkv, b, g, -1) + mask[None, :, None]
    probs = scores.softmax(-1).to(values.dtype).view(hkv * b, g, -1)
    return torch.bmm(probs, values).view(hkv, b, g, d).transpose(0, 1).reshape(b, h, d)
