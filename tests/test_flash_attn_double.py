"""The flash-attn test double against independent references (per-sequence SDPA, explicit masks)."""
import pytest
import torch
import torch.nn.functional as F

import flash_attn_double as fa

I32 = torch.int32


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def sdpa_reference(q, k, v, causal, key_lo=0):
    """One sequence via SDPA. q (Tq, H, D), k/v (Tk, Hk, D) -> (Tq, H, D); empty rows -> 0."""
    tq, nheads, _ = q.shape
    tk, nheads_k, _ = k.shape
    k = k.repeat_interleave(nheads // nheads_k, dim=1)  # (Tk, H, D)
    v = v.repeat_interleave(nheads // nheads_k, dim=1)  # (Tk, H, D)
    i = torch.arange(tq)[:, None]
    j = torch.arange(tk)[None, :]
    mask = (j >= key_lo) & ((j <= i + tk - tq) if causal else torch.ones(tq, tk, dtype=torch.bool))
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), k.float().transpose(0, 1),
                                         v.float().transpose(0, 1), attn_mask=mask)  # (H, Tq, D)
    out = out.transpose(0, 1)  # (Tq, H, D)
    return torch.where(mask.any(-1)[:, None, None], out, 0.0)


def packed(lens, nheads, d):
    x = torch.randn(sum(lens), nheads, d)  # (total, H, D)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=I32)
    return x, cu


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_ragged_gqa_matches_sdpa(causal):
    torch.manual_seed(0)
    lens_q, lens_k = [3, 1, 5, 4], [3, 6, 5, 7]
    q, cu_q = packed(lens_q, 4, 8)
    k, cu_k = packed(lens_k, 2, 8)
    v, _ = packed(lens_k, 2, 8)
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    assert out.shape == q.shape and out.dtype == torch.float32
    for b in range(len(lens_q)):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        ref = sdpa_reference(q[qs:qe], k[ks:ke], v[ks:ke], causal)
        close(out[qs:qe], ref)


def test_gqa_head_mapping_by_perturbation():
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    cu = torch.tensor([0, 5], dtype=I32)
    out = fa.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5)
    v2 = v.clone()
    v2[:, 1] += 1.0  # kv head 1 serves query heads 2 and 3 only
    out2 = fa.flash_attn_varlen_func(q, k, v2, cu, cu, 5, 5)
    torch.testing.assert_close(out2[:, :2], out[:, :2])
    torch.testing.assert_close(out2[:, 2:], out[:, 2:] + 1.0)


def test_causal_bottom_right_alignment():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    cu_q, cu_k = torch.tensor([0, 3], dtype=I32), torch.tensor([0, 7], dtype=I32)
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 7, causal=True)
    close(out, sdpa_reference(q, k, v, causal=True))
    # query i sees keys j <= i + 4: changing key 5 moves queries 1 and 2 but not query 0
    v2 = v.clone()
    v2[5] += 1.0
    out2 = fa.flash_attn_varlen_func(q, k, v2, cu_q, cu_k, 3, 7, causal=True)
    torch.testing.assert_close(out2[0], out[0])
    assert (out2[1:] - out[1:]).abs().min() > 1e-4
    # and it is not SDPA's top-left is_causal alignment
    top_left = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              is_causal=True).transpose(0, 1)  # (Tq, H, D)
    assert not torch.allclose(out, top_left, atol=1e-3)


def test_fully_masked_rows_are_zero_and_grads_finite():
    torch.manual_seed(0)
    q = torch.randn(5, 2, 8, requires_grad=True)  # q longer than k: queries 0, 1 see no key
    k = torch.randn(3, 2, 8, requires_grad=True)
    v = torch.randn(3, 2, 8, requires_grad=True)
    cu_q, cu_k = torch.tensor([0, 5], dtype=I32), torch.tensor([0, 3], dtype=I32)
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 3, causal=True)
    assert torch.equal(out[:2], torch.zeros(2, 2, 8))
    close(out, sdpa_reference(q.detach(), k.detach(), v.detach(), True))
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:2], torch.zeros(2, 2, 8))
    dense = fa.flash_attn_func(q[None].detach(), k[None].detach(), v[None].detach(), causal=True)
    torch.testing.assert_close(dense[0], out.detach())


