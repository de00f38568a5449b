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


MODELS = EXAMPLES.parent / "models.py"


def test_explain_prints_every_site_of_a_model() -> None:
    done = subprocess.run(
        [*_attncc(), "explain", f"{MODELS}:llama", "--inputs", "llama_inputs"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = done.stdout.splitlines()
    assert "2 attention sites, 2 lifted, 0 left as they were" in lines, done.stdout
    rows = [line.split() for line in lines if line.startswith("attn_output")]
    assert len(rows) == 2 and all(r[1] == "lifted" and "4/2" in r for r in rows), done.stdout
    assert all("<=" in r and "256" in r for r in rows), "mask kv <= q at 256 x 256"


def test_explain_names_a_missing_input() -> None:
    done = subprocess.run(
        [*_attncc(), "explain", f"{MODELS}:softcapped", "--inputs", "nope"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0 and "defines no 'nope'" in done.stderr
