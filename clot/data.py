"""Oogiri-GO: loading the official layout, validating rows, grouping prompts, the train/test split.

The official layout is one folder with `en.jsonl`, `cn.jsonl`, `jp.jsonl` (one answer per line) and
`images.zip`. Images are found by id (the file name without extension), wherever they sit in the zip.

    python -m clot.data stats --data assets/oogiri-sample
    python -m clot.data split --data assets/oogiri-sample --out runs/split.json --test-ratio 0.05 --seed 0
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import logging
import os
import random
import statistics
import sys
import threading
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from clot.adapters import write_json_atomic
from clot.tasks import ClotError, Language, Task, clean_text

log = logging.getLogger(__name__)

HUB_DATASET = "zhongshsh/CLoT-Oogiri-GO"
FILES = {"en": Language.EN, "cn": Language.ZH, "jp": Language.JA}  # official file stem -> language
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")
MAX_IMAGE_PIXELS = 40_000_000  # far above any Oogiri picture, far below a decompression bomb
MAX_IMAGE_BYTES = 50_000_000
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "oogiri-sample"


@dataclass
class Sample:
    """One row of Oogiri-GO: a prompt and one human answer with its likes (None when it has none)."""

    lang: Language
    task: Task
    question: str | None
    image: str | None
    text: str
    star: int | None
    source: str = ""  # "cn.jsonl:12", for error messages

    @property
    def prompt_key(self) -> tuple[str, str, str, str]:
        """Rows with the same key answer the same prompt: same image, or same question text."""
        return (self.lang.value, self.task.value, self.image or "", "" if self.image else (self.question or ""))


@dataclass
class Prompt:
    """All human answers to one prompt, funniest (most stars) first; star-less answers last."""

    id: str
    lang: Language
    task: Task
    question: str | None
    image: str | None
    answers: list[Sample] = field(default_factory=list)

    @property
    def rankable(self) -> list[Sample]:
        """One answer per distinct star count (>0), the first seen of each: what ranking can use."""
        seen: dict[int, Sample] = {}
        for answer in self.answers:
            if answer.star and answer.star not in seen:
                seen[answer.star] = answer
        return list(seen.values())


def prompt_id(key: tuple[str, str, str, str]) -> str:
    """Stable across runs and machines: the language, the task and a hash of the image id or question."""
    digest = hashlib.sha256("\x1f".join(key).encode("utf-8")).hexdigest()[:12]
    return f"{key[0]}-{key[1]}-{digest}"


# ---------------------------------------------------------------- images
class ImageStore:
    """Images by id from `images.zip` (opened once, read on demand) or from an extracted folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1
        self.index: dict[str, str] = {}
        if self.path.is_file():
            names = self._archive().namelist()
        elif self.path.is_dir():
            names = [str(p.relative_to(self.path)) for p in sorted(self.path.rglob("*")) if p.is_file()]
        else:
            names = []
        for name in sorted(names):
            stem, suffix = os.path.splitext(os.path.basename(name))
            if suffix.lower() in IMAGE_SUFFIXES and not os.path.basename(name).startswith("."):
                if stem in self.index:
                    log.warning("image id %s appears twice (%s, %s); using the first", stem, self.index[stem], name)
                    continue
                self.index[stem] = name

    def _archive(self) -> zipfile.ZipFile:
        # A ZipFile shared across fork()ed data-loader workers would share one file offset: reopen per process.
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def read_bytes(self, image_id: str) -> bytes:
        if image_id not in self.index:
            raise ClotError(f"Image {image_id!r} is not in {self.path}.")
        name = self.index[image_id]
        if self.path.is_dir():
            file = self.path / name
            if file.stat().st_size > MAX_IMAGE_BYTES:
                raise ClotError(f"Image {image_id!r} is larger than {MAX_IMAGE_BYTES} bytes; refusing it.")
            return file.read_bytes()
        with self._lock:
            archive = self._archive()
            if archive.getinfo(name).file_size > MAX_IMAGE_BYTES:
                raise ClotError(f"Image {image_id!r} is larger than {MAX_IMAGE_BYTES} bytes; refusing it.")
            return archive.read(name)

    def open(self, image_id: str) -> Image.Image:
        """The image as RGB, after checking its header size (a decompression bomb is refused unread)."""
        image = Image.open(io.BytesIO(self.read_bytes(image_id)))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ClotError(f"Image {image_id!r} is {image.width}x{image.height} pixels; refusing it.")
        return image.convert("RGB")


