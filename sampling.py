"""Token sampling: what to sample (`Sampling`: n, length, temperature, top-k/p, seed, cache
budget; the stop tokens, `stop_ids_for`), what comes back (`Sample`, recorded token by token in
`Completions` with the progress bar), and small pure functions that pick the tokens, which the
sampler (rollout.py) calls once per decode step on every row.

- Random streams: one uniform number per (completion, step) from a counter-based hash of (seed,
  prompt index, sample index, step) (`completion_keys`, `uniforms`): a completion's tokens are
  the same whatever the batch, bucket, cache budget or preemption, with no per-row generators.
- `sample_rows`: a decode step's tokens, log-probs and stop flags in one tensor (one read).
- `sample_tokens`: temperature (0 = greedy), top-k and top-p (`filter_logits`), then the token by
  inverse CDF (`inverse_cdf`: float64 sums without a float64 (B, V) cumsum). The log-prob it
  returns is the sampled token's under softmax(logits / temperature) (temperature 1 when
  greedy) before top-k/top-p filtering: the quantity the trainer recomputes.
"""
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class Sampling:
    """How to sample: n completions per prompt of at most max_new_tokens tokens, at temperature
    (0 = greedy) with top-k / top-p filtering; `seed` keys the random streams; the KV cache holds
    at most max_cache_tokens tokens (fewer concurrent sequences, the same samples); on CUDA
    decode steps replay CUDA graphs unless cuda_graphs is False."""
    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_cache_tokens: int = 2**18
    cuda_graphs: bool = True


@dataclass
class Sample:
    prompt_idx: int
    sample_idx: int
    prompt_ids: list[int]
    response_ids: list[int]  # the stop token included when one ended it
    logprobs: list[float]  # sampler log-prob of each response token
    finish_reason: str  # "stop" or "length"


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


def check_inputs(prompts, n, stop_ids, vocab, max_new_tokens):
    """What generate refuses, naming the prompt or the ids, before anything runs."""
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


class Completions:
    """Every completion's tokens, log-probs and finish reason as they come, and the progress bar,
    whichever decode path runs them."""

    def __init__(self, prompts, n: int, max_new_tokens: int, progress: bool):
        self.prompts, self.max_new_tokens = prompts, max_new_tokens
        self.tokens = {(p, j): [] for p in range(len(prompts)) for j in range(n)}
        self.logps = {c: [] for c in self.tokens}
        self.done = {}  # completion -> finish reason
        # Progress in tokens, so that the bar moves with every decode step (a long completion
        # takes minutes on a CPU): the total is the most tokens the samples can take, less the
        # budget a completion leaves unused when it stops. In a log file (stderr not a terminal)
        # every redraw stays: there, at most one each 30 s.
        self.bar = tqdm(total=len(self.tokens) * max_new_tokens, desc="generate", unit="tok",
                        disable=not progress, leave=False,
                        mininterval=0.1 if sys.stderr.isatty() else 30)

    def add(self, c, token: int, logp: float, stop: bool) -> bool:
        """Record a sampled token; True when it ends the completion."""
        self.tokens[c].append(token)
        self.logps[c].append(logp)
        if not stop and len(self.tokens[c]) < self.max_new_tokens:
            return False
        self.done[c] = "stop" if stop else "length"
        self.bar.total -= self.max_new_tokens - len(self.tokens[c])
        self.bar.set_postfix_str(f"{len(self.done)}/{len(self.tokens)} done", refresh=False)
        return True

    def samples(self) -> list[Sample]:
        self.bar.close()
        return [Sample(p, j, list(self.prompts[p]), self.tokens[(p, j)], self.logps[(p, j)],
                       self.done[(p, j)]) for p, j in self.tokens]


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
    if top_k > 0 or top_p < 1.0:  # 0 outside the kept set (no exp of -inf: slow on CPU)
        weights = weights.masked_fill_(filter_logits(scaled, top_k, top_p) == float("-inf"), 0)
    tokens = inverse_cdf(weights, u)
    return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_norm


def sample_rows(logits, keys, steps, sampling: Sampling, stops):
    """One decode step's sampling as `sampling` says, all on the device: each row's token from its
    stream `keys` (B,) at `steps` (B,), its log-prob, and whether it is one of `stops` (S,), as
    (B, 3) float64 (token ids are exact in float64): what the host reads, once."""
    tokens, logps = sample_tokens(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                                  uniforms(keys, steps))
    stop = (tokens[:, None] == stops).any(-1)
    return torch.stack([tokens.double(), logps.double(), stop.double()], -1)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The first token of each row whose float64 cumulative weight exceeds u * total weight.
    weights (B, V) >= 0, u (B,) -> (B,) int64. Two levels instead of a float64 (B, V) cumsum:
    float64 sums of `block`-token blocks pick the block, then that block's cumsum the token."""
    b, v = weights.shape
    full = v // block * block
    # float32 block sums (a float64 sum would convert all of weights first)
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
