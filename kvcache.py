"""The sampler's KV cache and attention over it: what rollout.py's prefill writes and each decode
step reads.

- KVCache: preallocated k and v for `slots` sequences, in flash-attn's token-major layout when
  flash-attn runs the model, else head-major (keys D-major); head-major with groups (n > 1) holds
  each admitted prompt once, in an "entry" its slots share, and each slot only its sampled tokens.
- Prefill: the record a packed prefill forward passes as `attention=`: every layer copies a
  prompt's k/v into its entry, or into all the slots of its samples (a group shares one pass).
- Decode: the record of one decode step: each row's new k/v written at its own position, then
  flash-attn's `flash_attn_with_kvcache` (in-place append, per-slot `cache_seqlens`) when
  `model.use_flash` says so; else grouped-query batched matmuls over runs of adjacent cache rows
  ("segments", built by `decode_segments`), each read only up to its own longest row, and with a
  shared cache a group's rows the query rows of one matmul against its prompt, merged with the
  row's own tokens by their log-sum-exps. The model calls `attend(layer, q, k, v)` on either.
- plan_segments: where to split the rows in use into segments: one more matmul per segment
  against the keys read past a shorter row's end (SEGMENT_COST, per device type).
"""
from collections import namedtuple
from dataclasses import dataclass

import torch

import model as M


class KVCache:
    """k/v for `slots` sequences: a prompt of up to `prompt_len` tokens, then up to `new_len`
    sampled ones. flash layout: k and v `(layers, slots, prompt_len + new_len, Hkv, D)`, what
    flash_attn_with_kvcache reads and appends to. Else head-major, keys transposed: k `(layers,
    rows, Hkv, D, len)`, v `(layers, rows, Hkv, len, D)`: a run of rows up to L positions is a
    strided view that q @ k and p @ v read as batched matmuls, no copy (D-major keys: the CPU's
    q @ k reads them contiguously). `shared` (head-major only): `pk`, `pv` hold each admitted
    prompt once, in an "entry" that the slots sampling from it share (`slots` entries: never more
    are in use), and `k`, `v` each slot's sampled tokens. Otherwise a prompt is copied into each
    slot of its samples (`pk`, `pv` are `k`, `v`). The same bytes in every layout."""

    def __init__(self, cfg: M.ModelConfig, slots: int, prompt_len: int, new_len: int, device,
                 dtype, flash: bool, shared: bool = False):
        hkv, d = cfg.num_key_value_heads, cfg.head_dim

        def zeros(*shape):  # zeros: a read past a shorter row's end, where 0 * p must meet no NaN
            return torch.zeros((cfg.num_hidden_layers, slots) + shape, device=device, dtype=dtype)
        self.slots, self.flash, self.shared = slots, flash, shared and not flash
        if flash:
            self.k, self.v = (zeros(prompt_len + new_len, hkv, d) for _ in "kv")
        elif self.shared:
            self.pk, self.pv = zeros(hkv, d, prompt_len), zeros(hkv, prompt_len, d)
            self.k, self.v = zeros(hkv, d, new_len), zeros(hkv, new_len, d)
        else:
            total = prompt_len + new_len
            self.k, self.v = zeros(hkv, d, total), zeros(hkv, total, d)
        if not self.shared:
            self.pk, self.pv = self.k, self.v

    @property
    def nbytes(self) -> int:
        tensors = {id(t): t for t in (self.k, self.v, self.pk, self.pv)}.values()
        return sum(t.nbytes for t in tensors)

    def write_prompt(self, layer: int, first: int, end: int, k, v):
        """Store a prompt's k, v (T, Hkv, D) at positions [0, T) of prompt rows [first, end):
        entries when `shared`, else slots."""
        t = k.shape[0]
        if self.flash:
            self.pk[layer, first:end, :t] = k
            self.pv[layer, first:end, :t] = v
        else:  # transposed once, then copied to each row
            self.pk[layer, first:end, :, :, :t] = k.permute(1, 2, 0).contiguous()  # (Hkv, D, T)
            self.pv[layer, first:end, :, :t] = v.transpose(0, 1).contiguous()  # (Hkv, T, D)

    def copy_prompt(self, source: int, slots: list[int], t: int):
        """Copy the prompt at positions [0, t) of slot `source` into `slots`, every layer (the
        layouts that hold a prompt in each slot: more samples of a prompt still decoding)."""
        assert not self.shared, "a shared cache holds a prompt once, in its entry"
        for s in slots:
            if self.flash:  # (layers, slots, T, Hkv, D)
                self.k[:, s, :t] = self.k[:, source, :t]
                self.v[:, s, :t] = self.v[:, source, :t]
            else:  # k (layers, slots, Hkv, D, T), v (layers, slots, Hkv, T, D)
                self.k[:, s, ..., :t] = self.k[:, source, ..., :t]
                self.v[:, s, :, :t] = self.v[:, source, :, :t]