def test_varlen_grads_match_sdpa():
    torch.manual_seed(0)
    q, cu_q = packed([4, 2], 4, 8)
    k, cu_k = packed([4, 5], 2, 8)
    v = torch.randn_like(k)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, causal=True)
    grads = torch.autograd.grad(out.sin().sum(), (q, k, v))
    ref = torch.cat([sdpa_reference(q[:4], k[:4], v[:4], True), sdpa_reference(q[4:], k[4:], v[4:], True)])
    ref_grads = torch.autograd.grad(ref.sin().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_flash_attn_func_matches_sdpa_and_scale():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)  # (B, T, H, D)
    out = fa.flash_attn_func(q, k, v, causal=True)
    for b in range(2):
        close(out[b], sdpa_reference(q[b], k[b], v[b], True))
    scaled = fa.flash_attn_func(q, k, v, softmax_scale=0.5 / 8 ** 0.5)
    close(scaled, fa.flash_attn_func(q * 0.5, k, v))


def make_cache(batch_cache=3, seqlen_cache=10, nheads_k=2, d=8):
    shape = (batch_cache, seqlen_cache, nheads_k, d)
    return torch.randn(shape), torch.randn(shape)  # k_cache, v_cache


def test_kvcache_appends_in_place_and_attends_to_prefix():
    torch.manual_seed(0)
    k_cache, v_cache = make_cache()
    k0, v0 = k_cache.clone(), v_cache.clone()
    q, k, v = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 2, 8), torch.randn(3, 2, 2, 8)
    seqlens = torch.tensor([0, 3, 8], dtype=I32)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True,
                                          return_softmax_lse=True)
    assert torch.equal(seqlens, torch.tensor([0, 3, 8], dtype=I32))  # not advanced
    assert lse.shape == (3, 4, 2) and lse.dtype == torch.float32
    for b, s in enumerate([0, 3, 8]):
        assert torch.equal(k_cache[b, s:s + 2], k[b]) and torch.equal(v_cache[b, s:s + 2], v[b])
        assert torch.equal(k_cache[b, :s], k0[b, :s]) and torch.equal(k_cache[b, s + 2:], k0[b, s + 2:])
        assert torch.equal(v_cache[b, s + 2:], v0[b, s + 2:])
        keys, vals = k_cache[b, :s + 2], v_cache[b, :s + 2]
        close(out[b], sdpa_reference(q[b], keys, vals, True))
        keys_h = keys.repeat_interleave(2, dim=1)  # (Tk, H, D)
        scores = torch.einsum("qhd,khd->hqk", q[b], keys_h) / 8 ** 0.5  # (H, Tq, Tk)
        causal = torch.arange(s + 2)[None, :] <= torch.arange(2)[:, None] + s  # (Tq, Tk)
        torch.testing.assert_close(lse[b], scores.masked_fill(~causal, float("-inf")).logsumexp(-1))


def test_kvcache_batch_idx_remaps_rows():
    torch.manual_seed(0)
    k_cache, v_cache = make_cache()
    k0 = k_cache.clone()
    q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    seqlens, idx = torch.tensor([4, 6], dtype=I32), torch.tensor([2, 0], dtype=I32)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, cache_batch_idx=idx,
                                     causal=True)
    assert torch.equal(k_cache[1], k0[1])  # unmapped cache row untouched
    for b, (row, s) in enumerate([(2, 4), (0, 6)]):
        assert torch.equal(k_cache[row, s], k[b, 0]) and torch.equal(v_cache[row, s], v[b, 0])
        ref = sdpa_reference(q[b], k_cache[row, :s + 1], v_cache[row, :s + 1], True)
        close(out[b], ref)


