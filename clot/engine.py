"""The inference engine: one base model, switchable LoRA adapters, batched sampling, option scoring, CLoT.

Everything that runs the model goes through here: the demo, stage-2 exploration and evaluation.

    from clot.engine import Engine
    from clot.tasks import Request
    engine = Engine.load("Qwen/Qwen2.5-VL-3B-Instruct", adapters_dir="adapters")
    candidates = engine.generate(Request(task="T2T", text="Why was the cat late?", num_candidates=4))
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import random
import shutil
import threading
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image, ImageOps
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from clot import adapters as registry
from clot import hub, losses, prompts
from clot.families import family_for
from clot.nouns import draw_conditions, load_nouns
from clot.prefix import PrefixStore, share_prefixes
from clot.tasks import Candidate, ClotError, Language, Request, Sampling, Task, clean_text

log = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ClotError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps.") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ClotError("Device cuda was asked for, but no CUDA GPU is visible; use --device cpu.")
    return chosen


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on older GPUs and Apple silicon, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


class Sampler(LogitsProcessor):
    """Draws each row's next token (temperature, then top-k, then top-p) and leaves only that
    token standing, so generate's greedy step takes it.

    transformers' own sampling sorts the whole vocabulary for top-p and runs multinomial over it
    at every step; this works on the top-k logits only, which makes a step's sampling 5-25×
    cheaper on a CPU (benchmarks/bench_sampler.py). Draws use a generator seeded from `sampling.seed`
    (fresh when None), so a seeded request repeats without touching torch's global RNG."""

    def __init__(self, sampling: Sampling, device: torch.device):
        self.temperature, self.top_k, self.top_p = sampling.temperature, sampling.top_k, sampling.top_p
        seed = sampling.seed if sampling.seed is not None else random.randrange(2**32)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k or scores.shape[-1], scores.shape[-1])
        top, ids = torch.topk(scores.float() / self.temperature, k)  # sorted, best first
        probs = torch.softmax(top, dim=-1)
        probs = probs * ((probs.cumsum(-1) - probs) < self.top_p)  # smallest prefix reaching top_p
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        picked = ids.gather(-1, (probs / race).argmax(-1, keepdim=True))  # exponential race: a draw ∝ probs
        return torch.full_like(scores, -torch.inf).scatter_(-1, picked, 0.0)


