"""The vote store: what people found funny, in SQLite, with an append-only JSONL journal beside it.

    store = VoteStore(default_db_path())
    ticket = store.open_ticket(blind=True, base_model=..., task="T2T", language="en", text="…",
                               image=None, generations=[{...}, {...}], session="gradio session id")
    record = store.vote(ticket, "A", session="gradio session id", consent=False)

    python -m clot.votes export --out DIR     # DIR/votes.jsonl + DIR/images/ + DIR/README.md
    python -m clot.votes import FILE.jsonl…   # re-import exports or journals (no duplicates)
    python -m clot.votes exclude VOTE_ID…     # moderation: the votes stay, flagged excluded

A ticket is one shown set of answers: a blind A/B battle of the arena, or the candidate cards of one
studio request (a "pick", not blind). The database enforces one vote per ticket. Sessions are stored
only as a salted hash; images only when their owner ticks the consent box, by content hash. Each vote
is also appended, in the export format (votes_schema), to this process's own file in the journal
folder: a damaged database is rebuilt from it, and on a Space without persistent storage
`start_persistence` pushes that folder (never the live database) to a private dataset repo.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import secrets
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image

from clot.tasks import ClotError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TICKET_TTL_S = 24 * 3600  # a battle left open for a day cannot be voted on any more
DAILY_CAP = 200  # votes per session and UTC day (CLOT_VOTES_DAILY_CAP)
BUSY_TIMEOUT_S = 30.0  # how long a write waits for another writer before giving up
PENDING_IMAGES = 32  # images kept in memory until their ticket's vote says whether they may be stored
STORED_IMAGE_SIDE = 1024  # consented images are kept at most this large (the model sees fewer pixels)
BATTLE_CHOICES = ("A", "B", "tie", "bad")
JOURNAL_PATTERNS = ["*.jsonl", "images/*.png"]

# Each step takes the schema from the version before it to its own number; never edit a released step.
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE images (sha256 TEXT PRIMARY KEY, png BLOB NOT NULL, created TEXT NOT NULL);
    CREATE TABLE prompts (
        id TEXT PRIMARY KEY, task TEXT NOT NULL, language TEXT NOT NULL, text TEXT NOT NULL,
        image TEXT REFERENCES images(sha256), created TEXT NOT NULL);
    CREATE TABLE generations (
        id TEXT PRIMARY KEY, prompt_id TEXT NOT NULL REFERENCES prompts(id), base_model TEXT NOT NULL,
        adapter TEXT NOT NULL, adapter_created TEXT, mode TEXT NOT NULL, condition TEXT NOT NULL,
        text TEXT NOT NULL, scores TEXT, seed INTEGER, sampling TEXT, created TEXT NOT NULL);
    CREATE TABLE tickets (
        ticket TEXT PRIMARY KEY, blind INTEGER NOT NULL, prompt_id TEXT NOT NULL REFERENCES prompts(id),
        shown TEXT NOT NULL, session TEXT NOT NULL, created REAL NOT NULL);
    CREATE TABLE votes (
        vote_id TEXT PRIMARY KEY, ticket TEXT NOT NULL UNIQUE REFERENCES tickets(ticket),
        choice TEXT NOT NULL, session TEXT NOT NULL, time TEXT NOT NULL, day TEXT NOT NULL,
        excluded INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX votes_by_session_day ON votes(session, day);
    CREATE INDEX tickets_by_created ON tickets(created);
    """),
]


