"""The varlen_attn test double against independent references (per-sequence SDPA with explicit
boolean masks, explicit logsumexp) and against the signatures of torch's own varlen_attn."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import flash_attn_double as fa
import varlen_attn_double as vd

I32 = torch.int32
CAUSAL = {"window_size": (-1, 0)}


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def allowed(lq, lk, causal, used=None):
    """(Lq, Lk) bool: key j within the first `used` keys and, if causal, j <= i + used - Lq."""
    used = lk if used is None else used
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    mask = (j < used).expand(lq, lk)
    return mask & (j <= i + used - lq) if causal else mask


def sdpa_reference(q, k, v, causal, used=None):
    """One sequence via SDPA. q (Lq, H, D), k/v (Lk, Hk, D) -> (Lq, H, D); rows without keys 0."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (Lk, H, D)
    v = v.repeat_interleave(group, dim=1)  # (Lk, H, D)
    mask = allowed(q.shape[0], k.shape[0], causal, used)  # (Lq, Lk)
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), k.float().transpose(0, 1),
                                         v.float().transpose(0, 1), attn_mask=mask)  # (H, Lq, D)
    return torch.where(mask.any(-1)[:, None, None], out.transpose(0, 1), 0.0)  # (Lq, H, D)


def packed(lens, heads, d=8):
    x = torch.randn(sum(lens), heads, d)  # (total, H, D)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=I32)
    return x, cu


def ragged(lens_q, lens_k, heads=4, heads_k=2):
    q, cu_q = packed(lens_q, heads)
    k, cu_k = packed(lens_k, heads_k)
    v = torch.randn_like(k)
    return q, k, v, cu_q, cu_k


def per_sequence(fn, q, k, v, cu_q, cu_k, *extra):
    """fn(q_b, k_b, v_b, *extra_b) over the sequences, joined along the token dim."""
    outs = []
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        outs.append(fn(q[qs:qe], k[ks:ke], v[ks:ke], *(x[b] for x in extra)))
    return torch.cat(outs, dim=1 if outs[0].dim() == 2 else 0)  # lse (H, Lq) joins on Lq


LENS_Q, LENS_K = [3, 1, 5, 4, 0], [3, 6, 5, 7, 2]  # fewer queries than keys, equal, empty


@pytest.mark.parametrize("causal", [False, True])
def test_ragged_gqa_matches_sdpa(causal):
    torch.manual_seed(0)
    q, k, v, cu_q, cu_k = ragged(LENS_Q, LENS_K)
    window = (-1, 0) if causal else (-1, -1)
    out = vd.varlen_attn(q, k, v, cu_q, cu_k, 5, 7, window_size=window, enable_gqa=True)
    assert out.shape == q.shape and out.dtype == torch.float32
    close(out, per_sequence(lambda *a: sdpa_reference(*a, causal), q, k, v, cu_q, cu_k))


def test_causal_aligns_bottom_right():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    cu_q, cu_k = torch.tensor([0, 3], dtype=I32), torch.tensor([0, 7], dtype=I32)
    out = vd.varlen_attn(q, k, v, cu_q, cu_k, 3, 7, **CAUSAL)
    # query i sees keys j <= i + 4: changing key 5 moves queries 1 and 2 but not query 0
    v2 = v.clone()
    v2[5] += 1.0
    out2 = vd.varlen_attn(q, k, v2, cu_q, cu_k, 3, 7, **CAUSAL)
    torch.testing.assert_close(out2[0], out[0])
    assert (out2[1:] - out[1:]).abs().min() > 1e-4
    # and not SDPA's top-left is_causal, under which query 0 would see key 0 only
    top_left = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                              v.transpose(0, 1), is_causal=True)  # (H, Tq, D)
    assert not torch.allclose(out, top_left.transpose(0, 1), atol=1e-3)


def test_gqa_head_mapping_by_perturbation():
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 6, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    cu = torch.tensor([0, 5], dtype=I32)
    out = vd.varlen_attn(q, k, v, cu, cu, 5, 5, enable_gqa=True)
    v2 = v.clone()
    v2[:, 1] += 1.0  # kv head 1 serves query heads 3, 4 and 5 only
    out2 = vd.varlen_attn(q, k, v2, cu, cu, 5, 5, enable_gqa=True)
    torch.testing.assert_close(out2[:, :3], out[:, :3])
    torch.testing.assert_close(out2[:, 3:], out[:, 3:] + 1.0)


