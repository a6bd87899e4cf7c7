"""Qwen-VL-Chat (language model + vision tower) written natively on transformers 5.

Module and parameter names are exactly the hub checkpoint's (`transformer.h.N.attn.c_attn`, ...,
`transformer.visual.*`, `lm_head`), so hub weights and the official CLoT LoRA load unchanged.
Numerics follow the original remote code; tests/test_qwen_vl_model.py proves it on seeded weights
against fixtures recorded from that code. Differences from the original, all for batching:
`position_ids` are honoured (left padding, shared-prefix decoding), and the dynamic-NTK factor is
chosen per row from the row's true length instead of once from the padded length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from clot.models.qwen_vl.configuration_qwen_vl import IMAGE_END_ID, IMAGE_START_ID, IMAGE_TOKENS, QwenVLConfig
from clot.tasks import ClotError


class QwenVLRMSNorm(nn.Module):
    """RMSNorm computed in fp32, then cast back and scaled (in that order, as the original)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ----------------------------------------------------------------------------- vision tower

def resize_positions(table: torch.Tensor, count: int) -> torch.Tensor:
    """A square table of learned positions [side², C] bicubically resized to `count` = side'² rows."""
    side, new_side = int(math.sqrt(table.shape[0])), int(math.sqrt(count))
    if side == new_side:
        return table
    grid = table.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def sincos_positions_2d(dim: int, side: int) -> torch.Tensor:
    """The resampler queries' fixed 2-D sin-cos table [side², dim] (row-major grid): the first half of
    the channels encodes the column, the second the row, each as [sin, cos] over dim/4 frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim / 4))
    coords = torch.arange(side, dtype=torch.float32)
    cols, rows = coords.repeat(side), coords.repeat_interleave(side)

    def encode(positions):
        angles = positions[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


class VisualAttention(nn.Module):
    """ViT self-attention whose fused `in_proj` lays q, k and v out per head ([heads, 3, head_dim])."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.in_proj(x).view(batch, length, self.heads, 3, width // self.heads)
        query, key, value = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [batch, heads, length, head_dim]
        out = F.scaled_dot_product_attention(query, key, value)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class VisualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(width, heads, mlp_width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class Resampler(nn.Module):
    """Cross-attention of `queries` learned queries over the patch features (one layer)."""

    def __init__(self, queries: int, dim: int, kv_dim: int):
        super().__init__()
        # Stored in the checkpoint as a (frozen) parameter, so it is one here too.
        self.pos_embed = nn.Parameter(sincos_positions_2d(dim, int(math.sqrt(queries))), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, dim // 128, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        values = self.ln_kv(self.kv_proj(patches))
        keys = values + resize_positions(self.pos_embed, patches.shape[1])
        queries = (self.ln_q(self.query) + self.pos_embed).expand(patches.shape[0], -1, -1)
        return self.attn(queries, keys, values, need_weights=False)[0]


class QwenVLVisionModel(nn.Module):
    """ViT-bigG-style encoder + resampler: [images, 3, 448, 448] -> [images, 256, output_dim]."""

    def __init__(self, visual: dict):
        super().__init__()
        width, patch = visual["width"], visual["patch_size"]
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(IMAGE_TOKENS, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = VisualTransformer(width, visual["layers"], visual["heads"],
                                             int(width * visual["mlp_ratio"]))
        output_dim = visual["output_dim"]
        self.attn_pool = Resampler(visual.get("n_queries", IMAGE_TOKENS), output_dim, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(output_dim, output_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        x = self.ln_pre(x + resize_positions(self.positional_embedding, x.shape[1]))
        x = self.attn_pool(self.transformer(x))
        return self.ln_post(x) @ self.proj


# ----------------------------------------------------------------------------- language model

class QwenVLRotaryEmbedding(nn.Module):
    """Rotary angles with dynamic NTK: past `seq_length` the base grows by alpha^(dim/(dim-2)),
    alpha = 2^ceil(log2(length/seq_length) + 1) - 1, chosen per row from its length at prefill."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.dim = int(config.kv_channels * config.rotary_pct)
        self.base = config.rotary_emb_base
        self.seq_length = config.seq_length
        # Kept from prefill for decoding, as the original keeps its `_ntk_alpha_cached`: the cached
        # keys were rotated with it, so it must not change while a row grows.
        self.cached_alphas: list[float] = [1.0]

    def alpha_for(self, length: int) -> float:
        context_value = math.log(length / self.seq_length, 2) + 1
        return max(2 ** math.ceil(context_value) - 1, 1)

    def choose_alphas(self, lengths: list[int], prefill: bool) -> list[float]:
        if prefill:
            self.cached_alphas = [self.alpha_for(n) for n in lengths]
        elif len(self.cached_alphas) != len(lengths):
            # One cached prefix continued by several rows shares its alpha; any other change of batch
            # (a cache assembled elsewhere) falls back to the rows' current lengths.
            self.cached_alphas = (self.cached_alphas * len(lengths) if len(self.cached_alphas) == 1
                                  else [self.alpha_for(n) for n in lengths])
        return self.cached_alphas

    def forward(self, position_ids: torch.Tensor, alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [batch, 1, length, dim] for the given positions."""
        exponents = torch.arange(0, self.dim, 2, device=position_ids.device).float() / self.dim
        inv_freq = torch.stack([1.0 / ((self.base * alpha ** (self.dim / (self.dim - 2))) ** exponents)
                                for alpha in alphas])
        angles = position_ids.float()[:, :, None] * inv_freq[:, None, :]
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first cos.shape[-1] channels of each head (all of them at rotary_pct 1), in fp32."""
    rotated, kept = x.float().split([cos.shape[-1], x.shape[-1] - cos.shape[-1]], dim=-1)
    return torch.cat([rotated * cos + rotate_half(rotated) * sin, kept], dim=-1).type_as(x)


class QwenVLAttention(nn.Module):
    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        projection = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection)
        self.c_proj = nn.Linear(projection, config.hidden_size, bias=not config.no_bias)
        self.dropout = config.attn_dropout_prob

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                logn: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        batch, length, _ = hidden.shape
        qkv = self.c_attn(hidden).view(batch, length, 3, self.heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, heads, length, head_dim]
        query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if logn is not None:
            query = query * logn
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(out.transpose(1, 2).reshape(batch, length, -1))


class QwenVLMLP(nn.Module):
    def __init__(self, config: QwenVLConfig):
        super().__init__()
        width = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QwenVLBlock(GradientCheckpointingLayer):
    def __init__(self, config: QwenVLConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = QwenVLRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QwenVLAttention(config, layer_idx)
        self.ln_2 = QwenVLRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QwenVLMLP(config)

    def forward(self, hidden, rotary, mask, logn, cache):
        hidden = hidden + self.attn(self.ln_1(hidden), rotary, mask, logn, cache)
        return hidden + self.mlp(self.ln_2(hidden))


class QwenVLPreTrainedModel(PreTrainedModel):
    config_class = QwenVLConfig
    config: QwenVLConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QwenVLBlock", "VisualBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, QwenVLVisionModel):
            init.normal_(module.positional_embedding, std=module.positional_embedding.shape[1] ** -0.5)
            init.normal_(module.proj, std=module.proj.shape[0] ** -0.5)
        elif isinstance(module, Resampler):
            side = int(math.sqrt(module.pos_embed.shape[0]))
            init.copy_(module.pos_embed, sincos_positions_2d(module.pos_embed.shape[1], side))
            init.trunc_normal_(module.query, std=std)


class QwenVLModel(QwenVLPreTrainedModel):
    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_emb = QwenVLRotaryEmbedding(config)
        self.h = nn.ModuleList(QwenVLBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = QwenVLRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.visual = QwenVLVisionModel(config.visual)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, embeddings):
        self.wte = embeddings

    def image_runs(self, input_ids: torch.Tensor, images: int) -> list[tuple[int, int]]:
        """(row, first feature position) of each <img>...</img> run, in batch order."""
        starts = (input_ids == IMAGE_START_ID).nonzero().tolist()
        if len(starts) != images:
            raise ClotError(f"The prompt has {len(starts)} <img>...</img> runs but {images} images were given; "
                            "give exactly one image per run, in order.")
        width = input_ids.shape[1]
        for row, start in starts:
            end = start + IMAGE_TOKENS + 1
            if end >= width or input_ids[row, end] != IMAGE_END_ID:
                raise ClotError(f"Each image needs exactly {IMAGE_TOKENS} tokens between <img> and </img>.")
        return [(row, start + 1) for row, start in starts]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, pixel_values=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids and inputs_embeds.")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0

        hidden = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids to find the image positions.")
            runs = self.image_runs(input_ids, pixel_values.shape[0])
            features = self.visual(pixel_values).to(hidden.dtype)
            hidden = hidden.clone()
            for (row, start), image in zip(runs, features):
                hidden[row, start:start + IMAGE_TOKENS] = image
        hidden = self.drop(hidden)

        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=hidden.device)
        attention_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]

        # Dynamic NTK and logn scaling are inference-time length extrapolation: the original trains without.
        dynamic = not self.training
        if dynamic and self.config.use_dynamic_ntk:
            alphas = self.rotary_emb.choose_alphas(attention_mask.sum(-1).tolist(), prefill=past == 0)
        else:
            alphas = [1.0] * batch
        rotary = self.rotary_emb(position_ids, alphas)
        logn = None
        if dynamic and self.config.use_logn_attn:
            seq_length = self.config.seq_length
            scale = (position_ids.double() + 1).log() / math.log(seq_length)
            logn = torch.where(position_ids + 1 > seq_length, scale, 1.0).to(hidden.dtype)[:, None, :, None]

        # Additive mask: a row's key j is visible to query i when it is real and not in i's future.
        query_slots = torch.arange(past, past + length, device=hidden.device)
        key_slots = torch.arange(past + length, device=hidden.device)
        visible = (key_slots[None, :] <= query_slots[:, None])[None] & attention_mask[:, None, :]
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~visible, torch.finfo(hidden.dtype).min)[:, None]

        for block in self.h:
            hidden = block(hidden, rotary, mask, logn, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden),
                                       past_key_values=past_key_values if use_cache else None)


class QwenVLForCausalLM(QwenVLPreTrainedModel, GenerationMixin):
    def __init__(self, config: QwenVLConfig):
        super().__init__(config)
        self.transformer = QwenVLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, embeddings):
        self.transformer.wte = embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, embeddings):
        self.lm_head = embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, pixel_values=None, labels=None, use_cache=None, logits_to_keep=0,
                **kwargs) -> CausalLMOutputWithPast:
        outputs = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                   pixel_values=pixel_values, use_cache=use_cache)
        hidden = outputs.last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, kept])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kwargs)
        # Images enter only at prefill: once the cache holds the prompt their positions are encoded.
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            inputs.pop("pixel_values", None)
        return inputs