@dataclass
class Prefill:
    """One packed forward over the admitted prompts: every layer copies a prompt's k/v (packed
    tokens [t0, t1)) into the prompt rows [first, end) (KVCache.write_prompt), one broadcast copy
    per run (not a gather of every (slot, token) pair: bench/README.md)."""
    cache: KVCache
    cu_seqlens: torch.Tensor  # (P+1,) int32, the packed prompts
    max_seqlen: int
    runs: list[tuple[int, int, int, int]]  # (first, end, t0, t1)

    def attend(self, layer: int, q, k, v):
        for first, end, t0, t1 in self.runs:
            self.cache.write_prompt(layer, first, end, k[t0:t1], v[t0:t1])
        return M.varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen)


# Cache rows first.. first + n - 1 (slots, or a shared cache's entries) read up to `keys`
# positions by `width` query rows each: `index` (n * width,) names them, batch rows, or B (a
# zero query, its output dropped) where a cache row has fewer readers; `mask` (n * Hkv, 1, keys)
# float32 is added to the scores (-inf past a row's length; None when no row is shorter). The
# outputs are rows start.. start + n * width of the step's outputs of that part.
Segment = namedtuple("Segment", "first n width keys mask index start")


@dataclass
class Decode:
    """One new token for each of `rows` (cache slots), at position `lens` (the tokens before it).
    flash: one flash-attn call over all rows, their prompts in their slots. Head-major: the new
    k/v go to index `new` of the slot (= `lens`, or with a shared cache the count of sampled
    tokens before it); each row attends to its slot (`own`: segments of adjacent slots, each row
    its own reader) and, with a shared cache, to its prompt's entry (`prompts`: a group's rows
    are the query rows of one matmul against its prompt, read once for the group), the two
    merged by their log-sum-exps: the softmax over all the row's keys, exact up to rounding.
    `own` and `prompts`: segments, and each batch row's place in their outputs (B,)."""
    cache: KVCache
    rows: torch.Tensor  # (B,) int32 slots
    lens: torch.Tensor  # (B,) int32 tokens before the new one = its position
    new: torch.Tensor = None  # (B,) int32 where the new k/v go in the slot (head-major)
    own: tuple[list[Segment], torch.Tensor] = None
    prompts: tuple[list[Segment], torch.Tensor] | None = None

    def attend(self, layer: int, q, k, v):  # q (B, H, D): one new token per row
        cache = self.cache
        if cache.flash:
            out = M.FLASH.flash_attn_with_kvcache(
                q[:, None], cache.k[layer], cache.v[layer], k[:, None], v[:, None],
                cache_seqlens=self.lens, cache_batch_idx=self.rows, causal=True)  # appends k/v
            return out[:, 0]
        # int32 indices as they are (no per-layer conversion); split by slices: (B, Hkv, D)
        cache.k[layer, self.rows, :, :, self.new] = k
        cache.v[layer, self.rows, :, self.new] = v
        b, h, d = q.shape
        q = q * (d ** -0.5 * LOG2E)  # the softmax scale, once, in base 2 (see _read)
        own, own_lse = _read(cache.k[layer], cache.v[layer], q, *self.own)
        if self.prompts is None:
            return own
        padded = torch.cat([q, q.new_zeros(1, h, d)])  # row B: padding
        shared, shared_lse = _read(cache.pk[layer], cache.pv[layer], padded, *self.prompts)
        # softmax weights of the two parts: 2^a / (2^a + 2^b) = sigmoid((a - b) ln 2)
        weight = (own_lse - shared_lse).mul_(LN2).sigmoid_()[..., None]  # (B, H, 1)
        return torch.lerp(shared.float(), own.float(), weight).to(q.dtype)


# Scores in base 2: q carries log2(e), so 2^s = e^(q.k): exp2 runs at one speed on every input,
# where the CPU's exp takes a slow path on -inf (masked keys) and where it underflows (scores far
# below the row's top): bench/README.md.
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453


