"""A small deterministic synthetic corpus written in every input format, for tests and demos."""
from __future__ import annotations

import json
import random
from pathlib import Path

from dsv3.data.prepare import PrepareOptions, prepare

WORDS = ("the model reads tokens and predicts the next one; expert routers pick top-k experts, "
         "latent attention caches less. naïve café über straße 日本語 テキスト def return class import").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """``n`` documents of 1..60 random words (some multi-line, some non-ASCII)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 60))]
        cut = rng.randint(0, len(words))
        docs.append(" ".join(words[:cut]) + ("\n" if cut % 3 == 0 else " ") + " ".join(words[cut:]))
    return docs


def write_text_tree(root: Path, docs: list[str]) -> None:
    """One .txt file per document, spread over nested directories."""
    for i, d in enumerate(docs):
        p = root / f"d{i % 3}" / f"sub{i % 2}" / f"doc{i:03d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(d, encoding="utf-8")


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> None:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")


def quick_prepare(inputs, out, **kw):
    """prepare() with a small vocabulary and no progress bar."""
    kw.setdefault("vocab_size", 400)
    kw.setdefault("progress", False)
    return prepare([str(i) for i in inputs], out, PrepareOptions(**kw))