def test_gqa_needs_enable_gqa_and_divisible_heads():
    q, k = torch.randn(4, 4, 8), torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=I32)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        vd.varlen_attn(q, k, k, cu, cu, 4, 4)
    k3 = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        vd.varlen_attn(torch.randn(4, 4, 8), k3, k3, cu, cu, 4, 4, enable_gqa=True)
    same_heads = vd.varlen_attn(q, q, q, cu, cu, 4, 4, enable_gqa=True)  # allowed, no effect
    close(same_heads, vd.varlen_attn(q, q, q, cu, cu, 4, 4))


def test_lse_matches_explicit_logsumexp():
    torch.manual_seed(0)
    lens_q, lens_k = [2, 4, 3], [5, 4, 1]  # the last has two queries without a key
    q, k, v, cu_q, cu_k = ragged(lens_q, lens_k)
    q.requires_grad_(True)
    scale = 0.3
    out, lse = vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, return_aux=vd.AuxRequest(lse=True),
                              scale=scale, enable_gqa=True, **CAUSAL)
    assert lse.shape == (4, 9) and lse.dtype == torch.float32  # (H, Tq)
    assert not lse.requires_grad  # the real backward ignores the lse's gradient

    def explicit(q_b, k_b, v_b):
        scores = torch.einsum("qhd,khd->hqk", q_b.detach(), k_b.repeat_interleave(2, dim=1))
        mask = allowed(q_b.shape[0], k_b.shape[0], True)  # (Lq, Lk)
        return (scores * scale).masked_fill(~mask, -math.inf).logsumexp(-1)  # (H, Lq)

    expected = per_sequence(explicit, q, k, v, cu_q, cu_k)  # (H, Tq), -inf on rows without keys
    finite = torch.isfinite(expected)
    assert finite.sum() == 4 * 7
    close(lse[finite], expected[finite])
    assert torch.equal(lse[~finite], torch.full((4 * 2,), math.inf))  # +inf, as the kernel
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    plain = vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, return_aux=vd.AuxRequest(), scale=scale,
                           enable_gqa=True, **CAUSAL)
    assert isinstance(plain, torch.Tensor)
    torch.testing.assert_close(plain, out)


def test_seqused_k_limits_keys_and_alignment():
    torch.manual_seed(0)
    lens_q, lens_k, used = [2, 3, 1], [6, 4, 5], [4, 4, 0]
    q, k, v, cu_q, cu_k = ragged(lens_q, lens_k)
    seqused = torch.tensor(used, dtype=I32)
    kw = dict(enable_gqa=True, seqused_k=seqused, **CAUSAL)
    out = vd.varlen_attn(q, k, v, cu_q, cu_k, 3, 6, **kw)
    # causal aligns to the USED keys: the last query of sequence 0 sees keys 0..3, not 0..5
    ref = per_sequence(lambda *a: sdpa_reference(*a[:3], True, int(a[3])), q, k, v, cu_q, cu_k,
                       seqused)
    close(out, ref)
    assert torch.equal(out[5], torch.zeros(4, 8))  # sequence 2 uses no key
    k2, v2 = k.clone(), v.clone()
    for s, n, u in zip(cu_k[:-1].tolist(), lens_k, used):
        k2[s + u:s + n] = 50.0  # keys past seqused_k must not matter
        v2[s + u:s + n] = -50.0
    torch.testing.assert_close(vd.varlen_attn(q, k2, v2, cu_q, cu_k, 3, 6, **kw), out)
    with pytest.raises(RuntimeError, match="seqused_k must have dtype int32"):
        vd.varlen_attn(q, k, v, cu_q, cu_k, 3, 6, enable_gqa=True, seqused_k=torch.tensor(used))
    with pytest.raises(RuntimeError, match="must lie in"):
        vd.varlen_attn(q, k, v, cu_q, cu_k, 3, 6, enable_gqa=True,
                       seqused_k=torch.tensor([7, 4, 0], dtype=I32))
    with pytest.raises(RuntimeError, match="inference-only"):  # as 2.12+'s setup_context
        vd.varlen_attn(q.requires_grad_(True), k, v, cu_q, cu_k, 3, 6, **kw)
    with torch.no_grad():
        close(vd.varlen_attn(q, k, v, cu_q, cu_k, 3, 6, **kw), out)


