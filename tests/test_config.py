"""Configs: YAML + dotted overrides, family defaults, friendly errors, and the CLI's help and errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cli_checks import error_line
from lmforge.cli import build_parser, main
from lmforge.config import MODEL_FAMILIES, ModelConfig, PretrainConfig
from lmforge.config_loading import dump_config, load_config
from lmforge.errors import ConfigError

BASE_YAML = """\
model:
  family: gpt2
  vocab_size: 512
  max_seq_len: 64
  n_layer: 2
  n_head: 4
  d_model: 64
data:
  dir: some/data
train:
  out_dir: some/out
  max_steps: 10
  lr: 3.0e-3
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- happy paths ------------------------------------------------------------------------------


def test_load_yaml(tmp_path: Path) -> None:
    cfg = load_config(PretrainConfig, write(tmp_path, BASE_YAML))
    assert isinstance(cfg, PretrainConfig)
    assert (cfg.model.vocab_size, cfg.model.max_seq_len, cfg.model.n_layer, cfg.model.d_model) == (512, 64, 2, 64)
    assert cfg.data.dir == "some/data"
    assert (cfg.train.out_dir, cfg.train.max_steps, cfg.train.lr) == ("some/out", 10, 3e-3)
    # untouched keys keep their defaults
    assert cfg.train.batch_size == PretrainConfig().train.batch_size
    assert cfg.train.precision == "fp32"


def test_dotted_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_YAML)
    cfg = load_config(PretrainConfig, path,
                      {"train.lr": "1e-3", "model.n_layer": 6, "train.precision": "bf16", "data.dir": "x/y"})
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-3)
    assert isinstance(cfg.model.n_layer, int) and cfg.model.n_layer == 6
    assert cfg.train.precision == "bf16"
    assert cfg.data.dir == "x/y"
    # the rest of the file is untouched
    assert (cfg.model.vocab_size, cfg.train.max_steps) == (512, 10)


def test_overrides_without_a_file_and_new_sections() -> None:
    cfg = load_config(PretrainConfig, None, {"model.d_model": 96, "model.n_head": 3, "train.tensorboard": True})
    assert (cfg.model.d_model, cfg.model.n_head, cfg.train.tensorboard) == (96, 3, True)
    assert load_config(PretrainConfig) == PretrainConfig()


def test_llama_family_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  family: llama\n  n_head: 4\n  n_kv_head: 2\n  d_model: 64\n")
    m = load_config(PretrainConfig, path).model
    assert m.family == "llama"
    assert (m.position, m.norm, m.mlp, m.activation) == ("rope", "rmsnorm", "swiglu", "silu")
    assert (m.attn_bias, m.mlp_bias, m.tie_embeddings) == (False, False, False)
    assert m.kv_heads == 2
    assert m.ff_dim % 32 == 0 and m.ff_dim >= 8 * 64 // 3
    for key, value in MODEL_FAMILIES["llama"].items():
        assert getattr(m, key) == value, key


def test_gpt2_family_defaults() -> None:
    m = ModelConfig(family="gpt2")
    for key, value in MODEL_FAMILIES["gpt2"].items():
        assert getattr(m, key) == value, key
    assert m.ff_dim == 4 * m.d_model


def test_explicit_key_wins_over_family_default(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  family: llama\n  norm: layernorm\n  tie_embeddings: true\n")
    m = load_config(PretrainConfig, path, {"model.position": "alibi"}).model
    assert (m.norm, m.tie_embeddings, m.position) == ("layernorm", True, "alibi")
    # the family still fills every key not given
    assert (m.mlp, m.attn_bias, m.mlp_bias) == ("swiglu", False, False)
    # and the same holds in the other direction
    g = ModelConfig(family="gpt2", norm="rmsnorm")
    assert (g.norm, g.position, g.mlp) == ("rmsnorm", "learned", "gelu")


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(PretrainConfig, write(tmp_path, BASE_YAML), {"model.family": "llama", "model.n_kv_head": 2})
    again = load_config(PretrainConfig, write(tmp_path, dump_config(cfg), "dumped.yaml"))
    assert again == cfg


# ---- errors -----------------------------------------------------------------------------------


def test_unknown_yaml_key_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_YAML.replace("n_layer: 2", "n_layers: 2"))
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, path)
    msg = str(info.value)
    assert "model.n_layers" in msg
    assert "did you mean 'model.n_layer'" in msg
    assert str(path) in msg


def test_unknown_override_suggests_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, write(tmp_path, BASE_YAML), {"train.learning_rat": "1e-3", "trian.lr": 1})
    msg = str(info.value)
    assert "train.learning_rat" in msg and "trian" in msg
    assert "command-line overrides" in msg
    with pytest.raises(ConfigError, match=r"did you mean 'train.max_steps'"):
        load_config(PretrainConfig, None, {"train.max_step": 5})