def test_kvcache_leftpad_skips_padding_and_no_new_keys():
    torch.manual_seed(0)
    k_cache, v_cache = make_cache(batch_cache=2)
    q = torch.randn(2, 3, 4, 8)
    seqlens, pad = torch.tensor([7, 9], dtype=I32), torch.tensor([2, 0], dtype=I32)
    kw = dict(cache_seqlens=seqlens, cache_leftpad=pad, causal=True)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    for b, (p, s) in enumerate([(2, 7), (0, 9)]):
        ref = sdpa_reference(q[b], k_cache[b, :s], v_cache[b, :s], True, key_lo=p)
        close(out[b], ref)
    k_cache[0, :2] = 100.0  # the padding before leftpad must not matter
    again = fa.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    torch.testing.assert_close(again, out)
    whole = fa.flash_attn_with_kvcache(q, k_cache, v_cache)  # no cache_seqlens: the whole cache
    close(whole[1], sdpa_reference(q[1], k_cache[1], v_cache[1], False))


def test_bf16_in_bf16_out():
    torch.manual_seed(0)
    q, cu = packed([3, 4], 4, 8)
    k, v = torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    out = fa.flash_attn_varlen_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, cu, 4, 4, causal=True)
    ref = fa.flash_attn_varlen_func(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(),
                                    cu, cu, 4, 4, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    k_cache, v_cache = (t.bfloat16() for t in make_cache())
    kv_out = fa.flash_attn_with_kvcache(q[None, :2].bfloat16(), k_cache, v_cache, k[None, :2].bfloat16(),
                                       v[None, :2].bfloat16(), cache_seqlens=torch.tensor([3], dtype=I32))
    assert kv_out.dtype == torch.bfloat16 and k_cache.dtype == torch.bfloat16


def test_int64_index_tensors_raise():
    q, k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    cu32, cu64 = torch.tensor([0, 4], dtype=I32), torch.tensor([0, 4])
    with pytest.raises(RuntimeError, match="cu_seqlens_q must have dtype torch.int32"):
        fa.flash_attn_varlen_func(q, k, v, cu64, cu32, 4, 4)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must have dtype torch.int32"):
        fa.flash_attn_varlen_func(q, k, v, cu32, cu64, 4, 4)
    k_cache, v_cache = make_cache()
    qc = torch.randn(1, 1, 2, 8)
    for name in ("cache_seqlens", "cache_batch_idx", "cache_leftpad"):
        with pytest.raises(RuntimeError, match=f"{name} must have dtype torch.int32"):
            fa.flash_attn_with_kvcache(qc, k_cache, v_cache, **{name: torch.tensor([0])})


@pytest.mark.parametrize("bad, match", [
    ("no_leading_zero", "must start at 0"), ("wrong_total", "end at total tokens"),
    ("short_max", "longest sequence"), ("batch_mismatch", "batch mismatch"), ("heads", "must divide"),
    ("headdim", "at most 256"), ("dtype", "same dtype"),
])
def test_bad_inputs_raise(bad, match):
    q, k, v = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    cu_q = cu_k = torch.tensor([0, 2, 6], dtype=I32)
    max_q, max_k = 4, 4
    if bad == "no_leading_zero":
        cu_q = torch.tensor([1, 2, 6], dtype=I32)
    elif bad == "wrong_total":
        cu_q = torch.tensor([0, 2, 5], dtype=I32)
    elif bad == "short_max":
        max_q = 3
    elif bad == "batch_mismatch":
        cu_k, max_k = torch.tensor([0, 6], dtype=I32), 6
    elif bad == "heads":
        q = torch.randn(6, 3, 8)
    elif bad == "headdim":
        q, k, v = torch.randn(6, 4, 264), torch.randn(6, 2, 264), torch.randn(6, 2, 264)
    elif bad == "dtype":
        k = k.bfloat16()
    with pytest.raises(RuntimeError, match=match):
        fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)


