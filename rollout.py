"""The sampler: generate(model, prompts, Sampling(n=...)) -> list[Sample], prompt-major (prompt
i's n samples contiguous). Trainers and evaluate.py build a `Sampling` and pass it.

The engine, top to bottom: a queue of waiting completions; `admit` takes as many as the KV cache
(kvcache.BlockPool: fixed-size blocks from one pool) has free blocks for, and prefills their
prompts packed, a group's prompt once (its samples share its blocks); `step` gives every running
completion one token; the host reads the step's tokens, log-probs and stop flags (its one read of
the device) and `release`s the finished ones' blocks for the next `admit` (continuous batching).
When a step needs more blocks than are free, the newest completions are preempted: they wait
again, and are prefilled with what they had sampled.
- The decode step (`Engine.decode`) reads its inputs (last tokens, positions, random-stream keys
  and steps, block tables) from a static device buffer, filled by one copy from pinned memory;
  rows are padded to a batch-size bucket (padded rows write to block 0, and are not read); the
  forward, the sampling and the stop test write a static output buffer. On CUDA each (bucket,
  width) is captured as a CUDA graph on its second use, then replayed (`cuda_graphs=False`:
  eager); graphs live for one generate call (the weights may move between calls).
- Sampling (sampling.py): temperature (0 = greedy), top-k, top-p, by one uniform number per
  (completion, step) from a counter-based hash of (seed, prompt, sample, step): a completion is
  the same whatever the batch, bucket, cache budget or preemption. `Sample.logprobs` are under
  softmax(logits / temperature) (1 when greedy) before filtering: what the trainer recomputes.
- The CPU runs decode_cpu.py's path instead (a head-major cache read in segments: faster there,
  bench/README.md), behind the one switch CPU_DECODE; both record into `Completions`.
"""
from dataclasses import dataclass

import torch

import decode_cpu
import model as M
from kvcache import BlockPool, PagedDecode, PagedPrefill, block_size, decode_kernel, pool_blocks
# Sampling, Sample and stop_ids_for live in sampling.py; callers take them from here too
from sampling import (Completions, Sample, Sampling, check_inputs, completion_keys,  # noqa: F401
                      sample_rows, stop_ids_for)

# Device types that run decode_cpu.py's path instead of the engine below
CPU_DECODE = {"cpu"}
# Where decode steps are captured as graphs, and the API that captures them (tests: a double)
GRAPH_DEVICES, GRAPHS = {"cuda"}, torch.cuda
# Batch-size buckets of a decode step (one CUDA graph each): the rows are padded to the next one
BUCKETS = (1, 2, 4, 8) + tuple(range(16, 513, 16))


@torch.no_grad()
def generate(model, prompts: list[list[int]], sampling: Sampling = Sampling(), *, stop_ids=None,
             prompt_offset: int = 0, progress: bool = True) -> list[Sample]:
    """Sample sampling.n completions per prompt; see the module docstring. Random streams are
    keyed by prompt_offset + prompt index, so a caller holding a slice of a larger batch (one rank
    of several) draws exactly what a single caller with the whole batch would."""
    vocab = model.config.vocab_size
    stop_ids = sorted(set(stop_ids_for(model) if stop_ids is None else stop_ids))
    check_inputs(prompts, sampling.n, stop_ids, vocab, sampling.max_new_tokens)
    book = Completions(prompts, sampling.n, sampling.max_new_tokens, progress)
    if model.model.embed_tokens.weight.device.type in CPU_DECODE:
        decode_cpu.generate(model, prompts, sampling, stop_ids, prompt_offset, book)
        return book.samples()
    engine = Engine(model, prompts, sampling, stop_ids, prompt_offset, book)
    while True:
        engine.admit()
        if not engine.rows:
            break
        rows, out = engine.step()
        for row, (token, logp, stop) in zip(rows, out.tolist()):  # the step's one read
            if book.add(row.completion, int(token), logp, bool(stop)):
                engine.release(row)
            else:
                row.last = int(token)
        book.bar.update(len(rows))  # a token for every row
    del engine  # the cache and the graphs are freed here
    return book.samples()


@dataclass
class Entry:
    """A context in the cache (a prompt, or a preempted completion's prompt and tokens): its
    blocks, the logits after it, and how many rows read it."""
    blocks: list[int]
    length: int
    logits: torch.Tensor | None = None
    readers: int = 0


@dataclass
class Row:
    """A running completion: its blocks (the entry's full blocks shared, then its own), the tokens
    cached, and the token it feeds next (None before its first, sampled from the entry's logits)."""
    completion: tuple[int, int]
    key: object  # its entry's
    table: list[int]
    length: int
    stream: int  # its random stream's key
    order: int  # when it was admitted
    last: int | None = None
    lane: int = -1  # its row in the decode step's buffers, once it decodes
    last_lane: int = -1  # the row its blocks were last written to


