"""Data pipeline: readers, shard preparation, packed batches."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cli_checks import error_line, snapshot
from lmforge.cli import main
from lmforge.data import shards
from lmforge.data.batches import PackedBatches
from lmforge.data.readers import read_documents
from lmforge.data.shards import load_shards, prepare_shards, split_scores
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import Tokenizer, train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls sing softly at night".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(make_docs(200) + ["Ünïcödé ☃ text\n"], vocab_size=400, show_progress=False)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    return write_lines(path, [json.dumps({field: t}) for t in texts])


def row(text: str) -> str:
    return json.dumps({"text": text})


def split_docs(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    """Decode a token file back into its documents (EOS-terminated)."""
    ids = tokens.tolist()
    assert not ids or ids[-1] == tok.eos_id
    docs, cur = [], []
    for t in ids:
        if t == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


# -- readers -------------------------------------------------------------------------------------
def test_read_txt_jsonl_parquet(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("line one\nline two\n", encoding="utf-8")
    write_lines(tmp_path / "b.jsonl", [row("first"), "", "  ", row("second ☃")])
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"], "id": [1, 2, 3]}), tmp_path / "c.parquet")
    stream = read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl", str(tmp_path / "c.parquet")])
    assert list(stream) == ["line one\nline two\n", "first", "second ☃", "p1", "p2", "p3"]
    assert (stream.documents, stream.skipped) == (6, 0)
    assert list(stream) == list(stream)  # re-iterable


def test_parquet_read_in_batches(tmp_path: Path) -> None:
    texts = [f"row {i}" for i in range(3000)]
    pq.write_table(pa.table({"body": texts}), tmp_path / "big.parquet", row_group_size=500)
    assert list(read_documents([tmp_path / "big.parquet"], text_field="body")) == texts


def test_custom_text_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["x", "y"], field="content")
    assert list(read_documents([path], text_field="content")) == ["x", "y"]
    with pytest.raises(DataError, match="missing field 'text'"):
        list(read_documents([path]))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"other": "x"}', "missing field 'text'"),
        ('{"text": 5}', "field 'text' is int"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [row("ok"), "", line, row("also ok")])
    with pytest.raises(DataError) as err:
        list(read_documents([path]))
    message = str(err.value)
    assert f"{path}:3:" in message and problem in message and "--skip-bad-lines" in message


def test_skip_bad_lines_counts(tmp_path: Path) -> None:
    lines = [row("a"), "{oops", row("b"), "[1]", '{"text": null}', row("c")]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    stream = read_documents([path], skip_bad_lines=True)
    assert list(stream) == ["a", "b", "c"]
    assert (stream.documents, stream.skipped) == (3, 3)


def test_missing_file_and_bad_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="input file not found: .*nope.jsonl"):
        read_documents([tmp_path / "nope.jsonl"])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported .*'\.csv'.*\.txt, \.jsonl, \.parquet"):
        read_documents([tmp_path / "data.csv"])


def test_parquet_missing_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text'; the columns are: body, id"):
        list(read_documents([tmp_path / "t.parquet"]))


# -- prepare_shards ------------------------------------------------------------------------------
def test_prepare_roundtrip(tmp_path: Path, tok: Tokenizer) -> None:
    docs = make_docs(300, seed=1) + ["Ünïcödé ☃ text\n"]
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out"
    index = prepare_shards([src], tok, out, val_fraction=0.1, seed=3, batch_docs=64, progress=False)
    assert index == load_shards(out)
    train, val = index.tokens("train"), index.tokens("val")
    assert isinstance(train, np.memmap) and not train.flags.writeable
    expected_total = sum(len(tok.encode(d)) + 1 for d in docs)
    assert len(train) + len(val) == expected_total == sum(index.num_tokens.values())
    got_train, got_val = split_docs(train, tok), split_docs(val, tok)
    assert sorted(got_train + got_val) == sorted(docs)
    assert index.num_documents == {"train": len(got_train), "val": len(got_val)}
    assert 10 <= len(got_val) <= 60  # ~10% of 301
    assert index.eos_id == tok.eos_id and index.vocab_size == tok.vocab_size and index.skipped_lines == 0
    assert Tokenizer.from_file(out).vocab_size == tok.vocab_size
    assert not list(out.glob(".*tmp"))


def test_split_deterministic_per_seed(tmp_path: Path, tok: Tokenizer) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(200))

    def val_docs(seed: int, name: str, batch_docs: int = 1024) -> list[str]:
        out = tmp_path / name
        index = prepare_shards(
            [src], tok, out, val_fraction=0.2, seed=seed, batch_docs=batch_docs, progress=False
        )
        return split_docs(index.tokens("val"), tok)

    assert val_docs(0, "a") == val_docs(0, "b")
    assert val_docs(0, "a") == val_docs(0, "d", batch_docs=7)  # chunking does not change the split
    assert set(val_docs(0, "a")) != set(val_docs(1, "c"))
    assert (tmp_path / "a/val.bin").read_bytes() == (tmp_path / "b/val.bin").read_bytes()


def test_split_scores_uniform() -> None:
    scores = split_scores(7, np.arange(20000))
    assert 0.0 <= scores.min() and scores.max() < 1.0
    assert abs((scores < 0.1).mean() - 0.1) < 0.01
    assert not np.array_equal(scores, split_scores(8, np.arange(20000)))


@pytest.mark.parametrize("n_docs", [2, 3])
def test_split_never_needlessly_empty(tmp_path: Path, tok: Tokenizer, n_docs: int) -> None:
    docs = make_docs(n_docs)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    for seed in range(6):
        for frac in (0.001, 0.9):
            index = prepare_shards([src], tok, tmp_path / "o", val_fraction=frac, seed=seed, progress=False)
            n = index.num_documents
            assert n["train"] >= 1 and sum(n.values()) == n_docs
            assert n["val"] >= (1 if n_docs >= 2 else 0)
            got_val = split_docs(index.tokens("val"), tok)
            got = split_docs(index.tokens("train"), tok) + got_val
            assert sorted(got) == sorted(docs)
            scores = split_scores(seed, np.arange(n_docs))
            if n_docs >= 2 and scores.min() >= frac:  # none fell in val: the most val-like doc moved there
                assert got_val == [docs[scores.argmin()]]
            if scores.max() < frac:  # all fell in val: the most train-like doc moved to train
                assert docs[scores.argmax()] not in got_val


def test_single_document_holds_out_its_tail(tmp_path: Path, tok: Tokenizer) -> None:
    """One document (e.g. a single .txt file): validation is the last val_fraction of its tokens."""
    doc = " ".join(make_docs(40))
    src = tmp_path / "one.txt"
    src.write_text(doc)
    index = prepare_shards([src], tok, tmp_path / "o", val_fraction=0.1, progress=False)
    train, val = index.tokens("train").tolist(), index.tokens("val").tolist()
    assert train + val == tok.encode(doc) + [tok.eos_id]
    assert abs(len(val) - 0.1 * len(train + val)) <= 1
    alone = prepare_shards([src], tok, tmp_path / "o0", val_fraction=0.0, progress=False)
    assert alone.num_tokens == {"train": len(train + val), "val": 0}


def test_val_fraction_zero_and_dtype(tmp_path: Path, tok: Tokenizer) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(50))
    index = prepare_shards([src], tok, tmp_path / "o", val_fraction=0.0, progress=False)
    assert index.num_documents == {"train": 50, "val": 0}
    assert index.dtype == "uint16" and index.tokens("train").dtype == np.uint16
    assert len(index.tokens("val")) == 0


def test_skip_bad_lines_recorded(tmp_path: Path, tok: Tokenizer) -> None:
    src = write_lines(tmp_path / "in.jsonl", [row("good one"), "{bad", row("good two")])
    with pytest.raises(DataError, match=r"in\.jsonl:2:"):
        prepare_shards([src], tok, tmp_path / "o", progress=False)
    index = prepare_shards([src], tok, tmp_path / "o", skip_bad_lines=True, progress=False)
    assert index.skipped_lines == 1 and sum(index.num_documents.values()) == 2


def test_empty_corpus(tmp_path: Path, tok: Tokenizer) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no documents in .*empty.jsonl"):
        prepare_shards([tmp_path / "empty.jsonl"], tok, tmp_path / "o", progress=False)
    src = write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    with pytest.raises(DataError, match="no text in .*blank.jsonl: all 2 documents are empty"):
        prepare_shards([src], tok, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_load_shards_errors(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(DataError, match="index.json.*lmforge data prepare"):
        load_shards(tmp_path / "nothing")
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(20))
    prepare_shards([src], tok, tmp_path / "o", progress=False)
    (tmp_path / "o/train.bin").unlink()
    index = load_shards(tmp_path / "o")
    with pytest.raises(DataError, match="train.bin.*lmforge data prepare"):
        index.tokens("train")


def prepare_cli(src: Path, tokenizer: Path, out: Path, *extra: str) -> int:
    return main(["data", "prepare", "--input", str(src), "--tokenizer", str(tokenizer), "--out", str(out), *extra])


@pytest.fixture
def prepared(tmp_path: Path, tok: Tokenizer) -> tuple[Path, Path]:
    """(tokenizer dir, a prepared dataset dir) under tmp_path."""
    tok.save(tmp_path / "tok")
    assert prepare_cli(write_jsonl(tmp_path / "good.jsonl", make_docs(40)), tmp_path / "tok", tmp_path / "data") == 0
    return tmp_path / "tok", tmp_path / "data"


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("bad.txt", b"caf\xe9 au lait", "bad.txt: not UTF-8 text (line 1, byte 3)"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": \n', "bad.jsonl:2: invalid JSON"),
])
def test_failed_prepare_keeps_the_existing_dataset(tmp_path: Path, prepared: tuple[Path, Path], name: str,
                                                   content: bytes, problem: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    tok_dir, out = prepared
    before, entries = snapshot(out), sorted(tmp_path.iterdir())
    (tmp_path / name).write_bytes(content)
    capsys.readouterr()
    assert prepare_cli(tmp_path / name, tok_dir, out) == 2
    assert problem in error_line(capsys.readouterr().err)
    assert snapshot(out) == before  # the dataset is whole, and no temporary dir is left beside it
    assert sorted(tmp_path.iterdir()) == sorted([*entries, tmp_path / name])
    # a later good run replaces it whole
    assert prepare_cli(write_jsonl(tmp_path / "other.jsonl", make_docs(10, seed=5)), tok_dir, out) == 0
    assert load_shards(out).num_documents["train"] + load_shards(out).num_documents["val"] == 10
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "tokenizer.json", "train.bin", "val.bin"]


def test_prepare_refuses_an_out_dir_it_did_not_write(tmp_path: Path, prepared: tuple[Path, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    tok_dir, _ = prepared
    # a dir holding other files; an existing file; a path under a file
    for out in (tmp_path / "mine", tmp_path / "good.jsonl", tmp_path / "good.jsonl" / "sub"):
        if out.name == "mine":
            out.mkdir()
            (out / "notes.txt").write_text("keep me")
        before = snapshot(tmp_path)
        capsys.readouterr()
        assert prepare_cli(tmp_path / "good.jsonl", tok_dir, out) == 2
        assert str(out) in error_line(capsys.readouterr().err)
        assert snapshot(tmp_path) == before


def test_prepare_into_a_symlinked_out_dir_keeps_the_link(tmp_path: Path, prepared: tuple[Path, Path]) -> None:
    tok_dir, data = prepared
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    assert prepare_cli(write_jsonl(tmp_path / "few.jsonl", make_docs(6, seed=9)), tok_dir, tmp_path / "link") == 0
    assert (tmp_path / "link").is_symlink() and sum(load_shards(data).num_documents.values()) == 6


@pytest.mark.parametrize("fraction", ["1.5", "-0.1", "1.0", "nan"])
def test_cli_val_fraction_out_of_range(tmp_path: Path, prepared: tuple[Path, Path], fraction: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    tok_dir, _ = prepared
    capsys.readouterr()
    assert prepare_cli(tmp_path / "good.jsonl", tok_dir, tmp_path / "o", "--val-fraction", fraction) == 2
    message = error_line(capsys.readouterr().err)
    assert "--val-fraction" in message and fraction in message
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError):
        prepare_shards([tmp_path / "good.jsonl"], Tokenizer.from_file(tok_dir), tmp_path / "o",
                       val_fraction=float(fraction), progress=False)


@pytest.mark.parametrize("content", [b"not json", b'{"version": "1.0"}', b"\xff\xfe\x00", b""])
def test_cli_prepare_with_a_garbage_tokenizer(tmp_path: Path, content: bytes,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "tokenizer.json"
    garbage.write_bytes(content)
    assert prepare_cli(write_jsonl(tmp_path / "in.jsonl", make_docs(5)), garbage, tmp_path / "o") == 2
    message = error_line(capsys.readouterr().err)
    assert str(garbage) in message and "lmforge tokenizer train" in message
    assert not (tmp_path / "o").exists()


def test_cli_prepare_disk_full(tmp_path: Path, prepared: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC while the token files are written: one line naming --out and the bytes needed; the old dataset stays
    and the partial output is removed."""
    tok_dir, out = prepared
    before, entries = snapshot(out), sorted(tmp_path.iterdir())
    written = []

    def fill_the_disk(self: shards._SplitWriter, split: str, doc: np.ndarray) -> None:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(doc)
        self.files[split].write(doc.tobytes())

    monkeypatch.setattr(shards._SplitWriter, "_write", fill_the_disk)
    capsys.readouterr()
    assert prepare_cli(tmp_path / "good.jsonl", tok_dir, out) == 2
    message = error_line(capsys.readouterr().err)
    assert str(out) in message and "no space left" in message and "bytes" in message
    assert snapshot(out) == before
    assert sorted(tmp_path.iterdir()) == entries


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="shared/data/tinyshakespeare.txt not present")
def test_prepare_tinyshakespeare(tmp_path: Path) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = train_tokenizer([text[:100_000]], vocab_size=400, show_progress=False)
    index = prepare_shards([SHAKESPEARE], tok, tmp_path / "o", progress=False)
    n_tokens = len(tok.encode(text)) + 1
    # one .txt file is one document: its last 1% of tokens is the validation split
    assert sum(index.num_tokens.values()) == n_tokens
    assert index.num_tokens["val"] == n_tokens - round(n_tokens * 0.99)
    train, val = index.tokens("train"), index.tokens("val")
    assert val[-1] == tok.eos_id
    assert tok.decode(train[:200].tolist()) == tok.decode(tok.encode(text)[:200])


