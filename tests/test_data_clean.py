"""`lmforge data clean` on tinyshakespeare with injected duplicates, near duplicates, HTML and junk."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.clean import CleanOptions, clean_documents
from lmforge.data.quality import QUALITY_RULES
from lmforge.data.text_cleaning import strip_html

SHAKESPEARE = Path(os.environ.get("LMFORGE_SHAKESPEARE",
                                  Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
pytestmark = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared/data/tinyshakespeare.txt not present")
NO_QUALITY = frozenset(QUALITY_RULES)


def shakespeare_docs(n: int, paragraphs: int = 4) -> list[str]:
    """The first `n` documents of `paragraphs` speeches each."""
    paras = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    docs = ["\n\n".join(paras[i:i + paragraphs]) for i in range(0, len(paras), paragraphs)]
    assert len(docs) >= n
    return docs[:n]


def as_html(doc: str) -> str:
    body = "".join(f"<p>{p.replace('&', '&amp;')}</p>\n" for p in doc.split("\n\n"))
    return (f"<!DOCTYPE html><html><head><title>menu</title><style>p {{color: red}}</style></head><body>"
            f"<nav>Home | About</nav>{body}<script>track('visit');</script></body></html>")


def near_copy(doc: str) -> str:
    words = doc.split(" ")
    words[len(words) // 2] = "indeed"
    return " ".join(words) + " anon"


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """80 unique documents (10 of them as HTML pages), then 10 exact copies (5 with other case and spacing) and 10
    near copies (one word changed, one added: Jaccard similarity 0.9 or more) of earlier ones of 100+ words."""
    docs = shakespeare_docs(80)
    docs[60:70] = [as_html(d) for d in docs[60:70]]
    exact = [d if i % 2 else "  " + d.upper().replace(" ", "   ") for i, d in enumerate(docs[:10])]
    near = [near_copy(d) for d in docs[10:60] if len(d.split()) >= 100][:10]
    return write_jsonl(tmp_path_factory.mktemp("clean") / "web.jsonl", docs + exact + near), docs


def read_texts(out: Path) -> list[str]:
    return [json.loads(line)["text"] for line in (out / "clean.jsonl").read_text(encoding="utf-8").splitlines()]


def test_duplicates_and_html_removed_deterministically_on_both_cores(corpus, tmp_path: Path) -> None:
    path, docs = corpus
    one = clean_documents([path], tmp_path / "one", CleanOptions(disabled=NO_QUALITY, workers=1, chunk_docs=16),
                          progress=False)
    assert one["removed"]["exact_duplicates"]["documents"] == 10
    assert one["removed"]["near_duplicates"]["documents"] == 10
    assert one["kept_documents"] == 80 and one["modified"]["html"] == 10
    assert len(one["removed"]["near_duplicates"]["examples"]) == 3
    kept = read_texts(tmp_path / "one")
    assert kept[:60] == docs[:60]
    for page, text in zip(docs[60:70], kept[60:70], strict=True):
        assert "<" not in text and "track(" not in text and "color: red" not in text and "menu" not in text
        assert text.startswith("Home | About")
        assert all(speech in text for speech in shakespeare_docs(70)[docs.index(page)].split("\n\n"))
    two = clean_documents([path], tmp_path / "two", CleanOptions(disabled=NO_QUALITY, workers=2, chunk_docs=16),
                          progress=False)
    assert (tmp_path / "two" / "clean.jsonl").read_bytes() == (tmp_path / "one" / "clean.jsonl").read_bytes()
    assert two == one


def test_quality_rules_name_what_they_remove_and_each_switches_off(tmp_path: Path, capsys) -> None:
    docs = shakespeare_docs(6)
    junk = {
        "words": "The king and the queen of it.",
        "symbols": " ".join(["#tag #more words here and there..."] * 10),
        "duplicate_lines": "\n".join(["Buy now and save with the best offers of the year."] * 8 + docs[:1]),
        "alpha_words": " ".join(["1234 5678 9012 3456 7890 the and of to with"] * 8),
    }
    path = write_jsonl(tmp_path / "in.jsonl", docs[1:] + list(junk.values()))
    assert main(["data", "clean", str(path), "--out", str(tmp_path / "out"), "--min-words", "10", "--workers",
                 "1"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    printed = capsys.readouterr().out
    for rule, text in junk.items():
        assert summary["removed"][rule]["documents"] == 1, rule
        assert summary["removed"][rule]["examples"][0][:30] == " ".join(text.split())[:30]
        assert f"{rule} " in printed
    assert summary["kept_documents"] == 5
    assert main(["data", "clean", str(path), "--out", str(tmp_path / "out"), "--min-words", "10", "--workers", "1",
                 "--disable", *junk]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert not set(junk) & set(summary["removed"])  # later rules may still take them; the short one passes all
    assert summary["kept_documents"] == 6 and junk["words"] in read_texts(tmp_path / "out")


def test_unicode_is_normalised_to_nfkc_before_deduplication(tmp_path: Path) -> None:
    doc = shakespeare_docs(1)[0]
    wide = doc.replace("First", "Ｆｉｒｓｔ").replace("fi", "\ufb01").replace(" ", "\u00a0", 5)
    path = write_jsonl(tmp_path / "in.jsonl", [doc, wide])
    summary = clean_documents([path], tmp_path / "out", CleanOptions(disabled=NO_QUALITY, workers=1), progress=False)
    assert summary["removed"]["exact_duplicates"]["documents"] == 1 and summary["modified"]["unicode"] == 1
    off = clean_documents([path], tmp_path / "off", CleanOptions(disabled=NO_QUALITY | {"unicode"}, workers=1),
                          progress=False)
    assert off["kept_documents"] == 2  # near duplicates stay too: NFKC-folded letters change the words
    assert off["removed"] == {} or "exact_duplicates" not in off["removed"]


def test_strip_html_leaves_prose_with_angle_brackets_alone() -> None:
    assert strip_html("if a < b and c > d then") == "if a < b and c > d then"
    assert strip_html("<div>one</div><div>two &lt;3</div>") == "one\n\ntwo <3"


def test_peak_memory_stays_bounded_at_ten_times_the_input(tmp_path: Path) -> None:
    """Peak traced memory grows by under 15% of the added input bytes at 10x the input: text is held a chunk at a
    time; what grows is the duplicate index, 17 keys x 8 bytes per kept document (~7% of these 2 kB documents)."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    docs = [text[i:i + 2000] for i in range(0, 200 * 2000, 2000)]
    small = write_jsonl(tmp_path / "small.jsonl", docs[:20])
    large = write_jsonl(tmp_path / "large.jsonl", docs)
    options = CleanOptions(disabled=NO_QUALITY, workers=1, chunk_docs=8)
    peaks = []
    for i, path in enumerate((small, large)):
        tracemalloc.start()
        clean_documents([path], tmp_path / f"out{i}", options, progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    added = large.stat().st_size - small.stat().st_size
    assert peaks[1] - peaks[0] < 0.15 * added, (peaks, added)


def test_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["data", "clean", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "input file not found" in capsys.readouterr().err
    path = write_jsonl(tmp_path / "in.jsonl", ["text"])
    assert main(["data", "clean", str(path), "--out", str(tmp_path / "o"), "--disable", "colour"]) == 2
    err = capsys.readouterr().err
    assert "colour" in err and err.count("\n") == 1
    assert main(["data", "clean", str(path), "--out", str(tmp_path / "o"), "--min-words", "9", "--max-words",
                 "3"]) == 2
    assert "--max-words 3" in capsys.readouterr().err


def test_a_failed_run_leaves_the_earlier_output_whole(tmp_path: Path, capsys) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", shakespeare_docs(3))
    out = tmp_path / "out"
    assert main(["data", "clean", str(good), "--out", str(out), "--min-words", "5", "--workers", "1"]) == 0
    before = (out / "clean.jsonl").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + "{not json\n" + good.read_text())
    assert main(["data", "clean", str(bad), "--out", str(out), "--workers", "1"]) == 2
    assert f"{bad}:4: invalid JSON" in capsys.readouterr().err
    assert (out / "clean.jsonl").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.jsonl", "good.jsonl", "out"]
    (out / "notes.txt").write_text("mine")
    assert main(["data", "clean", str(good), "--out", str(out)]) == 2
    assert "did not write" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
