"""A memory plan before a run: per stage, the settings that decide GPU memory and an estimate of its peak.

    python training/run_clot.py --config training/configs/qwen2.5-vl-3b.yaml --plan --gpu-gb 24
    python -m training.plan --config training/configs/qwen2.5-vl-3b.yaml --gpu-gb 24 --base-4bit

The recipe is read exactly as run_clot reads it (its Pipeline), and the base model's shape from its
config.json (a local folder), from a built-in table of known hub checkpoints (the hub is not asked),
or from clot/tiny.py for `tiny`. Nothing is loaded, trained or generated.

Each stage's parts, in GiB (2^30 bytes, as `memory_budget_gb`), and its peak: the parts are not all
resident at once, so the peak is the largest sum of those that are at one moment (Stage.total).
- weights: the base model in its precision (bf16; fp16 training keeps fp32 weights under autocast),
  or its language model's linear layers in 4-bit NF4 (one fp32 scale per 64 weights) with --base-4bit;
- LoRA + AdamW: the adapter's parameters, gradients and both Adam moments, all fp32 (peft keeps
  adapters in fp32); inference stages hold the parameters only;
- activations: with gradient checkpointing, each decoder layer's input (b × seq × hidden) plus one
  layer recomputed in backward; without it, every layer's saved tensors; inference: one layer's
  working set (exploration prefills each prompt's shared prefix once, as the engine does);
- logits: the LM head only on labelled positions (`labelled_tokens` per row), in fp32 with their
  gradient; inference keeps the last position's logits only;
- vision: the frozen vision tower's working set for the batch's images (forward only, no score
  matrix: sdpa kernels), plus their fp32 pixel patches;
- KV cache: exploration's rows × (image + prompt text + new tokens), the same arithmetic as
  `memory_budget_gb` in training/explore.py; evaluation scoring and the held-out loss pass build one too;
- overhead: CUDA context and allocator slack (GPU stages only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clot.tasks import ClotError  # noqa: E402

GiB = 2**30
QWEN2_VL_IMAGE_LIMIT = 16384  # the Qwen2.5-VL checkpoints' own cap: max_pixels 12,845,056 / (28 × 28)
PATCHES_PER_IMAGE_TOKEN = 4  # both families: 2 × 2 patches of 14 px become one token
PATCH_VALUES = 3 * 2 * 14 * 14  # one Qwen2.5-VL patch (RGB × 2 frames × 14 × 14), fp32 from the processor
EVAL_TEXT_TOKENS = 512  # system turn, question and up to five options of an evaluation question: generous
NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights with one fp32 absmax scale per block of 64
PREFIX_STORE = 16  # the engine's PrefixStore default; exploration grows it to the prompts per call

# config.json of hub checkpoints the plan knows without the hub (only the fields it reads).
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        "model_type": "qwen2_5_vl", "hidden_size": 2048, "num_hidden_layers": 36, "intermediate_size": 11008,
        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 2048}},
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        "model_type": "qwen2_5_vl", "hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584}},
    "Qwen/Qwen-VL-Chat": {
        "model_type": "qwen", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "intermediate_size": 22016, "kv_channels": 128, "vocab_size": 151936,
        "visual": {"width": 1664, "layers": 48, "heads": 16, "mlp_ratio": 4.9231, "output_dim": 4096}},
}
KNOWN_CONFIGS["Qwen/Qwen-VL"] = KNOWN_CONFIGS["Qwen/Qwen-VL-Chat"]


@dataclass(frozen=True)
class Linear:
    name: str  # the checkpoint's module name, which LoRA target patterns match
    inputs: int
    outputs: int
    bias: bool = False

    @property
    def parameters(self) -> int:
        return self.inputs * self.outputs + (self.outputs if self.bias else 0)


@dataclass(frozen=True)
class Architecture:
    """The shape of a base model, as far as memory is concerned."""

    family: str  # "qwen2_5_vl" or "qwen" (Qwen-VL)
    vocab_size: int
    hidden_size: int
    num_layers: int
    mlp_size: int  # the MLP's inner width (Qwen-VL: half its config's intermediate_size)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    vision_width: int
    vision_layers: int
    vision_mlp_size: int
    vision_out: int
    image_token_limit: int  # the checkpoint's own cap on tokens per image (Qwen-VL: always 256)

    def image_tokens(self, cap: int) -> int:
        """Tokens of the largest image under the engine's cap (Qwen-VL resizes every image to 256)."""
        return self.image_token_limit if self.family == "qwen" else min(cap, self.image_token_limit)

    def linear_layers(self) -> list[Linear]:
        return self._qwen_linears() if self.family == "qwen" else self._qwen2_5_vl_linears()

    def _qwen2_5_vl_linears(self) -> list[Linear]:
        h, w = self.hidden_size, self.vision_width
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layers = []
        for i in range(self.num_layers):
            at = f"model.language_model.layers.{i}"
            layers += [Linear(f"{at}.self_attn.q_proj", h, q, True), Linear(f"{at}.self_attn.k_proj", h, kv, True),
                       Linear(f"{at}.self_attn.v_proj", h, kv, True), Linear(f"{at}.self_attn.o_proj", q, h),
                       Linear(f"{at}.mlp.gate_proj", h, self.mlp_size), Linear(f"{at}.mlp.up_proj", h, self.mlp_size),
                       Linear(f"{at}.mlp.down_proj", self.mlp_size, h)]
        for i in range(self.vision_layers):
            at = f"model.visual.blocks.{i}"
            layers += [Linear(f"{at}.attn.qkv", w, 3 * w, True), Linear(f"{at}.attn.proj", w, w, True),
                       Linear(f"{at}.mlp.gate_proj", w, self.vision_mlp_size, True),
                       Linear(f"{at}.mlp.up_proj", w, self.vision_mlp_size, True),
                       Linear(f"{at}.mlp.down_proj", self.vision_mlp_size, w, True)]
        merged = PATCHES_PER_IMAGE_TOKEN * w
        layers += [Linear("model.visual.merger.mlp.0", merged, merged, True),
                   Linear("model.visual.merger.mlp.2", merged, self.vision_out, True)]
        if not self.tied_embeddings:
            layers.append(Linear("lm_head", h, self.vocab_size))
        return layers

    def _qwen_linears(self) -> list[Linear]:
        h, w, d = self.hidden_size, self.vision_width, self.vision_out
        layers = []
        for i in range(self.num_layers):
            at = f"transformer.h.{i}"
            layers += [Linear(f"{at}.attn.c_attn", h, 3 * h, True), Linear(f"{at}.attn.c_proj", h, h),
                       Linear(f"{at}.mlp.w1", h, self.mlp_size), Linear(f"{at}.mlp.w2", h, self.mlp_size),
                       Linear(f"{at}.mlp.c_proj", self.mlp_size, h)]
        for i in range(self.vision_layers):
            at = f"transformer.visual.transformer.resblocks.{i}"
            layers += [Linear(f"{at}.attn.in_proj", w, 3 * w, True), Linear(f"{at}.attn.out_proj", w, w, True),
                       Linear(f"{at}.mlp.c_fc", w, self.vision_mlp_size, True),
                       Linear(f"{at}.mlp.c_proj", self.vision_mlp_size, w, True)]
        # the resampler: keys projected to its width, one attention (fused in-projection), output projection
        layers += [Linear("transformer.visual.attn_pool.kv_proj", w, d),
                   Linear("transformer.visual.attn_pool.attn.in_proj", d, 3 * d, True),
                   Linear("transformer.visual.attn_pool.attn.out_proj", d, d, True),
                   Linear("transformer.visual.proj", d, d), Linear("lm_head", h, self.vocab_size)]
        return layers

    def other_parameters(self) -> int:
        """Embeddings, norms and the patch embedding: everything that is not a linear layer."""
        h, w = self.hidden_size, self.vision_width
        if self.family == "qwen":  # LayerNorms (weight + bias) in the vision tower, RMSNorms in the LM
            queries = self.image_token_limit
            vision = PATCH_VALUES // 2 * w + queries * w + 2 * w + self.vision_layers * 4 * w \
                + queries * self.vision_out + 3 * 2 * self.vision_out
            return self.vocab_size * h + (2 * self.num_layers + 1) * h + vision
        vision = PATCH_VALUES * w + self.vision_layers * 2 * w + w
        return self.vocab_size * h + (2 * self.num_layers + 1) * h + vision

    def parameters(self) -> int:
        return sum(layer.parameters for layer in self.linear_layers()) + self.other_parameters()

    def quantisable_parameters(self) -> int:
        """Weights a 4-bit load quantises: the language model's linear layers (not the head, not vision)."""
        language = ("model.language_model.", "transformer.h.")
        return sum(layer.inputs * layer.outputs for layer in self.linear_layers() if layer.name.startswith(language))

    def kv_bytes_per_position(self, dtype_bytes: int) -> int:
        """Keys and values of one position in every layer: explore.py's memory_budget_gb arithmetic."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def explore_config(self):
        """A stand-in for a transformers config with what ExploreSettings.batch_size reads."""
        text = SimpleNamespace(num_hidden_layers=self.num_layers, num_key_value_heads=self.num_kv_heads,
                               head_dim=self.head_dim, hidden_size=self.hidden_size,
                               num_attention_heads=self.num_heads)
        return SimpleNamespace(get_text_config=lambda: text)


def architecture_from_config(config: dict, image_token_limit: int = QWEN2_VL_IMAGE_LIMIT) -> Architecture:
    """From a config.json: Qwen2.5-VL (language settings at the top level or in text_config) or Qwen-VL."""
    kind = config.get("model_type")
    if kind == "qwen":
        visual = config.get("visual") or {}
        width = visual.get("width", 1664)
        return Architecture(
            family="qwen", vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"], mlp_size=config["intermediate_size"] // 2,
            num_heads=config["num_attention_heads"], num_kv_heads=config["num_attention_heads"],
            head_dim=config.get("kv_channels") or config["hidden_size"] // config["num_attention_heads"],
            tied_embeddings=False, vision_width=width, vision_layers=visual.get("layers", 48),
            vision_mlp_size=int(width * visual.get("mlp_ratio", 4.9231)),
            vision_out=visual.get("output_dim", config["hidden_size"]), image_token_limit=256)
    if kind in ("qwen2_5_vl", "qwen2_vl"):
        text = config.get("text_config") or config
        vision = config["vision_config"]
        heads = text["num_attention_heads"]
        return Architecture(
            family="qwen2_5_vl", vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            num_layers=text["num_hidden_layers"], mlp_size=text["intermediate_size"], num_heads=heads,
            num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            tied_embeddings=config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
            vision_width=vision["hidden_size"], vision_layers=vision["depth"],
            vision_mlp_size=vision["intermediate_size"],
            vision_out=vision.get("out_hidden_size", text["hidden_size"]), image_token_limit=image_token_limit)
    raise ClotError(f"The memory plan knows Qwen2.5-VL and Qwen-VL models, not model_type {kind!r}.")


def tiny_architecture(size: str) -> Architecture:
    """A size of clot/tiny.py's model (its tokenizer decides the vocabulary), without building the model."""
    from clot import tiny

    config = tiny.model_config(size, tiny.build_tokenizer()).to_dict()
    return architecture_from_config(config, tiny.SIZES[size]["max_image_tokens"])


