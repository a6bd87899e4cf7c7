"""Write the bundled Oogiri-GO sample (en.jsonl, cn.jsonl, jp.jsonl, images.zip) in the official layout.

Every joke, star count and picture here was made for this project. The pictures are drawn with PIL;
images with text use a Noto CJK font when the system has one. Run from the repository root:

    python assets/oogiri-sample/make_sample.py

The output is deterministic, so re-running it leaves the committed files unchanged.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
FONT_FILES = ["/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
              "/usr/share/fonts/opentype/noto/NotoSerifCJK-Bold.ttc"]
NO_STAR = "missing"  # the row has no "star" key at all


# ------------------------------------------------------------------ pictures
def cat_and_cucumber(d: ImageDraw.ImageDraw, tint: str) -> None:
    d.ellipse((20, 40, 70, 90), fill=tint)
    d.polygon([(24, 48), (30, 26), (40, 44)], fill=tint)
    d.polygon([(50, 44), (60, 26), (66, 48)], fill=tint)
    d.ellipse((32, 56, 40, 64), fill="white")
    d.ellipse((50, 56, 58, 64), fill="white")
    d.rounded_rectangle((95, 70, 150, 82), radius=6, fill="#3a8f3a")


def melting_snowman(d: ImageDraw.ImageDraw, tint: str) -> None:
    d.ellipse((120, 8, 150, 38), fill="#ffd23f")
    d.ellipse((30, 78, 110, 98), fill="white")
    d.ellipse((50, 50, 90, 84), fill="white")
    d.ellipse((58, 28, 82, 52), fill="white")
    d.polygon([(70, 40), (88, 43), (70, 44)], fill=tint)


def crowned_fish(d: ImageDraw.ImageDraw, tint: str) -> None:
    d.ellipse((40, 20, 120, 95), outline="#4a7fb5", width=3)
    d.ellipse((62, 50, 96, 70), fill=tint)
    d.polygon([(96, 60), (108, 50), (108, 70)], fill=tint)
    d.polygon([(66, 50), (70, 40), (75, 47), (80, 38), (84, 47), (89, 40), (90, 50)], fill="#ffd23f")


def ladder_to_cloud(d: ImageDraw.ImageDraw, tint: str) -> None:
    d.ellipse((90, 5, 155, 35), fill="white")
    d.line((60, 98, 100, 25), fill=tint, width=3)
    d.line((78, 98, 118, 25), fill=tint, width=3)
    for step in range(8):
        y = 92 - step * 9
        x = 62 + step * 4.9
        d.line((x, y, x + 18, y), fill=tint, width=2)


def robot_with_flower(d: ImageDraw.ImageDraw, tint: str) -> None:
    d.rectangle((40, 30, 80, 60), fill=tint)
    d.rectangle((35, 62, 85, 98), fill=tint)
    d.ellipse((48, 38, 56, 46), fill="#ff4040")
    d.ellipse((64, 38, 72, 46), fill="#ff4040")
    d.line((85, 75, 115, 60), fill=tint, width=4)
    d.line((115, 60, 115, 40), fill="#3a8f3a", width=2)
    d.ellipse((108, 28, 122, 42), fill="#ff77aa")


PICTURES = {"cat": cat_and_cucumber, "snowman": melting_snowman, "fish": crowned_fish,
            "ladder": ladder_to_cloud, "robot": robot_with_flower}


def draw_picture(kind: str, tint: str) -> Image.Image:
    image = Image.new("RGB", (160, 100), "#bfe3ff")
    PICTURES[kind](ImageDraw.Draw(image), tint)
    return image


def font(size: int) -> ImageFont.ImageFont:
    for path in FONT_FILES:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def draw_text_card(text: str) -> Image.Image:
    """A sign with the prompt text; '____' marks the blank and is drawn as an empty box."""
    image = Image.new("RGB", (160, 80), "#fff8e0")
    d = ImageDraw.Draw(image)
    d.rectangle((2, 2, 157, 77), outline="#333333", width=2)
    face = font(13)
    lines, line = [], ""
    for char in text:  # wrap by width, character by character (works for CJK and English alike)
        if d.textlength(line + char, font=face) > 140:
            lines.append(line)
            line = ""
        line += char
    lines.append(line)
    y = 40 - 9 * len(lines)
    for line in lines:
        d.text((10, y), line, fill="#222222", font=face)
        y += 18
    return image


# ------------------------------------------------------------------ prompts and answers
# Each prompt: (type, question, picture, [(answer, star)]). picture is ("draw", kind, tint) or ("card", text).
EN = [
    ("I2T", None, ("draw", "cat", "#e08a3c"), [
        ("Day 14. The cucumber still refuses to explain itself.", 31),
        ("When the salad starts following you home.", 18),
        ("Don't move. It can smell fear and ranch dressing.", 12),
        ("My therapist said to face my fears. She never said they'd be this crunchy.", 24),
        ("Every villain has an origin story. His was a farmers' market.", 7),
        ("It's not a staring contest if only one of you has eyes.", None)]),
    ("I2T", None, ("draw", "snowman", "#ff8800"), [
        ("Me at 9 a.m. versus me at the 9:05 meeting.", 15),
        ("He wanted a beach body. He got a beach puddle.", 22),
        ("This is fine. This is fine. This is fi", 9),
        ("Global warming, but make it personal.", NO_STAR)]),
    ("I2T", None, ("draw", "fish", "#ff6a00"), [
        ("King of everything he can see, which is mostly his own reflection.", 19),
        ("Forty laps a day and still no promotion out of the bowl.", 6),
        ("Royal decree: nobody mentions the cat.", 27),
        ("Long live the king, for roughly three years.", 0)]),
    ("I2T", None, ("draw", "robot", "#9aa5b1"), [
        ("Error 404: feelings not found. Flower located.", 8),
        ("After ten thousand simulations, flowers beat 'I made you a spreadsheet'.", 14),
        ("Please accept this flower. It has been fully debugged.", 5)]),
    ("T2T", "What is the worst thing to say at a job interview?", None, [
        ("Is this the line for free soup?", 9),
        ("My greatest weakness is job interviews.", 21),
        ("Can I answer in interpretive dance?", 3),
        ("Honestly, I only came for the parking validation.", 12),
        ("I'm a team player. Which team are you? I'll switch.", 30),
        ("Sorry I'm late, my horse got a flat tire.", 17)]),
    ("T2T", "Invent a useless superpower.", None, [
        ("Turning invisible, but only when nobody is looking.", 25),
        ("Super strength, but only against jar lids that are already open.", 11),
        ("Flying, at walking speed, one meter off the ground.", 7),
        ("I can talk to plants. They mostly complain about the Wi-Fi.", 0),
        ("Knowing the exact moment your toast is perfect, but only in your sleep.", 16)]),
    ("T2T", "Why was the calendar sad?", None, [
        ("Its days were numbered.", 3),
        ("Everyone kept taking its dates and never calling back.", 10),
        ("Somebody scheduled Monday twice.", 14)]),
    ("T2T", "What is a dog's most embarrassing secret?", None, [
        ("He's been faking 'sit' for years. He's just tired.", 17),
        ("The mailman is his best friend. The barking is an act.", 22),
        ("He can read. He chooses not to.", 8),
        ("He watches cat videos when you're at work.", None)]),
    ("IT2T", None, ("card", "The worst gift ever: ____"), [
        ("a gift card for the shop that closed yesterday", 12),
        ("a hug, sent by mail", 5),
        ("a mirror labelled 'the problem'", 19),
        ("one sock, gift-wrapped twice", 7),
        ("my ex's Wi-Fi password", 2)]),
    ("IT2T", None, ("card", "Breaking news: local pigeon ____"), [
        ("elected mayor after promising more bread", 14),
        ("sues statue for emotional damages", 9),
        ("still hasn't paid rent", NO_STAR)]),
    ("IT2T", None, ("card", "Step 1: ____. Step 2: profit."), [
        ("buy a goat", 6),
        ("explain crypto to the goat", 11),
        ("forget what step 1 was", 3)]),
]

CN = [
    ("I2T", None, ("draw", "cat", "#6b6b6b"), [
        ("它不动，我不动，谁先眨眼谁就是沙拉。", 20),
        ("我妈说多吃蔬菜，没说蔬菜会自己找上门。", 33),
        ("对峙第三天，黄瓜依然保持沉默。", 12),
        ("这是我见过最绿的杀手。", 6),
        ("铲屎官，你这是在挑战我的职业素养。", 9),
        ("别慌，它只是想加入我们的家庭群。", 0)]),
    ("I2T", None, ("draw", "snowman", "#ff8800"), [
        ("打工人周一早上的精神状态。", 28),
        ("减肥成功的第一天，也是最后一天。", 15),
        ("我不是在融化，我是在表达情绪。", 8),
        ("防晒霜涂少了。", None)]),
    ("I2T", None, ("draw", "fish", "#d93a3a"), [
        ("这个鱼缸，朕说了算。", 17),
        ("三秒记忆的好处：每天都是登基大典。", 25),
        ("臣妾做不到啊，缸太小了。", 11)]),
    ("I2T", None, ("draw", "ladder", "#8b5a2b"), [
        ("老板画的饼，就挂在那上面。", 30),
        ("这就是传说中的云办公。", 18),
        ("爬到一半发现忘带工牌。", 9),
        ("上面信号满格。", 4),
        ("升职通道，已经到顶了。", 13)]),
    ("T2T", "如果手机会说话，它最想对你说什么？", None, [
        ("别再半夜两点盯着我了，我也要睡觉。", 26),
        ("我电量百分之二十你就慌，你精力百分之二十的时候我慌过吗？", 14),
        ("那个表情包你已经发过八百遍了。", 19),
        ("求你清理一下相册，我快喘不过气了。", 7),
        ("你又把我摔了，我不说话不代表我不疼。", 3),
        ("其实我一直在听，你唱歌确实跑调。", 31)]),
    ("T2T", "为什么周一这么难熬？", None, [
        ("因为周日没做好分手的心理准备。", 22),
        ("周一是周末的前任，见面总是尴尬。", 16),
        ("它只是在替周二打掩护。", 5)]),
    ("T2T", "用一句话形容你的减肥计划。", None, [
        ("从明天开始，已经开始三年了。", 27),
        ("体重秤和我已经互相不说话了。", 10),
        ("计划很瘦，我很胖。", 18),
        ("吃饱了才有力气减肥。", NO_STAR)]),
    ("T2T", "外星人来到地球做的第一件事是什么？", None, [
        ("先问WiFi密码。", 13),
        ("去超市排队领鸡蛋。", 8),
        ("问能不能用外星币扫码支付。", 0)]),
    ("IT2T", None, ("card", "我的人生格言：____"), [
        ("能躺着绝不坐着", 23),
        ("明天再说", 15),
        ("饭可以不吃，觉一定要睡", 9),
        ("别人有的我不一定要有，但外卖必须有", 4),
        ("做人要低调，尤其是体重", 12)]),
    ("IT2T", None, ("card", "老板，我今天请假是因为____"), [
        ("我的猫说它需要我", 16),
        ("床不让我走", 21),
        ("闹钟辞职了", 8)]),
    ("IT2T", None, ("card", "____，是成年人最后的倔强。"), [
        ("假装没看到工作群", 19),
        ("办了健身卡", 7),
        ("早睡", None)]),
]

JP = [
    ("I2T", None, ("draw", "cat", "#222222"), [
        ("三日目。まだ向こうからは何も言ってこない。", 24),
        ("野菜の分際で、よくここまで来たな。", 15),
        ("おかんの「野菜も食べなさい」って、こういうことか。", 9),
        ("河童の使いが来た。", 31),
        ("これが噂のグリーンハラスメント。", 5),
        ("動いたら負け。", 0)]),
    ("I2T", None, ("draw", "snowman", "#ff8800"), [
        ("月曜の朝の俺。", 12),
        ("夏休みの宿題を見た瞬間の俺。", 19),
        ("溶けてるんじゃない。心を開いてるんだ。", 8),
        ("ダイエット、成功です。", None)]),
    ("I2T", None, ("draw", "fish", "#ff6a00"), [
        ("この金魚鉢、全部わしの領土。", 14),
        ("即位して三秒で即位したことを忘れる。", 22),
        ("大臣もいない、国民もいない、水草はいる。", 7)]),
    ("I2T", None, ("draw", "ladder", "#8b5a2b"), [
        ("上司の「いつでも相談して」の距離感。", 26),
        ("給料が上がる階段、途中からない。", 17),
        ("天国への就職活動。", 6),
        ("雲の上にWi-Fiがあると聞いて。", 11)]),
    ("T2T", "こんな宅配便は嫌だ。どんなの？", None, [
        ("「置き配しました」の写真が、うちじゃない。", 29),
        ("荷物より先に配達員が家に上がってくる。", 18),
        ("不在票に「また来ます（来ない）」と書いてある。", 23),
        ("届いたのが配達員本人。", 12),
        ("伝票の品名が「秘密」。", 4),
        ("ハンコの代わりに握手を求められる。", 8)]),
    ("T2T", "無人島に一つだけ持っていくなら？", None, [
        ("帰りの船。", 20),
        ("島の取扱説明書。", 13),
        ("延長コード。", 6)]),
    ("T2T", "ロボットが初めて言った冗談とは？", None, [
        ("「私に感情はありません」（ウインク）", 15),
        ("「再起動してもいいですか」と上司に聞いた。", 9),
        ("人間って、充電何時間？", NO_STAR)]),
    # A T2T prompt given as a picture of text: question is null, as in some official Japanese rows.
    ("T2T", None, ("card", "こんなコンビニは嫌だ"), [
        ("レジで店員が面接を始める。", 16),
        ("おでんの具が全部こんにゃく。", 10),
        ("「温めますか？」と聞いて、こっちの肩を温めてくる。", 21)]),
    ("IT2T", None, ("card", "今日から私は____になります。"), [
        ("布団の一部", 25),
        ("猫の専属秘書", 14),
        ("伝説の定時退社マン", 19),
        ("月曜日の敵", 6),
        ("冷蔵庫の番人", 10)]),
    ("IT2T", None, ("card", "医者「あなたの病名は____です」"), [
        ("月曜日アレルギー", 17),
        ("二度寝依存症", 22),
        ("ポテチ欠乏症", 8)]),
    ("IT2T", None, ("card", "____、それが我が家のルール。"), [
        ("最後の唐揚げは猫のもの", 12),
        ("リモコンを持った者が王", 18),
        ("じゃんけんで負けた人が皿洗い", None)]),
]

LANGUAGES = {"en": (EN, 500100), "cn": (CN, 600100), "jp": (JP, 700100)}


def member_name(image_id: str, kind: str, lang: str) -> str:
    """Mixed folders and extensions on purpose: the loader must resolve images by id alone."""
    if kind == "card":
        return f"other/{image_id}.png"
    return f"images/{lang}/{image_id}.jpeg" if lang == "jp" else f"images/{image_id}.jpg"


def main() -> None:
    pictures: dict[str, bytes] = {}
    for lang, (prompts, first_id) in LANGUAGES.items():
        rows = []
        for number, (task, question, picture, answers) in enumerate(prompts):
            image_id = None
            if picture is not None:
                image_id = str(first_id + number)
                image = draw_picture(picture[1], picture[2]) if picture[0] == "draw" else draw_text_card(picture[1])
                buffer = io.BytesIO()
                if picture[0] == "card":
                    image.save(buffer, format="PNG", optimize=True)
                else:
                    image.save(buffer, format="JPEG", quality=80)
                pictures[member_name(image_id, picture[0], lang)] = buffer.getvalue()
            for text, star in answers:
                row = {"type": task, "question": question, "image": image_id, "text": text}
                if star != NO_STAR:
                    row["star"] = star
                rows.append(row)
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        (HERE / f"{lang}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with zipfile.ZipFile(HERE / "images.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(pictures):
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))  # fixed date: reproducible bytes
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, pictures[name])
    print(f"wrote {sum(len(v[0]) for v in LANGUAGES.values())} prompts, {len(pictures)} images to {HERE}")


if __name__ == "__main__":
    main()
