"""Every prompt template of CLoT, in one place, as in the paper (arXiv 2312.02439).

The demo, instruction building, exploration and evaluation all build their prompts here,
so a model is always asked at inference exactly what it was taught in training.

A user message is composed of parts, each with three wordings per language:
    opener ("think outside the box") + task brief + kind-specific body + lead-in.
`wording` (0, 1, 2) picks the same variant of every part, so there are three complete
wordings for every kind × task type × language.

Two template sets: "studio" (the above, what our adapters are trained on) and "official" (the
wording the authors' CLoT-cn adapter was trained and served with; see OFFICIAL_PERSONA below).
"""

from __future__ import annotations

import re

from clot.tasks import ClotError, Language, Task

EN, ZH, JA = Language.EN, Language.ZH, Language.JA
NUM_WORDINGS = 3
LETTERS = "ABCDEFGH"

PERSONA = {
    EN: "You are a comedy writer who knows internet memes and plays Oogiri: "
        "you answer prompts with surprising, creative and funny replies.",
    ZH: "你是一位熟悉网络梗的幽默大师，擅长玩大喜利：用出人意料、有创意又好笑的回答回应题目。",
    JA: "あなたはネットのミームに詳しいお笑い作家で、大喜利の名人です。意外で独創的で面白い答えを返します。",
}

OPENER = {
    EN: ["Let's think outside the box.",
         "Let's think outside the box and take an unexpected leap.",
         "Think outside the box: the obvious answer is never the funny one."],
    ZH: ["让我们跳出框框思考。",
         "让我们跳出常规，来一次意想不到的联想。",
         "跳出框框想一想：最显而易见的答案从来都不好笑。"],
    JA: ["発想を飛躍させて考えましょう。",
         "常識の枠を飛び越えて、意外な連想をしてみましょう。",
         "枠にとらわれずに考えて。ありきたりな答えは面白くありません。"],
}

TASK_BRIEF = {
    Task.I2T: {
        EN: ["Look at the image and write a funny caption for it.",
             "Here is a picture. What is the funniest thing someone in it could be saying or thinking?",
             "Give this image a witty one-liner that makes people laugh."],
        ZH: ["看这张图片，为它配一句好笑的话。",
             "这是一张图片。图中的人或物此刻最好笑的心声会是什么？",
             "给这张图写一句让人笑出声的神配文。"],
        JA: ["この画像を見て、面白い一言をつけてください。",
             "写真で一言。この場面で一番笑えるセリフは何でしょう？",
             "この画像に、思わず笑ってしまうキャプションをつけてください。"],
    },
    Task.IT2T: {
        EN: ["The image contains text with a blank. Fill in the blank so the result is funny.",
             "Some words in this picture are missing. What goes in the gap to make it hilarious?",
             "Complete the sentence shown in the image in the funniest way you can."],
        ZH: ["图片里有一段留了空白的文字，请填上空白，让它变得好笑。",
             "图中的句子缺了几个字，填什么最好笑？",
             "用最搞笑的方式补全图片里的句子。"],
        JA: ["画像の中に空欄のある文があります。面白くなるように空欄を埋めてください。",
             "この画像の文には抜けている言葉があります。何を入れたら一番笑えますか？",
             "画像の文を、一番面白くなるように完成させてください。"],
    },
    Task.T2T: {
        EN: ["Answer the following question in a funny way.",
             "Here is a prompt. Reply with something surprising and funny.",
             "Give the funniest possible answer to this question."],
        ZH: ["请用幽默的方式回答下面的问题。",
             "这是一道题目，请给出一个出人意料又好笑的回答。",
             "请给这个问题一个最好笑的回答。"],
        JA: ["次のお題に面白く答えてください。",
             "お題です。意外で笑える答えを返してください。",
             "このお題に、一番面白い答えをください。"],
    },
}

QUESTION = {EN: "Question: {question}", ZH: "题目：{question}", JA: "お題：{question}"}

