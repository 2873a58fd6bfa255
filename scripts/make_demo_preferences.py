"""Write src/gpt2ft/assets/shakespeare_preferences.jsonl: the demo's preference pairs, built from the
bundled instruction set. Each instruction keeps its right answer as `chosen`; `rejected` is a wrong
fact (another genre, act count or character), the same answer about the wrong play, or a rambling
non-answer. Deterministic: same input, same file.

    python scripts/make_demo_preferences.py
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "src" / "gpt2ft" / "assets"
SOURCE, OUT = ASSETS / "shakespeare_instructions.jsonl", ASSETS / "shakespeare_preferences.jsonl"
GENRES = ["comedy", "tragedy", "history play", "problem play", "Roman play", "romance"]
RAMBLES = [
    "Well, that is a very interesting question, and people have asked it for a long time, and there are "
    "many things one could say about the plays and the people in them, so it is hard to say.",
    "Shakespeare wrote a great many plays, and they have many acts and scenes and characters, and each of "
    "them is different in its own way, which is why the answer could be almost anything.",
    "It depends on how you look at it. Some would say one thing and some another, and the plays are long, "
    "and there are so many of them that nobody can really remember all of it.",
]


def parse(rows: list[dict]) -> dict:
    """Per-play facts recovered from the instruction answers (the inverse of make_demo_instructions)."""
    plays: dict[str, dict] = {}
    for r in rows:
        q, a = r["instruction"], r["output"]
        if m := re.fullmatch(r"What kind of play is (.+)\?", q):
            plays.setdefault(m[1], {})["genre"] = a[len(m[1]) + 4:-1].lstrip("n ")  # "X is a(n) genre."
        elif m := re.fullmatch(r"Who has the most lines in (.+)\?", q):
            plays.setdefault(m[1], {})["top"] = a[:-len(f" has the most lines in {m[1]}.")]
        elif m := re.fullmatch(r"Name three characters in (.+)\.", q):
            plays.setdefault(m[1], {})["three"] = a
        elif m := re.fullmatch(r"Where is the first scene of (.+) set\?", q):
            plays.setdefault(m[1], {})["scene"] = a
    return plays


def wrong_play(answer: str, title: str, titles: list[str], rng: random.Random) -> str:
    """The answer naming another play where it names this one (its last mention: 'Lady Macbeth appears in Macbeth')."""
    other = rng.choice([t for t in titles if t != title and t not in answer])
    head, _, tail = answer.rpartition(title)
    return head + other + tail


def wrong_fact(q: str, a: str, plays: dict, rng: random.Random) -> str | None:
    """The same sentence with the fact swapped for a false one (None if this question has no fact to swap)."""
    title = next((t for t in sorted(plays, key=len, reverse=True) if t in q), None)
    others = [p for t, p in plays.items() if t != title]
    if q.startswith("What kind of play"):
        genre = plays[title]["genre"]
        new = rng.choice([g for g in GENRES if g != genre])
        return f"{title} is {'an' if new[0] in 'aeiouAEIOU' else 'a'} {new}."
    if q.startswith("How many acts"):
        n = int(re.search(r"has (\d+) acts", a)[1])
        return a.replace(f"has {n} acts", f"has {rng.choice([k for k in (1, 2, 3, 4, 6, 7) if k != n])} acts")
    if q.startswith(("Who speaks first", "Who has the most lines")):
        name = a.split(" speaks first")[0].split(" has the most lines")[0]
        new = rng.choice([p["top"] for p in others if p.get("top") and p["top"] != name])
        return new + a[len(name):]
    if q.startswith("Name three characters"):
        return rng.choice([p["three"] for p in others if p.get("three") and p["three"] != a])
    if q.startswith("Where is the first scene"):
        return rng.choice([p["scene"] for p in others if p.get("scene") and p["scene"] != a])
    return None  # "In which play does X appear?": only the play can be wrong


def main() -> None:
    rows = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    plays = parse(rows)
    titles = sorted(plays)
    rng = random.Random(0)
    pairs = []
    for r in rows:
        q, a = r["instruction"], r["output"]
        title = next((t for t in sorted(titles, key=len, reverse=True) if t in a), None)
        kind = rng.choices(["wrong fact", "wrong play", "rambling"], weights=[4, 4, 2])[0]
        rejected = None
        if kind == "wrong fact":
            rejected = wrong_fact(q, a, plays, rng)
        if kind == "wrong play" or (rejected is None and kind != "rambling"):
            kind = "wrong play"
            rejected = wrong_play(a, title, titles, rng) if title else None
        if rejected is None or rejected == a:
            kind, rejected = "rambling", rng.choice(RAMBLES)
        pairs.append({"prompt": q, "chosen": a, "rejected": rejected, "kind": kind})
    OUT.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    counts = {k: sum(p["kind"] == k for p in pairs) for k in ("wrong fact", "wrong play", "rambling")}
    print(f"{len(pairs)} pairs ({counts}) from {len(titles)} plays -> {OUT}")


if __name__ == "__main__":
    main()
