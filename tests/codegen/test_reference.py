"""The reference target: call-time validation, source, dumps, caching and config."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attncc as ac
from attncc import config
from attncc.errors import SpecError

SPEC = ac.AttentionSpec(
    name="doc_window",
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mask=ac.document(ac.tensor("doc")) & ac.sliding_window(4),
    score_mod=ac.softcap(10.0),
)


def _qkv(sq: int = 12, skv: int = 12, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(1, 4, sq, 8, dtype=dtype),
        torch.randn(1, 2, skv, 8, dtype=dtype),
        torch.randn(1, 2, skv, 8, dtype=dtype),
    )


DOC = torch.arange(12) // 5


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda k, q, kk, v: k(q[0], kk, v, doc=DOC),
            r"q must be 4-d \[batch, heads, length, head_dim\], got shape \(4, 12, 8\)",
        ),
        (lambda k, q, kk, v: k(q, kk.double(), v, doc=DOC), r"q, k, v dtypes differ"),
        (lambda k, q, kk, v: k(q.int(), kk.int(), v.int(), doc=DOC), r"q has dtype torch.int32; use float16"),
        (lambda k, q, kk, v: k(q[:, :3], kk, v, doc=DOC), r"q has 3 heads, the spec declares num_heads=4"),
        (lambda k, q, kk, v: k(q, kk[:, :1], v[:, :1], doc=DOC), r"k/v have 1 heads, the spec declares num_kv_heads=2"),
        (
            lambda k, q, kk, v: k(q[..., :4], kk[..., :4], v[..., :4], doc=DOC),
            r"q has head_dim 4, the spec declares head_dim=8",
        ),
        (
            lambda k, q, kk, v: k(q, kk, v[:, :, :5], doc=DOC),
            r"k \(1, 2, 12, 8\) and v \(1, 2, 5, 8\) must have the same batch, heads and length",
        ),
        (
            lambda k, q, kk, v: k(q, kk, v[..., :4], doc=DOC),
            r"v has head_dim 4, the spec declares head_dim=8; values of another size: AttentionSpec\(\.\.\., "
            r"value_dim=\.\.\.\)",
        ),
        (lambda k, q, kk, v: k(q, kk[..., :4], v, doc=DOC), r"k has head_dim 4, the spec declares head_dim=8"),
        (lambda k, q, kk, v: k(q, kk, v), r"missing runtime tensors \['doc'\]; pass them as keywords"),
        (lambda k, q, kk, v: k(q, kk, v, doc=DOC, extra=DOC), r"unexpected keyword tensors \['extra'\]"),
        (
            lambda k, q, kk, v: k(q, kk, v, doc=DOC.float()),
            r"runtime tensor 'doc' has dtype torch.float32; the spec uses it as int",
        ),
        (
            lambda k, q, kk, v: k(q, kk, v, doc=DOC.view(3, 4)),
            r"runtime tensor 'doc' must have 1 dims as indexed in the spec",
        ),
        (
            lambda k, q, kk, v: k(q, kk, v, doc=DOC[:10]),
            r"index `kv` of tensor 'doc' reaches 11 along dim 0 \(q length 12, kv length 12\), "
            r"but 'doc' has size 10 there",
        ),
    ],
)
def test_call_errors(call, message: str) -> None:  # type: ignore[no-untyped-def]
    kern = ac.compile(SPEC, target="reference")
    with pytest.raises(SpecError, match=message):
        call(kern, *_qkv())


def test_grid_masks_check_lengths_and_relative_bias_bounds() -> None:
    kern = ac.compile(ac.AttentionSpec(num_heads=1, head_dim=8, mask=ac.neighborhood((4, 4), 3)), target="reference")
    with pytest.raises(
        SpecError, match=r"neighborhood needs q and kv lengths equal to the grid's 16 tokens; got q length 12"
    ):
        kern(*(t[:, :1] for t in _qkv()))
    rb = ac.compile(ac.AttentionSpec(num_heads=4, head_dim=8, score_mod=ac.relative_bias(ac.tensor("t"), 3)))
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(
        SpecError, match=r"index `Min\(3, Max\(-3, kv - q\)\) \+ 3` of tensor 't' reaches 6 along dim 1"
    ):
        rb(q, q, q, t=torch.randn(4, 5))
    with pytest.raises(SpecError, match=r"index `h` of tensor 't' reaches 3 along dim 0"):
        rb(q, q, q, t=torch.randn(2, 7))


def test_inexact_bounds_are_checked_by_the_kernel() -> None:
    idx = ac.tensor("doc")
    spec = ac.AttentionSpec(num_heads=1, head_dim=8, mask=idx[ac.q % 7 + ac.q % 5] == 0)
    q = torch.randn(1, 1, 12, 8)
    with pytest.raises(
        ValueError,
        match=r"`doc\[Mod\(q, 5\) \+ Mod\(q, 7\)\]` reads doc\[...\] at index 8 along dim 0, outside its size 8",
    ):
        ac.compile(spec, target="reference")(q, q, q, doc=torch.zeros(8, dtype=torch.long))


def test_source_is_readable_and_cached() -> None:
    kern = ac.compile(SPEC, target="reference")
    assert "# mask: (kv <= q) & (q <= kv + 4) & Eq(doc[q], doc[kv])" in kern.source
    assert "# score_mod: 10*tanh(score/10)" in kern.source
    assert ac.compile(SPEC, target="reference") is kern
    with config.override(always_compile=True):
        assert ac.compile(SPEC, target="reference") is not kern


def test_dump_writes_every_stage(tmp_path: Path) -> None:
    kern = ac.compile(SPEC, target="reference")
    where = kern.dump(tmp_path / "d")
    cpu_dump = ac.compile(SPEC, target="cpu").dump(tmp_path / "c")
    assert (cpu_dump / "kernel.cpp").read_text().startswith("// attncc cpu kernel for @doc_window")
    assert 'extern "C" int attncc_forward(' in (cpu_dump / "runtime.cpp").read_text()
    names = sorted(p.name for p in where.iterdir())
    stages = ["00-input.ir", "01-canonicalize.ir", "02-fuse.ir", "03-block-sparse.ir"]
    assert names == [*stages, "kernel.py", "meta.json", "plan.txt"]
    assert (where / "plan.txt").read_text() == f"{kern.plan}\n"
    assert "doc: int 1-d (runtime)" in (where / "plan.txt").read_text()
    assert "attn.fused" in (where / "02-fuse.ir").read_text()
    assert 'layout = "runtime"' in (where / "03-block-sparse.ir").read_text()
    meta = json.loads((where / "meta.json").read_text())
    assert meta["runtime_tensors"] == ["doc"] and meta["block_map"].startswith("not drawn yet: the map depends on")
    assert "kern.dump(path, q_len=..., kv_len=..., doc=...)" in meta["block_map"]


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def test_dump_draws_runtime_maps_from_the_last_call_or_given_tensors(tmp_path: Path) -> None:
    """Issue 13 item 9: the README's own example (runtime doc ids) dumps a picture."""
    kern = ac.compile(SPEC, target="reference")
    q, kv = torch.randn(1, 4, 200, 8), torch.randn(1, 2, 200, 8)
    kern(q, kv, kv, doc=torch.arange(200) // 50)
    where = kern.dump(tmp_path / "last")
    assert _png_size(where / "blockmap.png")[1] > 200
    assert json.loads((where / "meta.json").read_text())["block_map"].startswith("listed block map")
    other = ac.compile(SPEC, target="reference").dump(
        tmp_path / "given", q_len=64, doc=torch.zeros(64, dtype=torch.long)
    )
    assert (other / "blockmap.png").exists()


def test_dump_dir_draws_the_map_at_the_first_call(tmp_path: Path) -> None:
    with config.override(dump_dir=tmp_path, always_compile=True):
        kern = ac.compile(SPEC, target="reference")
    folder = tmp_path / f"doc_window-{kern.key}"
    assert not (folder / "blockmap.png").exists()
    q, kv = torch.randn(1, 4, 96, 8), torch.randn(1, 2, 96, 8)
    kern(q, kv, kv, doc=torch.arange(96) // 32)
    assert (folder / "blockmap.png").exists()
    assert "drawn from the first call: q length 96" in json.loads((folder / "meta.json").read_text())["block_map"]


def test_small_maps_are_scaled_up(tmp_path: Path) -> None:
    kern = ac.compile(ac.AttentionSpec(num_heads=1, head_dim=8, mask=ac.causal()), target="reference", tiles=(64, 64))
    kern(*(torch.randn(1, 1, 256, 8) for _ in range(3)))
    _, height = _png_size(kern.dump(tmp_path) / "blockmap.png")
    assert height >= 256, "a 4x4-tile map (256 tokens) is drawn at least 256 px high, not as a 32 px strip"


def test_print_after_is_visible_without_logging_configured(tmp_path: Path) -> None:
    """ATTNCC_PRINT_AFTER must print although the program configured no logging (a fresh process)."""
    code = "import attncc as ac; ac.compile(ac.AttentionSpec(num_heads=1, head_dim=8, mask=ac.causal()), 'reference')"
    env = {**os.environ, "ATTNCC_PRINT_AFTER": "fuse", "ATTNCC_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "IR after fuse:" in done.stderr and "attn.fused" in done.stderr


def test_dump_draws_static_block_maps(tmp_path: Path) -> None:
    kern = ac.compile(ac.AttentionSpec(name="na", num_heads=2, head_dim=8, mask=ac.neighborhood((32, 32), 5)))
    where = kern.dump(tmp_path)
    from PIL import Image

    with Image.open(where / "blockmap.png") as img:
        assert img.size[0] > 100 and img.size[1] > 100
    assert json.loads((where / "meta.json").read_text())["block_map"].startswith("listed block map 16x16 tiles")


def test_dump_dir_env_knob(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = config.from_env({"ATTNCC_DUMP_DIR": str(tmp_path), "ATTNCC_ALWAYS_COMPILE": "1", "ATTNCC_DEBUG": "1"})
    with (
        config.override(**{f: getattr(env, f) for f in ("dump_dir", "always_compile", "debug")}),
        caplog.at_level(logging.INFO, logger="attncc.api"),
    ):
        kern = ac.compile(SPEC, target="reference")
    assert (tmp_path / f"doc_window-{kern.key}" / "kernel.py").exists()
    assert "compiled Kernel(@doc_window" in caplog.text


def test_targets() -> None:
    assert ac.compile(SPEC, target="triton").target == "triton"
    with pytest.raises(SpecError, match=r"unknown target 'gpu'"):
        ac.compile(SPEC, target="gpu")
    with pytest.raises(ValueError, match="ATTNCC_DEBUG must be an integer"):
        config.from_env({"ATTNCC_DEBUG": "lots"})


def test_index_bounds_are_checked_every_call_though_kept_per_shape() -> None:
    """A call's index-bounds check is kept per lengths and tensor shapes (``validate._bounds_checked``): a too-short
    tensor is refused at every call, and a good one of another shape at the same lengths passes."""
    kern = ac.compile(SPEC, target="reference")
    q, k, v = _qkv()
    for _ in range(2):
        with pytest.raises(SpecError, match="reaches 11 along dim 0"):
            kern(q, k, v, doc=DOC[:10])
        kern(q, k, v, doc=DOC)
        kern(q, k, v, doc=torch.cat([DOC, DOC]))  # longer than read: fine
    with pytest.raises(SpecError, match=r"reaches 12 along dim 0 \(q length 13, kv length 13\)"):
        kern(*_qkv(13, 13), doc=torch.arange(13)[:12])  # the same tensor shape at lengths the index reads further
    lens = ac.AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=8, mask=ac.kv < ac.tensor("lens")[ac.b])
    short = ac.compile(lens, target="reference")
    for n in (5, 9):  # the index reads neither length: kept across lengths, still refused at each
        short(*_qkv(1, n), lens=torch.tensor([n]))
        with pytest.raises(SpecError, match=rf"reaches 1 along dim 0 \(q length 1, kv length {n}\)"):
            short(*(torch.cat([x, x]) for x in _qkv(1, n)), lens=torch.tensor([n]))
