"""BERT / SpanBERT masking, NSP pairs and the deterministic MLM batch stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from lmforge.config import EncoderConfig
from lmforge.data.masking import (
    MLMBatches,
    build_mlm_batch,
    build_nsp_pairs,
    mask_budgets,
    mlm_token_ids,
    select_spans,
)
from lmforge.errors import DataError
from lmforge.model.encoder import EncoderModel
from lmforge.tokenizer import CLS, EOS, MASK, PAD, SEP, SPECIAL_TOKENS, Tokenizer, train_tokenizer

VOCAB = 1000
IDS = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
MASK_ID, CLS_ID, SEP_ID, PAD_ID, EOS_ID = IDS[MASK], IDS[CLS], IDS[SEP], IDS[PAD], IDS[EOS]
SPECIAL = list(range(len(SPECIAL_TOKENS)))
TOKEN_IDS = dict(mask_id=MASK_ID, cls_id=CLS_ID, sep_id=SEP_ID, pad_id=PAD_ID, vocab_size=VOCAB, special_ids=SPECIAL)


pytestmark = pytest.mark.usefixtures("one_thread")


def bert_rows(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """[CLS] words [SEP] PAD...: random non-special words, a random amount of right padding per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), VOCAB, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    ids[torch.arange(T)[None] >= lengths[:, None]] = PAD_ID
    ids[:, 0] = CLS_ID
    ids[torch.arange(B), lengths - 1] = SEP_ID
    return ids


