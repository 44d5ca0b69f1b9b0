"""Settings declared once, on the dataclass fields that hold them.

A field made by one of the helpers below (`integer`, `number`, `choice`, `text`, `section`, or `setting` with a
check of its own) carries its rule in its metadata, and `check_values` walks a dataclass's fields: a setting's type,
range and allowed values are written beside the field, and every reader (preset files, overrides, a dataclass's own
`__post_init__`) applies the same limits. Extra keyword arguments of the helpers land in the field's metadata too,
for the owner's own rules (presets mark, for instance, which guidance a scale belongs to).

A problem is a `SettingError` (a ValueError) whose text names the key and what it allows:
"'overlap' must be an integer from 1 to 50, got 51"; keys inside a section are dotted ("prediction.order").

This module imports nothing heavy: presets are read before torch is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

RULE = "avatarcli.rule"  # the metadata key of a field's check: value -> stored value, raising Reject

Check = Callable[[Any], Any]


class Reject(Exception):
    """Raised by a check: the value is not `expected` ("an integer from 1 to 50")."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


class SettingError(ValueError):
    """A setting that is not allowed; the message is `{before}'{key}'{after}`."""

    def __init__(self, key: str, before: str, after: str) -> None:
        super().__init__(f"{before}'{key}'{after}")
        self.key, self.before, self.after = key, before, after

    def within(self, section: str) -> SettingError:
        """The same problem, named from the enclosing section ("order" -> "prediction.order")."""
        return SettingError(f"{section}.{self.key}", self.before, self.after)


def setting(check: Check, default: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field whose values `check` accepts (returning the value to store) or rejects (raising Reject)."""
    return dataclasses.field(default=default, metadata={RULE: check, **meta})


def text(default: Any = dataclasses.MISSING, **meta: Any) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise Reject("a string")
        return value

    return setting(check, default, **meta)


def choice(*options: str, default: Any = dataclasses.MISSING, **meta: Any) -> Any:
    expected = "one of " + ", ".join(options)

    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise Reject(expected)
        return value

    return setting(check, default, options=options, **meta)


def integer(low: int, high: int | None = None, *, null: bool = False, default: Any = dataclasses.MISSING,
            **meta: Any) -> Any:
    """An int (not a bool) from `low` to `high` (None: no upper limit); `null` also accepts None."""
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def check(value: Any) -> int | None:
        if value is None and null:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise Reject(expected + (" or null" if null else ""))
        if value < low or (high is not None and value > high):
            raise Reject(expected)
        return value

    return setting(check, default, **meta)


def number(low: float, high: float | None = None, *, above: bool = False, default: Any = dataclasses.MISSING,
           **meta: Any) -> Any:
    """An int or float (not a bool), stored as float, from `low` (`above`: excluded) to `high` (None: no limit)."""
    if high is None:
        expected = f"a number {'>' if above else '>='} {low:g}"
    else:
        expected = f"a number in ({low:g}, {high:g}]" if above else f"a number from {low:g} to {high:g}"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Reject(expected)
        inside = value > low if above else value >= low  # False for NaN
        if not inside or (high is not None and not value <= high):
            raise Reject(expected)
        return float(value)

    return setting(check, default, **meta)


def section(cls: type, *, default: Any = None, **meta: Any) -> Any:
    """A nested settings dataclass: null, an instance of `cls`, or a mapping of its fields (checked by their rules)."""
    expected = "null or a mapping of " + ", ".join(field.name for field in dataclasses.fields(cls))

    def check(value: Any) -> Any:
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise Reject(expected)
        return cls(**check_values(cls, value))

    return setting(check, default, **meta)


def rules(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of `cls` that carry a rule, in declaration order."""
    return {field.name: field for field in dataclasses.fields(cls) if RULE in field.metadata}


def required(cls: type) -> list[str]:
    """The fields of `cls` without a default."""
    return [field.name for field in dataclasses.fields(cls)
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]


def check_value(cls: type, key: str, value: Any) -> Any:
    """`value` as field `key` of `cls` stores it; SettingError if its rule rejects it."""
    check = rules(cls)[key].metadata[RULE]
    try:
        return check(value)
    except Reject as reject:
        raise SettingError(key, "", f" must be {reject.expected}, got {value!r}") from None
    except SettingError as inner:  # a section's own key
        raise inner.within(key) from None


def check_keys(values: Mapping[str, Any], allowed: Iterable[str], need: Iterable[str] = ()) -> None:
    """SettingError for the first key of `values` outside `allowed`, else for the first key of `need` missing."""
    allowed = list(allowed)
    for key in values:
        if key not in allowed:
            raise SettingError(key, "unknown key ", f" (allowed keys: {', '.join(allowed)})")
    for key in need:
        if key not in values:
            raise SettingError(key, "missing key ", "")


def check_values(cls: type, values: Mapping[str, Any], *, allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """`values` checked and converted by the rules of `cls`'s fields, in their order in `values`; a key outside
    `allowed` (default: every field with a rule) is an error too. Raises a SettingError for the first problem."""
    check_keys(values, rules(cls) if allowed is None else allowed)
    return {key: check_value(cls, key, value) for key, value in values.items()}


def check_instance(instance: Any) -> None:
    """For a frozen dataclass's `__post_init__`: every field checked, and stored as its rule converts it."""
    values = {name: getattr(instance, name) for name in rules(type(instance))}
    for name, value in check_values(type(instance), values).items():
        object.__setattr__(instance, name, value)
