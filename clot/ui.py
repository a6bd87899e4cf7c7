"""The Gradio demo: three Oogiri tabs over one engine, with condition words, CLoT mode, adapters and memes.

    from clot.ui import build_demo
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=1).launch()

HTTP endpoints (stable api_names, callable with gradio_client; *common = language, conditions,
num_candidates, mode, adapter, temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed):
    /image_to_text       (image, *common)        -> (result, meme PNG, meme PNG for download)
    /image_text_to_text  (image, text, *common)  -> (result, meme PNG, meme PNG for download)
    /text_to_text        (text, *common)         -> result
seed: None or "" for a random one (reported in the result), or a whole number 0…2**32-1 (also as text).
    /draw_conditions     (language, num_candidates, text) -> "word, word, …"
    /refresh_adapters    (current adapter) -> (adapter picker, adapter cards table)
    /switch_adapter      (adapter) -> its card (Markdown)
    /vote_pick, /arena_battle, /arena_vote, /leaderboard: the arena, see clot/arena_ui.py
Every input is validated here too, because the HTTP API bypasses the sliders.
"""

from __future__ import annotations

import html
import json
import logging
import math
import contextvars
import queue
import random
import re
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr
import pydantic
from gradio import utils as gr_utils
from PIL import Image, UnidentifiedImageError

# ZeroGPU on a Space: only GPU-decorated functions get a GPU, and `spaces` must be imported before
# anything touches CUDA, hence before the engine. Elsewhere spaces.GPU returns the function unchanged.
try:
    import spaces

    gpu = spaces.GPU(duration=120)
    # There the GPU call runs in another process and gets its arguments pickled: no live streamer.
    LIVE_DECODING = not spaces.config.Config.zero_gpu
except ImportError:
    def gpu(fn):
        return fn

    LIVE_DECODING = True

from clot import adapters as registry  # noqa: E402
from clot import meme, prompts  # noqa: E402
from clot.engine import Engine, RowStreamer, prepare_image  # noqa: E402
from clot.nouns import draw_conditions, load_nouns  # noqa: E402
from clot.tasks import MAX_TEXT_CHARS, Candidate, ClotError, Language, Request, Sampling, Task  # noqa: E402
from clot.tiny import TINY_NAME  # noqa: E402
from clot.votes import VoteStore, default_db_path  # noqa: E402

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
LANGUAGES = ["auto", "en", "zh", "ja"]
MODES = ["CLoT", "sample"]
MAX_CANDIDATES = len(prompts.LETTERS)  # the ranking question letters its options A–H
DEFAULT_CANDIDATES = 4
MAX_IMAGE_SIDE = 2048  # larger photos are scaled down first; the model sees far fewer pixels anyway
MAX_ASPECT = 50
MAX_UPLOAD_MB = 20  # per file; app.py passes it to launch(max_file_size=...) too
MAX_FILE_SIZE = f"{MAX_UPLOAD_MB}mb"
MAX_IMAGE_PIXELS = 50_000_000  # checked from the header, before any pixel is decoded (a 50 MP photo is fine)
MEME_TTL_S = 3600  # meme files older than this are deleted
_SPLIT_WORDS = re.compile(r"[,，、;；\n]+")

CARD_HEADERS = ["adapter", "stage", "round", "base model", "created", "evaluation"]