def base_architecture(base_model: str) -> Architecture:
    """The base model's shape: `tiny` or `tiny-qwen-vl`, a local folder with config.json, or a known hub id."""
    if base_model == "tiny":
        return tiny_architecture("tiny")
    if base_model == "tiny-qwen-vl":
        from clot.models.qwen_vl.random_weights import TINY_CONFIG

        return architecture_from_config(TINY_CONFIG)
    folder = Path(base_model)
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return architecture_from_config(config, _image_token_limit(folder))
    if base_model in KNOWN_CONFIGS:
        return architecture_from_config(KNOWN_CONFIGS[base_model])
    raise ClotError(f"No config for base model {base_model!r}: give a local folder with config.json, or one of "
                    f"{', '.join(sorted(KNOWN_CONFIGS))}.")


def _image_token_limit(folder: Path) -> int:
    """The checkpoint's own cap from its preprocessor_config.json (max_pixels or size.longest_edge)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return QWEN2_VL_IMAGE_LIMIT
    config = json.loads(path.read_text(encoding="utf-8"))
    pixels = config.get("max_pixels") or (config.get("size") or {}).get("longest_edge")
    return int(pixels) // (28 * 28) if pixels else QWEN2_VL_IMAGE_LIMIT


def lora_parameters(arch: Architecture, target_modules: str | list[str], rank: int) -> int:
    """Parameters of a LoRA of `rank` on the layers peft would pick: a regex string matches whole module
    names; a list matches names equal to, or ending in '.' + , one of its entries."""
    if isinstance(target_modules, str):
        chosen = [layer for layer in arch.linear_layers() if re.fullmatch(target_modules, layer.name)]
    else:
        chosen = [layer for layer in arch.linear_layers()
                  if any(layer.name == t or layer.name.endswith("." + t) for t in target_modules)]
    return sum(rank * (layer.inputs + layer.outputs) for layer in chosen)


# ---------------------------------------------------------------- the memory of one stage
@dataclass(frozen=True)
class Assumptions:
    labelled_tokens: int = 256  # positions per training row where the LM head runs (0: every position)
    overhead_gb: float = 1.0  # CUDA context and allocator slack on a GPU
    base_4bit: bool = False


PARTS = ("weights", "lora+adam", "activations", "logits", "vision", "kv cache", "overhead")

# Elements per token held by one decoder layer, in units of hidden size (h), KV width (kv) and MLP width (m).
# Training, one layer recomputed in backward: the norms' outputs, q, k, v, the attention output, the
# LoRA dropout outputs, the MLP's gate, up, activation and product, and the gradients flowing through
# them. Measured at the small size in fp32 (benchmarks/bench_plan.py): about 10 h + 6 m; h = 16 leaves
# room for the fp32 copies the norms make under bf16.
TRAIN_LAYER = dict(h=16, kv=4, m=6)
# Inference, one layer's working set: residual, norm output, q, attention output, k and v, MLP gate, up, product.
INFER_LAYER = dict(h=4, kv=2, m=3)
VISION_LAYER = dict(w=6, m=3)  # one vision block's working set per patch: input, qkv, attention, residual; MLP


def _layer_elements(arch: Architecture, weights: dict) -> int:
    return (weights["h"] * arch.hidden_size + weights["kv"] * arch.num_kv_heads * arch.head_dim
            + weights["m"] * arch.mlp_size)


def vision_working_bytes(arch: Architecture, images: int, image_tokens: int, act_bytes: int) -> int:
    """The frozen vision tower's working set over `images` images (forward only)."""
    working = VISION_LAYER["w"] * arch.vision_width + VISION_LAYER["m"] * arch.vision_mlp_size
    return images * image_tokens * PATCHES_PER_IMAGE_TOKEN * working * act_bytes


