"""Write the demo chat datasets from facts.py: <task>_train.jsonl and <task>_heldout.jsonl.

Run from the repository root: ``python demo/datasets/build.py``. Deterministic (fixed seed).
Tasks: ``french`` (English questions, French answers), ``json`` (replies are one strict JSON
object {"answer", "topic"}), ``pirate`` (replies in a pirate voice).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from facts import FACTS, HELD_OUT_START

HERE = Path(__file__).resolve().parent
QUESTION_FORMS = ["{q}", "{q}", "{q}", "Quick question: {q}", "Can you tell me this? {q}",
                  "{q} Please keep it short.", "I was wondering: {q}", "Hey! {q}", "{lower}"]
FRENCH_OPENERS = ["", "", "", "Bonne question ! ", "Bien sûr. ", "Voici la réponse : "]
PIRATE_OPENERS = ["Arr, matey!", "Ahoy!", "Avast, me hearty!", "Yo ho ho!", "Shiver me timbers!",
                  "Aye aye!", "Arr!", "Blow me down!"]
PIRATE_CLOSERS = ["Arr!", "Savvy?", "Yo ho!", "Now hoist the sails!", "That be the truth, matey.",
                  "Arr, that it be!", "Fair winds to ye!"]
PIRATE_WORDS = {"you": "ye", "your": "yer", "is": "be", "are": "be", "my": "me", "yes": "aye",
                "no": "nay", "hello": "ahoy", "friend": "matey", "friends": "mateys",
                "money": "doubloons", "of": "o'", "the": "th'"}


def question_text(question: str, rng: random.Random) -> str:
    form = rng.choice(QUESTION_FORMS)
    return form.format(q=question, lower=question[0].lower() + question[1:])


def pirate_word(match: re.Match) -> str:
    word = match.group(0)
    swapped = PIRATE_WORDS.get(word.lower())
    if swapped is None:
        return word
    return swapped[0].upper() + swapped[1:] if word[0].isupper() else swapped


def pirate_reply(english: str, rng: random.Random) -> str:
    body = re.sub(r"[A-Za-z]+", pirate_word, english)
    return f"{rng.choice(PIRATE_OPENERS)} {body} {rng.choice(PIRATE_CLOSERS)}"


def reply(task: str, topic: str, english: str, french: str, rng: random.Random) -> str:
    if task == "french":
        return rng.choice(FRENCH_OPENERS) + french
    if task == "json":
        return json.dumps({"answer": english, "topic": topic}, ensure_ascii=False)
    return pirate_reply(english, rng)


def records(task: str, facts: list[tuple[str, str, str, str]], seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for topic, question, english, french in facts:
        messages = [{"role": "user", "content": question_text(question, rng)},
                    {"role": "assistant", "content": reply(task, topic, english, french, rng)}]
        out.append({"messages": messages})
    rng.shuffle(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                    encoding="utf-8")


def main() -> None:
    for seed, task in enumerate(("french", "json", "pirate")):
        write_jsonl(HERE / f"{task}_train.jsonl", records(task, FACTS[:HELD_OUT_START], seed))
        write_jsonl(HERE / f"{task}_heldout.jsonl", records(task, FACTS[HELD_OUT_START:], 100 + seed))


if __name__ == "__main__":
    main()
