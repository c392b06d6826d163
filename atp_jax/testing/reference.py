"""The PyTorch/transformers reference LLaVA built from our config: random weights, no downloads.

Used by the parity tests, the demo and the benchmarks; needs the `torch` extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from atp_jax.models.config import LlavaConfig


def hf_model(cfg: LlavaConfig, seed: int = 0, dtype: str = "float32"):
    """A transformers `LlavaForConditionalGeneration` with random weights (eval mode, eager-free sdpa)."""
    import torch
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    hf_cfg = HFLlavaConfig(**cfg.to_hf_dict())
    # Wider than HF's 0.02 init so that logits are O(1) and a 1e-4 parity bound is a tight one.
    hf_cfg.text_config.initializer_range = hf_cfg.vision_config.initializer_range = 0.15
    model = LlavaForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # HF inits norms to ones and biases to zeros: randomise so parity means something
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(getattr(torch, dtype))


def save_hf_model(cfg: LlavaConfig, directory: str | Path, seed: int = 0, dtype: str = "float32"):
    model = hf_model(cfg, seed, dtype)
    model.save_pretrained(directory)
    return model


def hf_logits(model, input_ids, pixel_values=None, attention_mask=None, position_ids=None) -> np.ndarray:
    import torch

    def t(x, dtype=None):
        return None if x is None else torch.as_tensor(np.array(x), dtype=dtype)

    with torch.no_grad():
        out = model(input_ids=t(input_ids, torch.long), pixel_values=t(pixel_values, model.dtype),
                    attention_mask=t(attention_mask, torch.long), position_ids=t(position_ids, torch.long))
    return out.logits.float().numpy()


def random_inputs(cfg: LlavaConfig, batch: int, text_len: int, seed: int = 0, image_at: int = 1):
    """input_ids [B, T] with one image (num_image_tokens placeholders) after `image_at` text tokens, and pixels."""
    rng = np.random.default_rng(seed)
    p = cfg.num_image_tokens
    vocab = [i for i in range(3, cfg.text.vocab_size) if i != cfg.image_token_index]
    text = rng.choice(vocab, size=(batch, text_len))
    ids = np.concatenate([text[:, :image_at], np.full((batch, p), cfg.image_token_index), text[:, image_at:]], axis=1)
    ids[:, 0] = cfg.text.bos_token_id if cfg.text.bos_token_id is not None else ids[:, 0]
    size = cfg.vision.image_size
    pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    return ids.astype(np.int32), pixels
