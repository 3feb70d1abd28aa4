"""Zero-shot tasks shipped with secateurs: lm-eval task configs (YAML) and their data, readable offline.

``bible_next_sentence`` (built by ``tools/build_zeroshot_task.py`` from the bundled World English Bible text,
public domain): 400 test passages, each with four candidate next sentences (the true one and three of the same
length from other chapters); multiple choice, ``acc`` and ``acc_norm``, chance 25%. A 50-example ``train``
split holds the few-shot examples.

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
