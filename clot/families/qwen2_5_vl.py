"""Qwen2.5-VL (`model_type: qwen2_5_vl`), the default family: ChatML with <|vision_start|><|image_pad|>…
image tokens, and multimodal rotary positions (mrope) that the model derives from `image_grid_thw`
and keeps as `rope_deltas` (the offset of the text after an image) for the steps that follow."""

from __future__ import annotations

import torch

from clot.families.base import Family, positions_from_mask


class Qwen25VL(Family):
    name = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    stop_tokens = ("<|im_end|>",)
    # Plain names, not a path regex, so adapters load under both Qwen2.5-VL layouts and in other tools;
    # they select exactly the language model's attention (the vision tower names its layers qkv/proj).
    lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj"]

    def image_token_mask(self, inputs) -> torch.Tensor:
        return inputs["mm_token_type_ids"]

    def vision_inputs(self, inputs, images: list[int]) -> dict:
        grids = inputs["image_grid_thw"]
        patches = [int(g.prod()) for g in grids]  # pixel_values holds each image's patches, one after another
        starts = [sum(patches[:j]) for j in range(len(patches))]
        return {"pixel_values": torch.cat([inputs["pixel_values"][starts[j]:starts[j] + patches[j]] for j in images]),
                "image_grid_thw": grids[images]}

    def prefill(self, model, vlm, ids, mask, kinds, cache, vision: dict) -> list:
        # With images the model computes mrope positions itself; text only, positions must skip the
        # left padding, as they will when generation continues.
        extra = dict(vision) if vision else {"position_ids": positions_from_mask(mask)}
        vlm.model.rope_deltas = None
        model(input_ids=ids, attention_mask=mask, mm_token_type_ids=kinds, past_key_values=cache,
              use_cache=True, logits_to_keep=1, **extra)
        deltas = vlm.model.rope_deltas if vision else None
        return [deltas[row:row + 1] if deltas is not None else torch.zeros(1, 1, dtype=torch.long, device=ids.device)
                for row in range(len(ids))]

    def continuation(self, vlm, states: list, mask, kinds) -> dict:
        vlm.model.rope_deltas = torch.cat(states)
        return {"mm_token_type_ids": kinds}
