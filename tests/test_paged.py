"""The paged engine (rollout.Engine, kvcache.py), run on the CPU by emptying rollout.CPU_DECODE:
exact greedy decoding, log-probs of a training forward, the CPU path's samples, shared prompt
blocks, running out of blocks, bucket padding, and the paged kernels through their doubles."""
import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import kvcache
import model as M
import rollout as R
from test_rollout import PROMPTS, gen, training_logprobs
from tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_tiny_checkpoint(str(root / arch), arch, seed=3)
            for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def llama(ckpts):
    return M.load_model(ckpts["llama"]).eval()


@pytest.fixture
def paged(monkeypatch):
    """The paged engine on the CPU (its gather kernel), in blocks of 4 tokens; returns the
    engines built, to look into."""
    return use_paged_engine(monkeypatch)


def use_paged_engine(mp) -> list:
    """Through `mp` (a MonkeyPatch): the paged engine on the CPU in blocks of 4 tokens, each
    engine built appended to the list returned."""
    mp.setattr(R, "CPU_DECODE", set())
    mp.setattr(kvcache, "GATHER_BLOCK", 4)
    engines, real = [], R.Engine.__init__

    def record(self, *a, **k):
        real(self, *a, **k)
        engines.append(self)
    mp.setattr(R.Engine, "__init__", record)
    return engines


def same(a, b, atol=1e-5):
    assert [(s.prompt_idx, s.sample_idx, s.response_ids, s.finish_reason) for s in a] == \
           [(s.prompt_idx, s.sample_idx, s.response_ids, s.finish_reason) for s in b]
    for x, y in zip(a, b):
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol)


def test_block_pool_hands_out_shares_and_takes_back():
    cfg = M.ModelConfig(arch="llama", vocab_size=16, hidden_size=8, intermediate_size=16,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=3, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
                        tie_word_embeddings=False, qkv_bias=False, o_bias=False)
    pool = kvcache.BlockPool(cfg, blocks=5, block_size=4, device="cpu", dtype=torch.float32)
    assert pool.nbytes == 2 * 2 * 5 * 4 * 2 * 3 * 4
    a = pool.take(2)
    assert a == [1, 2] and 0 not in pool.free  # block 0: padding rows' only
    pool.hold(a)
    pool.drop(a)
    assert pool.free == [4, 3]  # still held once
    pool.k[:, 2] = 7.0
    b = pool.take(1)
    pool.copy([2], b)
    assert torch.equal(pool.k[:, b[0]], pool.k[:, 2]) and pool.slots([2, 3], 3, 6) == [11, 12, 13]
    pool.drop(a + b)
    assert sorted(pool.free) == [1, 2, 3, 4]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_paged_greedy_equals_transformers_generate(ckpts, arch, paged):
    m = M.load_model(ckpts[arch])
    hf = AutoModelForCausalLM.from_pretrained(ckpts[arch], dtype=torch.float32).eval()
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    hf.generation_config.eos_token_id = None
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                      pad_token_id=0)[:, width:]
    out = gen(m, PROMPTS, max_new_tokens=12, temperature=0, stop_ids=[])
    assert paged and paged[0].kernel == "gather"
    assert [s.response_ids for s in out] == ref.tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_paged_logprobs_equal_training_logprobs_and_the_cpu_path(llama, paged, temperature):
    kw = dict(n=3, max_new_tokens=9, temperature=temperature, top_p=0.9, seed=5,
              stop_ids=list(range(3, 300, 9)))
    out = gen(llama, PROMPTS, **kw)
    assert paged
    for s, ref in zip(out, training_logprobs(llama, out, temperature)):
        assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-5)
    R.CPU_DECODE.add("cpu")
    same(out, gen(llama, PROMPTS, **kw))
    assert any(s.finish_reason == "stop" for s in out)


def test_a_group_shares_its_prompt_blocks(llama, paged, monkeypatch):
    """n = 4: each prompt is prefilled once, its full blocks held by the entry and every sample
    reading it, its last, part-filled block copied for all but the first."""
    prefilled, held = [], []
    real_prefill, real_step = R.Engine.prefill, R.Engine.step
    monkeypatch.setattr(R.Engine, "prefill", lambda self, fresh: prefilled.extend(
        len(ctx) for _, _, ctx in fresh) or real_prefill(self, fresh))

    def step(self):
        if not held:
            entry = self.entries[2]  # PROMPTS[2]: 11 tokens, blocks of 4: 2 full, 1 part
            held.append([self.pool.refs[b] for b in entry.blocks])
        return real_step(self)
    monkeypatch.setattr(R.Engine, "step", step)
    out = gen(llama, PROMPTS, n=4, max_new_tokens=6, seed=2)
    assert sorted(prefilled) == sorted(map(len, PROMPTS))
    assert held == [[5, 5, 2]]  # entry + 4 readers; entry + the first reader
    R.CPU_DECODE.add("cpu")
    same(out, gen(llama, PROMPTS, n=4, max_new_tokens=6, seed=2))


