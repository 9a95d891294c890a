"""Batched KV-cache sampler: prefill once per prompt, decode all slots together, refill as they
free.

generate(model, prompts, Sampling(n=...), ...) -> list[Sample], prompt-major (prompt i's n samples
contiguous). `Sampling` holds the settings; trainers and evaluate.py build one and pass it.

- KVCache: preallocated `(layers, slots, max_len, kv_heads, head_dim)` k and v, per-slot lengths
  (int32). The slot count comes from a token budget (`max_cache_tokens`), not from the prompts.
- Prefill: the prompts being admitted are packed (no padding) and run once each; every layer
  writes a prompt's k/v straight into all the slots of its samples (a group of n shares one pass).
- Decode: one token for every occupied slot per step, each at its own position. A finished slot is
  refilled from the queue (continuous batching), so a long tail does not idle the batch. Free
  slots always take the next waiting samples, even part of a prompt's n (its remaining samples
  come in later, with a second prefill of that prompt): a cache a little short of a whole group
  never sits half empty waiting for one.
- Sampling: temperature (0 = greedy), top-k, top-p, as small pure functions. Randomness is one
  uniform number per (completion, step) from a counter-based hash of (seed, prompt index, sample
  index, step): a completion is the same whatever the batch, slot count or cache budget, with no
  per-row generator objects (which would cost one kernel launch per row per step).
- Attention over the cache: flash-attn's `flash_attn_with_kvcache` (in-place append, per-slot
  `cache_seqlens`) when `model.use_flash` says so, else SDPA with an explicit length mask. What
  one forward writes and reads (`Prefill`, `Decode`) is a small record passed as the forward's
  `cache=` argument; the model calls its `attend`.
- Host syncs: exactly one per decode step, `tolist()` of the sampled tokens and log-probs, which
  are needed on the host to know which slots stopped. Lengths and positions are tracked on the host
  (they advance by one per step), so nothing else waits for the device.
- `Sample.logprobs` are log-probs of the sampled tokens under softmax(logits / temperature)
  (temperature 1 when greedy) before top-k/top-p filtering: the quantity the trainer recomputes.
"""
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
    scaled = logits / temperature
    probs = filter_logits(scaled, top_k, top_p).softmax(-1).double()
    cdf = probs.cumsum(-1)  # (B, V)
    target = (u * cdf[:, -1])[:, None]  # (B, 1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return tokens, F.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """k/v for `slots` sequences of up to `max_len` tokens, and the tokens stored per slot."""

    def __init__(self, cfg: M.ModelConfig, slots: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, slots, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lens = torch.zeros(slots, dtype=torch.int32, device=device)  # tokens stored per slot
        self.slots, self.max_len = slots, max_len


@dataclass
class Prefill:
    """One packed forward over the admitted prompts: each prompt token's k/v go to every slot of
    its samples (token src[i] of the packed batch -> slot[i], position pos[i])."""
    cache: KVCache
    cu_seqlens: torch.Tensor  # (P+1,) int32, the packed prompts
    max_seqlen: int
    slot: torch.Tensor  # (W,) destination slot of each write
    pos: torch.Tensor  # (W,) destination position
    src: torch.Tensor  # (W,) source row in the packed batch

    def attend(self, layer: int, q, k, v):
        self.cache.k[layer, self.slot, self.pos] = k[self.src]
        self.cache.v[layer, self.slot, self.pos] = v[self.src]
        return M.varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen)


