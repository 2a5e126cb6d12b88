"""benchmarks/vs_llamacpp.py: without llama-cpp-python it says how to install it; with it, every pair is timed (on a
small model here: the benchmark's own numbers come from its default size)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import vs_llamacpp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_without_llama_cpp_it_says_how_to_install_it_and_exits_0(monkeypatch, capsys) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a))
    assert vs_llamacpp.main([]) == 0
    out = capsys.readouterr().out
    assert "pip install" in out and "[llamacpp]" in out and "GGML_NATIVE" in out


def test_a_small_run_times_every_pair_against_the_measured_bandwidth(capsys) -> None:
    pytest.importorskip("llama_cpp", reason="llama.cpp not installed: pip install -e '.[llamacpp]'")
    pytest.importorskip("transformers")
    assert vs_llamacpp.main(["--layers", "1", "--d-model", "128", "--vocab", "1024", "--prompt-len", "4",
                             "--new-tokens", "3", "--rounds", "1", "--no-transformers"]) == 0
    out = capsys.readouterr().out
    for ours, theirs in (("fp32", "F32"), ("int8", "Q8_0"), ("int4", "Q4_0")):
        assert f"lmforge {ours} / llama.cpp {theirs} = " in out
        assert f"llama.cpp {theirs} " in out and f"lmforge {ours} " in out  # its row of the table
    assert "memory read bandwidth (measured" in out and "target: lmforge fp32 >= 0.8x" in out
