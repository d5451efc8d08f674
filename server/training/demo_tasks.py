"""The demo tasks (French replies, strict-JSON replies, pirate voice): data files and scores.

Each score looks at one generated reply and says whether it shows the adapter's behaviour;
a task's score on a set of prompts is the fraction of replies that do.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .data import read_jsonl

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"  # the repository's demo/ folder


def add_demo_script_args(parser: argparse.ArgumentParser) -> None:
    """The options every demo script takes: base model, demo folder, torch threads."""
    parser.add_argument("--base", default=None, help="HF model directory (default: embedded model)")
    parser.add_argument("--demo-dir", type=Path, default=DEMO_DIR)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)

FRENCH_STOPWORDS = frozenset(
    "le la les l de des du d un une et est sont en que qui dans pour pas sur au aux ce cette ces "
    "il elle ils elles nous vous leur se sa son ses avec par plus ou mais très être été fait "
    "font peut ne on c qu s y à où même aussi comme".split())
ENGLISH_STOPWORDS = frozenset(
    "the a an of and is are in to for that it with on as be by this was which or from at not "
    "you your can it's they their has have its there what".split())
PIRATE_PATTERN = re.compile(r"\b(arr+|matey|mateys|ahoy|avast|ye|yer|aye|hearty|landlubbers?|"
                            r"timbers|savvy|yo ho|doubloons|booty|plunder|scallywags?|grog)\b",
                            re.IGNORECASE)


def is_french(text: str) -> bool:
    """More French than English function words, and at least two of them."""
    words = re.findall(r"[a-zà-ÿœ]+", text.lower())
    french = sum(w in FRENCH_STOPWORDS for w in words)
    english = sum(w in ENGLISH_STOPWORDS for w in words)
    return french >= 2 and french > english


def is_strict_json_answer(text: str) -> bool:
    """The whole reply parses as one JSON object with a string ``answer``."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and isinstance(value.get("answer"), str)


def is_pirate(text: str) -> bool:
    return PIRATE_PATTERN.search(text) is not None


@dataclass(frozen=True)
class DemoTask:
    name: str
    description: str
    score_reply: Callable[[str], bool]

    def train_path(self, demo_dir: Path = DEMO_DIR) -> Path:
        return demo_dir / "datasets" / f"{self.name}_train.jsonl"

    def heldout_path(self, demo_dir: Path = DEMO_DIR) -> Path:
        return demo_dir / "datasets" / f"{self.name}_heldout.jsonl"

    def adapter_path(self, demo_dir: Path = DEMO_DIR) -> Path:
        return demo_dir / "adapters" / f"{self.name}.safetensors"

    def heldout_conversations(self, demo_dir: Path = DEMO_DIR) -> list[list[dict]]:
        """Held-out conversations cut before their final assistant reply (the prompts)."""
        return [record["messages"][:-1] for record in read_jsonl(self.heldout_path(demo_dir))]

    def score(self, replies: list[str]) -> float:
        return sum(map(self.score_reply, replies)) / len(replies)


DEMO_TASKS = {
    "french": DemoTask("french", "answers in French", is_french),
    "json": DemoTask("json", 'replies as one strict JSON object {"answer", "topic"}', is_strict_json_answer),
    "pirate": DemoTask("pirate", "replies in a pirate voice", is_pirate),
}
