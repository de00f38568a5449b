"""The research-family examples run as written (each checks itself against a dense float64 computation)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["routed_biformer", "moa_block_lists", "kdgqa"])
def test_example_runs_and_checks_itself(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()  # asserts its own error bound
    assert "max |attncc - dense float64|" in capsys.readouterr().out
