"""Test models: tiny random-init HF checkpoints, and the real SmolLM2 converted from its GGUF file.

Tests, the CPU demo (`--model tiny`) and the benchmarks use these: nothing is downloaded.
`make_tiny_checkpoint(out_dir, arch="llama")` writes a Llama-3-style model (GQA, llama3 rope
scaling, untied head, `<|eot_id|>` turn end); `arch="qwen2"` a Qwen2-style one (q/k/v bias, tied
embeddings, ChatML `<|im_end|>` turn end). Keyword overrides change any config.json field.

`real_model()` converts ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf (a real pretrained
Llama-architecture instruct model: GQA 9/3 heads, tied embeddings, vocab 49,152, ChatML) into a
plain HF checkpoint once, into a cache dir, and returns its path; FileNotFoundError, saying what
is missing and where it was looked for, when the file is absent (tests skip with that reason).
"""
import fcntl
import os
from pathlib import Path

import torch
import torch.nn as nn

from model import CausalLM, ModelConfig, RMSNorm, save_model

SPECIALS = {
    "llama": dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", eot="<|eot_id|>",
                  extra=["<|start_header_id|>", "<|end_header_id|>"]),
    "qwen2": dict(bos=None, eos="<|endoftext|>", eot="<|im_end|>", extra=["<|im_start|>"]),
}
TEMPLATES = {
    "llama": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
              "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "qwen2": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
# Text the byte-level BPE learns its merges from: the words of the prompts and answers it will see.
CORPUS = [
    "Question: Which organ pumps blood through the body?\n\nOptions:\nA. heart\nB. lung\n"
    "C. liver\nD. kidney\n\nPlease reason step by step, and put the final answer in \\boxed{}.",
    "The answer is \\boxed{A}. The answer is \\boxed{B}. The answer is \\boxed{C}. \\boxed{D}",
    "<think> The patient has a fever and a cough. </think> <answer> B </answer>",
    "A conversation between User and Assistant. The Assistant first thinks about the reasoning "
    "process and then provides the answer, in <think> </think> and <answer> </answer> tags.",
    "system user assistant patient disease treatment diagnosis symptoms drug dose infection",
]


# Whole boxed answers as single tokens, so that a random-init model emits a well-formed answer
# now and then and RL on the demo task has a signal from the first step (a real instruct model
# starts out knowing the format; the demo's model starts out knowing these tokens exist).
ANSWER_TOKENS = ["\\boxed{A}", "\\boxed{B}", "\\boxed{C}", "\\boxed{D}"]


def tiny_tokenizer(arch: str = "llama", vocab_size: int = 380):
    """Byte-level BPE (any text encodes) with the arch's special tokens, chat template and the
    ANSWER_TOKENS; len() is vocab_size + 4."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    sp = SPECIALS[arch]
    specials = [t for t in (sp["bos"], sp["eos"], sp["eot"], *sp["extra"]) if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=sp["bos"], eos_token=sp["eos"],
                                  pad_token=sp["eos"], chat_template=TEMPLATES[arch])
    out.add_tokens([AddedToken(t, normalized=False) for t in ANSWER_TOKENS])
    return out


def tiny_config(arch: str, vocab_size: int, **overrides) -> dict:
    cfg = dict(architectures=["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
               model_type=arch, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               rms_norm_eps=1e-5, max_position_embeddings=1024, hidden_act="silu",
               initializer_range=0.02)
    if arch == "llama":
        cfg.update(tie_word_embeddings=False, attention_bias=False, rope_theta=10000.0,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=64))
    else:
        cfg.update(tie_word_embeddings=True, rope_theta=10000.0, use_sliding_window=False)
    cfg.update(overrides)
    return cfg


def make_tiny_checkpoint(out_dir: str, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """Write a random-init checkpoint (weights ~ N(0, 0.02), biases too) and return out_dir."""
    tok = tiny_tokenizer(arch)
    vocab = overrides.pop("vocab_size", len(tok))
    cfg = tiny_config(arch, vocab, **overrides)
    sp = SPECIALS[arch]
    cfg.update(bos_token_id=tok.convert_tokens_to_ids(sp["bos"]) if sp["bos"] else None,
               eos_token_id=tok.convert_tokens_to_ids(sp["eos"]))
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf(cfg))
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)
    for m in model.modules():  # norms start at 1 as in real checkpoints
        if isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
    model.tie_weights()
    # The answer tokens end a turn too, so a demo completion is free text, then one answer.
    stops = [cfg["eos_token_id"]] + tok.convert_tokens_to_ids([sp["eot"]] + ANSWER_TOKENS)
    model.generation_config = dict(bos_token_id=cfg["bos_token_id"], eos_token_id=stops)
    save_model(model, tok, out_dir)
    return out_dir


SHARED_MODELS = Path(__file__).resolve().parent.parent / "shared" / "models"
REAL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_model(cache_dir: str | None = None) -> str:
    """The HF checkpoint dir of SmolLM2-135M-Instruct converted from ../shared/models (once; later
    calls reuse it, concurrent ones wait for the first). FileNotFoundError when the GGUF file is
    absent, naming it and where it was looked for."""
    gguf = SHARED_MODELS / REAL_GGUF
    if not gguf.exists():
        folder = "holds no such file" if SHARED_MODELS.is_dir() else "does not exist"
        raise FileNotFoundError(f"no real test model: {gguf} is absent ({SHARED_MODELS} {folder});"
                                f" the SmolLM2-135M-Instruct GGUF file is looked for in "
                                f"../shared/models beside the repo")
    cache = Path(cache_dir or os.environ.get("MEDRL_CACHE", Path.home() / ".cache" / "medrl"))
    out = cache / f"{REAL_GGUF.removesuffix('.gguf')}-{gguf.stat().st_size}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time (pytest-xdist workers)
        if not (out / "config.json").exists():
            _convert_gguf(gguf, out)
    return str(out)


def _convert_gguf(gguf: Path, out: Path):
    """transformers' GGUF reader dequantises the weights (and undoes llama.cpp's q/k row order);
    save_pretrained writes a plain Llama checkpoint with the tokenizer and its chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    info = load_gguf_checkpoint(str(gguf), return_tensors=False)
    config = LlamaConfig(**{k: v for k, v in info["config"].items() if not k.startswith("_")})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(tensors, strict=False)  # tied: no lm_head.weight of its own
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
