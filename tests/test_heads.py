"""Task heads on decoder and encoder backbones, span decoding and the task losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import EncoderConfig, ModelConfig
from lmforge.model.decoder import DecoderLM
from lmforge.model.encoder import EncoderModel
from lmforge.model.heads import SequenceClassifier, SpanQAHead, TokenClassifier, best_span
from lmforge.train.task_losses import classification_loss, span_qa_loss, token_classification_loss

V, PAD = 64, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def backbone(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "encoder":
        return EncoderModel(EncoderConfig(vocab_size=V, max_seq_len=32, n_layer=1, n_head=2, d_model=16))
    return DecoderLM(ModelConfig(vocab_size=V, max_seq_len=32, n_layer=1, n_head=2, d_model=16))


def padded(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of random tokens 10.. right-padded with PAD to `width`, and their attention mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, V, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_shapes_and_checkpoint_keys(arch: str) -> None:
    ids, mask = padded([5, 8, 3], 8)
    types = torch.zeros_like(ids)
    seq, tok, qa = SequenceClassifier(backbone(arch), 3), TokenClassifier(backbone(arch), 7), SpanQAHead(backbone(arch))
    assert seq(ids, mask, types).shape == (3, 3)
    assert tok(ids, mask, types).shape == (3, 8, 7)
    start, end = qa(ids, mask, types)
    assert start.shape == end.shape == (3, 8)
    seq_own = {"classifier.weight"} | ({"classifier.bias"} if arch == "encoder" else set())  # as transformers' heads
    for head, own in ((seq, seq_own), (tok, {"classifier.weight", "classifier.bias"}),
                      (qa, {"qa_outputs.weight", "qa_outputs.bias"})):
        keys = set(head.state_dict())
        assert own == {k for k in keys if not k.startswith("backbone.")}
    assert qa.qa_outputs.weight.shape == (2, 16)


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_classifier_ignores_right_padding(arch: str) -> None:
    model = SequenceClassifier(backbone(arch), 2).eval()
    ids, mask = padded([4, 7, 2], 7)
    logits = model(ids, mask)
    wider_ids, wider_mask = F.pad(ids, (0, 5), value=PAD), F.pad(mask, (0, 5))
    torch.testing.assert_close(model(wider_ids, wider_mask), logits)
    alone = model(ids[2:, :2])  # no mask: every token is real
    torch.testing.assert_close(alone, logits[2:])


def test_decoder_classifier_reads_the_last_real_token() -> None:
    model = SequenceClassifier(backbone("decoder"), 2).eval()
    ids, mask = padded([4, 6], 6)
    hidden = model.backbone.hidden(ids)
    torch.testing.assert_close(model(ids, mask), model.classifier(hidden[[0, 1], [3, 5]]))


def test_best_span_respects_order_and_length() -> None:
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
    for max_len in (1, 3, 30):
        s, e = best_span(start, end, max_answer_len=max_len)
        for b in range(16):
            best = max((start[b, i] + end[b, j], i, j) for i in range(12) for j in range(i, min(12, i + max_len)))
            assert (int(s[b]), int(e[b])) == best[1:]
            assert s[b] <= e[b] < s[b] + max_len
    s, e = best_span(torch.tensor([0.0, 0, 0, 0, 9]), torch.tensor([0.0, 9, 0, 0, 1]))
    assert (int(s), int(e)) == (4, 4)  # the best pair (4, 1) has end < start
    allowed = torch.tensor([False, True, True, False, False])
    assert tuple(map(int, best_span(torch.tensor([9.0, 0, 1, 0, 0]), torch.zeros(5), allowed=allowed))) == (2, 2)


def test_losses_match_cross_entropy_and_ignore_minus_100() -> None:
    ids, mask = padded([5, 8, 3], 8)
    token_model = TokenClassifier(backbone("encoder"), 5).eval()
    labels = torch.randint(0, 5, (3, 8), generator=torch.Generator().manual_seed(2)).masked_fill(mask == 0, -100)
    loss = token_classification_loss(token_model, {"input_ids": ids, "attention_mask": mask, "labels": labels}).mean()
    logits = token_model(ids, mask)
    keep = labels != -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], labels[keep]))

    seq_model = SequenceClassifier(backbone("decoder"), 3).eval()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, -100])}
    logits = seq_model(ids, mask)
    torch.testing.assert_close(classification_loss(seq_model, batch).mean(),
                               F.cross_entropy(logits[:2], batch["labels"][:2]))

    qa_model = SpanQAHead(backbone("encoder")).eval()
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "start_positions": torch.tensor([1, 4, 0]), "end_positions": torch.tensor([2, 6, 2])}
    start, end = qa_model(ids, mask, batch["token_type_ids"])
    expected = (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2
    torch.testing.assert_close(span_qa_loss(qa_model, batch).mean(), expected)


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_a_few_steps_fit_a_tiny_classification_task(arch: str) -> None:
    model = SequenceClassifier(backbone(arch), 2, dropout=0.0)
    ids, mask = padded([6, 4, 8, 5], 8)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = classification_loss(model, batch).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