def mask(ids: torch.Tensor, seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    return build_mlm_batch(ids, mask_id=MASK_ID, vocab_size=VOCAB, special_ids=SPECIAL, pad_id=PAD_ID,
                           generator=torch.Generator().manual_seed(seed), **kw)


def token_stream(n: int, seed: int = 0) -> np.ndarray:
    """Documents of random words, each ended by EOS."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(len(SPECIAL), VOCAB, n)
    tokens[rng.random(n) < 0.02] = EOS_ID
    return tokens.astype(np.uint16)


@pytest.mark.parametrize("span", [False, True])
def test_80_10_10_proportions(span: bool) -> None:
    ids = bert_rows(1024, 128)
    out = mask(ids, span=span)
    special = torch.isin(ids, torch.tensor(SPECIAL))
    selected = out["labels"] != -100
    assert not (selected & special).any()  # CLS, SEP and PAD are never selected
    assert torch.equal(out["labels"][selected], ids[selected])
    assert torch.equal(out["input_ids"][~selected], ids[~selected])  # unselected tokens stay as they were
    candidates = int((~special).sum())
    assert candidates > 80_000
    assert abs(int(selected.sum()) / candidates - 0.15) < 0.005
    new = out["input_ids"][selected]
    masked, unchanged = new == MASK_ID, new == ids[selected]
    randomised = ~masked & ~unchanged
    n = int(selected.sum())
    tolerance = 0.03 if span else 0.015  # one draw per span: ~4x fewer independent decisions
    assert abs(int(masked.sum()) / n - 0.8) < tolerance
    assert abs(int(randomised.sum()) / n - 0.1) < tolerance
    assert abs(int(unchanged.sum()) / n - 0.1) < tolerance
    assert (new[randomised] >= len(SPECIAL)).all()  # random replacements are never special tokens
    assert torch.equal(out["attention_mask"], (ids != PAD_ID).long())


def test_unselected_positions_carry_no_loss() -> None:
    torch.manual_seed(0)
    model = EncoderModel(EncoderConfig(vocab_size=VOCAB, max_seq_len=32, n_layer=1, n_head=2, d_model=16)).eval()
    batch = mask(bert_rows(4, 32))
    logits = model(batch["input_ids"], None, batch["attention_mask"]).detach().requires_grad_()
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    loss.backward()
    unselected = batch["labels"] == -100
    assert unselected.float().mean() > 0.7
    assert (logits.grad[unselected] == 0).all() and (logits.grad[~unselected] != 0).any()
    changed = logits.detach() + 100 * torch.randn_like(logits) * unselected[..., None]
    loss2 = F.cross_entropy(changed.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert torch.equal(loss, loss2)


def test_span_lengths_follow_the_truncated_geometric() -> None:
    B, T = 512, 512
    candidates = torch.ones(B, T, dtype=torch.bool)
    candidates[:, 0] = candidates[:, -1] = False
    g = torch.Generator().manual_seed(0)
    budgets = mask_budgets(candidates, 0.15, g)
    span_ids = select_spans(candidates, budgets, g, max_span=10, span_p=0.2)
    assert torch.equal((span_ids > 0).sum(1), budgets)
    assert not (span_ids[~candidates] > 0).any()
    starts = (span_ids > 0) & (span_ids != F.pad(span_ids, (1, 0))[:, :-1])
    assert torch.equal(starts.sum(1), span_ids.max(1).values)  # one start per span: spans are contiguous
    # With budgets of >= 76 tokens and spans of <= 10, the first 7 spans of a row are never cut by the budget
    # (the last span is: stopping at the budget favours long spans, so it is no fair sample either).
    assert budgets.min() >= 76
    p, L = 0.2, 10
    counts = [torch.bincount(row)[1:] for row in span_ids]
    assert max(int(c.max()) for c in counts) <= L
    lengths = torch.stack([c[:7] for c in counts]).double()
    expected = 1 / p - L * (1 - p) ** L / (1 - (1 - p) ** L)  # 3.797: SpanBERT's mean span length
    assert abs(float(lengths.mean()) - expected) < 0.2  # 3584 spans: about 4 standard errors


def test_span_masking_treats_each_span_alike() -> None:
    ids = bert_rows(64, 128)
    out = mask(ids, seed=3, span=True)
    g = torch.Generator().manual_seed(3)  # replay the selection build_mlm_batch made
    candidates = ~torch.isin(ids, torch.tensor(SPECIAL))
    span_ids = select_spans(candidates, mask_budgets(candidates, 0.15, g), g)
    assert torch.equal(span_ids > 0, out["labels"] != -100)
    kinds = torch.where(out["input_ids"] == MASK_ID, 0, torch.where(out["input_ids"] == ids, 1, 2))
    for row in range(len(ids)):
        for k in range(1, int(span_ids[row].max()) + 1):
            assert len(set(kinds[row][span_ids[row] == k].tolist())) == 1


def test_mlm_batches_are_a_pure_function_of_seed_and_index() -> None:
    tokens = token_stream(20_000)
    kw = dict(TOKEN_IDS, mask_prob=0.15)
    first = MLMBatches(tokens, 64, 8, seed=5, **kw)
    b3 = first.batch(3)
    second = MLMBatches(tokens, 64, 8, seed=5, **kw)
    for i in (7, 0, 3):  # a different call order on a fresh instance
        batch = second.batch(i)
    assert b3.keys() == batch.keys() == {"input_ids", "labels", "attention_mask", "token_type_ids"}
    for key in b3:
        assert torch.equal(b3[key], batch[key])
    assert not torch.equal(first.batch(4)["labels"], b3["labels"])
    assert not torch.equal(MLMBatches(tokens, 64, 8, seed=6, **kw).batch(3)["labels"], b3["labels"])
    assert b3["input_ids"].shape == (8, 64)
    assert (b3["input_ids"][:, 0] == CLS_ID).all() and (b3["input_ids"][:, -1] == SEP_ID).all()
    original = torch.where(b3["labels"] != -100, b3["labels"], b3["input_ids"])
    rows = first.packed.window_ids(3)[:, None] * 62 + np.arange(62)
    assert torch.equal(original[:, 1:-1], torch.from_numpy(tokens[rows].astype(np.int64)))
    assert not (b3["labels"][original == EOS_ID] != -100).any()
    assert first.num_batches_per_epoch == 20_000 // 62 // 8


def test_mlm_batches_span_mode() -> None:
    batches = MLMBatches(token_stream(20_000), 128, 16, seed=0, span=True, **TOKEN_IDS)
    selected = torch.cat([(batches.batch(i)["labels"] != -100).flatten() for i in range(4)]).float()
    assert abs(float(selected.mean()) - 0.15 * 126 / 128) < 0.02


def test_nsp_pairs_layout() -> None:
    g = torch.Generator().manual_seed(0)
    windows, others = torch.randint(200, 300, (4, 9), generator=g), torch.randint(300, 400, (4, 9), generator=g)
    pairs = build_nsp_pairs(windows, others, cls_id=CLS_ID, sep_id=SEP_ID, generator=torch.Generator().manual_seed(1))
    ids, types = pairs["input_ids"], pairs["token_type_ids"]
    assert ids.shape == types.shape == (4, 12)  # [CLS] 4 [SEP] 5 [SEP]
    assert (ids[:, 0] == CLS_ID).all() and (ids[:, 5] == SEP_ID).all() and (ids[:, -1] == SEP_ID).all()
    assert torch.equal(ids[:, 1:5], windows[:, :4])
    assert (types[:, :6] == 0).all() and (types[:, 6:] == 1).all()
    for row, label in enumerate(pairs["nsp_labels"].tolist()):
        assert torch.equal(ids[row, 6:11], (others if label else windows)[row, 4:])


def test_nsp_batches_labels_are_balanced() -> None:
    tokens = token_stream(40_000)
    batches = MLMBatches(tokens, 33, 32, seed=0, nsp=True, **TOKEN_IDS)
    labels, W = [], 30
    for i in range(20):
        batch = batches.batch(i)
        assert batch["input_ids"].shape == (32, 33)
        assert ((batch["token_type_ids"][:, :17] == 0).all() and (batch["token_type_ids"][:, 17:] == 1).all())
        original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
        rows = torch.from_numpy(tokens[batches.packed.window_ids(i)[:, None] * W + np.arange(W)].astype(np.int64))
        assert torch.equal(original[:, 1:16], rows[:, :15])
        is_next = (original[:, 17:-1] == rows[:, 15:]).all(1)
        assert torch.equal(is_next, batch["nsp_labels"] == 0)
        labels.append(batch["nsp_labels"])
    assert abs(float(torch.cat(labels).float().mean()) - 0.5) < 0.06  # 640 pairs: 3 standard errors


def test_mlm_token_ids_and_missing_mask_token() -> None:
    tok = train_tokenizer(["a b c d e f g"] * 10, vocab_size=400, show_progress=False)
    ids = mlm_token_ids(tok)
    assert (ids["mask_id"], ids["cls_id"], ids["sep_id"], ids["pad_id"]) == (MASK_ID, CLS_ID, SEP_ID, PAD_ID)
    assert ids["special_ids"] == SPECIAL and ids["vocab_size"] == tok.vocab_size
    bare = Tokenizer(HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")))
    with pytest.raises(DataError, match=r"runs/tok/tokenizer\.json has no \[MASK\] token; MLM needs one.*"
                                        r"lmforge tokenizer train"):
        mlm_token_ids(bare, "runs/tok/tokenizer.json")


def test_too_small_corpus_is_a_data_error() -> None:
    with pytest.raises(DataError, match="windows of seq_len - 2 = 62 tokens"):
        MLMBatches(token_stream(300), 64, 8, seed=0, **TOKEN_IDS)
