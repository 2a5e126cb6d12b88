"""Knowledge distillation: the loss against Hinton et al.'s formula, the tau^2 scaling, the frozen teacher,
tokenizer checks and a short run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import train_tokenizer
from lmforge.train.distill import DistillConfig, distill, distill_loss_fn, distillation_loss
from lmforge.train.objectives import IGNORE_INDEX, causal_lm_loss, token_cross_entropy
from lmforge.train.trainer import train
from tiny_pretraining import word_documents, write_word_shards

VOCAB = 400


def tiny(vocab_size: int = VOCAB, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, max_seq_len=32, n_layer=1, n_head=2, d_model=32, **kw)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shards + a briefly pretrained teacher (vocab padded to 416 rows) sharing a 400-token tokenizer, and a
    second tokenizer that differs."""
    root = tmp_path_factory.mktemp("distill")
    tok, _ = write_word_shards(root, n_docs=400, val_fraction=0.05)
    other = train_tokenizer([d.upper() for d in word_documents(400)], vocab_size=VOCAB, show_progress=False)
    from lmforge.data.batches import PackedBatches
    from lmforge.data.shards import load_shards

    torch.manual_seed(0)
    teacher = DecoderLM(tiny(416))
    batches = PackedBatches(load_shards(root / "shards").tokens("train"), 32, 8, seed=0)
    cfg = TrainConfig(out_dir=str(root / "teacher_run"), batch_size=8, max_steps=60, lr=1e-2, min_lr=1e-3,
                      warmup_steps=5, save_every=60, device="cpu", progress=False)
    train(teacher, cfg, batches.batch, causal_lm_loss, run_config=PretrainConfig(model=tiny(416), train=cfg))
    lmforge.save(teacher, tok, root / "teacher")
    lmforge.save(DecoderLM(tiny()), other, root / "other_student")
    return {"root": root, "shards": root / "shards", "teacher": root / "teacher",
            "other_student": root / "other_student"}


def soft_ce_by_hand(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """-sum_v p_T(v) log p_S(v) per position, written out (float64)."""
    zs, zt = student.double() / tau, teacher.double() / tau
    p_t = zt.exp() / zt.exp().sum(-1, keepdim=True)
    log_p_s = zs - zs.exp().sum(-1, keepdim=True).log()
    return -(p_t * log_p_s).sum(-1)


def test_distillation_loss_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    for tau, alpha in [(1.0, 0.5), (2.0, 0.7), (4.0, 1.0), (0.5, 0.2)]:
        soft = soft_ce_by_hand(student, teacher, tau)[keep].mean()
        log_p = student.double() - student.double().exp().sum(-1, keepdim=True).log()
        hard = -log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()
        expected = alpha * tau**2 * soft + (1 - alpha) * hard
        got = distillation_loss(student, teacher, labels, tau, alpha).mean()
        assert got.item() == pytest.approx(expected.item(), rel=1e-5), (tau, alpha)


def test_alpha_zero_is_pure_hard_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 4, 9, generator=g)
    labels = torch.randint(0, 9, (3, 4), generator=g)
    labels[2, 3] = IGNORE_INDEX
    hard = token_cross_entropy(student, labels)
    for teacher in (torch.randn(3, 4, 9, generator=g), torch.randn(3, 4, 9, generator=g) * 10):
        assert distillation_loss(student, teacher, labels, 3.0, 0.0).mean().item() == pytest.approx(hard.mean().item(),
                                                                                                rel=1e-6)


def test_tau_squared_keeps_the_soft_gradient_scale_independent_of_tau() -> None:
    """Soft-target gradients scale as 1/tau^2 (Hinton et al. sec. 2.1); the tau^2 factor cancels that."""
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(4, 8, 16, generator=g)
    labels = torch.randint(0, 16, (4, 8), generator=g)
    norms = {}
    for tau in (4.0, 8.0, 16.0):
        student = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(3)).requires_grad_()
        distillation_loss(student, teacher, labels, tau, alpha=1.0).mean().backward()
        norms[tau] = student.grad.norm().item()
        unscaled = student.detach().clone().requires_grad_()  # the soft term alone shrinks as 1/tau^2
        soft_ce_by_hand(unscaled, teacher, tau).mean().backward()
        assert unscaled.grad.norm().item() * tau**2 == pytest.approx(norms[tau], rel=1e-5)
    assert norms[8.0] / norms[4.0] == pytest.approx(1.0, abs=0.1)
    assert norms[16.0] / norms[4.0] == pytest.approx(1.0, abs=0.1)


