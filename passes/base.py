"""Pass base class, registry, pipeline strings and the runner.

A pass is a small frozen dataclass with a ``name``; its fields are its options, written in a
pipeline string as ``name{opt=value,...}``::

    >>> from attncc.passes import parse_pipeline
    >>> parse_pipeline("canonicalize,fuse")
    [Canonicalize(), Fuse()]

The runner verifies the IR after every pass when asked (``ATTNCC_VERIFY=1``, on in tests),
logs the IR after the passes named in ``ATTNCC_PRINT_AFTER``, times every pass, and re-raises
a failure as a LoweringError naming the passes that ran before it and the IR it got.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from attncc import config
from attncc.errors import AttnccError, LoweringError, SpecError, UnsupportedError
from attncc.ir.core import Graph
from attncc.ir.text import print_ir

log = logging.getLogger("attncc.passes")

REGISTRY: dict[str, type[Pass]] = {}


@dataclass(frozen=True)
class Pass:
    """A named rewrite of a whole graph. Subclasses implement :meth:`run` and set ``name``."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def run(self, graph: Graph) -> Graph:
        raise NotImplementedError

    def spelling(self) -> str:
        """The pipeline-string form of this pass and its options."""
        opts = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}{{{opts}}}" if opts else self.name


@dataclass(frozen=True)
class PassRecord:
    """One pass as it ran: its spelling, the IR it produced and the seconds it took."""

    spelling: str
    ir: str
    seconds: float


@dataclass
class PipelineResult:
    graph: Graph
    records: list[PassRecord] = field(default_factory=list)


_ITEM = re.compile(r"\s*([\w-]+)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``"canonicalize,block-sparse{bq=64,bkv=64}"`` into pass objects."""
    passes: list[Pass] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise SpecError(f"bad pipeline {text!r} at column {pos + 1}; expected name or name{{opt=value}}")
        passes.append(_make(m.group(1), m.group(2) or ""))
        pos = m.end()
    return passes


def _make(name: str, opts: str) -> Pass:
    cls = REGISTRY.get(name)
    if cls is None:
        raise SpecError(f"unknown pass {name!r}; registered passes: {sorted(REGISTRY)}")
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    kwargs: dict[str, object] = {}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, _, raw = (part.strip() for part in item.partition("="))
        if key not in fields:
            raise SpecError(f"pass {name!r} has no option {key!r}; options: {sorted(fields)}")
        kwargs[key] = _coerce(name, key, fields[key], raw)
    return cls(**kwargs)


def _coerce(name: str, key: str, default: object, raw: str) -> object:
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes")
    try:
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as exc:
        raise SpecError(f"pass {name!r}: option {key}={raw!r} is not a {type(default).__name__}") from exc
    return raw


def run_pipeline(graph: Graph, passes: Sequence[Pass], verify: bool | None = None) -> PipelineResult:
    """Run ``passes`` in order; see the module docstring for verification, logging and errors."""
    cfg = config.get()
    verify = cfg.verify if verify is None else verify
    result = PipelineResult(graph, [PassRecord("input", print_ir(graph), 0.0)])
    done: list[str] = []
    for p in passes:
        before = result.graph
        start = time.perf_counter()
        try:
            after = p.run(before)
            if verify:
                after.verify()
        except (UnsupportedError, SpecError):
            raise
        except (AttnccError, Exception) as exc:
            raise LoweringError(
                f"pass {p.spelling()!r} failed after [{', '.join(done) or 'no passes'}]: "
                f"{type(exc).__name__}: {exc}\n--- IR it got ---\n{print_ir(before)}"
            ) from exc
        seconds = time.perf_counter() - start
        text = print_ir(after)
        result.records.append(PassRecord(p.spelling(), text, seconds))
        result.graph = after
        done.append(p.spelling())
        log.debug("pass %s: %.2f ms", p.spelling(), seconds * 1e3)
        if "all" in cfg.print_after or p.name in cfg.print_after or cfg.debug >= 3:
            config.knob_logger(log.name).info("IR after %s:\n%s", p.spelling(), text)
    return result
