"""The attncc command line, run as a user would (the installed console script)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "specs.py"


def _attncc() -> list[str]:
    exe = shutil.which("attncc", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "attncc.cli"]


def test_show_prints_ir_and_stats_and_draws(tmp_path: Path) -> None:
    out = tmp_path / "map.png"
    done = subprocess.run(
        [*_attncc(), "show", f"{EXAMPLES}:packed", "--q-len", "4096", "--tensors", "packed_tensors", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert 'layout = "runtime"' in done.stdout
    assert "plan @" in done.stdout and "tiles       64 x 64, layout runtime" in done.stdout
    assert "listed block map 64x64 tiles of 64x64" in done.stdout and "GFLOP" in done.stdout
    assert out.stat().st_size > 1000


def test_show_explains_a_bad_target(tmp_path: Path) -> None:
    done = subprocess.run([*_attncc(), "show", f"{EXAMPLES}:nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "defines no 'nope'" in done.stderr
