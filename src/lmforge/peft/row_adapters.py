"""LoRA adapters chosen per request: many adapters over one base in the same batch (as LoRAX and vLLM's multi-LoRA
serve them).

Inside `row_adapters(model, names)`, every `LoRALinear` gives batch row i its base output plus adapter names[i]'s
delta alone (None: the base alone; a layer without that adapter: its base output, as `set_adapter` does),
whatever its `active` list says. Rows are grouped by adapter: each adapter in the batch costs one gather of its
rows and one scatter-add of its delta per layer, and one that every row uses costs neither.

`load_named_adapters` puts the adapters a server offers on its base, from lmforge adapter dirs (`save_adapter`)
or Hugging Face peft dirs (`export_peft`, peft's `save_pretrained`), every one checked before the model changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lmforge.config import PeftConfig
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.model.decoder import DecoderLM
from lmforge.peft.lora import LoRALinear, RowGroups, add_lora, check_adapter_name, lora_layers, set_adapter
from lmforge.peft.lora_files import adapter_folder, read_adapter
from lmforge.peft.peft_import import add_peft_adapter, read_peft_adapter, read_peft_config


def check_row_adapters(model: nn.Module, names: list[str | None]) -> None:
    """Raise ConfigError unless every name is an adapter of `model` that rows can mix."""
    layers = lora_layers(model)
    known = sorted({n for layer in layers.values() for n in layer.cfgs})
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}; this model has {known if known else 'no adapters'}")
    for layer_name, layer in layers.items():
        pissa = [n for n, cfg in layer.cfgs.items() if cfg.method == "pissa"]
        if pissa:
            raise ConfigError(f"adapter '{pissa[0]}' is PiSSA: its layers' base weight is a residual, so rows cannot "
                              "mix it with the base or other adapters; serve its peft export instead (lmforge export "
                              "RUN --format peft makes it a LoRA on the original base)")
        if layer.unmerged_weight is not None:
            raise ConfigError(f"layer '{layer_name}' has adapters merged into its weight; unmerge it before choosing "
                              "adapters per row")


@contextmanager
def row_adapters(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Inside, a forward over a batch of len(names) rows adds to row i adapter names[i]'s delta only (see the
    module docstring); outside, every LoRA layer computes as before (its `active` adapters)."""
    check_row_adapters(model, names)
    rows_of: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None:
            rows_of.setdefault(name, []).append(i)
    on_device: dict[torch.device, dict[str, torch.Tensor | None]] = {}
    layers = list(lora_layers(model).values())
    before = [layer.row_groups for layer in layers]
    try:
        for layer in layers:
            device = next(t.device for t in (*layer.parameters(), *layer.buffers()))
            if device not in on_device:  # index tensors made once per device, shared by its layers
                on_device[device] = {name: None if len(rows) == len(names) else torch.tensor(rows, device=device)
                                     for name, rows in rows_of.items()}
            groups = {name: rows for name, rows in on_device[device].items() if name in layer.cfgs}
            layer.row_groups = RowGroups(len(names), groups)
        yield
    finally:
        for layer, groups in zip(layers, before, strict=True):
            layer.row_groups = groups


def _checked(model: DecoderLM, name: str, path: Path) -> tuple[PeftConfig, Callable[[], None]]:
    """The adapter in `path` (lmforge or peft format), checked to fit `model` as `name`, and the call that adds it."""
    if read_peft_config(path) is not None:
        cfg, plan = read_peft_adapter(model, path, name)
        return cfg, lambda: add_peft_adapter(model, plan, name)
    cfg, weights = read_adapter(model, path, name)
    if cfg.method == "pissa":
        raise CheckpointError(f"{path} is a PiSSA adapter, whose base is a residual, so it cannot share its base "
                              "with other requests; export its run with --format peft (a LoRA on the original base) "
                              "and load that")
    plain = [n for n in weights if not (isinstance(m := model.get_submodule(n), LoRALinear) and m.quantized)]
    if cfg.method == "qlora" and plain:
        raise CheckpointError(f"{path} is a QLoRA adapter, but this base's layer '{plain[0]}' is not NF4-quantised "
                              "(adding it would quantise the base under every request); export its run with --format "
                              "peft (a LoRA on the dequantised base) and load that")
    return cfg, lambda: add_lora(model, cfg, name, weights)


def load_named_adapters(model: DecoderLM, adapters: dict[str, Path]) -> dict[str, PeftConfig]:
    """Add each adapter dir (lmforge or Hugging Face peft format) under its name, for `row_adapters` to choose per
    row. Every adapter is checked to fit this base before the model changes (a mismatch raises an LmforgeError
    naming the adapter and its dir); afterwards no adapter is active and the model is frozen, in eval mode."""
    active = sorted({n for layer in lora_layers(model).values() for n, _ in layer.active})
    if active:
        raise ConfigError(f"the model computes with LoRA adapter(s) {active}, which requests could not leave out; "
                          "merge them into the base first (lmforge merge RUN)")
    checked = {}
    for name, path in adapters.items():
        check_adapter_name(name)
        try:
            checked[name] = _checked(model, name, adapter_folder(path))
        except LmforgeError as err:
            raise type(err)(f"adapter '{name}': {err}") from None
    for _, add in checked.values():
        add()
    set_adapter(model, [])
    model.requires_grad_(False).eval()
    return {name: cfg for name, (cfg, _) in checked.items()}
