"""Head-sharded and sequence-parallel attention in 2 and 4 real processes (gloo on CPU) against the float64
oracle: the gathered output, every rank's q/k/v gradients and the learned tensors' gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.distributed.cases import CASES, expected, tp_expected

WORKER = Path(__file__).with_name("worker.py")


def _launch(world: int, names: list[str], tmp: Path) -> list[dict[str, dict[str, torch.Tensor]]]:
    init = f"file://{tmp / 'pg'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), init, str(tmp / "out"), *names],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    return [torch.load(tmp / f"out.{r}") for r in range(world)]


def _check(world: int, names: list[str], tmp: Path) -> None:
    results = _launch(world, [*names, "tp"], tmp)
    want_tp = tp_expected()
    for rank, res in enumerate(results):  # torch's own TP split of a block whose weights permute_heads reordered
        torch.testing.assert_close(res["tp"]["out"].double(), want_tp["out"], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(res["tp"]["grad_x"].double(), want_tp["grad_x"], atol=2e-5, rtol=1e-4)
        assert res["tp"]["dtensor_err"] < 1e-5, f"rank {rank}: DTensor heads differ by {res['tp']['dtensor_err']}"
    for name in names:
        want = expected(name)
        heads = CASES[name].mode == "heads"
        for rank, res in enumerate(results):
            got = res[name]
            torch.testing.assert_close(got["out"].double(), want["out"], atol=2e-5, rtol=1e-4, msg=f"{name} out")
            qi, ki = got["q_index"], got["kv_index"]
            for g, full, idx in (("grad_q", "grad_q", qi), ("grad_k", "grad_k", ki), ("grad_v", "grad_v", ki)):
                ref = want[full][:, idx] if heads else want[full][:, :, idx]
                torch.testing.assert_close(got[g].double(), ref, atol=1e-4, rtol=1e-4, msg=f"{name} {g} rank {rank}")
            for n in CASES[name].learned:
                torch.testing.assert_close(got[f"grad_{n}"].double(), want[f"grad_{n}"], atol=1e-4, rtol=1e-4,
                                           msg=f"{name} grad_{n} rank {rank}")  # fmt: skip
        if heads:  # every query head computed exactly once
            assert sorted(int(h) for r in results for h in r[name]["q_index"]) == list(range(CASES[name].shape[1]))
        else:
            rows = sorted(int(p) for r in results for p in r[name]["q_index"])
            assert rows == list(range(CASES[name].shape[3]))


def test_two_processes(tmp_path: Path) -> None:
    _check(2, list(CASES), tmp_path)


def test_four_processes(tmp_path: Path) -> None:
    _check(4, list(CASES), tmp_path)
