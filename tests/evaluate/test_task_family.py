"""The bundled difficulty family ``bible_next_{2,4,8}_{far,near}``: deterministic builder, well-formed data, the
declared choices, chance and difficulty, and lm-eval loading it offline."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from secateurs.data import read_text
from secateurs.evaluate import tasks as local_tasks

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import build_zeroshot_task as builder  # noqa: E402

FAMILY = builder.family_tasks()
NAMES = [task["name"] for task in FAMILY]


@pytest.fixture(scope="module")
def bible() -> str:
    return read_text("bible")


@pytest.fixture(scope="module")
def built(bible):
    return builder.build_family(bible)


def test_family_is_the_declared_grid():
    assert sorted(NAMES) == sorted(f"bible_next_{k}_{d}" for k in (2, 4, 8) for d in ("far", "near"))
    levels = {task["name"]: task["difficulty"] for task in FAMILY}
    assert levels == {
        "bible_next_2_far": 1,
        "bible_next_4_far": 2,
        "bible_next_8_far": 3,
        "bible_next_2_near": 3,
        "bible_next_4_near": 4,
        "bible_next_8_near": 5,
    }
    assert [levels[n] for n in NAMES] == sorted(levels.values())  # easiest first
    assert set(NAMES) <= set(local_tasks.LOCAL_TASKS)
    assert "bible_next_sentence" in local_tasks.LOCAL_TASKS  # the original task stays


def test_builder_is_deterministic(bible, built):
    assert builder.build_family(bible) == built
    files = builder.outputs(bible)
    for path, content in files.items():  # and the committed files are what it builds
        assert path.read_text(encoding="utf-8") == content, path


@pytest.mark.parametrize("task", FAMILY, ids=NAMES)
def test_task_data_is_well_formed(task, built, bible):
    k = task["choices"]
    folder, name = local_tasks.FOLDER, task["name"]
    splits = {split: local_tasks.read_jsonl(folder / f"{name}.{split}.jsonl") for split in ("test", "train")}
    assert splits == built[task["name"]]
    test, train = splits["test"], splits["train"]
    assert (len(test), len(train)) == (builder.FAMILY_TEST_SIZE, builder.FAMILY_TRAIN_SIZE)
    library = builder.books(bible)
    for row in test + train:
        choices = row["choices"]
        assert len(choices) == k and len(set(choices)) == k  # the declared number, no duplicates
        assert 0 <= row["label"] < k
        target = choices[row["label"]]
        assert f"{row['context']} {target}" in bible  # the answer is the sentence that really comes next
        chapter = {s for p in library[row["book"]][row["chapter"]] for s in p}
        for other in choices[: row["label"]] + choices[row["label"] + 1 :]:
            assert abs(len(other) - len(target)) <= builder.FAMILY_LENGTH_TOLERANCE * len(target) + 1
            if task["distance"] == "near":
                assert other in chapter and other not in row["context"]
            else:
                books = [b for b, book in enumerate(library) if any(other in p for ch in book for p in ch)]
                assert any(b != row["book"] for b in books)
    gold = [row["label"] for row in test]
    assert all(gold.count(i) >= 0.4 * len(test) / k for i in range(k))  # shuffled: no position is a clue
    assert not {r["choices"][r["label"]] for r in test} & {r["choices"][r["label"]] for r in train}


def test_every_task_asks_about_the_same_passages(built):
    def passages(name):
        return [(r["context"], r["choices"][r["label"]]) for r in built[name]["test"]]

    first = passages(NAMES[0])
    assert all(passages(name) == first for name in NAMES[1:])


@pytest.mark.parametrize("task", FAMILY, ids=NAMES)
def test_yaml_declares_difficulty_chance_and_choices(task):
    text = (local_tasks.FOLDER / f"{task['name']}.yaml").read_text()
    assert f"task: {task['name']}" in text
    assert f"  difficulty: {task['difficulty']}\n" in text and f"  choices: {task['choices']}\n" in text
    assert f"  chance: {1 / task['choices']:g}\n" in text


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval")
def test_lm_eval_loads_the_family_offline(monkeypatch):
    from secateurs.evaluate.zeroshot import task_facts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("secateurs.data._hub.hub_reachable", lambda *a, **k: pytest.fail("probed the hub"))
    facts = task_facts(NAMES, limit=5)
    for task in FAMILY:
        got = facts[task["name"]]
        assert (got.choices, got.difficulty) == (task["choices"], task["difficulty"])
        assert got.chance == pytest.approx(1 / task["choices"]) and "declared" in got.note
    old = task_facts(["bible_next_sentence"])["bible_next_sentence"]  # no declared chance: 1/choices from the data
    assert (old.chance, old.choices, old.difficulty) == (0.25, 4, None) and "400 documents" in old.note


def test_licence_note_names_the_tasks():
    text = (ROOT / "secateurs" / "data" / "corpora" / "LICENSES.md").read_text()
    assert "bible_next_" in text and "public domain" in text.lower()


class FakeTask:
    """Just what facts_of reads of an lm-eval task."""

    def __init__(self, output_type, docs, metadata=None):
        self.OUTPUT_TYPE, self.eval_docs = output_type, docs
        self.config = type("Config", (), {"metadata": metadata or {}})()

    def doc_to_choice(self, doc):
        return doc["choices"]


def test_chance_of_tasks_without_declared_metadata():
    from secateurs.evaluate.zeroshot import facts_of

    mixed = FakeTask("multiple_choice", [{"choices": ["a", "b"]}, {"choices": ["a", "b", "c", "d"]}] * 3)
    facts = facts_of("mixed", mixed)
    assert facts.chance == pytest.approx((1 / 2 + 1 / 4) / 2) and facts.choices is None and facts.difficulty is None
    assert facts_of("mixed", mixed, limit=1).chance == 0.5 and facts_of("mixed", mixed, limit=1).choices == 2
    generative = facts_of("gen", FakeTask("generate_until", [{"choices": []}], {"difficulty": 3}))
    assert (generative.chance, generative.difficulty) == (0.0, 3.0) and "chance taken as 0" in generative.note
    assert facts_of("none", FakeTask("multiple_choice", [])).chance == 0.0