def pixel_bytes(images: int, image_tokens: int) -> int:
    """The processor's fp32 pixel patches of `images` images, held for the whole step or call."""
    return images * image_tokens * PATCHES_PER_IMAGE_TOKEN * PATCH_VALUES * 4


def weight_bytes(arch: Architecture, weight_dtype_bytes: int, base_4bit: bool) -> int:
    if not base_4bit:
        return arch.parameters() * weight_dtype_bytes
    quantised = arch.quantisable_parameters()
    return int(quantised * NF4_BYTES) + (arch.parameters() - quantised) * 2


@dataclass(frozen=True)
class Stage:
    """One stage's settings; `memory` gives its parts and `total` its peak, in bytes, at any batch size."""

    name: str
    kind: str  # "train", "loss" (held-out loss, no gradients), "explore" or "score"
    image_tokens: int
    positions: int  # sequence length of a row: max_length, or image + text (+ new tokens)
    batch: int  # rows per step; exploration: prompts per generate call
    accumulation: int
    precision: str  # bf16, fp16 or fp32
    on_gpu: bool
    lora: int  # LoRA parameters
    checkpointing: bool = False
    rows_per_batch: int = 1  # exploration: candidates per prompt
    new_tokens: int = 0

    @property
    def act_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    def memory(self, arch: Architecture, assume: Assumptions, batch: int | None = None) -> dict[str, int]:
        b = self.batch if batch is None else batch
        a = self.act_bytes
        # fp16 training keeps fp32 weights under autocast (training/sft.py); inference runs fp16 weights
        fp32_weights = self.precision == "fp32" or (self.precision == "fp16" and self.kind in ("train", "loss"))
        weights = weight_bytes(arch, 4 if fp32_weights else 2, assume.base_4bit)
        tokens = b * self.positions
        part = dict.fromkeys(PARTS, 0)
        part["weights"] = weights
        part["overhead"] = int(assume.overhead_gb * GiB) if self.on_gpu else 0
        if self.kind in ("train", "loss"):
            part["lora+adam"] = self.lora * 16  # fp32 parameters, gradients, Adam's two moments
            labelled = min(assume.labelled_tokens or self.positions, self.positions)
            part["vision"] = vision_working_bytes(arch, b, self.image_tokens, a) + self._pixels(b)
        # logits: the head's output, its fp32 copy (none when already fp32), log-softmax (and its gradient)
        upcast = 4 if a < 4 else 0
        if self.kind == "train":
            rebuilt = tokens * _layer_elements(arch, TRAIN_LAYER) * a if self.checkpointing else 0
            part["activations"] = self._resident(arch, b) + rebuilt
            part["logits"] = b * labelled * arch.vocab_size * (a + upcast + 4 + 4)
        elif self.kind == "loss":
            part["activations"] = tokens * _layer_elements(arch, INFER_LAYER) * a
            part["logits"] = b * labelled * arch.vocab_size * (a + upcast + 4)
            part["kv cache"] = tokens * arch.kv_bytes_per_position(a)  # the forward builds a cache in eval mode
        else:  # the engine's generate and scoring: each prompt's shared prefix prefilled once (clot/prefix.py)
            rows = b * self.rows_per_batch
            prefix = self.positions - self.new_tokens
            part["lora+adam"] = self.lora * 4
            part["activations"] = b * prefix * _layer_elements(arch, INFER_LAYER) * a
            part["logits"] = rows * arch.vocab_size * 4  # the last position's logits, fp32
            part["vision"] = vision_working_bytes(arch, b, self.image_tokens, a) + self._pixels(b)
            part["kv cache"] = self.kv_positions(b) * arch.kv_bytes_per_position(a)
        return part

    def kv_positions(self, prompts: int) -> int:
        """Cached positions at the peak of a generate call. Decoding holds every row's cache (explore.py's
        memory_budget_gb arithmetic) and the prefix store's copies; the end of the prefill holds, per
        prompt, the prefill's cache and the store's copy of its prefix next to every row's copy of it."""
        rows = prompts * self.rows_per_batch
        prefix = self.positions - self.new_tokens
        decoding = rows * self.positions + max(PREFIX_STORE, prompts) * prefix
        prefill = (2 * prompts + rows) * prefix
        return max(decoding, prefill)

    def _resident(self, arch: Architecture, batch: int) -> int:
        """Training activations kept from the forward to the backward: each layer's input (and the final
        norm's) with checkpointing, or every layer's saved tensors without it."""
        tokens = batch * self.positions
        if self.checkpointing:
            return tokens * (arch.num_layers + 1) * arch.hidden_size * self.act_bytes
        return tokens * arch.num_layers * _layer_elements(arch, TRAIN_LAYER) * self.act_bytes

    def total(self, arch: Architecture, assume: Assumptions, batch: int | None = None) -> int:
        """The peak: the parts are not all resident at once. Training peaks while the frozen vision tower
        runs, while one layer is recomputed in the backward, or at the loss (kept activations + logits).
        Generation peaks while the vision tower runs, during the prefill (its cache so far + one layer),
        or with the whole cache (+ the logits). The pixel patches are held throughout."""
        b = self.batch if batch is None else batch
        part = self.memory(arch, assume, b)
        pixels = self._pixels(b)
        held = part["weights"] + part["lora+adam"] + part["overhead"] + pixels
        vision = part["vision"] - pixels
        if self.kind == "train":
            return held + max(vision, part["activations"], self._resident(arch, b) + part["logits"])
        if self.kind == "loss":
            return held + max(vision, part["kv cache"] + max(part["activations"], part["logits"]))
        prefill_cache = b * (self.positions - self.new_tokens) * arch.kv_bytes_per_position(self.act_bytes)
        return held + max(vision, prefill_cache + part["activations"], part["kv cache"] + part["logits"])

    def _pixels(self, batch: int) -> int:
        """The batch's pixel patches, one image per row or per prompt (its rows share the image)."""
        return pixel_bytes(batch, self.image_tokens)

    def largest_batch(self, arch: Architecture, assume: Assumptions, limit_bytes: int, cap: int = 4096) -> int:
        """The largest batch whose total fits `limit_bytes` (0 when not even one row fits)."""
        low, high = 0, cap
        while low < high:
            middle = (low + high + 1) // 2
            if self.total(arch, assume, middle) <= limit_bytes:
                low = middle
            else:
                high = middle - 1
        return low


