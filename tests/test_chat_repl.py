"""`lmforge chat` (driven through stdin) and `lmforge generate --chat`: each turn's prompt is the chat template applied
to the history, replies stream and stop at end of turn, /reset, /system, /save, the oldest exchanges leave a full
context, a greedy reply is what generation from the rendered prompt gives; models that do not chat are refused."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

import lmforge
from cli_checks import error_line
from lmforge.checkpoint import save
from lmforge.cli import main
from lmforge.config import EncDecConfig, EncoderConfig, ModelConfig
from lmforge.data.chat import get_chat_template
from lmforge.infer import chat_repl
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.layout import column_major_linears
from lmforge.manifest import CheckpointManifest
from lmforge.model import build_model
from lmforge.tokenizer import END_OF_TURN, USER, train_tokenizer
from tiny_decoders import forced_model

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 64
TEXT = "the king rode to the castle and the queen sang of the river and the moon"


def _sft_run(model: torch.nn.Module, tok, path: Path) -> Path:
    """A checkpoint recorded as an SFT run with the lmforge chat template, as `lmforge sft` writes one."""
    return save(model, tok, path, run_config=CheckpointManifest(model=model.cfg, stage="sft",
                                                                run={"template": "lmforge"}))


def _turn_model(tok, word: int) -> torch.nn.Module:
    """A model whose greedy token depends on the position only: `word` three times in four, end of turn on the
    fourth."""
    model = forced_model(tok.vocab_size, 1, [], max_seq_len=CONTEXT)
    with torch.no_grad():
        for position in range(CONTEXT):
            model.lm_head.weight[tok.token_id(END_OF_TURN) if position % 4 == 3 else word, position] = 10.0
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("chat")
    tok = train_tokenizer([TEXT] * 40, vocab_size=400, show_progress=False)
    word = tok.encode(" the")[0]
    torch.manual_seed(0)
    chatty = build_model(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=CONTEXT, n_layer=1, n_head=2, d_model=32,
                                     init_std=0.2))
    w = {"root": root, "tok": tok, "word": word, "turns": _sft_run(_turn_model(tok, word), tok, root / "turns"),
         "role_writer": _sft_run(_turn_model(tok, tok.token_id(USER)), tok, root / "role_writer"),
         "chatty": _sft_run(chatty, tok, root / "chatty"), "plain": lmforge.save(chatty, tok, root / "plain")}
    w["encoder"] = lmforge.save(build_model(EncoderConfig(vocab_size=tok.vocab_size, max_seq_len=CONTEXT, n_layer=1,
                                                          n_head=2, d_model=16)), tok, root / "encoder")
    w["t5"] = lmforge.save(build_model(EncDecConfig(vocab_size=tok.vocab_size, max_seq_len=CONTEXT, n_layer=1,
                                                    n_head=2, head_dim=8, d_model=16, d_ff=32)), tok, root / "t5")
    return w


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    """Spies on the REPL's generation: per reply, the prompt ids and the stdout printed after each new token."""
    calls: list[dict] = []

    def spy(model, prompt_ids, cfg, eos_id=None, on_token=None):
        call = {"ids": list(prompt_ids), "stops": set(eos_id), "printed": []}
        calls.append(call)
        seen = [sys.stdout.getvalue()]  # capsys's stdout: what came before this reply

        def token(tid: int) -> bool | None:
            stop = on_token(tid)
            now = sys.stdout.getvalue()
            call["printed"].append(now[len(seen[0]):])
            seen[0] = now
            return stop

        return generate_ids(model, prompt_ids, cfg, eos_id, on_token=token)

    monkeypatch.setattr(chat_repl, "generate_ids", spy)
    return calls


