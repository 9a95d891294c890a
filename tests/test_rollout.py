"""rollout.py and decode_cpu.py (the CPU path; test_paged.py: the paged engine): exact greedy decoding, cache == no cache, log-probs, reproducibility,
the cache layouts and decode segments."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import decode_cpu as D
import model as M
import rollout as R
from tiny import make_tiny_checkpoint

PROMPTS = [[5, 17, 33, 2, 9], [40], [7, 7, 7, 100, 250, 31, 8, 64, 12, 90, 11], [300, 1, 2]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_tiny_checkpoint(str(root / arch), arch, seed=3) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def llama(ckpts):
    return M.load_model(ckpts["llama"]).eval()


def gen(model, prompts, stop_ids=None, prompt_offset=0, progress=False, **sampling):
    """rollout.generate with the Sampling fields as keywords."""
    return R.generate(model, prompts, R.Sampling(**sampling), stop_ids=stop_ids,
                      prompt_offset=prompt_offset, progress=progress)


def greedy_uncached(m, prompt, steps):
    """Reference: a full forward over the whole sequence for every new token."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_transformers_generate(ckpts, arch):
    m = M.load_model(ckpts[arch])
    hf = AutoModelForCausalLM.from_pretrained(ckpts[arch], dtype=torch.float32).eval()
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    hf.generation_config.eos_token_id = None  # no stops on either side: 12 tokens each
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                      pad_token_id=0)[:, width:]
    out = gen(m, PROMPTS, max_new_tokens=12, temperature=0, stop_ids=[], progress=False)
    assert [s.response_ids for s in out] == ref.tolist()
    assert all(s.finish_reason == "length" and len(s.logprobs) == 12 for s in out)


def test_cached_equals_uncached(llama):
    out = gen(llama, PROMPTS, max_new_tokens=10, temperature=0, stop_ids=[], progress=False)
    assert [s.response_ids for s in out] == [greedy_uncached(llama, p, 10) for p in PROMPTS]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_training_logprobs(llama, temperature):
    out = gen(llama, PROMPTS, n=3, max_new_tokens=9, temperature=temperature, seed=5,
                     progress=False)
    seqs = [s.prompt_ids + s.response_ids for s in out]
    ids, pos, cu, mx = M.pack(seqs)
    logp, _ = llama(ids, pos, cu, mx, targets=torch.roll(ids, -1), temperature=temperature)
    for i, s in enumerate(out):
        start, end = int(cu[i]) + len(s.prompt_ids) - 1, int(cu[i + 1]) - 1
        assert torch.allclose(logp[start:end], torch.tensor(s.logprobs), atol=1e-4)


@pytest.mark.parametrize("n", [1, 3])
def test_bf16_sampler_logprobs_near_training_logprobs(ckpts, n):
    """bf16 head-major decode (the CPU path in bf16), the prompt in each slot (n = 1) or
    shared (n = 3): the sampler's log-probs are the bf16 training forward's up to bf16 rounding
    (measured 2e-3; fp32 agrees to 1e-6)."""
    m = M.load_model(ckpts["llama"], dtype=torch.bfloat16).eval()
    out = gen(m, PROMPTS, n=n, max_new_tokens=9, seed=5, stop_ids=[])
    with torch.no_grad():
        refs = training_logprobs(m, out)
    for s, ref in zip(out, refs):
        assert torch.allclose(torch.tensor(s.logprobs), ref.float(), atol=1e-2)


def test_same_seed_same_samples_whatever_the_batching(llama):
    kw = dict(n=4, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11, progress=False)
    many = gen(llama, PROMPTS, **kw)
    one_slot = gen(llama, PROMPTS, max_cache_tokens=19, **kw)  # 1 slot: 11 + 8 tokens
    few = gen(llama, PROMPTS, max_cache_tokens=19 * 3, **kw)  # 3 slots: groups split
    key = lambda samples: [(s.prompt_idx, s.sample_idx, s.response_ids) for s in samples]
    assert key(many) == key(one_slot) == key(few)
    assert [s.prompt_idx for s in many] == [i for i in range(4) for _ in range(4)]
    other = gen(llama, PROMPTS, **dict(kw, seed=12))
    assert key(other) != key(many)


