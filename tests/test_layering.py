"""Package layering: the model layer knows only models, and a training stage imports no other stage's internals
(what two stages share lives in `lmforge.data` or a small shared module of `lmforge.train`)."""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge

SRC = Path(lmforge.__file__).parent
STAGES = ("finetune", "sft", "reward", "dpo", "rl", "distill", "pretrain")  # modules of lmforge.train run by a verb


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (`from lmforge.x import y` gives lmforge.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_model_layer_imports_no_training_peft_or_inference_code() -> None:
    forbidden = ("lmforge.train", "lmforge.peft", "lmforge.infer")
    found = {f"{path.name} imports {module}" for path in sorted((SRC / "model").glob("*.py"))
             for module in imported_modules(path) if any(within(module, package) for package in forbidden)}
    assert found == set()


def test_no_training_stage_imports_another_stage() -> None:
    found = {f"train/{stage}.py imports {module}" for stage in STAGES
             for module in imported_modules(SRC / "train" / f"{stage}.py")
             if any(within(module, f"lmforge.train.{other}") for other in STAGES if other != stage)}
    assert found == set()
