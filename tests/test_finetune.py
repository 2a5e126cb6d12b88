"""`lmforge finetune`: task heads on pretrained backbones through the shared trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.config import EncDecConfig, EncoderConfig, FinetuneConfig, ModelConfig
from lmforge.data import task_data
from lmforge.data.synthetic import WorldConfig, pretraining_documents
from lmforge.data.synthetic_tasks import write_task_data
from lmforge.errors import ConfigError, DataError
from lmforge.model import build_model
from lmforge.tokenizer import train_tokenizer
from lmforge.train.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "encoder": EncoderConfig(vocab_size=500, max_seq_len=128, n_layer=1, n_head=2, d_model=32),
    "decoder": ModelConfig(vocab_size=500, max_seq_len=128, n_layer=1, n_head=2, d_model=32),
    "encdec": EncDecConfig(vocab_size=500, n_layer=1, n_head=2, head_dim=16, d_model=32, d_ff=64),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Task data plus a random-init base model of each architecture sharing one tokenizer."""
    root = tmp_path_factory.mktemp("ft")
    paths = write_task_data(WorldConfig(), root / "tasks", n_train=400, n_test=200)
    tok = train_tokenizer(pretraining_documents(WorldConfig(n_documents=500)), vocab_size=500, show_progress=False)
    for arch, cfg in CONFIGS.items():
        torch.manual_seed(0)
        lmforge.save(build_model(cfg), tok, root / arch)
        paths[arch] = root / arch
    return paths


def run(world: dict[str, Path], tmp: Path, task: str, arch: str, data: str, steps: int = 40, *extra: str) -> dict:
    out = tmp / f"{task}-{arch}"
    assert main(["finetune", "--task", task, "--base", str(world[arch]), "--train-file", str(world[f"{data}_train"]),
                 "--eval-file", str(world[f"{data}_test"]), f"--train.max_steps={steps}", "--train.lr=3e-3",
                 "--train.warmup_steps=5", f"--train.out_dir={out}", "--train.progress=false", *extra]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"records": records, "out": out, "final": records[-1]}


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_classification_learns_and_the_checkpoint_reloads(world: dict[str, Path], tmp_path: Path, arch: str) -> None:
    result = run(world, tmp_path, "classify", arch, "sentiment", 200)
    # chance is 0.5; 200 test reviews put 0.65 about 4 standard errors above it
    assert result["final"]["eval_accuracy"] >= 0.65, result["final"]
    model, tok = lmforge.load(result["out"])
    examples, labels = task_data.read_classification(world["sentiment_test"], tok, 128, arch=arch)
    batch = task_data.collate(examples[:16], tok.pad_id)
    with torch.no_grad():
        predicted = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).argmax(-1)
    assert sorted(labels) == ["negative", "positive"] and predicted.shape == (16,)
    assert (predicted == batch["labels"]).float().mean() >= 0.6


def test_token_span_and_text2text_tasks_run_and_report(world: dict[str, Path], tmp_path: Path) -> None:
    assert run(world, tmp_path, "tokens", "encoder", "entities", 40)["final"]["eval_accuracy"] > 0.6
    assert "eval_exact_match" in run(world, tmp_path, "span", "encoder", "span_qa", 10)["final"]
    assert "eval_exact_match" in run(world, tmp_path, "text2text", "encdec", "text2text", 10)["final"]
    assert "eval_exact_match" in run(world, tmp_path, "text2text", "decoder", "text2text", 10)["final"]


def test_from_scratch_reinitialises_the_backbone(world: dict[str, Path], tmp_path: Path) -> None:
    """The baseline shares the architecture but none of the base's weights."""
    base, _ = lmforge.load(world["encoder"])
    with torch.no_grad():
        for p in base.parameters():
            p.add_(1.0)  # a 'pretrained' base far from any fresh init
    lmforge.save(base, lmforge.load(world["encoder"])[1], tmp_path / "shifted")
    cfg = FinetuneConfig(task="classify", base=str(tmp_path / "shifted"), from_scratch=True,
                         train_file=str(world["sentiment_train"]))
    cfg.train.max_steps, cfg.train.out_dir, cfg.train.progress = 1, str(tmp_path / "o"), False
    finetune(cfg)
    tuned, _ = lmforge.load(tmp_path / "o")
    assert not torch.allclose(tuned.backbone.tok_emb.weight, base.tok_emb.weight, atol=0.5)


def test_bad_task_inputs_are_clear_errors(world: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": "odd", "label": "sarcastic"}\n')
    cfg = FinetuneConfig(task="classify", base=str(world["encoder"]), train_file=str(world["sentiment_train"]),
                         eval_file=str(bad))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: label 'sarcastic' is not in the label set"):
        finetune(cfg)
    with pytest.raises(ConfigError, match="text2text needs a model that generates"):
        finetune(FinetuneConfig(task="text2text", base=str(world["encoder"]), train_file=str(bad)))
    with pytest.raises(ConfigError, match="encoder-decoder"):
        finetune(FinetuneConfig(task="classify", base=str(world["encdec"]), train_file=str(bad)))
