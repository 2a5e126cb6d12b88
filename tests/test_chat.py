"""Chat templates: exact renderings, assistant masks, generation prompts, Hugging Face Jinja templates, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.chat import (
    ALPACA_PREAMBLE,
    ChatTemplate,
    HFChatTemplate,
    get_chat_template,
    render_prompt_response,
)
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.tokenizer import Tokenizer, train_tokenizer

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of Velmora?"},
    {"role": "assistant", "content": "Tarsk."},
    {"role": "user", "content": "And its language?"},
    {"role": "assistant", "content": "Velmoran."},
]
SINGLE = CONV[:3]

CHATML = (
    "{%- for message in messages %}\n"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [json.dumps(CONV), "What is the capital of Velmora? The capital is Tarsk. ### Instruction: [INST]"] * 20
    return train_tokenizer(texts, vocab_size=600, show_progress=False)


@pytest.fixture(scope="module")
def chatml_tok(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` with ChatML's two special tokens added, as a Qwen-style tokenizer has them."""
    backend = HFTokenizer.from_str(tok.backend.to_str())
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(backend)


def runs(tok: Tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """The decoded text of each maximal run of masked tokens."""
    out: list[list[int]] = []
    for i, (tid, mine) in enumerate(zip(ids, mask, strict=True)):
        if mine:
            if i == 0 or not mask[i - 1]:
                out.append([])
            out[-1].append(tid)
    return [tok.decode(r) for r in out]


def test_lmforge_rendering(tok: Tokenizer) -> None:
    r = get_chat_template("lmforge", tok).render(CONV)
    expected = ("<|bos|><|system|>Be brief.<|end_of_turn|><|user|>What is the capital of Velmora?<|end_of_turn|>"
                "<|assistant|>Tarsk.<|end_of_turn|><|user|>And its language?<|end_of_turn|>"
                "<|assistant|>Velmoran.<|end_of_turn|>")
    assert tok.decode(r.ids) == expected
    assert runs(tok, r.ids, r.assistant_mask) == ["Tarsk.<|end_of_turn|>", "Velmoran.<|end_of_turn|>"]
    assert get_chat_template("lmforge", tok).stop_ids[0] == tok.token_id("<|end_of_turn|>")


def test_llama2_rendering(tok: Tokenizer) -> None:
    r = get_chat_template("llama2", tok).render(CONV)
    expected = ("<|bos|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of Velmora? [/INST] Tarsk. <|eos|>"
                "<|bos|>[INST] And its language? [/INST] Velmoran. <|eos|>")
    assert tok.decode(r.ids) == expected
    assert runs(tok, r.ids, r.assistant_mask) == [" Tarsk. <|eos|>", " Velmoran. <|eos|>"]


def test_alpaca_rendering(tok: Tokenizer) -> None:
    template = get_chat_template("alpaca", tok)
    r = template.render(SINGLE)
    body = "\n\n### Instruction:\nWhat is the capital of Velmora?\n\n### Response:\nTarsk.<|eos|>"
    assert tok.decode(r.ids) == "<|bos|>Be brief." + body
    assert runs(tok, r.ids, r.assistant_mask) == ["Tarsk.<|eos|>"]
    assert tok.decode(template.render(SINGLE[1:]).ids) == "<|bos|>" + ALPACA_PREAMBLE + body
    with pytest.raises(DataError, match="one user turn and one reply"):
        template.render(CONV)


def test_hf_chatml_rendering_and_mask(chatml_tok: Tokenizer) -> None:
    template = HFChatTemplate(CHATML, chatml_tok)
    r = template.render(CONV)
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of Velmora?<|im_end|>\n"
                "<|im_start|>assistant\nTarsk.<|im_end|>\n<|im_start|>user\nAnd its language?<|im_end|>\n"
                "<|im_start|>assistant\nVelmoran.<|im_end|>\n")
    assert chatml_tok.decode(r.ids) == expected
    # the newline the template writes after <|im_end|> is not the assistant's
    assert runs(chatml_tok, r.ids, r.assistant_mask) == ["Tarsk.<|im_end|>", "Velmoran.<|im_end|>"]
    assert chatml_tok.token_id("<|im_end|>") in template.stop_ids
    default_system = template.render(CONV[1:3])
    assert chatml_tok.decode(default_system.ids).startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_hf_llama2_jinja_matches_builtin(tok: Tokenizer) -> None:
    """Meta's Llama-2 format written as a Jinja template gives the built-in template's ids and mask."""
    hf = HFChatTemplate(LLAMA2_JINJA, tok, bos_token="<|bos|>", eos_token="<|eos|>")
    builtin = get_chat_template("llama2", tok)
    assert hf.render(CONV) == builtin.render(CONV)
    assert hf.render(CONV[:4], add_generation_prompt=True) == builtin.render(CONV[:4], add_generation_prompt=True)
    with pytest.raises(DataError, match="roles must alternate"):
        hf.render([CONV[1], CONV[1]])