def test_running_out_of_blocks_preempts_and_recomputes(llama, paged):
    """A pool of 8 blocks (7 usable) for 16 samples that grow to 5 blocks each: admission by
    free blocks, then steps that need more blocks than are free preempt the newest rows, which
    come back prefilled with what they had sampled; the samples are a large pool's."""
    kw = dict(n=4, max_new_tokens=9, temperature=1.0, seed=7, stop_ids=[])
    roomy = gen(llama, PROMPTS, **kw)
    tight = gen(llama, PROMPTS, max_cache_tokens=8 * 4, **kw)
    assert paged[1].preempted > 0 and len(paged[1].pool.free) == 7
    same(roomy, tight)
    with pytest.raises(ValueError, match="cannot hold one sequence of 20 tokens"):
        gen(llama, PROMPTS, max_cache_tokens=5 * 4, **kw)


def test_bucket_padding_changes_nothing(llama, paged, monkeypatch):
    """Rows padded to a bucket of 16 (padded rows write to block 0 and are dropped) give exactly
    the unpadded steps' tokens and log-probs."""
    kw = dict(n=3, max_new_tokens=7, temperature=1.0, seed=9, stop_ids=list(range(3, 300, 11)))
    monkeypatch.setattr(R, "BUCKETS", tuple(range(1, 513)))  # every size its own bucket
    exact = gen(llama, PROMPTS, **kw)
    sizes = []
    real = R.Engine.decode_step
    monkeypatch.setattr(R.Engine, "decode_step",
                        lambda self, b, w: sizes.append(b) or real(self, b, w))
    monkeypatch.setattr(R, "BUCKETS", (16, 512))
    padded = gen(llama, PROMPTS, **kw)
    assert set(sizes) == {16}
    same(exact, padded, atol=0)


@pytest.mark.parametrize("kernel", ["varlen", "flash-attn"])
def test_paged_kernels_through_their_doubles(llama, paged, monkeypatch, kernel):
    """torch's varlen_attn(seqused_k, block_table) (2.12+) and flash-attn's flash_attn_with_kvcache
    (block_table), pages of 256, give the gather kernel's samples."""
    import flash_attn_double
    import varlen_attn_double
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, seed=3, stop_ids=[])
    ref = gen(llama, PROMPTS[:2], **kw)
    if kernel == "varlen":
        monkeypatch.setattr(M, "VARLEN", varlen_attn_double)
    else:
        monkeypatch.setattr(M, "FLASH", flash_attn_double)
    out = gen(llama, PROMPTS[:2], **kw)
    assert paged[-1].kernel == kernel and paged[-1].pool.block_size == 256
    same(ref, out)


def test_cuda_graph_double_has_graph_semantics():
    """Replay recomputes from the captured tensors' memory; Python values are frozen at capture;
    a host sync inside capture raises."""
    import cuda_graph_double as G
    x, out, scale = torch.ones(3), torch.zeros(3), 2.0
    g = G.CUDAGraph()
    with G.graph(g):
        out.copy_(x * scale + 1)
    x.fill_(5.0)
    scale = 10.0  # not seen by the replay
    g.replay()
    assert out.tolist() == [11.0] * 3
    fresh = torch.full((3,), 7.0)  # a tensor made after capture is not what the graph reads
    x = fresh
    g.replay()
    assert out.tolist() == [11.0] * 3
    with pytest.raises(RuntimeError, match="host sync"):
        with G.graph(G.CUDAGraph()):
            (x * 2).sum().item()


def test_decode_steps_replayed_from_graphs_equal_eager(llama, paged, monkeypatch):
    """CUDA graphs (through the double) per (bucket, width), captured on second use and replayed:
    the samples are exactly the eager steps', as rows finish and the bucket shrinks."""
    import cuda_graph_double as G
    kw = dict(n=3, max_new_tokens=9, temperature=1.0, seed=9, stop_ids=list(range(3, 300, 11)))
    eager = gen(llama, PROMPTS, **kw)
    monkeypatch.setattr(R, "GRAPH_DEVICES", {"cpu"})
    monkeypatch.setattr(R, "GRAPHS", G)
    monkeypatch.setattr(G, "captures", 0)
    monkeypatch.setattr(G, "replays", 0)
    steps = []
    real = R.Engine.decode
    monkeypatch.setattr(R.Engine, "decode", lambda self, rows: steps.append(len(rows))
                        or real(self, rows))
    graphed = gen(llama, PROMPTS, **kw)
    same(eager, graphed, atol=0)
    engine = paged[-1]
    assert G.captures == len(engine.graphs) >= 2 and len({b for b, _ in engine.graphs}) >= 2
    assert G.replays == len(steps) - len(engine.seen)  # each shape's first step runs eager
    assert len(engine.seen) > len(engine.graphs), "no shape was used only once"


def test_bf16_paged_logprobs_near_training_logprobs(ckpts, paged):
    """bf16 (the GPU's dtype) through the paged engine: the sampler's log-probs are the bf16
    training forward's up to bf16 rounding, as on the CPU path."""
    m = M.load_model(ckpts["llama"], dtype=torch.bfloat16).eval()
    out = gen(m, PROMPTS, n=3, max_new_tokens=9, seed=5, stop_ids=[])
    assert paged[-1].pool.k.dtype == torch.bfloat16
    with torch.no_grad():
        refs = training_logprobs(m, out)
    for s, ref in zip(out, refs):
        assert torch.allclose(torch.tensor(s.logprobs), ref.float(), atol=1e-2)


