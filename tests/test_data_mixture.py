"""data.sources: a weighted mixture of prepared datasets, deterministic and exactly resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import lmforge.train.pretrain as pretrain_module
from lmforge.cli import main
from lmforge.config import PretrainConfig
from lmforge.config_loading import load_config
from lmforge.data.mixture import BLOCK_ROWS, MixedBatches, rows_per_block
from lmforge.data.shards import prepare_shards
from lmforge.train.metrics_log import TIMING_KEYS
from lmforge.train.pretrain import pretrain
from tiny_pretraining import word_documents, write_word_shards


def test_rows_follow_the_weights_and_batches_are_a_pure_function_of_the_index() -> None:
    web, books = np.arange(0, 2000) % 100, np.arange(0, 300) % 100 + 100  # sources told apart by their token ids
    make = lambda: MixedBatches([web, books], [3.0, 1.0], seq_len=9, batch_size=8, seed=5, names=["web", "books"])
    batches = make()
    per_block = BLOCK_ROWS // 8
    rows = torch.cat([batches.batch(i)["input_ids"] for i in range(per_block)])
    from_books = int((rows[:, 0] >= 100).sum())
    assert from_books == rows_per_block([3.0, 1.0])[1] == BLOCK_ROWS // 4  # exact within each block
    again = make()
    for i in (per_block + 7, 3, 0):  # any order, a fresh instance: the same batch
        assert torch.equal(again.batch(i)["input_ids"], batches.batch(i)["input_ids"])
    # the small source is cycled: each of its 30 windows once per epoch of it
    book_windows = [w for i in range(per_block) for s, w in batches.row_sources(i) if s == 1]
    assert sorted(book_windows[:30]) == list(range(30)) and sorted(book_windows[30:60]) == list(range(30))
    assert batches.describe(BLOCK_ROWS) == "data mixture over the run: web 75.0% (15.36 epochs), books 25.0% " \
                                           "(34.13 epochs)"


def test_rows_per_block_gives_every_positive_source_a_row() -> None:
    rows = rows_per_block([1e-9, 1.0, 0.0])
    assert rows.tolist() == [1, BLOCK_ROWS - 1, 0]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mix")
    (root / "web").mkdir()
    tok, web = write_word_shards(root / "web", n_docs=300, val_fraction=0.05)
    corpus = root / "books.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in word_documents(200, seed=1)))
    prepare_shards([corpus], tok, root / "books", val_fraction=0.05, progress=False)
    return web, root / "books"


def mixture_config(sources: dict, out: Path, **train) -> PretrainConfig:
    return load_config(PretrainConfig, None, {
        "data.sources": sources, "train.out_dir": str(out), "model.vocab_size": 400, "model.max_seq_len": 16,
        "model.n_layer": 1, "model.n_head": 2, "model.d_model": 16, "model.dropout": 0.1, "train.batch_size": 4,
        "train.max_steps": 6, "train.save_every": 2, "train.eval_every": 3, "train.eval_batches": 2,
        "train.log_every": 1, "train.progress": False, **{f"train.{k}": v for k, v in train.items()}})


def test_an_interrupted_and_resumed_mixture_run_sees_the_batches_of_an_unbroken_one(
        two_sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    web, books = two_sources
    sources = {"web": {"dir": str(web), "weight": 0.7}, "books": {"dir": str(books), "weight": 0.3}}
    seen: dict[str, dict[int, torch.Tensor]] = {}
    original = MixedBatches.batch

    def recording(self: MixedBatches, index: int) -> dict[str, torch.Tensor]:
        batch = original(self, index)
        if self.batch_size == 4 and getattr(self.samplers[0], "shuffle", True):
            seen[run].setdefault(index, batch["input_ids"])
        return batch

    monkeypatch.setattr(MixedBatches, "batch", recording)
    run = "unbroken"
    seen[run] = {}
    pretrain(mixture_config(sources, tmp_path / "unbroken"))

    run = "broken"
    seen[run] = {}
    clm = pretrain_module.LOSSES["clm"]
    calls = {"n": 0}

    def interrupted(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # step 5 (steps 1-3, 2 validation batches, step 4 and its checkpoint came before)
            raise KeyboardInterrupt
        return clm(model, batch)

    monkeypatch.setitem(pretrain_module.LOSSES, "clm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(mixture_config(sources, tmp_path / "broken"))
    monkeypatch.setitem(pretrain_module.LOSSES, "clm", clm)
    assert (tmp_path / "broken" / "latest").read_text().strip() == "checkpoints/step_00000004"
    pretrain(mixture_config(sources, tmp_path / "broken"), resume=True)

    assert seen["broken"].keys() == seen["unbroken"].keys() == set(range(6))
    for index, ids in seen["unbroken"].items():
        assert torch.equal(seen["broken"][index], ids), index
    strip = lambda run: [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS}
                         for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert strip("broken") == strip("unbroken")
    assert any("val_loss" in record for record in strip("unbroken"))


def write_yaml(path: Path, sources: dict, out: Path, objective: str = "clm") -> Path:
    model = {"arch": "encoder"} if objective == "mlm" else {}
    path.write_text(yaml.safe_dump({"data": {"sources": sources}, "objective": objective,
                                    "model": {"vocab_size": 400, "max_seq_len": 16, "n_layer": 1, "n_head": 2,
                                              "d_model": 16, **model},
                                    "train": {"out_dir": str(out), "max_steps": 1, "progress": False}}))
    return path


@pytest.mark.parametrize("case", ["negative", "zero_sum", "missing_dir", "not_clm"])
def test_bad_mixtures_are_one_line_naming_the_key(case: str, two_sources, tmp_path: Path, capsys) -> None:
    web, books = (str(p) for p in two_sources)
    sources, objective, expected = {
        "negative": ({"web": {"dir": web, "weight": 1.0}, "books": {"dir": books, "weight": -0.5}}, "clm",
                     "data.sources.books.weight=-0.5"),
        "zero_sum": ({"web": {"dir": web, "weight": 0.0}, "books": {"dir": books, "weight": 0}}, "clm",
                     "data.sources weights (books=0.0, web=0.0) sum to 0"),
        "missing_dir": ({"web": {"dir": web, "weight": 1.0}, "books": {"dir": str(tmp_path / "nope"), "weight": 1}},
                        "clm", f"data.sources.books.dir={tmp_path / 'nope'}: shard index not found"),
        "not_clm": ({"web": {"dir": web, "weight": 1.0}}, "mlm", "needs objective clm"),
    }[case]
    config = write_yaml(tmp_path / "mix.yaml", sources, tmp_path / "run", objective)
    assert main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and err.startswith("lmforge: error: ")
    assert not (tmp_path / "run").exists()
