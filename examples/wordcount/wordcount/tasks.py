"""The example's task functions: plain Python, no Celery decorator; config.yml makes them tasks.

`count_words` reads a shared word-stem table that another writer sometimes holds locked: then it
raises StorageBusy, which the config lists in its retry_on, so Celery retries it with backoff. Any
other exception (a document that does not exist, a chunk that is not text) is a bug or bad input
that no retry cures: conveyor dead-letters it at once, with its type and message.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from celery import current_task

CORPUS = Path(__file__).resolve().parent / "corpus"
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
BUSY_PROBABILITY = 0.3  # how often the table is locked when an attempt starts
BUSY_ATTEMPTS = 2  # the lock is always released within this many attempts


class StorageBusy(Exception):
    """The shared table was locked by another writer: a later attempt will find it free."""


def split(document: str, chunk_words: int = 250) -> list[str]:
    """The document's text in chunks of `chunk_words` words."""
    if not re.fullmatch(r"[a-z0-9-]+", document):
        raise ValueError(f"document names are lowercase letters, digits and dashes, got {document!r}")
    words = (CORPUS / f"{document}.txt").read_text(encoding="utf-8").split()
    return [" ".join(words[i:i + chunk_words]) for i in range(0, len(words), chunk_words)]


def count_words(chunks: list[str]) -> list[dict[str, int]]:
    """Word counts of each chunk, lowercased, with a stem table that is sometimes busy."""
    attempt = (current_task.request.retries or 0) if current_task else 0
    if attempt < BUSY_ATTEMPTS and random.random() < BUSY_PROBABILITY:
        raise StorageBusy(f"the stem table was locked (attempt {attempt + 1})")
    if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
        raise TypeError(f"count_words takes a list of text chunks, got {type(chunks).__name__}")
    return [counts_of(chunk) for chunk in chunks]


def counts_of(chunk: str) -> dict[str, int]:
    return dict(Counter(WORD.findall(chunk.lower())))


def merge_counts(per_chunk: list[dict[str, int]], top: int = 5) -> dict[str, object]:
    """The chunks' counts added up: total words, distinct words and the `top` most common."""
    total: Counter[str] = Counter()
    for counts in per_chunk:
        total.update(counts)
    return {"words": sum(total.values()), "distinct": len(total), "top": total.most_common(top)}
