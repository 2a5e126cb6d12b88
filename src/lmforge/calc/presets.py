"""The models `lmforge calc` knows by name, and the model config of a run, checkpoint or config YAML."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from lmforge.config import AnyModelConfig, ModelConfig, with_default_arch
from lmforge.config_loading import validation_summary, yaml_problem
from lmforge.errors import ConfigError
from lmforge.io import read_utf8

PRESETS: dict[str, ModelConfig] = {
    # Brown et al. 2020, table 2.1: 96 layers, d_model 12288, 96 heads, context 2048, GPT-2's tokenizer
    "gpt3-175b": ModelConfig(family="gpt2", vocab_size=50257, max_seq_len=2048, n_layer=96, n_head=96,
                             d_model=12288),
    # Touvron et al. 2023, table 2: 80 layers, d_model 8192, 64 heads; SwiGLU width 22016 (2/3 of 4d, rounded up
    # to a multiple of 256), vocabulary 32000
    "llama-65b": ModelConfig(family="llama", vocab_size=32000, max_seq_len=2048, n_layer=80, n_head=64,
                             d_model=8192, d_ff=22016),
}


def demo_decoder() -> ModelConfig:
    """The decoder `lmforge demo` pretrains (its full-size plan)."""
    from lmforge.demo import demo_plan

    return demo_plan(quick=False).decoder


def model_config_of(source: str) -> BaseModel:
    """The model config of a preset name, `demo`, an lmforge run or checkpoint dir, or a config YAML with a `model`
    section (a pretraining config, or a checkpoint's config.yaml)."""
    if source in PRESETS:
        return PRESETS[source]
    if source == "demo":
        return demo_decoder()
    path = Path(source)
    if path.is_dir():
        from lmforge.checkpoint import read_manifest, resolve_checkpoint

        return read_manifest(resolve_checkpoint(path)).model
    if not path.is_file():
        raise ConfigError(f"'{source}' is neither a preset ({', '.join([*PRESETS, 'demo'])}) nor a run, checkpoint "
                          "or config YAML file")
    try:
        tree = yaml.safe_load(read_utf8(path, ConfigError))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise ConfigError(f"{path} has no 'model' section; give a pretraining config or a checkpoint's config.yaml")
    try:
        return TypeAdapter(AnyModelConfig).validate_python(with_default_arch(tree["model"]))
    except ValidationError as err:
        raise ConfigError(f"{path}: {validation_summary(err, prefix='model.')}") from None