def default_db_path() -> Path:
    """CLOT_VOTES_DB, else the Space's persistent storage (/data) when there is one, else votes/votes.sqlite."""
    if os.environ.get("CLOT_VOTES_DB"):
        return Path(os.environ["CLOT_VOTES_DB"])
    data = Path("/data")
    if data.is_dir() and os.access(data, os.W_OK):
        return data / "votes" / "votes.sqlite"
    return Path("votes") / "votes.sqlite"


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class VoteStore:
    """Votes in SQLite (WAL, busy timeout, versioned schema); safe to share between threads."""

    def __init__(self, path: str | Path, *, journal_dir: str | Path | None = None, salt: str | None = None,
                 daily_cap: int | None = None, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.journal_dir = Path(journal_dir) if journal_dir else self.path.with_name(f"{self.path.stem}-journal")
        (self.journal_dir / "images").mkdir(parents=True, exist_ok=True)
        # One journal file per store instance: processes and restarts never write to the same file.
        self.journal = self.journal_dir / f"votes-{_utc(clock()):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}.jsonl"
        self.daily_cap = daily_cap if daily_cap is not None else int(os.environ.get("CLOT_VOTES_DAILY_CAP", DAILY_CAP))
        self.busy_timeout_s = busy_timeout_s
        self.clock = clock
        self._journal_lock = threading.Lock()
        self._pending: OrderedDict[str, Image.Image] = OrderedDict()
        self._pending_lock = threading.Lock()
        self._open_schema()
        self.salt = salt or os.environ.get("CLOT_VOTES_SALT") or self._stored_salt()
        self.import_folder(self.journal_dir)  # votes a damaged or lost database no longer holds

    # ---------------------------------------------------------------- the database
    @contextlib.contextmanager
    def _connect(self, write: bool = False):
        """A connection of its own for each job (threads never share one); `write` takes the write lock first."""
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            db.execute("PRAGMA foreign_keys = ON")
            if write:
                db.execute("BEGIN IMMEDIATE")  # the daily cap and one-vote checks see every committed vote
            try:
                yield db
                if write:
                    db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise ClotError("The vote store is busy; nothing was saved, please vote again in a moment.") from None
            raise
        finally:
            db.close()

    def _open_schema(self) -> None:
        """Open (or create) the database and migrate it; a damaged file is set aside, never deleted."""
        try:
            self._migrate()
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError) and ("locked" in str(err) or "busy" in str(err)):
                raise
            kept = self.path.with_name(f"{self.path.name}.damaged-{int(self.clock())}")
            log.error("The vote database %s is damaged (%s); it is kept as %s and rebuilt from the journal.",
                      self.path, err, kept)
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{self.path}{suffix}")
                if part.exists():
                    part.rename(f"{kept}{suffix}")
            self._migrate()

    def _migrate(self) -> None:
        with self._connect() as db:
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            db.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ClotError(f"The vote database {self.path} has schema version {version}, newer than this "
                                f"code's {SCHEMA_VERSION}; update the code.")
            for number, script in MIGRATIONS:
                if number > version:
                    db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")

    def _stored_salt(self) -> str:
        with self._connect(write=True) as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('salt', ?)", (secrets.token_hex(16),))
            return db.execute("SELECT value FROM meta WHERE key = 'salt'").fetchone()[0]

    def content_ticket(self, *shown: Any) -> str:
        """A ticket that follows from what was shown: the same cards shown again take the same, single
        vote (and a reproduced result stays identical). Salted, so it cannot be computed from outside."""
        digest = hashlib.sha256(f"{self.salt}:{json.dumps(shown, sort_keys=True, default=str)}".encode())
        return digest.hexdigest()[:32]

    def session_hash(self, session: str) -> str:
        """What is stored of a session (or address): a salted hash that cannot be turned back."""
        return hashlib.sha256(f"{self.salt}:{session}".encode()).hexdigest()[:32]

    # ---------------------------------------------------------------- tickets and votes
    def open_ticket(self, *, blind: bool, base_model: str, task: str, language: str, text: str,
                    image: Image.Image | None, generations: list[dict], session: str, ticket: str | None = None) -> str:
        """Record what was shown (generations in shown order) and return the ticket to vote on it.

        Each generation: adapter, adapter_created, mode, condition, text, scores, seed, sampling. A
        given `ticket` (see content_ticket) that exists already was shown before: it gets a fresh day
        to be voted on, and still only one vote."""
        if blind and len(generations) != 2:
            raise ValueError("A blind battle shows exactly two answers.")
        ticket = ticket or secrets.token_urlsafe(18)
        now = self.clock()
        created = _utc(now).isoformat(timespec="seconds")
        prompt_id = uuid.uuid4().hex
        ids = [uuid.uuid4().hex for _ in generations]
        with self._connect(write=True) as db:
            shown_before = db.execute("UPDATE tickets SET created = ? WHERE ticket = ?", (now, ticket)).rowcount
            if not shown_before:
                db.execute("INSERT INTO prompts VALUES (?, ?, ?, ?, NULL, ?)",
                           (prompt_id, task, language, text, created))
                for gen_id, gen in zip(ids, generations):
                    db.execute("INSERT INTO generations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                        gen_id, prompt_id, base_model, gen["adapter"], gen.get("adapter_created"), gen["mode"],
                        gen.get("condition") or "", gen["text"], _json_or_none(gen.get("scores")), gen.get("seed"),
                        _json_or_none(gen.get("sampling")), created))
                db.execute("INSERT INTO tickets VALUES (?, ?, ?, ?, ?, ?)",
                           (ticket, int(blind), prompt_id, json.dumps(ids), self.session_hash(session), now))
        if image is not None:
            kept = image.convert("RGB")
            kept.thumbnail((STORED_IMAGE_SIDE, STORED_IMAGE_SIDE))
            with self._pending_lock:
                self._pending[ticket] = kept
                while len(self._pending) > PENDING_IMAGES:
                    self._pending.popitem(last=False)
        return ticket

    def vote(self, ticket: str, choice: Any, *, session: str, consent: bool = False) -> dict:
        """Cast the one vote of a ticket; returns the vote as exported. Every refusal is a ClotError.

        Battle choices: "A", "B", "tie", "bad" (both unfunny). Pick choices: the 0-based index of the
        candidate as shown, or "none". With `consent`, the request's image is stored too. A database
        found damaged is set aside and rebuilt from the journal at once (every earlier vote is in it)."""
        try:
            return self._vote(ticket, choice, session=session, consent=consent)
        except sqlite3.DatabaseError as err:  # busy and locked were already turned into a ClotError
            log.error("Vote failed on the database (%s); checking it.", err)
            self._open_schema()
            self.import_folder(self.journal_dir)
            raise ClotError("The vote store was damaged and has been rebuilt with every earlier vote, but the "
                            "answers you voted on were lost: please generate new ones and vote again.") from None

    def _vote(self, ticket: str, choice: Any, *, session: str, consent: bool) -> dict:
        if not isinstance(ticket, str) or not ticket.strip():
            raise ClotError("No ticket: generate answers first, then vote on them.")
        ticket = ticket.strip()
        now = self.clock()
        voter = self.session_hash(session)
        vote_id = uuid.uuid4().hex
        image = None
        if consent:
            with self._pending_lock:
                image = self._pending.get(ticket)
        with self._connect(write=True) as db:
            row = db.execute("SELECT blind, prompt_id, shown, created FROM tickets WHERE ticket = ?",
                             (ticket,)).fetchone()
            if row is None:
                raise ClotError("Unknown ticket: this vote does not belong to any answers shown here; "
                                "generate new answers and vote on those.")
            blind, prompt_id, shown, created = row
            stored_choice = _check_choice(choice, bool(blind), len(json.loads(shown)))
            if now - created > TICKET_TTL_S:
                raise ClotError("This ticket has expired (votes are taken for a day); generate new answers to vote.")
            if db.execute("SELECT 1 FROM votes WHERE ticket = ?", (ticket,)).fetchone():
                raise ClotError("This ticket already has its vote; each set of answers takes one vote.")
            day = _utc(now).date().isoformat()
            cast = db.execute("SELECT COUNT(*) FROM votes WHERE session = ? AND day = ?", (voter, day)).fetchone()[0]
            if cast >= self.daily_cap:
                raise ClotError(f"This session has reached today's limit of {self.daily_cap} votes; "
                                "thank you! Please come back tomorrow (UTC).")
            if image is not None:
                png = _png(image)
                sha = hashlib.sha256(png).hexdigest()
                db.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?)",
                           (sha, png, _utc(now).isoformat(timespec="seconds")))
                db.execute("UPDATE prompts SET image = ? WHERE id = ?", (sha, prompt_id))
            db.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, 0)", (
                vote_id, ticket, json.dumps(stored_choice), voter, _utc(now).isoformat(timespec="seconds"), day))
            record = self._record(db, vote_id)
        with self._pending_lock:
            self._pending.pop(ticket, None)
        self._journal([record])
        return record

    def exclude(self, vote_ids: Iterable[str], excluded: bool = True) -> int:
        """Moderation: flag votes (they stay stored and exported, flagged); returns how many matched."""
        changed = []
        with self._connect(write=True) as db:
            for vote_id in vote_ids:
                if db.execute("UPDATE votes SET excluded = ? WHERE vote_id = ?", (int(excluded), vote_id)).rowcount:
                    changed.append(self._record(db, vote_id))
        self._journal(changed)  # so a rebuilt or re-imported store keeps the flag
        return len(changed)

    # ---------------------------------------------------------------- reading
    def battles(self, language: str = "all", task: str = "all") -> list[tuple[str, str, str]]:
        """Blind, not excluded battles as (adapter A, adapter B, outcome), oldest first."""
        with self._connect() as db:
            adapters = dict(db.execute("SELECT g.id, g.adapter FROM generations g JOIN tickets t "
                                       "ON t.prompt_id = g.prompt_id WHERE t.blind = 1"))
            rows = db.execute("SELECT p.language, p.task, t.shown, v.choice FROM votes v "
                              "JOIN tickets t ON t.ticket = v.ticket JOIN prompts p ON p.id = t.prompt_id "
                              "WHERE t.blind = 1 AND v.excluded = 0 ORDER BY v.time, v.rowid").fetchall()
        battles = []
        for row_language, row_task, shown, choice in rows:
            if language in ("all", row_language) and task in ("all", row_task):
                a, b = json.loads(shown)
                battles.append((adapters[a], adapters[b], json.loads(choice)))
        return battles

    def battle_counts(self) -> dict[str, int]:
        """How many blind battles each adapter has been drawn into (voted or not)."""
        with self._connect() as db:
            rows = db.execute("SELECT g.adapter, COUNT(*) FROM tickets t JOIN generations g "
                              "ON g.prompt_id = t.prompt_id WHERE t.blind = 1 GROUP BY g.adapter").fetchall()
        return dict(rows)

    def version(self) -> tuple:
        """Changes whenever a vote is cast, imported or re-flagged (for caches)."""
        with self._connect() as db:
            return db.execute("SELECT COUNT(*), COALESCE(MAX(rowid), 0), SUM(excluded) FROM votes").fetchone()

    def records(self) -> list[dict]:
        """Every vote in the export format, sorted by time."""
        with self._connect() as db:
            ids = [r[0] for r in db.execute("SELECT vote_id FROM votes ORDER BY time, rowid")]
            return [self._record(db, vote_id) for vote_id in ids]

    def _record(self, db: sqlite3.Connection, vote_id: str) -> dict:
        vote = db.execute("SELECT v.choice, v.session, v.time, v.excluded, t.blind, t.shown, p.task, p.language, "
                          "p.text, p.image FROM votes v JOIN tickets t ON t.ticket = v.ticket "
                          "JOIN prompts p ON p.id = t.prompt_id WHERE v.vote_id = ?", (vote_id,)).fetchone()
        choice, session, when, excluded, blind, shown, task, language, text, image = vote
        candidates = []
        for gen_id in json.loads(shown):
            gen = db.execute("SELECT base_model, adapter, adapter_created, mode, condition, text, scores, seed, "
                             "sampling FROM generations WHERE id = ?", (gen_id,)).fetchone()
            candidates.append({
                "generation_id": gen_id, "adapter": gen[1], "adapter_created": gen[2], "mode": gen[3],
                "condition": gen[4], "text": gen[5], "scores": _loads_or_none(gen[6]), "seed": gen[7],
                "sampling": _loads_or_none(gen[8]), "_base": gen[0]})
        base_model = candidates[0].pop("_base") if candidates else ""
        for candidate in candidates:
            candidate.pop("_base", None)
        return {
            "vote_id": vote_id, "kind": "battle" if blind else "pick", "blind": bool(blind), "time": when,
            "session": session, "excluded": bool(excluded), "base_model": base_model,
            "prompt": {"task": task, "language": language, "text": text, "image": image},
            "candidates": candidates, "choice": json.loads(choice),
        }

    def image_png(self, sha256: str) -> bytes | None:
        with self._connect() as db:
            row = db.execute("SELECT png FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        return row[0] if row else None

    # ---------------------------------------------------------------- journal, export, import
    def _journal(self, records: list[dict]) -> None:
        """Append votes to this store's journal file (and their images, written once)."""
        if not records:
            return
        try:
            self._append(records)
        except OSError as err:  # the database has the votes; only the backup copy is behind
            log.error("Could not append %d votes to the journal %s: %s", len(records), self.journal, err)

    def _append(self, records: list[dict]) -> None:
        with self._journal_lock:
            for record in records:
                sha = record["prompt"]["image"]
                target = self.journal_dir / "images" / f"{sha}.png"
                if sha and not target.exists():
                    _write_atomic(target, self.image_png(sha))
            with open(self.journal, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                f.flush()
                os.fsync(f.fileno())

    def export(self, out_dir: str | Path) -> int:
        """Write out_dir/votes.jsonl, out_dir/images/<sha256>.png and a dataset card; returns the vote count."""
        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        records = self.records()
        for sha in sorted({r["prompt"]["image"] for r in records if r["prompt"]["image"]}):
            target = out / "images" / f"{sha}.png"
            if not target.exists():
                _write_atomic(target, self.image_png(sha))
        _write_atomic(out / "votes.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
        _write_atomic(out / "README.md", DATASET_CARD.format(count=len(records)).encode("utf-8"))
        return len(records)

    def import_folder(self, folder: str | Path) -> int:
        """Import every *.jsonl in a folder (an export or a journal), with its images/ folder."""
        folder = Path(folder)
        return self.import_jsonl(sorted(folder.glob("*.jsonl")), images_dir=folder / "images")

    def import_jsonl(self, paths: Iterable[str | Path], images_dir: str | Path | None = None) -> int:
        """Re-import exported votes; a vote already stored (same vote_id) is not added again, but keeps
        an `excluded` flag the file sets. Returns how many votes were new."""
        new = 0
        with self._connect(write=True) as db:
            for path in paths:
                for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        new += self._import_record(db, record, Path(images_dir) if images_dir else None)
                    except (ValueError, KeyError, TypeError) as err:  # a bad line must not stop the rest
                        log.warning("Skipped line %d of %s: %s", number, path, err)
        return new

    def _import_record(self, db: sqlite3.Connection, record: dict, images_dir: Path | None) -> int:
        vote_id = str(record["vote_id"])
        if db.execute("SELECT 1 FROM votes WHERE vote_id = ?", (vote_id,)).fetchone():
            if record.get("excluded"):
                db.execute("UPDATE votes SET excluded = 1 WHERE vote_id = ?", (vote_id,))
            return 0
        prompt = record["prompt"]
        sha = prompt.get("image")
        png_path = images_dir / f"{sha}.png" if sha and images_dir else None
        if png_path is not None and png_path.is_file():
            png = png_path.read_bytes()
            if hashlib.sha256(png).hexdigest() == sha:
                db.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?)", (sha, png, record["time"]))
        has_image = sha and db.execute("SELECT 1 FROM images WHERE sha256 = ?", (sha,)).fetchone()
        ticket = prompt_id = f"import-{vote_id}"
        db.execute("INSERT OR IGNORE INTO prompts VALUES (?, ?, ?, ?, ?, ?)", (
            prompt_id, prompt["task"], prompt["language"], prompt["text"], sha if has_image else None, record["time"]))
        ids = []
        for gen in record["candidates"]:
            ids.append(str(gen["generation_id"]))
            db.execute("INSERT OR IGNORE INTO generations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
                ids[-1], prompt_id, record["base_model"], gen["adapter"], gen.get("adapter_created"), gen["mode"],
                gen.get("condition") or "", gen["text"], _json_or_none(gen.get("scores")), gen.get("seed"),
                _json_or_none(gen.get("sampling")), record["time"]))
        created = dt.datetime.fromisoformat(record["time"]).timestamp()
        db.execute("INSERT OR IGNORE INTO tickets VALUES (?, ?, ?, ?, ?, ?)",
                   (ticket, int(bool(record["blind"])), prompt_id, json.dumps(ids), record["session"], created))
        db.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, ?)", (
            vote_id, ticket, json.dumps(record["choice"]), record["session"], record["time"], record["time"][:10],
            int(bool(record.get("excluded")))))
        return 1


