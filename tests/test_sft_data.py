"""SFT, preference and RL-prompt readers: assistant-only loss, file:line errors, counted skips, collation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.data.chat import ChatTemplate, get_chat_template, render_prompt_response
from lmforge.data.sft import collate_preferences, collate_sft, read_preferences, read_prompts, read_sft
from lmforge.errors import DataError
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.objectives import IGNORE_INDEX, causal_lm_loss

MAX_LEN = 64


def conversation(question: str, answer: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


CONVERSATIONS = [
    conversation("What is the capital of Velmora?", "Tarsk.", system="Be brief."),
    conversation("Is the coin still heads up?", "Yes, it is."),
    conversation("How many apples?", "Four.") + [{"role": "user", "content": "And pears?"},
                                               {"role": "assistant", "content": "Two pears."}],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([json.dumps(CONVERSATIONS)] * 20, vocab_size=600, show_progress=False)


@pytest.fixture(scope="module")
def template(tok: Tokenizer) -> ChatTemplate:
    return get_chat_template("lmforge", tok)


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


class LogitsSpy(nn.Module):
    """Calls the model and keeps its logits (with their gradient) for inspection."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.logits = self.model(input_ids)
        self.logits.retain_grad()
        return self.logits


def test_loss_only_on_assistant_tokens(tok: Tokenizer, template: ChatTemplate, tmp_path: Path) -> None:
    path = write(tmp_path / "sft.jsonl", [{"messages": c} for c in CONVERSATIONS])
    data = read_sft(path, tok, template, MAX_LEN)
    batch = collate_sft(data.examples, pad_id=tok.pad_id)
    # which targets the assistant wrote, from the template's rendering (target t is token t + 1)
    expected = torch.zeros_like(batch["labels"], dtype=torch.bool)
    for row, messages in enumerate(CONVERSATIONS):
        mask = template.render(messages).assistant_mask[1:]
        expected[row, : len(mask)] = torch.tensor(mask)
    assert torch.equal(batch["labels"] != IGNORE_INDEX, expected)

    torch.manual_seed(0)
    spy = LogitsSpy(DecoderLM(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=MAX_LEN, n_layer=1, n_head=2,
                                          d_model=32)))
    loss = causal_lm_loss(spy, batch).mean()
    loss.backward()
    touched = spy.logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, expected)  # prompts and padding get no gradient, every reply token does

    # giving the prompt positions real labels changes the loss: the masking above is what keeps them out
    leaky = dict(batch, labels=torch.where(batch["attention_mask"].bool(), torch.roll(batch["input_ids"], -1, 1),
                                           IGNORE_INDEX))
    assert not torch.isclose(causal_lm_loss(spy, leaky).mean(), loss)
    by_hand = torch.nn.functional.cross_entropy(spy.logits.detach()[expected], batch["labels"][expected])
    assert torch.isclose(loss, by_hand)


def test_examples_and_prompt_response_form(tok: Tokenizer, template: ChatTemplate, tmp_path: Path) -> None:
    messages = CONVERSATIONS[1]
    path = write(tmp_path / "sft.jsonl", [{"messages": messages, "meta": {"task": "x"}}, "",
                                          {"prompt": messages[0]["content"], "response": messages[1]["content"]},
                                          {"prompt": messages[:1], "response": messages[1]["content"]}])
    data = read_sft(path, tok, template, MAX_LEN)
    assert data.skipped == 0 and len(data.examples) == 3
    assert data.examples[0] == data.examples[1] == data.examples[2]
    ids = template.render(messages).ids
    example = data.examples[0]
    assert example["input_ids"] == ids[:-1]
    assert tok.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == "Yes, it is.<|end_of_turn|>"
    assert len(read_sft(path, tok, template, len(ids) - 1).examples) == 3  # the model reads all but the last
    with pytest.raises(DataError, match=f"{len(ids)} tokens, more than max_len={len(ids) - 2}"):
        read_sft(path, tok, template, len(ids) - 2)
    batch = collate_sft(data.examples + read_sft(write(tmp_path / "long.jsonl", [{"messages": CONVERSATIONS[2]}]),
                                                 tok, template, MAX_LEN).examples, pad_id=tok.pad_id)
    short = len(example["input_ids"])
    assert batch["input_ids"].shape[0] == 4
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert (batch["input_ids"][0, short:] == tok.pad_id).all() and (batch["labels"][0, short:] == IGNORE_INDEX).all()


