"""The checkpoint manifest: config.yaml as one typed record of what an lmforge checkpoint is.

What to build before the weights load: the architecture (`model`), a task head (`task`, with `labels` and
`num_labels`), the PEFT method whose modules the weights include (`peft`) and weight-only quantisation (`quant`).
And the run that wrote it: its stage, whose config sits under the stage's name (`sft:`, `dpo:`, `ppo:`, ...;
pretraining's `data`, `train` and `objective` sit at the top level, beside its model). The YAML layout is the
one lmforge has always written, so checkpoints written before this class existed read unchanged (RL runs also
named their stage in `algorithm:`, with the other algorithm's section null).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from lmforge.config import AnyModelConfig, PeftConfig, with_default_arch
from lmforge.infer.quant import QuantConfig
from lmforge.model import HEAD_TASKS

Stage = Literal["pretrain", "sft", "reward", "dpo", "distill", "finetune", "ppo", "grpo"]
SECTION_STAGES = ("sft", "reward", "dpo", "distill", "finetune", "ppo", "grpo")  # config under the stage's name
PRETRAIN_KEYS = ("data", "train", "objective", "init_from")  # pretraining's config, at the top level
Task = Literal[(*HEAD_TASKS, "text2text")]  # text2text trains the LM itself: no head


class CheckpointManifest(BaseModel):
    """A checkpoint's config.yaml. Validate it from the YAML tree; `model_dump` gives that tree back."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: AnyModelConfig
    task: Task | None = None  # a fine-tuned task model: the backbone `model` with this task's head
    labels: list[str] | None = None  # a classifier's label names, in the order of its outputs
    num_labels: int | None = Field(None, ge=1)
    peft: PeftConfig | None = None  # the weights include this method's modules (built before they load)
    quant: QuantConfig | None = None  # the Linear weights are int8/int4 codes (`lmforge quantize`)
    stage: Stage | None = None  # None: written by `lmforge.save` or `lmforge quantize`, not by a training stage
    run: dict[str, Any] = Field(default_factory=dict)  # the stage's config, as its YAML keys
    _run_type: type[BaseModel] | None = PrivateAttr(None)  # the class of that config, in a manifest made by `of_run`

    @classmethod
    def of_run(cls, stage: Stage, config: BaseModel, model: AnyModelConfig, **what: Any) -> CheckpointManifest:
        """The manifest of a model that `stage` trained with `config` (`what`: task, labels, peft, ...)."""
        run = config.model_dump(mode="json", exclude={"model"} if stage == "pretrain" else None)
        manifest = cls(model=model, stage=stage, run=run, **what)
        manifest._run_type = type(config)
        return manifest

    def with_run_defaults(self, run_type: type[BaseModel] | None) -> CheckpointManifest:
        """This manifest with the stage-config keys it lacks (added to lmforge after it was written) at their
        defaults in `run_type`; as it is without a type or when its run no longer validates as one."""
        pretrain = self.stage == "pretrain"
        if run_type is None:
            return self
        try:
            config = run_type.model_validate({**self.run, **({"model": self.model} if pretrain else {})})
        except ValidationError:
            return self
        return self.model_copy(update={"run": config.model_dump(mode="json", exclude={"model"} if pretrain else None)})

    @property
    def base(self) -> str | None:
        """The model the run started from (a stage's `base`, or RL's `policy`), if it records one."""
        return self.run.get("base") or self.run.get("policy") or None

    @field_validator("model", mode="before")
    @classmethod
    def _default_arch(cls, value: Any) -> Any:
        return with_default_arch(value)

    @model_validator(mode="before")
    @classmethod
    def _from_layout(cls, data: Any) -> Any:
        """The YAML tree -> the fields: the stage's section becomes `stage` and `run`."""
        if not isinstance(data, dict) or "stage" in data or "run" in data:
            return data  # already the fields (`CheckpointManifest(model=..., stage=..., run=...)`)
        tree = dict(data)
        tree.pop("algorithm", None)  # RL runs named their stage here too
        runs = {key: tree.pop(key) for key in SECTION_STAGES if key in tree}
        runs = {key: section for key, section in runs.items() if section is not None}
        if any(key in tree for key in PRETRAIN_KEYS):
            runs["pretrain"] = {key: tree.pop(key) for key in PRETRAIN_KEYS if key in tree}
        if len(runs) > 1:
            raise ValueError(f"it records more than one stage ({', '.join(runs)}); a checkpoint has one")
        for stage, run in runs.items():
            tree.update(stage=stage, run=run)
        return tree

    @model_serializer(mode="wrap")
    def _to_layout(self, handler: Any) -> dict[str, Any]:
        fields = handler(self)
        stage, run = fields.pop("stage", None), fields.pop("run", {})  # absent under model_dump(include=...)
        tree = {key: value for key, value in fields.items() if value is not None}
        if stage == "pretrain":
            tree.update(run)
        elif stage is not None:
            tree[stage] = run
        return tree
