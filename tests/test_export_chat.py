"""A chat model exported to Hugging Face format keeps its chat format: transformers' apply_chat_template gives
lmforge's ids (and assistant mask) for each template, and generate stops at every stop token of the template."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, trainers

import lmforge
from lmforge.config import ModelConfig
from lmforge.data.chat import get_chat_template
from lmforge.errors import ConfigError, DataError
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import END_OF_TURN, EOS, Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

SYSTEM = {"role": "system", "content": "Be brief."}
CONVERSATIONS = [
    [SYSTEM, {"role": "user", "content": "What is the capital of Velmora?"}, {"role": "assistant", "content": "Tarsk."},
     {"role": "user", "content": "And its language?"}, {"role": "assistant", "content": " Velmoran, mostly.\n"}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"},
     {"role": "user", "content": "Again?"}],
    [SYSTEM, {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Name a colour."}],
]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [json.dumps(c) for c in CONVERSATIONS] * 10 + ["### Instruction: [INST] <<SYS>> Response"] * 10
    tok = train_tokenizer(texts, vocab_size=500, show_progress=False)
    tok.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # for the hf (ChatML) case
    return tok


def _model(tok: Tokenizer, **kw) -> DecoderLM:
    torch.manual_seed(0)
    kw = {"family": "llama", "n_kv_head": 2} | kw
    return DecoderLM(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=64, n_layer=1, n_head=4, d_model=32,
                                 **kw)).eval()


def _template(name: str, tok: Tokenizer, tmp_path):
    if name != "hf":
        return get_chat_template(name, tok)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return get_chat_template("hf", tok, tmp_path / "base")


@pytest.mark.parametrize("name", ["lmforge", "llama2", "alpaca", "hf"])
def test_apply_chat_template_gives_lmforge_ids(tmp_path, tok, name):
    template = _template(name, tok, tmp_path)
    out = lmforge.export_hf(_model(tok), tok, tmp_path / "export", chat_template=template)
    theirs = AutoTokenizer.from_pretrained(out)
    checked = 0
    for conversation in CONVERSATIONS:
        for generation_prompt in (False, True):
            if generation_prompt and conversation[-1]["role"] == "assistant":
                continue
            try:
                ours = template.render(conversation, generation_prompt)
            except DataError:  # a shape the template does not take (alpaca is single-turn)
                continue
            got = theirs.apply_chat_template(conversation, tokenize=True, add_generation_prompt=generation_prompt,
                                             return_dict=True, return_assistant_tokens_mask=name != "hf")
            assert got["input_ids"] == ours.ids, (conversation, generation_prompt)
            if name != "hf":  # lmforge's templates mark what the assistant wrote, as lmforge's mask does
                assert [bool(m) for m in got["assistant_masks"]] == ours.assistant_mask
            checked += 1
    assert checked >= 3
    generation = json.loads((out / "generation_config.json").read_text())
    assert set(template.stop_ids) <= set(generation["eos_token_id"])
    if name == "lmforge":
        assert tok.token_id(END_OF_TURN) in generation["eos_token_id"]


def test_transformers_generate_stops_at_the_end_of_turn(tmp_path, tok):
    """A model that always predicts <|end_of_turn|> (the final norm outputs a constant the head maps to it):
    transformers' generate stops after one token, as lmforge's chat generation does."""
    model = _model(tok, family="gpt2", n_kv_head=None, tie_embeddings=False)
    end = tok.token_id(END_OF_TURN)
    with torch.no_grad():
        model.final_norm.weight.zero_()
        model.final_norm.bias.zero_()
        model.final_norm.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[end, 0] = 10.0
    out = lmforge.export_hf(model, tok, tmp_path / "export", chat_template="lmforge")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = get_chat_template("lmforge", tok).render(CONVERSATIONS[3], add_generation_prompt=True).ids
    generated = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)[0, len(prompt):]
    assert generated.tolist() == [end]


def test_a_template_the_tokenizer_cannot_join_is_refused(tmp_path):
    """A BPE without pre-tokenization merges across the pieces lmforge encodes apart (":\\n Hi" below), so no Jinja
    source can give lmforge's ids: refused in one line, nothing written."""
    backend = HFTokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=[EOS], show_progress=False)
    backend.train_from_iterator(["### Response:\n Hi! How can I help?"] * 50, trainer=trainer)
    tok = Tokenizer(backend)
    with pytest.raises(ConfigError, match="alpaca chat template cannot be exported as Jinja") as err:
        lmforge.export_hf(_model(tok), tok, tmp_path / "export", chat_template="alpaca")
    assert "\n" not in str(err.value) and not (tmp_path / "export").exists()