def test_kvcache_fully_masked_row_zero_output_inf_lse():
    torch.manual_seed(0)
    k_cache, v_cache = make_cache(batch_cache=1)
    q, k, v = torch.randn(1, 3, 4, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    # 2 visible keys, 3 queries, bottom-right causal: query 0 sees none, query 1 key 0, query 2 keys 0-1
    seqlens = torch.tensor([1], dtype=I32)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True,
                                          return_softmax_lse=True)
    assert torch.equal(out[0, 0], torch.zeros(4, 8))
    assert torch.isinf(lse[0, :, 0]).all() and (lse[0, :, 0] > 0).all()  # the kernel reports +inf
    assert torch.isfinite(lse[0, :, 1:]).all()
    close(out[0], sdpa_reference(q[0], k_cache[0, :2], v_cache[0, :2], True))


def test_kvcache_bad_calls_raise():
    k_cache, v_cache = make_cache()
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    with pytest.raises(RuntimeError, match="cache_seqlens must also be passed"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v)
    with pytest.raises(RuntimeError, match="out of range"):  # 9 + 2 new keys overflow a 10-long cache
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([9], dtype=I32))
    with pytest.raises(RuntimeError, match="must have shape"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([1, 2], dtype=I32))


@pytest.mark.parametrize("kwargs", [dict(dropout_p=0.1), dict(window_size=(4, 0)), dict(softcap=30.0),
                                    dict(alibi_slopes=torch.ones(2)), dict(return_attn_probs=True)])
def test_unsupported_features_raise(kwargs):
    x = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=I32)
    with pytest.raises(NotImplementedError):
        fa.flash_attn_varlen_func(x, x, x, cu, cu, 4, 4, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(rotary_cos=torch.ones(10, 4)), dict(rotary_sin=torch.ones(10, 4)),
                                    dict(softcap=1.0)])
def test_kvcache_unsupported_features_raise(kwargs):
    k_cache, v_cache = make_cache()
    with pytest.raises(NotImplementedError):
        fa.flash_attn_with_kvcache(torch.randn(1, 1, 2, 8), k_cache, v_cache, **kwargs)


def test_is_test_double():
    assert fa.IS_TEST_DOUBLE is True


def test_kvcache_block_table_reads_pages():
    """A paged cache (pages of 256) read through block_table equals the per-row cache it stands
    for; pages not a multiple of 256, or new k/v with a block table, raise."""
    torch.manual_seed(0)
    pool_k, pool_v = torch.randn(4, 256, 1, 8), torch.randn(4, 256, 1, 8)
    table = torch.tensor([[2, 0], [3, 1]], dtype=I32)
    q = torch.randn(2, 1, 2, 8)
    seqlens = torch.tensor([260, 7], dtype=I32)
    out = fa.flash_attn_with_kvcache(q, pool_k, pool_v, cache_seqlens=seqlens, block_table=table,
                                     causal=True)
    rows_k = pool_k[table.long()].reshape(2, 512, 1, 8)
    rows_v = pool_v[table.long()].reshape(2, 512, 1, 8)
    ref = fa.flash_attn_with_kvcache(q, rows_k, rows_v, cache_seqlens=seqlens, causal=True)
    torch.testing.assert_close(out, ref)
    with pytest.raises(RuntimeError, match="divisible by 256"):
        fa.flash_attn_with_kvcache(q, pool_k[:, :16], pool_v[:, :16], cache_seqlens=seqlens,
                                   block_table=table)
    with pytest.raises(NotImplementedError):
        fa.flash_attn_with_kvcache(q, pool_k, pool_v, q[:, :, :1], q[:, :, :1],
                                   cache_seqlens=seqlens, block_table=table)
