"""``secateurs report DIR`` on a pruned tiny model, and the pages rendered by a real headless browser (chromium).

The browser check loads a copy of the page with a small script appended that records, after the load event, each
image's decoded size and the table rows into the DOM; ``--dump-dom`` reads that back. A screenshot must not be
blank. Skipped only when no chromium binary is installed (``.ci/run`` installs Debian's).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_main

FAST = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "3", "--quiet"]


@pytest.fixture(scope="module")
def pruned_owl(tiny_model_dir, text_file, tmp_path_factory):
    """A tiny LLaMA pruned with OWL-Wanda to 50%, saved with its report.json."""
    out = tmp_path_factory.mktemp("pruned") / "owl-wanda"
    args = ["prune", tiny_model_dir, "--method", "wanda", "--allocation", "owl", "--sparsity", "0.5"]
    code, _, stderr = run_main(*args, "--calibration", text_file, "--eval", text_file, *FAST, "--output", out)
    assert code == 0, stderr
    return out


@pytest.fixture(scope="module")
def small_sweep(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "small"
    code, _, stderr = run_main(
        "sweep", tiny_model_dir, "--methods", "wanda", "--sparsities", "0.5,0.7", "--allocations", "uniform,owl",
        "--calibration", text_file, "--eval", text_file, *FAST, "--output", out,
    )  # fmt: skip
    assert code == 0, stderr
    return out


# ------------------------------------------------------------------------------------------ secateurs report
def test_report_on_a_pruned_folder(pruned_owl):
    code, stdout, stderr = run_main("report", pruned_owl, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    page_path = pruned_owl / "report.html"
    assert summary["kind"] == "folder" and Path(summary["html"]) == page_path
    report = json.loads((pruned_owl / "report.json").read_text())
    (row,) = summary["rows"]
    assert row["perplexity"] == report["perplexity"]["pruned"]["perplexity"]
    assert row["sparsity"] == report["sparsity"] and row["series"] == "wanda + owl"
    page = page_path.read_text()
    assert page.count('<img src="data:image/png;base64,') == 2  # per-layer allocation and error views
    assert 'id="fig-alloc"' in page and 'id="fig-error"' in page and 'id="layers-table"' in page
    assert page.count("<tr><td class=l>model.layers.") == 3
    for layer in report["layers"]:  # every layer's outlier ratio and target sparsity is in the per-layer table
        assert f"{layer['outlier_ratio']:.3%}" in page and f"{layer['sparsity_target']:.1%}" in page
    assert "perplexity" in page and report["perplexity"]["pruned"]["protocol"] in html.unescape(page)
    assert 'id="fig-perplexity"' not in page  # one cell: no curve to draw


def test_report_output_option_and_bad_folders(pruned_owl, tmp_path):
    target = tmp_path / "pages" / "one.html"
    code, _, stderr = run_main("report", pruned_owl, "--output", target, "--quiet")
    assert code == 0, stderr
    assert target.read_text().rstrip().endswith("</html>")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, message in [(tmp_path / "missing", "is not a folder"), (empty, "holds no report.json")]:
        code, stdout, stderr = run_main("report", folder)
        assert code == 2 and stdout == "" and message in stderr, stderr
    (empty / "report.json").write_text('{"recipe": ')
    code, _, stderr = run_main("report", empty)
    assert code == 2 and "cannot read" in stderr
    assert not (empty / "report.html").exists()


def test_report_without_outliers_or_perplexity(tiny_model_dir, tmp_path):
    out = tmp_path / "magnitude"
    args = ["prune", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.6", "--eval", "none"]
    code, _, stderr = run_main(*args, "--quiet", "--output", out)
    assert code == 0, stderr
    code, _, stderr = run_main("report", out, "--quiet")
    assert code == 0, stderr
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 1  # sparsity per layer; magnitude has no error
    assert 'id="fig-error"' not in page and "–" in page


def test_report_rebuilds_a_sweep_folder(small_sweep):
    (small_sweep / "report.html").unlink()
    (small_sweep / "results.csv").unlink()
    code, stdout, stderr = run_main("report", small_sweep, "--knee-tolerance", "0.5", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["kind"] == "sweep" and summary["summary"]["knee_tolerance"] == 0.5
    assert (small_sweep / "results.csv").is_file()
    assert "dense + 50%" in (small_sweep / "report.html").read_text()


# ------------------------------------------------------------------------------------------ headless browser
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((path for name in BROWSERS if (path := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")

PROBE = """<script>
addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify({
    images: Array.from(document.images).map(i => [i.id || i.parentElement.id, i.complete, i.naturalWidth,
                                                  i.naturalHeight, i.getBoundingClientRect().width]),
    rows: document.querySelectorAll("table tbody tr").length,
    headings: Array.from(document.querySelectorAll("h1, h2")).map(h => h.textContent),
    height: document.documentElement.scrollHeight,
  });
  document.body.appendChild(out);
});
</script>"""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


def render(page: Path, tmp_path: Path) -> tuple[dict, Path]:
    """Load ``page`` in headless chromium: (what the probe saw after the load event, a screenshot)."""
    probe = tmp_path / f"probe-{page.stem}.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    done = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="render-check">(.*?)</pre>', done.stdout, re.S)
    assert found, (done.returncode, done.stderr[-2000:])
    shot = tmp_path / f"{page.stem}.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
    assert shot.is_file()
    return json.loads(html.unescape(found.group(1))), shot


def assert_not_blank(shot: Path) -> None:
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2400)
    pixels = list(image.getdata())
    inked = sum(p < 200 for p in pixels) / len(pixels)
    assert inked > 0.01, f"only {inked:.2%} of the screenshot is drawn"
    assert len(set(pixels)) > 50  # text, plots and shading, not a flat colour


@needs_chromium
def test_sweep_page_renders_in_chromium(small_sweep, tmp_path):
    seen, shot = render(small_sweep / "report.html", tmp_path)
    assert len(seen["images"]) == 3
    for ident, complete, width, height, shown in seen["images"]:
        assert complete and width > 300 and height > 150 and shown > 300, (ident, width, height, shown)
    assert seen["rows"] == 5  # the dense model and 4 cells
    assert seen["headings"][0].startswith("secateurs sweep:")
    assert {"Perplexity vs sparsity", "Results", "Per layer", "Protocol"} <= set(seen["headings"])
    assert seen["height"] > 1500
    assert_not_blank(shot)


@needs_chromium
def test_folder_page_renders_in_chromium(pruned_owl, tmp_path):
    assert run_main("report", pruned_owl, "--quiet")[0] == 0
    seen, shot = render(pruned_owl / "report.html", tmp_path)
    assert len(seen["images"]) == 2
    assert all(complete and width > 300 and height > 150 for _, complete, width, height, _ in seen["images"])
    assert seen["rows"] == 2 + 3  # dense and pruned rows, then the three layers
    assert seen["headings"][0] == "secateurs report: owl-wanda"
    assert_not_blank(shot)


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.update(layers="not a list"),
        lambda r: r.update(recipe=["wanda"]),
        lambda r: r.update(perplexity=7),
        lambda r: r["layers"][0].update(sparsity_target="half"),
    ],
    ids=["layers", "recipe", "perplexity", "layer field"],
)
def test_report_json_with_wrong_types_is_one_error_line(pruned_owl, tmp_path, edit):
    folder = tmp_path / "copy"
    shutil.copytree(pruned_owl, folder)
    report = json.loads((folder / "report.json").read_text())
    edit(report)
    (folder / "report.json").write_text(json.dumps(report))
    code, _, stderr = run_main("report", folder)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("secateurs: error: "), stderr