CONDITION = {
    EN: "Condition: your answer must contain the word “{word}”.",
    ZH: "条件：回答中必须包含“{word}”。",
    JA: "条件：答えに「{word}」という言葉を必ず入れてください。",
}

MASKED = {
    EN: ["Here is a funny answer with a part hidden as [MASK]. Restore the complete answer: {masked}",
         "Fill in [MASK] to recover the whole funny answer: {masked}",
         "One piece of this joke was replaced by [MASK]. Write the full joke: {masked}"],
    ZH: ["下面这个好笑的回答中有一部分被遮成了 [MASK]，请还原完整的回答：{masked}",
         "补全 [MASK]，还原整个好笑的回答：{masked}",
         "这个笑话的一部分被换成了 [MASK]，请写出完整的笑话：{masked}"],
    JA: ["面白い答えの一部が [MASK] で隠されています。元の答えを全部書いてください：{masked}",
         "[MASK] を埋めて、面白い答えを完成させてください：{masked}",
         "このネタの一部が [MASK] になっています。ネタ全体を書いてください：{masked}"],
}

SELECT_ONE = {
    EN: ["Which of these answers is the funniest? Reply with its letter and text.",
         "Pick the single funniest answer below, as letter and text.",
         "Only one of these answers is truly funny. Which one? Give its letter and text."],
    ZH: ["下面哪个回答最好笑？请给出它的字母和内容。",
         "从下面的回答中选出最好笑的一个，写出字母和内容。",
         "下面只有一个回答真正好笑，是哪一个？请写出字母和内容。"],
    JA: ["次の答えのうち、一番面白いのはどれですか？記号と答えを書いてください。",
         "一番面白い答えを一つ選び、記号と答えを書いてください。",
         "本当に面白い答えは一つだけです。どれですか？記号と答えを書いてください。"],
}

SELECT_MANY = {
    EN: ["Which {n} of these answers are the funniest? Reply with their letters and texts.",
         "Pick the {n} funniest answers below, each as letter and text.",
         "Exactly {n} of these answers are truly funny. Which ones? Give letters and texts."],
    ZH: ["下面哪{n}个回答最好笑？请给出它们的字母和内容。",
         "从下面的回答中选出最好笑的{n}个，写出字母和内容。",
         "下面恰好有{n}个回答真正好笑，是哪几个？请写出字母和内容。"],
    JA: ["次の答えのうち、面白いものを{n}つ選び、記号と答えを書いてください。",
         "一番面白い答えを{n}つ選び、それぞれ記号と答えを書いてください。",
         "本当に面白い答えはちょうど{n}つです。どれですか？記号と答えを書いてください。"],
}

RANK = {
    EN: ["Rank these answers from funniest to least funny, as a numbered list of letters and texts.",
         "Order the answers below by how funny they are, funniest first.",
         "Sort these answers from the biggest laugh to the smallest, as 1. letter. text."],
    ZH: ["请把这些回答按好笑程度从高到低排序，用编号列出字母和内容。",
         "按好笑程度给下面的回答排序，最好笑的排第一。",
         "把这些回答从最好笑到最不好笑排列，格式为“1. 字母. 内容”。"],
    JA: ["これらの答えを面白い順に並べ、番号付きで記号と答えを書いてください。",
         "次の答えを面白さの順に並べてください。一番面白いものが最初です。",
         "笑いの大きい順に並べ替えてください。形式は「1. 記号. 答え」です。"],
}

LEAD_IN = {
    EN: ["A satisfying answer is:", "The funniest answer is:", "A great answer would be:"],
    ZH: ["令人满意的回答是：", "最好笑的回答是：", "一个绝妙的回答是："],
    JA: ["満足のいく答えは：", "一番面白い答えは：", "最高の答えは："],
}

OPTIONS_HEADER = {EN: "Options:", ZH: "选项：", JA: "選択肢："}


def _pick(variants: list[str], wording: int) -> str:
    return variants[wording % len(variants)]