# ------------------------------------------------------------------ input checks
def _number(name: str, value, *, whole: bool = False, optional: bool = False):
    """A finite number (whole if asked); the HTTP API can send anything, sliders cannot."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ClotError(f"{name} must be a finite number, got {value!r}.")
    if whole:
        if value != int(value):
            raise ClotError(f"{name} must be a whole number, got {value!r}.")
        return int(value)
    return float(value)


def _choice(name: str, value, options: list[str]) -> str:
    if value not in options:
        raise ClotError(f"{name} must be one of {', '.join(options)}; got {value!r}.")
    return value


def _text(name: str, value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ClotError(f"{name} must be text, got {type(value).__name__}.")
    return value


MAX_SEED = 2**32 - 1


def parse_seed(value) -> int | None:
    """A seed from the form or the API: empty (None, "" or spaces) means random, else a whole number.

    The seed box is text, not a number box: a browser turns an empty number box into 0 once the
    accordion around it renders, which silently fixed every seed."""
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        if not re.fullmatch(r"[+-]?\d+", value):
            raise ClotError(f"Seed: {value[:20]!r} is not a whole number; leave it empty for a random seed.")
        value = int(value)
    seed = _number("seed", value, whole=True, optional=True)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ClotError(f"Seed: {seed} is out of range; use a whole number from 0 to {MAX_SEED}, or leave it empty.")
    return seed


def browser_language(accept_language: str | None) -> str | None:
    """The first of our languages in an Accept-Language header, by its q-weights ("ja,en;q=0.8" → "ja")."""
    weighted = []
    for position, part in enumerate((accept_language or "").split(",")):
        code, _, params = part.strip().partition(";")
        quality = 1.0
        match = re.search(r"q=([^;]*)", params)
        if match:
            try:
                quality = float(match.group(1))
            except ValueError:
                continue
        primary = code.strip().lower().split("-")[0]
        if primary in LANGUAGES[1:] and quality > 0:
            weighted.append((-quality, position, primary))
    return min(weighted)[2] if weighted else None


def split_words(text: str) -> list[str]:
    """Condition words typed by a user: separated by commas (any script), semicolons or new lines."""
    return [w.strip() for w in _SPLIT_WORDS.split(text or "") if w.strip()]


def open_image(path) -> Image.Image:
    """An uploaded file as an RGB image, with a clear message for anything unusable.

    Size and pixel count are checked before decoding, so a small file that claims to be huge
    (a decompression bomb) costs nothing; animated images give their first frame."""
    if path is None or path == "":
        raise ClotError("This tab needs an image: please upload one.")
    if not isinstance(path, (str, Path)):
        raise ClotError("The image must be an uploaded file.")
    too_many = f"use one of at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels."
    try:
        size_mb = Path(path).stat().st_size / 2**20
        if size_mb > MAX_UPLOAD_MB:
            raise ClotError(f"The file is {size_mb:.0f} MB; the limit is {MAX_UPLOAD_MB} MB.")
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ClotError(f"The image is {width}×{height} pixels: {too_many}")
            img.load()
            image = prepare_image(img)
    except Image.DecompressionBombError:  # Pillow's own, larger cap fires while reading the header
        raise ClotError(f"The image has far too many pixels: {too_many}") from None
    except ClotError:
        raise
    except UnidentifiedImageError:
        raise ClotError("The file is not an image that can be read: please upload a PNG, JPEG, WebP or GIF.") from None
    except (OSError, SyntaxError, ValueError):  # Pillow's ways of saying the data stops or makes no sense
        raise ClotError("The image file is damaged or incomplete: please upload it again.") from None
    width, height = image.size
    if min(width, height) < 8 or max(width, height) / min(width, height) > MAX_ASPECT:
        raise ClotError(f"The image is {width}×{height} pixels: use one at least 8 pixels on each side "
                        f"and at most {MAX_ASPECT} times wider than tall.")
    if max(width, height) > MAX_IMAGE_SIDE:
        image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    return image


def upload_only(image: gr.Image) -> gr.Image:
    """`image`, accepting only files uploaded to this app, and handing our code their path untouched.

    Left alone, gradio fetches a URL that an HTTP caller names as the file, and decodes and
    re-encodes every non-RGB upload, all before any size check; open_image does the decoding
    instead. (Server paths outside the upload folder gradio refuses itself. Patched on the
    instance, as in `guarded`.)"""
    refused = gr.Error("Image: only files uploaded to this app are read, never a URL or a server path; "
                       "please upload the image file itself.", print_exception=False)

    def uploaded(path) -> bool:
        return isinstance(path, (str, Path)) and gr_utils.is_in_or_equal(path, image.GRADIO_CACHE)

    move = image.async_move_resource_to_block_cache

    async def move_to_cache(url_or_path):  # runs before preprocess, on every file an input names
        if not uploaded(url_or_path):
            raise refused
        return await move(url_or_path)

    def preprocess(payload):
        if payload is None:
            return None
        if not uploaded(payload.path):  # a "stream" payload skips move_to_cache
            raise refused
        return payload.path  # never payload.url: gradio would decode inline base64 data from it

    class UploadedImage(image.data_model):  # a bare string such as "/etc/passwd" is no upload
        model_config = pydantic.ConfigDict(title=image.data_model.__name__)  # the API page is unchanged

        @pydantic.model_validator(mode="before")
        @classmethod
        def no_bare_path(cls, value):  # (raising here would reach the caller as pydantic's generic error)
            return value if isinstance(value, dict) else {}  # a payload naming no file: preprocess refuses it

    image.async_move_resource_to_block_cache = move_to_cache
    image.preprocess = preprocess
    image.data_model = UploadedImage
    return image


QUEUE_DEADLINE_S = 120.0
BUSY = "The server is busy; please try again in a minute"


def queue_wait_s() -> float:
    """How long the running event waited in gradio's queue before starting (0 outside a queued event).
    Gradio keeps each event's enqueue time but does not hand it to the function (gradio 6.31 internals)."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    event = queue.event_ids_to_events.get(event_id) if queue is not None and event_id else None
    return time.monotonic() - event.enqueue_time if event is not None else 0.0


def guarded(component: gr.components.Component, message: str):
    """`component`, answering a value it cannot take with a clear gr.Error that names it.

    Gradio checks bounds and choices before our code runs, and its messages do not say which input
    was wrong; HTTP callers can send anything. (Patched on the instance: a Component subclass would
    make gradio write a .pyi stub next to this module.)"""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error as err:
            raise gr.Error(f"{component.label}: {err.message}", print_exception=False) from None
        except Exception:
            raise gr.Error(f"{component.label}: {message}", print_exception=False) from None

    component.preprocess = preprocess
    return component


