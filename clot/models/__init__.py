"""Model families implemented natively in this project, registered with transformers' Auto classes.

Importing `clot` registers them, so `AutoConfig`, `AutoTokenizer`, `AutoProcessor`,
`AutoModelForCausalLM` and `AutoModelForImageTextToText` load a Qwen-VL-Chat checkpoint
(`model_type: qwen`) with `trust_remote_code` left False.
"""

from transformers import AutoConfig

from clot.models.qwen_vl.configuration_qwen_vl import QwenVLConfig

AutoConfig.register("qwen", QwenVLConfig)
