"""model.py's CUDA branches on the CPU, through test doubles of the CUDA-only kernels: bf16 x bf16
-> fp32 matmuls (mm / addmm's out_dtype overloads), torch's varlen_attn."""
import functools

import pytest
import torch

import model as M
import sampling
from tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama"), "llama", seed=1)


BMM_CALLS = []


@pytest.fixture
def fp32_out_matmul(monkeypatch):
    """CPU kernels of aten's mm.dtype, addmm.dtype_out and bmm.dtype (CUDA-only in torch): bf16
    operands, products and sums in fp32 as the GPU's tensor cores accumulate, an fp32 result;
    and model.py told that the CPU has them, so its CUDA branch runs."""
    lib = torch.library.Library("aten", "IMPL")

    def mm(a, b, out_dtype):
        assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32
        return a.float() @ b.float()

    def addmm_out(acc, a, b, out_dtype, *, beta=1, alpha=1, out):
        assert a.dtype == b.dtype == torch.bfloat16 and acc.dtype == out.dtype == out_dtype
        return out.copy_(beta * acc + alpha * (a.float() @ b.float()))
    def bmm(a, b, out_dtype):
        assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32
        BMM_CALLS.append(a.shape)
        return a.float() @ b.float()
    lib.impl("mm.dtype", mm, "CPU")
    lib.impl("addmm.dtype_out", addmm_out, "CPU")
    lib.impl("bmm.dtype", bmm, "CPU")
    monkeypatch.setattr(M, "FP32_OUT_MATMUL", {"cpu"})
    yield
    lib._destroy()


def bf16_model(ckpt, head_scale: float = 40.0):
    """The tiny model in bf16 with its lm_head scaled up so that logits reach ~+-20, as a real
    model's do: there, bf16 rounding of a logit is ~0.06."""
    m = M.load_model(ckpt, dtype=torch.bfloat16)
    with torch.no_grad():
        m.lm_head.weight.mul_(head_scale)
    return m


@pytest.mark.parametrize("double", [False, True])
def test_sampler_and_trainer_logprobs_agree_in_bf16(ckpt, request, double):
    """The sampler's log-probs (logits from the forward, then sampling.sample_tokens) and the
    trainer's (chunked model.token_logprobs) of the same tokens: equal up to fp32 rounding, on
    the CPU's fp32 path and on the CUDA branch (fp32-output matmuls). With logits rounded to bf16
    they differed by up to ~0.1."""
    if double:
        request.getfixturevalue("fp32_out_matmul")
    m = bf16_model(ckpt)
    torch.manual_seed(0)
    seqs = [torch.randint(0, 384, (n,)).tolist() for n in (40, 17, 300)]
    ids, pos, cu, mx = M.pack(seqs)
    for temperature in (1.0, 0.7):
        logits = m(ids, pos, cu, mx)  # (N, V)
        assert logits.dtype == torch.float32 and logits.abs().max() > 15
        u = torch.rand(len(ids), dtype=torch.float64)
        tokens, sampler = sampling.sample_tokens(logits, temperature, 0, 1.0, u)
        trainer, _ = m(ids, pos, cu, mx, targets=tokens, temperature=temperature)
        assert (trainer - sampler).abs().max() < 2e-5
        # and both are the fp32 log-softmax of the bf16 weights' exact products
        ref = torch.log_softmax(logits.double() / temperature, -1).gather(-1, tokens[:, None])
        assert (trainer.double() - ref[:, 0]).abs().max() < 2e-5