NOT_A_NUMBER = "must be a number."


# ------------------------------------------------------------------ results
def result_dict(request: Request, mode: str, adapter: str, candidates: list[Candidate]) -> dict:
    """What API users get: candidates sorted by the model's rank score, the chosen one marked."""
    order = sorted(range(len(candidates)), key=lambda i: -(candidates[i].rank_score or 0.0))
    rows = [dict(rank=place + 1, **candidates[i].to_dict()) for place, i in enumerate(order)]
    chosen = next(row for row in rows if row["chosen"])
    return {
        "task": request.task.value, "language": request.language.value, "mode": mode, "adapter": adapter,
        "question": request.text, "seed": request.sampling.seed, "answer": chosen["text"], "candidates": rows,
    }


def render_cards(result: dict | None) -> str:
    """The candidates as cards, best first, the chosen one highlighted (inline styles: no app CSS needed)."""
    if not result:
        return ""
    cards = []
    for row in result["candidates"]:
        scores = f"rank score {row['rank_score']:.3f}" if row["rank_score"] is not None else ""
        if row["select_score"] is not None:
            scores += f" · select score {row['select_score']:.3f}"
        condition = (f"<span style='border:1px solid currentColor;border-radius:9px;padding:0 6px;opacity:.8'>"
                     f"{html.escape(row['condition'])}</span>") if row["condition"] else ""
        style = ("border:2px solid #f59e0b;background:rgba(245,158,11,.14)" if row["chosen"]
                 else "border:1px solid rgba(128,128,128,.35)")
        badge = "<b style='color:#d97706'>★ chosen</b>" if row["chosen"] else ""
        cards.append(
            f"<div class='clot-candidate{' clot-chosen' if row['chosen'] else ''}' "
            f"style='{style};border-radius:10px;padding:10px 12px;margin:6px 0'>"
            f"<div style='font-size:.85em;opacity:.75;display:flex;gap:8px;flex-wrap:wrap'>"
            f"<b>#{row['rank']}</b>{badge}{condition}<span>{scores}</span></div>"
            f"<div class='clot-text' style='font-size:1.1em;margin-top:4px;white-space:pre-wrap'>"
            f"{html.escape(row['text'])}</div></div>")
    head = (f"<div style='font-size:.85em;opacity:.7'>{len(result['candidates'])} candidates · mode {result['mode']}"
            f" · adapter {html.escape(result['adapter'])} · seed {result['seed']}</div>")
    return f"<div id='clot-results'>{head}{''.join(cards)}</div>"


def render_live(texts: list[str]) -> str:
    """The candidates while they are being written (no ranks yet)."""
    rows = "".join(f"<div class='clot-live-text' style='border:1px dashed rgba(128,128,128,.5);border-radius:10px;"
                   f"padding:10px 12px;margin:6px 0;white-space:pre-wrap'>{html.escape(text) or '…'}</div>"
                   for text in texts)
    return f"<div id='clot-live'><div style='font-size:.85em;opacity:.7'>writing…</div>{rows}</div>"


def newest(updates: queue.Queue):
    """The items put on `updates` until a None, skipping those already superseded when read."""
    item = updates.get()
    while item is not None:
        while not updates.empty():
            following = updates.get_nowait()
            if following is None:
                yield item
                return
            item = following
        yield item
        item = updates.get()


