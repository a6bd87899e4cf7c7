"""Qwen-VL-Chat (`model_type: qwen`), the base of the authors' CLoT-cn: ChatML, each image as
`<img>` + 256 `<imgpad>` + `</img>` (ids image_start_id, +1, +2 of the config's `visual`), the
original chat()'s stops, LoRA on `c_attn` and `attn.c_proj` (the official adapter's placement),
and plain 1-D rotary positions that follow the attention mask (with the dynamic-NTK alpha of each
row's whole length, so a shared prefix is only continued where its alpha is the row's)."""

from __future__ import annotations

import torch

from clot.families.base import Family, positions_from_mask


class QwenVL(Family):
    name = "Qwen-VL-Chat"
    model_types = ("qwen",)
    # chat() stops on <|im_end|> and <|im_start|>; <|endoftext|> (151643) is the tokenizer's eos.
    stop_tokens = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
    lora_targets = ["c_attn", "attn.c_proj"]  # the language model's attention; the ViT has neither name

    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @property
    def image_ids(self) -> list[int]:
        start = self.config.visual["image_start_id"]
        return [start, start + 1, start + 2]  # <img>, </img>, <imgpad>

    def encode(self, processor, conversations: list[list[dict]], continuing: bool):
        # The model reads positions as given, so a left-padded row gets the positions it has alone.
        batch = super().encode(processor, conversations, continuing)
        batch["position_ids"] = positions_from_mask(batch["attention_mask"])
        return batch

    def image_token_mask(self, inputs) -> torch.Tensor:
        ids = inputs["input_ids"]
        return torch.isin(ids, torch.tensor(self.image_ids, device=ids.device)).long()

    def vision_inputs(self, inputs, images: list[int]) -> dict:
        return {"pixel_values": inputs["pixel_values"][images]}  # one 448×448 row per image

    def prefill(self, model, vlm, ids, mask, kinds, cache, vision: dict) -> list:
        model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), past_key_values=cache,
              use_cache=True, logits_to_keep=1, **vision)
        return self._ntk_alphas(vlm, mask)  # positions follow the mask; the keys' rotary scaling does not

    def continuation(self, vlm, states: list, mask, kinds) -> dict | None:
        # A prefix's keys were rotated with the dynamic-NTK alpha of its own length; plain batching
        # rotates a row with the alpha of the whole row. Only where they agree is sharing exact.
        alphas = self._ntk_alphas(vlm, mask)
        if alphas != states:
            return None
        if getattr(vlm.config, "use_dynamic_ntk", False):
            vlm.transformer.rotary_emb.cached_alphas = alphas  # what decoding continues with, as after a prefill
        return {"position_ids": positions_from_mask(mask)}

    @staticmethod
    def _ntk_alphas(vlm, mask) -> list[float]:
        """Each row's dynamic-NTK alpha, as the model picks it when it prefills that row in one piece."""
        if not getattr(vlm.config, "use_dynamic_ntk", False):
            return [1.0] * len(mask)
        return [vlm.transformer.rotary_emb.alpha_for(int(n)) for n in mask.sum(-1).tolist()]
