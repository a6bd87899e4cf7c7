"""The humor arena in the demo: vote buttons under every tab's cards, blind A/B battles, the leaderboard.

clot.ui.build_demo calls `Arena(studio, store)`, `arena.vote_row(...)` inside each tab and
`arena.tabs()` for the Arena and Leaderboard tabs. HTTP endpoints (gradio_client):
    /vote_pick    (ticket, choice, consent=False) -> the vote   choice: the card's number "1"… as shown, or "none"
    /arena_battle (image, text, language)         -> (ticket, answer A, answer B)
    /arena_vote   (ticket, choice, consent=False) -> {"A": adapter, "B": adapter, "vote": choice}
    /leaderboard  (language, task="all")          -> (table, plot with 95% intervals, pairwise win rates)
A tab's result JSON carries the ticket of its cards. Picks are not blind (the model's scores are on
the cards): they are kept for training and never reach the leaderboard, which counts battles only.
"""

import dataclasses
import hashlib
import contextlib
import logging
import math
import random

import gradio as gr
import pandas as pd
from matplotlib.figure import Figure

from clot import adapters as registry
from clot import ranking
from clot.nouns import draw_conditions, load_nouns
from clot.tasks import Candidate, ClotError, Language, Request, Sampling, Task
from clot.ui import LANGUAGES, MAX_CANDIDATES, _choice, _text, gpu, guarded, open_image, upload_only
from clot.votes import VoteStore, start_persistence

log = logging.getLogger(__name__)

ARENA_CANDIDATES = 4  # CLoT candidates per adapter; each shows its chosen answer
BOARD_LANGUAGES = ["all", "en", "zh", "ja"]
BOARD_TASKS = ["all"] + [t.value for t in Task]
TABLE_HEADERS = ["rank", "adapter", "rating", "95% interval", "battles", "win rate"]
CONSENT_LABEL = "Store my image with my vote, for research (off: only the text and answers are kept)"
BATTLE_BUTTONS = [("A", "👈 A is funnier"), ("tie", "🤝 Tie"), ("bad", "😐 Both unfunny"),
                  ("B", "👉 B is funnier")]


def session_of(request: gr.Request | None) -> str:
    """Who votes, for the daily cap: the gradio session (only its salted hash is stored)."""
    if request is None:
        return "anonymous"
    return request.session_hash or (request.client.host if request.client else "anonymous")


@contextlib.contextmanager
def user_errors(action: str):
    """User-caused errors become a clear gr.Error; anything else is logged and reported in one line."""
    try:
        yield
    except ClotError as err:
        raise gr.Error(str(err), print_exception=False) from None
    except gr.Error:
        raise
    except Exception as err:
        log.exception("%s failed", action)
        raise gr.Error(f"{action} did not work ({type(err).__name__}); please try again.",
                       print_exception=False) from None


def generation_record(card: dict, adapter: str, created: str | None, mode: str, sampling: Sampling) -> dict:
    """A shown answer (a Candidate.to_dict()) as the vote store keeps it."""
    return dict(adapter=adapter, adapter_created=created, mode=mode, condition=card["condition"], text=card["text"],
                scores={"rank_score": card["rank_score"], "select_score": card["select_score"]},
                seed=sampling.seed, sampling=dataclasses.asdict(sampling))


