"""The arena over HTTP on the tiny model: blind battles, votes, picks on the cards, the leaderboard."""

from __future__ import annotations

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from conftest import make_adapter
from ui_helpers import free_port

from clot import votes


@pytest.fixture(scope="module")
def arena(tiny_dir, tmp_path_factory):
    from clot.engine import Engine
    from clot.ui import MAX_FILE_SIZE, build_demo

    engine = Engine.load(str(tiny_dir), adapters_dir=tmp_path_factory.mktemp("arena-adapters"), device="cpu")
    store = votes.VoteStore(tmp_path_factory.mktemp("arena-votes") / "votes.sqlite", daily_cap=30)
    demo = build_demo(engine, votes=store)
    demo.queue(default_concurrency_limit=1, max_size=16)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            max_file_size=MAX_FILE_SIZE)
    try:
        yield engine, store, url
    finally:
        demo.close()


def battle(client: Client, text: str = "What is the worst thing to say at a job interview?"):
    return client.predict(None, text, "en", api_name="/arena_battle")


def test_arena_endpoints_have_stable_names_and_inputs(arena):
    api = Client(arena[2], verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    params = {name: [p["parameter_name"] for p in spec["parameters"]] for name, spec in api.items()}
    assert params["/arena_battle"] == ["image", "text", "language"]
    assert params["/arena_vote"] == ["ticket", "choice", "consent"]
    assert params["/vote_pick"] == ["ticket", "choice", "consent"]
    assert params["/leaderboard"] == ["language", "task"]
    assert len(api["/arena_battle"]["returns"]) == 3 and len(api["/leaderboard"]["returns"]) == 3


def test_the_whole_loop(arena):
    engine, store, url = arena
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="at least two contenders"):
        battle(client)
    make_adapter(engine, "first", seed=1)

    ticket, answer_a, answer_b = battle(client)
    assert ticket and answer_a and answer_b
    assert "first" not in f"{answer_a} {answer_b}"  # nothing but the answers is shown before the vote
    names = client.predict(ticket, "A", api_name="/arena_vote")
    assert {names["A"], names["B"]} == {"base", "first"} and names["vote"] == "A"
    with pytest.raises(AppError, match="already has its vote"):
        client.predict(ticket, "B", api_name="/arena_vote")
    with pytest.raises(AppError, match="Unknown ticket"):
        client.predict("no-such-ticket", "A", api_name="/arena_vote")
    ticket, _, _ = battle(client)
    with pytest.raises(AppError, match="A, B, tie, bad"):
        client.predict(ticket, "C", api_name="/arena_vote")
    client.predict(ticket, "tie", api_name="/arena_vote")  # a refused choice leaves the ticket open

    table, plot, matrix = client.predict("all", api_name="/leaderboard")
    assert [row[1] for row in table["data"]] == ["base", "first"]  # both still unranked: 2 battles each
    assert all("unranked: 2 of" in row[3] for row in table["data"])
    assert plot["type"] == "matplotlib" and plot["plot"]
    for _ in range(4):  # enough battles to rank both (blind votes cast here directly, for speed)
        record = store.vote(store.open_ticket(blind=True, base_model=engine.base_model, task="T2T", language="en",
                                              text="?", image=None, session="s", generations=[
                                                  dict(adapter="first", mode="CLoT", text="a"),
                                                  dict(adapter="base", mode="CLoT", text="b")]), "A", session="s")
    table, plot, matrix = client.predict("en", api_name="/leaderboard")
    assert [row[:2] for row in table["data"]] == [[1, "first"], [2, "base"]]
    assert [row[4] for row in table["data"]] == [6, 6]
    assert table["headers"] == ["rank", "adapter", "rating", "95% interval", "battles", "win rate"]
    assert matrix["headers"] == ["row beats column →", "first", "base"]
    first_wins = 4 + 0.5 + (names["A"] == "first")  # four here, half of the tie, and the first battle's A
    assert matrix["data"][0] == ["first", "", f"{first_wins / 6:.0%}"]
    assert client.predict("zh", api_name="/leaderboard")[0]["data"] == []  # no Chinese battles
    with pytest.raises(AppError, match="Language: .*not in the list of choices"):
        client.predict("xx", api_name="/leaderboard")
    assert record["kind"] == "battle"


def test_an_adapter_published_while_running_is_drawn_next(arena):
    engine, store, url = arena
    client = Client(url, verbose=False)
    if not (engine.adapters_dir / "first").exists():
        make_adapter(engine, "first", seed=1)
    ticket, _, _ = battle(client)
    before = set(client.predict(ticket, "B", api_name="/arena_vote").values()) - {"B"}
    assert "fresh" not in before
    make_adapter(engine, "fresh", seed=2)
    ticket, _, _ = battle(client)
    assert "fresh" in client.predict(ticket, "bad", api_name="/arena_vote").values()


def test_cards_take_one_pick(arena):
    engine, store, url = arena
    client = Client(url, verbose=False)
    battles_before = store.battles()
    result = client.predict("Invent an Olympic sport nobody would watch.", "en", "", 3, "sample", "base",
                            0.9, 0.9, 50, 12, 1.05, 5, api_name="/text_to_text")
    record = client.predict(result["ticket"], "2", api_name="/vote_pick")
    assert (record["kind"], record["blind"], record["choice"]) == ("pick", False, 1)
    assert [c["text"] for c in record["candidates"]] == [row["text"] for row in result["candidates"]]
    assert record["candidates"][1]["scores"]["rank_score"] == result["candidates"][1]["rank_score"]
    with pytest.raises(AppError, match="already has its vote"):
        client.predict(result["ticket"], "none", api_name="/vote_pick")
    again = client.predict("Invent an Olympic sport nobody would watch.", "en", "", 3, "sample", "base",
                           0.9, 0.9, 50, 12, 1.05, 5, api_name="/text_to_text")
    assert again == result  # the same cards shown again: the same ticket, still one vote
    with pytest.raises(AppError, match="already has its vote"):
        client.predict(again["ticket"], "1", api_name="/vote_pick")
    result = client.predict("Another one?", "en", "", 2, "sample", "base", 0.9, 0.9, 50, 12, 1.05, 6,
                            api_name="/text_to_text")
    with pytest.raises(AppError, match="one of the 2 answers"):
        client.predict(result["ticket"], "3", api_name="/vote_pick")
    assert client.predict(result["ticket"], "none", api_name="/vote_pick")["choice"] == "none"
    assert store.battles() == battles_before  # picks never reach the leaderboard


def test_a_flood_from_one_session_is_capped_and_the_server_keeps_serving(arena):
    engine, store, url = arena
    flood, calm = Client(url, verbose=False), Client(url, verbose=False)

    def ticket():
        return store.open_ticket(blind=False, base_model=engine.base_model, task="T2T", language="en", text="?",
                                 image=None, session="", generations=[dict(adapter="base", mode="sample", text="x")])

    with pytest.raises(AppError, match="today's limit of 30 votes"):
        for _ in range(store.daily_cap + 1):
            flood.predict(ticket(), "1", api_name="/vote_pick")
    assert calm.predict(ticket(), "none", api_name="/vote_pick")["choice"] == "none"
