"""EncoderModel (BERT-style): shapes, padding invariance, length limit, NSP head, init and parameter count.

Padding invariance means max abs diff <= 1e-5 (fp32) between a padded row and the same sequence alone.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.config import EncoderConfig
from lmforge.model import build_model
from lmforge.model.encoder import EncoderModel

VOCAB, D, MAX_LEN = 97, 32, 24


def _cfg(**kw) -> EncoderConfig:
    return EncoderConfig(vocab_size=VOCAB, max_seq_len=MAX_LEN, n_layer=2, n_head=4, d_model=D, d_ff=48, **kw)


def _model(**kw) -> EncoderModel:
    torch.manual_seed(0)
    model = EncoderModel(_cfg(**kw))
    with torch.no_grad():  # non-zero biases and non-unit norms, so padding leaks would show everywhere
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_shapes_and_build_model() -> None:
    model = build_model(_cfg())
    assert isinstance(model, EncoderModel)
    ids = torch.randint(0, VOCAB, (3, 10))
    h = model.hidden(ids)
    assert h.shape == (3, 10, D)
    assert model(ids).shape == (3, 10, VOCAB)
    assert model.pooled(h).shape == (3, D)
    assert not hasattr(model, "nsp_head")
    with pytest.raises(ValueError, match="nsp=True"):
        model.nsp_logits(model.pooled(h))


def test_padding_does_not_change_real_positions() -> None:
    model = _model()
    long_ids = torch.randint(5, VOCAB, (1, 12))
    short_ids = torch.randint(5, VOCAB, (1, 7))
    short_types = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    batch = torch.randint(0, VOCAB, (2, 12))  # pad slots hold arbitrary ids: the mask alone must hide them
    batch[0], batch[1, :7] = long_ids[0], short_ids[0]
    types = torch.zeros(2, 12, dtype=torch.long)
    types[1, :7] = short_types[0]
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        h = model.hidden(batch, types, mask)
        alone_short = model.hidden(short_ids, short_types)
        alone_long = model.hidden(long_ids)
        assert (h[1, :7] - alone_short[0]).abs().max().item() <= 1e-5
        assert (h[0] - alone_long[0]).abs().max().item() <= 1e-5
        assert (model.pooled(h)[1] - model.pooled(alone_short)[0]).abs().max().item() <= 1e-5
        logits = model(batch, types, mask)
        assert (logits[1, :7] - model(short_ids, short_types)[0]).abs().max().item() <= 1e-5
        # and the mask matters: without it the padded row sees its pad tokens
        assert (model.hidden(batch, types)[1, :7] - alone_short[0]).abs().max().item() > 1e-3


def test_token_types_and_positions_matter() -> None:
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        h0 = model.hidden(ids)
        assert torch.allclose(h0, model.hidden(ids, torch.zeros_like(ids)), atol=1e-6)
        assert not torch.allclose(h0, model.hidden(ids, torch.ones_like(ids)), atol=1e-3)
        # bidirectional: the first position sees the last token
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % VOCAB
        assert (model.hidden(changed)[0, 0] - h0[0, 0]).abs().max().item() > 1e-4


def test_too_long_input_raises() -> None:
    model = _model()
    model.hidden(torch.zeros(1, MAX_LEN, dtype=torch.long))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match=rf"{MAX_LEN + 1}.*{MAX_LEN}.*truncate"):
        model(torch.zeros(1, MAX_LEN + 1, dtype=torch.long))


def test_nsp_head() -> None:
    model = _model(nsp=True)
    assert "nsp_head.weight" in model.state_dict()
    ids = torch.randint(0, VOCAB, (4, 9))
    logits = model.nsp_logits(model.pooled(model.hidden(ids)))
    assert logits.shape == (4, 2)


def test_init_and_param_count() -> None:
    torch.manual_seed(0)
    model = EncoderModel(_cfg(init_std=0.05))
    state = model.state_dict()
    for name, p in state.items():
        if name.endswith("bias"):
            assert p.abs().max() == 0, name
        elif "norm" in name:
            assert torch.all(p == 1), name
    assert abs(state["tok_emb.weight"].std().item() - 0.05) < 0.005
    assert abs(state["blocks.0.mlp.up.weight"].std().item() - 0.05) < 0.01
    # the MLM decoder is the word embedding: no separate [vocab, d] matrix
    d, ff, L = D, 48, 2
    layer = 4 * (d * d + d) + 2 * 2 * d + (d * ff + ff) + (ff * d + d)
    embeddings = (VOCAB + MAX_LEN + 2) * d + 2 * d
    heads = (d * d + d) + (d * d + d) + 2 * d + VOCAB  # pooler, mlm dense, mlm norm, mlm bias
    assert model.num_params() == embeddings + L * layer + heads
    assert sum(p.numel() for p in model.parameters()) == model.num_params()


def test_dropout_only_in_training() -> None:
    model = _model(dropout=0.3)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.allclose(model(ids), model(ids))
