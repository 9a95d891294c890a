"""The CPU's decode path (rollout.CPU_DECODE picks it): slots of a head-major KV cache, read in
segments. On one CPU thread it samples 1.6x as fast as the paged engine, whose gather kernel
copies each row's blocks (bench/README.md); a GPU reader never needs this file.

- KVCache: preallocated k and v for `slots` sequences, head-major (keys D-major); with groups
  (n > 1) it holds each admitted prompt once, in an "entry" its slots share, and each slot only
  its sampled tokens.
- Prefill: the record a packed prefill forward passes as `attention=`: every layer copies a
  prompt's k/v into its entry, or into all the slots of its samples (a group shares one pass).
- Decode: the record of one decode step: each row's new k/v written at its own position, then
  grouped-query batched matmuls over runs of adjacent cache rows ("segments", built by
  `decode_segments`), each read only up to its own longest row, and with a shared cache a group's
  rows the query rows of one matmul against its prompt, merged with the row's own tokens by their
  log-sum-exps. The model calls `attend(layer, q, k, v)`.
- plan_segments: where to split the rows in use into segments: one more matmul per segment
  against the keys read past a shorter row's end (SEGMENT_COST).
- generate: the engine over the slots: free slots always take the next waiting samples, even
  part of a prompt's n; the rest come in later without a prefill while some of the prompt's
  samples still decode (they read its entry, or copy its k/v from a sibling slot, and sample
  their first token from the logits kept from its prefill). Slots and entries go to the shortest
  prompts first, so neighbours hold similar lengths and a step's reads run little past a row's
  end. One host sync per step (the sampled tokens); lengths are tracked on the host.
"""
from collections import namedtuple
from dataclasses import dataclass

import torch

import model as M
from sampling import completion_keys, sample_rows


