"""Model families implemented natively in this project, registered with transformers' Auto classes.

Importing `clot` registers them, so `AutoConfig`, `AutoTokenizer`, `AutoProcessor`,
`AutoModelForCausalLM` and `AutoModelForImageTextToText` load a Qwen-VL-Chat checkpoint
(`model_type: qwen`) with `trust_remote_code` left False.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from clot.models.qwen_vl.configuration_qwen_vl import QwenVLConfig
from clot.models.qwen_vl.modeling_qwen_vl import QwenVLForCausalLM

AutoConfig.register("qwen", QwenVLConfig)
AutoModelForCausalLM.register(QwenVLConfig, QwenVLForCausalLM)
AutoModelForImageTextToText.register(QwenVLConfig, QwenVLForCausalLM)
