"""The top-level API: `import lmforge` stays light, and every public function is fully annotated."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing

import torch

import lmforge
from lmforge.data.chat import ChatTemplate
from lmforge.tokenizer import Tokenizer


def test_import_lmforge_does_not_import_torch() -> None:
    code = "import sys, lmforge; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_function_is_annotated() -> None:
    names = {"torch": torch, "Module": torch.nn.Module, "Tensor": torch.Tensor, "Tokenizer": Tokenizer,
             "ChatTemplate": ChatTemplate}
    for name in lmforge.__all__:
        function = getattr(lmforge, name)
        hints = typing.get_type_hints(function, localns=names)  # the TYPE_CHECKING imports resolve
        missing = ({*inspect.signature(function).parameters, "return"}) - set(hints)
        assert not missing, f"lmforge.{name} has no type hint for {sorted(missing)}"