def _read(ks, vs, q, segments: list[Segment], place):
    """Grouped-query attention of the batch rows q (B, H, D) (with a zero row B when segments
    pad; scaled by log2(e)) over one layer's keys ks (rows, Hkv, D, len) and values vs (rows,
    Hkv, len, D), segment by segment: the g = H / Hkv query heads of a KV head, for all of a
    cache row's readers, are the rows of one matmul against its keys, read once (K/V never
    repeated, no copy). Returns the outputs (B, H, D) and base-2 log-sum-exps (B, H). `place`
    None: the segments' readers are the batch rows in order, one each (sliced, not gathered)."""
    h, d = q.shape[1:]
    hkv = ks.shape[1]
    g, last = h // hkv, segments[-1]
    out = q.new_empty(last.start + last.n * last.width, h, d)
    lse = q.new_empty(out.shape[:2], dtype=torch.float32)
    for seg in segments:
        n, w, at = seg.n, seg.width, slice(seg.start, seg.start + seg.n * seg.width)
        qs = q[at] if place is None else q[seg.index]  # (n * w, H, D)
        qs = qs.view(n, w, hkv, g, d).transpose(1, 2).reshape(n * hkv, w * g, d)
        # a run of cache rows up to `keys` positions is one stride: views, no copy
        kt = ks[seg.first:seg.first + n, :, :, :seg.keys].view(n * hkv, d, seg.keys)
        vv = vs[seg.first:seg.first + n, :, :seg.keys].view(n * hkv, seg.keys, d)
        s = torch.bmm(qs, kt).float()  # (n * Hkv, w * g, keys); softmax in float32 (as HF)
        if seg.mask is not None:
            s.add_(seg.mask)  # (an add, not a broadcast masked_fill_: bench/README.md)
        top = s.amax(-1, keepdim=True)
        p = s.sub_(top).exp2_()  # unnormalised (one pass); the output is normalised instead
        total = p.sum(-1, keepdim=True)
        part = (top + total.log2()).view(n, hkv, w, g)
        if w == 1:  # (n, Hkv, g) is the outputs' own layout: written in place
            torch.bmm(p.to(vv.dtype), vv, out=out[at].view(n * hkv, g, d))
            out[at].view(n * hkv, g, d).div_(total.to(vv.dtype))
            lse[at] = part.view(n, h)
            continue
        o = torch.bmm(p.to(vv.dtype), vv).div_(total.to(vv.dtype))  # (n * Hkv, w * g, D)
        out[at].view(n, w, hkv, g, d).copy_(o.view(n, hkv, w, g, d).transpose(1, 2))
        lse[at].view(n, w, hkv, g).copy_(part.transpose(1, 2))
    return (out, lse) if place is None else (out[place], lse[place])


# One more segment costs about as much as reading this many more keys of one row (its ~5 calls
# per layer against the cost of a key per layer, on one CPU thread at SmolLM2's 3 x 64 KV heads:
# bench/README.md). On a GPU a call costs far more than a key: one segment per run of slots.
SEGMENT_COST = {"cpu": 256}


def plan_segments(slots: list[int], keys: list[int], cost: int) -> list[tuple[int, int]]:
    """Split the cache rows in use (sorted slots or entries) into runs of adjacent rows read
    together: rows [i, j) read (j - i) * max(keys[i:j]) positions, plus `cost` per run. Dynamic
    programming over the split points, runs of at most 128 rows: O(rows * 128) host work."""
    best, cut = [0.0] + [float("inf")] * len(slots), [0] * (len(slots) + 1)
    for j in range(1, len(slots) + 1):
        most = 0
        for i in range(j - 1, max(j - 129, -1), -1):
            most = max(most, keys[i])
            price = (j - i) * most + cost
            if price >= best[j] or slots[i] != slots[j - 1] - (j - 1 - i):
                break  # a run starting further left costs more, or spans a free slot
            if best[i] + price < best[j]:
                best[j], cut[j] = best[i] + price, i
    runs, j = [], len(slots)
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def decode_segments(cache_rows: list[int], readers: list[list[int]], keys: list[int],
                    cache: KVCache, device) -> tuple[list[Segment], torch.Tensor]:
    """Segments over the cache rows in use (sorted; each read by `readers`, batch rows, up to
    `keys` positions), planned by plan_segments, and each batch row's place in their outputs
    (None: the batch rows in order, one per reader, no padding)."""
    b, cost = sum(map(len, readers)), SEGMENT_COST.get(torch.device(device).type, 1 << 20)
    lengths = torch.tensor(keys, device=device)[:, None]
    out, place = [], [0] * b
    for i, j in plan_segments(cache_rows, keys, cost):
        width, most = max(map(len, readers[i:j])), max(keys[i:j])
        start = out[-1].start + out[-1].n * out[-1].width if out else 0
        index = [r for rs in readers[i:j] for r in rs + [b] * (width - len(rs))]
        for at, r in enumerate(index):
            if r != b:
                place[r] = start + at
        mask = None  # (decided on the host: no device sync)
        if min(keys[i:j]) < most:
            mask = _mask(torch.arange(most, device=device) >= lengths[i:j], cache)
        out.append(Segment(cache_rows[i], j - i, width, most, mask,
                           torch.tensor(index, device=device), start))
    identity = place == list(range(b)) and out[-1].start + out[-1].n * out[-1].width == b
    return out, None if identity else torch.tensor(place, device=device)


def _mask(outside, cache: KVCache):
    """(rows, keys) bool, True where a row may not attend -> the additive float32 mask
    (rows * Hkv, 1, keys)."""
    mask = torch.zeros(outside.shape, device=outside.device).masked_fill_(outside, float("-inf"))
    hkv = cache.v.shape[2]
    return mask[:, None, None].expand(-1, hkv, 1, -1).reshape(-1, 1, outside.shape[1])
