"""Write the bundled sample vote export (votes.jsonl + images/) in the format of `python -m clot.votes export`.

42 invented votes on 12 prompts of assets/oogiri-sample (4 per language), for the tiny preset's
stage 3 and the tests. Every answer text was written for this project. The rows cover every case
the pair builder handles: A/B battles (A, B, tie, bad), picks (a winner, "none"), a moderated
(excluded) vote, votes on another base model, a repeated pair settled by majority and one that is
an exact tie. Run from the repository root:

    python assets/sample-votes/make_sample.py

The output is deterministic, so re-running it leaves the committed files unchanged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import zipfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "oogiri-sample"
BASE = "tiny"
ADAPTERS = ["base", "tiny-stage1", "tiny-stage2-r1"]

# (task, language, question, image id in the Oogiri sample, answers written for this sample)
PROMPTS = [
    ("I2T", "en", "", "500100", ["The cucumber has filed a restraining order.",
                                 "Cat.exe has stopped working.",
                                 "A cat looking at a cucumber.",
                                 "Plot twist: the cucumber is the pet."]),
    ("T2T", "en", "What is the worst thing to say at a job interview?", None,
     ["Do you mind if my mom answers this one?", "I am good at jobs.",
      "My greatest weakness is interviews like this.", "Is the salary negotiable, or just the snacks?"]),
    ("T2T", "en", "Invent a useless superpower.", None,
     ["Knowing exactly when your toast is one second from done, after it burns.", "Flying.",
      "Turning invisible, but only when nobody is looking.", "Super strength for opening already-open doors."]),
    ("T2T", "en", "Why was the calendar sad?", None,
     ["Its days were numbered.", "Because it was a calendar.",
      "Everyone kept tearing pages out of its life.", "Nobody ever asked about its weekend."]),
    ("T2T", "zh", "如果手机会说话，它最想对你说什么？", None,
     ["求你了，让我睡一会儿，电量只剩1%了。", "你好。", "别再拍天花板了，我都拍吐了。", "你昨晚搜了什么，我都记得。"]),
    ("T2T", "zh", "为什么周一这么难熬？", None,
     ["因为周日跑得太快，周一追不上。", "因为是周一。", "周一：我也不想来，是周日推我的。", "周一的闹钟比周五的响三倍。"]),
    ("T2T", "zh", "用一句话形容你的减肥计划。", None,
     ["明天开始，永远是明天开始。", "少吃多动。", "我的体重和我的存款一样，只会往一个方向走。", "减肥第一天，冰箱先瘦了，它空了。"]),
    ("IT2T", "zh", "", "600108", ["老板说这是福利。", "一张图片。", "连空白都在加班。", "请填写你的梦想（限五个字）。"]),
    ("T2T", "ja", "こんな宅配便は嫌だ。どんなの？", None,
     ["荷物より先に配達員の自分語りが届く。", "遅い宅配便。", "不在票に「また来ます、たぶん」と書いてある。", "ハンコの代わりに一発ギャグを要求される。"]),
    ("T2T", "ja", "無人島に一つだけ持っていくなら？", None,
     ["帰りの船の予約票。", "水。", "島の方を持って帰る大きなカバン。", "圏外でも鳴る上司からの電話。"]),
    ("T2T", "ja", "ロボットが初めて言った冗談とは？", None,
     ["「人間って、電池切れたら何で充電するの？」", "こんにちは。", "「私の趣味はアップデートです。毎晩勝手にされます」", "「ネジが一本足りないのは、私ではなく設計者です」"]),
    ("I2T", "ja", "", "700100", ["この表情、月曜の朝と同じ。", "猫の写真。", "キュウリに人生を教わった日。", "猫、キュウリと和解する気はない。"]),
]

# Votes: (prompt index, kind, shown answer indices, choice[, extra]). Battles show two answers
# (the funny one from stage 2, the flat one from base...), picks show four cards.
VOTES = [
    (0, "battle", [0, 2], "A"), (0, "battle", [2, 1], "B"), (0, "pick", [0, 1, 2, 3], 3),
    (1, "battle", [0, 1], "A"), (1, "battle", [1, 2], "B"), (1, "pick", [0, 1, 2, 3], 2),
    (1, "battle", [3, 1], "tie"),
    (2, "battle", [0, 1], "A"), (2, "battle", [2, 1], "A"), (2, "pick", [0, 1, 2, 3], "none"),
    (2, "battle", [3, 1], "bad"),
    (3, "battle", [0, 1], "A"), (3, "battle", [1, 0], "B"), (3, "battle", [0, 1], "B"),  # majority: 0 beats 1
    (3, "pick", [0, 1, 2, 3], 0),
    (4, "battle", [0, 1], "A"), (4, "battle", [3, 1], "A"), (4, "pick", [0, 1, 2, 3], 2),
    (5, "battle", [0, 1], "A"), (5, "battle", [1, 2], "B"), (5, "pick", [0, 1, 2, 3], 0),
    (6, "battle", [0, 1], "A"), (6, "battle", [2, 1], "A"), (6, "pick", [0, 1, 2, 3], 3),
    (7, "battle", [0, 1], "A"), (7, "battle", [2, 1], "A"),
    (8, "battle", [0, 1], "A"), (8, "battle", [2, 1], "A"), (8, "pick", [0, 1, 2, 3], 3),
    (9, "battle", [0, 1], "A"), (9, "battle", [2, 1], "A"), (9, "pick", [0, 1, 2, 3], 2),
    (9, "battle", [3, 1], "B"), (9, "battle", [1, 3], "B"),  # an exact tie: this pair is dropped
    (10, "battle", [0, 1], "A"), (10, "battle", [2, 1], "A"), (10, "pick", [0, 1, 2, 3], 3),
    (11, "battle", [0, 1], "A"), (11, "battle", [2, 1], "A"),
    (11, "pick", [0, 1, 2, 3], 2, "excluded"),  # moderated away
    (4, "battle", [1, 0], "A", "other-base"), (8, "pick", [0, 1, 2, 3], 1, "other-base"),
]


def png_of(image_id: str) -> bytes:
    """The Oogiri sample's picture, re-encoded as the PNG the vote store keeps."""
    with zipfile.ZipFile(SAMPLE / "images.zip") as archive:
        name = next(n for n in archive.namelist() if Path(n).stem == image_id)
        image = Image.open(io.BytesIO(archive.read(name))).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def build() -> None:
    images_dir = HERE / "images"
    images_dir.mkdir(exist_ok=True)
    hashes = {}
    for _, _, _, image_id, _ in PROMPTS:
        if image_id and image_id not in hashes:
            data = png_of(image_id)
            hashes[image_id] = hashlib.sha256(data).hexdigest()
            (images_dir / f"{hashes[image_id]}.png").write_bytes(data)
    start = dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.timezone.utc)
    lines = []
    for number, (prompt_index, kind, shown, choice, *extra) in enumerate(VOTES):
        task, language, question, image_id, answers = PROMPTS[prompt_index]
        candidates = []
        for position, answer in enumerate(shown):
            adapter = ADAPTERS[(answer + position) % len(ADAPTERS)] if kind == "pick" else ADAPTERS[answer % 3]
            candidates.append({
                "generation_id": f"g{number:03d}-{position}", "adapter": adapter,
                "adapter_created": None if adapter == "base" else "2026-11-01T12:00:00+00:00",
                "mode": "CLoT" if kind == "battle" else "sample", "condition": "",
                "text": answers[answer], "scores": None, "seed": 1000 + number, "sampling": None})
        lines.append({
            "vote_id": f"sample-{number:03d}", "kind": kind, "blind": kind == "battle",
            "time": (start + dt.timedelta(minutes=17 * number)).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "session": hashlib.sha256(f"sample-session-{number % 7}".encode()).hexdigest()[:16],
            "excluded": "excluded" in extra,
            "base_model": "Qwen/Qwen2.5-VL-3B-Instruct" if "other-base" in extra else BASE,
            "prompt": {"task": task, "language": language, "text": question,
                       "image": hashes.get(image_id) if image_id else None},
            "candidates": candidates, "choice": choice})
    with open(HERE / "votes.jsonl", "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    build()