# ---------------------------------------------------------------- from a recipe
def _precision(choice: str, device: str) -> str:
    """The precision a stage runs in on the device the recipe names (auto: a bf16 GPU, or the CPU)."""
    if choice == "auto":
        return "fp32" if device == "cpu" else "bf16"
    return choice


def stages_of(pipeline, arch: Architecture) -> list[Stage]:
    """The stages of a run_clot Pipeline, with their settings as the run would load them."""
    from clot.engine import DEFAULT_MAX_IMAGE_TOKENS
    from training.explore import PROMPT_TEXT_TOKENS
    from clot.families import FAMILIES
    from training.sft import _target_modules

    stages = []

    def training(label: str, step: str) -> int:
        s = pipeline.train_settings(step)
        image = arch.image_tokens(s.max_image_tokens)
        precision = _precision(s.precision, s.device)
        targets = s.target_modules if isinstance(s.target_modules, list) else _target_modules(s.target_modules)
        targets = targets or next(f.lora_targets for f in FAMILIES if arch.family in f.model_types)  # as sft.py
        lora = lora_parameters(arch, targets, s.lora_r)
        if not lora:
            raise ClotError(f"target_modules {s.target_modules!r} matches no linear layer of "
                            f"{pipeline.run.base_model}, so LoRA would train nothing.")
        common = dict(image_tokens=image, positions=s.max_length, precision=precision, on_gpu=s.device != "cpu",
                      lora=lora, checkpointing=s.activation_checkpointing)
        stages.append(Stage(f"{label} SFT", "train", batch=s.per_device_train_batch_size,
                            accumulation=s.gradient_accumulation_steps, **common))
        if s.eval_samples:
            stages.append(Stage(f"{label} held-out loss", "loss", batch=s.per_device_eval_batch_size,
                                accumulation=1, **common))
        return lora

    lora = training("stage-1", "stage1")
    if pipeline.run.rounds:
        e = pipeline.explore_settings(1, "").validate()
        image = arch.image_tokens(e.max_image_tokens)
        precision = _precision("auto", e.device)
        sized = dataclasses.replace(e, max_image_tokens=image)  # Qwen-VL: its fixed 256, not the cap
        stages.append(Stage("stage-2 exploration", "explore", image_tokens=image,
                            positions=image + PROMPT_TEXT_TOKENS + e.max_new_tokens,
                            batch=sized.batch_size(arch.explore_config(), 4 if precision == "fp32" else 2),
                            accumulation=1, precision=precision, on_gpu=e.device != "cpu", lora=lora,
                            rows_per_batch=e.num_conditions, new_tokens=e.max_new_tokens))
        training("stage-2", "stage2-r1")
    if pipeline.run.evaluate:
        v = pipeline.evaluation_settings()
        image = arch.image_tokens(DEFAULT_MAX_IMAGE_TOKENS)
        new = v.max_new_tokens if v.answer_mode == "generate" else 0
        stages.append(Stage("evaluation", "score", image_tokens=image,
                            positions=image + EVAL_TEXT_TOKENS + new, batch=v.batch_size, accumulation=1,
                            precision=_precision("auto", v.device), on_gpu=v.device != "cpu", lora=lora,
                            new_tokens=new))
    return stages


