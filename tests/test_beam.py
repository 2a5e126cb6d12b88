"""Beam search: exact against exhaustive search, equal to greedy at one beam, and equal to transformers'."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.infer.beam import beam_search
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.model.decoder import DecoderLM
from near_ties import assert_clear_greedy, assert_clear_ranking

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(vocab: int, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, max_seq_len=16, n_layer=1, n_head=2, d_model=16, init_std=0.5)
    return DecoderLM(cfg).eval()


def _exhaustive(model: DecoderLM, prompt: list[int], length: int) -> list[tuple[list[int], float]]:
    """Every continuation of `length` tokens with its summed log-prob, best first."""
    vocab = model.cfg.vocab_size
    conts = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
    seqs = torch.cat([torch.tensor(prompt).expand(len(conts), -1), conts], dim=1)
    with torch.no_grad():
        logp = model(seqs[:, :-1]).log_softmax(dim=-1)[:, len(prompt) - 1:]
    total = logp.gather(-1, conts[..., None]).squeeze(-1).sum(dim=-1)
    order = total.argsort(descending=True)
    return [(conts[i].tolist(), float(total[i])) for i in order]


def test_beam_matches_exhaustive_search() -> None:
    """With num_beams = V^(L-1) nothing is pruned: the top hypotheses are the exhaustive top, scored logp / L."""
    model, length = _tiny(6), 3
    for prompt in ([1], [4, 2, 0]):
        best = _exhaustive(model, prompt, length)
        assert_clear_ranking([s for _, s in best[:6]], f"exhaustive top 6 after {prompt}")
        beams = beam_search(model, prompt, num_beams=36, max_new_tokens=length, num_return=5)
        assert [ids for ids, _ in beams] == [ids for ids, _ in best[:5]]
        assert [s for _, s in beams] == pytest.approx([s / length for _, s in best[:5]], abs=1e-5)
        # a narrow beam may miss the optimum but can never beat it
        assert beam_search(model, prompt, num_beams=2, max_new_tokens=length)[0][1] <= best[0][1] / length + 1e-6


def test_one_beam_is_greedy() -> None:
    model = _tiny(6)
    for prompt in ([0], [3, 5, 1]):
        greedy = generate_ids(model, prompt, SamplingConfig(max_new_tokens=8, temperature=0))
        assert_clear_greedy(model, prompt, greedy)
        assert beam_search(model, prompt, num_beams=1, max_new_tokens=8)[0][0] == greedy


def test_validation() -> None:
    model = _tiny(6)
    for kw in ({"num_beams": 0, "max_new_tokens": 3}, {"num_beams": 2, "max_new_tokens": 0},
               {"num_beams": 2, "max_new_tokens": 16}, {"num_beams": 2, "max_new_tokens": 3, "num_return": 3}):
        with pytest.raises(LmforgeError):
            beam_search(model, [1], **kw)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_beam_matches_transformers(family: str, tmp_path) -> None:
    """Same sequences and scores as transformers' generate(num_beams=B, early_stopping=False), EOS included."""
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import load_hf

    torch.manual_seed(0)
    vocab = 40
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=None, eos_token_id=None))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.eval().save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_hf(tmp_path)
    n_new = 8
    for prompt in ([3, 7, 1], [12], [5, 5, 30, 2]):
        # EOS = the greedy path's 3rd token, so finished hypotheses compete with running ones
        greedy = generate_ids(model, prompt, SamplingConfig(max_new_tokens=3, temperature=0))
        assert_clear_greedy(model, prompt, greedy)
        eos = greedy[-1]
        for beams in (2, 4):
            out = hf.generate(torch.tensor([prompt]), num_beams=beams, num_return_sequences=beams, do_sample=False,
                              max_new_tokens=n_new, early_stopping=False, length_penalty=1.0, eos_token_id=eos,
                              pad_token_id=eos, return_dict_in_generate=True, output_scores=True)
            expected = []
            for row in out.sequences[:, len(prompt):].tolist():
                expected.append(row[:row.index(eos)] if eos in row else row)
            ours = beam_search(model, prompt, num_beams=beams, max_new_tokens=n_new, eos_id=eos, num_return=beams)
            assert_clear_ranking([s for _, s in ours], f"{beams} beams after {prompt}")
            assert [ids for ids, _ in ours] == expected
            assert [s for _, s in ours] == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)


def test_a_prompt_too_long_is_refused_or_cut_to_its_last_tokens_as_generate_does() -> None:
    model = _tiny(6)
    prompt = [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2]  # 14 tokens: 8 new ones need 22 of the 16-token context
    with pytest.raises(LmforgeError, match="--truncate-prompt"):
        beam_search(model, prompt, num_beams=2, max_new_tokens=8)
    cut = beam_search(model, prompt, num_beams=2, max_new_tokens=8, truncate_prompt=True)
    assert cut == beam_search(model, prompt[-8:], num_beams=2, max_new_tokens=8)


def test_any_of_several_stop_ids_ends_a_hypothesis() -> None:
    model = _tiny(6)
    (best, _), = beam_search(model, [1, 2], num_beams=3, max_new_tokens=6)
    first = best[0]  # a stop id the best hypothesis starts with: listed with another, it ends that hypothesis at once
    assert all(ids == [] or first not in ids for ids, _ in beam_search(model, [1, 2], 3, 6, eos_id=[first, 99]))