def test_hf_generation_tag_renders_its_body(chatml_tok: Tokenizer) -> None:
    tagged = CHATML.replace("+ message['content'] +", "}}{% generation %}{{ message['content'] }}"
                                                        "{% endgeneration %}{{")
    assert tagged != CHATML
    assert HFChatTemplate(tagged, chatml_tok).render(CONV) == HFChatTemplate(CHATML, chatml_tok).render(CONV)


def templates(tok: Tokenizer, chatml_tok: Tokenizer) -> list[tuple[ChatTemplate, list[dict]]]:
    return [(get_chat_template("lmforge", tok), CONV), (get_chat_template("llama2", tok), CONV),
            (get_chat_template("alpaca", tok), SINGLE), (HFChatTemplate(CHATML, chatml_tok), CONV),
            (HFChatTemplate(LLAMA2_JINJA, tok, "<|bos|>", "<|eos|>"), CONV)]


@pytest.mark.parametrize("index", range(5))
def test_generation_prompt_ends_where_the_reply_begins(tok: Tokenizer, chatml_tok: Tokenizer, index: int) -> None:
    template, conv = templates(tok, chatml_tok)[index]
    for i, message in enumerate(conv):
        if message["role"] != "assistant":
            continue
        prompt = template.render(conv[:i], add_generation_prompt=True)
        full = template.render(conv[: i + 1])
        n = len(prompt.ids)
        assert full.ids[:n] == prompt.ids
        tail = full.assistant_mask[n:]
        mine = tail.index(False) if False in tail else len(tail)  # ChatML's trailing newline is not the reply's
        assert mine > 0 and not any(tail[mine:]) and not any(full.assistant_mask[n - 1:n])
        assert template.tokenizer.decode(full.ids[n + mine:]).strip() == ""
        assert full.assistant_mask[:n] == prompt.assistant_mask and len(full.ids) > n
        assert template.tokenizer.decode(full.ids[n:]).strip().startswith(message["content"].strip())
    ending = template.tokenizer.decode(template.render(conv[:-1], add_generation_prompt=True).ids)
    assert ending.endswith(("<|assistant|>", "[/INST]", "### Response:\n", "<|im_start|>assistant\n"))


def test_render_prompt_response_marks_only_the_response(tok: Tokenizer) -> None:
    template = get_chat_template("lmforge", tok)
    simple = render_prompt_response(template, "What is the capital of Velmora?", "Tarsk.")
    assert simple == template.render([CONV[1], CONV[2]])
    multi = render_prompt_response(template, CONV[:4], "Velmoran.")
    assert multi.ids == template.render(CONV).ids
    assert runs(tok, multi.ids, multi.assistant_mask) == ["Velmoran.<|end_of_turn|>"]


@pytest.mark.parametrize("name", ["lmforge", "llama2", "alpaca"])
def test_errors(tok: Tokenizer, name: str) -> None:
    template = get_chat_template(name, tok)
    with pytest.raises(DataError, match=r"'robot'.*system, user, assistant"):
        template.render([{"role": "robot", "content": "beep"}, CONV[2]])
    with pytest.raises(DataError, match="no assistant turn"):
        template.render(CONV[:2], require_assistant=True)
    with pytest.raises(DataError, match="non-empty list"):
        template.render([])
    with pytest.raises(DataError, match="content must be a string"):
        template.render([{"role": "user", "content": ["a", "b"]}])
    with pytest.raises(DataError, match="last message is an assistant turn"):
        template.render(SINGLE, add_generation_prompt=True)
    with pytest.raises(DataError, match=re.escape("special token '<|eos|>'")):
        template.render([{"role": "user", "content": "stop<|eos|>"}])
    assert template.render(CONV[:2], add_generation_prompt=True).ids  # a prompt needs no assistant turn


def test_get_chat_template_hf(tok: Tokenizer, tmp_path: Path) -> None:
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": {"content": "<|bos|>"}, "eos_token": "<|eos|>"}))
    with pytest.raises(LmforgeError, match="tokenizer_config.json has no chat_template"):
        get_chat_template("hf", tok, tmp_path)
    config.write_text(json.dumps({"bos_token": {"content": "<|bos|>"}, "eos_token": "<|eos|>",
                                  "chat_template": LLAMA2_JINJA}))
    hf = get_chat_template("hf", tok, tmp_path)
    assert hf.render(CONV) == get_chat_template("llama2", tok).render(CONV)
    (tmp_path / "chat_template.jinja").write_text(CHATML)  # newer transformers save it on its own
    assert tok.decode(get_chat_template("hf", tok, tmp_path).render(CONV).ids).startswith("<|im_start|>system")
    with pytest.raises(ConfigError, match="unknown chat template 'chatml'"):
        get_chat_template("chatml", tok)
