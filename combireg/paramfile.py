"""The elastix-style parameter-file language: text <-> raw maps <-> typed values of a schema.

A parameter file holds one ``(Key value ...)`` entry per line, with ``//`` comments, quoted
strings and bare numbers, e.g.::

    // similarity: half MSE, half NCC
    (Metric "MSE" "NCC")
    (Metric0Weight 0.5)
    (MaximumNumberOfIterations 150 60)   // one value per resolution

The raw form is a :data:`ParamMap` (``dict[str, tuple[str, ...]]``, every value a string with
quotes stripped), as in itk-elastix: :func:`parse_text` and :func:`read_parameter_file` read it,
:func:`format_parameter_text` writes it.

Which keys a kind of file takes is data: a :class:`Schema`, a table of :class:`KeySpec` (type,
count rule, range, default, description) with its count rules. :func:`check_map` validates a
raw map against any schema in one way, for every schema: unknown keys (with the nearest known
key as a suggestion), values of the wrong type, count or range; the :class:`CheckedMap` it
returns gives each key's typed values (the default where the key is not given) and error
messages for the cross-key checks of the settings built from it. The schemas themselves and
their settings (registration, DRN training) are in :mod:`combireg.params`.

combireg is stricter than elastix: unknown keys, duplicate keys, malformed lines and values of
the wrong type, count or range are all errors (:class:`~combireg.errors.CombiregError`) whose
message starts with ``FILE:LINE:`` where the line is known.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Literal, Mapping, Sequence

from .errors import CombiregError

__all__ = [
    "ParamMap",
    "ParsedParamMap",
    "KeySpec",
    "CountRule",
    "Schema",
    "CheckedMap",
    "parse_text",
    "read_parameter_file",
    "format_parameter_text",
    "check_map",
]

ParamMap = dict[str, tuple[str, ...]]

Kind = Literal["int", "float", "str", "bool"]
#: A count rule: (fewest values, most values or None for no limit, how to say it in a message).
CountRule = tuple[int, int | None, str]

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
#: Where a pattern key name takes its number; only canonical numbers match ("Metric01Weight" does not).
_INDEX = "<n>"
_INDEX_RE = "(0|[1-9][0-9]*)"


@dataclass(frozen=True)
class KeySpec:
    """One parameter-file key: its type, how many values it takes, its range and default.

    Attributes
    ----------
    name : str
        The key as written in a file; a name with ``<n>`` is a pattern standing for the keys
        with a number there (``Metric<n>Weight``: ``Metric0Weight``, ``Metric1Weight``, ...).
    kind : {"int", "float", "str", "bool"}
        Type of every value; string and bool values are written quoted.
    count : str
        How many values the key takes: the name of one of its schema's count rules
        (:attr:`Schema.counts`).
    default : tuple of str or None
        Raw default values; None where the default depends on other keys.
    description : str
        One line, printed as a ``//`` comment by ``combireg params defaults``.
    choices : tuple of str
        Allowed values for ``str`` keys (empty: any).
    minimum, maximum : float or None
        Inclusive bounds for numbers, unless ``minimum_exclusive``.
    odd : bool
        Integers must be odd.
    distinct : bool
        No value may be given twice.
    increasing : bool
        Each value must be smaller than the next (``lo hi``).
    """

    name: str
    kind: Kind
    count: str
    default: tuple[str, ...] | None
    description: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    minimum_exclusive: bool = False
    maximum: float | None = None
    odd: bool = False
    distinct: bool = False
    increasing: bool = False

    @property
    def per_level(self) -> bool:
        """Whether the key holds values per resolution level (count rule ``per-level`` or
        ``xyz-per-level`` of the registration schema)."""
        return self.count in ("per-level", "xyz-per-level")

@dataclass(frozen=True, eq=False)
class Schema:
    """The keys one kind of parameter file takes: a table of :class:`KeySpec` and its count rules.

    Attributes
    ----------
    specs : tuple of KeySpec
        The keys, in the order ``combireg params defaults`` writes them.
    counts : mapping of str to CountRule
        The count rules the specs name.
    indexed : int
        How many concrete keys of each pattern key (``Metric<n>Weight``) unknown-key
        suggestions consider.
    foreign : Schema, optional
        Another kind of file: a key of it that is not a key here gets ``foreign_note`` in its
        unknown-key message when no close key suggests itself.
    foreign_note : str
    """

    specs: tuple[KeySpec, ...]
    counts: Mapping[str, CountRule]
    indexed: int = 0
    foreign: "Schema | None" = None
    foreign_note: str = ""

    @cached_property
    def _exact(self) -> dict[str, KeySpec]:
        return {spec.name: spec for spec in self.specs if _INDEX not in spec.name}

    @cached_property
    def _patterns(self) -> list[tuple[re.Pattern, KeySpec]]:
        return [(re.compile(re.escape(spec.name).replace(re.escape(_INDEX), _INDEX_RE) + r"\Z"), spec)
                for spec in self.specs if _INDEX in spec.name]

    def spec_for(self, key: str) -> KeySpec | None:
        """The spec of ``key`` (a concrete name such as ``Metric1Weight``), or None if unknown."""
        if key in self._exact:
            return self._exact[key]
        return next((spec for pattern, spec in self._patterns if pattern.match(key)), None)

    def known_keys(self) -> list[str]:
        """Every concrete key name, for unknown-key suggestions."""
        names = [spec.name for spec in self.specs if _INDEX not in spec.name]
        return names + [spec.name.replace(_INDEX, str(i)) for spec in self.specs if _INDEX in spec.name
                        for i in range(self.indexed)]

    def unknown_key_message(self, key: str) -> str:
        """``unknown key 'K'`` with the nearest known key as a suggestion (or the foreign note)."""
        match = difflib.get_close_matches(key, self.known_keys(), n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        note = self.foreign_note if self.foreign is not None and self.foreign.spec_for(key) else ""
        return f"unknown key {key!r}{hint or note}"


# --------------------------------------------------------------------------------------------
# Raw maps: parsing and writing
# --------------------------------------------------------------------------------------------


class ParsedParamMap(dict):
    """A :data:`ParamMap` that remembers where each key came from, for error messages.

    Compares equal to a plain dict with the same entries.

    Attributes
    ----------
    source : str
        File name, or ``"<string>"``.
    lines : dict of str to int
        1-based line number of each key.
    """

    def __init__(self, items: Mapping[str, tuple[str, ...]] | None = None, *,
                 source: str = "<string>", lines: Mapping[str, int] | None = None) -> None:
        super().__init__(items or {})
        self.source = source
        self.lines: dict[str, int] = dict(lines or {})


def _syntax_error(source: str, lineno: int, message: str) -> CombiregError:
    return CombiregError(f"{source}:{lineno}: {message}")


def _skip_space(line: str, i: int) -> int:
    while i < len(line) and line[i].isspace():
        i += 1
    return i


def _read_quoted(line: str, i: int, fail: Callable[[str], CombiregError]) -> tuple[str, int]:
    """The quoted string starting at ``line[i] == '"'`` and the index after it."""
    end = line.find('"', i + 1)
    if end < 0:
        raise fail("unbalanced quote")
    after = end + 1
    if after < len(line) and not (line[after].isspace() or line[after] == ")"):
        raise fail(f"expected a space or ')' after the closing quote, got {line[after]!r}")
    return line[i + 1:end], after


def _read_bare(line: str, i: int, fail: Callable[[str], CombiregError]) -> tuple[str, int]:
    """The bare token starting at ``i`` and the index after it."""
    j = i
    while (j < len(line) and not line[j].isspace() and line[j] not in '()"'
           and not line.startswith("//", j)):
        j += 1
    if j < len(line) and line[j] in '("':
        raise fail(f"unexpected {line[j]!r} after {line[i:j]!r}")
    return line[i:j], j


def _parse_line(line: str, fail: Callable[[str], CombiregError]) -> tuple[str, tuple[str, ...]] | None:
    """``(key, values)`` of one line, or None for a blank or comment-only line."""
    i = _skip_space(line, 0)
    if i == len(line) or line.startswith("//", i):
        return None
    if line[i] != "(":
        raise fail(f"expected '(' at the start of an entry, got {line[i:i + 20]!r}")
    tokens: list[str] = []
    key_quoted = False
    i += 1
    while True:
        i = _skip_space(line, i)
        if i == len(line) or line.startswith("//", i):
            raise fail("missing ')'")
        if line[i] == ")":
            break
        if line[i] == "(":
            raise fail("unexpected '(' inside an entry")
        if line[i] == '"':
            key_quoted = key_quoted or not tokens
            token, i = _read_quoted(line, i, fail)
        else:
            token, i = _read_bare(line, i, fail)
        tokens.append(token)
    rest = _skip_space(line, i + 1)
    if rest < len(line) and not line.startswith("//", rest):
        raise fail(f"unexpected text after ')': {line[rest:].rstrip()!r}")
    if not tokens or tokens[0] == "":
        raise fail("empty key")
    key = tokens[0]
    if key_quoted:
        raise fail(f"the key must not be quoted: {key!r}")
    if not _KEY_RE.match(key):
        raise fail(f"invalid key {key!r} (letters, digits and '_', not starting with a digit)")
    return key, tuple(tokens[1:])


def parse_text(text: str, source: str = "<string>") -> ParsedParamMap:
    """Parse parameter-file text (syntax only; keys and values are not checked).

    Parameters
    ----------
    text : str
        The file contents.
    source : str
        Name used in error messages.

    Returns
    -------
    ParsedParamMap
        Keys in file order, values as strings with quotes stripped; ``.lines`` holds each
        key's line number.

    Raises
    ------
    CombiregError
        ``SOURCE:LINE: ...`` for a malformed line or a duplicate key.
    """
    result = ParsedParamMap(source=source)
    # A byte-order mark would otherwise make line 1 a syntax error.
    text = text.removeprefix("\ufeff")
    for lineno, line in enumerate(text.splitlines(), start=1):
        entry = _parse_line(line, lambda msg, n=lineno: _syntax_error(source, n, msg))
        if entry is None:
            continue
        key, values = entry
        if key in result:
            raise _syntax_error(
                source, lineno, f"duplicate key {key!r} (first given on line {result.lines[key]})"
            )
        result[key] = values
        result.lines[key] = lineno
    return result


def read_parameter_file(path: str | os.PathLike) -> ParsedParamMap:
    """Read and parse a parameter file (syntax only).

    Raises
    ------
    CombiregError
        If the file is missing, unreadable, not UTF-8 text, or malformed.
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise CombiregError(f"{source}: no such file") from None
    except UnicodeDecodeError as exc:
        raise CombiregError(f"{source}: not a UTF-8 text file ({exc.reason})") from None
    except OSError as exc:
        raise CombiregError(f"{source}: cannot read parameter file ({exc.strerror or exc})") from None
    return parse_text(text, source)


