"""The whole CLoT recipe in one command: data → noun set → stage 1 → stage-2 rounds → [stage 3] → evaluation
→ publish.

    python training/run_clot.py --config training/configs/tiny.yaml
    python training/run_clot.py --config training/configs/qwen2.5-vl-3b.yaml --set clot.rounds=2
    python training/run_clot.py --config ... --from-stage stage2      # redo stage 2 (and what follows)
    python training/run_clot.py --config ... --push-to-hub you/clot-adapter
    python training/run_clot.py --config ... --plan --gpu-gb 24       # memory per stage; runs nothing
    accelerate launch --num_processes 2 training/run_clot.py --config ...

Every stage writes a stamp (<run_dir>/stages/<stage>.json) with a hash of its inputs: its settings and
the stamps of the stages it builds on. A stage whose stamp matches and whose output is intact is
skipped, so re-running after a crash continues where it stopped, and a second run with nothing
changed does nothing. Adapters are published atomically into the adapters folder as
<run_name>-stage1 and <run_name>-stage2-r<k>, where a running demo lists them after "Refresh".
With a `dpo:` section in the recipe, stage 3 (training/dpo.py) trains on human votes after stage 2
and publishes <run_name>-stage3-r<k>; it reruns only when the frozen vote pairs change.
Adapters made elsewhere (`compare_adapters`, e.g. the authors' CLoT-cn) are imported before the
evaluation (the "import" stage) and evaluated side by side with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import dpo  # noqa: E402
from training import evaluate as evaluation  # noqa: E402
from training import explore as exploration  # noqa: E402
from training import instructions as instruction_set  # noqa: E402
from training import sft  # noqa: E402
from training.config import (  # noqa: E402
    TINY_OFFICIAL_ADAPTER,
    distributed,
    load_config,
    resolve_adapter_source,
    resolve_base_model,
)

from clot import adapters  # noqa: E402
from clot import data as oogiri  # noqa: E402
from clot.adapter_import import OFFICIAL_ID, import_adapter  # noqa: E402
from clot.tasks import ClotError  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class RunSettings:
    base_model: str = "tiny"
    run_dir: str = "runs/tiny"
    seed: int = 0
    run_name: str = ""  # adapter names start with it; default: the run folder's name
    adapters_dir: str = "adapters"
    rounds: int = 1  # stage-2 rounds (the paper: one; a second gave no significant gain)
    continue_adapter: bool = True  # stage 2 continues the previous adapter; False: a fresh LoRA on the base
    evaluate: bool = True  # run the evaluation stage (training/evaluate.py)
    evaluate_base: bool = True  # include the bare base model in the comparison
    # Adapters made elsewhere, evaluated side by side with the base and this run's adapters: name ->
    # source (hub id or folder, e.g. clot-cn: zhongshsh/CLoT-cn), imported when the adapters folder lacks it.
    compare_adapters: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.run_name or Path(self.run_dir).name


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    """The stages of one run, each skipped when its stamp shows it already ran on the same inputs."""

    def __init__(self, config: str | None, overrides: list[str], from_stage: str | None = None):
        self.config, self.overrides = config, overrides
        self.run = load_config(RunSettings, config, "clot", self._section(overrides, "clot"))
        if self.run.rounds < 0:
            raise ClotError(f"rounds must be 0 or more, got {self.run.rounds}.")
        self.root = Path(self.run.run_dir)
        self.stamps = self.root / "stages"
        rank, _, self.barrier = distributed()
        self.is_main = rank == 0
        self.order = ["data", "instructions", "stage1"]
        for k in range(1, self.run.rounds + 1):
            self.order += [f"explore-r{k}", f"stage2-r{k}"]
        self.with_dpo = _has_section(config, "dpo")
        self.order += ((["dpo"] if self.with_dpo else []) + (["import"] if self.run.compare_adapters else [])
                       + ["evaluate", "publish"])
        self.from_stage = self._resolve(from_stage) if from_stage else None
        self.ran: list[str] = []
        self.skipped: list[str] = []

    @staticmethod
    def _section(overrides: list[str], section: str) -> list[str]:
        """`--set clot.rounds=2` reaches RunSettings; shared keys reach every section."""
        return [o for o in overrides if o.startswith(f"{section}.") or o.partition("=")[0].strip() in
                ("base_model", "run_dir", "seed")]

    def _resolve(self, name: str) -> str:
        name = {"stage3": "dpo"}.get(name, name)
        if name in self.order:
            return name
        if name in ("explore", "stage2"):
            for stage in self.order:
                if stage.startswith(name + "-"):
                    return stage
        raise ClotError(f"Unknown stage {name!r}: use one of {', '.join(self.order)}.")

    # ------------------------------------------------------------ stamps
    def _stamp(self, stage: str) -> dict | None:
        path = self.stamps / f"{stage}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def step(self, stage: str, inputs: dict, action, intact, work_dir: Path | None = None) -> dict:
        """Run `action()` unless the stamp of `stage` matches `inputs` and `intact()` holds.

        A stage interrupted on the same inputs resumes from what it left in `work_dir`
        (checkpoints, explored batches); on new inputs, or when forced, that folder is cleared first.
        Returns the stamp (with the stage's `result`)."""
        key = _digest(inputs)
        forced = self.from_stage is not None and self.order.index(stage) >= self.order.index(self.from_stage)
        stamp = self._stamp(stage)
        if not forced and stamp and stamp.get("inputs") == key and intact():
            self.skipped.append(stage)
            print(f"[{stage}] up to date, skipped", flush=True)
            return stamp
        started = self._stamp(f"{stage}.started")
        resuming = not forced and started is not None and started.get("inputs") == key
        print(f"[{stage}] {'resuming' if resuming else 'running'}", flush=True)
        if self.is_main and not resuming:
            if work_dir is not None and work_dir.exists():
                shutil.rmtree(work_dir)
            self.stamps.mkdir(parents=True, exist_ok=True)
            adapters.write_json_atomic(self.stamps / f"{stage}.started.json", {"inputs": key})
        self.barrier()
        result = action()
        stamp = {"stage": stage, "inputs": key, "result": result,
                 "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        if self.is_main:
            self.stamps.mkdir(parents=True, exist_ok=True)
            adapters.write_json_atomic(self.stamps / f"{stage}.json", stamp)
        self.barrier()
        self.ran.append(stage)
        return stamp

    def main_only(self, action):
        """Run on the main process; the others wait and then read what it wrote."""
        result = action() if self.is_main else None
        self.barrier()
        return result

    # ------------------------------------------------------------ settings of each script
    def instruction_settings(self) -> instruction_set.InstructionSettings:
        return load_config(instruction_set.InstructionSettings, self.config, "instructions",
                           self._section(self.overrides, "instructions"))

    def train_settings(self, step: str, **changes) -> sft.TrainSettings:
        """The `training` section; for stage 2 with the `stage2` section's changes on top."""
        settings = load_config(sft.TrainSettings, self.config, "training",
                               self._section(self.overrides, "training") + self._section(self.overrides, "stage2"),
                               also=None if step == "stage1" else "stage2")
        return dataclasses.replace(settings, adapters_dir=self.run.adapters_dir, run_dir=str(self.root / step),
                                   instructions=str(self.root / "instructions"), resume="auto", **changes)

    def explore_settings(self, round_: int, adapter: str) -> exploration.ExploreSettings:
        settings = load_config(exploration.ExploreSettings, self.config, "explore", self._section(self.overrides, "explore"))
        return dataclasses.replace(settings, round=round_, adapter=adapter, adapters_dir=self.run.adapters_dir,
                                   instructions=str(self.root / "instructions"), out=str(self.root / f"explore-r{round_}"))

    def dpo_settings(self, parent: str) -> dpo.DpoSettings:
        """The `dpo` section, starting from the last adapter before it, with its pairs frozen in the run."""
        settings = load_config(dpo.DpoSettings, self.config, "dpo", self._section(self.overrides, "dpo"))
        return dataclasses.replace(settings, adapters_dir=self.run.adapters_dir, run_dir=str(self.root / "stage3"),
                                   snapshot=str(self.root / "stage3-pairs"), resume="auto",
                                   init_adapter=str(Path(self.run.adapters_dir) / parent),
                                   adapter_name=f"{self.run.name}-stage3-r{settings.round}")

    def _adapter_ok(self, name: str) -> bool:
        try:
            adapters.validate(Path(self.run.adapters_dir) / name)
            return True
        except ClotError:
            return False

    def _card(self, name: str) -> dict:
        return adapters.read_card(Path(self.run.adapters_dir) / name)

    # ------------------------------------------------------------ the stages
    def execute(self) -> dict:
        ins = self.instruction_settings()
        ins = dataclasses.replace(ins, run_dir=str(self.root))

        def data_stage():
            dataset = oogiri.load(ins.data, require_star=ins.require_star)
            split = oogiri.load_or_make_split(ins.split_path, dataset.prompts(), ins.test_ratio, ins.seed)
            numbers = oogiri.stats(dataset)
            adapters.write_json_atomic(self.root / "data-stats.json", numbers)
            print(oogiri.format_stats(numbers), flush=True)
            return {"data_hash": dataset.data_hash(), "split_hash": split.hash}

        self.root.mkdir(parents=True, exist_ok=True)
        data = self.step("data", {"data": str(Path(ins.data).resolve()) if Path(ins.data).exists() else ins.data,
                                  "files": _data_files_digest(ins.data), "split": [ins.test_ratio, ins.seed]},
                         lambda: self.main_only(data_stage),
                         lambda: ins.split_path.is_file() and (self.root / "data-stats.json").is_file())

        instructions = self.step(
            "instructions", {"settings": asdict(ins), "data": data["inputs"]},
            lambda: self.main_only(lambda: {"train_hash": instruction_set.build(ins)["files"]["train"]["hash"]}),
            lambda: (ins.out_dir / "manifest.json").is_file() and (ins.out_dir / "nouns.json").is_file())

        name = self.run.name
        stage1_name = f"{name}-stage1"
        s1 = self.train_settings("stage1", adapter_name=stage1_name, stage=1, round=0)
        previous = self.step("stage1", {"settings": asdict(s1), "instructions": instructions["inputs"]},
                             lambda: self._train(s1), lambda: self._adapter_ok(stage1_name), Path(s1.run_dir))
        current, records = stage1_name, []
        for k in range(1, self.run.rounds + 1):
            settings = self.explore_settings(k, current)
            explored = self.step(f"explore-r{k}", {"settings": asdict(settings), "adapter": previous["inputs"],
                                                   "adapter_created": self._card(current).get("created")},
                                 lambda s=settings: exploration.explore(s),
                                 lambda s=settings: (s.out_dir / "summary.json").is_file(), settings.out_dir)
            records.append(str(Path(settings.out_dir) / "records.jsonl"))
            stage2_name = f"{name}-stage2-r{k}"
            init = str(Path(self.run.adapters_dir) / current) if self.run.continue_adapter else ""
            s2 = self.train_settings(f"stage2-r{k}", adapter_name=stage2_name, stage=2, round=k,
                                     extra_records=",".join(records), init_adapter=init)
            previous = self.step(f"stage2-r{k}", {"settings": asdict(s2), "explored": explored["inputs"],
                                                  "init": self._card(current).get("created") if init else None},
                                 lambda s=s2: self._train(s), lambda n=stage2_name: self._adapter_ok(n), Path(s2.run_dir))
            current = stage2_name

        trained = [stage1_name] + [f"{name}-stage2-r{k}" for k in range(1, self.run.rounds + 1)]
        if self.with_dpo:
            s3 = self.dpo_settings(current)
            self.main_only(lambda: dpo.freeze(s3))  # the votes as they are now: the stage reruns when they change
            manifest = dpo.read_manifest(s3.snapshot_dir)
            self.step("dpo", {"settings": asdict(s3), "pairs": manifest["pairs_sha256"],
                              "parent": self._card(current).get("created")},
                      lambda: self._dpo(s3, manifest), lambda: self._adapter_ok(s3.adapter_name), Path(s3.run_dir))
            trained.append(s3.adapter_name)
        report = None
        compared = list(self.run.compare_adapters)
        if compared:
            self.step("import", {"adapters": self.run.compare_adapters, "base_model": self.run.base_model},
                      lambda: self.main_only(self._import_compared),
                      lambda: all(self._adapter_ok(n) for n in compared))
        if self.run.evaluate:
            models = (["base"] if self.run.evaluate_base else []) + compared + trained
            report = self.step("evaluate", {"models": models,
                                            "cards": {n: self._card(n).get("created") for n in compared + trained},
                                            "settings": asdict(self.evaluation_settings())},
                               lambda: self.main_only(lambda: self._evaluate(models)),
                               lambda: self._evaluation_dir().joinpath("report.json").is_file())
        self.step("publish", {"adapters": {n: self._card(n).get("created") for n in trained},
                              "report": report["inputs"] if report else None},
                  lambda: self.main_only(lambda: self._publish(trained, report)),
                  lambda: all(self._adapter_ok(n) for n in trained))
        return {"adapters": trained, "ran": self.ran, "skipped": self.skipped,
                "report": str(self._evaluation_dir()) if report else None}

    def _train(self, settings: sft.TrainSettings) -> dict:
        card = sft.train(settings)
        return {"adapter": settings.adapter_name, "metrics": card.get("metrics"), "created": card.get("created")}

    def _dpo(self, settings: dpo.DpoSettings, manifest: dict) -> dict:
        card = dpo.train(settings, manifest, reuse=False)  # the stage's stamp decides what to skip
        return {"adapter": settings.adapter_name, "metrics": card.get("metrics"), "created": card.get("created"),
                "pairs_sha256": manifest["pairs_sha256"], "vote_cutoff": manifest["vote_cutoff"]}

    def _import_compared(self) -> dict:
        """Import the adapters to compare that the adapters folder does not hold yet (one that is there
        is kept as it is). The authors' CLoT-cn and its offline stand-in get the card stage `official`."""
        base = resolve_base_model(self.run.base_model)
        imported = []
        for name, source in self.run.compare_adapters.items():
            if self._adapter_ok(name):
                continue
            stand_in = source == TINY_OFFICIAL_ADAPTER  # declares Qwen/Qwen-VL-Chat, made for tiny-qwen-vl
            import_adapter(resolve_adapter_source(source), name, self.run.adapters_dir, base_model=base,
                           stage="official" if stand_in or source == OFFICIAL_ID else None, force=stand_in)
            imported.append(name)
        return {"imported": imported}

    def _evaluation_dir(self) -> Path:
        return self.root / "eval"

    def evaluation_settings(self) -> evaluation.EvalSettings:
        settings = load_config(evaluation.EvalSettings, self.config, "evaluation",
                               self._section(self.overrides, "evaluation"))
        return dataclasses.replace(settings, run_dir=str(self.root), adapters_dir=self.run.adapters_dir,
                                   out=str(self._evaluation_dir()))

    def _evaluate(self, models: list[str]) -> dict:
        """The paper's metrics for every model on one saved question set; returns the pooled numbers."""
        report = evaluation.evaluate(self.evaluation_settings(), models)
        return {"metrics": {name: {cell.split("/", 1)[1]: round(values["value"], 4)
                                   for cell, values in result["cells"].items() if cell.startswith("all/")}
                            for name, result in report["models"].items()}}

    def _publish(self, trained: list[str], report: dict | None) -> dict:
        """Copy each adapter's evaluation numbers into its card (atomically), for the demo's picker."""
        metrics = ((report or {}).get("result") or {}).get("metrics") or {}
        for name in trained:
            if name in metrics:
                card = self._card(name)
                card["evaluation"] = metrics[name]
                adapters.write_json_atomic(Path(self.run.adapters_dir) / name / adapters.CARD, card)
        return {"published": trained}


def _has_section(config: str | None, section: str) -> bool:
    """Whether the recipe has this section (optional stages run only when it is there)."""
    if config is None:
        return False
    try:
        recipe = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ClotError(f"Could not read the config {config}: {err}") from None
    return isinstance(recipe, dict) and section in recipe


def _data_files_digest(data: str) -> str:
    """Identifies the dataset's files cheaply (names, sizes, modification times) before loading it."""
    folder = Path(data)
    if not folder.is_dir():
        return data
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                     if p.suffix in (".jsonl", ".zip"))
    return _digest(entries)


def push_to_hub(adapter_dir: str | Path, repo_id: str, token: str | None = None) -> str:
    """Upload an adapter folder with a model card (README.md) to a hub model repository."""
    from huggingface_hub import HfApi

    adapter_dir = Path(adapter_dir)
    card = adapters.validate(adapter_dir)
    with tempfile.TemporaryDirectory() as staging:
        for item in adapter_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, Path(staging) / item.name)
        (Path(staging) / "README.md").write_text(model_card(adapter_dir.name, card), encoding="utf-8")
        try:
            api = HfApi(token=token)
            api.create_repo(repo_id, repo_type="model", exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type="model",
                              commit_message=f"Upload CLoT adapter {adapter_dir.name}")
        except Exception as err:  # offline, no token, no permission: one sentence, no traceback
            raise ClotError(f"Could not push {adapter_dir.name} to {repo_id} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:160] if str(err) else 'no detail'}); check the network "
                            "and `huggingface-cli login`.") from None
    return f"https://huggingface.co/{repo_id}"