# ---------------------------------------------------------------- the printed plan
def render(base_model: str, arch: Architecture, stages: list[Stage], assume: Assumptions,
           gpu_gb: float | None = None) -> str:
    """The plan as two Markdown tables: the settings of each stage, then its memory and verdict."""
    labelled = f"{assume.labelled_tokens} labelled positions per row" if assume.labelled_tokens else "every position"
    largest = max(s.total(arch, assume) for s in stages)
    unit, scale = ("GiB", GiB) if largest >= GiB else ("MiB", 2**20)
    lines = [f"Memory plan for {base_model}: {arch.parameters() / 1e6:,.0f}M parameters "
             f"({arch.family}, {arch.num_layers} layers, hidden {arch.hidden_size}, vocabulary {arch.vocab_size}); "
             f"memory in {unit}; LM head on {labelled} (fp32)" + ("; 4-bit base" if assume.base_4bit else ""), "",
             "| stage | tokens/image | positions/row | batch | rows/batch | grad. accumulation | precision |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for s in stages:
        lines.append(f"| {s.name} | {s.image_tokens} | {s.positions} | {s.batch} | {s.batch * s.rows_per_batch} "
                     f"| {s.accumulation} | {s.precision} |")
    verdict = gpu_gb is not None
    header = "| stage | " + " | ".join(PARTS) + " | peak |"
    lines += ["", header + (f" {gpu_gb:g} GiB GPU | largest batch |" if verdict else ""),
              "|---|" + "---:|" * (len(PARTS) + 1) + ("---|---:|" if verdict else "")]
    for s in stages:
        parts, peak = s.memory(arch, assume), s.total(arch, assume)
        row = f"| {s.name} | " + " | ".join(f"{parts[p] / scale:.2f}" for p in PARTS) + f" | {peak / scale:.2f} |"
        if verdict:
            limit = int(gpu_gb * GiB)
            fits = "fits" if peak <= limit else "does not fit"
            row += f" {fits} | {s.largest_batch(arch, assume, limit)} |"
        lines.append(row)
    return "\n".join(lines)


def plan(config: str, overrides: list[str] | None = None, gpu_gb: float | None = None,
         assume: Assumptions = Assumptions()) -> str:
    """The printed plan of a recipe, read the way run_clot reads it."""
    from training.run_clot import Pipeline

    pipeline = Pipeline(config, overrides or [])
    arch = base_architecture(pipeline.run.base_model)
    return render(pipeline.run.base_model, arch, stages_of(pipeline, arch), assume, gpu_gb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe (training/configs/<preset>.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--gpu-gb", type=float, help="GPU memory in GiB: say per stage whether it fits")
    parser.add_argument("--labelled-tokens", type=int, default=Assumptions.labelled_tokens,
                        help="positions per training row where the LM head runs (0: every position)")
    parser.add_argument("--base-4bit", action="store_true", help="the base model's language layers in 4-bit NF4")
    args = parser.parse_args(argv)
    try:
        print(plan(args.config, args.set, args.gpu_gb,
                   Assumptions(labelled_tokens=args.labelled_tokens, base_4bit=args.base_4bit)))
    except ClotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
