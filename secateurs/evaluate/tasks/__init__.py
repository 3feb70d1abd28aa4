"""Zero-shot tasks shipped with secateurs: lm-eval task configs (YAML) and their data, readable offline.

``bible_next_sentence`` (built by ``tools/build_zeroshot_task.py`` from the bundled World English Bible text,
public domain): 400 test passages, each with four candidate next sentences (the true one and three of the same
length from other chapters); multiple choice, ``acc`` and ``acc_norm``, chance 25%. A 50-example ``train``
split holds the few-shot examples.

The *difficulty family* ``bible_next_{2,4,8}_{far,near}`` (same builder; for the task-difficulty view of
``secateurs sweep``): 200 test passages shared by all six tasks, each with 2, 4 or 8 candidate next sentences;
the distractors come from another book (``far``: easier) or from the same chapter (``near``: harder). Each YAML
declares ``metadata: difficulty`` (log2(choices), plus 2 for near distractors; 1 = easiest), ``chance`` and
``choices``. A 20-example ``train`` split each.

The YAML files name :func:`load_dataset` as their ``custom_dataset``, so lm-eval reads the data from this
folder without the hub, the ``datasets`` cache or the working directory; ``lm_eval --include_path`` pointed
at this folder works too.
"""

from __future__ import annotations

import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parent

# name -> one-line description (the name is the YAML's ``task``)
LOCAL_TASKS: dict[str, str] = {
    "bible_next_sentence": "pick the sentence that follows a World English Bible passage among 4 "
    "(3 same-length sentences from other chapters); 400 examples, chance 25%",
}
_WHERE = {"far": "another book", "near": "the same chapter"}
for _distance, _difficulty in (("far", 0), ("near", 2)):
    for _choices in (2, 4, 8):
        LOCAL_TASKS[f"bible_next_{_choices}_{_distance}"] = (
            f"pick the sentence that follows a World English Bible passage among {_choices} (distractors from "
            f"{_WHERE[_distance]}); 200 examples, chance {100 / _choices:g}%, difficulty "
            f"{_choices.bit_length() - 1 + _difficulty}"
        )


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file, one a line."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_dataset(data_files: dict[str, str], **_metadata):
    """A ``datasets.DatasetDict`` of the given split -> file names (relative to this folder).

    lm-eval calls it with the task's ``dataset_kwargs`` and ``metadata``; the metadata is ignored.
    """
    import datasets

    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(read_jsonl(FOLDER / name)) for split, name in data_files.items()}
    )
