"""model.py against transformers: logits, packed path, checkpoint I/O, log-probs, errors."""
import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model as M
from tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_tiny_checkpoint(str(root / arch), arch, seed=1) for arch in ("llama", "qwen2")}


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_tiny_configs_cover_the_features(ckpts):
    llama = M.load_model(ckpts["llama"]).config
    qwen = M.load_model(ckpts["qwen2"]).config
    assert llama.num_key_value_heads < llama.num_attention_heads and llama.rope_scaling is not None
    assert not llama.tie_word_embeddings and not llama.qkv_bias
    assert qwen.tie_word_embeddings and qwen.qkv_bias


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_match_transformers(ckpts, arch):
    torch.manual_seed(0)
    ids = torch.randint(0, 384, (3, 90))  # longer than llama3's original context (64)
    ours = M.load_model(ckpts[arch])(ids)
    ref = hf_model(ckpts[arch])(ids).logits
    assert ours.shape == ref.shape == (3, 90, 384)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_ragged_matches_transformers(ckpts, arch):
    torch.manual_seed(0)
    seqs = [torch.randint(0, 384, (n,)).tolist() for n in (5, 31, 1, 17)]
    ids, pos, cu, mx = M.pack(seqs)
    ours = M.load_model(ckpts[arch])(ids, pos, cu, mx)  # (N, V)
    hf = hf_model(ckpts[arch])
    ref = torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_flash_path_matches_sdpa(ckpts, monkeypatch):
    import flash_attn_double
    torch.manual_seed(0)
    seqs = [torch.randint(0, 384, (n,)).tolist() for n in (7, 23, 2)]
    ids, pos, cu, mx = M.pack(seqs)
    m = M.load_model(ckpts["llama"])
    ref = m(ids, pos, cu, mx)
    monkeypatch.setattr(M, "FLASH", flash_attn_double)
    assert M.attention_backend(ref.device.type, ref.dtype) == "flash-attn"
    out = m(ids, pos, cu, mx)
    assert (out - ref).abs().max().item() <= 1e-5


def test_flash_attn_needs_cuda_half_with_the_real_package(monkeypatch):
    monkeypatch.setattr(M, "FLASH", object())  # a "real" flash_attn: no IS_TEST_DOUBLE
    assert M.attention_backend("cpu", torch.bfloat16) != "flash-attn"  # CPU tensor
    monkeypatch.setattr(M, "FLASH", None)
    assert M.attention_backend("cpu", torch.float32) != "flash-attn"


def test_old_and_new_rope_config_formats_agree(ckpts, tmp_path):
    with open(os.path.join(ckpts["llama"], "config.json")) as f:
        cfg = json.load(f)
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    new = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    legacy = dict(old, rope_scaling={**{k: v for k, v in cfg["rope_scaling"].items()
                                        if k != "rope_type"}, "type": "llama3"})
    parsed = [M.ModelConfig.from_hf(c) for c in (old, new, legacy)]
    assert parsed[0].rope_scaling["factor"] == 8.0
    for p in parsed[1:]:
        assert (p.rope_theta, p.rope_scaling["factor"]) == (parsed[0].rope_theta, 8.0)
        assert torch.equal(M.rope_inv_freq(p), M.rope_inv_freq(parsed[0]))
    # Scaling changes the low frequencies only: the highest one is kept.
    plain = M.rope_inv_freq(M.ModelConfig.from_hf(dict(new, rope_parameters={"rope_theta": 10000.0})))
    scaled = M.rope_inv_freq(parsed[0])
    assert scaled[0] == plain[0] and scaled[-1] < plain[-1]


def test_save_model_loads_in_transformers(ckpts, tmp_path):
    m = M.load_model(ckpts["qwen2"])
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.mul_(3.0)  # make it differ from the source
    tok = AutoTokenizer.from_pretrained(ckpts["qwen2"])
    out = str(tmp_path / "saved")
    M.save_model(m, tok, out, max_shard_bytes=60_000)  # forces several shards
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert not os.path.exists(out + ".tmp")
    ids = torch.randint(0, 384, (2, 20))
    ref = hf_model(out)(ids).logits
    assert (m(ids) - ref).abs().max().item() <= 1e-5
    assert (M.load_model(out)(ids) - ref).abs().max().item() <= 1e-5
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template


