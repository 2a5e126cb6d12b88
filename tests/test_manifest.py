"""The checkpoint manifest: checkpoints written before it still load; what it writes, it reads back; one list of
PEFT methods; PPO and GRPO share their common fields."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import lmforge
from lmforge.checkpoint import read_manifest
from lmforge.config import LORA_METHODS, PEFT_METHODS, PeftConfig
from lmforge.errors import CheckpointError
from lmforge.infer.quant import QuantLinear
from lmforge.manifest import CheckpointManifest
from lmforge.peft.lora import LoRALinear

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"

# fixture dir -> (stage, task, PEFT method, quant bits, what the run recorded under its stage's name)
OLD_CHECKPOINTS = {
    "save": (None, None, None, None, {}),
    "save-lora": (None, None, "lora", None, {}),
    "pretrain": ("pretrain", None, None, None, {"objective": "clm"}),
    "sft-dora": ("sft", None, "dora", None, {"template": "llama2", "base": "runs/base"}),
    "reward": ("reward", "reward", None, None, {"base": "runs/sft"}),
    "dpo-adapter": ("dpo", None, "adapter", None, {"kind": "ipo"}),
    "distill": ("distill", None, None, None, {"teacher": "runs/teacher"}),
    "finetune-classify": ("finetune", "classify", "bitfit", None, {"task": "classify"}),
    "finetune-text2text": ("finetune", "text2text", None, None, {"task": "text2text"}),
    "ppo-prompt": ("ppo", None, "prompt", None, {"policy": "runs/sft", "samples_per_prompt": 1}),
    "grpo": ("grpo", None, None, None, {"template": "llama2", "group_size": 8}),
    "quantize-int8": (None, None, None, 8, {}),
}

MODEL_CLASS = {"reward": "RewardModel", "finetune-classify": "SequenceClassifier", "ppo-prompt": "PromptTunedLM"}


def test_every_fixture_is_checked() -> None:
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(OLD_CHECKPOINTS)


@pytest.mark.parametrize("name", sorted(OLD_CHECKPOINTS))
def test_checkpoints_written_before_the_manifest_still_load(name: str) -> None:
    stage, task, method, bits, recorded = OLD_CHECKPOINTS[name]
    manifest = read_manifest(FIXTURES / name)
    assert (manifest.stage, manifest.task, manifest.peft and manifest.peft.method,
            manifest.quant and manifest.quant.bits) == (stage, task, method, bits)
    assert recorded.items() <= manifest.run.items()
    model, _ = lmforge.load(FIXTURES / name)  # strict: every stored tensor has its module, every module its tensor
    modules = [type(m) for m in model.modules()]
    assert (LoRALinear in modules) == (method in LORA_METHODS)
    assert (QuantLinear in modules) == (bits is not None)
    assert type(model).__name__ == MODEL_CLASS.get(name, "DecoderLM")


@pytest.mark.parametrize("name", sorted(OLD_CHECKPOINTS))
def test_the_manifest_writes_back_the_layout_it_read(name: str) -> None:
    """Writing keeps the keys and sections of config.yaml (so earlier lmforge versions and `--resume` read it);
    only empty sections (`peft: null`, RL's `algorithm` and the other algorithm's null section) are left out."""
    tree = yaml.safe_load((FIXTURES / name / "config.yaml").read_text())
    written = read_manifest(FIXTURES / name).model_dump(mode="json")
    kept = {k: v for k, v in tree.items() if v is not None and k != "algorithm"}
    assert written == kept
    assert CheckpointManifest.model_validate(written) == read_manifest(FIXTURES / name)


def test_a_bad_section_is_one_line_naming_the_file_and_key(tmp_path: Path) -> None:
    ckpt = shutil.copytree(FIXTURES / "sft-dora", tmp_path / "sft")
    tree = yaml.safe_load((ckpt / "config.yaml").read_text())
    (ckpt / "config.yaml").write_text(yaml.safe_dump({**tree, "peft": {**tree["peft"], "method": "lorra"}}))
    with pytest.raises(CheckpointError) as info:
        lmforge.load(ckpt)
    message = str(info.value)
    assert str(ckpt / "config.yaml") in message and "peft.method" in message and "\n" not in message
    (ckpt / "config.yaml").write_text(yaml.safe_dump({**tree, "dpo": {"kind": "ipo"}}))
    with pytest.raises(CheckpointError, match="more than one stage"):
        lmforge.load(ckpt)


def test_peft_methods_are_listed_once() -> None:
    from lmforge.demo.peft import METHODS
    from lmforge.peft.config import NOT_MERGEABLE

    assert METHODS == ("full", *PEFT_METHODS)
    assert set(LORA_METHODS) < set(PEFT_METHODS) and set(NOT_MERGEABLE) < set(PEFT_METHODS)
    assert [PeftConfig(method=m).method for m in PEFT_METHODS] == list(PEFT_METHODS)


def test_one_peft_config_drives_lora_and_refuses_other_methods(tmp_path: Path) -> None:
    from lmforge.errors import ConfigError
    from lmforge.peft.lora import apply_lora
    from lmforge.peft.lora_files import load_adapter, save_adapter

    model, _ = lmforge.load(FIXTURES / "save")
    cfg = PeftConfig(method="dora", r=2, alpha=8, targets=["attn.q"], bottleneck=3)
    apply_lora(model, cfg)
    layer = model.get_submodule("blocks.0.attn.q")
    assert isinstance(layer, LoRALinear) and layer.cfgs["default"].scaling == 4.0
    with pytest.raises(ConfigError, match="LoRA family"):
        apply_lora(model, PeftConfig(method="adapter"), "other")
    # an adapter file records the LoRA family's fields, the same keys as before there was one PEFT config
    save_adapter(model, tmp_path / "adapter", cfg)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["config"]
    assert set(saved) == {"r", "alpha", "dropout", "targets", "method", "qlora_group_size", "qlora_double_quant"}
    loaded = load_adapter(lmforge.load(FIXTURES / "save")[0], tmp_path / "adapter")
    assert (loaded.method, loaded.r, loaded.alpha, loaded.targets) == ("dora", 2, 8.0, ["attn.q"])


def test_ppo_and_grpo_share_their_common_fields() -> None:
    from lmforge.train.rl import GRPOConfig, PPOConfig, RLConfig

    assert issubclass(PPOConfig, RLConfig) and issubclass(GRPOConfig, RLConfig)
    shared = set(PPOConfig.model_fields) & set(GRPOConfig.model_fields)
    # declared once (in RLConfig) unless the two algorithms' defaults differ
    differ = {k for k in shared if PPOConfig.model_fields[k].default != GRPOConfig.model_fields[k].default}
    assert shared - differ == set(RLConfig.model_fields)
    assert differ == {"prompts_per_round", "ppo_epochs", "train"}


def test_resuming_a_run_written_before_the_manifest_sees_no_config_change(tmp_path: Path) -> None:
    """Today's stage writes the same run's config.yaml without the empty sections (`peft: null`, RL's
    `algorithm`); `--resume` compares the two in the manifest's form, so it finds no change to refuse."""
    from lmforge.config import FinetuneConfig, PretrainConfig
    from lmforge.errors import ConfigError
    from lmforge.train.config_change import check_resume_config
    from lmforge.train.distill import DistillConfig
    from lmforge.train.dpo import DPOConfig
    from lmforge.train.reward import RewardConfig
    from lmforge.train.rl import GRPOConfig, PPOConfig
    from lmforge.train.sft import SFTConfig

    configs = {"pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig,
               "distill": DistillConfig, "finetune": FinetuneConfig, "ppo": PPOConfig, "grpo": GRPOConfig}
    for name in OLD_CHECKPOINTS:
        old = read_manifest(FIXTURES / name)
        if old.stage is None:
            continue
        run = {**old.run, "model": old.model} if old.stage == "pretrain" else old.run
        config = configs[old.stage].model_validate(run)
        what = {"task": old.task, "labels": old.labels, "num_labels": old.num_labels, "peft": old.peft}
        today = CheckpointManifest.of_run(old.stage, config, model=old.model, **what)
        assert check_resume_config(FIXTURES / name, today, tmp_path, accept=False) == {}, name
        assert "peft" not in today.model_dump() or old.peft is not None
    # a key added after the checkpoint was written is no change at its default, and a change at another value
    old = read_manifest(FIXTURES / "dpo-adapter")
    assert "sft_weight" not in old.run
    changed = DPOConfig.model_validate({**old.run, "sft_weight": 0.5})
    today = CheckpointManifest.of_run("dpo", changed, model=old.model, peft=old.peft)
    with pytest.raises(ConfigError, match=r"dpo.sft_weight 0.0 -> 0.5"):
        check_resume_config(FIXTURES / "dpo-adapter", today, tmp_path, accept=False)