def _head(task: Task, lang: Language, question: str, wording: int) -> list[str]:
    parts = [_pick(OPENER[lang], wording), _pick(TASK_BRIEF[task][lang], wording)]
    if question:
        parts.append(QUESTION[lang].format(question=question))
    return parts


def generation_prompt(task: Task, lang: Language, question: str = "", condition: str = "",
                      wording: int = 0, template_set: str = "studio") -> str:
    """Kinds 1 and 2: ask for a funny answer, optionally one that must contain `condition`."""
    if check_template_set(template_set) == "official":
        return official_generation_prompt(task, question, condition, wording)
    parts = _head(task, lang, question, wording)
    if condition:
        parts.append(CONDITION[lang].format(word=condition))
    parts.append(_pick(LEAD_IN[lang], wording))
    return "\n".join(parts)


def masked_prompt(task: Task, lang: Language, masked_answer: str, question: str = "",
                  wording: int = 0) -> str:
    """Kind 3: restore an answer in which a noun or phrase became [MASK]."""
    parts = _head(task, lang, question, wording)
    parts.append(_pick(MASKED[lang], wording).format(masked=masked_answer))
    parts.append(_pick(LEAD_IN[lang], wording))
    return "\n".join(parts)


def _options_block(lang: Language, options: list[str]) -> str:
    if not 2 <= len(options) <= len(LETTERS):
        raise ClotError(f"Between 2 and {len(LETTERS)} options are needed, got {len(options)}.")
    lines = [OPTIONS_HEADER[lang]]
    lines += [f"{LETTERS[i]}. {one_line(text)}" for i, text in enumerate(options)]
    return "\n".join(lines)


def selection_prompt(task: Task, lang: Language, options: list[str], num_correct: int = 1,
                     question: str = "", wording: int = 0) -> str:
    """Kind 4 (mTn): pick the `num_correct` funniest of the lettered options."""
    parts = _head(task, lang, question, wording)
    body = SELECT_ONE if num_correct == 1 else SELECT_MANY
    parts.append(_pick(body[lang], wording).format(n=num_correct))
    parts.append(_options_block(lang, options))
    parts.append(_pick(LEAD_IN[lang], wording))
    return "\n".join(parts)


def ranking_prompt(task: Task, lang: Language, options: list[str], question: str = "",
                   wording: int = 0) -> str:
    """Kind 5: order the lettered options from funniest to least funny."""
    parts = _head(task, lang, question, wording)
    parts.append(_pick(RANK[lang], wording))
    parts.append(_options_block(lang, options))
    parts.append(_pick(LEAD_IN[lang], wording))
    return "\n".join(parts)


def selection_target(options: list[str], picks: list[int]) -> str:
    """`A. <text>` per picked option, in letter order, one per line."""
    return "\n".join(f"{LETTERS[i]}. {one_line(options[i])}" for i in sorted(picks))


def ranking_target(options: list[str], order: list[int]) -> str:
    """`1. C. <text>` … : `order` lists option indices from funniest to least funny."""
    if sorted(order) != list(range(len(options))):
        raise ClotError("A ranking must order every option exactly once.")
    return "\n".join(f"{place}. {LETTERS[i]}. {one_line(options[i])}" for place, i in enumerate(order, 1))


RANK_PREFIX = "1. "  # what a ranking answer starts with, before the first letter


def parse_selection(text: str, num_options: int, num_correct: int = 1) -> list[int] | None:
    """Letters chosen in a generated selection answer; None when it cannot be parsed."""
    found: list[int] = []
    for match in re.finditer(r"(?:^|\n)\s*([A-H])[.．)]", text):
        index = LETTERS.index(match.group(1))
        if index < num_options and index not in found:
            found.append(index)
    return found[:num_correct] if len(found) >= num_correct else None