def chat(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run: Path, lines: list[str],
         *options: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", str(run), *options])
    out, err = capsys.readouterr()
    return code, out, err


def test_each_turn_renders_the_history_and_streams_a_reply_that_stops_at_end_of_turn(world, prompts, monkeypatch,
                                                                                     capsys) -> None:
    saved = world["root"] / "conversation.json"
    code, _, err = chat(monkeypatch, capsys, world["turns"], ["Hello there", "", "What of the castle?",
                                                              f"/save {saved}", "/exit", "never read"],
                        "--system", "Be brief.", "--max-new-tokens", "12")
    assert code == 0, err
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages[:2]] == ["Be brief.", "Hello there"]
    assert messages[3]["content"] == "What of the castle?"
    template = get_chat_template("lmforge", world["tok"])
    assert [call["ids"] for call in prompts] == [template.render(messages[:2], add_generation_prompt=True).ids,
                                                 template.render(messages[:4], add_generation_prompt=True).ids]
    assert all(call["stops"] == set(template.stop_ids) for call in prompts)
    for call, answer in zip(prompts, (messages[2], messages[4]), strict=True):
        # streamed: the reply's text came out token by token, then a newline; it ended at the end-of-turn token
        # (the model says it on every fourth position), long before --max-new-tokens
        assert 1 <= len(call["printed"]) <= 3 and all(call["printed"])
        assert "".join(call["printed"]) == answer["content"] == world["tok"].decode([world["word"]] *
                                                                                   len(call["printed"]))
    assert len(prompts) == 2  # the empty line asked nothing, and nothing after /exit was read
    assert "lmforge template" in err and "/save" in err


def test_reset_clears_the_history_and_system_replaces_the_prompt(world, prompts, monkeypatch, capsys) -> None:
    saved = world["root"] / "after_reset.json"
    code, _, err = chat(monkeypatch, capsys, world["turns"], ["First question", "/reset", "Second question",
                                                              "/system Answer in French.", "Third question",
                                                              f"/save {saved}"], "--system", "Be brief.",
                        "--max-new-tokens", "8")
    assert code == 0, err
    messages = json.loads(saved.read_text())
    assert [(m["role"], m["content"]) for m in messages if m["role"] != "assistant"] == [
        ("system", "Answer in French."), ("user", "Second question"), ("user", "Third question")]
    template = get_chat_template("lmforge", world["tok"])
    system = {"role": "system", "content": "Be brief."}
    assert prompts[1]["ids"] == template.render([system, {"role": "user", "content": "Second question"}],
                                                add_generation_prompt=True).ids
    assert prompts[2]["ids"] == template.render(messages[:-1], add_generation_prompt=True).ids
    assert "[history cleared]" in err and "[system prompt set]" in err and "dropped" not in err


def test_a_full_context_drops_the_oldest_exchanges_and_keeps_the_system_prompt(world, prompts, monkeypatch,
                                                                               capsys) -> None:
    saved = world["root"] / "long.json"
    lines = [f"question number {i} about the king and the queen" for i in range(8)]
    code, _, err = chat(monkeypatch, capsys, world["turns"], [*lines, f"/save {saved}"], "--system", "Be brief.",
                        "--max-new-tokens", "8")
    assert code == 0, err
    messages = json.loads(saved.read_text())
    assert len(messages) == 1 + 2 * len(lines)  # /save keeps the whole conversation
    template = get_chat_template("lmforge", world["tok"])
    lengths = [len(call["ids"]) for call in prompts]
    assert max(lengths) <= CONTEXT - 8
    last = prompts[-1]["ids"]
    kept = next(start for start in range(1, len(messages), 2)
                if template.render([messages[0], *messages[start:-1]], add_generation_prompt=True).ids == last)
    assert kept > 1  # the oldest exchanges left the prompt; the system prompt stayed at its head
    assert "dropped the" in err and "oldest exchange" in err and "system prompt is kept" in err


