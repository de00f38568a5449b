"""Shared test setup: IR verification on, a golden-file updater, a fixed seed."""

from __future__ import annotations

import os

import torch as _torch

if not _torch.cuda.is_available():  # no GPU: Triton kernels run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from attncc import config


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files instead of comparing")


@pytest.fixture(autouse=True)
def _verify_ir() -> Iterator[None]:
    torch.manual_seed(0)
    with config.override(verify=True, dump_dir=None, always_compile=False):
        yield


@pytest.fixture
def golden(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """golden(path, text): compare ``text`` with the file (or rewrite it with --update-golden)."""
    update = request.config.getoption("--update-golden")

    def check(path: Path, text: str) -> None:
        if update or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if not update:
                pytest.fail(f"golden file {path} did not exist; written, re-run to compare")
        assert text == path.read_text(), f"output differs from golden {path}; run pytest --update-golden to accept"

    return check
