"""Configuration of Qwen-VL-Chat (`model_type: qwen`), read from the hub checkpoint's own config.json.

Field names and defaults follow the checkpoint, so an unmodified Qwen-VL-Chat config.json loads as is.
"""

from __future__ import annotations

from transformers import PretrainedConfig

# Token ids of the Qwen-VL vocabulary that the architecture itself depends on.
IMAGE_START_ID = 151857  # <img>
IMAGE_END_ID = 151858  # </img>
IMAGE_PAD_ID = 151859  # <imgpad>
IMAGE_TOKENS = 256  # the resampler's output length: positions between <img> and </img>

DEFAULT_VISUAL = {"heads": 16, "image_size": 448, "image_start_id": IMAGE_START_ID, "layers": 48,
                  "mlp_ratio": 4.9231, "output_dim": 4096, "patch_size": 14, "width": 1664}


class QwenVLConfig(PretrainedConfig):
    """The language model's settings at the top level, the vision tower's in `visual` (a dict)."""

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=151936, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 intermediate_size=22016, kv_channels=128, layer_norm_epsilon=1e-6, initializer_range=0.02,
                 max_position_embeddings=8192, seq_length=2048, rotary_emb_base=10000, rotary_pct=1.0,
                 scale_attn_weights=True, use_dynamic_ntk=True, use_logn_attn=True, no_bias=True,
                 emb_dropout_prob=0.0, attn_dropout_prob=0.0, use_cache=True, tie_word_embeddings=False,
                 visual=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.kv_channels = kv_channels
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.seq_length = seq_length  # the training length: dynamic NTK and logn scaling start past it
        self.rotary_emb_base = rotary_emb_base
        self.rotary_pct = rotary_pct
        self.scale_attn_weights = scale_attn_weights
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.no_bias = no_bias
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.use_cache = use_cache
        self.visual = {**DEFAULT_VISUAL, **(visual or {})}
        # The checkpoint's precision flags (bf16/fp16/fp32, use_flash_attn) and tokenizer_type arrive
        # in kwargs and are kept as plain attributes; loading picks the dtype with `dtype=`.
        kwargs.setdefault("bos_token_id", None)
        kwargs.setdefault("eos_token_id", 151643)
        kwargs.setdefault("pad_token_id", 151643)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