def test_bf16_logprob_backward_has_fp32_accuracy_and_no_weight_copy(fp32_out_matmul):
    """The CUDA branch of the log-prob backward: bf16 operands into fp32 sums, gradients as
    accurate as bf16 inputs allow, and no fp32 copy of the (vocab, hidden) weight (it was one
    per 256-row chunk: 2.1 GB and an fp32 matmul each at Llama-8B)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    torch.manual_seed(0)
    n, hidden, vocab = 600, 32, 512
    h = torch.randn(n, hidden).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden) * 2).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    g_lp, g_ent = torch.randn(n), torch.randn(n)

    class Copies(TorchDispatchMode):  # fp32 tensors of the weight's shape made by conversion
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (func is torch.ops.aten._to_copy.default and out.shape == w.shape
                    and out.dtype == torch.float32):
                Copies.count += 1
            return out
    lp, ent = M.token_logprobs(h, w, targets, 0.8, entropy=True, chunk=128)
    with Copies():
        (lp * g_lp + ent * g_ent).sum().backward()
    assert Copies.count == 0
    # float64 reference on the same bf16 numbers
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    logp = torch.log_softmax(h64 @ w64.t() / 0.8, -1)
    ref_lp = logp.gather(-1, targets[:, None])[:, 0]
    ref_ent = -(logp.exp() * logp).sum(-1)
    assert (lp.double() - ref_lp).abs().max() < 1e-4 and (ent.double() - ref_ent).abs().max() < 1e-4
    (ref_lp * g_lp.double() + ref_ent * g_ent.double()).sum().backward()
    for ours, ref in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert ours.dtype == torch.bfloat16
        assert (ours.double() - ref).abs().max() < 2e-2 * ref.abs().max()  # bf16 rounding


def test_cpu_bf16_logprobs_copy_the_weight_once_per_call(ckpt):
    """Without fp32-output matmuls (the CPU, torch < 2.8) the weight is converted once per call,
    not once per chunk."""
    from torch.utils._python_dispatch import TorchDispatchMode
    w = torch.randn(512, 32).bfloat16().requires_grad_()
    h = torch.randn(1000, 32).bfloat16().requires_grad_()
    copies = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.shape == w.shape:
                copies.append(out.dtype)
            return out
    with Copies():
        lp, _ = M.token_logprobs(h, w, torch.randint(0, 512, (1000,)), chunk=100)
        lp.sum().backward()
    # forward: 1, backward: 1 and the bf16 gradient handed back
    assert copies == [torch.float32, torch.float32, torch.bfloat16]


# ----------------------------------------------------------------------------- torch's varlen_attn

def varlen_double(version: str | None):
    import varlen_attn_double
    return varlen_attn_double if version is None else varlen_attn_double.for_version(version)


def test_backend_choice(monkeypatch):
    """flash-attn where it imports, else torch's varlen_attn, on CUDA in half precision; SDPA on
    the CPU (real kernels: no IS_TEST_DOUBLE)."""
    real = object()
    monkeypatch.setattr(M, "FLASH", None)
    monkeypatch.setattr(M, "VARLEN", real)
    assert M.attention_backend("cuda", torch.bfloat16) == "varlen"
    assert M.attention_backend("cuda", torch.float32) == "sdpa"
    assert M.attention_backend("cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(M, "FLASH", real)
    assert M.attention_backend("cuda", torch.float16) == "flash-attn"
    monkeypatch.setattr(M, "FLASH", None)
    monkeypatch.setattr(M, "VARLEN", None)  # torch < 2.10
    assert M.attention_backend("cuda", torch.bfloat16) == "sdpa"


@pytest.mark.parametrize("version", [None, "2.12", "2.11", "2.10"])
def test_varlen_path_matches_sdpa(ckpt, monkeypatch, version):
    """Packed training forward and backward, and a group's responses attending to one shared
    prompt (fewer queries than keys: bottom-right causal), through each torch version's
    varlen_attn signature (2.10 is_causal; 2.11 a window and no GQA: k/v repeated; 2.12+
    enable_gqa), against the CPU's padded SDPA."""
    import rl
    torch.manual_seed(0)
    m = M.load_model(ckpt)
    assert m.config.num_key_value_heads < m.config.num_attention_heads  # GQA
    prompt = torch.randint(0, 384, (13,)).tolist()
    group = [rl.Completion(None, 0, prompt, torch.randint(0, 384, (n,)).tolist(), None, "stop")
             for n in (9, 1, 20)]
    group.append(rl.Completion(None, 1, [5, 6], [7, 8, 9], None, "stop"))
    mb = rl.pack(group, "cpu")
    assert mb.attention is not None  # the shared-prefix layout
    seqs = [torch.randint(0, 384, (n,)).tolist() for n in (7, 31, 2)]
    ids, pos, cu, mx = M.pack(seqs)

    def run():
        m.zero_grad()
        logits = m(ids, pos, cu, mx)
        lp, _ = rl.logprobs(m, mb)
        (logits.square().mean() + lp.sum()).backward()
        return logits, lp, [p.grad.clone() for p in m.parameters()]
    ref = run()
    monkeypatch.setattr(M, "VARLEN", varlen_double(version))
    assert M.attention_backend("cpu", torch.float32) == "varlen"
    calls = []
    real = M.VARLEN.varlen_attn

    @functools.wraps(real)  # the same signature, which torch_varlen reads
    def counted(q, k, v, *args, **kw):
        calls.append((q.shape[1], k.shape[1], kw))
        return real(q, k, v, *args, **kw)
    monkeypatch.setattr(M.VARLEN, "varlen_attn", counted)
    ours = run()
    assert calls and len(calls) % m.config.num_hidden_layers == 0
    h, hkv = m.config.num_attention_heads, m.config.num_key_value_heads
    q_heads, k_heads, kw = calls[0]
    assert (q_heads, k_heads) == ((h, hkv) if version in (None, "2.12") else (h, h))
    assert kw == ({"is_causal": True} if version == "2.10" else
                  {"window_size": (-1, 0), **({} if version == "2.11" else {"enable_gqa": True})})
    for a, b in zip(ours[:2], ref[:2]):
        assert (a - b).abs().max() < 1e-5
    for a, b in zip(ours[2], ref[2]):
        assert (a - b).abs().max() <= 1e-5 * max(b.abs().max(), 1)


