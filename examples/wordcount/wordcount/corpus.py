"""Write the example's corpus: `python -m wordcount.corpus` (from examples/wordcount) makes the
documents in wordcount/corpus/, reproducibly, from a fixed vocabulary with a Zipf-like frequency."""

from __future__ import annotations

import random
import sys

from wordcount.tasks import CORPUS

VOCABULARY = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if so no what can more out time "
    "river stone market winter harbour lantern orchard signal copper meadow engine ledger timber canvas "
    "beacon quarry anchor furnace thread garden bridge kettle mirror saddle tunnel valley whistle window"
).split()


def write(documents: int = 12, words: int = 1500, seed: int = 14) -> None:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(VOCABULARY))]
    CORPUS.mkdir(exist_ok=True)
    for number in range(1, documents + 1):
        text = rng.choices(VOCABULARY, weights, k=words)
        lines = [" ".join(text[i:i + 15]) for i in range(0, len(text), 15)]
        (CORPUS / f"doc-{number:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write(*(int(arg) for arg in sys.argv[1:]))
