"""Build the local zero-shot tasks (``bible_next_sentence`` and a family of graded difficulty) from the bundled
World English Bible text.

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

The same script builds the *difficulty family* ``bible_next_{2,4,8}_{far,near}`` (the task-difficulty view of
``secateurs sweep``): the same targets and contexts in every task, only the distractors change.

* ``far``: the distractors are sentences from *another book* (a Gospel target gets Genesis, Exodus, Ruth or
  Acts sentences ...): a different topic, names and register, so the context alone rules them out;
* ``near``: the distractors come from *the same chapter* (never the target or a sentence of the context): same
  people, places and vocabulary, so only the line of the narrative tells them apart;
* 2, 4 or 8 choices (chance 1/2, 1/4, 1/8); distractors within ``FAMILY_LENGTH_TOLERANCE`` of the target's
  length, all distinct;
* the declared difficulty (``metadata: difficulty`` in each YAML, 1 = easiest) is log2(choices), plus 2 for
  near distractors: 2_far 1, 4_far 2, 8_far 3, 2_near 3, 4_near 4, 8_near 5. It is a prior: the dense model's
  accuracy shows whether it holds;
* a target qualifies when it has enough near distractors for 8 choices; targets are drawn with
  ``random.Random(FAMILY_SEED)``, the first ``FAMILY_TEST_SIZE`` make ``test`` and the next
  ``FAMILY_TRAIN_SIZE`` ``train``; each task draws and shuffles its distractors with its own generator seeded
  by ``"{FAMILY_SEED}-{task}"``. The YAML files are written by the builder too.

The output is deterministic (same text, same files)::

    python tools/build_zeroshot_task.py            # writes secateurs/evaluate/tasks/*.jsonl and the family's YAML
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


# ------------------------------------------------------------------------------------------ difficulty family
FAMILY_SEED = 2310
FAMILY_TEST_SIZE = 200
FAMILY_TRAIN_SIZE = 20
FAMILY_CHOICES = (2, 4, 8)
FAMILY_DISTANCES = ("far", "near")
FAMILY_LENGTH_TOLERANCE = 0.25


def family_name(choices: int, distance: str) -> str:
    return f"bible_next_{choices}_{distance}"


def family_difficulty(choices: int, distance: str) -> int:
    """The declared difficulty: log2(choices), plus 2 when the distractors come from the same chapter."""
    return choices.bit_length() - 1 + (2 if distance == "near" else 0)


def family_tasks() -> list[dict]:
    """Every task of the family: name, choices, distance, difficulty, chance; easiest first."""
    tasks = [
        {
            "name": family_name(k, d),
            "choices": k,
            "distance": d,
            "difficulty": family_difficulty(k, d),
            "chance": 1 / k,
        }
        for d in FAMILY_DISTANCES
        for k in FAMILY_CHOICES
    ]
    return sorted(tasks, key=lambda t: (t["difficulty"], t["distance"] == "near"))


def books(text: str) -> list[list[list[list[str]]]]:
    """Books (separated by two blank lines) -> chapters -> paragraphs -> sentences."""
    return [chapters(block) for block in text.split("\n\n\n")]


def _near_pool(chapter: list[list[str]], example: dict) -> list[str]:
    context = set(sentences(example["context"]))
    return sorted({s for p in chapter for s in p} - context - {example["target"]})


def _in_length(pool: list[str], target: str) -> list[str]:
    low, high = len(target) * (1 - FAMILY_LENGTH_TOLERANCE), len(target) * (1 + FAMILY_LENGTH_TOLERANCE)
    return [s for s in pool if low <= len(s) <= high]


def build_family(text: str) -> dict[str, dict[str, list[dict]]]:
    """Task name -> {"test", "train"} for every task of the family (same targets, different distractors)."""
    library = books(text)
    located = []  # (book, chapter index in the book, example)
    for b, book in enumerate(library):
        located += [(b, example["chapter"], example) for example in candidates(book)]
    everything = sorted({(len(s), s, b) for b, book in enumerate(library) for ch in book for p in ch for s in p})
    lengths = [length for length, _, _ in everything]
    most = max(FAMILY_CHOICES) - 1
    rng = random.Random(FAMILY_SEED)
    order = list(range(len(located)))
    rng.shuffle(order)
    chosen, seen = [], set()
    for index in order:
        if len(chosen) == FAMILY_TEST_SIZE + FAMILY_TRAIN_SIZE:
            break
        b, c, example = located[index]
        target = example["target"]
        if target in seen or len(_in_length(_near_pool(library[b][c], example), target)) < most:
            continue
        seen.add(target)
        chosen.append((b, c, example))
    if len(chosen) < FAMILY_TEST_SIZE + FAMILY_TRAIN_SIZE:
        raise SystemExit(f"too few distinct family examples: {len(chosen)}")
    out = {}
    for task in family_tasks():
        task_rng = random.Random(f"{FAMILY_SEED}-{task['name']}")
        rows = []
        for b, c, example in chosen:
            target = example["target"]
            if task["distance"] == "near":
                pool = _in_length(_near_pool(library[b][c], example), target)
            else:
                key = len(target)
                low, high = key * (1 - FAMILY_LENGTH_TOLERANCE), key * (1 + FAMILY_LENGTH_TOLERANCE)
                window = everything[bisect.bisect_left(lengths, low) : bisect.bisect_right(lengths, high)]
                pool = sorted({s for _, s, other in window if other != b and s != target})
            choices = [target, *task_rng.sample(pool, task["choices"] - 1)]
            task_rng.shuffle(choices)
            rows.append(
                {
                    "id": len(rows),
                    "book": b,
                    "chapter": c,
                    "context": example["context"],
                    "choices": choices,
                    "label": choices.index(target),
                }
            )
        out[task["name"]] = {"test": rows[:FAMILY_TEST_SIZE], "train": rows[FAMILY_TEST_SIZE:]}
    return out


FAMILY_YAML = """\
# Which sentence comes next in a World English Bible passage? {choices} choices ({where}); chance {chance:.4g}.
# Data: {name}.{{test,train}}.jsonl, built by tools/build_zeroshot_task.py (public-domain text).
task: {name}
custom_dataset: !function secateurs.evaluate.tasks.load_dataset
dataset_kwargs:
  data_files:
    test: {name}.test.jsonl
    train: {name}.train.jsonl
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  difficulty: {difficulty}
  chance: {chance:.6g}
  choices: {choices}
  distractors: {distance}
"""

WHERE = {"far": "distractors from another book", "near": "distractors from the same chapter"}


def family_yaml(task: dict) -> str:
    return FAMILY_YAML.format(**task, where=WHERE[task["distance"]])


# ------------------------------------------------------------------------------------------------ output
def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def outputs(text: str) -> dict[Path, str]:
    """Every file the builder writes: path -> content."""
    files = {OUT_DIR / f"{TASK}.{split}.jsonl": jsonl(rows) for split, rows in build(text).items()}
    family = build_family(text)
    for task in family_tasks():
        name = task["name"]
        files[OUT_DIR / f"{name}.yaml"] = family_yaml(task)
        for split, rows in family[name].items():
            files[OUT_DIR / f"{name}.{split}.jsonl"] = jsonl(rows)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, content in outputs(read_text("bible")).items():
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != content:
                stale.append(str(path))
            continue
        path.write_text(content, encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in content.splitlines()]
            labels = [row["label"] for row in rows]
            counts = [labels.count(i) for i in range(len(rows[0]["choices"]))]
            print(f"{path}: {len(rows)} examples, {len(content.encode())} bytes, gold positions {counts}")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