def _is_bare_safe(value: str) -> bool:
    """Whether ``value`` reads back unchanged when written without quotes."""
    return (value != "" and "//" not in value
            and not any(c.isspace() or c in '()"' for c in value))


def _format_value(key: str, value: str, spec: KeySpec | None) -> str:
    if '"' in value or "\n" in value or "\r" in value:
        raise CombiregError(f"{key}: cannot write value {value!r} (contains a quote or line break)")
    if spec is not None:
        quote = spec.kind in ("str", "bool")
    else:
        # Unknown keys: keep numbers bare like elastix does, quote everything else.
        quote = not (_INT_RE.match(value) or _FLOAT_RE.match(value))
    if quote or not _is_bare_safe(value):
        return f'"{value}"'
    return value


def format_parameter_text(pm: Mapping[str, Sequence[str]], schema: Schema | None = None, *,
                          comments: bool = False) -> str:
    """Write a parameter map as elastix parameter-file text.

    Parameters
    ----------
    pm : ParamMap
        Keys and raw values.
    schema : Schema, optional
        Keys of the schema with string and bool values are written quoted, numbers bare;
        other keys keep numbers bare and quote everything else.
    comments : bool
        Put each known key's description as a ``//`` comment above it.

    Returns
    -------
    str
        One ``(Key value ...)`` line per key, ending with a newline;
        ``parse_text(format_parameter_text(pm, schema)) == pm``.

    Raises
    ------
    CombiregError
        If a key or value cannot be written (bad key name, value with a quote or line break).
    """
    lines: list[str] = []
    previous: KeySpec | None = None
    for key, values in pm.items():
        if not _KEY_RE.match(key):
            raise CombiregError(f"cannot write key {key!r} (letters, digits and '_' only)")
        spec = schema.spec_for(key) if schema is not None else None
        # Consecutive keys of one spec (Metric0Weight, Metric1Weight) share one comment.
        if comments and spec is not None and spec is not previous:
            if lines:
                lines.append("")
            lines.append(f"// {spec.description}")
        previous = spec
        lines.append("(" + " ".join([key] + [_format_value(key, v, spec) for v in values]) + ")")
    return "\n".join(lines) + "\n" if lines else ""


