"""The kernel caches under faults (issue 22): corrupt, truncated, foreign and concurrent entries,
unwritable cache paths, builds killed half-way. Each scenario runs attncc in fresh subprocesses, so
a crash (a bus error in dlopen) fails a test instead of killing the test run; each run checks its
result against the reference target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = """
import sys, torch, attncc as ac
spec = ac.AttentionSpec(num_heads=2, head_dim=32, mask=ac.causal() & ac.sliding_window(int(sys.argv[1])))
target = sys.argv[2]
kern = ac.compile(spec, target=target, tiles=(16, 16))
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 48, 32, generator=g) for _ in range(3))
err = (kern(q, k, v) - ac.compile(spec, target="reference")(q, k, v)).abs().max().item()
print("OK" if err < 1e-4 else "WRONG", err)
"""


def _run(cache: Path, window: int = 20, target: str = "cpu", **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "ATTNCC_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).parents[2]), **env}
    if target == "triton":
        full["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-c", RUN, str(window), target], capture_output=True, text=True, env=full, timeout=300
    )


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    assert done.stdout.startswith("OK"), done.stdout
    return done.stderr


def _entry(cache: Path, runtime: bool = False) -> tuple[Path, Path]:
    """The record and library of the spec's own library (or of the shared runtime's)."""
    (record,) = (r for r in (cache / "cpu").glob("*.json") if r.name.startswith("runtime_") == runtime)
    return record, record.parent / json.loads(record.read_text())["file"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "zero_length", "foreign"])
def test_a_damaged_cached_library_is_discarded_and_rebuilt(tmp_path: Path, damage: str) -> None:
    _ok(_run(tmp_path))
    _, lib = _entry(tmp_path)
    if damage == "truncated":
        os.truncate(lib, lib.stat().st_size // 2)
    elif damage == "garbage":
        lib.write_bytes(os.urandom(lib.stat().st_size))  # same size: only the checksum can tell
    elif damage == "zero_length":
        lib.write_bytes(b"")
    else:  # another spec's valid library copied over this key's file
        other = tmp_path / "other"
        _ok(_run(other, window=5))
        lib.write_bytes(_entry(other)[1].read_bytes())
    stderr = _ok(_run(tmp_path))
    assert "discarding cache entry" in stderr and "it is rebuilt" in stderr
    _ok(_run(tmp_path))  # and the rebuilt entry is good


def test_a_damaged_runtime_library_is_discarded_and_rebuilt(tmp_path: Path) -> None:
    """The runtime (the fixed forward and backward, shared by every spec with these tiles) is checked too."""
    _ok(_run(tmp_path))
    _, lib = _entry(tmp_path, runtime=True)
    os.truncate(lib, lib.stat().st_size // 2)
    stderr = _ok(_run(tmp_path, window=7))  # another spec: its own library is new, the runtime is reused
    assert "discarding cache entry" in stderr and "runtime_16x16" in stderr


def test_a_foreign_library_with_a_forged_record_is_refused_by_its_key(tmp_path: Path) -> None:
    _ok(_run(tmp_path))
    record, lib = _entry(tmp_path)
    other = tmp_path / "other"
    _ok(_run(other, window=5))
    foreign = _entry(other)[1]
    lib.write_bytes(foreign.read_bytes())
    meta = json.loads(record.read_text())
    meta.update(size=foreign.stat().st_size, sha256=__import__("hashlib").sha256(foreign.read_bytes()).hexdigest())
    record.write_text(json.dumps(meta))  # size and checksum now match: only the exported key tells
    stderr = _ok(_run(tmp_path))
    assert "its library reports key" in stderr


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_a_damaged_cached_triton_module_is_rewritten(tmp_path: Path, damage: str) -> None:
    _ok(_run(tmp_path, target="triton"))
    (module,) = (tmp_path / "triton").glob("*.py")
    text = module.read_text()
    if damage == "truncated":
        module.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        module.write_text("def )(:\n" * 10)
    else:
        other = tmp_path / "other"
        _ok(_run(other, window=5, target="triton"))
        (foreign,) = (other / "triton").glob("*.py")
        module.write_text(foreign.read_text())
    stderr = _ok(_run(tmp_path, target="triton"))
    assert "discarding cache entry" in stderr
    assert module.read_text() == text


@pytest.mark.parametrize("where", ["regular_file", "inside_a_file"])
def test_an_unwritable_cache_path_falls_back_to_a_private_cache(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    cache = blocker if where == "regular_file" else blocker / "sub"
    stderr = _ok(_run(cache))
    assert "cannot be written" in stderr and "ATTNCC_CACHE_DIR" in stderr


def test_three_processes_building_one_spec_with_always_compile(tmp_path: Path) -> None:
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(tmp_path), "ATTNCC_ALWAYS_COMPILE": "1"}
    env["PYTHONPATH"] = str(Path(__file__).parents[2])
    loop = "import runpy, sys\nfor _ in range(3):\n    exec(compile(open(sys.argv[3]).read(), 'run', 'exec'))\n"
    script = tmp_path / "run.py"
    script.write_text(RUN)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", loop, "20", "cpu", str(script)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert all(out.count("OK") == 3 for out in outs), outs
    _ok(_run(tmp_path))  # what they left behind is a valid entry


def test_a_build_killed_half_way_leaves_the_cache_usable(tmp_path: Path) -> None:
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", RUN, "20", "cpu"], env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cpu").glob(".build-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list((tmp_path / "cpu").glob(".build-*")), "the build started"
    os.killpg(proc.pid, signal.SIGKILL)  # the compiler processes too
    proc.wait()
    assert not list((tmp_path / "cpu").glob("*.json")), "nothing was published"
    _ok(_run(tmp_path))