def test_unknown_key_far_from_anything_has_no_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'zzzzzzzz'") as info:
        load_config(PretrainConfig, None, {"zzzzzzzz": 1})
    assert "did you mean" not in str(info.value)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, BASE_YAML.replace("n_layer: 2", "n_layer: four"))
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, path)
    msg = str(info.value)
    assert "model.n_layer" in msg
    assert "four" in msg
    with pytest.raises(ConfigError, match=r"train.precision") as info:
        load_config(PretrainConfig, None, {"train.precision": "fp8"})
    assert "fp8" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(PretrainConfig, missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("text", ["model: [unclosed\n", "model:\n  n_layer: 2\n    d_model: 3\n", "a: b: c\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(PretrainConfig, path)
    assert str(path) in str(info.value) and "line " in str(info.value) and "\n" not in str(info.value)


def test_yaml_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(PretrainConfig, write(tmp_path, "- a\n- b\n"))


def test_empty_yaml_is_defaults(tmp_path: Path) -> None:
    assert load_config(PretrainConfig, write(tmp_path, "")) == PretrainConfig()


@pytest.mark.parametrize(
    "overrides, fields",
    [
        ({"model.d_model": 130, "model.n_head": 4}, ["d_model=130", "n_head=4"]),
        ({"model.n_head": 4, "model.n_kv_head": 3}, ["n_head=4", "n_kv_head=3"]),
        ({"model.family": "llama", "model.d_model": 12, "model.n_head": 4}, ["rope", "head dim", "3"]),
        ({"model.position": "rope", "model.d_model": 36, "model.n_head": 4}, ["rope", "head dim", "9"]),
    ],
)
def test_shape_errors(tmp_path: Path, overrides: dict, fields: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, write(tmp_path, BASE_YAML), overrides)
    msg = str(info.value)
    assert "model: " in msg
    for field in fields:
        assert field in msg, (field, msg)


@pytest.mark.parametrize("override", ["model.n_head=0", "model.n_kv_head=0", "model.d_model=-8",
                                      "model.vocab_size=0", "model.n_layer=0", "model.dropout=1.5"])
def test_non_positive_sizes_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(PretrainConfig, None, dict([override.split("=")]))


def test_odd_head_dim_is_fine_without_rope() -> None:
    cfg = load_config(PretrainConfig, None, {"model.d_model": 12, "model.n_head": 4})
    assert cfg.model.head_dim == 3


def test_train_section_checks() -> None:
    with pytest.raises(ConfigError, match=r"batch_size must be >= 1, got 0"):
        load_config(PretrainConfig, None, {"train.batch_size": 0})
    with pytest.raises(ConfigError, match=r"min_lr=0.1 must not exceed lr=0.01"):
        load_config(PretrainConfig, None, {"train.lr": 0.01, "train.min_lr": 0.1})


def test_override_into_a_scalar_is_not_a_section() -> None:
    with pytest.raises(ConfigError, match=r"'lr' is not a section"):
        load_config(PretrainConfig, None, {"train.lr": 1, "train.lr.x": 2})


def test_non_utf8_yaml_names_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"# caf\xe9\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(line 1, byte 5\)"):
        load_config(PretrainConfig, path)
    assert main(["pretrain", "--config", str(path)]) == 2
    assert str(path) in error_line(capsys.readouterr().err)


def test_validation_errors_are_one_line_naming_each_key_and_value(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE_YAML.replace("lr: 3.0e-3", "lr: abc").replace("n_layer: 2", "n_layer: x")
                 .replace("n_head: 4", "n_heads: 4"))
    assert main(["pretrain", "--config", str(path)]) == 2
    message = error_line(capsys.readouterr().err)
    assert message.startswith(f"{path}: ")
    for part in ("train.lr: Input should be a valid number", "got 'abc'", "model.n_layer: ", "got 'x'",
                 "unknown key 'model.n_heads' (did you mean 'model.n_head'?)"):
        assert part in message, (part, message)


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_pretrain_unknown_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE_YAML.replace("some/data", str(tmp_path / "no-data-here")))
    assert main(["pretrain", "--config", str(path), "--model.n_layers=3"]) == 2
    err = capsys.readouterr().err
    assert "model.n_layers" in err
    assert "did you mean 'model.n_layer'" in err
    assert "Traceback" not in err


def test_cli_pretrain_bad_yaml_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE_YAML.replace("lr: 3.0e-3", "lrr: 3.0e-3"))
    assert main(["pretrain", "--config", str(path)]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def test_cli_pretrain_bogus_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--bogus"]) == 2
    assert "unknown key 'bogus'" in error_line(capsys.readouterr().err)
    assert main(["pretrain", "--bogus=3"]) == 2
    assert "unknown key 'bogus'" in error_line(capsys.readouterr().err)
    assert main(["pretrain", "--train.lr"]) == 2  # a key without its value
    assert "--train.lr: expected one argument" in error_line(capsys.readouterr().err)


def test_cli_unrecognized_argument_elsewhere(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model.n_layer=3"]) == 2
    assert "unrecognized arguments: --model.n_layer=3" in error_line(capsys.readouterr().err)


def _verb_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every verb and sub-verb reachable from `parser`, found through its subparser actions."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths += _verb_paths(sub, (*prefix, name))
    return paths


VERB_PATHS = _verb_paths(build_parser())


def test_verb_discovery_finds_nested_verbs() -> None:
    assert len(VERB_PATHS) >= 4
    assert any(len(p) == 2 for p in VERB_PATHS)  # e.g. `tokenizer train`
    assert len(set(VERB_PATHS)) == len(VERB_PATHS)


@pytest.mark.parametrize("path", VERB_PATHS, ids=" ".join)
def test_help_has_an_example(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out
    assert f"lmforge {' '.join(path)}" in out