def test_the_teacher_gets_no_gradients_and_padding_rows_are_cut() -> None:
    torch.manual_seed(0)
    teacher, student = DecoderLM(tiny(72)), DecoderLM(tiny(64))  # 64 real tokens; the teacher has 8 padding rows
    ids = torch.randint(0, 64, (2, 9))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    loss = distill_loss_fn(teacher, 2.0, 0.5, vocab_size=64)(student, batch)
    loss.total.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    with pytest.raises(ValueError, match="tokenizer"):  # unsliced logits of different widths
        distillation_loss(student(batch["input_ids"]), teacher(batch["input_ids"]), batch["labels"], 2.0, 0.5)
    student.eval()  # validation: the student's plain cross-entropy, comparable across alphas and temperatures
    with torch.no_grad():
        plain = torch.nn.functional.cross_entropy(student(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())
        assert distill_loss_fn(teacher, 2.0, 0.5, vocab_size=64)(student, batch).mean().item() == pytest.approx(
            plain.item())


def test_different_tokenizers_are_a_config_error_naming_both(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = DistillConfig(teacher=str(world["teacher"]), student=str(world["other_student"]),
                        data=DataConfig(dir=str(world["shards"])),
                        train=TrainConfig(out_dir=str(tmp_path), max_steps=1, device="cpu", progress=False))
    with pytest.raises(ConfigError, match="^distillation needs one tokenizer") as err:
        distill(cfg)
    assert str(world["teacher"] / "tokenizer.json") in str(err.value)
    assert str(world["other_student"] / "tokenizer.json") in str(err.value)
    # the shards must have been tokenized with the teacher's tokenizer too
    with pytest.raises(ConfigError) as err:
        distill(DistillConfig(teacher=str(world["other_student"]), student_model=tiny(), data=cfg.data))
    assert str(world["other_student"] / "tokenizer.json") in str(err.value)
    assert str(world["shards"] / "tokenizer.json") in str(err.value)
    with pytest.raises(ConfigError, match="exactly one student"):
        distill(DistillConfig(teacher=str(world["teacher"]), student=str(world["teacher"]), student_model=tiny(),
                              data=cfg.data))


def test_a_short_distillation_run_lowers_the_students_loss(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "student"
    cfg = DistillConfig(teacher=str(world["teacher"]), student_model=tiny(), data=DataConfig(dir=str(world["shards"])),
                        temperature=2.0, alpha=0.5,
                        train=TrainConfig(out_dir=str(out), batch_size=8, max_steps=30, lr=1e-2, min_lr=1e-3,
                                          warmup_steps=3, log_every=1, eval_every=30, save_every=30, device="cpu",
                                          progress=False))
    result = distill(cfg)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 30
    # the soft term includes the teacher's entropy (times alpha tau^2), a floor the loss cannot go below
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 2.0, losses
    assert result.val_loss is not None and result.val_loss < losses[0] - 2.0
    student, tok = lmforge.load(out)
    assert isinstance(student, DecoderLM) and student.cfg == tiny() and tok.vocab_size == VOCAB


def test_alpha_zero_never_runs_the_teacher() -> None:
    """Labels only: the teacher's logits would be multiplied by 0, so the loss does not compute them."""

    class Unrunnable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the teacher ran at alpha 0")

    torch.manual_seed(0)
    student = DecoderLM(tiny(64))
    ids = torch.randint(0, 64, (2, 9))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    got = distill_loss_fn(Unrunnable(), 2.0, 0.0, vocab_size=64)(student, batch)
    assert got.mean().item() == pytest.approx(token_cross_entropy(student(batch["input_ids"]), batch["labels"])
                                              .mean().item(), rel=1e-6)


def test_train_tokens_keeps_only_the_first_tokens_of_the_train_split(world: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.data.shards import load_shards
    from lmforge.train import distill as distill_module

    seen = []
    monkeypatch.setattr(distill_module, "train", lambda *args, **kw: seen.append(args[2]))  # the batch function
    cfg = DistillConfig(teacher=str(world["teacher"]), student_model=tiny(), data=DataConfig(dir=str(world["shards"])),
                        train_tokens=8 * 33 * 2, train=TrainConfig(out_dir=str(tmp_path), batch_size=8, max_steps=1,
                                                                    device="cpu", progress=False))
    distill(cfg)
    first = torch.from_numpy(load_shards(world["shards"]).tokens("train")[:8 * 33 * 2].astype("int64")).view(-1, 33)
    for step in range(4):  # two batches per epoch: every window is one of the first 16
        batch = seen[0](step)
        rows = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
        assert all(any(torch.equal(row, window) for window in first) for row in rows)
    total = len(load_shards(world["shards"]).tokens("train"))
    with pytest.raises(ConfigError, match=f"train_tokens={total + 1} exceeds the {total} tokens"):
        distill(cfg.model_copy(update={"train_tokens": total + 1}))