def test_fully_masked_rows_are_zero_and_grads_finite():
    torch.manual_seed(0)
    q = torch.randn(5, 2, 8, requires_grad=True)  # more queries than keys: 0, 1 see no key
    k = torch.randn(3, 2, 8, requires_grad=True)
    v = torch.randn(3, 2, 8, requires_grad=True)
    cu_q, cu_k = torch.tensor([0, 5], dtype=I32), torch.tensor([0, 3], dtype=I32)
    out = vd.varlen_attn(q, k, v, cu_q, cu_k, 5, 3, **CAUSAL)
    assert torch.equal(out[:2], torch.zeros(2, 2, 8))
    close(out, sdpa_reference(q.detach(), k.detach(), v.detach(), True))
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:2], torch.zeros(2, 2, 8))


@pytest.mark.parametrize("causal", [False, True])
def test_grads_match_sdpa(causal):
    torch.manual_seed(0)
    q, k, v, cu_q, cu_k = ragged([4, 2, 3], [4, 5, 3])  # every query sees a key
    for t in (q, k, v):
        t.requires_grad_(True)
    window = (-1, 0) if causal else (-1, -1)
    out = vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, window_size=window, enable_gqa=True)
    grads = torch.autograd.grad(out.sin().sum(), (q, k, v))
    ref = per_sequence(lambda *a: sdpa_reference(*a, causal), q, k, v, cu_q, cu_k)
    ref_grads = torch.autograd.grad(ref.sin().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_scale_and_default_scale():
    torch.manual_seed(0)
    q, k, v, cu_q, cu_k = ragged([3, 4], [5, 4], heads=2, heads_k=2)
    scaled = vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, scale=0.5 / math.sqrt(8))
    close(scaled, vd.varlen_attn(q * 0.5, k, v, cu_q, cu_k, 4, 5))
    close(vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, scale=1 / math.sqrt(8)),
          vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_in_same_dtype_out(dtype):
    torch.manual_seed(0)
    q, k, v, cu_q, cu_k = ragged([3, 4], [5, 4])
    low = [t.to(dtype) for t in (q, k, v)]
    out = vd.varlen_attn(*low, cu_q, cu_k, 4, 5, enable_gqa=True, **CAUSAL)
    ref = vd.varlen_attn(*(t.float() for t in low), cu_q, cu_k, 4, 5, enable_gqa=True, **CAUSAL)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


def test_windows():
    torch.manual_seed(0)
    q, k, v, cu_q, cu_k = ragged([3, 4], [5, 4], heads=2, heads_k=2)
    causal = vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, **CAUSAL)
    close(vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, window_size=[-1, 0]), causal)  # C++: causal
    full = vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5)
    close(vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, window_size=(-1, -1)), full)
    assert not torch.allclose(full, causal, atol=1e-3)
    with pytest.raises(NotImplementedError, match="sliding"):
        vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, window_size=(2, 0))
    with pytest.raises(ValueError, match="length 2"):
        vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, window_size=(-1, 0, 0))


def test_num_splits_ignored():
    torch.manual_seed(0)
    q, k, v, cu_q, cu_k = ragged([3, 4], [5, 4], heads=2, heads_k=2)
    base = vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, **CAUSAL)
    for splits in (0, 1, 4):
        torch.testing.assert_close(
            vd.varlen_attn(q, k, v, cu_q, cu_k, 4, 5, num_splits=splits, **CAUSAL), base)


