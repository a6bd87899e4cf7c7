"""The vote store: one vote per ticket, caps, privacy, concurrency, damage, export and re-import."""

from __future__ import annotations

import json
import sqlite3
import threading

import datasets
import pytest
from PIL import Image

from clot import votes
from clot.tasks import ClotError

DAY = 24 * 3600


class Clock:
    def __init__(self, now: float = 1_780_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def generation(adapter: str, text: str, **extra) -> dict:
    return dict(adapter=adapter, adapter_created="2026-12-01T10:00:00+00:00", mode="CLoT", condition="spoon",
                text=text, scores={"rank_score": 0.6, "select_score": 0.7}, seed=7,
                sampling={"temperature": 0.9, "top_p": 0.9}, **extra)


def battle(store, a="base", b="punchline", *, session="alice", language="en", task="T2T", image=None) -> str:
    return store.open_ticket(blind=True, base_model="tiny", task=task, language=language, text="Why?",
                             image=image, generations=[generation(a, "because A"), generation(b, "because B")],
                             session=session)


def pick(store, n=3, *, session="alice", image=None) -> str:
    return store.open_ticket(blind=False, base_model="tiny", task="I2T", language="ja", text="", image=image,
                             generations=[generation("base", f"answer {i}") for i in range(n)], session=session)


@pytest.fixture
def store(tmp_path):
    return votes.VoteStore(tmp_path / "votes.sqlite", clock=Clock())


def test_a_battle_takes_exactly_one_vote(store):
    ticket = battle(store)
    record = store.vote(ticket, "B", session="alice")
    assert record["kind"] == "battle" and record["blind"] is True and record["choice"] == "B"
    assert [c["adapter"] for c in record["candidates"]] == ["base", "punchline"]
    assert [c["text"] for c in record["candidates"]] == ["because A", "because B"]
    with pytest.raises(ClotError, match="already has its vote"):
        store.vote(ticket, "A", session="alice")
    with pytest.raises(ClotError, match="already has its vote"):  # another session cannot vote again either
        store.vote(ticket, "A", session="bob")
    with pytest.raises(ClotError, match="Unknown ticket"):
        store.vote("made-up", "A", session="alice")
    with pytest.raises(ClotError, match="No ticket"):
        store.vote("", "A", session="alice")
    with pytest.raises(ClotError, match="A, B, tie, bad"):
        store.vote(battle(store), "C", session="alice")
    assert store.battles() == [("base", "punchline", "B")]


def test_cards_shown_again_keep_their_ticket_and_get_a_fresh_day(tmp_path):
    clock = Clock()
    store = votes.VoteStore(tmp_path / "votes.sqlite", clock=clock)
    ticket = store.content_ticket("same cards")
    assert store.content_ticket("same cards") == ticket != store.content_ticket("other cards")
    assert store.open_ticket(blind=False, base_model="tiny", task="T2T", language="en", text="?", image=None,
                             generations=[generation("base", "x")], session="", ticket=ticket) == ticket
    clock.now += votes.TICKET_TTL_S + 1
    store.open_ticket(blind=False, base_model="tiny", task="T2T", language="en", text="?", image=None,
                      generations=[generation("base", "x")], session="", ticket=ticket)
    assert store.vote(ticket, 0, session="alice")["candidates"][0]["text"] == "x"
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM generations").fetchone()[0] == 1


def test_a_ticket_expires_after_a_day(tmp_path):
    clock = Clock()
    store = votes.VoteStore(tmp_path / "votes.sqlite", clock=clock)
    ticket = battle(store)
    clock.now += votes.TICKET_TTL_S + 1
    with pytest.raises(ClotError, match="expired"):
        store.vote(ticket, "A", session="alice")
    assert store.records() == []


def test_picks_name_a_shown_candidate_or_none(store):
    record = store.vote(pick(store), 2, session="alice")
    assert (record["kind"], record["blind"], record["choice"]) == ("pick", False, 2)
    assert store.vote(pick(store), "none", session="alice")["choice"] == "none"
    for wrong in (3, -1, "2", True, None):
        with pytest.raises(ClotError, match="one of the 3 answers"):
            store.vote(pick(store), wrong, session="alice")
    assert store.battles() == []  # picks are not blind: they never reach the leaderboard


def test_sessions_are_stored_only_as_salted_hashes(tmp_path, monkeypatch):
    monkeypatch.delenv("CLOT_VOTES_SALT", raising=False)
    path = tmp_path / "votes.sqlite"
    store = votes.VoteStore(path)
    record = store.vote(battle(store, session="198.51.100.7"), "A", session="198.51.100.7")
    assert record["session"] == store.session_hash("198.51.100.7") != "198.51.100.7"
    assert votes.VoteStore(path).session_hash("x") == store.session_hash("x")  # the stored salt is kept
    monkeypatch.setenv("CLOT_VOTES_SALT", "pepper")
    assert votes.VoteStore(path).session_hash("x") != store.session_hash("x")
    raw = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"198.51.100.7" not in raw


def test_images_are_stored_only_with_consent(store, tmp_path):
    red, blue = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (4000, 100), "blue")
    without = store.vote(pick(store, image=red), 0, session="alice")
    with_consent = store.vote(battle(store, image=blue, task="I2T"), "tie", session="alice", consent=True)
    assert without["prompt"]["image"] is None
    sha = with_consent["prompt"]["image"]
    assert len(sha) == 64
    store.export(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out" / "images").iterdir()] == [f"{sha}.png"]
    with Image.open(tmp_path / "out" / "images" / f"{sha}.png") as stored:
        assert max(stored.size) == votes.STORED_IMAGE_SIDE
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 1


def test_sixteen_threads_voting_at_once_all_land(store):
    tickets = [battle(store, session=f"s{i}") for i in range(16)]
    start = threading.Barrier(16)
    errors = []

    def cast(i):
        start.wait()
        try:
            store.vote(tickets[i], "AB"[i % 2], session=f"s{i}")
        except Exception as err:  # collected, so the test names the failure
            errors.append(err)

    threads = [threading.Thread(target=cast, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.battles()) == 16
    assert sum(len(p.read_text().splitlines()) for p in store.journal_dir.glob("*.jsonl")) == 16


def test_a_flood_from_one_session_hits_the_daily_cap(tmp_path):
    clock = Clock()
    store = votes.VoteStore(tmp_path / "votes.sqlite", daily_cap=5, clock=clock)
    for _ in range(5):
        store.vote(battle(store, session="flood"), "A", session="flood")
    ticket = battle(store, session="flood")
    with pytest.raises(ClotError, match="today's limit of 5 votes"):
        store.vote(ticket, "A", session="flood")
    store.vote(battle(store, session="calm"), "A", session="calm")  # others still vote
    clock.now += DAY
    store.vote(ticket, "A", session="flood")  # a new day, and the refused ticket was still open
    assert len(store.battles()) == 7


def test_a_locked_database_loses_nothing(tmp_path):
    store = votes.VoteStore(tmp_path / "votes.sqlite", busy_timeout_s=0.2, clock=Clock())
    store.vote(battle(store), "A", session="alice")
    ticket = battle(store)
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(ClotError, match="busy; nothing was saved"):
        store.vote(ticket, "B", session="alice")
    blocker.execute("ROLLBACK")
    blocker.close()
    store.vote(ticket, "B", session="alice")  # the ticket stayed open
    assert [b[2] for b in store.battles()] == ["A", "B"]


def test_a_corrupted_database_is_rebuilt_from_the_journal(tmp_path):
    path = tmp_path / "votes.sqlite"
    store = votes.VoteStore(path, clock=Clock())
    cast = [store.vote(battle(store), choice, session="alice") for choice in ("A", "B", "tie")]
    store.exclude([cast[1]["vote_id"]])
    path.write_bytes(b"this is not a database" * 100)
    for extra in ("-wal", "-shm"):
        (tmp_path / f"votes.sqlite{extra}").unlink(missing_ok=True)
    rebuilt = votes.VoteStore(path, clock=Clock())
    assert rebuilt.records() == store_records_as_exported(cast, excluded={cast[1]["vote_id"]})
    assert [p.name for p in tmp_path.glob("votes.sqlite.damaged-*")]  # the damaged file is kept
    assert rebuilt.battles() == [("base", "punchline", "A"), ("base", "punchline", "tie")]


def test_damage_found_while_running_is_repaired_at_once(tmp_path):
    store = votes.VoteStore(tmp_path / "votes.sqlite", clock=Clock())
    cast = store.vote(battle(store), "A", session="alice")
    ticket = battle(store)
    store.path.write_bytes(b"garbage" * 1000)
    for extra in ("-wal", "-shm"):
        (tmp_path / f"votes.sqlite{extra}").unlink(missing_ok=True)
    with pytest.raises(ClotError, match="rebuilt with every earlier vote"):
        store.vote(ticket, "B", session="alice")
    assert store.records() == [cast]
    store.vote(battle(store), "tie", session="alice")  # and it keeps serving
    assert [b[2] for b in store.battles()] == ["A", "tie"]


def store_records_as_exported(records: list[dict], excluded: set[str]) -> list[dict]:
    return [dict(r, excluded=r["vote_id"] in excluded) for r in records]


def test_the_schema_is_versioned(store):
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == votes.SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute(f"PRAGMA user_version = {votes.SCHEMA_VERSION + 1}")
    with pytest.raises(ClotError, match="newer than this code"):
        votes.VoteStore(store.path)


def test_export_is_a_dataset_and_reimport_adds_no_duplicates(store, tmp_path):
    store.vote(battle(store, language="zh"), "bad", session="alice")
    store.vote(pick(store, image=Image.new("RGB", (20, 20), "green")), 1, session="bob", consent=True)
    out = tmp_path / "export"
    assert votes.main(["--db", str(store.path), "export", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "votes.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["battle", "pick"]
    assert set(lines[0]) == {"vote_id", "kind", "blind", "time", "session", "excluded", "base_model", "prompt",
                             "candidates", "choice"}
    assert set(lines[0]["candidates"][0]) == {"generation_id", "adapter", "adapter_created", "mode", "condition",
                                              "text", "scores", "seed", "sampling"}
    assert (out / "images" / f"{lines[1]['prompt']['image']}.png").is_file()
    for loaded in (datasets.load_dataset("json", data_files=str(out / "votes.jsonl"), split="train"),
                   datasets.load_dataset(str(out), split="train")):
        assert loaded.num_rows == 2
        assert [loaded[0]["choice"], loaded[1]["choice"]] == ["bad", 1]
        assert loaded[0]["prompt"]["language"] == "zh"

    other = votes.VoteStore(tmp_path / "other.sqlite")
    assert other.import_jsonl([out / "votes.jsonl"], images_dir=out / "images") == 2
    assert other.import_jsonl([out / "votes.jsonl"], images_dir=out / "images") == 0
    assert other.records() == lines
    sha = lines[1]["prompt"]["image"]
    assert other.image_png(sha) == (out / "images" / f"{sha}.png").read_bytes()


def test_battles_filter_by_language_and_task_and_skip_excluded(store):
    store.vote(battle(store, language="en", task="T2T"), "A", session="s")
    store.vote(battle(store, "x", "y", language="ja", task="I2T"), "B", session="s")
    moderated = store.vote(battle(store, language="ja"), "tie", session="s")
    store.exclude([moderated["vote_id"]])
    assert store.battles() == [("base", "punchline", "A"), ("x", "y", "B")]
    assert store.battles(language="ja") == [("x", "y", "B")]
    assert store.battles(task="T2T") == [("base", "punchline", "A")]
    assert store.battle_counts() == {"base": 2, "punchline": 2, "x": 1, "y": 1}


def test_space_persistence_pushes_the_journal_never_the_database(store, tmp_path):
    exported = tmp_path / "earlier"
    earlier = votes.VoteStore(tmp_path / "earlier.sqlite")
    earlier.vote(battle(earlier), "A", session="old")
    earlier.export(exported)
    calls = {}

    def download(*, repo_id, local_dir, **kwargs):  # stands in for snapshot_download (no hub here)
        calls["download"] = dict(repo_id=repo_id, **kwargs)
        (tmp_path / local_dir).mkdir(parents=True, exist_ok=True)
        (tmp_path / local_dir / "votes-earlier.jsonl").write_text((exported / "votes.jsonl").read_text())

    def scheduler(**kwargs):
        calls["scheduler"] = kwargs
        return "scheduler"

    assert votes.start_persistence(store, repo="me/votes", token=None, scheduler_factory=scheduler,
                                   download=download) is None  # no token: off
    started = votes.start_persistence(store, repo="me/votes", token="hf_x", scheduler_factory=scheduler,
                                      download=download)
    assert started == "scheduler"
    assert len(store.records()) == 1  # the repo's votes were imported at start
    pushed = calls["scheduler"]
    assert (pushed["repo_id"], pushed["repo_type"], pushed["private"]) == ("me/votes", "dataset", True)
    assert pushed["folder_path"] == store.journal_dir
    assert store.path.parent != store.journal_dir and not list(store.journal_dir.rglob("*.sqlite*"))
    assert pushed["allow_patterns"] == ["*.jsonl", "images/*.png"]
    store.vote(battle(store), "B", session="new")
    journal = [json.loads(line) for p in store.journal_dir.glob("*.jsonl") for line in p.read_text().splitlines()]
    assert [r["choice"] for r in journal] == ["B"]  # only this store's own votes are pushed again