# ---------------------------------------------------------------- the dataset
@dataclass
class LoadReport:
    """What loading kept, and what it skipped per reason: malformed_json, unknown_type, missing_text,
    missing_question, missing_image, missing_image_file, bad_star, no_star (only with require_star)."""

    kept: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first "file:line"


@dataclass
class OogiriGO:
    folder: Path
    samples: list[Sample]
    images: ImageStore
    report: LoadReport

    def prompts(self) -> list[Prompt]:
        return group_prompts(self.samples)

    def data_hash(self) -> str:
        """Identifies the data: the bytes of the three JSON Lines files and the list of image ids."""
        digest = hashlib.sha256()
        for stem in FILES:
            path = self.folder / f"{stem}.jsonl"
            if path.is_file():
                digest.update(stem.encode())
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
        digest.update("\n".join(sorted(self.images.index)).encode())
        return digest.hexdigest()[:16]


def image_store(folder: str | Path) -> ImageStore:
    """The images of a dataset folder: its images.zip, or an extracted images/ folder."""
    folder = Path(folder)
    return ImageStore(folder / "images.zip" if (folder / "images.zip").is_file() else folder / "images")


def locate(data: str | Path) -> Path:
    """A local folder in the official layout, or the hub dataset (its id, or "hub") downloaded once."""
    path = Path(data)
    if path.is_dir():
        return path
    if str(data) in ("hub", HUB_DATASET):
        return download()
    raise ClotError(f"No dataset folder at {data}: give a folder with en.jsonl/cn.jsonl/jp.jsonl and "
                    f"images.zip, or 'hub' for {HUB_DATASET}.")


def download(repo_id: str = HUB_DATASET) -> Path:
    """Download (or reuse the cached) Oogiri-GO snapshot through huggingface_hub."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="dataset"))
    except Exception as err:  # offline, blocked, or wrong id: all end in the same advice
        raise ClotError(f"Could not download the dataset {repo_id} from the Hugging Face Hub "
                        f"({type(err).__name__}); download it where the hub is reachable and pass its "
                        "local folder with --data.") from None


def _star(value) -> int | None:
    """Likes as an int; None for "no star" (missing, null or 0). Raises ValueError for nonsense."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(value)
    number = float(value)
    if number != int(number) or number < 0:
        raise ValueError(value)
    return int(number) or None


def _check_row(row, lang: Language, images: ImageStore, require_star: bool) -> tuple[Sample | None, str]:
    """A Sample, or the reason the row is unusable."""
    if not isinstance(row, dict):
        return None, "malformed_json"
    try:
        task = Task.parse(row.get("type"))
    except ClotError:
        return None, "unknown_type"
    text = row.get("text")
    if not isinstance(text, str) or not clean_text(text):
        return None, "missing_text"
    question = row.get("question")
    question = clean_text(question) or None if isinstance(question, str) else None
    image = row.get("image")
    image = str(image).strip() or None if isinstance(image, (str, int)) and not isinstance(image, bool) else None
    if task.needs_image and image is None:
        return None, "missing_image"
    if task is Task.T2T and question is None and image is None:
        return None, "missing_question"
    if image is not None and image not in images:
        return None, "missing_image_file"
    try:
        star = _star(row.get("star"))
    except ValueError:
        return None, "bad_star"
    if star is None and require_star:
        return None, "no_star"
    return Sample(lang, task, question if task is Task.T2T else None, image, clean_text(text), star), ""


