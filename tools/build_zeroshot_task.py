"""Build the local zero-shot task ``bible_next_sentence`` from the bundled World English Bible text.

Each example is a short passage and four candidate next sentences: the sentence that really follows it in the
text and three others drawn from elsewhere (another chapter), of about the same length so that length is no
clue. A model picks the candidate it finds most likely after the passage (lm-eval ``multiple_choice``:
``acc`` on summed log-probabilities, ``acc_norm`` per character). Chance is 25%.

How an example is made, from ``secateurs.data.read_text("bible")`` (public domain; see
``secateurs/data/corpora/LICENSES.md``):

* the text is cut into chapters (blank-line separated blocks; book titles are skipped) and each paragraph line
  into sentences: text up to ``.``, ``?`` or ``!`` (and any closing quotes) followed by a space and a capital
  letter or an opening quote, or by the end of the line;
* a *target* is a sentence of 30-120 characters that has at least one sentence before it in the same
  paragraph; its *context* is the one or two sentences before it in that paragraph (at most 250 characters,
  at least 40);
* the three distractors are sentences from other chapters whose length is within 20% of the target's, all
  distinct and none equal to the target; the four choices are shuffled and ``label`` is the index of the true
  one;
* targets are drawn with ``random.Random(SEED)`` without replacement: the first ``TEST_SIZE`` make the
  ``test`` split, the next ``TRAIN_SIZE`` the ``train`` split (few-shot examples only).

The output is deterministic (same text, same files)::

    python tools/build_zeroshot_task.py            # writes secateurs/evaluate/tasks/bible_next_sentence.*.jsonl
    python tools/build_zeroshot_task.py --check    # exits 1 if the committed files differ from a rebuild
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import re
import sys
from pathlib import Path

from secateurs.data import read_text

TASK = "bible_next_sentence"
OUT_DIR = Path(__file__).resolve().parent.parent / "secateurs" / "evaluate" / "tasks"
SEED = 1234
TEST_SIZE = 400
TRAIN_SIZE = 50
CHOICES = 4
TARGET_CHARS = (30, 120)
CONTEXT_CHARS = (40, 250)
LENGTH_TOLERANCE = 0.2

SENTENCE = re.compile(r".+?[.?!][’”]*(?=\s+[“‘A-Z]|\s*$)")


def sentences(line: str) -> list[str]:
    """The sentences of one paragraph line, in order (text that ends no sentence is dropped)."""
    return [m.group(0).strip() for m in SENTENCE.finditer(line.strip())]


def chapters(text: str) -> list[list[list[str]]]:
    """Chapters -> paragraphs -> sentences; one-line blocks without sentence ends (book titles) are skipped."""
    out = []
    for block in text.split("\n\n"):
        paragraphs = [s for line in block.splitlines() if (s := sentences(line))]
        if paragraphs:
            out.append(paragraphs)
    return out


def candidates(book: list[list[list[str]]]) -> list[dict]:
    """Every (chapter, context, target) that qualifies as an example, in reading order."""
    found = []
    for chapter, paragraphs in enumerate(book):
        for paragraph in paragraphs:
            for i in range(1, len(paragraph)):
                target = paragraph[i]
                context = " ".join(paragraph[max(0, i - 2) : i])
                if not TARGET_CHARS[0] <= len(target) <= TARGET_CHARS[1]:
                    continue
                if len(context) > CONTEXT_CHARS[1]:
                    context = paragraph[i - 1]
                if not CONTEXT_CHARS[0] <= len(context) <= CONTEXT_CHARS[1]:
                    continue
                found.append({"chapter": chapter, "context": context, "target": target})
    return found


def build(text: str) -> dict[str, list[dict]]:
    """The ``test`` and ``train`` splits (lists of examples) built from ``text``."""
    book = chapters(text)
    pool = sorted((len(s), s, chapter) for chapter, paragraphs in enumerate(book) for p in paragraphs for s in p)
    lengths = [length for length, _, _ in pool]
    examples = candidates(book)
    rng = random.Random(SEED)
    order = list(range(len(examples)))
    rng.shuffle(order)
    used_targets: set[str] = set()
    made = []
    for index in order:
        if len(made) == TEST_SIZE + TRAIN_SIZE:
            break
        example = examples[index]
        target = example["target"]
        if target in used_targets:
            continue
        low, high = len(target) * (1 - LENGTH_TOLERANCE), len(target) * (1 + LENGTH_TOLERANCE)
        window = pool[bisect.bisect_left(lengths, low) : bisect.bisect_right(lengths, high)]
        others = sorted({s for _, s, chapter in window if chapter != example["chapter"] and s != target})
        distractors = rng.sample(others, CHOICES - 1)
        choices = [target, *distractors]
        rng.shuffle(choices)
        used_targets.add(target)
        made.append(
            {
                "id": len(made),
                "chapter": example["chapter"],
                "context": example["context"],
                "choices": choices,
                "label": choices.index(target),
            }
        )
    test, train = made[:TEST_SIZE], made[TEST_SIZE : TEST_SIZE + TRAIN_SIZE]
    if len(train) < TRAIN_SIZE:
        raise SystemExit(f"too few distinct examples: {len(test)} test, {len(train)} train")
    return {"test": test, "train": train}


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args(argv)
    splits = build(read_text("bible"))
    stale = []
    for split, rows in splits.items():
        path = OUT_DIR / f"{TASK}.{split}.jsonl"
        content = jsonl(rows)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != content:
                stale.append(str(path))
            continue
        path.write_text(content, encoding="utf-8")
        labels = [row["label"] for row in rows]
        counts = [labels.count(i) for i in range(CHOICES)]
        print(f"{path}: {len(rows)} examples, {len(content.encode())} bytes, gold positions {counts}")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
