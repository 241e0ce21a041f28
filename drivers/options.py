"""Declared options, and the one small validator that checks a table against them.

Each driver module declares its ``[sensors.NAME]`` options as data next to its code
(``OPTIONS = DriverOptions(...)``); edge/config_schema.py declares the agent's own
sections with the same ``Option``. One validator checks both, so ``edge config check``,
``edge run``, a SIGHUP reload and a remote change all see the same errors, each by key
with a hint. Pure: imports nothing of ours (a candidate for the shared core package).

Problems are ``(key, text)`` pairs, the key relative to the table checked; the caller
prefixes the table's path (``sensors.no2``) and turns them into ``ConfigError``s.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Problem = tuple[str, str]
# A rule over a whole table (its options merged over their defaults): required-if,
# keys that must differ, files that must exist. Yields problems by key.
Rule = Callable[[Mapping[str, Any]], Iterable[Problem]]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # as a default: the key must be given


@dataclass(frozen=True, slots=True)
class Option:
    """One key: its default (which gives its type), and what values it may take.

    ``kind`` overrides the type taken from the default (a tuple for keys that take
    several, e.g. an I2C bus number or "sim"). ``lo``/``hi`` bound numbers (inclusive;
    ``lo_open``: above ``lo``). ``choices`` lists the allowed values. ``check`` returns
    a problem text for a value the other fields cannot express.
    """

    default: Any = None
    kind: type | tuple[type, ...] | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    unit: str = ""
    choices: tuple[Any, ...] = ()
    check: Callable[[Any], str | None] | None = None
    doc: str = ""
    secret: bool = False  # never shown in a problem (problems reach the journal)

    def types(self) -> tuple[type, ...]:
        if self.kind is not None:
            return self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if self.default is None or self.default is REQUIRED:
            return ()  # any type (checked by ``check`` where it matters)
        return (type(self.default),)


@dataclass(frozen=True, slots=True)
class DriverOptions:
    """A driver's options (``driver`` itself is not one of them) and its table rules."""

    options: Mapping[str, Option]
    rules: tuple[Rule, ...] = ()

    def defaults(self) -> dict[str, Any]:
        return {k: o.default for k, o in self.options.items() if o.default is not REQUIRED}


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text in quotes",
               dict: "a table", list: "a list"}  # fmt: skip


def _fmt(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def coerce(opt: Option, value: Any) -> tuple[Any, str | None]:
    """The value as the option's type (an int is accepted for a float), or a problem."""
    types = opt.types()
    if types:
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        # bool is an int in Python; TOML's true is not a port number.
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            if str in types and isinstance(value, (int, float)) and not isinstance(value, bool):
                return value, f"expected {want}, got {value!r}: write it in quotes, \"{value}\""
            return value, f"expected {want}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        # TOML has nan and inf: no bound can be trusted with them (nan compares false).
        return value, f"must be a finite number, not {value!r}"
    if opt.choices and value not in opt.choices:
        near = difflib.get_close_matches(value, [c for c in opt.choices if isinstance(c, str)], n=1) \
            if isinstance(value, str) else []  # fmt: skip
        hint = f"did you mean {near[0]!r}? " if near else ""
        return value, f"{value!r} is not allowed: {hint}one of {', '.join(repr(c) for c in opt.choices)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low_bad = opt.lo is not None and (value <= opt.lo if opt.lo_open else value < opt.lo)
        high_bad = opt.hi is not None and value > opt.hi
        if low_bad or high_bad:
            return value, _range_text(opt)
    if opt.check is not None:
        problem = opt.check(value)
        if problem:
            return value, problem
    return value, None


def _range_text(opt: Option) -> str:
    unit = f" {opt.unit}" if opt.unit else ""
    if opt.lo is not None and opt.hi is not None:
        if opt.lo_open:
            return f"must be above {_fmt(opt.lo)} and at most {_fmt(opt.hi)}{unit}"
        return f"must be between {_fmt(opt.lo)} and {_fmt(opt.hi)}{unit}"
    if opt.lo is not None:
        return f"must be above {_fmt(opt.lo)}{unit}" if opt.lo_open else f"must be {_fmt(opt.lo)}{unit} or more"
    return f"must be at most {_fmt(opt.hi)}{unit}"  # type: ignore[arg-type]


def unknown_key_text(key: str, known: Iterable[str], what: str = "key") -> str:
    """"unknown key: did you mean 'port'? (known: ...)" — a misspelt key names the right one."""
    known = sorted(known)
    # Short keys ("di" for "id") score below difflib's 0.6 though one letter is off: be lenient there.
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6 if len(key) > 3 else 0.4)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return f"unknown {what}: {hint}(known: {', '.join(known)})"


@dataclass(slots=True)
class Checked:
    values: dict[str, Any] = field(default_factory=dict)  # every option, merged over the defaults
    problems: list[Problem] = field(default_factory=list)


def check_table(
    options: Mapping[str, Option], table: Mapping[str, Any], rules: Iterable[Rule] = (), what: str = "key"
) -> Checked:
    """Every problem of one table, not only the first; bad values fall back to their defaults
    so the rules between keys still run on the rest."""
    out = Checked({k: o.default for k, o in options.items()})
    for key, value in table.items():
        opt = options.get(key)
        if opt is None:
            out.problems.append((key, unknown_key_text(key, options, what)))
            continue
        value, problem = coerce(opt, value)
        if problem and opt.secret:
            problem = problem.replace(repr(value), "***").replace(str(value), "***")
        if problem:
            out.problems.append((key, problem))
        else:
            out.values[key] = value
    for key, opt in options.items():
        if opt.default is REQUIRED and key not in table:
            out.problems.append((key, f"required{': ' + opt.doc if opt.doc else ''}"))
    # Rules see every value (a missing required one as REQUIRED, a bad one as its default);
    # a key already named is not named twice.
    bad = {k for k, _ in out.problems}
    for rule in rules:
        out.problems += [(k, p) for k, p in rule(out.values) if k not in bad]
    return out


# -- options several drivers share ------------------------------------------------------------

STANDARD_BAUDS = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)


def serial_port(doc: str = "") -> Option:
    """``port``: a device path (/dev/serial0), a pyserial URL, or "sim:NAME" in a simulated van."""
    return Option(REQUIRED, kind=str, check=lambda v: None if v.strip() else "empty: name the serial port",
                  doc=doc or "the serial port, e.g. port = \"/dev/serial0\"")  # fmt: skip


def baudrate(default: int) -> Option:
    return Option(default, choices=STANDARD_BAUDS)


def _bus_check(v: Any) -> str | None:
    if v == "sim" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return None
    return f"an I2C bus number such as 1, or 'sim', not {v!r}"


def i2c_bus(default: int = 1) -> Option:
    return Option(default, kind=(int, str), check=_bus_check)


def i2c_address(default: int, lo: int = 0x03, hi: int = 0x77) -> Option:
    return Option(default, lo=lo, hi=hi, unit=f"(0x{lo:02x}..0x{hi:02x})")