def load(data: str | Path, *, strict: bool = False, require_star: bool = False,
         languages: list[str] | None = None) -> OogiriGO:
    """Load and validate Oogiri-GO from a folder (or "hub").

    Bad rows are skipped and counted by reason; with `strict` the first one stops loading with
    its file and line. Rows without likes are kept with star None unless `require_star`."""
    folder = locate(data)
    images = image_store(folder)
    wanted = {Language.parse(code) for code in languages} if languages else set(FILES.values())
    report = LoadReport()
    samples: list[Sample] = []
    found_any = False
    for stem, lang in FILES.items():
        path = folder / f"{stem}.jsonl"
        if lang not in wanted or not path.is_file():
            continue
        found_any = True
        with open(path, encoding="utf-8-sig", errors="replace") as f:  # tolerate a byte-order mark
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    sample, reason = None, "malformed_json"
                else:
                    sample, reason = _check_row(row, lang, images, require_star)
                if sample is None:
                    if strict:
                        raise ClotError(f"{path}:{number}: bad row ({reason.replace('_', ' ')}).")
                    report.skipped[reason] += 1
                    report.examples.setdefault(reason, where)
                    continue
                sample.source = where
                samples.append(sample)
    if not found_any:
        raise ClotError(f"{folder} has none of en.jsonl, cn.jsonl, jp.jsonl: it is not an Oogiri-GO folder.")
    report.kept = len(samples)
    for reason, count in sorted(report.skipped.items()):
        log.warning("skipped %d rows: %s (first at %s)", count, reason, report.examples[reason])
    return OogiriGO(folder, samples, images, report)


def group_prompts(samples: list[Sample]) -> list[Prompt]:
    """Rows grouped by prompt, in order of first appearance; answers sorted by stars, most first."""
    groups: dict[tuple, Prompt] = {}
    for sample in samples:
        key = sample.prompt_key
        if key not in groups:
            groups[key] = Prompt(prompt_id(key), sample.lang, sample.task, sample.question, sample.image)
        groups[key].answers.append(sample)
    for prompt in groups.values():
        prompt.answers.sort(key=lambda s: -(s.star or 0))  # stable: star-less answers keep file order, last
    return list(groups.values())


# ---------------------------------------------------------------- the split
@dataclass
class Split:
    seed: int
    test_ratio: float
    train: list[str]
    test: list[str]
    hash: str = ""

    def __post_init__(self):
        if not self.hash:
            body = json.dumps([self.seed, self.test_ratio, self.train, self.test]).encode()
            self.hash = hashlib.sha256(body).hexdigest()[:16]

    def part(self, prompts: list[Prompt], name: str) -> list[Prompt]:
        """The prompts of one part ("train" or "test"), in their original order."""
        wanted = set(getattr(self, name))
        return [p for p in prompts if p.id in wanted]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, asdict(self))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Split":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            split = cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise ClotError(f"{path} is not a split file ({type(err).__name__}); make one with "
                            "`python -m clot.data split`.") from None
        if split.hash != cls(split.seed, split.test_ratio, split.train, split.test).hash:
            raise ClotError(f"{path} was edited after it was made (its hash does not match); make it again.")
        return split


def make_split(prompts: list[Prompt], test_ratio: float = 0.05, seed: int = 0) -> Split:
    """Split by prompt, never by row. Depends only on the set of prompt ids, the ratio and the seed."""
    if not 0 < test_ratio < 1:
        raise ClotError(f"The test ratio must be between 0 and 1, got {test_ratio}.")
    ids = sorted({p.id for p in prompts})
    random.Random(seed).shuffle(ids)
    n_test = max(1, round(len(ids) * test_ratio)) if len(ids) > 1 else 0
    return Split(seed, test_ratio, sorted(ids[n_test:]), sorted(ids[:n_test]))