def prepare_image(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and flatten to RGB (alpha over white), whatever the mode."""
    try:
        return _flatten(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data, decoded lazily
        raise ClotError(f"The image could not be read ({error}); use another file.") from None


def _flatten(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, "white")
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey: keep the top 8 bits, do not clip
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def clean_answer(text: str) -> str:
    """Generated text without control characters or undecodable bytes (U+FFFD)."""
    return clean_text(text.replace("\ufffd", ""))


class RowStreamer(BaseStreamer):
    """Every row's text so far during one batched generate call, for a live view.

    transformers' own streamers take a single row. This one keeps each row's new tokens and puts the
    decoded texts of all rows on `updates` after every step; the consumer reads them from another thread."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.rows: list[list[int]] | None = None  # None until generate has handed over the prompt
        self.updates: queue.Queue[list[str]] = queue.Queue()

    def put(self, value: torch.Tensor) -> None:
        if self.rows is None:  # generate's first call passes the prompt rows
            self.rows = [[] for _ in range(value.shape[0])]
            return
        for row, tokens in zip(self.rows, value.reshape(len(self.rows), -1).tolist()):
            row.extend(tokens)
        self.updates.put([clean_answer(self.tokenizer.decode(row, skip_special_tokens=True)) for row in self.rows])

    def end(self) -> None:
        self.rows = None  # ready for the next generate call


@dataclass
class Turn:
    """One model input: a template's user text in a language, an optional image, and an
    optional start of the assistant's reply (used when scoring option letters)."""

    text: str
    lang: Language
    image: Image.Image | None = None
    answer_prefix: str = ""
    persona: bool = True  # False: a plain assistant (literal descriptions and rewrites)
    template_set: str = "studio"  # "official": the authors' CLoT-cn wording (clot/prompts.py)

    def conversation(self) -> list[dict]:
        conversation = prompts.messages(self.text, self.lang, has_image=self.image is not None, persona=self.persona,
                                        template_set=self.template_set)
        for item in conversation[1]["content"]:
            if item["type"] == "image":
                item["image"] = self.image
        if self.answer_prefix:
            conversation.append({"role": "assistant", "content": [{"type": "text", "text": self.answer_prefix}]})
        return conversation


@dataclass
class Choice:
    """A selection (pick the funniest) or ranking question over lettered options."""

    kind: str  # "select" or "rank"
    task: Task
    lang: Language
    options: list[str]
    image: Image.Image | None = None
    question: str = ""
    num_correct: int = 1
    wording: int = 0

    def prompt(self) -> str:
        if self.kind == "rank":
            return prompts.ranking_prompt(self.task, self.lang, self.options, self.question, self.wording)
        if self.kind == "select":
            return prompts.selection_prompt(self.task, self.lang, self.options, self.num_correct,
                                            self.question, self.wording)
        raise ClotError(f"Unknown question kind {self.kind!r}: use select or rank.")

    @property
    def answer_start(self) -> str:
        """What the answer says before the first option letter."""
        return prompts.RANK_PREFIX if self.kind == "rank" else ""


@dataclass
class ClotResult:
    """CLoT inference: every candidate with its scores, and the index of the chosen one."""

    candidates: list[Candidate]
    chosen: int
    finalists: list[int] = field(default_factory=list)

    @property
    def answer(self) -> Candidate:
        return self.candidates[self.chosen]


DEFAULT_MAX_IMAGE_TOKENS = 1024  # visual tokens per image; bounds memory for large photos


def load_processor(name: str, max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS):
    """The model's processor with images capped at `max_image_tokens` visual tokens. Training and
    inference both load it here, so an image is encoded the same way in both."""
    from transformers import AutoProcessor

    processor = _load_pretrained(AutoProcessor, name)
    cap_image_tokens(getattr(processor, "image_processor", None), max_image_tokens)
    return processor


def cap_image_tokens(image_processor, max_image_tokens: int | None) -> None:
    """Lower a Qwen2-VL-style image processor's pixel limit (`size["longest_edge"]`) so that an
    image makes at most `max_image_tokens` visual tokens, each covering (patch × merge)² pixels.
    The cap only ever lowers the processor's own limit; processors without a `longest_edge`
    (fixed-size ones, such as Qwen-VL-Chat's 448×448) are left as they are."""
    from transformers.image_utils import SizeDict

    size = getattr(image_processor, "size", None)
    # transformers 5 keeps the size as a SizeDict; a dict is what older or custom processors keep
    if not max_image_tokens or not isinstance(size, (dict, SizeDict)) or "longest_edge" not in size:
        return
    pixels_per_token = (getattr(image_processor, "patch_size", 14) * getattr(image_processor, "merge_size", 2)) ** 2
    longest = min(size["longest_edge"], max_image_tokens * pixels_per_token)
    shortest = min(size.get("shortest_edge", longest), longest)
    image_processor.size = type(size)(**{**dict(size), "longest_edge": longest, "shortest_edge": shortest})


def _load_pretrained(loader, name: str, **kwargs):
    local = Path(name).exists()
    cache_only = not local and hub.cache_only()  # else minutes of retries before the error
    try:
        return loader.from_pretrained(name, **kwargs, **({"local_files_only": True} if cache_only else {}))
    except pickle.UnpicklingError:  # torch's weights-only loading refused the file
        raise ClotError(f"The weights of {name} are a pickle that only full unpickling can read, which could run "
                        "any code; convert them to safetensors where you trust the file, then load that.") from None
    except (OSError, ValueError) as err:
        if local:
            raise ClotError(f"Could not load a model from {name}: {str(err).splitlines()[0]}") from None
        if cache_only:
            raise ClotError(hub.not_cached_message(name)) from None
        raise ClotError(
            f"Could not load {name!r} from the Hugging Face Hub (it is unreachable or the id is wrong). "
            "Download the model where the hub is reachable and pass its local folder "
            "(--base-model /path/to/model), or run with --tiny for an offline smoke test.") from None


def _keys_not_landed(model, name: str, path: Path) -> str | None:
    """Why the adapter's weights don't match the modules it made (peft only warns), or None.

    Keys named for another layout of the base load as a silent no-op: unexpected in the file, and the
    LoRA modules they were meant for keep their initial (zero) update."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    # no embedding check: "auto" would query the hub for the base's config on every load
    expected = set(get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False))
    with safe_open(str(path / registry.WEIGHTS), framework="pt") as f:
        given = set(f.keys())
    unexpected, missing = sorted(given - expected), sorted(expected - given)
    if not unexpected and not missing:
        return None
    example = (unexpected or missing)[0]
    return (f"does not fit this base model: {len(unexpected)} of its {len(given)} weights match no module "
            f"and {len(missing)} LoRA weights are missing (e.g. {example}); re-import it with "
            "`python -m clot.adapters import`.")


class Engine:
    """A loaded base model with its processor, the adapters folder, and one lock around the model."""

    def __init__(self, model, processor, *, base_model: str, adapters_dir: str | Path = "adapters",
                 device: torch.device | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.base_model = base_model
        self.adapters_dir = Path(adapters_dir)
        self.device = device or next(model.parameters()).device
        self.family = family_for(model.config)  # everything that differs between architectures
        self.fingerprint = registry.base_fingerprint(model.config)
        self.active_adapter = registry.BASE
        self._cards: dict[str, dict] = {}  # adapter name -> its card, as last validated
        self._loaded: dict[str, str] = {}  # adapter name -> signature of the loaded copy
        self._letter_cache: dict[tuple[str, int], tuple[str, list[int]]] = {}
        self.lock = threading.RLock()  # one model, many users: generation and switching take turns
        # Prefill the prompt part that rows share once (and reuse it for the questions that follow).
        self.shared_prefill = True
        self.min_shared_prefix = 16  # tokens; below this the extra forward pass is not worth it
        self.prefixes = PrefixStore(size=16)
        self.fixed_length = False  # benchmarks on random weights: always generate max_new_tokens
        self.compile = False  # static KV cache + torch.compile for decoding: see set_compile
        self._compile_config = CompileConfig()
        self._compile_config._compile_all_devices = True  # transformers compiles by itself only on GPUs
        self.model.eval()

    @classmethod
    def load(cls, base_model: str = DEFAULT_BASE_MODEL, *, adapters_dir: str | Path = "adapters",
             device: str = "auto", dtype: torch.dtype | None = None, adapter: str | None = None,
             max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS, compile: bool = False) -> "Engine":
        """Load a base model by hub id or local path (no remote code), optionally with an adapter."""
        from transformers import AutoConfig

        torch_device = pick_device(device)
        if torch_device.type == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("CLOT_CPU_THREADS", os.cpu_count() or 1))))
        family = family_for(_load_pretrained(AutoConfig, base_model))  # refused before any weight loads
        processor = load_processor(base_model, max_image_tokens)
        model = _load_pretrained(family.model_class(), base_model,
                                 dtype=dtype or pick_dtype(torch_device), attn_implementation="sdpa")
        model.to(torch_device)
        engine = cls(model, processor, base_model=base_model, adapters_dir=adapters_dir, device=torch_device)
        if adapter:
            engine.use_adapter(adapter)
        engine.set_compile(compile)
        return engine

    def set_compile(self, on: bool) -> bool:
        """Decode with a static KV cache and a torch.compile'd forward (transformers' own
        compiled-generation path). It pays off where one step's Python and kernel-launch overhead
        is a large part of its time (GPUs, small models) and costs a compilation per new batch
        shape or adapter (tens of seconds), so it is off by default. Where it is unsupported it
        stays off with a warning: devices other than CUDA and CPU, a CPU without a C++ compiler,
        and ZeroGPU Spaces. Generation rows then do not share their prefix prefill (that needs a
        growing cache); scoring still does. Returns whether it is on."""
        reason = None
        if on and self.device.type not in ("cuda", "cpu"):
            reason = f"torch.compile is not supported on {self.device.type}"
        elif on and self.device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
            reason = "torch.compile on the CPU needs a C++ compiler (c++ or g++ on PATH)"
        elif on and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true"):
            reason = "ZeroGPU does not support torch.compile"
        if reason:
            log.warning("Compiled decoding stays off: %s.", reason)
        self.compile = bool(on) and reason is None
        return self.compile

    # ---------------------------------------------------------------- adapters
    def list_adapters(self) -> list[registry.AdapterInfo]:
        """Adapters published in the adapters folder (for any base model; switching checks the base)."""
        return registry.discover(self.adapters_dir)

    def use_adapter(self, name: str | None) -> None:
        """Switch to a published adapter, or to the bare base model with None / "base".

        The base model is never reloaded: adapters are added to one peft wrapper and enabled one
        at a time. An adapter re-published under the same name is reloaded. On any error the
        current adapter stays in use."""
        with self.lock:
            if name in (None, "", registry.BASE):
                self.active_adapter = registry.BASE
                return
            registry.check_name(name)
            path = (self.adapters_dir / name).resolve()  # the published copy: republishing re-points the name
            if not path.is_dir():
                known = ", ".join(a.name for a in self.list_adapters()) or "none"
                raise ClotError(f"Unknown adapter {name!r}. Published adapters: {known}.")
            card = registry.validate(path, self.fingerprint)
            signature = registry.AdapterInfo(name, path, card).signature
            if self._loaded.get(name) != signature:
                self._load_adapter(name, path)
                self._loaded[name] = signature
            self._select_adapter(name)
            self.active_adapter = name
            self._cards[name] = card

    def _select_adapter(self, name: str) -> None:
        self.model.set_adapter(name)

    def _load_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        model = self.model
        try:
            if not isinstance(model, PeftModel):
                with warnings.catch_warnings():  # _keys_not_landed below turns this warning into a refusal
                    warnings.filterwarnings("ignore", message="Found missing adapter keys")
                    model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
            else:
                if name in model.peft_config:
                    model.delete_adapter(name)
                    self._loaded.pop(name, None)
                model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            problem = _keys_not_landed(model, name, path)
        except Exception as err:  # a damaged or mismatched adapter must not take the engine down
            problem = f"could not be loaded: {str(err).splitlines()[0][:200]}"
        if problem:
            if isinstance(model, PeftModel) and name in model.peft_config:
                if len(model.peft_config) > 1:
                    model.delete_adapter(name)
                elif model is not self.model:  # the first adapter: give the bare base model back
                    model.unload()
            if self.active_adapter != registry.BASE and isinstance(self.model, PeftModel):
                self.model.set_adapter(self.active_adapter)
            raise ClotError(f"Adapter {name!r} {problem}") from None
        self.model = model
        self.model.eval()

    def _adapter_scope(self):
        """Run with the active adapter, or with every adapter disabled for the bare base model."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel) and self.active_adapter == registry.BASE:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def using(self, adapter: str | None):
        """Hold the model with `adapter` active (None keeps the current one) for a whole job."""
        with self.lock:
            if adapter is not None:
                self.use_adapter(adapter)
            with self._adapter_scope(), torch.inference_mode():
                yield

    # ---------------------------------------------------------------- wording
    @property
    def template_set(self) -> str:
        """The authors' official wording while their adapter (card stage `official`) is active, else ours."""
        if self._cards.get(self.active_adapter, {}).get("stage") == "official":
            return "official"
        return "studio"

    def default_sampling(self, seed: int | None = None) -> Sampling:
        """Sampling defaults: ours, or with the official adapter the base checkpoint's generation_config,
        as the authors' demo sampled (Qwen-VL-Chat's: top_p 0.3, top-k off, up to 512 new tokens)."""
        if self.template_set == "official":
            return Sampling.from_generation_config(self._vlm().generation_config, seed)
        return Sampling(seed=seed)

    def _worded(self, choice: Choice) -> Choice:
        """A ranking or selection question in the active template set: the official adapter's are
        unpublished, so it gets ours in Chinese, the only language it knows."""
        if self.template_set == "official" and choice.lang != Language.ZH:
            return replace(choice, lang=Language.ZH)
        return choice

    # ---------------------------------------------------------------- encoding
    def encode(self, turns: list[Turn]):
        """Tokenize a batch of turns, left-padded. User text can never become control tokens."""
        continuing = any(t.answer_prefix for t in turns)
        if continuing and not all(t.answer_prefix for t in turns):
            raise ValueError("Turns of one batch must all have an answer prefix, or none.")
        return self.family.encode(self.processor, [t.conversation() for t in turns], continuing).to(self.device)

    # ---------------------------------------------------------------- generation
    def turns_for(self, request: Request) -> list[Turn]:
        """One row per candidate; a candidate's condition word goes into its own row's prompt."""
        image = prepare_image(request.image) if request.image is not None else None
        template_set = self.template_set
        return [Turn(prompts.generation_prompt(request.task, request.language, request.text, condition,
                                               request.wording, template_set), request.language, image,
                     template_set=template_set)
                for condition in request.conditions]

    def generate(self, request: Request, adapter: str | None = None,
                 streamer: RowStreamer | None = None) -> list[Candidate]:
        """All candidates of one request from one batched generate call (each step shown to `streamer`)."""
        request.validate()
        return self.generate_many([request], adapter=adapter, streamer=streamer)[0]

    def generate_many(self, requests: list[Request], adapter: str | None = None,
                      streamer: RowStreamer | None = None) -> list[list[Candidate]]:
        """Candidates for several requests in one generate call (they must share sampling settings)."""
        for request in requests:
            request.validate()
        sampling = requests[0].sampling
        if any(r.sampling != sampling for r in requests):
            raise ValueError("Requests generated together must share their sampling settings.")
        with self.lock:  # the adapter decides the wording, so it stays in use until the answers are in
            if adapter is not None:
                self.use_adapter(adapter)
            turns = [turn for r in requests for turn in self.turns_for(r)]
            texts = self.sample(turns, sampling, streamer=streamer)
        out, at = [], 0
        for r in requests:
            out.append([Candidate(text=texts[at + i], condition=c) for i, c in enumerate(r.conditions)])
            at += len(r.conditions)
        return out

    def sample(self, turns: list[Turn], sampling: Sampling, adapter: str | None = None,
               greedy: bool = False, streamer: RowStreamer | None = None) -> list[str]:
        """One generate call over all turns; returns each row's new text."""
        sampling.validate()
        with self.using(adapter):
            inputs = self.encode(turns)
            if not self.compile:
                inputs = self._shared_inputs(turns, inputs) or inputs
            options = dict(max_new_tokens=sampling.max_new_tokens,
                           min_new_tokens=sampling.max_new_tokens if self.fixed_length else 1,
                           repetition_penalty=sampling.repetition_penalty,
                           pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._stop_ids(),
                           do_sample=False, temperature=None, top_p=None, top_k=None)
            if not greedy:  # our sampler picks each token; generate's greedy step then keeps it
                options["logits_processor"] = LogitsProcessorList([Sampler(sampling, self.device)])
            if self.compile:
                options.update(cache_implementation="static", compile_config=self._compile_config)
            output = self.model.generate(**inputs, **options, streamer=streamer)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [clean_answer(text) for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def _shared_inputs(self, turns: list[Turn], inputs):
        """Generate inputs that prefill each shared prompt prefix once (clot/prefix.py), or None."""
        if not self.shared_prefill:
            return None
        adapter_key = f"{self.active_adapter}:{self._loaded.get(self.active_adapter, '')}"
        return share_prefixes(self.model, self._vlm(), self.family, turns, inputs, self.prefixes, adapter_key,
                              self.min_shared_prefix, self.tokenizer.pad_token_id)

    def _vlm(self):
        """The transformers model under any peft wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _stop_ids(self) -> list[int]:
        return self.family.stop_ids(self.tokenizer, self._vlm().generation_config)

    # ---------------------------------------------------------------- scoring
    def _letters(self, answer_start: str, count: int) -> tuple[str, list[int]]:
        """Token ids of the option letters where an answer names its first option.

        Each letter is tokenized inside the answer text exactly as training formats it
        ("A. …" or "1. C. …"); the shared start of those token sequences is fed to the
        model, and the first token where they differ is the letter's token."""
        key = (answer_start, count)
        if key not in self._letter_cache:
            sequences = [self.tokenizer.encode(f"{answer_start}{letter}. x", add_special_tokens=False)
                         for letter in prompts.LETTERS[:count]]
            shared = 0
            while all(len(s) > shared + 1 and s[shared] == sequences[0][shared] for s in sequences):
                shared += 1
            ids = [s[shared] for s in sequences]
            if len(set(ids)) != count:
                raise RuntimeError("This tokenizer does not give each option letter its own token.")
            self._letter_cache[key] = (self.tokenizer.decode(sequences[0][:shared]), ids)
        return self._letter_cache[key]

    def score(self, choices: list[Choice], adapter: str | None = None) -> list[list[float]]:
        """Probability of each option being named first, for every question, by option-letter
        probabilities (one forward pass per kind of question, batched). For a selection question
        that is the pick; for a ranking question, the option ranked funniest."""
        results: list[list[float] | None] = [None] * len(choices)
        with self.using(adapter):
            choices = [self._worded(c) for c in choices]
            for start in sorted({c.answer_start for c in choices}):
                group = [i for i, c in enumerate(choices) if c.answer_start == start]
                width = max(len(choices[i].options) for i in group)
                prefix, letter_ids = self._letters(start, width)
                turns = [Turn(choices[i].prompt(), choices[i].lang,
                              prepare_image(choices[i].image) if choices[i].image is not None else None,
                              answer_prefix=prefix) for i in group]
                if not prefix:
                    turns = [Turn(t.text, t.lang, t.image) for t in turns]
                inputs = self.encode(turns)
                shared = self._shared_inputs(turns, inputs)
                if shared is None:  # the head runs on each question's last position only
                    head = self.model.get_output_embeddings()
                    with losses.head_bypassed(head):
                        hidden_states = self.model(**inputs).logits
                    logits = head(hidden_states[:, -1]).float()
                else:  # one step of generation runs just the uncached part with the right positions
                    logits = self.model.generate(**shared, max_new_tokens=1, do_sample=False, temperature=None,
                                                 top_p=None, top_k=None, output_logits=True,
                                                 return_dict_in_generate=True,
                                                 pad_token_id=self.tokenizer.pad_token_id).logits[0].float()
                for row, i in enumerate(group):
                    m = len(choices[i].options)
                    results[i] = torch.softmax(logits[row, letter_ids[:m]], dim=-1).tolist()
        return results  # type: ignore[return-value]

    def answer_by_generation(self, choices: list[Choice], adapter: str | None = None,
                             max_new_tokens: int = 256) -> list[list[int] | None]:
        """Answer choice questions by greedy generation and parsing, as the paper did.
        Selection → the picked option indices; ranking → the full order; None if unparsable."""
        with self.lock:  # the adapter decides the wording, so it stays in use until the answers are in
            if adapter is not None:
                self.use_adapter(adapter)
            choices = [self._worded(c) for c in choices]
            turns = [Turn(c.prompt(), c.lang, prepare_image(c.image) if c.image is not None else None)
                     for c in choices]
            texts = self.sample(turns, Sampling(max_new_tokens=max_new_tokens), greedy=True)
        parsed = []
        for choice, text in zip(choices, texts):
            if choice.kind == "rank":
                parsed.append(prompts.parse_ranking(text, len(choice.options)))
            else:
                parsed.append(prompts.parse_selection(text, len(choice.options), choice.num_correct))
        return parsed

    def rank(self, task: Task | str, lang: Language | str, answers: list[str], image: Image.Image | None = None,
             question: str = "", adapter: str | None = None) -> list[float]:
        """The paper's ranking question: each answer's probability of being ranked funniest."""
        if len(answers) == 1:
            return [1.0]
        return self.score([Choice("rank", Task.parse(task), Language.parse(lang), answers, image, question)],
                          adapter=adapter)[0]

    def select(self, task: Task | str, lang: Language | str, options: list[str], image: Image.Image | None = None,
               question: str = "", num_correct: int = 1, adapter: str | None = None) -> list[float]:
        """The paper's selection question: each option's probability of being picked."""
        return self.score([Choice("select", Task.parse(task), Language.parse(lang), options, image, question,
                                  num_correct)], adapter=adapter)[0]

    # ---------------------------------------------------------------- CLoT
    def clot(self, request: Request, nouns: list[str] | None = None, rho: float = 0.5,
             rng: random.Random | None = None, adapter: str | None = None,
             streamer: RowStreamer | None = None, on_phase=None) -> ClotResult:
        """The paper's inference: n weak conditions → n answers → rank → keep the top 2 → select one.

        `streamer` sees the answers as they are written; `on_phase("ranking")` and `on_phase("selecting")`
        are called as those phases start (the demo's progress).

        Condition words typed by the user are kept (candidates beyond them get no condition); when
        none are given, each candidate gets a uniform noun of the noun set, or none with probability rho."""
        request.validate()
        n = request.num_candidates
        if n > len(prompts.LETTERS):
            raise ClotError(f"CLoT mode ranks at most {len(prompts.LETTERS)} candidates, got {n}.")
        if not any(request.conditions):
            if rng is None:
                rng = random.Random(request.sampling.seed)
            request.conditions = draw_conditions(nouns or load_nouns(request.language), n, rho, rng)
        with self.lock:
            if adapter is not None:
                self.use_adapter(adapter)
            candidates = self.generate(request, streamer=streamer)
            common = dict(task=request.task, lang=request.language, image=request.image, question=request.text)
            if n == 1:
                candidates[0].rank_score = candidates[0].select_score = 1.0
                candidates[0].chosen = True
                return ClotResult(candidates, 0, [0])
            if on_phase:
                on_phase("ranking")
            rank_scores = self.score([Choice("rank", options=[c.text for c in candidates], **common)])[0]
            finalists = sorted(range(n), key=lambda i: -rank_scores[i])[:2]
            if on_phase:
                on_phase("selecting")
            select_scores = self.score([Choice("select", options=[candidates[i].text for i in finalists],
                                               **common)])[0]
        for candidate, score in zip(candidates, rank_scores):
            candidate.rank_score = score
        for i, score in zip(finalists, select_scores):
            candidates[i].select_score = score
        chosen = finalists[max(range(len(finalists)), key=lambda j: select_scores[j])]
        candidates[chosen].chosen = True
        return ClotResult(candidates, chosen, finalists)


def main(argv: list[str] | None = None) -> int:
    """Answer one prompt from the command line: python -m clot.engine --tiny --task T2T --text "…"."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m clot.engine", description=main.__doc__)
    parser.add_argument("--base-model", default=os.environ.get("CLOT_BASE_MODEL", DEFAULT_BASE_MODEL),
                        help="hub id or local folder (env CLOT_BASE_MODEL; default %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="use the offline tiny model (random weights)")
    parser.add_argument("--adapters-dir", default=os.environ.get("CLOT_ADAPTERS_DIR", "adapters"))
    parser.add_argument("--adapter", default=None, help="adapter name in the adapters folder (default: base)")
    parser.add_argument("--device", default=os.environ.get("CLOT_DEVICE", "auto"))
    parser.add_argument("--task", default="T2T", choices=[t.value for t in Task])
    parser.add_argument("--text", default="", help="the question (T2T) or an optional hint")
    parser.add_argument("--image", default=None, help="image file for I2T / IT2T")
    parser.add_argument("--lang", default="auto")
    parser.add_argument("-n", "--num-candidates", type=int, default=3)
    parser.add_argument("--condition", action="append", default=[], help="a condition word (repeatable)")
    parser.add_argument("--mode", choices=["sample", "clot"], default="sample")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length limit (default: the sampling defaults')")
    args = parser.parse_args(argv)
    try:
        base = args.base_model
        if args.tiny:
            from clot import tiny

            base = str(tiny.build())
        engine = Engine.load(base, adapters_dir=args.adapters_dir, device=args.device, adapter=args.adapter)
        image = Image.open(args.image) if args.image else None
        request = Request(task=args.task, image=image, text=args.text, language=args.lang,
                          conditions=args.condition, num_candidates=args.num_candidates,
                          sampling=engine.default_sampling(args.seed))
        if args.max_new_tokens is not None:
            request.sampling = replace(request.sampling, max_new_tokens=args.max_new_tokens)
        if args.mode == "clot":
            result = engine.clot(request)
            for i, c in enumerate(result.candidates):
                mark = "*" if c.chosen else " "
                print(f"{mark} rank {c.rank_score:.3f}  [{c.condition or '-'}] {c.text}")
        else:
            for c in engine.generate(request):
                print(f"[{c.condition or '-'}] {c.text}")
    except (ClotError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