class MemeStore:
    """A private temp folder for meme PNGs; files older than MEME_TTL_S are removed as new ones arrive."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="clot-memes-"))

    def save(self, image: Image.Image) -> str:
        cutoff = time.time() - MEME_TTL_S
        for old in self.folder.glob("*.png"):
            if old.stat().st_mtime < cutoff:
                old.unlink(missing_ok=True)
        return str(meme.save_png(image, self.folder / f"clot-meme-{uuid.uuid4().hex[:12]}.png"))


# ------------------------------------------------------------------ the app
class Studio:
    """The demo's server side: validation, the GPU-bound call, and adapter listing, over one engine."""

    def __init__(self, engine: Engine, nouns_path: str | Path | None = None,
                 queue_deadline_s: float = QUEUE_DEADLINE_S):
        self.engine = engine
        self.nouns_path = nouns_path
        self.queue_deadline_s = queue_deadline_s
        self.memes = MemeStore()
        self.arena = None  # set by build_demo: records the shown cards so they can take a vote
        # On ZeroGPU the decorated call runs in a forked worker that receives its arguments pickled:
        # wrap the bound method so only the request, mode and adapter name travel, never the engine.
        self.run = gpu(self._run)

    # ---------------------------------------------------------------- requests
    def build_request(self, task: Task, image, text, language, conditions, num_candidates, mode, adapter,
                      temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed,
                      browser: str | None = None) -> tuple:
        """The validated Request, mode and adapter. `browser` is the caller's Accept-Language header:
        with language "auto" and no text to detect it from, its first language of ours wins over English."""
        language = _choice("language", language, LANGUAGES)
        if language == "auto" and not _text("text", text).strip():
            language = browser_language(browser) or "auto"
        mode = _choice("mode", mode, MODES)
        adapter = _text("adapter", adapter) or registry.BASE
        seed = parse_seed(seed)
        sampling = Sampling(
            temperature=_number("temperature", temperature), top_p=_number("top_p", top_p),
            top_k=_number("top_k", top_k, whole=True),
            max_new_tokens=_number("max_new_tokens", max_new_tokens, whole=True),
            repetition_penalty=_number("repetition_penalty", repetition_penalty),
            seed=random.randrange(2**32) if seed is None else seed,  # always known, so a result can be reproduced
        )
        num_candidates = _number("num_candidates", num_candidates, whole=True)
        if not 1 <= num_candidates <= MAX_CANDIDATES:
            raise ClotError(f"The number of candidates must be between 1 and {MAX_CANDIDATES}, got {num_candidates}.")
        request = Request(
            task=task, image=open_image(image) if task.needs_image else None, text=_text("text", text),
            language=language, conditions=split_words(_text("conditions", conditions)),
            num_candidates=num_candidates, sampling=sampling,
        )
        return request.validate(), mode, adapter

    def play(self, task: Task, *args, progress=gr.Progress(), http: gr.Request | None = None,
             streamer: RowStreamer | None = None) -> tuple:
        """One tab's generation, with every user-caused error turned into a gr.Error. Progress names
        each phase; `streamer` (when given) sees the candidates as they are written."""
        waited = queue_wait_s()
        if waited > self.queue_deadline_s:  # its caller may have given up: turn it away clearly instead
            raise gr.Error(f"{BUSY} (this request waited {waited:.0f} s in the queue without starting).",
                           print_exception=False)
        try:
            browser = http.headers.get("accept-language") if http is not None else None
            request, mode, adapter = self.build_request(task, *args, browser=browser)
            n = request.num_candidates
            phases = {"ranking": (0.75, f"ranking the {n} candidates…"),
                      "selecting": (0.9, "selecting between the best two…")}

            def on_phase(name: str) -> None:
                progress(phases[name][0], desc=phases[name][1])

            progress(0.05, desc=f"writing {n} candidate{'s' if n > 1 else ''}…")
            live = dict(streamer=streamer, on_phase=on_phase) if LIVE_DECODING else {}
            candidates = self.run(request, mode, adapter, **live)
            result = result_dict(request, mode, adapter, candidates)
            if self.arena is not None:
                self.arena.record_result(request, result)
            if not task.needs_image:
                return result
            # An image with a blank usually carries its sentence at the bottom: keep it visible.
            position = "top" if task is Task.IT2T else "bottom"
            path = self.memes.save(meme.render(request.image, result["answer"], position))
            return result, path, path
        except ClotError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:  # never a raw traceback to users; the server keeps serving
            log.exception("Generation failed")
            raise gr.Error(f"Generation failed ({type(err).__name__}); please try again or change the settings.",
                           print_exception=False) from None

    def _run(self, request: Request, mode: str, adapter: str, streamer: RowStreamer | None = None,
             on_phase=None) -> list[Candidate]:
        """The GPU-bound part: generate, then let the model rank (and in CLoT mode, select) its own answers."""
        engine = self.engine
        with engine.lock:  # one adapter for the whole job, whatever other users pick meanwhile
            if mode == "CLoT":
                nouns = load_nouns(request.language, self.nouns_path)
                candidates = engine.clot(request, nouns=nouns, rng=random.Random(request.sampling.seed),
                                         adapter=adapter, streamer=streamer, on_phase=on_phase).candidates
            else:
                candidates = engine.generate(request, adapter=adapter, streamer=streamer)
                if on_phase:
                    on_phase("ranking")
                scores = engine.rank(request.task, request.language, [c.text for c in candidates],
                                     image=request.image, question=request.text, adapter=adapter)
                for candidate, score in zip(candidates, scores):
                    candidate.rank_score = score
                max(candidates, key=lambda c: c.rank_score).chosen = True
        return candidates

    def play_live(self, task: Task, *args, progress=gr.Progress(), http: gr.Request | None = None):
        """play() for the browser: yields the candidates' text while they are written, then the final
        (result, cards, meme, download) or (result, cards). The HTTP API keeps the plain play()."""
        streamer = RowStreamer(self.engine.tokenizer)
        outcome = {}

        def work():
            try:
                outcome["value"] = self.play(task, *args, progress=progress, http=http, streamer=streamer)
            except Exception as err:  # play already made it a gr.Error
                outcome["error"] = err
            finally:
                streamer.updates.put(None)

        # gr.Progress finds its event through context variables: the worker thread gets a copy.
        threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True).start()
        extra = 2 if task.needs_image else 0
        for texts in newest(streamer.updates):
            yield (gr.skip(), render_live(texts)) + (gr.skip(),) * extra
        if "error" in outcome:
            raise outcome["error"]
        if not task.needs_image:
            result = outcome["value"]
            yield result, render_cards(result)
            return
        result, path, _ = outcome["value"]
        yield result, render_cards(result), path, gr.DownloadButton(value=path, visible=True)

    # ---------------------------------------------------------------- the three tabs (the public API)
    def image_to_text(self, image, language, conditions, num_candidates, mode, adapter,
                      temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed,
                      progress=gr.Progress(), http: gr.Request = None):
        """Caption a photo (I2T). Returns (result JSON, meme PNG, meme PNG for download)."""
        return self.play(Task.I2T, image, "", language, conditions, num_candidates, mode, adapter,
                         temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed, progress=progress,
                         http=http)

    def image_text_to_text(self, image, text, language, conditions, num_candidates, mode, adapter,
                           temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed,
                           progress=gr.Progress(), http: gr.Request = None):
        """Fill the blank in an image, or answer a question about it (IT2T). Returns (result JSON, meme, download)."""
        return self.play(Task.IT2T, image, text, language, conditions, num_candidates, mode, adapter,
                         temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed, progress=progress,
                         http=http)

    def text_to_text(self, text, language, conditions, num_candidates, mode, adapter,
                     temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed,
                     progress=gr.Progress(), http: gr.Request = None):
        """Answer a question (T2T). Returns the result JSON."""
        return self.play(Task.T2T, None, text, language, conditions, num_candidates, mode, adapter,
                         temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed, progress=progress,
                         http=http)

    # ---------------------------------------------------------------- helpers
    def draw_conditions(self, language, num_candidates, text=""):
        """Weak, remote condition words: one uniform noun of the noun set per candidate, comma-separated."""
        try:
            language = _choice("language", language, LANGUAGES)
            n = _number("num_candidates", num_candidates, whole=True)
            if not 1 <= n <= MAX_CANDIDATES:
                raise ClotError(f"The number of candidates must be between 1 and {MAX_CANDIDATES}, got {n}.")
            lang = Language.parse(language, _text("text", text))
            return ", ".join(draw_conditions(load_nouns(lang, self.nouns_path), n, rho=0.0))
        except ClotError as err:
            raise gr.Error(str(err), print_exception=False) from None

    def adapter_choices(self) -> list[tuple[str, str]]:
        choices = [(f"base · {self.engine.base_model} (no adapter)", registry.BASE)]
        for info in self.engine.list_adapters():
            choices.append((f"{info.name} · {registry.stage_label(info.card)}", info.name))
        return choices

    def adapter_rows(self) -> list[list[str]]:
        rows = [[registry.BASE, "", "", self.engine.base_model, "", ""]]
        for info in self.engine.list_adapters():
            card = info.card
            metrics = card.get("evaluation") or card.get("metrics") or {}
            evaluation = ", ".join(f"{k} {v:.3g}" if isinstance(v, (int, float)) else f"{k} {v}"
                                   for k, v in metrics.items())
            rows.append([info.name, str(card.get("stage", "?")), str(card.get("round", 0)),
                         str(card.get("base_model", "?")), str(card.get("created", ""))[:16].replace("T", " "),
                         evaluation])
        return rows

    def refresh_adapters(self, current=registry.BASE):
        """Re-read the adapters folder: adapters published while the app runs appear here."""
        choices = self.adapter_choices()
        value = current if current in [v for _, v in choices] else registry.BASE
        return gr.Dropdown(choices=choices, value=value), self.adapter_rows()

    def switch_adapter(self, adapter):
        """Load and check an adapter now (errors show at once), and describe it. Requests still name their adapter."""
        try:
            name = _text("adapter", adapter) or registry.BASE
            self.engine.use_adapter(name)
        except ClotError as err:
            raise gr.Error(str(err), print_exception=False) from None
        if name == registry.BASE:
            return f"**base**: the bare base model `{self.engine.base_model}`, no adapter."
        info = next(i for i in self.engine.list_adapters() if i.name == name)
        text = f"**{name}**: {info.summary()}"
        languages = info.card.get("languages")
        if isinstance(languages, list) and languages:
            text += " · trained on " + ", ".join(html.escape(str(lang)) for lang in languages)
        if self.engine.template_set == "official":
            s = self.engine.default_sampling()
            text += ("\n\nThe authors' official adapter: requests use their Chinese wording. Their sampling, "
                     f"from the base model's generation_config: temperature {s.temperature:g}, top-p {s.top_p:g}, "
                     f"top-k {s.top_k or 'off'}, up to {s.max_new_tokens} new tokens.")
        return text


