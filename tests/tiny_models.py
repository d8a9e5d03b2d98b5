"""Tiny random-weight HF models of every supported family, saved as HF directories (test-only, uses torch)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 96


def _configs() -> dict:
    rotary = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    neox = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                max_position_embeddings=64, rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                bos_token_id=1, eos_token_id=2, hidden_act="gelu")
    return {
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                        bos_token_id=1, eos_token_id=2),
        "llama_mha": transformers.LlamaConfig(**rotary, num_attention_heads=4, num_key_value_heads=4,
                                              tie_word_embeddings=False),
        "llama3_gqa": transformers.LlamaConfig(
            **rotary, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "gemma": transformers.GemmaConfig(**rotary, num_attention_heads=4, num_key_value_heads=1, head_dim=16),
        "gemma2": transformers.Gemma2Config(
            **rotary, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
            query_pre_attn_scalar=12, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
        "gemma3": transformers.Gemma3TextConfig(
            **{**rotary, "num_hidden_layers": 4}, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            sliding_window=4, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}),
        # each config exercises its family's quirk; `tests/test_families.py` checks that it does
        "qwen2": transformers.Qwen2Config(**rotary, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=True),
        "qwen3": transformers.Qwen3Config(**rotary, num_attention_heads=4, num_key_value_heads=2, head_dim=12),
        "mistral": transformers.MistralConfig(**rotary, num_attention_heads=4, num_key_value_heads=2, sliding_window=4),
        "gpt_neox": transformers.GPTNeoXConfig(**neox, use_parallel_residual=True),
        "gpt_neox_sequential": transformers.GPTNeoXConfig(**neox, use_parallel_residual=False),
        "olmo2": transformers.Olmo2Config(**rotary, num_attention_heads=4, num_key_value_heads=2),
    }


FAMILIES = tuple(_configs())


def make_hf_model(name: str, seed: int = 0):
    """A float32 eager-attention HF model whose every weight (norms included) is random."""
    config = _configs()[name]
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def save_hf_model(name: str, out_dir, seed: int = 0):
    model = make_hf_model(name, seed)
    model.save_pretrained(out_dir)
    return model


def padded_batch(padding_side: str, lengths=(9, 6, 3), seed: int = 0):
    """Random token ids [B,T] and mask [B,T] with rows of the given real lengths."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        span = slice(0, n) if padding_side == "right" else slice(t - n, t)
        ids[i, span] = rng.integers(3, VOCAB, n)
        mask[i, span] = 1
    return ids, mask


def hf_positions(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def hf_forward(model, ids, mask, **kwargs):
    """HF outputs with explicit position ids (counted over real tokens)."""
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     position_ids=torch.as_tensor(hf_positions(mask)), **kwargs)