def test_samples_of_a_prompt_are_independent(llama):
    out = gen(llama, [PROMPTS[0]], n=8, max_new_tokens=6, temperature=1.0, progress=False)
    assert len({tuple(s.response_ids) for s in out}) == 8


def test_stop_token_ends_completion(llama):
    greedy = gen(llama, PROMPTS, max_new_tokens=10, temperature=0, stop_ids=[],
                        progress=False)
    stop = greedy[0].response_ids[3]  # the 4th greedy token of prompt 0 becomes a stop id
    out = gen(llama, PROMPTS, max_new_tokens=10, temperature=0, stop_ids=[stop],
                     progress=False)
    for g, s in zip(greedy, out):
        cut = g.response_ids.index(stop) + 1 if stop in g.response_ids else len(g.response_ids)
        assert s.response_ids == g.response_ids[:cut]
        assert s.finish_reason == ("stop" if stop in g.response_ids else "length")
    assert out[0].finish_reason == "stop" and len(out[0].response_ids) <= 4


def test_default_stop_ids_come_from_config_and_tokenizer(ckpts):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpts["llama"])
    m = M.load_model(ckpts["llama"])
    ids = R.stop_ids_for(m, tok)
    assert tok.convert_tokens_to_ids("<|eot_id|>") in ids and tok.eos_token_id in ids


def training_logprobs(model, samples, temperature=1.0):
    """Log-probs of each sample's response tokens from one packed training forward."""
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    ids, pos, cu, mx = M.pack(seqs)
    logp, _ = model(ids, pos, cu, mx, targets=torch.roll(ids, -1), temperature=temperature)
    return [logp[int(cu[i]) + len(s.prompt_ids) - 1:int(cu[i + 1]) - 1]
            for i, s in enumerate(samples)]


def test_segmented_decode_matches_one_read_of_all_rows(llama, monkeypatch):
    """Head-major decode split into a segment per run of equal lengths gives what one segment
    per run of adjacent slots / entries (free ones after stops split them) gives, and both give
    the training forward's log-probs: groups that shrink (an entry padded to the widest group of
    its segment) and prompts of different lengths in one segment (masked) included."""
    kw = dict(n=3, max_new_tokens=10, temperature=1.0, seed=4, stop_ids=list(range(3, 300, 9)))
    built = []
    real = D.decode_segments
    def record(rows, readers, *a):  # the segments, and the batch size (the padding row)
        built.append((real(rows, readers, *a)[0], sum(map(len, readers))))
        return real(rows, readers, *a)
    monkeypatch.setattr(D, "decode_segments", record)
    monkeypatch.setitem(D.SEGMENT_COST, "cpu", 10**9)  # split only at free slots / entries
    one = gen(llama, PROMPTS, **kw)
    assert max(len(segs) for segs, _ in built) > 1, "no free slot split the rows"
    assert any(s.finish_reason == "stop" for s in one)
    segs = [(seg, pad) for step, pad in built for seg in step]
    assert any(pad in seg.index.tolist() for seg, pad in segs), "no entry was padded"
    assert any(seg.width > 1 and seg.mask is not None for seg, _ in segs), "no mixed lengths"
    splits, built[:] = sum(len(segs) for segs, _ in built), []
    monkeypatch.setitem(D.SEGMENT_COST, "cpu", 0)  # never a key too many
    many = gen(llama, PROMPTS, **kw)
    assert sum(len(segs) for segs, _ in built) > splits
    for a, b, ref in zip(one, many, training_logprobs(llama, one)):
        assert a.response_ids == b.response_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        assert torch.allclose(torch.tensor(a.logprobs), ref, atol=1e-5)


