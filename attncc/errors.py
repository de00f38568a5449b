"""The attncc error hierarchy.

Every error attncc raises on purpose is an :class:`AttnccError`. Messages name the offending
spec expression, op or pass, and say what to do about it.
"""

from __future__ import annotations


class AttnccError(Exception):
    """Base class of every error attncc raises deliberately."""


class SpecError(AttnccError, ValueError):
    """A declaration (spec, mask, score mod, callable) or a call's arguments are invalid."""


class VerifyError(AttnccError):
    """An IR graph breaks an invariant (found by an op's ``verify`` or the graph verifier)."""


class UnsupportedError(AttnccError):
    """A valid declaration that a pass or target cannot handle (yet)."""


class LoweringError(AttnccError):
    """A pass or code generator failed; the message names the passes that ran before it."""


class ConfigError(AttnccError, ValueError):
    """An ATTNCC_* environment variable holds a value attncc cannot read."""


class ParseError(AttnccError, ValueError):
    """The textual IR could not be parsed; the message gives the line and column."""
