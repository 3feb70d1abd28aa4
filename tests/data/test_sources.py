"""Text sources (secateurs.data.sources): bundled corpora, local files, hub datasets, fast and offline."""

from __future__ import annotations

import gzip
import importlib.resources
import json
import lzma
import os
import subprocess
import sys
import textwrap
import time
import types

import pytest
from test_windows import byte_tokenizer, write

from secateurs import data
from secateurs.data import _hub
from secateurs.errors import SecateursError


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# ------------------------------------------------------------------------------------------ bundled corpora
@pytest.mark.parametrize("name", ["shakespeare", "bible"])
def test_bundled_corpus_is_packaged_and_nontrivial(name):
    assert name in data.BUNDLED and data.BUNDLED[name]
    resource = importlib.resources.files("secateurs.data").joinpath("corpora", f"{name}.txt.xz")
    assert resource.is_file()
    text = data.read_text(name)
    assert text == lzma.decompress(resource.read_bytes()).decode("utf-8")
    assert len(text) > 600_000
    assert len(text.split()) > 100_000
    assert "gutenberg" not in text.lower()
    assert "<" not in text and "\x00" not in text and "\r" not in text
    assert data.describe_source(name) == f"bundled:{name}"
    assert data.read_text(name.upper()) == text  # names are case-insensitive
    assert data.read_text(f"bundled:{name}", split="test") == text  # split is ignored for bundled text


def test_bundled_corpora_content():
    shakespeare = data.read_text("shakespeare")
    assert shakespeare.startswith("HAMLET, PRINCE OF DENMARK")
    assert "To be, or not to be" in shakespeare
    bible = data.read_text("bible")
    assert bible.startswith("The First Book of Moses, Commonly Called Genesis\n\nIn the beginning, God created")
    assert "Acts of the Apostles" in bible
    # verse numbers and footnotes are gone, words around a removed footnote are not glued together
    assert "1:1" not in bible and "Elohim" not in bible
    assert "the Lord will have them" not in bible  # Psalms are not shipped
    # licence / attribution ships with the data
    licenses = importlib.resources.files("secateurs.data").joinpath("corpora", "LICENSES.md").read_text()
    assert "CC BY 2.5" in licenses and "Open Knowledge Foundation" in licenses and "Public Domain" in licenses
    # calibration and evaluation texts are held apart
    assert shakespeare[:5000] not in bible and bible[:5000] not in shakespeare


# ------------------------------------------------------------------------------------------ local files
def test_txt_and_compressed_txt(tmp_path):
    text = "Hello there.\nSecond line, “quoted”.\n"
    plain = write(tmp_path / "a.txt", text)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(text.encode()))
    for path in (plain, tmp_path / "a.txt.gz", tmp_path / "a.txt.xz"):
        assert data.read_text(str(path)) == text
    description = data.describe_source(str(plain))
    assert description.startswith(f"file:{plain.resolve()} (sha256 ")
    assert len(description.split("sha256 ")[1].rstrip(")")) == 12


def test_jsonl_reading(tmp_path):
    lines = [json.dumps({"text": "first document", "id": 1}), "", json.dumps({"text": "second"})]
    path = write(tmp_path / "docs.jsonl", "\n".join(lines) + "\n")
    assert data.read_text(str(path)) == "first document\n\nsecond"


@pytest.mark.parametrize(
    "lines, pattern",
    [
        (['{"text": "ok"}', '{"text": broken'], r"docs\.jsonl line 2: malformed JSON"),
        (
            ['{"text": "ok"}', "", '{"body": "no text"}'],
            r'line 3: JSON object has no "text" field \(keys: body\)',
        ),
        (['{"text": 5}'], r'line 1: "text" field is int'),
        (['["a list"]'], r"line 1: expected a JSON object"),
    ],
)
def test_malformed_jsonl(tmp_path, lines, pattern):
    path = write(tmp_path / "docs.jsonl", "\n".join(lines))
    with pytest.raises(SecateursError, match=pattern):
        data.read_text(str(path))


def test_json_reading(tmp_path):
    as_strings = write(tmp_path / "s.json", json.dumps(["one", "two"]))
    as_objects = write(tmp_path / "o.json", json.dumps([{"text": "one"}, {"text": "two"}]))
    as_object = write(tmp_path / "x.json", json.dumps({"text": "one\n\ntwo"}))
    for path in (as_strings, as_objects, as_object):
        assert data.read_text(str(path)) == "one\n\ntwo"
    with pytest.raises(SecateursError, match="malformed JSON"):
        data.read_text(str(write(tmp_path / "bad.json", "{")))