def test_paged_samples_do_not_depend_on_the_batching(llama, paged):
    """A completion is the same whatever else is sampled with it: the whole batch at once, a
    slice of it with its prompt offset (one rank of several), or a row or two at a time; another
    seed gives other samples."""
    kw = dict(n=2, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=11, stop_ids=[])
    whole = gen(llama, PROMPTS, **kw)
    halves = gen(llama, PROMPTS[:2], **kw) + gen(llama, PROMPTS[2:], prompt_offset=2, **kw)
    for s in halves[4:]:
        s.prompt_idx += 2
    few = gen(llama, PROMPTS, max_cache_tokens=9 * 4, **kw)  # 8 blocks: one or two sequences
    same(whole, halves)
    same(whole, few)
    other = gen(llama, PROMPTS, **dict(kw, seed=12))
    assert [s.response_ids for s in other] != [s.response_ids for s in whole]


def test_host_buffer_unchanged_while_its_copy_may_be_in_flight(llama, paged, monkeypatch):
    """On CUDA the step's inputs go to the device by an asynchronous copy from pinned memory,
    which may read the host buffer until the step's results are read: nothing may write the rows
    it copies (padding included) between the copy and that read. Checked with admissions joining
    mid-run (their rows inside the previous bucket's padding) and rows finishing."""
    copied, checked = {}, []
    real_decode, real_step = R.Engine.decode, R.Engine.step

    def decode(self, rows):
        out = real_decode(self, rows)
        b = next(size for size in R.BUCKETS if size >= len(rows))
        copied["rows"] = self.host[:b].clone()  # what the copy read (nothing writes after it)
        return out

    def step(self):
        copied.clear()
        result = real_step(self)
        if copied:  # generate reads the results next: the copy is done only then
            checked.append(torch.equal(self.host[:len(copied["rows"])], copied["rows"]))
        return result
    monkeypatch.setattr(R.Engine, "decode", decode)
    monkeypatch.setattr(R.Engine, "step", step)
    gen(llama, PROMPTS, n=5, max_new_tokens=8, seed=1, stop_ids=list(range(3, 300, 7)),
        max_cache_tokens=12 * 4)
    assert len(checked) > 5 and all(checked), checked


def check_blocks(engine):
    """The pool's books balance: a block's count is the entries and rows holding it, a free block
    is held by none and listed once, and block 0 (padding rows') is never handed out."""
    pool, held = engine.pool, collections.Counter()
    for entry in engine.entries.values():
        held.update(entry.blocks)
        assert entry.readers == sum(engine.entries.get(r.key) is entry for r in engine.rows)
    for row in engine.rows:
        held.update(row.table)
    assert all(pool.refs[b] == held[b] for b in range(len(pool.refs))), (pool.refs, held)
    assert len(set(pool.free)) == len(pool.free) and not any(held[b] for b in pool.free)
    assert 0 not in held and 0 not in pool.free
    assert sorted(pool.free + list(held)) == list(range(1, len(pool.refs)))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 4), prompts=st.lists(st.integers(1, 13), min_size=1, max_size=4),
       spare=st.integers(0, 6), stop_every=st.integers(3, 40), seed=st.integers(0, 99))
def test_block_books_balance_through_admission_sharing_and_preemption(
        llama, n, prompts, spare, stop_every, seed):
    """Random groups, prompt lengths, pools from one longest sequence (and block 0) up to 6
    blocks more, and stop tokens: before every step and at the end the pool's counts match its
    holders, and the samples are those of a pool that holds them all."""
    run_books(llama, n, prompts, spare, stop_every, seed)


def test_block_books_balance_when_blocks_run_out(llama):
    """A workload of the test above that preempts rows (a pool of one longest sequence and one
    block more, groups of four)."""
    engines = run_books(llama, 4, [13, 9, 2, 11], 1, 300, 5)
    assert engines[1].preempted > 0


def run_books(llama, n, prompts, spare, stop_every, seed):
    ids = [[(7 * i + 3 * j) % 300 + 1 for j in range(length)] for i, length in enumerate(prompts)]
    kw = dict(n=n, max_new_tokens=10, seed=seed, stop_ids=list(range(3, 300, stop_every)))
    longest = -(-(max(prompts) + 10) // 4)  # blocks of 4
    real_step = R.Engine.step

    def step(self):
        check_blocks(self)
        return real_step(self)
    with pytest.MonkeyPatch.context() as mp:  # (hypothesis: no function-scoped fixtures)
        engines = use_paged_engine(mp)
        mp.setattr(R.Engine, "step", step)
        roomy = gen(llama, ids, **kw)
        tight = gen(llama, ids, max_cache_tokens=(longest + 1 + spare) * 4, **kw)
    for engine in engines:
        check_blocks(engine)
        assert not engine.rows and not engine.entries
    same(roomy, tight)
    return engines
