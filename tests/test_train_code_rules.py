"""Code rules of the training package that a linter run by `make lint` does not check: training code writes to
the user through `lmforge.train.console.report` (never print(), which breaks a running progress bar), and the
trainer stays a set of functions a reader can follow."""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge.train

TRAIN_DIR = Path(lmforge.train.__file__).parent


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_training_code_never_calls_print() -> None:
    calls = [f"{path.name}:{node.lineno}" for path in sorted(TRAIN_DIR.glob("*.py")) for node in ast.walk(parsed(path))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert calls == []


def test_no_trainer_function_is_longer_than_60_lines() -> None:
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(parsed(TRAIN_DIR / "trainer.py"))
               if isinstance(node, ast.FunctionDef)}
    assert {name: n for name, n in lengths.items() if n > 60} == {}