# --------------------------------------------------------------------------------------------
# Validation against a schema
# --------------------------------------------------------------------------------------------


def _fmt_bound(bound: float) -> str:
    # Whole bounds print as integers: "<= 4294967295", not "<= 4.29497e+09".
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _expectation(spec: KeySpec) -> str:
    """What a single value of ``spec`` must look like, e.g. 'an odd integer >= 3'."""
    if spec.kind == "bool":
        return '"true" or "false"'
    if spec.kind == "str":
        return "one of " + ", ".join(repr(c) for c in spec.choices) if spec.choices else "a string"
    noun = ("an odd integer" if spec.odd else "an integer") if spec.kind == "int" else "a number"
    bounds = []
    if spec.minimum is not None:
        bounds.append(f"{'>' if spec.minimum_exclusive else '>='} {_fmt_bound(spec.minimum)}")
    if spec.maximum is not None:
        bounds.append(f"<= {_fmt_bound(spec.maximum)}")
    return f"{noun} {' and '.join(bounds)}" if bounds else noun


def _convert_value(spec: KeySpec, raw: str) -> object | None:
    """The typed value, or None if ``raw`` does not fit the spec."""
    if spec.kind == "bool":
        return {"true": True, "false": False}.get(raw)
    if spec.kind == "str":
        return raw if not spec.choices or raw in spec.choices else None
    if spec.kind == "int":
        if not _INT_RE.match(raw):
            return None
        value: float = int(raw)
        if spec.odd and value % 2 == 0:
            return None
    else:
        if not _FLOAT_RE.match(raw):
            return None
        value = float(raw)
        if not math.isfinite(value):
            return None
    if spec.minimum is not None and (
        value < spec.minimum or (spec.minimum_exclusive and value == spec.minimum)
    ):
        return None
    if spec.maximum is not None and value > spec.maximum:
        return None
    return value