class Arena:
    """Votes, battles and the leaderboard over one Studio (its engine and GPU call) and one VoteStore."""

    def __init__(self, studio, store: VoteStore, rng: random.Random | None = None):
        self.studio = studio
        self.engine = studio.engine
        self.store = store
        self.rng = rng or random.Random()
        self._boards: dict[tuple[str, str], tuple[tuple, tuple]] = {}  # (language, task) -> (store version, board)
        self.persistence = start_persistence(store)  # None unless CLOT_VOTES_REPO and a token are set
        # Both adapters of a battle answer inside one GPU call (on ZeroGPU, one allocation).
        self.run_pair = gpu(self._run_pair)

    # ---------------------------------------------------------------- picks on the studio's cards
    def record_result(self, request: Request, result: dict) -> None:
        """Called by Studio.play: store the shown cards and put their ticket into the result. The
        ticket follows from the cards, so a result reproduced with the same seed is identical.

        A failing store never costs the user the answers: the cards then just take no vote."""
        try:
            created = self.adapter_created(result["adapter"])
            generations = [generation_record(row, result["adapter"], created, result["mode"], request.sampling)
                           for row in result["candidates"]]
            image = request.image
            image_digest = hashlib.sha256(image.tobytes()).hexdigest() + str(image.size) if image else None
            ticket = self.store.content_ticket(self.engine.base_model, result, generations, image_digest)
            result["ticket"] = self.store.open_ticket(
                blind=False, base_model=self.engine.base_model, task=result["task"], language=result["language"],
                text=result["question"], image=image, session="", generations=generations, ticket=ticket)
        except Exception:
            log.exception("The cards could not be recorded for voting")

    def vote_pick(self, ticket: str, choice: str, consent: bool = False, request: gr.Request = None) -> dict:
        """Vote for the funniest card: its number as shown ("1" is the top card), or "none" if none is funny."""
        with user_errors("The vote"):
            if isinstance(choice, str) and choice.strip().isdigit():
                choice = int(choice)
            if isinstance(choice, int) and not isinstance(choice, bool):
                choice -= 1  # cards are numbered from 1; the store counts from 0
            elif choice != "none":
                raise ClotError(f"A pick is the number of a card (1 is the top one) or none; got {choice!r}.")
            return self.store.vote(_text("ticket", ticket), choice, session=session_of(request),
                                   consent=bool(consent))

    def vote_row(self, result: gr.JSON) -> None:
        """The 😂 buttons under a tab's cards (one per candidate) and "none is funny"; they lock after a vote."""
        with gr.Row():
            picks = [gr.Button(f"😂 #{k}", visible=False, size="sm", min_width=60)
                     for k in range(1, MAX_CANDIDATES + 1)]
            none = gr.Button("😐 None is funny", visible=False, size="sm")
        consent = gr.Checkbox(False, label=CONSENT_LABEL, visible=False)
        status = gr.Markdown()
        buttons = picks + [none]

        def show(result_value):
            count = len(result_value["candidates"]) if result_value and result_value.get("ticket") else 0
            has_image = count > 0 and result_value["task"] != Task.T2T.value
            return ([gr.Button(visible=k < count, interactive=True) for k in range(MAX_CANDIDATES)]
                    + [gr.Button(visible=count > 0, interactive=True), gr.Checkbox(visible=has_image), ""])

        def caster(choice: str):
            def cast(result_value, consent_value, request: gr.Request):
                self.vote_pick((result_value or {}).get("ticket", ""), choice, consent_value, request)
                said = "none is funny" if choice == "none" else f"#{choice} is the funniest"
                return [gr.Button(interactive=False) for _ in buttons] + [f"Thank you! Your vote: {said}."]
            return cast

        result.change(show, result, buttons + [consent, status], api_visibility="private")
        for choice, button in [(str(k), b) for k, b in enumerate(picks, 1)] + [("none", none)]:
            button.click(caster(choice), [result, consent], buttons + [status], api_visibility="private")

    # ---------------------------------------------------------------- battles
    def adapter_created(self, name: str) -> str | None:
        info = next((i for i in self.engine.list_adapters() if i.name == name), None)
        return info.card.get("created") if info else None

    def contenders(self) -> list[str]:
        """The base model and every adapter published for it, re-read on each call."""
        return [registry.BASE] + [info.name for info in self.engine.list_adapters()
                                  if info.card.get("base_fingerprint") == self.engine.fingerprint]

    def draw_pair(self) -> tuple[str, str]:
        """Two different contenders. One never drawn before is always in (new adapters get seen at once);
        otherwise each is drawn with weight 1 / (1 + its battles), so rarely seen adapters catch up."""
        names = self.contenders()
        if len(names) < 2:
            raise ClotError("The arena needs at least two contenders (the base model counts as one): "
                            "publish an adapter first.")
        counts = self.store.battle_counts()
        fresh = [name for name in names if counts.get(name, 0) == 0]
        first = self.rng.choice(fresh) if fresh else self._weighted(names, counts)
        second = self._weighted([name for name in names if name != first], counts)
        return first, second

    def _weighted(self, names: list[str], counts: dict[str, int]) -> str:
        return self.rng.choices(names, weights=[1 / (1 + counts.get(name, 0)) for name in names])[0]

    def _run_pair(self, requests: list[Request], adapters: tuple[str, str]) -> list[list[Candidate]]:
        return [self.studio._run(request, "CLoT", adapter) for request, adapter in zip(requests, adapters)]

    def battle(self, image, text, language, request: gr.Request = None,
               progress=gr.Progress()) -> tuple[str, str, str]:
        """A blind battle: two adapters answer the same request (CLoT mode, same seed and condition
        words); their chosen answers come back as A and B in random order, names hidden."""
        with user_errors("The battle"):
            text = _text("text", text)
            language = _choice("language", language, LANGUAGES)
            has_image = image not in (None, "")
            if not has_image and not text.strip():
                raise ClotError("Give an image, a question, or both.")
            task = (Task.IT2T if text.strip() else Task.I2T) if has_image else Task.T2T
            picture = open_image(image) if has_image else None
            seed = self.rng.randrange(2**32)
            lang = Language.parse(language, text)
            conditions = draw_conditions(load_nouns(lang, self.studio.nouns_path), ARENA_CANDIDATES,
                                         rng=random.Random(seed))

            def new_request() -> Request:  # one each: generation fills in and validates its request
                return Request(task=task, image=picture, text=text, language=lang, conditions=list(conditions),
                               num_candidates=ARENA_CANDIDATES, sampling=Sampling(seed=seed)).validate()

            shown = list(self.draw_pair())
            self.rng.shuffle(shown)
            progress(0.05, desc="Two contestants are thinking…")
            requests = [new_request(), new_request()]
            answers = [next(c for c in candidates if c.chosen) for candidates in self.run_pair(requests, tuple(shown))]
            ticket = self.store.open_ticket(
                blind=True, base_model=self.engine.base_model, task=task.value, language=lang.value,
                text=requests[0].text, image=picture, session=session_of(request),
                generations=[generation_record(answer.to_dict(), name, self.adapter_created(name), "CLoT",
                                               requests[0].sampling)
                             for answer, name in zip(answers, shown)])
            return ticket, answers[0].text, answers[1].text

    def arena_vote(self, ticket: str, choice: str, consent: bool = False, request: gr.Request = None) -> dict:
        """Vote on a battle: "A", "B", "tie" or "bad" (both unfunny). Reveals who was A and who was B."""
        with user_errors("The vote"):
            record = self.store.vote(_text("ticket", ticket), choice, session=session_of(request),
                                     consent=bool(consent))
        a, b = record["candidates"]
        return {"A": a["adapter"], "B": b["adapter"], "vote": record["choice"]}

    # ---------------------------------------------------------------- leaderboard
    def leaderboard(self, language: str = "all", task: str = "all"):
        """Ratings from blind battles only, recomputed only after a vote: (table, plot, win matrix)."""
        try:
            language = _choice("language", language, BOARD_LANGUAGES)
            task = _choice("task", task, BOARD_TASKS)
        except ClotError as err:
            raise gr.Error(str(err), print_exception=False) from None
        version = self.store.version()
        cached = self._boards.get((language, task))
        if cached and cached[0] == version:
            return cached[1]
        board = ranking.leaderboard(self.store.battles(language, task))
        table = [[place, s.name, round(s.rating), f"{s.low:.0f} – {s.high:.0f}", s.battles, f"{s.win_rate:.0%}"]
                 for place, s in enumerate(board.standings, 1)]
        table += [["", name, "", f"unranked: {count} of {ranking.MIN_BATTLES} battles", count, ""]
                  for name, count in sorted(board.unranked.items())]
        matrix = [[row_name] + ["" if math.isnan(rate) else f"{rate:.0%}" for rate in rates]
                  for row_name, rates in zip(board.names, board.win_rates)]
        outputs = (pd.DataFrame(table, columns=TABLE_HEADERS), plot(board, language, task),
                   pd.DataFrame(matrix, columns=["row beats column →"] + board.names))
        self._boards[(language, task)] = (version, outputs)
        return outputs

    # ---------------------------------------------------------------- the two tabs
    def tabs(self) -> None:
        """The Arena and Leaderboard tabs (called inside build_demo's Blocks) and the API-only vote endpoints."""
        gpu_work = dict(concurrency_id="gpu", concurrency_limit=1)
        with gr.Tab("Arena", id="arena"):
            gr.Markdown("Two anonymous models answer the same request. Vote for the funnier one; "
                        "their names appear after your vote. Only these blind votes count on the leaderboard.")
            with gr.Row():
                with gr.Column(scale=1):
                    image = upload_only(gr.Image(type="filepath", label="Image (optional)",
                                                 sources=["upload", "clipboard"], height=260, elem_id="arena-image"))
                    text = gr.Textbox(label="Question or text (optional)", lines=2, elem_id="arena-text")
                    language = guarded(gr.Radio(LANGUAGES, value="auto", label="Language"), "not one of the choices.")
                    consent = gr.Checkbox(False, label=CONSENT_LABEL, elem_id="arena-consent")
                    go = gr.Button("⚔️ New battle", variant="primary", elem_id="arena-battle")
                with gr.Column(scale=1):
                    ticket = gr.Textbox(label="Battle ticket", interactive=False, max_lines=1, elem_id="arena-ticket")
                    answer_a = gr.Textbox(label="Answer A", interactive=False, elem_id="arena-a")
                    answer_b = gr.Textbox(label="Answer B", interactive=False, elem_id="arena-b")
                    with gr.Row():
                        buttons = [gr.Button(label, interactive=False, elem_id=f"arena-vote-{choice}")
                                   for choice, label in BATTLE_BUTTONS]
                    revealed = gr.Markdown(elem_id="arena-revealed")

            def open_buttons():
                return [gr.Button(interactive=True) for _ in buttons] + [""]

            def caster(choice: str):
                def cast(ticket_value, consent_value, request: gr.Request):
                    names = self.arena_vote(ticket_value, choice, consent_value, request)
                    said = {"A": "A is funnier", "B": "B is funnier", "tie": "a tie", "bad": "both unfunny"}[choice]
                    return [gr.Button(interactive=False) for _ in buttons] + [
                        f"**A** was **{names['A']}**, **B** was **{names['B']}**. Your vote: {said}. Thank you!"]
                return cast

            go.click(self.battle, [image, text, language], [ticket, answer_a, answer_b], api_name="arena_battle",
                     **gpu_work).success(open_buttons, None, buttons + [revealed], api_visibility="private")
            for (choice, _), button in zip(BATTLE_BUTTONS, buttons):
                button.click(caster(choice), [ticket, consent], buttons + [revealed], api_visibility="private")

        with gr.Tab("Leaderboard", id="leaderboard") as board_tab:
            gr.Markdown(f"Bradley–Terry ratings from blind arena battles (a tie counts half), with 95% bootstrap "
                        f"intervals; an adapter needs {ranking.MIN_BATTLES} battles to be ranked.")
            with gr.Row():
                board_language = guarded(gr.Radio(BOARD_LANGUAGES, value="all", label="Language"),
                                         "not one of the choices.")
                board_task = guarded(gr.Radio(BOARD_TASKS, value="all", label="Task"), "not one of the choices.")
                refresh = gr.Button("🔄 Refresh", scale=0, elem_id="leaderboard-refresh")
            table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, elem_id="leaderboard-table")
            chart = gr.Plot(label="Ratings with 95% intervals")
            matrix = gr.Dataframe(interactive=False, label="Pairwise win rates (row against column)")
        board_inputs, board_outputs = [board_language, board_task], [table, chart, matrix]
        refresh.click(self.leaderboard, board_inputs, board_outputs, api_name="leaderboard")
        for trigger in (board_tab.select, board_language.change, board_task.change):
            trigger(self.leaderboard, board_inputs, board_outputs, api_visibility="private")

        gr.api(self.vote_pick, api_name="vote_pick")
        gr.api(self.arena_vote, api_name="arena_vote")


def plot(board: ranking.Leaderboard, language: str, task: str) -> Figure:
    """Each ranked adapter's rating with its 95% interval as an error bar, best at the top."""
    standings = board.standings[::-1]
    figure = Figure(figsize=(6, 1.2 + 0.45 * max(len(standings), 1)), layout="constrained")
    axes = figure.add_subplot()
    if standings:
        ratings = [s.rating for s in standings]
        errors = [[s.rating - s.low for s in standings], [s.high - s.rating for s in standings]]
        axes.errorbar(ratings, range(len(standings)), xerr=errors, fmt="o", capsize=4, color="#d97706")
        axes.set_yticks(range(len(standings)), [s.name for s in standings])
    else:
        axes.text(0.5, 0.5, "Not enough blind battles yet", ha="center", va="center", transform=axes.transAxes)
        axes.set_yticks([])
    axes.set_xlabel("rating (Bradley–Terry, Elo-like scale)")
    axes.set_title(f"language: {language} · task: {task}")
    return figure