class Engine:
    """The paged engine of one generate() call: queue, admit, prefill, step, release."""

    def __init__(self, model, prompts, sampling: Sampling, stop_ids, prompt_offset, book):
        embed = model.model.embed_tokens.weight
        self.model, self.prompts, self.sampling, self.book = model, prompts, sampling, book
        self.device = device = embed.device
        self.kernel = decode_kernel(device.type, embed.dtype)
        bs = block_size(self.kernel)
        longest = max(map(len, prompts)) + sampling.max_new_tokens
        self.width = -(-longest // bs)  # blocks of the longest sequence
        if sampling.max_cache_tokens // bs - 1 < self.width:  # (block 0: padding rows')
            raise ValueError(f"max_cache_tokens={sampling.max_cache_tokens} cannot hold one "
                             f"sequence of {longest} tokens (longest prompt + max_new_tokens) "
                             f"in blocks of {bs}, besides one block for padding")
        blocks = pool_blocks(sampling.max_cache_tokens, len(book.tokens), longest, bs)
        self.pool = BlockPool(model.config, blocks, bs, device, embed.dtype,
                              head_major=self.kernel == "gather")
        self.queue = [(p, list(range(sampling.n))) for p in range(len(prompts))]
        self.running: list[Row] = []  # decoding: running[i] is row i of the step's buffers
        self.new: list[Row] = []  # admitted: the first token comes from their entry's logits
        self.entries: dict[object, Entry] = {}  # prompt index (or a preempted completion) -> entry
        self.offset, self.preempted, self.admitted = prompt_offset, 0, 0
        self.most = min(BUCKETS[-1], len(self.book.tokens))  # rows decoding at once
        cuda = device.type == "cuda"
        # The decode step's inputs, a row each: last token, position, stream key, step, blocks
        # (a row's blocks written when it gains one or moves; the rest every step)
        self.host = torch.zeros(self.most, 4 + self.width, dtype=torch.long, pin_memory=cuda)
        self.inputs = torch.zeros_like(self.host, device=device)
        self.out = torch.zeros(self.most, 3, dtype=torch.float64, device=device)
        self.stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
        self.graphs = {} if device.type in GRAPH_DEVICES and sampling.cuda_graphs else None
        self.seen = set()  # (bucket, width) run once, not captured yet
        self.graph_pool = GRAPHS.graph_pool_handle() if self.graphs is not None else None

    @property
    def rows(self) -> list[Row]:
        return self.running + self.new

    def growing(self) -> int:
        """Blocks the next decode step takes: one for each decoding row whose blocks are full."""
        return sum(r.length == len(r.table) * self.pool.block_size for r in self.running)

    def admit(self):
        """Waiting completions, in order, while the free blocks (less those the running rows take
        this step) hold their context: a new entry's blocks, or, reading a live entry, a copy of
        its last, partly filled block. New entries are prefilled in one packed forward."""
        pool, bs = self.pool, self.pool.block_size
        room, fresh, copies = len(pool.free) - self.growing(), [], []
        while self.queue and len(self.running) + len(self.new) < self.most:
            p, samples = self.queue[0]
            c = (p, samples[0])
            key = c if self.book.tokens[c] else p  # a preempted completion: an entry of its own
            entry = self.entries.get(key)
            length = len(self.prompts[p]) + len(self.book.tokens[c])
            full, part = divmod(length, bs)
            need = full + (part > 0) if entry is None else int(part > 0)
            if need > room:
                break
            room -= need
            samples.pop(0)
            if not samples:
                self.queue.pop(0)
            if entry is None:  # its first reader takes its blocks, the last one included
                entry = self.entries[key] = Entry(pool.take(need), length)
                fresh.append((key, entry, self.prompts[p] + self.book.tokens[c]))
                table = list(entry.blocks)
            else:  # the full blocks shared, the last one copied (the row writes into it)
                table = entry.blocks[:full] + pool.take(int(part > 0))
                copies += [(entry.blocks[-1], table[-1])] if part else []
            pool.hold(table[:len(entry.blocks)] if entry.readers == 0 else table[:full])
            entry.readers += 1
            stream = completion_keys(self.sampling.seed, torch.tensor([p + self.offset]),
                                     torch.tensor([c[1]]))
            self.new.append(Row(c, key, table, length, int(stream), self.admitted))
            self.admitted += 1
        if fresh:
            self.prefill(fresh)
        if copies:
            pool.copy(*zip(*copies))

    def prefill(self, fresh):
        """One packed forward over the new entries' contexts, their k/v written to their blocks;
        each keeps the logits after it (its readers' first tokens)."""
        ids, pos, cu, max_seqlen = M.pack([ctx for _, _, ctx in fresh], self.device)
        slots = [s for _, e, _ in fresh for s in self.pool.slots(e.blocks, 0, e.length)]
        writes = PagedPrefill(self.pool, M.to_device(slots, self.device), cu, max_seqlen)
        logits = self.model(ids, pos, cu, max_seqlen, attention=writes, select=cu[1:].long() - 1)
        for (_, entry, _), row in zip(fresh, logits):
            entry.logits = row.clone()  # (a view would keep the whole batch's logits)

    def step(self):
        """One token for every running row: the decode step for those with a last token, the
        entry's logits sampled for the new ones. Returns the rows and (rows, 3) float64 on the
        device: token, log-prob, stop flag."""
        while self.growing() > len(self.pool.free):  # preempt the newest running row
            victim = max(self.running, key=lambda r: r.order)
            self.release(victim)
            self.queue.insert(0, (victim.completion[0], [victim.completion[1]]))
            self.preempted += 1
        rows, new = self.running + self.new, self.new
        parts = [self.decode(self.running)] if self.running else []
        if new:
            logits = torch.stack([self.entries[r.key].logits for r in new])
            keys, steps = (M.to_device(x, self.device) for x in
                           ([r.stream for r in new], [len(self.book.tokens[r.completion])
                                                      for r in new]))
            parts.append(sample_rows(logits, keys, steps, self.sampling, self.stops))
        for r in new:  # they decode from the next step on, in rows after the others (their
            r.lane = len(self.running)  # blocks written by that step: the copy of this one's
            self.running.append(r)  # inputs may still be reading the host buffer)
        self.new = []
        return rows, torch.cat(parts) if len(parts) > 1 else parts[0]

    def decode(self, rows: list[Row]):
        """The rows' inputs into the static buffers (padded to the bucket), then the decode step,
        replayed from its CUDA graph where there is one. Returns its outputs (rows, 3)."""
        bs = self.pool.block_size
        # The host buffer is written only from here to the copy below, and after the step's read
        # (release): in between, the asynchronous copy may still read it.
        for r in rows:
            if r.length == len(r.table) * bs:
                r.table += self.pool.take(1)
                self.host[r.lane, 3 + len(r.table)] = r.table[-1]
            if r.last_lane != r.lane:  # a new row, or moved: its blocks into its row
                self.host[r.lane, 4:] = torch.tensor(r.table + [0] * (self.width - len(r.table)))
                r.last_lane = r.lane
        b = next(size for size in BUCKETS if size >= len(rows))
        width = self.width  # the paged kernels read a row's blocks only up to its length
        if self.kernel == "gather":  # it reads all `width` blocks: as few as the rows need
            need = max(len(r.table) for r in rows)
            width = min(self.width, 1 << (need - 1).bit_length())
        self.host[:len(rows), :4] = torch.tensor([
            [r.last, r.length, r.stream, len(self.book.tokens[r.completion])] for r in rows])
        self.host[len(rows):b] = 0  # padding rows: position 0 of block 0
        self.inputs[:b].copy_(self.host[:b], non_blocking=True)
        for r in rows:
            r.length += 1
        if self.graphs is None:
            self.decode_step(b, width)
        else:
            self.replay(b, width)
        return self.out[:len(rows)]

    def decode_step(self, b: int, width: int):
        """The step itself, on the static buffers only (what a CUDA graph captures): the forward
        of rows [0, b), their next tokens sampled into self.out."""
        x = self.inputs[:b]
        ids, positions, keys, steps, table = x[:, 0], x[:, 1], x[:, 2], x[:, 3], x[:, 4:4 + width]
        attention = PagedDecode.build(self.pool, self.kernel, table, positions)
        logits = self.model(ids, positions, attention=attention)
        self.out[:b] = sample_rows(logits, keys, steps, self.sampling, self.stops)

    def replay(self, b: int, width: int):
        """The step from its CUDA graph: captured on its second use (a bucket and width used
        once, as rows finish or grow, is not worth a capture), then replayed."""
        graph = self.graphs.get((b, width))
        if graph is None and (b, width) not in self.seen:
            self.seen.add((b, width))
            return self.decode_step(b, width)
        if graph is None:  # warm up on a side stream (this step, for real), then capture
            stream = GRAPHS.Stream()
            stream.wait_stream(GRAPHS.current_stream())
            with GRAPHS.stream(stream):
                self.decode_step(b, width)
            GRAPHS.current_stream().wait_stream(stream)
            graph = self.graphs[(b, width)] = GRAPHS.CUDAGraph()
            with GRAPHS.graph(graph, pool=self.graph_pool, capture_error_mode="thread_local"):
                self.decode_step(b, width)
        graph.replay()

    def release(self, row: Row):
        """A finished (or preempted) row's blocks back to the pool, and its entry's once no row
        reads it. The last decoding row moves into its row of the buffers."""
        if row.lane >= 0:
            last = self.running.pop()
            if last is not row:  # (its blocks are written to its new row by the next step)
                last.lane, self.running[row.lane] = row.lane, last
        else:
            self.new.remove(row)
        self.pool.drop(row.table)
        entry = self.entries[row.key]
        entry.readers -= 1
        if not entry.readers:
            self.pool.drop(entry.blocks)
            del self.entries[row.key]
