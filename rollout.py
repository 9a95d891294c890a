"""Batched KV-cache sampler: prefill once per prompt, decode all slots together, refill as they
free.

generate(model, prompts, Sampling(n=...), ...) -> list[Sample], prompt-major (prompt i's n samples
contiguous). `Sampling` holds the settings; trainers and evaluate.py build one and pass it.

- KV cache (kvcache.py): preallocated for a slot count set by a token budget
  (`max_cache_tokens`); with n > 1 (and no flash-attn) a group's prompt is held once.
- Prefill: the admitted prompts are packed (no padding) and run once each; every layer writes a
  prompt's k/v into the cache once per prompt (flash-attn's layout: once per slot).
- Decode: one token for every occupied slot per step, each at its own position. A finished slot is
  refilled from the queue (continuous batching). Free slots always take the next waiting samples,
  even part of a prompt's n. The rest come in later without a prefill while some of the prompt's
  samples still decode: they read its entry, or copy its k/v from a sibling slot (a prompt in
  each slot), and sample their first token from the logits kept from its prefill; else (all its
  samples done) the prompt is prefilled again.
  Slots and entries go to the shortest prompts first, so neighbours hold similar lengths and a
  decode step's reads (kvcache.decode_segments) run little past a row's end.
- Sampling (sampling.py): temperature (0 = greedy), top-k, top-p; one uniform number per
  (completion, step) from a counter-based hash of (seed, prompt index, sample index, step) picks
  the token by inverse CDF: a completion is the same whatever the batch, slot count or cache
  budget, with no per-row generator objects.
- Host syncs: exactly one per decode step, `tolist()` of the sampled tokens and log-probs. Lengths
  and positions are tracked on the host (they advance by one per step).
- `Sample.logprobs` are log-probs of the sampled tokens under softmax(logits / temperature)
  (temperature 1 when greedy) before top-k/top-p filtering: the quantity the trainer recomputes.
"""
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

import model as M
from kvcache import KVCache, Decode, Prefill, decode_segments
from sampling import completion_keys, sample_tokens, uniforms


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


class _Engine:
    """Host-side bookkeeping for one generate() call."""

    def __init__(self, prompts, n, cache: KVCache, seed: int, prompt_offset: int, device):
        self.prompts, self.cache, self.device = prompts, cache, device
        self.queue = [(p, list(range(n))) for p in range(len(prompts))]  # waiting, prompt order
        self.slot_of = {}  # slot -> completion (prompt_idx, sample_idx)
        self.free = list(range(cache.slots))
        self.entry_of = {}  # slot -> the entry holding its prompt (a shared cache)
        self.entry_rows = {}  # entry -> how many occupied slots read it
        self.free_entries = list(range(cache.slots))
        self.live = {}  # prompt -> its entry, while a slot reads it
        self.first_logits = {}  # prompt -> the logits after it (V,), while its entry lives
        self.tokens = {}  # completion -> response ids
        self.logps = {}
        self.done = {}  # completion -> finish reason
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
            engine.tokens[(p, j)], engine.logps[(p, j)] = [], []
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
    engine = _Engine(prompts, n, cache, sampling.seed, prompt_offset, device)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    last = {}  # slot -> last sampled token, fed back next step
    # Progress in tokens, so that the bar moves with every decode step (a long completion takes
    # minutes on a CPU): the total is the most tokens the samples can take, less the budget a
    # completion leaves unused when it stops. In a log file (stderr not a terminal) every redraw
    # stays: there, at most one each 30 s.
    bar = tqdm(total=n * len(prompts) * max_new_tokens, desc="generate", unit="tok",
               disable=not progress, leave=False, mininterval=0.1 if sys.stderr.isatty() else 30)
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
        if finished:  # no redraw of its own: the update below draws at most each mininterval
            unused = [max_new_tokens - len(engine.tokens[engine.slot_of[s]]) for s in finished]
            bar.total -= sum(unused)
            bar.set_postfix_str(f"{len(engine.done)}/{n * len(prompts)} done", refresh=False)
        bar.update(len(slots_now))  # a token for every slot
        for s in finished:
            engine.release(s)
            del last[s]
        slots_now = sorted(engine.slot_of)
        if slots_now:
            logits = _decode(model, engine, slots_now, last)
        else:
            logits = None
    bar.close()
    del engine.cache  # the only reference: the cache memory is freed here
    return [Sample(p, j, list(prompts[p]), engine.tokens[(p, j)], engine.logps[(p, j)],
                   engine.done[(p, j)]) for p in range(len(prompts)) for j in range(n)]


def _sample_step(engine: _Engine, slots, logits, stops, last, sampling: Sampling):
    """Sample the next token of every slot in `slots` (rows of `logits`); return finished slots."""
    comps = [engine.slot_of[s] for s in slots]
    pidx = torch.tensor([c[0] for c in comps], device=engine.device)
    sidx = torch.tensor([c[1] for c in comps], device=engine.device)
    steps = torch.tensor([len(engine.tokens[c]) for c in comps], device=engine.device)
    u = uniforms(completion_keys(engine.seed, pidx + engine.prompt_offset, sidx), steps)
    tokens, logps = sample_tokens(logits, sampling.temperature, sampling.top_k, sampling.top_p, u)
    is_stop = torch.isin(tokens, stops)
    # The one host sync of the step: the tokens decide which slots are done.
    tokens, logps, is_stop = tokens.tolist(), logps.tolist(), is_stop.tolist()
    finished = []
    for s, c, t, lp, stop in zip(slots, comps, tokens, logps, is_stop):
        engine.tokens[c].append(t)
        engine.logps[c].append(lp)
        last[s] = t
        if stop or len(engine.tokens[c]) >= sampling.max_new_tokens:
            engine.done[c] = "stop" if stop else "length"
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
    if cache.flash:
        return model(ids, lens.long(), attention=Decode(cache, rows, lens))  # (B, V)
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