def _check_choice(choice: Any, blind: bool, shown: int) -> Any:
    if blind:
        if choice not in BATTLE_CHOICES:
            raise ClotError(f"A battle vote is one of {', '.join(BATTLE_CHOICES)} (bad = both unfunny); "
                            f"got {choice!r}.")
        return choice
    if choice == "none":
        return choice
    if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < shown:
        raise ClotError(f"A pick is the number of one of the {shown} answers shown, or none; got {choice!r}.")
    return choice


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _loads_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


DATASET_CARD = """---
configs:
- config_name: default
  data_files: votes.jsonl
license: other
---
# CLoT humor studio votes

{count} votes from the CLoT humor studio, one JSON object per line in `votes.jsonl`, sorted by time.
`kind` "battle" is a blind A/B vote of the arena (choice A, B, tie, or bad = both unfunny); "pick" is a
"funniest" click among a request's candidate cards, where the model's scores were visible (choice: the
index of the candidate as shown, or "none"). `session` is a salted hash, never an address; `excluded`
marks votes removed by moderation. `prompt.image` names `images/<sha256>.png`, present only when the
person who uploaded it consented to storing it.
"""


# ------------------------------------------------------------------ a Space without persistent storage
def start_persistence(store: VoteStore, *, repo: str | None = None, token: str | None = None,
                      scheduler_factory: Callable | None = None, download: Callable | None = None):
    """Push the store's journal to a private dataset repo every few minutes, after importing what the
    repo already holds. Off (returns None) unless CLOT_VOTES_REPO and a token (HF_TOKEN) are set.

    Only the append-only journal files and write-once images are pushed: CommitScheduler uploads a
    file cut at the size it saw, safe for those, never for the live database."""
    repo = repo or os.environ.get("CLOT_VOTES_REPO")
    token = token or os.environ.get("HF_TOKEN")
    if not repo or not token:
        return None
    if scheduler_factory is None or download is None:
        from huggingface_hub import CommitScheduler, snapshot_download

        scheduler_factory = scheduler_factory or CommitScheduler
        download = download or snapshot_download
    remote = store.path.with_name(f"{store.path.stem}-remote")
    try:
        download(repo_id=repo, repo_type="dataset", local_dir=str(remote), token=token,
                 allow_patterns=JOURNAL_PATTERNS)
        log.info("Imported %d votes from %s.", store.import_folder(remote), repo)
    except Exception as err:  # a new (empty or not yet created) repo: nothing to import
        log.warning("No votes imported from %s: %s", repo, err)
    return scheduler_factory(repo_id=repo, repo_type="dataset", folder_path=store.journal_dir, every=5,
                             private=True, token=token, allow_patterns=JOURNAL_PATTERNS)


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clot.votes", description="Export, import and moderate votes.")
    parser.add_argument("--db", default=None, help="the vote database (default: CLOT_VOTES_DB or votes/votes.sqlite)")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a dataset: votes.jsonl, images/, README.md")
    export.add_argument("--out", required=True)
    imports = commands.add_parser("import", help="re-import exported votes.jsonl files (no duplicates)")
    imports.add_argument("files", nargs="+")
    exclude = commands.add_parser("exclude", help="flag votes as excluded (moderation)")
    exclude.add_argument("vote_ids", nargs="+")
    args = parser.parse_args(argv)
    try:
        store = VoteStore(args.db or default_db_path())
        if args.command == "export":
            print(f"Exported {store.export(args.out)} votes to {args.out}.")
        elif args.command == "import":
            new = sum(store.import_jsonl([path], images_dir=Path(path).parent / "images") for path in args.files)
            print(f"Imported {new} new votes.")
        else:
            print(f"Excluded {store.exclude(args.vote_ids)} votes.")
    except (ClotError, OSError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