# -- PackedBatches -------------------------------------------------------------------------------
def test_batches_shift_and_shape() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    pb = PackedBatches(tokens, seq_len=9, batch_size=4, seed=0)
    b = pb.batch(3)
    assert b["input_ids"].shape == b["labels"].shape == (4, 9)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.int64
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
    assert torch.equal(b["labels"][:, -1], b["input_ids"][:, -1] + 1)  # tokens are consecutive
    assert (b["input_ids"][:, 0] % 10 == 0).all()  # windows start on multiples of seq_len + 1


def test_batches_pure_function_of_index() -> None:
    tokens = np.random.default_rng(0).integers(0, 400, size=5000).astype(np.uint16)
    a = PackedBatches(tokens, seq_len=16, batch_size=7, seed=5)
    forward = [a.batch(i)["input_ids"] for i in range(40)]
    b = PackedBatches(tokens, seq_len=16, batch_size=7, seed=5)
    for i in reversed(range(40)):
        assert torch.equal(b.batch(i)["input_ids"], forward[i])
    it = iter(PackedBatches(tokens, seq_len=16, batch_size=7, seed=5))
    assert all(torch.equal(next(it)["input_ids"], forward[i]) for i in range(5))


def test_every_window_once_per_epoch() -> None:
    pb = PackedBatches(np.arange(10 * 23), seq_len=9, batch_size=5, seed=1)  # 23 windows
    assert (pb.num_windows, pb.num_batches_per_epoch) == (23, 4)
    ids = np.concatenate([pb.window_ids(i) for i in range(23)])  # 23 batches = exactly 5 epochs
    for e in range(5):
        epoch = ids[e * 23 : (e + 1) * 23]
        assert sorted(epoch.tolist()) == list(range(23))
        assert np.array_equal(epoch, np.random.default_rng([1, e]).permutation(23))  # the order resume relies on
    assert not np.array_equal(ids[:23], ids[23:46])  # each epoch gets a fresh permutation
    starts = torch.cat([pb.batch(i)["input_ids"][:, 0] for i in range(23)]).numpy()
    assert np.array_equal(starts, ids * 10)  # batch content matches the window ids


def test_seed_and_shuffle() -> None:
    tokens = np.arange(3300)
    first = lambda pb: pb.batch(0)["input_ids"][:, 0].tolist()  # noqa: E731
    assert first(PackedBatches(tokens, 10, 8, seed=0)) != first(PackedBatches(tokens, 10, 8, seed=1))
    seq = PackedBatches(tokens, 10, 8, seed=0, shuffle=False)
    assert first(seq) == [i * 11 for i in range(8)]
    assert seq.batch(37)["input_ids"][:, 0].tolist() == [((37 * 8 + k) % 300) * 11 for k in range(8)]


def test_too_small_corpus() -> None:
    with pytest.raises(DataError, match=r"has 100 tokens.*4 \* 33 = 132.*smaller batch_size or seq_len"):
        PackedBatches(np.zeros(100, dtype=np.uint16), seq_len=32, batch_size=4, seed=0)
    assert PackedBatches(np.zeros(132, dtype=np.uint16), seq_len=32, batch_size=4, seed=0).num_windows == 4
