"""The command line's options: every config key of a training stage is an option, the PEFT methods come from the
config, and a usage error comes back from `main` as exit status 2 and one `lmforge: error:` line."""

from __future__ import annotations

import typing

import pytest

from cli_checks import error_line
from lmforge.cli import STAGES, build_parser, main, stage_config
from lmforge.config import PeftConfig
from lmforge.config_loading import config_keys


@pytest.mark.parametrize("verb", STAGES)
def test_every_config_key_is_an_option(verb: str) -> None:
    """`--KEY=VALUE` parses for each key of the stage's config, spelt as in the config (flags' dashes aside)."""
    parser = build_parser(verb, with_config_keys=True)
    keys = config_keys(stage_config(verb), leaves_only=True)
    assert "train.lr" in keys and "train" not in keys
    for key in keys:
        option = f"--{key}"
        action = next(a for a in parser._subcommands_action.choices[verb]._actions if option in a.option_strings)
        value = action.choices[0] if action.choices else 1 if action.nargs != 0 else None
        args = parser.parse_args([verb, option] if value is None else [verb, f"{option}={value}"])[verb]
        assert key in args, key


def test_peft_methods_are_the_configs(capsys: pytest.CaptureFixture[str]) -> None:
    methods = typing.get_args(PeftConfig.model_fields["method"].annotation)
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    assert "|".join(methods) in "".join(capsys.readouterr().out.split())  # the help lists them
    assert main(["sft", "--peft", "no-such-method"]) == 2
    message = error_line(capsys.readouterr().err)
    assert "'no-such-method'" in message and all(f"'{m}'" in message for m in methods)


@pytest.mark.parametrize("spelling", [["--peft", "dora"], ["--peft=dora"], ["--peft.method=dora"]])
def test_peft_sets_the_method(spelling: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`--peft dora` sets peft.method beside --peft.r (the base is missing, so the stage stops before training)."""
    assert main(["sft", *spelling, "--peft.r=4", "--peft.targets=[attn.q,mlp]"]) == 2
    assert "needs a base model" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv, fragments", [
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    (["sft", "--train.lrr=1"], ["unknown key 'train.lrr'", "did you mean 'train.lr'?"]),
    (["sft", "--trian-file", "x.jsonl"], ["unknown key 'trian-file' (did you mean 'train-file'?)"]),
    (["grpo", "--max_new_tokenz=4"], ["did you mean 'max_new_tokens'?"]),
    (["generate", "DIR", "--prompt", "x", "--top-k", "two"], ["argument --top-k: invalid int value: 'two'"]),
    (["tokenizer", "train", "--input", "a.txt"], ["required: --vocab-size, --out", "`lmforge tokenizer train --help`"]),
    (["generate"], ["give --prompt TEXT", "`lmforge generate --help`"]),
    ([], ["missing VERB: one of demo, tokenizer, data, pretrain"]),
    (["tokenizer"], ["missing ACTION: one of train", "`lmforge tokenizer --help`"]),
    (["quantize", "DIR", "--out", "q", "--bits", "3"], ["--bits", "3"]),
    (["dpo", "--sft-weight", "-1"], ["sft_weight", "greater than or equal to 0", "-1"]),
])
def test_usage_errors_are_one_line_and_exit_status_2(argv: list[str], fragments: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    message = error_line(captured.err)
    assert captured.out == ""
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_overrides_reach_the_config_typed(tmp_path) -> None:
    """`--train.lr=1e-3` and `--model.n_layer 6` (both spellings) arrive in the stage's config as numbers."""
    from lmforge.cli import config_overrides
    from lmforge.config_loading import load_config

    argv = ["pretrain", "--train.lr=1e-3", "--model.n_layer", "6", "--train.precision=bf16", "--data.dir", "x/y"]
    args = build_parser("pretrain", with_config_keys=True).parse_args(argv)["pretrain"]
    cfg = load_config(stage_config("pretrain"), None, config_overrides(args))
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-3)
    assert (cfg.model.n_layer, cfg.train.precision, cfg.data.dir) == (6, "bf16", "x/y")
