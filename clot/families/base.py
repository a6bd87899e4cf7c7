"""What every model family answers for the engine, with the parts most families share."""

from __future__ import annotations

import torch


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """1-D rotary positions of a left-padded batch: each real token's place among its row's real
    tokens (cumulative attention mask - 1); padding gets 0, which the mask hides. After a cached
    prefix the same formula over the whole mask (prefix, then the new part) continues the count."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class Family:
    """The seam between the family-agnostic engine and one architecture (chat format, image tokens,
    stop tokens, LoRA targets, positions). One instance serves one loaded model's config."""

    name: str  # shown to users
    model_types: tuple[str, ...]  # config.model_type values it serves
    stop_tokens: tuple[str, ...]  # chat-format tokens that end an assistant turn
    lora_targets: str | list[str]  # peft target_modules: a regex over module names, or name suffixes

    def __init__(self, config):
        self.config = config

    def model_class(self):
        """The transformers Auto class the engine and training load this family with."""
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def stop_ids(self, tokenizer, generation_config=None) -> list[int]:
        """Token ids that end generation: the family's chat-format stops, the tokenizer's eos and the
        checkpoint's own generation_config eos (passing eos_token_id to generate replaces those)."""
        ids = {tokenizer.convert_tokens_to_ids(token) for token in self.stop_tokens}
        ids.add(tokenizer.eos_token_id)
        configured = getattr(generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
        return sorted(i for i in ids if isinstance(i, int) and i >= 0)

    def encode(self, processor, conversations: list[list[dict]], continuing: bool):
        """A batch of conversations as model inputs, left-padded; user text can never become
        control tokens. `continuing`: the last (assistant) message is a start to continue."""
        return processor.apply_chat_template(
            conversations, add_generation_prompt=not continuing, continue_final_message=continuing,
            tokenize=True, return_dict=True, return_tensors="pt", sanitize_control_tokens=True,
            processor_kwargs={"padding": True, "padding_side": "left"},
        )

    # ---- shared-prefix decoding (clot/prefix.py)
    def image_token_mask(self, inputs) -> torch.Tensor:
        """[batch, length], nonzero where a token stands for image content (a prefix may not end inside one)."""
        raise NotImplementedError

    def vision_inputs(self, inputs, images: list[int]) -> dict:
        """The model's vision inputs for some of the batch's images (indices in order of appearance)."""
        raise NotImplementedError

    def prefill(self, model, vlm, ids, mask, kinds, cache, vision: dict) -> list:
        """Run left-padded prefixes into `cache`; return each row's position state for continuing."""
        raise NotImplementedError

    def continuation(self, vlm, states: list, mask, kinds) -> dict | None:
        """Extra generate inputs that continue every row after its cached prefix (`states` per row,
        `mask` and `kinds` over the whole prefix + new part), or None where a row would not compute
        exactly what it computes in plain batching (then plain batching is used)."""
        raise NotImplementedError
