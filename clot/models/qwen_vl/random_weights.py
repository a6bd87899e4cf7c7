"""Seeded random weights for a tiny Qwen-VL-Chat, identical in any environment with the same torch.

The parity fixtures (tests/reference/record_qwen_vl_model.py) are recorded from the original remote code
in a separate transformers 4.32 environment; the tests rebuild the same weights here and compare.
Each tensor is drawn from its own generator seeded by (seed, name), so the values depend only on
the checkpoint key and shape, never on module construction order. This file imports only torch
and the standard library so that the reference environment can load it by path.
"""

from __future__ import annotations

import math
import zlib

import torch

SEED = 1234

# A tiny Qwen-VL-Chat: the real vocabulary and special-token ids, small everything else. The
# resampler has hidden // 128 heads, so hidden must be a multiple of 128. seq_length is shortened
# from 2048 so that image prompts run past it and exercise dynamic NTK and logn scaling.
TINY_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "model_type": "qwen",
    "vocab_size": 151936,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 64,
    "layer_norm_epsilon": 1e-6,
    "max_position_embeddings": 8192,
    "seq_length": 256,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "scale_attn_weights": True,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "use_flash_attn": False,
    "no_bias": True,
    "attn_dropout_prob": 0.0,
    "emb_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bf16": False,
    "fp16": False,
    "fp32": True,
    "use_cache": True,
    "tokenizer_type": "QWenTokenizer",
    "visual": {
        "heads": 4,
        "image_size": 448,
        "image_start_id": 151857,
        "layers": 2,
        "mlp_ratio": 4.9231,
        "output_dim": 256,
        "patch_size": 14,
        "width": 64,
    },
}


def random_tensor(name: str, shape: tuple[int, ...], seed: int = SEED) -> torch.Tensor:
    """Matrices ~ N(0, 1/fan_in) so activations keep unit scale; 1-D weights (norms) ~ 1 + N(0, 0.1²);
    other 1-D tensors (biases) ~ N(0, 0.02²). fp32, on the CPU."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(shape) >= 2:
        return values / math.sqrt(math.prod(shape[1:]))
    if name.endswith("weight"):
        return 1.0 + 0.1 * values
    return 0.02 * values


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict[str, torch.Tensor]:
    """A value for every key of a state dict, given its names and shapes."""
    return {name: random_tensor(name, tuple(shape), seed) for name, shape in sorted(shapes.items())}


def fill_(model: torch.nn.Module, seed: int = SEED) -> torch.nn.Module:
    """Overwrite every parameter and persistent buffer of `model` with the seeded values."""
    state = model.state_dict()
    values = random_state_dict({k: tuple(v.shape) for k, v in state.items()}, seed)
    model.load_state_dict(values, strict=True)
    return model