def test_sampler_prefill_through_varlen(ckpt, monkeypatch):
    """The sampler's packed prefill runs through varlen_attn too: the same completions."""
    import rollout
    m = M.load_model(ckpt)
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7] * 11]
    sampling = rollout.Sampling(n=3, max_new_tokens=6, seed=4)
    ref = rollout.generate(m, prompts, sampling, stop_ids=[], progress=False)
    monkeypatch.setattr(M, "VARLEN", varlen_double(None))
    ours = rollout.generate(m, prompts, sampling, stop_ids=[], progress=False)
    assert [s.response_ids for s in ours] == [s.response_ids for s in ref]
    assert max(abs(a - b) for s, r in zip(ours, ref) for a, b in zip(s.logprobs, r.logprobs)) < 1e-5


def test_plan_counts_repeated_kv_before_torch_2_12(ckpt, monkeypatch):
    """The memory plan of a CUDA run counts what its attention saves: torch 2.11's varlen_attn
    keeps k and v at q's head count (repeated), 2.12's at the kv heads'."""
    import grpo
    import memory
    cfg = M.read_config(ckpt)
    args = grpo.get_args(["--model", "tiny", "--plan-device", "cuda"])
    kept = {}
    for version in ("2.12", "2.11"):
        monkeypatch.setattr(M, "VARLEN", varlen_double(version))
        rows = memory.plan(cfg, args, 1, True, prompt_len=64).rows
        kept[version] = next(r[3] for r in rows if r[0].startswith("kept activations"))
    extra = 2 * (cfg.num_attention_heads - cfg.num_key_value_heads) * cfg.head_dim * 2  # k, v
    micro = args.micro_tokens
    layers = cfg.num_hidden_layers
    assert kept["2.11"] - kept["2.12"] == pytest.approx(micro * layers * extra, rel=0.01)


def test_gather_attention_scores_in_fp32_on_cuda(fp32_out_matmul):
    """The paged engine's gather kernel (torch <= 2.11) in bf16: its scores come from bf16
    products summed into fp32 (bmm's out_dtype on CUDA, through the double here), not rounded to
    bf16; it matches fp32 attention over the same bf16 keys to bf16's output rounding."""
    import kvcache
    torch.manual_seed(0)
    hkv, blocks, bs, d, b, h = 2, 9, 4, 16, 3, 6
    kc, vc = (torch.randn(hkv, blocks, bs, d).bfloat16() for _ in "kv")
    table = torch.tensor([[3, 1, 0], [2, 5, 7], [8, 0, 0]])
    lens = torch.tensor([6, 12, 2])
    mask = torch.zeros(b, 3 * bs).masked_fill_(torch.arange(3 * bs) >= lens[:, None], -torch.inf)
    q = torch.randn(b, h, d).bfloat16()
    BMM_CALLS.clear()
    out = kvcache.gather_attention(q, kc, vc, table, mask)
    assert len(BMM_CALLS) == 1 and out.dtype == torch.bfloat16
    for i in range(b):  # row i: its blocks' first lens[i] keys, query head j on kv head j // 3
        keys = kc[:, table[i]].reshape(hkv, -1, d)[:, :lens[i]].float()
        values = vc[:, table[i]].reshape(hkv, -1, d)[:, :lens[i]].float()
        qi = (q[i].float() * d ** -0.5).view(hkv, h // hkv, d)
        ref = ((qi @ keys.transpose(1, 2)).softmax(-1) @ values).reshape(h, d)
        assert torch.allclose(out[i].float(), ref, atol=2e-2), (out[i].float() - ref).abs().max()