def model_card(name: str, card: dict) -> str:
    """A hub model card for a published adapter, from its clot.json."""
    metrics = card.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"| {k} | {v} |"
                     for k, v in metrics.items())
    stage = {1: "stage 1 (associable instruction tuning)",
             2: f"stage 2 (explorative self-refinement), round {card.get('round')}",
             3: f"stage 3 (DPO from human votes on {card.get('vote_cutoff')}), round {card.get('round')}"
             }.get(card.get("stage"), f"{card.get('stage')}, imported from {card.get('source')}")
    return f"""---
base_model: {card.get('base_model')}
library_name: peft
tags:
  - clot
  - humor
  - oogiri
  - lora
---

# {name}

A LoRA adapter of the CLoT humor studio (Creative Leap-of-Thought, CVPR 2024): {stage}, for
`{card.get('base_model')}`. It plays Oogiri: funny captions for images, answers to questions, and
fills for blanks in images, in English, Chinese and Japanese.

Trained {card.get('created', '')} on data {card.get('data_hash')} (split {card.get('split_hash')}).

| metric | value |
|---|---|
{rows or '| (none) | |'}

Load it with the CLoT humor studio (`python app.py --base-model {card.get('base_model')}` with this folder in
`adapters/`), or with peft's `PeftModel.from_pretrained`.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe (training/configs/<preset>.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting: key=value (shared keys) or section.key=value "
                             "(sections: clot, instructions, training, stage2, explore, dpo, evaluation)")
    parser.add_argument("--from-stage", help="force this stage and every later one to run again")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the last adapter to this hub repository")
    parser.add_argument("--plan", action="store_true",
                        help="print each stage's settings and estimated peak GPU memory (training/plan.py); run nothing")
    parser.add_argument("--gpu-gb", type=float, metavar="GIB", help="with --plan: whether each stage fits this GPU")
    args = parser.parse_args(argv)
    if args.gpu_gb is not None and not args.plan:
        parser.error("--gpu-gb goes with --plan")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.plan:
        from training import plan

        try:
            print(plan.plan(args.config, args.set, args.gpu_gb))
        except ClotError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        pipeline = Pipeline(args.config, args.set, args.from_stage)
        summary = pipeline.execute()
        if args.push_to_hub and pipeline.is_main:
            url = push_to_hub(Path(pipeline.run.adapters_dir) / summary["adapters"][-1], args.push_to_hub)
            print(f"pushed {summary['adapters'][-1]} to {url}")
    except ClotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if pipeline.is_main:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