def test_a_group_reads_one_copy_of_its_prompt(llama, monkeypatch):
    """Head-major with n > 1: each prefill writes a prompt once (one entry), and the samples are
    those of the layout that copies it into every slot (n = 1's)."""
    written = []
    real_write, real_cache = D.KVCache.write_prompt, D.KVCache
    monkeypatch.setattr(D.KVCache, "write_prompt",
                        lambda self, layer, first, end, k, v: written.append(end - first)
                        or real_write(self, layer, first, end, k, v))
    kw = dict(n=4, max_new_tokens=6, temperature=1.0, seed=2, stop_ids=list(range(3, 300, 7)))
    shared = gen(llama, PROMPTS, **kw)
    assert sum(written) == llama.config.num_hidden_layers * len(PROMPTS)
    written[:] = []
    monkeypatch.setattr(D, "KVCache", lambda *a, **k: real_cache(*a, **dict(k, shared=False)))
    copied = gen(llama, PROMPTS, **kw)
    assert sum(written) == llama.config.num_hidden_layers * len(PROMPTS) * 4
    assert any(s.finish_reason == "stop" for s in shared)
    for a, b in zip(shared, copied):
        assert a.response_ids == b.response_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


@pytest.mark.parametrize("layout", ["shared", "per-slot"])
def test_rest_of_a_group_joins_without_a_prefill(llama, monkeypatch, layout):
    """Three slots, groups of four: a group's later samples join while its first ones decode,
    with no prefill (the prompt read from its entry, or copied from a sibling slot, the first
    token sampled from the kept logits), and the samples are those of a cache that holds every
    sample at once, in each cache layout."""
    kw = dict(n=4, max_new_tokens=8, temperature=1.0, seed=5, stop_ids=list(range(3, 300, 7)))
    whole = gen(llama, PROMPTS, **kw)
    if layout == "per-slot":
        real_cache = D.KVCache
        monkeypatch.setattr(D, "KVCache", lambda *a, **k: real_cache(*a, **dict(k, shared=False)))
    admitted, real_prefill = [], D._prefill
    monkeypatch.setattr(D, "_prefill", lambda m, run, batch: admitted.extend(batch)
                        or real_prefill(m, run, batch))
    split = gen(llama, PROMPTS, max_cache_tokens=19 * 3, **kw)  # 3 slots: 11 + 8 tokens each
    assert [b[0] for b in admitted if b[4] is None] == [0, 1, 2, 3]  # one prefill per prompt
    assert len(admitted) > len(PROMPTS), "no sample joined its prompt's live entry"
    assert any(s.finish_reason == "stop" for s in split)
    for a, b in zip(whole, split):
        assert a.response_ids == b.response_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


def test_plan_segments_trades_wasted_keys_for_calls():
    assert D.plan_segments([0, 1, 2, 3], [10, 10, 100, 100], cost=5) == [(0, 2), (2, 4)]
    assert D.plan_segments([0, 1, 2, 3], [10, 10, 100, 100], cost=1000) == [(0, 4)]
    assert D.plan_segments([0, 1, 3], [50, 50, 50], cost=1000) == [(0, 2), (2, 3)]  # free 2
    assert D.plan_segments([4, 5, 6], [1, 50, 50], cost=60) == [(0, 3)]  # 49 keys < a call
    assert D.plan_segments([4, 5, 6], [1, 50, 50], cost=40) == [(0, 1), (1, 3)]


def test_prompt_write_in_every_cache_layout():
    cfg = M.ModelConfig(arch="llama", vocab_size=16, hidden_size=8, intermediate_size=16,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=3, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
                        tie_word_embeddings=False, qkv_bias=False, o_bias=False)
    k, v = torch.randn(4, 2, 3), torch.randn(4, 2, 3)  # (T, Hkv, D)
    sizes = []
    for shared in (False, True):
        cache = D.KVCache(cfg, slots=3, prompt_len=4, new_len=2, device="cpu",
                          dtype=torch.float32, shared=shared)
        cache.write_prompt(1, 1, 3, k, v)  # prompt rows 1 and 2, positions 0..3
        kk = cache.pk[1].permute(0, 3, 1, 2)  # (rows, T, Hkv, D)
        vv = cache.pv[1].transpose(1, 2)  # (rows, T, Hkv, D)
        for s in (1, 2):
            assert torch.equal(kk[s, :4], k) and torch.equal(vv[s, :4], v)
        assert kk[0].abs().sum() == 0 and cache.pk[0].abs().sum() == 0
        assert kk[:, 4:].abs().sum() == 0 and (not shared or cache.k.abs().sum() == 0)
        assert cache.shared == shared and (cache.pk is cache.k) == (not shared)
        sizes.append(cache.nbytes)
    assert sizes == [2 * 2 * 3 * 6 * 2 * 3 * 4] * 2  # k and v, layers, slots, 6 tokens, Hkv, D