def test_block_table_reads_each_sequence_from_its_pages():
    """A paged call (pages of 256 keys, in any order in the pool) equals per-sequence SDPA over
    the sequence's first seqused_k keys, read page by page; bad pages and sizes raise."""
    torch.manual_seed(0)
    page, used = 256, [300, 5]
    pool_k, pool_v = torch.randn(5, page, 1, 8), torch.randn(5, page, 1, 8)  # 5 pages, Hkv 1
    table = torch.tensor([[3, 1], [4, 0]], dtype=I32)
    q = torch.randn(2, 2, 8)  # one query per sequence (decode), H 2
    kw = dict(seqused_k=torch.tensor(used, dtype=I32), block_table=table, enable_gqa=True)
    cu_q, cu_k = torch.tensor([0, 1, 2], dtype=I32), torch.tensor([0, 300, 305], dtype=I32)
    out = vd.varlen_attn(q, pool_k, pool_v, cu_q, cu_k, 1, 2 * page, **kw)
    for i, (pages, n) in enumerate(zip(table.long(), used)):
        k = pool_k[pages].reshape(-1, 1, 8)[:n].expand(n, 2, 8)
        v = pool_v[pages].reshape(-1, 1, 8)[:n].expand(n, 2, 8)
        close(out[i:i + 1], sdpa_reference(q[i:i + 1], k, v, causal=False))
    with pytest.raises(RuntimeError, match="requires seqused_k"):
        vd.varlen_attn(q, pool_k, pool_v, cu_q, cu_k, 1, 512, block_table=table, enable_gqa=True)
    with pytest.raises(RuntimeError, match="divisible by 256"):
        vd.varlen_attn(q, pool_k[:, :16], pool_v[:, :16], cu_q, cu_k, 1, 32, **kw)
    with pytest.raises(RuntimeError, match="outside"):
        vd.varlen_attn(q, pool_k, pool_v, cu_q, cu_k, 1, 512, **dict(kw, block_table=table + 2))


@pytest.mark.parametrize("bad, error, match", [
    ("cu_q_int64", RuntimeError, "cu_seq_q must have dtype int32"),
    ("cu_k_int64", RuntimeError, "cu_seq_k must have dtype int32"),
    ("max_q_short", RuntimeError, "longest sequence"),
    ("max_k_short", RuntimeError, "longest sequence"),
    ("max_q_float", RuntimeError, "type 'int'"),
    ("max_k_tensor", RuntimeError, "type 'int'"),
    ("no_leading_zero", RuntimeError, "must start at 0"),
    ("wrong_total", RuntimeError, "end at the total"),
    ("batch_mismatch", RuntimeError, "different batch sizes"),
    ("fp64", RuntimeError, "fp16 and bf16"),
    ("dtype_mismatch", RuntimeError, "same dtype"),
    ("headdim", RuntimeError, "multiple of 8"),
    ("last_dim_stride", RuntimeError, "contiguous last dimension"),
    ("cu_on_meta", RuntimeError, "is on meta"),
])
def test_bad_inputs_raise(bad, error, match):
    q, k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    cu_q = cu_k = torch.tensor([0, 2, 6], dtype=I32)
    max_q = max_k = 4
    if bad == "cu_q_int64":
        cu_q = cu_q.long()
    elif bad == "cu_k_int64":
        cu_k = cu_k.long()
    elif bad == "max_q_short":
        max_q = 3
    elif bad == "max_k_short":
        max_k = 3
    elif bad == "max_q_float":
        max_q = 4.0
    elif bad == "max_k_tensor":
        max_k = torch.tensor(4)
    elif bad == "no_leading_zero":
        cu_q = torch.tensor([1, 2, 6], dtype=I32)
    elif bad == "wrong_total":
        cu_k = torch.tensor([0, 2, 5], dtype=I32)
    elif bad == "batch_mismatch":
        cu_k, max_k = torch.tensor([0, 6], dtype=I32), 6
    elif bad == "fp64":
        q, k, v = q.double(), k.double(), v.double()
    elif bad == "dtype_mismatch":
        v = v.bfloat16()
    elif bad == "headdim":
        q, k, v = torch.randn(6, 2, 12), torch.randn(6, 2, 12), torch.randn(6, 2, 12)
    elif bad == "last_dim_stride":
        q = torch.randn(6, 8, 2).transpose(1, 2)  # (T, H, D) with stride(-1) == 2
    elif bad == "cu_on_meta":
        cu_q = cu_q.to("meta")
    with pytest.raises(error, match=match):
        vd.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)