def test_greedy_reply_is_generation_from_the_rendered_prompt(world, monkeypatch, capsys) -> None:
    template = get_chat_template("lmforge", world["tok"])
    model, tok = lmforge.load(world["chatty"])
    column_major_linears(model)  # as the commands run it
    conversation = [{"role": "user", "content": "Where did the king ride?"}]
    prompt = template.render(conversation, add_generation_prompt=True).ids
    expected = tok.decode(generate_ids(model, prompt, SamplingConfig(max_new_tokens=10), template.stop_ids),
                          skip_special_tokens=True)
    code, out, err = chat(monkeypatch, capsys, world["chatty"], ["Where did the king ride?"], "--max-new-tokens", "10")
    assert (code, out) == (0, expected + "\n"), err
    assert main(["generate", str(world["chatty"]), "--chat", "--prompt", "Where did the king ride?",
                 "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    messages = world["root"] / "messages.json"
    messages.write_text(json.dumps(conversation))
    assert main(["generate", str(world["plain"]), "--chat", "--template", "lmforge", "--messages", str(messages),
                 "--max-new-tokens", "10", "--no-stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    # exported to Hugging Face format, the template travels as Jinja in tokenizer_config.json and renders the same ids
    exported = lmforge.export_hf(model, tok, world["root"] / "chatty-hf", chat_template="lmforge")
    assert main(["generate", str(exported), "--chat", "--prompt", "Where did the king ride?",
                 "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_a_single_turn_template_answers_each_message_on_its_own(world, prompts, monkeypatch, capsys) -> None:
    code, _, err = chat(monkeypatch, capsys, world["turns"], ["First question", "Second question"],
                        "--template", "alpaca", "--max-new-tokens", "8", "--system", "Answer.")
    assert code == 0 and len(prompts) == 2, err
    template = get_chat_template("alpaca", world["tok"])
    assert prompts[1]["ids"] == template.render([{"role": "system", "content": "Answer."},
                                                 {"role": "user", "content": "Second question"}],
                                                add_generation_prompt=True).ids
    assert "single-turn" in err and "dropped" not in err


@pytest.mark.parametrize("content, fragments", [
    ("[{\"role\": \"user\", ", ["bad.json", "not valid JSON", "line 1"]),
    ("{\"role\": \"user\", \"content\": \"hi\"}", ["bad.json", "JSON list", "dict"]),
    ("{}", ["bad.json", "JSON list", "got dict"]),
    ("[]", ["bad.json", "got an empty list"]),
    ("[{\"role\": \"robot\", \"content\": \"hi\"}]", ["bad.json", "message 0", "'robot'"]),
    ("[{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]",
     ["bad.json", "last message is an assistant turn"]),
])
def test_a_malformed_messages_file_is_one_line_naming_it(world, capsys, content: str, fragments: list[str]) -> None:
    bad = world["root"] / "bad.json"
    bad.write_text(content)
    assert main(["generate", str(world["chatty"]), "--chat", "--messages", str(bad)]) == 2
    message = error_line(capsys.readouterr().err)
    assert all(f in message for f in fragments), message


@pytest.mark.parametrize("argv, fragments", [
    (["chat", "{encoder}"], ["an encoder (BERT)", "`lmforge chat` needs a decoder", "finetune", "export"]),
    (["generate", "{encoder}", "--prompt", "x"], ["an encoder (BERT)", "finetune", "export"]),
    (["chat", "{t5}"], ["an encoder-decoder (T5)", "lmforge generate (text to text)", "eval tasks"]),
    (["generate", "{t5}", "--chat", "--prompt", "x"], ["an encoder-decoder (T5)", "eval tasks"]),
    (["chat", "{plain}"], ["records no chat template", "--template lmforge"]),
    (["generate", "{chatty}", "--messages", "m.json"], ["--messages goes with --chat"]),
    (["chat", "{chatty}", "--max-new-tokens", "64"], ["--max-new-tokens 64", "64-token context"]),
])
def test_models_and_options_that_do_not_chat_are_refused(world, monkeypatch, capsys, argv, fragments) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main([a.format(**world) for a in argv]) == 2
    out, err = capsys.readouterr()
    message = error_line(err)
    assert out == "" and all(f in message for f in fragments), message


def test_a_message_that_cannot_fit_is_refused_and_the_chat_goes_on(world, prompts, monkeypatch, capsys) -> None:
    code, out, err = chat(monkeypatch, capsys, world["turns"], [" ".join([TEXT] * 8), "/frobnicate", "short one"],
                          "--max-new-tokens", "8")
    assert code == 0
    assert "does not fit the 64-token context" in err and "unknown command /frobnicate" in err
    assert len(prompts) == 1 and out.count("\n") == 1  # the short message got its reply


def test_a_reply_holding_a_role_token_does_not_break_the_next_turn(world, prompts, monkeypatch, capsys) -> None:
    """Special tokens are left out of replies: a <|user|> the model writes would make the history unrenderable."""
    code, out, err = chat(monkeypatch, capsys, world["role_writer"], ["First question", "Second question"],
                          "--max-new-tokens", "8")
    assert (code, len(prompts), out) == (0, 2, "\n\n"), err
    assert "error" not in err


def test_a_line_that_is_not_utf8_is_one_error_and_the_chat_goes_on(world, prompts, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\nhello\n"), encoding="utf-8"))
    assert main(["chat", str(world["turns"]), "--max-new-tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert "the message is not valid UTF-8 text (the byte 0xe9" in err and "Traceback" not in err
    assert len(prompts) == 1
