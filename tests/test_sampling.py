"""sampling.py: the filters keep their sets, the inverse CDF equals a float64 cumsum search, the
counter-based streams are uniform and independent."""
import pytest
import torch

import sampling as S


def test_top_k_and_top_p_never_leave_the_allowed_set():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log()[None].repeat(4000, 1)
    u = S.uniforms(S.completion_keys(0, torch.arange(4000), torch.zeros(4000, dtype=torch.long)),
                   torch.zeros(4000, dtype=torch.long))
    tok_k, _ = S.sample_tokens(logits, 1.0, 3, 1.0, u)
    assert set(tok_k.tolist()) == {0, 1, 2}
    tok_p, _ = S.sample_tokens(logits, 1.0, 0, 0.7, u)  # 0.4 + 0.25 < 0.7: token 2 is needed
    assert set(tok_p.tolist()) == {0, 1, 2}
    tok_p, _ = S.sample_tokens(logits, 1.0, 0, 0.65, u)  # 0.4 + 0.25 reaches 0.65 exactly
    assert set(tok_p.tolist()) == {0, 1}
    full, _ = S.sample_tokens(logits, 1.0, 0, 1.0, u)
    freq = torch.bincount(full, minlength=6).float() / 4000
    assert (freq - probs).abs().max() < 0.03  # the unfiltered sampler follows the distribution
    greedy, _ = S.sample_tokens(logits, 0.0, 0, 1.0, u)
    assert set(greedy.tolist()) == {0}


@pytest.mark.parametrize("vocab", [6, 256, 1000, 49152])
def test_inverse_cdf_equals_a_float64_cumsum_search(vocab):
    g = torch.Generator().manual_seed(vocab)
    weights = (torch.randn(64, vocab, generator=g) * 3).exp()
    weights[:8, 1::2] = 0  # filtered tokens
    weights[8:16, vocab // 2 + 1:] = 0  # a zero tail
    u = torch.rand(64, generator=g, dtype=torch.float64)
    u[:4] = 1 - 2.0**-54  # the largest uniform: the last token of positive weight
    cdf = weights.double().cumsum(-1)
    ref = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    last = torch.where(weights > 0, torch.arange(vocab), -1).amax(-1)
    ref = torch.minimum(ref, last)
    got = S.inverse_cdf(weights, u)
    assert torch.equal(got, ref)
    assert (weights.gather(-1, got[:, None]) > 0).all()


def test_uniforms_are_uniform_and_distinct_per_stream():
    keys = S.completion_keys(7, torch.arange(100).repeat_interleave(50), torch.arange(50).repeat(100))
    assert len(set(keys.tolist())) == 5000
    u = S.uniforms(keys, torch.zeros(5000, dtype=torch.long))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / 5000
    assert (hist - 0.1).abs().max() < 0.02
    step1 = S.uniforms(keys, torch.ones(5000, dtype=torch.long))
    assert abs(torch.corrcoef(torch.stack([u, step1]))[0, 1].item()) < 0.05