class KVCache:
    """k/v for `slots` sequences: a prompt of up to `prompt_len` tokens, then up to `new_len`
    sampled ones, head-major, keys transposed: k `(layers, rows, Hkv, D, len)`, v `(layers, rows,
    Hkv, len, D)`: a run of rows up to L positions is a strided view that q @ k and p @ v read as
    batched matmuls, no copy (D-major keys: the CPU's q @ k reads them contiguously). `shared`:
    `pk`, `pv` hold each admitted prompt once, in an "entry" that the slots sampling from it share
    (`slots` entries: never more are in use), and `k`, `v` each slot's sampled tokens. Otherwise a
    prompt is copied into each slot of its samples (`pk`, `pv` are `k`, `v`). The same bytes
    either way."""

    def __init__(self, cfg: M.ModelConfig, slots: int, prompt_len: int, new_len: int, device,
                 dtype, shared: bool = False):
        hkv, d = cfg.num_key_value_heads, cfg.head_dim

        def zeros(*shape):  # zeros: a read past a shorter row's end, where 0 * p must meet no NaN
            return torch.zeros((cfg.num_hidden_layers, slots) + shape, device=device, dtype=dtype)
        self.slots, self.shared = slots, shared
        if shared:
            self.pk, self.pv = zeros(hkv, d, prompt_len), zeros(hkv, prompt_len, d)
            self.k, self.v = zeros(hkv, d, new_len), zeros(hkv, new_len, d)
        else:
            total = prompt_len + new_len
            self.k, self.v = zeros(hkv, d, total), zeros(hkv, total, d)
            self.pk, self.pv = self.k, self.v

    @property
    def nbytes(self) -> int:
        tensors = {id(t): t for t in (self.k, self.v, self.pk, self.pv)}.values()
        return sum(t.nbytes for t in tensors)

    def write_prompt(self, layer: int, first: int, end: int, k, v):
        """Store a prompt's k, v (T, Hkv, D) at positions [0, T) of prompt rows [first, end):
        entries when `shared`, else slots; transposed once, then copied to each row."""
        t = k.shape[0]
        self.pk[layer, first:end, :, :, :t] = k.permute(1, 2, 0).contiguous()  # (Hkv, D, T)
        self.pv[layer, first:end, :, :t] = v.transpose(0, 1).contiguous()  # (Hkv, T, D)

    def copy_prompt(self, source: int, slots: list[int], t: int):
        """Copy the prompt at positions [0, t) of slot `source` into `slots`, every layer (a
        prompt in each slot: more samples of a prompt still decoding)."""
        assert not self.shared, "a shared cache holds a prompt once, in its entry"
        for s in slots:  # k (layers, slots, Hkv, D, T), v (layers, slots, Hkv, T, D)
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
    The new k/v go to index `new` of the slot (= `lens`, or with a shared cache the count of sampled
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


# ----------------------------------------------------------------------------- the CPU's engine

def generate(model, prompts, sampling, stop_ids, prompt_offset: int, book):
    """rollout.generate on the CPU: the completions of `book` (sampling.Completions) sampled
    through slots of a head-major cache (see the module docstring)."""
    n, max_new_tokens = sampling.n, sampling.max_new_tokens
    prompt_len = max(len(p) for p in prompts)
    max_len = prompt_len + max_new_tokens
    slots = min(sampling.max_cache_tokens // max_len, n * len(prompts))
    if slots < 1:
        raise ValueError(f"max_cache_tokens={sampling.max_cache_tokens} cannot hold one sequence "
                         f"of {max_len} tokens (longest prompt + max_new_tokens)")
    embed = model.model.embed_tokens.weight
    device, dtype = embed.device, embed.dtype
    # a group's prompt held once when there are groups (n > 1; for n = 1, one read per slot
    # costs less)
    cache = KVCache(model.config, slots, prompt_len, max_new_tokens, device, dtype, shared=n > 1)
    engine = _Engine(prompts, n, cache, sampling.seed, prompt_offset, device, book)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    last = {}  # slot -> last sampled token, fed back next step
    slots_now, logits = [], None
    while True:
        batch = engine.admit()
        if batch:
            new_slots, new_logits = _prefill(model, engine, batch)
            slots_now, logits = slots_now + new_slots, (new_logits if logits is None else
                                                        torch.cat([logits, new_logits]))
        if not slots_now:
            break
        finished = _sample_step(engine, slots_now, logits, stops, last, sampling)
        book.bar.update(len(slots_now))  # a token for every slot
        for s in finished:
            engine.release(s)
            del last[s]
        slots_now = sorted(engine.slot_of)
        if slots_now:
            logits = _decode(model, engine, slots_now, last)
        else:
            logits = None
    del engine.cache  # the only reference: the cache memory is freed here


class _Engine:
    """Host-side bookkeeping for one generate() call."""

    def __init__(self, prompts, n, cache: KVCache, seed: int, prompt_offset: int, device,
                 book=None):
        self.prompts, self.cache, self.device = prompts, cache, device
        self.queue = [(p, list(range(n))) for p in range(len(prompts))]  # waiting, prompt order
        self.slot_of = {}  # slot -> completion (prompt_idx, sample_idx)
        self.free = list(range(cache.slots))
        self.entry_of = {}  # slot -> the entry holding its prompt (a shared cache)
        self.entry_rows = {}  # entry -> how many occupied slots read it
        self.free_entries = list(range(cache.slots))
        self.live = {}  # prompt -> its entry, while a slot reads it
        self.first_logits = {}  # prompt -> the logits after it (V,), while its entry lives
        self.book = book  # sampling.Completions: every completion's tokens so far
        self.tokens = book.tokens if book is not None else {}
        self.seed, self.prompt_offset = seed, prompt_offset

    def admit(self):
        """Take waiting completions, in order, into every free slot (part of a group if need be).
        A prompt whose entry lives (some of its samples are decoding) gets more readers of it,
        and a slot of theirs is the `source` to copy its prompt from (no prefill); any other gets
        a new entry (source None: prefill it). Slots and new entries go to the shortest prompts
        first (ties in order), so that neighbours hold similar lengths: decode reads little past
        a row's end (kvcache.plan_segments). Returns (prompt_idx, sample indices, slots, entry,
        source) tuples."""
        batch, room = [], len(self.free)  # (prompt_idx, sample indices)
        while self.queue and room:
            p, samples = self.queue.pop(0)
            batch.append((p, samples[:room]))
            if len(samples) > room:
                self.queue.insert(0, (p, samples[room:]))
            room -= len(batch[-1][1])
        slots = sorted(self.free[:len(self.free) - room])
        self.free = self.free[len(self.free) - room:]
        self.free_entries.sort()  # the lowest: entries in use stay adjacent
        fresh = sum(p not in self.live for p, _ in batch)
        entries, self.free_entries = self.free_entries[:fresh], self.free_entries[fresh:]
        for i in sorted(range(len(batch)), key=lambda i: len(self.prompts[batch[i][0]])):
            p, samples = batch[i]
            entry, source = self.live.get(p), None
            if entry is None:
                entry = self.live[p] = entries.pop(0)
            else:
                source = next(s for s, e in self.entry_of.items() if e == entry)
            batch[i] = (p, samples, slots[:len(samples)], entry, source)
            self.entry_rows[entry] = self.entry_rows.get(entry, 0) + len(samples)
            self.entry_of.update(dict.fromkeys(slots[:len(samples)], entry))
            slots = slots[len(samples):]
        return batch

    def release(self, slot: int):
        """A finished slot is free, and its entry once no slot reads it."""
        p = self.slot_of.pop(slot)[0]
        self.free.append(slot)
        entry = self.entry_of.pop(slot)
        self.entry_rows[entry] -= 1
        if not self.entry_rows[entry]:
            del self.entry_rows[entry], self.live[p]
            self.first_logits.pop(p)
            self.free_entries.append(entry)

    def kv_tokens(self, slots) -> int:
        """Tokens of K/V a decode step of `slots` reads: every slot's sampled tokens, and each
        entry in use once (shared cache) or each slot's prompt."""
        sampled = sum(len(self.tokens[self.slot_of[s]]) for s in slots)
        if not self.cache.shared:
            return sampled + sum(len(self.prompts[self.slot_of[s][0]]) for s in slots)
        entries = {self.entry_of[s]: self.slot_of[s][0] for s in slots}
        return sampled + sum(len(self.prompts[p]) for p in entries.values())


def _prefill(model, engine: _Engine, batch):
    """One packed forward over the admitted prompts that need one (source None), their prompt
    written into the cache; the others' prompt is in the cache already (their entry) or copied
    from their source slot. Returns the new slots and each one's next-token logits (B, V)."""
    fresh = [b for b in batch if b[4] is None]
    runs, t0 = [], 0
    for p, samples, slots, entry, source in batch:
        for s, j in zip(slots, samples):
            engine.slot_of[s] = (p, j)
        if source is not None:
            if not engine.cache.shared:  # the prompt in each slot
                engine.cache.copy_prompt(source, slots, len(engine.prompts[p]))
            continue
        t1 = t0 + len(engine.prompts[p])
        if engine.cache.shared:  # the prompt once, in its entry
            runs.append((entry, entry + 1, t0, t1))
        for s in () if engine.cache.shared else slots:  # the prompt in each slot
            if runs and runs[-1][1] == s and runs[-1][2] == t0:  # the run goes on
                runs[-1] = (runs[-1][0], s + 1, t0, t1)
            else:
                runs.append((s, s + 1, t0, t1))
        t0 = t1
    if fresh:
        ids, pos, cu, max_seqlen = M.pack([engine.prompts[b[0]] for b in fresh], engine.device)
        writes = Prefill(engine.cache, cu, max_seqlen, runs)
        logits = model(ids, pos, cu, max_seqlen, attention=writes, select=cu[1:].long() - 1)
        # (V,) each, copied: a view would keep the whole batch's logits while one prompt lives
        engine.first_logits.update({b[0]: row.clone() for b, row in zip(fresh, logits)})
    new_slots = [s for b in batch for s in b[2]]
    return new_slots, torch.stack([engine.first_logits[b[0]] for b in batch for _ in b[2]])


def _sample_step(engine: _Engine, slots, logits, stops, last, sampling):
    """Sample the next token of every slot in `slots` (rows of `logits`); return finished slots."""
    comps = [engine.slot_of[s] for s in slots]
    pidx = torch.tensor([c[0] for c in comps], device=engine.device)
    sidx = torch.tensor([c[1] for c in comps], device=engine.device)
    steps = torch.tensor([len(engine.tokens[c]) for c in comps], device=engine.device)
    keys = completion_keys(engine.seed, pidx + engine.prompt_offset, sidx)
    out = sample_rows(logits, keys, steps, sampling, stops)
    finished = []
    for s, c, (t, lp, stop) in zip(slots, comps, out.tolist()):  # the step's one host sync
        last[s] = int(t)
        if engine.book.add(c, int(t), lp, bool(stop)):
            finished.append(s)
    return finished


def _decode(model, engine: _Engine, slots, last):
    """One decode step for the occupied slots: logits (B, V) for their next tokens."""
    dev, cache = engine.device, engine.cache
    comps = [engine.slot_of[s] for s in slots]
    # Sampled tokens already cached: all but the last, which this step feeds in.
    host_new = [len(engine.tokens[c]) - 1 for c in comps]
    host_lens = [len(engine.prompts[p]) + t for (p, _), t in zip(comps, host_new)]  # positions
    rows = torch.tensor(slots, dtype=torch.int32, device=dev)
    lens = torch.tensor(host_lens, dtype=torch.int32, device=dev)
    ids = torch.tensor([last[s] for s in slots], device=dev)
    at = host_new if cache.shared else host_lens  # where the new k/v go in the slot
    b = len(slots)
    # its own slot: the row's cached tokens and its new one
    own = decode_segments(slots, [[i] for i in range(b)], [n + 1 for n in at], cache, dev)
    prompts = None
    if cache.shared:
        rows_of = {}  # entry -> batch rows reading it
        for i, s in enumerate(slots):
            rows_of.setdefault(engine.entry_of[s], []).append(i)
        entries = sorted(rows_of)
        keys = [len(engine.prompts[comps[rows_of[e][0]][0]]) for e in entries]
        prompts = decode_segments(entries, [rows_of[e] for e in entries], keys, cache, dev)
    new = torch.tensor(at, dtype=torch.int32, device=dev)
    return model(ids, lens.long(), attention=Decode(cache, rows, lens, new, own, prompts))