GOOD = {"messages": CONVERSATIONS[0]}
BAD_LINES = [
    ("{not json", "invalid JSON"),
    ([1, 2], "expected a JSON object"),
    ({"messages": CONVERSATIONS[0][:2]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, CONVERSATIONS[0][2]]}, "'robot'.*system, user, assistant"),
    ({"messages": [{"role": "user", "content": 5}, CONVERSATIONS[0][2]]}, "content must be a string"),
    ({"messages": conversation("Hi?", " ")}, "empty content"),
    ({"prompt": "", "response": "Tarsk."}, "field 'prompt' is empty"),
    ({"prompt": "Hi?", "response": "Tarsk.", "messages": CONVERSATIONS[0]}, "not both"),
    ({"prompt": "Hi?"}, "missing field 'response'"),
    ({"prompt": {"text": "Hi?"}, "response": "Tarsk."}, "expected a string or a list of messages"),
    ({"prompt": "What is the capital? " * 40, "response": "Tarsk."}, "more than max_len=64"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_names_file_and_line(tok: Tokenizer, template: ChatTemplate, tmp_path: Path, line: object,
                                      message: str) -> None:
    path = write(tmp_path / "sft.jsonl", [GOOD, line])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + f".*{message}.*--skip-bad-lines"):
        read_sft(path, tok, template, MAX_LEN)


def test_skip_bad_lines_counts_them(tok: Tokenizer, template: ChatTemplate, tmp_path: Path) -> None:
    path = write(tmp_path / "sft.jsonl", [GOOD] + [line for line, _ in BAD_LINES] + [GOOD])
    data = read_sft(path, tok, template, MAX_LEN, skip_bad_lines=True)
    assert data.skipped == len(BAD_LINES) and len(data.examples) == 2
    only_bad = write(tmp_path / "bad.jsonl", [line for line, _ in BAD_LINES[:3]])
    with pytest.raises(DataError, match="no examples \\(all 3 lines were bad\\)"):
        read_sft(only_bad, tok, template, MAX_LEN, skip_bad_lines=True)
    with pytest.raises(ValueError, match="different tokenizer"):
        read_sft(path, tok, get_chat_template("lmforge", train_tokenizer(["a b"], 600, show_progress=False)), 64)


def test_preferences(tok: Tokenizer, template: ChatTemplate, tmp_path: Path) -> None:
    prompt = CONVERSATIONS[2][:3]  # a multi-turn prompt: its earlier reply is not part of the response
    lines = [{"prompt": "What is the capital of Velmora?", "chosen": "Tarsk.", "rejected": "I am not sure, sorry."},
             {"prompt": prompt, "chosen": "Two pears.", "rejected": "Seven."},
             {"prompt": "Hi?", "chosen": "Tarsk.", "rejected": "Tarsk. "}]
    path = write(tmp_path / "prefs.jsonl", lines)
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + ".*identical"):
        read_preferences(path, tok, template, MAX_LEN)
    data = read_preferences(path, tok, template, MAX_LEN, skip_bad_lines=True)
    assert data.skipped == 1 and len(data.examples) == 2
    second = data.examples[1]
    assert second["chosen_ids"] == render_prompt_response(template, prompt, "Two pears.").ids
    batch = collate_preferences(data.examples, pad_id=tok.pad_id)
    width = batch["chosen_ids"].shape[1]
    assert batch["rejected_ids"].shape == (2, width) and batch["chosen_mask"].dtype == torch.bool
    for row, line in enumerate(lines[:2]):
        for key in ("chosen", "rejected"):
            ids, mask = batch[f"{key}_ids"][row], batch[f"{key}_mask"][row]
            assert tok.decode(ids[mask].tolist()) == line[key] + "<|end_of_turn|>"
            n = len(data.examples[row][f"{key}_ids"])
            assert batch[f"{key}_attention"][row].tolist() == [1] * n + [0] * (width - n)
            assert (ids[n:] == tok.pad_id).all()
    with pytest.raises(DataError, match="more than max_len=8"):
        read_preferences(path, tok, template, 8)


def test_prompts(tok: Tokenizer, template: ChatTemplate, tmp_path: Path) -> None:
    meta = {"task": "facts", "answer": "Tarsk", "format": "one_word"}
    path = write(tmp_path / "prompts.jsonl", [{"prompt": "What is the capital of Velmora?", "meta": meta},
                                              {"prompt": CONVERSATIONS[2][:3]},
                                              {"prompt": "Hi?", "meta": "facts"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: ") + ".*'meta' has type str"):
        read_prompts(path, tok, template, MAX_LEN)
    data = read_prompts(path, tok, template, MAX_LEN, skip_bad_lines=True)
    first, second = data.examples
    assert first["meta"] == meta and second["meta"] == {}
    assert tok.decode(first["prompt_ids"]) == ("<|bos|><|user|>What is the capital of Velmora?<|end_of_turn|>"
                                               "<|assistant|>")
    assert second["prompt_ids"] == template.render(CONVERSATIONS[2][:3], add_generation_prompt=True).ids
    single = write(tmp_path / "one.jsonl", [{"prompt": "What is the capital of Velmora?"}])
    n = len(first["prompt_ids"])
    assert read_prompts(single, tok, template, n + 1).examples[0]["prompt_ids"] == first["prompt_ids"]
    with pytest.raises(DataError, match=re.escape(f"{single}:1: ") + ".*leaving no room for a reply"):
        read_prompts(single, tok, template, n)