def parse_ranking(text: str, num_options: int) -> list[int] | None:
    """Option order of a generated ranking answer; None unless every option appears once."""
    order: list[int] = []
    for match in re.finditer(r"(?:^|\n)\s*\d+\s*[.．)]\s*([A-H])[.．)]", text):
        index = LETTERS.index(match.group(1))
        if index < num_options and index not in order:
            order.append(index)
    return order if len(order) == num_options else None


def one_line(text: str) -> str:
    """Options are listed one per line, so their own line breaks become spaces."""
    return " ".join(text.split())


ASSISTANT = {
    EN: "You are a precise, matter-of-fact assistant.",
    ZH: "你是一个严谨、实事求是的助手。",
    JA: "あなたは正確で事実に忠実なアシスタントです。",
}


def messages(user_text: str, lang: Language, has_image: bool, answer: str | None = None,
             persona: bool = True, template_set: str = "studio") -> list[dict]:
    """A chat conversation: the comedian persona (or a plain assistant, for literal texts), the
    user's turn (image first), and optionally the answer. The official set keeps chat()'s default
    system (its persona is in the user text) and puts the image where its text says `Picture 1:`."""
    official = check_template_set(template_set) == "official"
    before, marker, after = user_text.partition(OFFICIAL_IMAGE) if official and has_image else ("", "", "")
    if marker:  # the family's chat template writes the image (and its label) at this place
        content = [{"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after}]
    else:
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": user_text}]
    system = OFFICIAL_SYSTEM if official else PERSONA[lang] if persona else ASSISTANT[lang]
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": content},
    ]
    if answer is not None:
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return conversation


# Plain, literal texts used as wrong options in selection questions (instruction kind 4, and the evaluation).
LITERAL_DESCRIPTION = {
    EN: "Describe this image literally in one plain sentence. Do not joke.",
    ZH: "用一句平实的话如实描述这张图片，不要开玩笑。",
    JA: "この画像を、冗談を言わずに一文でそのまま説明してください。",
}

LITERAL_REWRITE = {
    EN: "Rewrite this answer as one plain, literal sentence on the same topic, with no joke in it: {answer}",
    ZH: "把这个回答改写成一句平实的字面陈述，话题不变，不带任何笑点：{answer}",
    JA: "この答えを、話題はそのままで笑いのない平凡な一文に書き換えてください：{answer}",
}


def literal_description_prompt(lang: Language) -> str:
    """Ask for a literal, unfunny description of the image (a wrong option for selection)."""
    return LITERAL_DESCRIPTION[lang]


def literal_rewrite_prompt(lang: Language, answer: str, question: str = "") -> str:
    """Ask for a literal, unfunny rewrite of a human answer (a wrong option for selection)."""
    head = QUESTION[lang].format(question=question) + "\n" if question else ""
    return head + LITERAL_REWRITE[lang].format(answer=one_line(answer))

LITERAL_ANSWER = {
    EN: "Answer this question plainly and literally in one sentence, with no joke in it.",
    ZH: "请用一句平实的话如实回答这个问题，不要开玩笑。",
    JA: "このお題に、冗談を言わずに一文で普通に答えてください。",
}


def literal_answer_prompt(lang: Language, question: str = "") -> str:
    """Ask for a plain, unfunny answer to a text prompt (the literal option of T2T questions, which
    have no image to describe). Without question text the question is the image itself."""
    head = QUESTION[lang].format(question=question) + "\n" if question else ""
    return head + LITERAL_ANSWER[lang]


# The creativity probe (a Divergent-Association-style task): ten nouns as unrelated as possible.
UNRELATED_NOUNS = {
    EN: "Write {n} nouns that have as little to do with each other as possible: no names, no places, "
        "no technical terms, single words only. Put one noun on each line and nothing else.",
    ZH: "写出{n}个彼此之间尽量毫无关联的名词：不要人名、地名或专业术语，每个只写一个词。"
        "每行一个名词，不要写别的。",
    JA: "互いにできるだけ関係のない名詞を{n}個書いてください。人名・地名・専門用語は避け、"
        "一語ずつにしてください。一行に一つずつ、名詞だけを書いてください。",
}


def unrelated_nouns_prompt(lang: Language, n: int = 10) -> str:
    return UNRELATED_NOUNS[lang].format(n=n)


def parse_word_list(text: str, limit: int = 10) -> list[str]:
    """The distinct words of a generated list (one per line or separated by commas), numbering and
    bullets removed, in order, at most `limit`."""
    words: list[str] = []
    for piece in re.split(r"[\n,，、;；]+", text):
        word = re.sub(r"^\s*(?:\d+\s*[.．)、]|[-*•・])\s*", "", piece).strip(" \t.。!！\"'「」“”")
        if word and len(word.split()) == 1 and word.lower() not in (w.lower() for w in words):
            words.append(word)
    return words[:limit]


# ---------------------------------------------------------------- the official set (CLoT-cn)
# The authors' wording, from their gradio_demo.py and inference.py: a Chinese 搞笑专家 (humor expert)
# persona and "think outside the box" at the start of the user's message, one of three queries per
# task, the image inline, the question, and the lead-in "回复: 符合要求的回复是". Their demo sends it
# through Qwen-VL-Chat's chat(), whose system message stays the default one.
TEMPLATE_SETS = ("studio", "official")
OFFICIAL_SYSTEM = "You are a helpful assistant."
# The demo writes "用户： " but strips the whole string, so the space after the colon is not sent.
OFFICIAL_PERSONA = ("你是一个搞笑专家，非常了解网络和现实生活当中的各种梗和流行语，热衷于用幽默感给大家带来欢乐。"
                    "让我们打破常规思维思考问题。\n\n用户：")
OFFICIAL_QUERY = {
    Task.I2T: ["请仔细阅读图片，写出一个令人感到意外且搞笑的句子。",
               "根据图片，想出一个让人感到出乎意料和滑稽句子。",
               "请对这张图片仔细审视，创造一个出乎意料又滑稽可笑的句子。"],
    Task.T2T: ["请仔细理解所给的问题，想出一个令人感到意外且搞笑的回答。",
               "请对所提供的问题进行仔细解读，给出一个出人意料且滑稽的答案。",
               "请细心品味所给问题，以构思一个意外而滑稽的答复。"],
    Task.IT2T: ["请仔细阅读图片和图片里的文字，写出一个令人感到意外且搞笑的句子。",
                "请仔细阅读图片和图片里的文字，为图中指定部分补充令人感到意外且搞笑的句子。",
                "请细心品味图片的内容，为图中指定部分给出有趣且搞笑的说法。"],
}
# Qwen-VL's image as the original tokenizer's from_list_format writes it (the path between the tags
# becomes the image's tokens); messages() turns it into the conversation's image item.
OFFICIAL_IMAGE = "Picture 1: <img></img>\n"
OFFICIAL_QUESTION = "问题: {question}\n"
OFFICIAL_LEAD_IN = "回复: 符合要求的回复是\n"


def check_template_set(name: str) -> str:
    if name not in TEMPLATE_SETS:
        raise ClotError(f"Unknown template set {name!r}: use {' or '.join(TEMPLATE_SETS)}.")
    return name


def official_generation_prompt(task: Task, question: str = "", condition: str = "", wording: int = 0) -> str:
    """The authors' CLoT-cn request, always in Chinese. CLoT-cn was also trained with condition words
    (and with ranking and selection questions), but the authors never published those templates: a
    condition uses our Chinese wording, placed before the lead-in as in our own set."""
    text = OFFICIAL_PERSONA + _pick(OFFICIAL_QUERY[task], wording) + "\n"
    if task.needs_image:
        text += OFFICIAL_IMAGE
    if question:
        text += OFFICIAL_QUESTION.format(question=question)
    if condition:
        text += CONDITION[ZH].format(word=condition) + "\n"
    return text + OFFICIAL_LEAD_IN