def shape_of(fn):
    """(name, kind, default) of each parameter: what feature detection sees."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


POS, KW = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
EMPTY = inspect.Parameter.empty
SEVEN = [(n, POS, EMPTY) for n in ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q",
                                    "max_k")]
# transcribed from torch/nn/attention/varlen.py of the 2.10.0 and 2.11.0 wheels
SIG_2_10 = SEVEN + [("is_causal", POS, False), ("return_aux", POS, None)]
SIG_2_11 = SEVEN + [("return_aux", KW, None), ("scale", KW, None), ("window_size", KW, (-1, -1))]
SIG_2_12 = SIG_2_11 + [("enable_gqa", KW, False), ("seqused_k", KW, None),
                       ("block_table", KW, None), ("num_splits", KW, None)]


def test_signature_equals_installed_torch():
    """The module's varlen_attn is 2.13's (the pinned torch); for_version(installed) matches it."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    try:
        mirror = vd.for_version(torch.__version__)
    except ValueError:
        pytest.skip(f"no double of torch {torch.__version__}'s varlen_attn")
    assert shape_of(mirror.varlen_attn) == shape_of(varlen.varlen_attn)
    if mirror.TORCH_VERSION == "2.13":
        assert shape_of(vd.varlen_attn) == shape_of(varlen.varlen_attn) == SIG_2_12
    assert vd.AuxRequest._fields == varlen.AuxRequest._fields == ("lse",)
    assert vd.AuxRequest._field_defaults == varlen.AuxRequest._field_defaults == {"lse": False}


@pytest.mark.parametrize("version, expected", [
    ("2.10", SIG_2_10), ("2.10.0", SIG_2_10), ("2.11", SIG_2_11), ("2.11.0+cu128", SIG_2_11),
    ("2.12", SIG_2_12), ("2.13.0+cpu", SIG_2_12), ("2.14", SIG_2_12),
])
def test_for_version_signatures(version, expected):
    ns = vd.for_version(version)
    assert shape_of(ns.varlen_attn) == expected
    assert ns.IS_TEST_DOUBLE is True and ns.AuxRequest is vd.AuxRequest
    assert ns.varlen_attn.__name__ == "varlen_attn"


def test_for_version_rejects_what_each_version_lacks():
    torch.manual_seed(0)
    q, k, v, cu_q, cu_k = ragged([3, 4], [5, 4], heads=2, heads_k=2)
    args = (q, k, v, cu_q, cu_k, 4, 5)
    v210, v211, v212 = (vd.for_version(x).varlen_attn for x in ("2.10", "2.11", "2.12"))
    with pytest.raises(TypeError):
        v211(*args, enable_gqa=True)
    with pytest.raises(TypeError):
        v211(*args, is_causal=True)
    with pytest.raises(TypeError):
        v211(*args, True)  # keyword-only from return_aux on
    for kw in ({"window_size": (-1, 0)}, {"scale": 0.1}, {"seqused_k": cu_q[1:]}):
        with pytest.raises(TypeError):
            v210(*args, **kw)
    with pytest.raises(TypeError):
        v212(*args, is_causal=True)
    with pytest.raises(ValueError, match="no signature"):
        vd.for_version("2.9")
    # the same semantics under each version's way of saying "causal"
    causal = v212(*args, **CAUSAL)
    close(v210(*args, is_causal=True), causal)
    close(v210(*args, True), causal)  # is_causal is positional on 2.10
    close(v211(*args, **CAUSAL), causal)
    full, lse = v210(*args, False, vd.AuxRequest(lse=True))
    close(full, v211(*args))
    close(lse, v212(*args, return_aux=vd.AuxRequest(lse=True))[1])


@pytest.mark.parametrize("version", ["2.10", "2.11"])
def test_old_versions_refuse_fewer_kv_heads(version):
    q, k = torch.randn(4, 4, 8), torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=I32)
    fn = vd.for_version(version).varlen_attn
    with pytest.raises(NotImplementedError, match="repeat k/v"):
        fn(q, k, k, cu, cu, 4, 4)
    kk = k.repeat_interleave(2, dim=1)  # (T, H, D): what code under test must pass instead
    close(fn(q, kk, kk, cu, cu, 4, 4), vd.varlen_attn(q, k, k, cu, cu, 4, 4, enable_gqa=True))


def test_agrees_with_flash_attn_double():
    torch.manual_seed(0)
    q, k, v, cu_q, cu_k = ragged(LENS_Q, LENS_K, heads=6, heads_k=2)
    ours = vd.varlen_attn(q, k, v, cu_q, cu_k, 5, 7, enable_gqa=True, **CAUSAL)
    theirs = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 7, causal=True)
    close(ours, theirs)
    kk, vv = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)  # (Tk, H, D)
    close(vd.for_version("2.11").varlen_attn(q, kk, vv, cu_q, cu_k, 5, 7, **CAUSAL), theirs)


def test_is_test_double():
    assert vd.IS_TEST_DOUBLE is True