@dataclass
class Decode:
    """One new token for each of `rows` (cache slots), appended after the `lens` tokens they hold;
    attention reads cache positions [0, longest)."""
    cache: KVCache
    rows: torch.Tensor  # (B,) int32 slots
    lens: torch.Tensor  # (B,) int32 tokens already cached = the new token's position
    longest: int
    span: slice | None  # the rows as a slice when contiguous (no gather copy)

    def attend(self, layer: int, q, k, v):  # q (B, H, D): one new token per row
        cache = self.cache
        if M.use_flash(q):
            out = M.FLASH.flash_attn_with_kvcache(
                q[:, None], cache.k[layer], cache.v[layer], k[:, None], v[:, None],
                cache_seqlens=self.lens, cache_batch_idx=self.rows, causal=True)  # appends k/v
            return out[:, 0]
        rows, lens = self.rows.long(), self.lens.long()
        cache.k[layer, rows, lens] = k
        cache.v[layer, rows, lens] = v
        sel = rows if self.span is None else self.span
        kc = cache.k[layer, sel, :self.longest].transpose(1, 2)  # (B, Hkv, L, D)
        vc = cache.v[layer, sel, :self.longest].transpose(1, 2)  # (B, Hkv, L, D)
        valid = torch.arange(self.longest, device=q.device)[None, :] <= lens[:, None]  # (B, L)
        out = F.scaled_dot_product_attention(q[:, :, None], kc, vc, attn_mask=valid[:, None, None],
                                             enable_gqa=True)  # (B, H, 1, D)
        return out[:, :, 0]


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
        self.tokens = {}  # completion -> response ids
        self.logps = {}
        self.done = {}  # completion -> finish reason
        self.seed, self.prompt_offset = seed, prompt_offset

    def admit(self):
        """Take waiting completions, in order, into every free slot (part of a group if need be)."""
        batch = []  # (prompt_idx, sample indices, slots)
        while self.queue and self.free:
            p, samples = self.queue[0]
            take = min(len(samples), len(self.free))
            slots = [self.free.pop(0) for _ in range(take)]
            batch.append((p, samples[:take], slots))
            if take == len(samples):
                self.queue.pop(0)
            else:
                self.queue[0] = (p, samples[take:])
        return batch


def _prefill(model, run: _Run, batch):
    """One packed forward over the admitted prompts; returns each new slot's next-token logits."""
    dev = run.device
    ids, pos, cu, max_seqlen = M.pack([run.prompts[p] for p, _, _ in batch], dev)
    # One (prompt, slot) pair per admitted sample: every prompt token goes to each of its slots.
    pair_prompt = torch.tensor([i for i, (_, _, slots) in enumerate(batch) for _ in slots],
                               device=dev)
    pair_slot = torch.tensor([s for _, _, slots in batch for s in slots], device=dev)
    pair_len = cu.diff().long()[pair_prompt]  # (pairs,)
    pair_of_tok = torch.repeat_interleave(torch.arange(len(pair_slot), device=dev), pair_len)
    pair_start = pair_len.cumsum(0) - pair_len  # (pairs,) first token of each pair
    offset = torch.arange(len(pair_of_tok), device=dev) - pair_start[pair_of_tok]
    src = cu[:-1].long()[pair_prompt][pair_of_tok] + offset  # (tokens,) index into the packed batch
    writes = Prefill(run.cache, cu, max_seqlen, pair_slot[pair_of_tok], offset, src)
    logits = model(ids, pos, cu, max_seqlen, cache=writes, select=cu[1:].long() - 1)  # (P, V)
    run.cache.lens[pair_slot] = pair_len.int()
    for p, samples, slots in batch:
        for s, j in zip(slots, samples):
            run.slot_of[s] = (p, j)
            run.tokens[(p, j)], run.logps[(p, j)] = [], []
    return pair_slot.tolist(), logits[pair_prompt]  # (new slots, V)


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
    max_len = max(len(p) for p in prompts) + max_new_tokens
    slots = min(sampling.max_cache_tokens // max_len, n * len(prompts))
    if slots < 1:
        raise ValueError(f"max_cache_tokens={sampling.max_cache_tokens} cannot hold one sequence "
                         f"of {max_len} tokens (longest prompt + max_new_tokens)")
    embed = model.model.embed_tokens.weight
    device, dtype = embed.device, embed.dtype
    run = _Run(prompts, n, KVCache(model.config, slots, max_len, device, dtype), sampling.seed,
               prompt_offset, device)
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
            del run.slot_of[s], last[s]
            run.free.append(s)
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
    rows = torch.tensor(slots, dtype=torch.int32, device=run.device)
    lens = run.cache.lens[rows.long()]  # (B,) tokens already cached = the new token's position
    longest = max(len(run.prompts[p]) + len(run.tokens[(p, j)])
                  for p, j in map(run.slot_of.get, slots))
    ids = torch.tensor([last[s] for s in slots], device=run.device)
    span = slice(slots[0], slots[-1] + 1) if slots[-1] - slots[0] + 1 == len(slots) else None
    logits = model(ids, lens.long(), cache=Decode(run.cache, rows, lens, longest, span))  # (B, V)
    run.cache.lens[rows.long()] += 1
    return logits