def test_sharded_transformers_checkpoint_loads(ckpts, tmp_path):
    hf = hf_model(ckpts["llama"])
    out = str(tmp_path / "hf_sharded")
    hf.save_pretrained(out, max_shard_size="50KB")
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    ids = torch.randint(0, 384, (2, 20))
    assert (M.load_model(out)(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_chunked_logprobs_match_naive():
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    t = torch.randint(0, 300, (50,))
    for temp in (1.0, 0.7):
        lp, ent = M.token_logprobs(h, w, t, temp, entropy=True, chunk=16)
        logp_all = torch.log_softmax((h.double() @ w.double().t()) / temp, dim=-1)
        ref = logp_all.gather(-1, t[:, None]).squeeze(-1)
        ref_ent = -(logp_all.exp() * logp_all).sum(-1)
        assert (lp - ref).abs().max().item() <= 1e-5
        assert (ent - ref_ent).abs().max().item() <= 1e-5
        g = torch.autograd.grad((lp * torch.arange(50.0)).sum() + ent.sum(), (h, w))
        g_ref = torch.autograd.grad((ref * torch.arange(50.0)).sum() + ref_ent.sum(), (h, w))
        for a, b in zip(g, g_ref):  # float32 against a float64 reference, relative to scale
            assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_forward_targets_gives_logprobs_of_logits(ckpts):
    m = M.load_model(ckpts["llama"])
    seqs = [[5, 9, 12, 40], [7, 7, 3]]
    ids, pos, cu, mx = M.pack(seqs)
    targets = torch.roll(ids, -1)
    lp, ent = m(ids, pos, cu, mx, targets=targets, temperature=0.5)
    ref = torch.log_softmax(m(ids, pos, cu, mx) / 0.5, -1).gather(-1, targets[:, None])[:, 0]
    assert ent is None and (lp - ref).abs().max().item() <= 1e-5


def test_gradient_checkpointing_gives_same_grads(ckpts):
    ids = torch.randint(0, 384, (2, 12))
    grads = []
    for ckpt in (False, True):
        m = M.load_model(ckpts["llama"])
        m.gradient_checkpointing = ckpt
        m(ids).square().mean().backward()
        grads.append(m.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_critic_checkpoint_is_a_transformers_value_model(ckpts, tmp_path, arch):
    """A saved critic loads in transformers as XForTokenClassification (one label) with its trained
    head, and gives the values medrl's critic gives."""
    from transformers import AutoModelForTokenClassification
    critic = M.load_model(ckpts[arch], value_head=True)
    ids, pos, cu, mx = M.pack([[1, 2, 3], [4, 5]])
    v = critic(ids, pos, cu, mx)
    assert v.shape == (5,) and torch.all(v == 0)  # zero-initialised head
    torch.manual_seed(0)
    with torch.no_grad():
        critic.score.weight.normal_(std=0.5)
        critic.score.bias.fill_(0.5)
    M.save_model(critic, None, str(tmp_path / "critic"))
    with open(tmp_path / "critic" / "config.json") as f:
        assert json.load(f)["architectures"][0].endswith("ForTokenClassification")
    again = M.load_model(str(tmp_path / "critic"))
    # safetensors hands out views at file offsets (score.weight sat 4 bytes aligned, and CPU
    # kernels round differently there): loaded weights get aligned memory of their own
    assert all(p.data_ptr() % 64 == 0 for p in again.parameters())
    ours = again(ids, pos, cu, mx)
    assert again.config.value_head and torch.equal(ours, critic(ids, pos, cu, mx))
    hf = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "critic"), dtype=torch.float32)
    hf_values = torch.cat([hf(torch.tensor([s])).logits[0, :, 0] for s in ([1, 2, 3], [4, 5])])
    assert hf.config.num_labels == 1 and torch.equal(hf.score.bias, critic.score.bias)
    assert (hf_values - ours).abs().max() < 1e-5 and ours.std() > 0


# ----------------------------------------------------------------------------- errors

def _copy(src, dst, edit_cfg=None, edit_state=None):
    shutil.copytree(src, dst)
    if edit_cfg:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        edit_cfg(cfg)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    if edit_state:
        from safetensors.torch import load_file, save_file
        f = os.path.join(dst, "model.safetensors")
        state = load_file(f)
        edit_state(state)
        save_file(state, f)
    return str(dst)


@pytest.mark.parametrize("edit_cfg,edit_state,match", [
    (lambda c: c.update(architectures=["GPT2LMHeadModel"]), None, "unsupported architecture.*GPT2"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None),
     None, "rope type 'yarn'"),
    (None, lambda s: s.pop("model.norm.weight"), r"missing \['model.norm.weight'\]"),
    (None, lambda s: s.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
    (None, lambda s: s.update({"model.norm.weight": torch.ones(3)}), "model.norm.weight: file"),
    (lambda c: c.update(num_hidden_layers=3), None, "missing.*model.layers.2"),
])
def test_bad_checkpoints_fail_clearly(ckpts, tmp_path, edit_cfg, edit_state, match):
    path = _copy(ckpts["llama"], tmp_path / "bad", edit_cfg, edit_state)
    with pytest.raises(ValueError, match=match) as err:
        M.load_model(path)
    assert path in str(err.value)


def test_missing_files_fail_clearly(ckpts, tmp_path):
    path = _copy(ckpts["llama"], tmp_path / "noweights")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.load_model(path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.load_model(path)