# ------------------------------------------------------------------ examples (written for this project)
def _example(name: str) -> str:
    return str(EXAMPLES / name)


I2T_EXAMPLES = [
    [_example("cat.jpg"), "en", ""],
    [_example("rocket.jpg"), "en", "umbrella"],
    [_example("astronaut.jpg"), "zh", "外卖"],
    [_example("coffee.jpg"), "zh", ""],
    [_example("cat.jpg"), "ja", "こたつ"],
    [_example("astronaut.jpg"), "ja", ""],
]
IT2T_EXAMPLES = [
    [_example("blank_en.jpg"), "", "en", ""],
    [_example("astronaut.jpg"), "What is she really thinking about up there?", "en", ""],
    [_example("blank_zh.jpg"), "", "zh", ""],
    [_example("cat.jpg"), "这只猫为什么一脸严肃？", "zh", "房租"],
    [_example("blank_ja.jpg"), "", "ja", ""],
    [_example("coffee.jpg"), "このコーヒーを一口飲んだ社長の一言とは？", "ja", ""],
]
T2T_EXAMPLES = [
    ["What is the worst thing to say at a job interview?", "en", ""],
    ["Invent an Olympic sport that nobody would watch.", "en", "spoon"],
    ["如果猫会说话，它对主人说的第一句话是什么？", "zh", ""],
    ["世界上最没用的发明是什么？", "zh", "雨伞"],
    ["こんな美容院は嫌だ。どんな美容院？", "ja", ""],
    ["宇宙人が地球に来て最初にがっかりしたことは？", "ja", "おにぎり"],
]

