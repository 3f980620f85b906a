"""Argument generators for the config's dispatch entries and the scenario: `(index) -> (args, kwargs)`."""

from __future__ import annotations

from wordcount import tasks


def documents() -> list[str]:
    return sorted(p.stem for p in tasks.CORPUS.glob("*.txt"))


def split_args(index: int) -> tuple[list, dict]:
    """Document `index` (round the corpus) to split."""
    names = documents()
    return [names[index % len(names)]], {}


def count_args(index: int) -> tuple[list, dict]:
    """The chunks of document `index`, split here, to count."""
    return [tasks.split(*split_args(index)[0])], {}


def merge_args(index: int) -> tuple[list, dict]:
    """Counts of the chunks of document `index`, counted here, to merge."""
    chunks = tasks.split(*split_args(index)[0])
    per_chunk = [tasks.counts_of(chunk) for chunk in chunks]
    return [per_chunk], {"top": 3}