def test_admitted_slots_go_to_the_shortest_prompts_first():
    from types import SimpleNamespace
    run = D._Engine([[1] * 5, [2] * 2, [3] * 9], 2, SimpleNamespace(slots=6), seed=0,
                 prompt_offset=0, device="cpu")
    assert run.admit() == [(0, [0, 1], [2, 3], 1, None), (1, [0, 1], [0, 1], 0, None),
                           (2, [0, 1], [4, 5], 2, None)]


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, 2]], n=0), "n and max_new_tokens must be >= 1"),
    (dict(prompts=[[1, 2]], stop_ids=[100000]), r"stop ids \[100000\]"),
    (dict(prompts=[[1, 99999]]), "prompt 0 has token ids outside"),
    (dict(prompts=[list(range(50))], max_cache_tokens=40), "cannot hold one sequence of 58"),
])
def test_bad_input(llama, kwargs, match):
    kwargs = dict(dict(max_new_tokens=8, progress=False), **kwargs)
    with pytest.raises(ValueError, match=match):
        gen(llama, **kwargs)


def test_free_slots_take_part_of_a_group():
    """Five slots, two prompts of four samples: the fifth slot starts the second prompt's first
    sample at once instead of idling until four slots are free; the rest join that prompt's
    entry while it lives (its slot the source to copy from), and a prompt whose samples are all
    done gets a new entry."""
    from types import SimpleNamespace
    run = D._Engine([[1, 2], [3, 4]], 4, SimpleNamespace(slots=5), seed=0, prompt_offset=0,
                 device="cpu")
    assert run.admit() == [(0, [0, 1, 2, 3], [0, 1, 2, 3], 0, None), (1, [0], [4], 1, None)]
    run.slot_of.update({s: (0, s) for s in range(4)} | {4: (1, 0)})
    run.first_logits.update({0: None, 1: None})
    run.release(2)
    assert run.admit() == [(1, [1], [2], 1, 4)] and run.entry_rows == {0: 3, 1: 2}
    run.slot_of[2] = (1, 1)
    for s in (0, 1, 3):
        run.release(s)
    assert run.free_entries == [2, 3, 4, 0] and 0 not in run.first_logits
    run.queue.insert(0, (0, [4]))  # (a fifth sample of prompt 0: its entry is gone)
    assert run.admit() == [(0, [4], [0], 0, None), (1, [2, 3], [1, 3], 1, 4)]
    assert run.queue == []


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_redraws_rarely_in_a_log(llama, monkeypatch, terminal):
    """On a terminal the bar redraws as samples finish; into a log file (stderr not a terminal)
    each redraw is a line kept for good, so there it redraws at most once each 30 s."""
    import io
    import time

    class Stream(io.StringIO):
        def isatty(self):
            return terminal
    out = Stream()
    monkeypatch.setattr("sys.stderr", out)
    forward = llama.forward

    def slow(*args, **kwargs):  # ~0.04 s a step: the 6 samples finish ~0.25 s apart
        time.sleep(0.04)
        return forward(*args, **kwargs)
    monkeypatch.setattr(llama, "forward", slow)
    # one slot (cache room for one sequence): the samples run one after another
    gen(llama, [[5, 17, 33]], n=6, max_new_tokens=5, stop_ids=[], max_cache_tokens=8,
        progress=True)
    redraws = out.getvalue().count("generate")
    assert (redraws >= 4) if terminal else (redraws <= 2), out.getvalue()