INTRO = """# CLoT humor studio
Play **Oogiri** (大喜利) with a vision-language model: give it a photo, a picture with a blank, or a question,
and it answers with something funny. **CLoT mode** (Creative Leap-of-Thought) writes one answer per weak
condition word, ranks them itself, keeps the top two and picks the better one; **sample** mode just samples
and shows the model's own ranking."""

TINY_BANNER = ("**This demo serves the tiny random-weights test model** (`{name}`): its answers are gibberish. "
               "Start the app without `--tiny` (or `CLOT_TINY`) for a real model.")
EVALUATION_NOTE = ("*evaluation*: the numbers from the adapter's card: the paper's choice-question accuracies "
                   "(0–1, higher is better) once `training/evaluate.py` has scored it, else its training numbers "
                   "(losses: lower is better; steps and example counts).")
# Let the tab bar wrap instead of hiding tabs behind "…" on a narrow phone screen (gradio measures the
# tabs and moves those that do not fit into an overflow menu; wrapped, they all fit).
CSS = """
@media (max-width: 640px) {
  .tab-wrapper { flex-wrap: wrap; height: auto !important; }
  .tab-wrapper .overflow-menu { flex-basis: 100%; }
  .tab-wrapper .overflow-menu > button { display: none; }
  .tab-wrapper .overflow-dropdown, .tab-wrapper .overflow-dropdown.hide {
    display: flex !important; flex-direction: row; flex-wrap: wrap; position: static !important;
    box-shadow: none; border: none; background: none; padding: 0; min-width: 0; }
}
"""
# gradio 6.31 marks its API panel open for a link to /?view=api but loads it only from the "Use via API"
# button, which toggles: the visitor saw the app alone. Toggling twice ends open, fixed gradio or not.
OPEN_API_PANEL = """() => {
  if (new URLSearchParams(window.location.search).get("view") !== "api") return;
  const button = document.querySelector("footer button.show-api");
  if (button) { button.click(); button.click(); }
}"""
SEED_HELP = "a whole number from 0 to 4294967295 replays a result; empty = a new random seed each time"
# What the API page's generated snippets send: values that work as copied (gradio's own defaults would
# name an image by URL, which upload_only refuses, and fix the seed at 0).
API_EXAMPLES = {"image": {"path": "cat.jpg", "url": "cat.jpg", "meta": {"_type": "gradio.FileData"}},
                "text": "What is the worst thing to say at a job interview?", "conditions": "", "seed": ""}
API_NOTE = ("Seed: empty or None for a random one (the result reports it), or a whole number to replay. "
            "Conditions: comma-separated words, one per candidate, or empty.")
API_IMAGE_NOTE = " Image: a local file through handle_file(path); URLs and server paths are refused."


def tiny_model_name(base_model: str) -> str | None:
    """The tiny test model's name when `base_model` is a folder built by clot/tiny.py, else None."""
    stamp = Path(base_model) / "clot_tiny.json"
    try:
        name = json.loads(stamp.read_text()).get("name", "")
    except (OSError, ValueError):
        return None
    return name if str(name).startswith(TINY_NAME) else None


def api_example(component: gr.components.Component, value) -> gr.components.Component:
    """Show `value` as the component's example on the API page (patched on the instance, as in `guarded`)."""
    component.example_payload = lambda: value
    return component