class CheckedMap:
    """A raw parameter map validated key by key against a :class:`Schema`.

    Attributes
    ----------
    schema : Schema
    source : str
        File name (or another name) for messages.
    lines : dict of str to int
        Line number of each key, where known.
    typed : dict of str to tuple
        Typed values of the keys given, in line order.
    """

    def __init__(self, pm: Mapping[str, Sequence[str]], schema: Schema, source: str) -> None:
        self.schema = schema
        self.source = source
        self.lines: dict[str, int] = dict(getattr(pm, "lines", {}) or {})
        # In line order, so that the first error reported is the first in the file.
        order = sorted(pm, key=self.line)
        for key in order:
            if schema.spec_for(key) is None:
                raise self.error(key, schema.unknown_key_message(key))
        self.typed: dict[str, tuple] = {key: self.check(key, schema.spec_for(key), tuple(pm[key]))
                                         for key in order}

    # ---------------------------------------------------------------- messages
    def line(self, key: str) -> int:
        """The line of ``key`` (0 where unknown): for sorting keys in file order."""
        return self.lines.get(key, 0)

    def where(self, key: str | None) -> str:
        """``SOURCE:LINE`` of ``key`` (``SOURCE`` where the line is not known)."""
        line = self.lines.get(key) if key is not None else None
        return f"{self.source}:{line}" if line is not None else self.source

    def line_note(self, key: str) -> str:
        """`` (line N)`` for ``key``, or nothing where the line is not known."""
        line = self.lines.get(key)
        return f" (line {line})" if line is not None else ""

    def error(self, key: str | None, message: str) -> CombiregError:
        """``SOURCE:LINE: message`` (``SOURCE: message`` where the line is not known)."""
        return CombiregError(f"{self.where(key)}: {message}")

    # ---------------------------------------------------------------- values
    def check(self, key: str, spec: KeySpec, raw: Sequence[str]) -> tuple:
        """Typed values of one key, checking type, range and the key's own count rule."""
        low, high, wording = self.schema.counts[spec.count]
        if len(raw) < low or (high is not None and len(raw) > high):
            raise self.error(key, f"{key} expects {wording}, got {len(raw)}")
        values = []
        for index, text in enumerate(raw):
            value = _convert_value(spec, text)
            if value is None:
                which = f" (value {index + 1})" if len(raw) > 1 else ""
                raise self.error(key, f"{key} expects {_expectation(spec)}, got {text!r}{which}")
            values.append(value)
        if spec.distinct and len(set(values)) < len(values):
            twice = next(v for v in values if values.count(v) > 1)
            raise self.error(key, f"{key} lists {twice!r} more than once")
        if spec.increasing and not all(a < b for a, b in zip(values, values[1:])):
            raise self.error(key, f"{key} expects lo < hi, got {' '.join(repr(text) for text in raw)}")
        return tuple(values)

    def given(self, key: str) -> bool:
        """Whether the map gives ``key`` (else its default applies)."""
        return key in self.typed

    def values(self, key: str, *, limit: int | None = None) -> tuple:
        """The typed values of ``key``: as given, else its default (the first ``limit`` values)."""
        if key in self.typed:
            return self.typed[key]
        spec = self.schema.spec_for(key)
        return self.check(key, spec, spec.default if limit is None else spec.default[:limit])

    def single(self, key: str) -> Any:
        """The one value of a single-valued key, given or default."""
        return self.values(key)[0]


def check_map(pm: Mapping[str, Sequence[str]], schema: Schema, *, source: str | None = None) -> CheckedMap:
    """Validate every key of a raw parameter map against ``schema``.

    Parameters
    ----------
    pm : ParamMap
        Raw map; a :class:`ParsedParamMap` gives errors with line numbers.
    schema : Schema
    source : str, optional
        Name for messages; default ``pm.source`` if it has one, else ``"<string>"``.

    Returns
    -------
    CheckedMap

    Raises
    ------
    CombiregError
        ``SOURCE:LINE: ...`` for an unknown key (with the nearest known key as a suggestion)
        or a value of the wrong type, count or range.
    """
    if source is None:
        source = getattr(pm, "source", "<string>")
    return CheckedMap(pm, schema, source)
