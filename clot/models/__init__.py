"""Model families implemented natively in this project, registered with transformers' Auto classes.

Importing `clot.models` (as the engine, training and adapter import do) registers them, so
`AutoConfig`, `AutoTokenizer`, `AutoProcessor`, `AutoModelForCausalLM` and
`AutoModelForImageTextToText` load a Qwen-VL-Chat checkpoint (`model_type: qwen`) with
`trust_remote_code` left False.
"""

from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoProcessor, AutoTokenizer)
from transformers.models.auto.tokenization_auto import REGISTERED_TOKENIZER_CLASSES

from clot.models.qwen_vl.configuration_qwen_vl import QwenVLConfig
from clot.models.qwen_vl.image_processing_qwen_vl import QwenVLImageProcessor
from clot.models.qwen_vl.modeling_qwen_vl import QwenVLForCausalLM
from clot.models.qwen_vl.processing_qwen_vl import QwenVLProcessor
from clot.models.qwen_vl.tokenization_qwen_vl import QwenVLTokenizer

AutoConfig.register("qwen", QwenVLConfig)
AutoModelForCausalLM.register(QwenVLConfig, QwenVLForCausalLM)
AutoModelForImageTextToText.register(QwenVLConfig, QwenVLForCausalLM)
AutoTokenizer.register(QwenVLConfig, slow_tokenizer_class=QwenVLTokenizer)
# The hub checkpoint's tokenizer_config.json names the remote class `QWenTokenizer`: ours stands in for it.
REGISTERED_TOKENIZER_CLASSES["QWenTokenizer"] = QwenVLTokenizer
AutoImageProcessor.register(QwenVLConfig, image_processor_classes={"pil": QwenVLImageProcessor})
AutoProcessor.register(QwenVLConfig, QwenVLProcessor)