def build_demo(engine: Engine, *, nouns_path: str | Path | None = None, title: str = "CLoT humor studio",
               votes: VoteStore | None = None, queue_deadline_s: float = QUEUE_DEADLINE_S) -> gr.Blocks:
    """The whole app as gr.Blocks; the caller queues and launches it (see app.py) with css=CSS. Votes go
    to `votes` (default: the store at CLOT_VOTES_DB). A generation that could not start within
    `queue_deadline_s` of joining the queue is turned away as busy."""
    from clot.arena_ui import Arena  # the arena builds on this module

    studio = Studio(engine, nouns_path, queue_deadline_s)
    studio.arena = Arena(studio, votes or VoteStore(default_db_path()))
    initial = engine.active_adapter
    gpu_work = dict(concurrency_id="gpu", concurrency_limit=1)  # all model work shares one slot

    with gr.Blocks(title=title, delete_cache=(MEME_TTL_S, MEME_TTL_S)) as demo:
        gr.Markdown(INTRO)
        tiny = tiny_model_name(engine.base_model)
        if tiny:
            gr.Markdown(TINY_BANNER.format(name=tiny), elem_id="tiny-banner")
        with gr.Row(equal_height=True):
            adapter = gr.Dropdown(choices=studio.adapter_choices(), value=initial, label="Adapter",
                                  info="The bare base model, or a LoRA adapter from the adapters folder.",
                                  allow_custom_value=True, scale=5, elem_id="adapter")
            refresh = gr.Button("Refresh adapters", scale=1, elem_id="refresh-adapters",
                                elem_classes="clot-refresh")
        adapter_card = gr.Markdown(studio.switch_adapter(initial))
        with gr.Accordion("Adapter cards", open=False) as cards_accordion:
            # Fixed widths, scrolled sideways when narrow: no header squeezed to a letter per line.
            adapter_table = gr.Dataframe(value=studio.adapter_rows(), headers=CARD_HEADERS, interactive=False,
                                         wrap=True, column_widths=["170px", "64px", "64px", "220px", "150px", "320px"],
                                         elem_id="adapter-cards")
            gr.Markdown(EVALUATION_NOTE)

        tabs = [
            ("Image → Text", "i2t", Task.I2T, studio.image_to_text, "image_to_text", I2T_EXAMPLES),
            ("Image + Text → Text", "it2t", Task.IT2T, studio.image_text_to_text, "image_text_to_text",
             IT2T_EXAMPLES),
            ("Text → Text", "t2t", Task.T2T, studio.text_to_text, "text_to_text", T2T_EXAMPLES),
        ]
        for label, key, task, handler, api_name, examples in tabs:
            with gr.Tab(label, id=key):
                _tab(studio, key, task, handler, api_name, examples, adapter, gpu_work=gpu_work,
                     defaults=engine.default_sampling())
        studio.arena.tabs()

        # Adapters published while the app runs show up on a page load, a refresh, or opening the cards.
        refresh.click(studio.refresh_adapters, [adapter], [adapter, adapter_table], api_name="refresh_adapters")
        demo.load(studio.refresh_adapters, [adapter], [adapter, adapter_table], api_visibility="private")
        demo.load(None, js=OPEN_API_PANEL)
        cards_accordion.expand(studio.refresh_adapters, [adapter], [adapter, adapter_table],
                               api_visibility="private")
        adapter.change(studio.switch_adapter, [adapter], [adapter_card], api_name="switch_adapter", **gpu_work)
    return demo


