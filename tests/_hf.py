"""A small random transformers Llama, shared by the tests that compare with Hugging Face."""

from __future__ import annotations

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
)
ROPE_THETA = 5000.0


def random_hf_llama(*, tied: bool, seed: int = 0) -> object:
    """A transformers `LlamaForCausalLM` of size `SMALL` with random weights and norm scales near 1."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**SMALL, tie_word_embeddings=tied)
    # transformers >= 5 keeps rope settings in `rope_parameters`, older in `rope_theta`.
    if getattr(config, "rope_parameters", None) is not None:
        config.rope_parameters = {"rope_type": "default", "rope_theta": ROPE_THETA}
    else:
        config.rope_theta = ROPE_THETA
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2 if param.ndim == 1 else 0.05)
            if param.ndim == 1:
                param.add_(1.0)
    return model
