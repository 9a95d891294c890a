"""Batched KV-cache sampler: prefill once per prompt, decode all slots together, refill as they
free.

generate(model, prompts, Sampling(n=...), ...) -> list[Sample], prompt-major (prompt i's n samples
contiguous). `Sampling` holds the settings; trainers and evaluate.py build one and pass it.

- KVCache: preallocated k and v for a slot count set by a token budget (`max_cache_tokens`), in
  flash-attn's token-major layout when flash-attn runs the model, else head-major (KVCache);
  head-major with n > 1 holds each group's prompt once ("shared": an entry its slots read).
- Prefill: the admitted prompts are packed (no padding) and run once each; every layer copies a
  prompt's k/v into its entry, or into all the slots of its samples (a group shares one pass).
- Decode: one token for every occupied slot per step, each at its own position. A finished slot is
  refilled from the queue (continuous batching). Free slots always take the next waiting samples,
  even part of a prompt's n (the rest come in later, with a second prefill of that prompt).
- Attention over the cache: flash-attn's `flash_attn_with_kvcache` (in-place append, per-slot
  `cache_seqlens`) when `model.use_flash` says so; else grouped-query batched matmuls over runs
  of slots ("segments", slots assigned shortest prompt first), each read only up to its own
  longest row, and with a shared cache over runs of entries, a group's rows the query rows of
  one matmul against its prompt (the two parts merged by their log-sum-exps). `Prefill` /
  `Decode` are records passed as the forward's `attention=`; the model calls their `attend`.
- Sampling: temperature (0 = greedy), top-k, top-p, as small pure functions; one uniform number
  per (completion, step) from a counter-based hash of (seed, prompt index, sample index, step)
  picks the token by inverse CDF: a completion is the same whatever the batch, slot count or
  cache budget, with no per-row generator objects.
- Host syncs: exactly one per decode step, `tolist()` of the sampled tokens and log-probs. Lengths
  and positions are tracked on the host (they advance by one per step).
- `Sample.logprobs` are log-probs of the sampled tokens under softmax(logits / temperature)
  (temperature 1 when greedy) before top-k/top-p filtering: the quantity the trainer recomputes.
"""
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M


@dataclass
class Sampling:
    """How to sample: n completions per prompt of at most max_new_tokens tokens, at temperature
    (0 = greedy) with top-k / top-p filtering; `seed` keys the random streams; the KV cache holds
    at most max_cache_tokens tokens (fewer concurrent sequences, the same samples)."""
    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_cache_tokens: int = 2**18


@dataclass
class Sample:
    prompt_idx: int
    sample_idx: int
    prompt_ids: list[int]
    response_ids: list[int]  # the stop token included when one ended it
    logprobs: list[float]  # sampler log-prob of each response token
    finish_reason: str  # "stop" or "length"


# ----------------------------------------------------------------------------- sampling

MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32."""
    for mult in (0x7FEB352D, 0x46CA68B5, 0x2C1B3C6D):
        x = ((x ^ (x >> 16)) * mult) & MASK32
    return x ^ (x >> 15)


def completion_keys(seed: int, prompt_idx: torch.Tensor, sample_idx: torch.Tensor) -> torch.Tensor:
    """One stream key per completion from (seed, prompt index, sample index). int64 (B,)."""
    k = _mix32(torch.full_like(prompt_idx, seed & MASK32) ^ 0x9E3779B9)
    k = _mix32(k ^ prompt_idx)
    return _mix32(k ^ (sample_idx * 0x61C88647 & MASK32))


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The step-th uniform number in (0, 1) of each completion's stream. float64 (B,)."""
    hi = _mix32(keys ^ _mix32(steps & MASK32))
    lo = _mix32(hi ^ 0x5BD1E995)
    return ((hi << 21) + (lo >> 11) + 0.5) / float(2**53)  # 53 random bits


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits (B, V) float32."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        # Keep a token if the mass strictly before it is < top_p (the top token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_tokens(logits, temperature: float, top_k: int, top_p: float, u: torch.Tensor):
    """Pick one token per row by inverse CDF on the filtered distribution, given uniforms u (B,).

    Returns tokens (B,) and their log-probs under softmax(logits / temperature) unfiltered."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, F.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / temperature if temperature != 1 else logits
    top = scaled.amax(-1, keepdim=True)  # (B, 1)
    # Unnormalised probabilities: the CDF search only needs u scaled by their total, so no
    # division pass; the same exponentials give the log-normaliser.
    weights = (scaled - top).exp_()  # (B, V)
    log_norm = top.squeeze(-1) + weights.sum(-1).log()  # (B,) logsumexp of scaled
    if top_k > 0 or top_p < 1.0:
        weights = (filter_logits(scaled, top_k, top_p) - top).exp_()  # 0 outside the kept set
    tokens = inverse_cdf(weights, u)
    return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_norm


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The first token of each row whose float64 cumulative weight exceeds u * total weight.
    weights (B, V) >= 0, u (B,) -> (B,) int64. Two levels instead of a float64 (B, V) cumsum:
    float64 sums of `block`-token blocks pick the block, then that block's cumsum the token."""
    b, v = weights.shape
    full = v // block * block
    # float32 block sums (a float64 sum would convert all of weights first: 5x slower)
    sums = [weights[:, :full].view(b, full // block, block).sum(-1)]  # (B, full / block)
    if full < v:  # a last, shorter block
        sums.append(weights[:, full:].sum(-1, keepdim=True))
    sums = torch.cat(sums, -1).double()  # (B, blocks)
    before = sums.cumsum(-1)  # (B, blocks) weight up to each block's end
    target = (u * before[:, -1])[:, None]  # (B, 1)
    blk = torch.minimum(torch.searchsorted(before, target, right=True), _last_positive(sums))
    start = torch.where(blk > 0, before.gather(-1, (blk - 1).clamp(min=0)), 0.0)  # (B, 1)
    idx = blk * block + torch.arange(block, device=weights.device)  # (B, block) token ids
    inside = weights.gather(-1, idx.clamp(max=v - 1)).double() * (idx < v)  # (B, block)
    pick = torch.searchsorted(start + inside.cumsum(-1), target, right=True)  # (B, 1)
    return idx.gather(-1, torch.minimum(pick, _last_positive(inside))).squeeze(-1)


def _last_positive(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's last x > 0, (B, 1): where rounding puts the target at or past the end
    of the sums, the pick steps back to it, never onto a weight-0 token."""
    at = torch.arange(x.shape[-1], device=x.device)
    return torch.where(x > 0, at, -1).amax(-1, keepdim=True)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """k/v for `slots` sequences: a prompt of up to `prompt_len` tokens, then up to `new_len`
    sampled ones. flash layout: k and v `(layers, slots, prompt_len + new_len, Hkv, D)`, what
    flash_attn_with_kvcache reads and appends to. Else head-major, keys transposed: k `(layers,
    rows, Hkv, D, len)`, v `(layers, rows, Hkv, len, D)`: a run of rows up to L positions is a
    strided view that q @ k and p @ v read as batched matmuls, no copy (D-major keys: 2x faster
    q @ k than (L, D) keys, on CPU). `shared` (head-major only): `pk`, `pv` hold each admitted
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


@dataclass
class Prefill:
    """One packed forward over the admitted prompts: every layer copies a prompt's k/v (packed
    tokens [t0, t1)) into the prompt rows [first, end) (KVCache.write_prompt), one broadcast copy
    per run (a gather of every (slot, token) pair was 3x slower on CPU)."""
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
        q = q * d ** -0.5  # the softmax scale, once
        own, own_lse = _read(cache.k[layer], cache.v[layer], q, *self.own)
        if self.prompts is None:
            return own
        padded = torch.cat([q, q.new_zeros(1, h, d)])  # row B: padding
        shared, shared_lse = _read(cache.pk[layer], cache.pv[layer], padded, *self.prompts)
        # softmax weights of the two parts: e^a / (e^a + e^b) = sigmoid(a - b)
        weight = (own_lse - shared_lse).sigmoid_()[..., None]  # (B, H, 1)
        return torch.lerp(shared.float(), own.float(), weight).to(q.dtype)


def _read(ks, vs, q, segments: list[Segment], place):
    """Grouped-query attention of the batch rows q (B, H, D) (with a zero row B when segments
    pad) over one layer's keys ks (rows, Hkv, D, len) and values vs (rows, Hkv, len, D), segment
    by segment: the g = H / Hkv query heads of a KV head, for all of a cache row's readers, are
    the rows of one matmul against its keys, read once (K/V never repeated, no copy). Returns
    the outputs (B, H, D) and log-sum-exps (B, H). `place` None: the segments' readers are the
    batch rows in order, one each (sliced, not gathered)."""
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
            s.add_(seg.mask)  # (a broadcast masked_fill_ measured 5x slower on CPU)
        top = s.amax(-1, keepdim=True)
        p = s.sub_(top).exp_()  # unnormalised (one pass); the output is normalised instead
        total = p.sum(-1, keepdim=True)
        part = (top + total.log()).view(n, hkv, w, g)
        if w == 1:  # (n, Hkv, g) is the outputs' own layout: written in place
            torch.bmm(p.to(vv.dtype), vv, out=out[at].view(n * hkv, g, d))
            out[at].view(n * hkv, g, d).div_(total.to(vv.dtype))
            lse[at] = part.view(n, h)
            continue
        o = torch.bmm(p.to(vv.dtype), vv).div_(total.to(vv.dtype))  # (n * Hkv, w * g, D)
        out[at].view(n, w, hkv, g, d).copy_(o.view(n, hkv, w, g, d).transpose(1, 2))
        lse[at].view(n, w, hkv, g).copy_(part.transpose(1, 2))
    return (out, lse) if place is None else (out[place], lse[place])


# ----------------------------------------------------------------------------- generate

def stop_ids_for(model, tokenizer=None) -> list[int]:
    """eos ids from generation_config / config, plus the tokenizer's eos and end-of-turn tokens."""
    ids = []
    for src in (model.generation_config, model.config.raw):
        eos = src.get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    if tokenizer is not None:
        ids.append(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        ids += [vocab[t] for t in ("<|eot_id|>", "<|im_end|>", "<|eom_id|>") if t in vocab]
    return sorted({i for i in ids if i is not None})


def _check_inputs(prompts, n, stop_ids, vocab, max_new_tokens):
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be >= 1 (got n={n}, "
                         f"max_new_tokens={max_new_tokens})")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")
    bad = [s for s in stop_ids if not 0 <= s < vocab]
    if bad:
        raise ValueError(f"stop ids {bad} are outside the vocabulary [0, {vocab})")


class _Run:
    """Host-side bookkeeping for one generate() call."""

    def __init__(self, prompts, n, cache: KVCache, seed: int, prompt_offset: int, device):
        self.prompts, self.cache, self.device = prompts, cache, device
        self.queue = [(p, list(range(n))) for p in range(len(prompts))]  # waiting, prompt order
        self.slot_of = {}  # slot -> completion (prompt_idx, sample_idx)
        self.free = list(range(cache.slots))
        self.entry_of = {}  # slot -> the entry holding its prompt (a shared cache)
        self.entry_rows = {}  # entry -> how many occupied slots read it
        self.free_entries = list(range(cache.slots))
        self.tokens = {}  # completion -> response ids
        self.logps = {}
        self.done = {}  # completion -> finish reason
        self.seed, self.prompt_offset = seed, prompt_offset

    def admit(self):
        """Take waiting completions, in order, into every free slot (part of a group if need be);
        each admitted prompt gets an entry. Slots and entries go to the shortest prompts first
        (ties in order), so that neighbours hold similar lengths: decode reads little past a
        row's end (_plan_segments). Returns (prompt_idx, sample indices, slots, entry)."""
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
        entries, self.free_entries = (self.free_entries[:len(batch)],
                                      self.free_entries[len(batch):])
        for i in sorted(range(len(batch)), key=lambda i: len(self.prompts[batch[i][0]])):
            p, samples = batch[i]
            batch[i] = (p, samples, slots[:len(samples)], entries.pop(0))
            slots = slots[len(samples):]
            self.entry_rows[batch[i][3]] = len(samples)
            self.entry_of.update(dict.fromkeys(batch[i][2], batch[i][3]))
        return batch

    def release(self, slot: int):
        """A finished slot is free, and its entry once no slot reads it."""
        del self.slot_of[slot]
        self.free.append(slot)
        entry = self.entry_of.pop(slot)
        self.entry_rows[entry] -= 1
        if not self.entry_rows[entry]:
            del self.entry_rows[entry]
            self.free_entries.append(entry)

    def kv_tokens(self, slots) -> int:
        """Tokens of K/V a decode step of `slots` reads: every slot's sampled tokens, and each
        entry in use once (shared cache) or each slot's prompt."""
        sampled = sum(len(self.tokens[self.slot_of[s]]) for s in slots)
        if not self.cache.shared:
            return sampled + sum(len(self.prompts[self.slot_of[s][0]]) for s in slots)
        entries = {self.entry_of[s]: self.slot_of[s][0] for s in slots}
        return sampled + sum(len(self.prompts[p]) for p in entries.values())


def _prefill(model, run: _Run, batch):
    """One packed forward over the admitted prompts; returns each new slot's next-token logits."""
    ids, pos, cu, max_seqlen = M.pack([run.prompts[p] for p, _, _, _ in batch], run.device)
    runs, t0, new_slots, rows = [], 0, [], []
    for i, (p, samples, slots, entry) in enumerate(batch):
        t1 = t0 + len(run.prompts[p])
        for s, j in zip(slots, samples):
            run.slot_of[s] = (p, j)
            run.tokens[(p, j)], run.logps[(p, j)] = [], []
        if run.cache.shared:  # the prompt once, in its entry
            runs.append((entry, entry + 1, t0, t1))
        for s in () if run.cache.shared else slots:  # the prompt in each slot
            if runs and runs[-1][1] == s and runs[-1][2] == t0:  # the run goes on
                runs[-1] = (runs[-1][0], s + 1, t0, t1)
            else:
                runs.append((s, s + 1, t0, t1))
        new_slots, rows, t0 = new_slots + slots, rows + [i] * len(slots), t1
    writes = Prefill(run.cache, cu, max_seqlen, runs)
    logits = model(ids, pos, cu, max_seqlen, attention=writes, select=cu[1:].long() - 1)  # (P, V)
    return new_slots, logits[torch.tensor(rows, device=run.device)]  # (new slots, V)


@torch.no_grad()
def generate(model, prompts: list[list[int]], sampling: Sampling = Sampling(), *, stop_ids=None,
             prompt_offset: int = 0, progress: bool = True) -> list[Sample]:
    """Sample sampling.n completions per prompt; see the module docstring. Random streams are
    keyed by prompt_offset + prompt index, so a caller holding a slice of a larger batch (one rank
    of several) draws exactly what a single caller with the whole batch would."""
    n, max_new_tokens = sampling.n, sampling.max_new_tokens
    vocab = model.config.vocab_size
    stop_ids = sorted(set(stop_ids_for(model) if stop_ids is None else stop_ids))
    _check_inputs(prompts, n, stop_ids, vocab, max_new_tokens)
    prompt_len = max(len(p) for p in prompts)
    max_len = prompt_len + max_new_tokens
    slots = min(sampling.max_cache_tokens // max_len, n * len(prompts))
    if slots < 1:
        raise ValueError(f"max_cache_tokens={sampling.max_cache_tokens} cannot hold one sequence "
                         f"of {max_len} tokens (longest prompt + max_new_tokens)")
    embed = model.model.embed_tokens.weight
    device, dtype = embed.device, embed.dtype
    # The cache layout follows the attention backend, decided once: flash-attn's where
    # model.use_flash picks it (the dtype and device of every q), else head-major, with a group's
    # prompt held once when there are groups (n > 1; for n = 1, one read per slot costs less).
    cache = KVCache(model.config, slots, prompt_len, max_new_tokens, device, dtype,
                    flash=M.use_flash(embed), shared=n > 1)
    run = _Run(prompts, n, cache, sampling.seed, prompt_offset, device)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    last = {}  # slot -> last sampled token, fed back next step
    bar = tqdm(total=n * len(prompts), desc="generate", disable=not progress, leave=False)
    slots_now, logits = [], None
    while True:
        batch = run.admit()
        if batch:
            new_slots, new_logits = _prefill(model, run, batch)
            slots_now, logits = slots_now + new_slots, (new_logits if logits is None else
                                                        torch.cat([logits, new_logits]))
        if not slots_now:
            break
        finished = _sample_step(run, slots_now, logits, stops, last, sampling)
        bar.update(len(finished))
        for s in finished:
            run.release(s)
            del last[s]
        slots_now = sorted(run.slot_of)
        if slots_now:
            logits = _decode(model, run, slots_now, last)
        else:
            logits = None
    bar.close()
    del run.cache  # the only reference: the cache memory is freed here
    return [Sample(p, j, list(prompts[p]), run.tokens[(p, j)], run.logps[(p, j)], run.done[(p, j)])
            for p in range(len(prompts)) for j in range(n)]


def _sample_step(run: _Run, slots, logits, stops, last, sampling: Sampling):
    """Sample the next token of every slot in `slots` (rows of `logits`); return finished slots."""
    comps = [run.slot_of[s] for s in slots]
    pidx = torch.tensor([c[0] for c in comps], device=run.device)
    sidx = torch.tensor([c[1] for c in comps], device=run.device)
    steps = torch.tensor([len(run.tokens[c]) for c in comps], device=run.device)
    u = uniforms(completion_keys(run.seed, pidx + run.prompt_offset, sidx), steps)
    tokens, logps = sample_tokens(logits, sampling.temperature, sampling.top_k, sampling.top_p, u)
    is_stop = torch.isin(tokens, stops)
    # The one host sync of the step: the tokens decide which slots are done.
    tokens, logps, is_stop = tokens.tolist(), logps.tolist(), is_stop.tolist()
    finished = []
    for s, c, t, lp, stop in zip(slots, comps, tokens, logps, is_stop):
        run.tokens[c].append(t)
        run.logps[c].append(lp)
        last[s] = t
        if stop or len(run.tokens[c]) >= sampling.max_new_tokens:
            run.done[c] = "stop" if stop else "length"
            finished.append(s)
    return finished


def _decode(model, run: _Run, slots, last):
    """One decode step for the occupied slots: logits (B, V) for their next tokens."""
    dev, cache = run.device, run.cache
    comps = [run.slot_of[s] for s in slots]
    # Sampled tokens already cached: all but the last, which this step feeds in.
    host_new = [len(run.tokens[c]) - 1 for c in comps]
    host_lens = [len(run.prompts[p]) + t for (p, _), t in zip(comps, host_new)]  # positions
    rows = torch.tensor(slots, dtype=torch.int32, device=dev)
    lens = torch.tensor(host_lens, dtype=torch.int32, device=dev)
    ids = torch.tensor([last[s] for s in slots], device=dev)
    if cache.flash:
        return model(ids, lens.long(), attention=Decode(cache, rows, lens))  # (B, V)
    at = host_new if cache.shared else host_lens  # where the new k/v go in the slot
    b = len(slots)
    # its own slot: the row's cached tokens and its new one
    own = _segments(slots, [[i] for i in range(b)], [n + 1 for n in at], cache, dev)
    prompts = None
    if cache.shared:
        rows_of = {}  # entry -> batch rows reading it
        for i, s in enumerate(slots):
            rows_of.setdefault(run.entry_of[s], []).append(i)
        entries = sorted(rows_of)
        keys = [len(run.prompts[comps[rows_of[e][0]][0]]) for e in entries]
        prompts = _segments(entries, [rows_of[e] for e in entries], keys, cache, dev)
    new = torch.tensor(at, dtype=torch.int32, device=dev)
    return model(ids, lens.long(), attention=Decode(cache, rows, lens, new, own, prompts))


# One more segment costs about as much as reading this many more keys of one row (its ~5 calls
# per layer, against 0.17 us per key and layer: measured on one CPU thread, SmolLM2's 3 x 64
# KV heads). On a GPU a call costs far more than a key: one segment per run of slots.
SEGMENT_COST = {"cpu": 256}


def _plan_segments(slots: list[int], keys: list[int], cost: int) -> list[tuple[int, int]]:
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


def _segments(cache_rows: list[int], readers: list[list[int]], keys: list[int], cache: KVCache,
              device) -> tuple[list[Segment], torch.Tensor]:
    """Segments over the cache rows in use (sorted; each read by `readers`, batch rows, up to
    `keys` positions), planned by _plan_segments, and each batch row's place in their outputs
    (None: the batch rows in order, one per reader, no padding)."""
    b, cost = sum(map(len, readers)), SEGMENT_COST.get(torch.device(device).type, 1 << 20)
    lengths = torch.tensor(keys, device=device)[:, None]
    out, place = [], [0] * b
    for i, j in _plan_segments(cache_rows, keys, cost):
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