def _tab(studio: Studio, key: str, task: Task, handler, api_name: str, examples: list, adapter: gr.Dropdown,
         *, gpu_work: dict, defaults: Sampling) -> None:
    """One tab: inputs, the sampling accordion (starting at the adapter's defaults), buttons, outputs,
    examples, and their events."""
    with gr.Row():
        with gr.Column(scale=1):
            image = text = counter = None
            if task.needs_image:
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=300,
                                 elem_id=f"{key}-image")
                api_example(image, API_EXAMPLES["image"])
            if task is not Task.I2T:
                label, hint = (("Text (optional)", "The sentence with the blank, or a question about the image")
                               if task is Task.IT2T else
                               ("Question", "e.g. What is the worst thing to say at a job interview?"))
                text = gr.Textbox(label=label, lines=2, elem_id=f"{key}-text", placeholder=hint,
                                  max_length=MAX_TEXT_CHARS)
                api_example(text, "" if task is Task.IT2T else API_EXAMPLES["text"])
                counter = gr.Markdown(f"0 / {MAX_TEXT_CHARS} characters", elem_id=f"{key}-counter")
            with gr.Row():
                language = gr.Radio(LANGUAGES, value="auto", label="Language",
                                    info="auto: from the text; without text, your browser's language")
                mode = gr.Radio(MODES, value="CLoT", label="Mode",
                                info="CLoT: rank the candidates, keep two, select one. sample: rank only.")
            with gr.Row(equal_height=True):
                conditions = gr.Textbox(value="", label="Condition words", scale=5, elem_id=f"{key}-conditions",
                                        placeholder="one per candidate, comma-separated; empty = none "
                                                    "(CLoT mode then draws its own)")
                api_example(conditions, API_EXAMPLES["conditions"])
                dice = gr.Button("Draw words", scale=1, min_width=100, elem_id=f"{key}-dice")
            number = gr.Slider(1, MAX_CANDIDATES, value=DEFAULT_CANDIDATES, step=1, label="Candidates")
            with gr.Accordion("Sampling", open=False, elem_id=f"{key}-sampling"):
                limits = Sampling.LIMITS
                temperature = gr.Slider(*limits["temperature"], value=defaults.temperature, step=0.01,
                                        label="Temperature")
                top_p = gr.Slider(*limits["top_p"], value=defaults.top_p, step=0.01, label="Top-p")
                top_k = gr.Slider(*limits["top_k"], value=defaults.top_k, step=1, label="Top-k (0 = off)")
                max_new = gr.Slider(*limits["max_new_tokens"], value=defaults.max_new_tokens, step=1,
                                    label="Max new tokens")
                repetition = gr.Slider(*limits["repetition_penalty"], value=defaults.repetition_penalty, step=0.01,
                                       label="Repetition penalty")
                seed = gr.Textbox(value="", label="Seed (empty = random)", placeholder="random", info=SEED_HELP,
                                  max_length=10, elem_id=f"{key}-seed")
                api_example(seed, API_EXAMPLES["seed"])
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id=f"{key}-generate")
                again = gr.Button("Regenerate", elem_id=f"{key}-regenerate")
                clear = gr.Button("Clear", elem_id=f"{key}-clear")
        with gr.Column(scale=1):
            cards = gr.HTML(elem_id=f"{key}-cards")
            outputs_extra = []
            if task.needs_image:
                meme_image = gr.Image(label="Meme", format="png", interactive=False, elem_id=f"{key}-meme",
                                      buttons=["download", "fullscreen"])
                download = gr.DownloadButton("Download meme (PNG)", visible=False, elem_id=f"{key}-download")
                outputs_extra = [meme_image, download]
            with gr.Accordion("Result (JSON)", open=False):
                result = gr.JSON(label="Result")
            studio.arena.vote_row(result)

    if image is not None:
        upload_only(image)
    for component in (language, mode):
        guarded(component, "not one of the choices.")
    for component in (number, temperature, top_p, top_k, max_new, repetition):
        guarded(component, NOT_A_NUMBER)
    head = [c for c in (image, text) if c is not None]
    inputs = head + [language, conditions, number, mode, adapter, temperature, top_p, top_k, max_new,
                     repetition, seed]
    outputs = [result] + outputs_extra
    buttons = [go, again]
    api_description = f"{handler.__doc__} {API_NOTE}" + (API_IMAGE_NOTE if image is not None else "")

    def play_args(args: tuple) -> tuple:  # play() takes (image, text, *common) whatever the tab
        return (args[0], "") + args[1:] if task is Task.I2T else (None,) + args if task is Task.T2T else args

    def live(*args, progress=gr.Progress(), http: gr.Request = None):  # Generate in the browser
        yield from studio.play_live(task, *play_args(args), progress=progress, http=http)

    def fresh(*args, progress=gr.Progress(), http: gr.Request = None):  # Regenerate: same inputs, a new seed
        yield from studio.play_live(task, *play_args(args[:-1] + (None,)), progress=progress, http=http)

    def start():  # a run begins: no old result next to a new error, and no second click meanwhile
        empty = [None, ""] + ([None, gr.DownloadButton(visible=False)] if outputs_extra else [])
        return [gr.Button(interactive=False)] * len(buttons) + empty

    def finish():  # after success or error alike
        return [gr.Button(interactive=True)] * len(buttons)

    # The HTTP endpoint returns the final result in one piece; the buttons stream into the cards.
    api_trigger = gr.Button(visible=False, elem_id=f"{key}-api")
    api_trigger.click(handler, inputs, outputs, api_name=api_name, api_description=api_description, **gpu_work)
    shown = [result, cards] + outputs_extra
    for button, fn in ((go, live), (again, fresh)):
        run = button.click(start, None, buttons + shown, queue=False, api_visibility="private").then(
            fn, inputs, shown, api_visibility="private", **gpu_work)
        # .then alone is skipped after an error in gradio 6.31's frontend: unlock on each outcome.
        run.success(finish, None, buttons, queue=False, api_visibility="private")
        run.failure(finish, None, buttons, queue=False, api_visibility="private")

    if counter is not None:  # counted in the browser: no server round trip per keystroke
        text.change(None, text, counter, js=f"(t) => `${{(t || '').length}} / {MAX_TEXT_CHARS} characters`")
    dice_inputs = [language, number] + ([text] if text is not None else [])
    if task is Task.T2T:  # the public endpoint takes the question too, for language "auto"
        dice.click(studio.draw_conditions, dice_inputs, conditions, api_name="draw_conditions")
    else:
        dice.click(studio.draw_conditions, dice_inputs, conditions, api_name=f"draw_conditions_{key}",
                   api_visibility="private")

    cleared = head + [conditions, result, cards] + outputs_extra
    clear.click(lambda: [None] * len(head) + ["", None, ""] + ([None, gr.DownloadButton(visible=False)]
                                                                  if outputs_extra else []),
                None, cleared, api_visibility="private")
    gr.Examples(examples, head + [language, conditions], label="Examples (en · zh · ja)", examples_per_page=6)
