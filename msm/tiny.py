"""A tiny randomly initialised Llama with SmolLM2's tokenizer: fast stand-in for tests.

It has the real model's architecture and vocabulary, so training and eval plumbing see the
same token ids, chat template and shapes, at a fraction of the cost.
"""

from __future__ import annotations


def tiny_causal_lm(hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   intermediate_size: int = 128, max_positions: int = 512, seed: int = 0):
    """(model, tokenizer) with random weights; the tokenizer is SmolLM2's (extracted once)."""
    from msm.models import _silence_transformers, ensure_tokenizer

    tokenizer_dir = ensure_tokenizer()
    _silence_transformers()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer
