"""Tiny random Hugging Face checkpoints for the conversion tests (built here, nothing downloaded),
and our model built from one the way the trainer builds it (recipe -> validate -> init_from)."""
import os

import torch

VOCAB = 320
"""Above the byte tokenizer's 257 ids, a multiple of 2 (tp=2 splits the vocabulary)."""

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

CASES = {
    # name: (architecture, config keywords)
    "llama_gqa": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama3_rope": ("llama", {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 16384}),
    "qwen2_bias": ("qwen2", {}),
    "mistral": ("mistral", {"sliding_window": None}),
}
"""GQA 4:2 everywhere; untied and tied embeddings, rope base 500000 with Llama-3 scaling, q/k/v biases."""


def save_hf_model(folder, arch: str = "llama", *, layers: int = 2, seed: int = 0, **config_keywords):
    """A random ``arch`` model (hidden 64, 4 query / 2 kv heads, ffn 96, vocab VOCAB) saved with our byte
    tokenizer into ``folder``; returns the model (eval mode). Weights are drawn wider than
    transformers' init (matrices std 0.2, norms around 1, biases std 0.2) so that logits differ
    clearly between tokens and a wrong mapping shows."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    from megatron_s2.hf.tokenizer import byte_tokenizer

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    keywords = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5, eos_token_id=256,
                    bos_token_id=None, pad_token_id=256)
    config = config_cls(**{**keywords, **config_keywords})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.2 * noise)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model


def recipe_config(hf_dir, layout: str, recipes_dir, *overrides, world_size: int = 1):
    """The validated config of ``scripts/convert_hf.py recipe`` for ``hf_dir`` (seq 64, no wandb)."""
    from megatron_s2.hf.recipe import write_recipe
    from megatron_s2.training.config import compose_config, validate

    name = "from_" + os.path.basename(str(hf_dir))
    write_recipe(str(hf_dir), layout, os.path.join(str(recipes_dir), name + ".yaml"),
                 overrides=["train.seq_length=64", "logging.wandb.mode=disabled", *overrides])
    return validate(compose_config([], recipe=name, recipes_dir=str(recipes_dir)), world_size=world_size)


def our_logits(cfg, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab] (this TP rank's vocabulary slice) of our model built and initialised as
    the trainer does it from ``cfg`` (checkpoint.init_from); inside a model-parallel session."""
    from megatron_s2.evaluation.checkpoints import logits_function
    from megatron_s2.training.init_from import load_init_from
    from megatron_s2.training.loop import build_model, transformer_config

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, transformer_config(cfg), cfg.model.vocab_size).eval()
    load_init_from(model, cfg)
    with torch.no_grad():
        return logits_function(model)(tokens)


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (float64)."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max()).item()
