"""pretrain --init-from (continued pretraining from an lmforge run or a Hugging Face dir) and early stopping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.config import PretrainConfig
from lmforge.config_loading import load_config
from lmforge.data.batches import PackedBatches
from lmforge.data.shards import load_shards
from lmforge.errors import ConfigError
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.pretrain import pretrain
from lmforge.train.trainer import train

MODEL = {"model.vocab_size": 400, "model.max_seq_len": 16, "model.n_layer": 1, "model.n_head": 2,
         "model.d_model": 16}


def config(shards: Path, out: Path, **keys) -> PretrainConfig:
    return load_config(PretrainConfig, None, {"data.dir": str(shards), "train.out_dir": str(out), **MODEL,
                                              "train.batch_size": 4, "train.log_every": 1, "train.progress": False,
                                              "train.eval_batches": 1, **keys})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def source_run(shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("source") / "run"
    pretrain(config(shards_dir, out, **{"train.max_steps": 2, "train.lr": 1e-2}))
    return out


@pytest.mark.parametrize("kind", ["lmforge", "hf"])
def test_init_from_starts_at_the_source_models_loss(kind: str, source_run: Path, shards_dir: Path, tmp_path: Path,
                                                    capsys) -> None:
    source, tokenizer = lmforge.load(source_run)
    start = source_run
    if kind == "hf":
        start = tmp_path / "hf"
        lmforge.export_hf(source, tokenizer, start)
    out = tmp_path / "continued"
    # a model section of another shape is replaced by the source's architecture; the seed differs from the source's
    assert main(["pretrain", "--init-from", str(start), f"--data.dir={shards_dir}", f"--train.out_dir={out}",
                 "--model.n_layer=3", "--model.d_model=64", "--train.batch_size=4", "--train.max_steps=2",
                 "--train.log_every=1", "--train.progress=false", "--train.seed=7", "--train.warmup_steps=1"]) == 0
    capsys.readouterr()
    batch = PackedBatches(load_shards(shards_dir).tokens("train"), 16, 4, seed=7).batch(0)
    with torch.no_grad():
        expected = causal_lm_loss(source.train(), batch)
    first = metrics(out)[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(float(expected.total / expected.count), rel=1e-6)
    continued, _ = lmforge.load(out)
    assert (continued.cfg.n_layer, continued.cfg.d_model) == (source.cfg.n_layer, source.cfg.d_model) == (1, 16)
    optimizer = torch.load(out / "checkpoints" / "step_00000002" / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {2}  # fresh: two steps of this run only


def test_init_from_a_missing_dir_is_one_line(shards_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["pretrain", "--init-from", str(tmp_path / "nope"), f"--data.dir={shards_dir}",
                 f"--train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and err.count("\n") == 1


def test_early_stopping_stops_after_patience_evaluations_without_improvement(shards_dir: Path,
                                                                            tmp_path: Path) -> None:
    keys = {"train.max_steps": 30, "train.lr": 1e-7, "train.min_lr": 1e-7, "train.eval_every": 1,
            "train.save_every": 10, "train.early_stopping_patience": 2, "train.early_stopping_min_delta": 0.01}
    result = pretrain(config(shards_dir, tmp_path / "run", **keys))
    # the first evaluation sets the best loss; with lr 1e-7 the next two do not beat it by 0.01: stop after step 3
    assert result.step == 3
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoints/step_00000003"
    assert max(r["step"] for r in metrics(tmp_path / "run")) == 3
    again = pretrain(config(shards_dir, tmp_path / "run", **keys), resume=True)  # stopped runs stay stopped
    assert again.step == 3 and max(r["step"] for r in metrics(tmp_path / "run")) == 3
    more = pretrain(config(shards_dir, tmp_path / "run", **{**keys, "train.early_stopping_patience": 3}), resume=True)
    assert more.step == 4  # more patience (a free change on resume): one more evaluation without improvement
    unlimited = pretrain(config(shards_dir, tmp_path / "off", **{**keys, "train.max_steps": 4,
                                                                  "train.early_stopping_patience": 0}))
    assert unlimited.step == 4


def test_early_stopping_without_validation_data_is_refused_before_anything_is_written(shards_dir: Path,
                                                                                      tmp_path: Path) -> None:
    cfg = config(shards_dir, tmp_path / "run", **{"train.early_stopping_patience": 2}).train
    with pytest.raises(ConfigError, match="early_stopping_patience=2 needs a validation loss"):
        train(torch.nn.Linear(1, 1), cfg, lambda i: {}, causal_lm_loss, run_config=cfg, val_batches=None)
    assert not (tmp_path / "run").exists()