def test_file_errors(tmp_path):
    with pytest.raises(SecateursError, match="text file not found: .*missing.txt"):
        data.read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(SecateursError, match=r"unsupported text file extension \.csv"):
        data.read_text(str(write(tmp_path / "table.csv", "a,b\n")))
    with pytest.raises(SecateursError, match="is empty"):
        data.read_text(str(write(tmp_path / "empty.txt", " \n\n ")))
    with pytest.raises(SecateursError, match="is a directory"):
        data.read_text(str(tmp_path))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SecateursError, match="not valid UTF-8"):
        data.read_text(str(tmp_path / "latin1.txt"))
    with pytest.raises(SecateursError, match="is empty"):
        data.read_text(str(write(tmp_path / "empty.jsonl", "\n")))


def test_unknown_source_lists_the_choices():
    with pytest.raises(SecateursError) as info:
        data.read_text("no-such-corpus")
    message = str(info.value)
    assert "\n" not in message
    assert "shakespeare, bible" in message and "wikitext2, c4" in message


# ------------------------------------------------------------------------------------------ hub sources
OFFLINE_HINT = "for offline use give a local .txt/.jsonl file or a bundled corpus: shakespeare, bible"


def test_hub_without_datasets_fails_fast(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    start = time.perf_counter()
    for call in (
        lambda: data.read_text("wikitext2", "test"),
        lambda: data.evaluation_tokens("wikitext2", tok),
        lambda: data.calibration_windows("c4", tok, nsamples=4, seqlen=32),
    ):
        with pytest.raises(SecateursError) as info:
            call()
        message = str(info.value)
        assert "pip install datasets" in message and OFFLINE_HINT in message and "\n" not in message
    assert time.perf_counter() - start < 2


def test_hub_unreachable_uses_cache_only_and_converts_errors(monkeypatch, tok):
    calls = []
    config = types.SimpleNamespace(HF_HUB_OFFLINE=False)

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs, config.HF_HUB_OFFLINE))
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    fake = types.SimpleNamespace(load_dataset=load_dataset, config=config)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(_hub, "hub_reachable", lambda timeout=0: "huggingface.co:443 is not reachable (test)")
    with pytest.raises(SecateursError, match="not reachable .* not in the local cache") as info:
        data.evaluation_tokens("wikitext2", tok)
    assert OFFLINE_HINT in str(info.value)
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"}, True)]  # forced offline mode
    assert config.HF_HUB_OFFLINE is False  # restored afterwards


def test_hub_reachable_loads_wikitext_with_the_paper_protocol(monkeypatch, tok):
    rows = ["", " = Title = ", "", " Some text . ", ""]

    class Rows(dict):
        column_names = ["text"]

    def load_dataset(path, name=None, split=None, data_files=None):
        assert (path, name, split) == ("wikitext", "wikitext-2-raw-v1", "test")
        return Rows(text=rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(_hub, "hub_reachable", lambda timeout=0: None)
    monkeypatch.setattr(_hub, "_env_offline", lambda: False)
    ids = data.evaluation_tokens("wikitext2", tok, split="test")
    assert bytes(ids.tolist()).decode() == "\n\n".join(rows)
    assert data.describe_source("wikitext2", split="test") == "hub:wikitext-2-raw-v1/test"
    assert data.describe_source("c4", split="train") == "hub:allenai/c4/en/c4-train.00000-of-01024.json.gz"


def test_hub_split_is_validated():
    with pytest.raises(SecateursError, match="no split 'dev2'"):
        data.read_text("wikitext2", split="dev2")
    with pytest.raises(SecateursError, match="source 'c4' has no split"):
        data.read_text("c4", split="holdout")


def test_real_offline_hub_path_fails_within_seconds(tmp_path):
    """With the real `datasets` package and no network, a hub source errors quickly and clearly."""
    pytest.importorskip("datasets")
    if _hub.hub_reachable(timeout=2.0) is None:
        pytest.skip("the Hugging Face hub is reachable from here; this checks the offline path")
    script = textwrap.dedent(
        """
        import time
        from secateurs import data
        from secateurs.errors import SecateursError
        start = time.perf_counter()
        try:
            data.read_text("wikitext2", "test")
        except SecateursError as exc:
            print("ERROR", round(time.perf_counter() - start, 1), exc)
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(var, None)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - start
    assert "ERROR" in result.stdout, result.stderr[-2000:]
    assert "needs the Hugging Face hub" in result.stdout and OFFLINE_HINT in result.stdout
    assert elapsed < 30