def load_or_make_split(path: str | Path, prompts: list[Prompt], test_ratio: float = 0.05, seed: int = 0) -> Split:
    """The saved split when there is one (so every stage uses the same), else a new one saved there."""
    path = Path(path)
    if path.is_file():
        split = Split.load(path)
        known = set(split.train) | set(split.test)
        missing = sum(p.id not in known for p in prompts)
        if missing:
            log.warning("%d prompts are not in the split %s (other data?); they are left out", missing, path)
        return split
    split = make_split(prompts, test_ratio, seed)
    split.save(path)
    return split


# ---------------------------------------------------------------- stats
def stats(dataset: OogiriGO) -> dict:
    """Counts per language × type, star coverage, answers per prompt, and skipped rows per reason."""
    prompts = dataset.prompts()
    table: dict[str, dict[str, dict[str, int]]] = {}
    for p in prompts:
        cell = table.setdefault(p.lang.value, {}).setdefault(p.task.value, {"rows": 0, "prompts": 0, "rankable": 0})
        cell["rows"] += len(p.answers)
        cell["prompts"] += 1
        cell["rankable"] += len(p.rankable) >= 5
    sizes = [len(p.answers) for p in prompts] or [0]
    with_star = sum(s.star is not None for s in dataset.samples)
    return {
        "rows": len(dataset.samples),
        "prompts": len(prompts),
        "images": len(dataset.images),
        "by_language_and_type": table,
        "star_coverage": with_star / max(1, len(dataset.samples)),
        "answers_per_prompt": {"min": min(sizes), "median": statistics.median(sizes),
                               "mean": round(statistics.fmean(sizes), 2), "max": max(sizes)},
        "rankable_prompts": sum(len(p.rankable) >= 5 for p in prompts),
        "skipped": dict(sorted(dataset.report.skipped.items())),
        "data_hash": dataset.data_hash(),
    }


def format_stats(numbers: dict) -> str:
    lines = [f"{numbers['rows']} rows, {numbers['prompts']} prompts, {numbers['images']} images "
             f"(data hash {numbers['data_hash']})", "",
             f"{'lang':<5}{'type':<6}{'rows':>8}{'prompts':>9}{'rankable':>10}"]
    for lang, tasks in numbers["by_language_and_type"].items():
        for task, cell in sorted(tasks.items()):
            lines.append(f"{lang:<5}{task:<6}{cell['rows']:>8}{cell['prompts']:>9}{cell['rankable']:>10}")
    a = numbers["answers_per_prompt"]
    lines += ["", f"star coverage: {numbers['star_coverage']:.1%} of rows have likes (missing/null/0 = none)",
              f"answers per prompt: min {a['min']}, median {a['median']}, mean {a['mean']}, max {a['max']}",
              f"prompts with >=5 answers of distinct stars (ranking data): {numbers['rankable_prompts']}"]
    skipped = numbers["skipped"]
    lines.append("skipped: " + (", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else "none"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clot.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("stats", "print counts, star coverage and skipped rows"),
                            ("split", "make and save the train/test split by prompt")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--data", default=str(SAMPLE_DIR), help="dataset folder, or 'hub' (default: the sample)")
        sub.add_argument("--strict", action="store_true", help="stop at the first bad row")
        sub.add_argument("--require-star", action="store_true", help="skip rows without likes")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    split_parser = commands.choices["split"]
    split_parser.add_argument("--out", required=True, help="where to write the split JSON")
    split_parser.add_argument("--test-ratio", type=float, default=0.05)
    split_parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        dataset = load(args.data, strict=args.strict, require_star=args.require_star)
        if args.command == "stats":
            numbers = stats(dataset)
            print(json.dumps(numbers, ensure_ascii=False, indent=2) if args.json else format_stats(numbers))
        else:
            split = make_split(dataset.prompts(), args.test_ratio, args.seed)
            split.save(args.out)
            print(f"{len(split.train)} train prompts, {len(split.test)} test prompts -> {args.out} "
                  f"(hash {split.hash})")
    except ClotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
