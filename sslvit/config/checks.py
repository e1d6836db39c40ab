"""The one vocabulary for checking config values, and typed config groups built from it.

Each key of a config group is declared once, with its type and range, as a field of a frozen dataclass:

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ProbeConfig(Group):
        PREFIX = "probe"
        epochs: int = key(Integer(min=1), 50)
        lr: float = key(Number(gt=0, lt=10), 1e-3, hint="e.g. 1e-3")

`ProbeConfig.parse(cfg)` rejects unknown keys, checks every value and returns the typed, frozen group. Every
failure is one `ConfigError` line in the same words: the dotted key, the value as given, what is allowed, and a
hint where one helps (`probe.lr=-1 must be a number > 0 and < 10, e.g. 1e-3`).

This module imports nothing heavy (no JAX, no TensorFlow), so any part of the project can use it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Iterable, TypeVar

from sslvit.errors import ConfigError

G = TypeVar("G", bound="Group")
MISSING_VALUE = "???"  # Hydra's mandatory-value marker


class Check:
    """A value check: `check(value, key)` returns the value (converted, e.g. a list to a tuple) or raises one
    ConfigError line. `what` describes the allowed values ("an integer >= 1")."""

    what = "valid"

    def __call__(self, value: Any, key: str, hint: str = "") -> Any:
        if not self.ok(value):
            raise fail(key, value, self.what, hint)
        return self.convert(value)

    def ok(self, value: Any) -> bool:
        return True

    def convert(self, value: Any) -> Any:
        return value


def fail(key: str, value: Any, what: str, hint: str = "") -> ConfigError:
    """The one wording of a bad value."""
    sep = " " if hint.startswith("(") else ", "
    return ConfigError(f"{key}={_show(value)} must be {what}{sep + hint if hint else ''}")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)


def is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite real number (NaN and infinities are not numbers here: they pass comparisons silently)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _bounds(gt=None, ge=None, lt=None, le=None) -> str:
    parts = []
    if gt is not None:
        parts.append(f"> {gt:g}")
    if ge is not None:
        parts.append(f">= {ge:g}")
    if lt is not None:
        parts.append(f"< {lt:g}")
    if le is not None:
        parts.append(f"<= {le:g}")
    if len(parts) == 2 and (ge is not None or gt is not None) and (lt is not None or le is not None):
        lo = "[" if ge is not None else "("
        hi = "]" if le is not None else ")"
        return f"in {lo}{(ge if ge is not None else gt):g}, {(le if le is not None else lt):g}{hi}"
    return " and ".join(parts)


def _within(x, gt=None, ge=None, lt=None, le=None) -> bool:
    return (gt is None or x > gt) and (ge is None or x >= ge) and (lt is None or x < lt) and (le is None or x <= le)


class Integer(Check):
    """An integer (not a bool, not a float) within bounds."""

    def __init__(self, min: int | None = None, max: int | None = None):
        self.min, self.max = min, max
        bounds = _bounds(ge=min, le=max)
        self.what = f"an integer {bounds}".strip()

    def ok(self, value):
        return is_int(value) and _within(value, ge=self.min, le=self.max)

    def convert(self, value):
        return int(value)


class Number(Check):
    """A finite real number (ints accepted) within bounds; converted to float."""

    def __init__(
        self, *, gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None
    ):
        self.bounds = dict(gt=gt, ge=ge, lt=lt, le=le)
        text = _bounds(**self.bounds)
        self.what = f"a number {text}".strip() if text else "a finite number"

    def ok(self, value):
        return is_number(value) and _within(value, **self.bounds)

    def convert(self, value):
        return float(value)


class Boolean(Check):
    what = "true or false"

    def ok(self, value):
        return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy bools from loaded configs

    def convert(self, value):
        return bool(value)


class String(Check):
    """A non-empty string."""

    what = "a non-empty string"

    def ok(self, value):
        return isinstance(value, str) and bool(value.strip())


class Choice(Check):
    """One of a fixed set of values (strings, or booleans such as auto/true/false)."""

    def __init__(self, choices: Iterable[Any]):
        self.choices = tuple(choices)
        self.what = "one of " + ", ".join(_word(c) for c in self.choices)

    def ok(self, value):
        return any(value == c and type(value) is type(c) for c in self.choices)


def _word(c: Any) -> str:
    return "true" if c is True else "false" if c is False else "null" if c is None else str(c)


class Path(Check):
    """A filesystem path (a string); `~` is expanded. Existence is checked where the path is used."""

    what = "a path"

    def ok(self, value):
        return isinstance(value, (str, os.PathLike)) and bool(os.fspath(value).strip())

    def convert(self, value):
        return os.path.expanduser(os.fspath(value))


class Numbers(Check):
    """A list of `length` numbers, each passing `item`; converted to a tuple of floats."""

    def __init__(self, length: int, item: Number | None = None):
        self.length, self.item = length, item or Number()
        self.what = f"a list of {length} numbers" + (f" each {_strip(self.item.what)}" if item else "")

    def ok(self, value):
        if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or len(value) != self.length:
            return False
        return all(self.item.ok(v) for v in value)

    def convert(self, value):
        return tuple(float(v) for v in value)


def _strip(what: str) -> str:
    return what.removeprefix("a number ").removeprefix("a finite number")


class Optional(Check):
    """None, or a value passing `inner`. `none` says what null means ("null for the whole split")."""

    def __init__(self, inner: Check, none: str = "null"):
        self.inner, self.none = inner, none
        self.what = f"{inner.what}, or {none}"

    def __call__(self, value: Any, key: str, hint: str = "") -> Any:
        if value is not None and type(self.inner).__call__ is not Check.__call__:  # a group: parsed by its check
            return self.inner(value, key, hint)
        return super().__call__(value, key, hint)

    def ok(self, value):
        return value is None or self.inner.ok(value)

    def convert(self, value):
        return None if value is None else self.inner.convert(value)


class AnyValue(Check):
    """No check here: the value is checked where it is used (e.g. a registry's options)."""


class ImageSize(Check):
    """A positive integer, or a pair [height, width] of them."""

    what = "a positive integer (or a pair [height, width])"

    def ok(self, value):
        if is_int(value):
            return value >= 1
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) and v >= 1 for v in value)

    def convert(self, value):
        return int(value) if is_int(value) else [int(v) for v in value]


class Name(Check):
    """The name of something registered in `registry` (sslvit.registry.Registry); its wording for unknown names."""

    def __init__(self, registry):
        self.registry = registry

    def __call__(self, value: Any, key: str, hint: str = "") -> Any:
        if not isinstance(value, str) or value not in self.registry:
            raise ConfigError(
                f"{key}={_show(value)} is not a {self.registry.kind}: choose one of {', '.join(self.registry.names())}"
            )
        return value


class Registered(Check):
    """A config group that selects an implementation from `registry` by its `name` key (or a bare name, with the
    implementation's default options); the other keys are that implementation's options (names checked here, values
    where it is built). `ignore`: keys of the group that are not options (besides `name`); `given`: parameters the
    program passes, which a config may not set."""

    def __init__(self, registry, ignore: Iterable[str] = (), given: Iterable[str] = ()):
        self.registry = registry
        self.ignore = ("name", *ignore)
        self.given = tuple(given)

    def __call__(self, value: Any, key: str, hint: str = "") -> Any:
        items = {"name": value} if isinstance(value, str) else _items(value, key)  # a bare name: default options
        name = items.get("name", MISSING_VALUE)
        if name == MISSING_VALUE:
            raise ConfigError(f"{key}.name is not set: choose one of {', '.join(self.registry.names())}")
        Name(self.registry)(name, key if isinstance(value, str) else f"{key}.name")
        self.registry.check_options(name, items, ignore=self.ignore, given=self.given)
        return items


class Sub(Check):
    """A nested config group, parsed by its `Group` class with the dotted key as prefix. `cross=False` leaves out
    the checks across keys (`Group.validate`), for a group that may go unused (the stage calls it when it is used)."""

    def __init__(self, group: type[Group], *, cross: bool = True):
        self.group, self.cross = group, cross

    def __call__(self, value: Any, key: str, hint: str = "") -> Any:
        return self.group.parse(value, key, cross=self.cross)


# ------------------------------------------------------------------------------------------------ groups
def key(check: Check, default: Any = dataclasses.MISSING, *, hint: str = "", unset_ok: bool = False) -> Any:
    """A field of a `Group`: its check, its default (none: the key is required) and a hint for the error line.
    `unset_ok`: Hydra's `???` passes as `MISSING_VALUE` (the group's `validate` decides, e.g. `run` may stay unset
    when `init` is given)."""
    kw = {"metadata": {"check": check, "hint": hint, "unset_ok": unset_ok}}
    if isinstance(default, (list, dict, set)):
        kw["default_factory"] = lambda d=default: type(d)(d)
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return dataclasses.field(**kw)


class Group:
    """Base of a typed config group (a frozen dataclass whose fields are declared with `key`)."""

    PREFIX: ClassVar[str] = ""  # the group's config key, e.g. "data"; "" for top-level keys

    @classmethod
    def parse(cls: type[G], cfg: Any, prefix: str | None = None, *, extra: Iterable[str] = (), cross: bool = True) -> G:
        """Check a mapping (DictConfig, dict) against the fields: unknown keys, missing required keys, each value.
        `extra` names keys that belong to the config but are checked elsewhere (they are skipped here).
        A group instance passes through unchanged."""
        if isinstance(cfg, cls):
            return cfg
        prefix = cls.PREFIX if prefix is None else prefix
        items = _items(cfg, prefix)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        skip = set(extra)
        unknown = sorted(k for k in items if k not in fields and k not in skip)
        if unknown:
            raise ConfigError(
                f"{_dotted(prefix, unknown[0])} is not a key of {prefix or 'this config'}: the keys "
                f"are {', '.join(sorted(set(fields) | skip))}"
            )
        values = {}
        for name, f in fields.items():
            dotted = _dotted(prefix, name)
            if name in items:
                value = items[name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                value = f.default_factory()  # type: ignore[misc]
            else:
                raise _not_set(dotted, f.metadata.get("hint", ""))
            if isinstance(value, str) and value == MISSING_VALUE:
                if f.metadata.get("unset_ok"):
                    values[name] = MISSING_VALUE
                    continue
                raise _not_set(dotted, f.metadata.get("hint", ""))
            check = f.metadata.get("check")
            values[name] = check(value, dotted, f.metadata.get("hint", "")) if check is not None else value
        out = cls(**values)
        object.__setattr__(out, "_prefix", prefix)  # for messages of `validate`: the keys as the user wrote them
        if cross:
            out.validate()
        return out

    def validate(self) -> None:
        """Checks across keys (override; raise ConfigError naming keys with `self.dotted(name)`)."""

    def dotted(self, name: str) -> str:
        """`name` as a config key: with the prefix this group was parsed under (`model.dim`, or `dim` for a ViT)."""
        return _dotted(getattr(self, "_prefix", self.PREFIX), name)

    def replace(self: G, **changes: Any) -> G:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _not_set(dotted: str, hint: str) -> ConfigError:
    return ConfigError(f"{dotted} is not set: pass {dotted}=...{f' ({hint})' if hint else ''}")


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Group):
        return v.to_dict()
    return v


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _items(cfg: Any, prefix: str) -> dict[str, Any]:
    """A config node as a plain dict of its keys (Hydra's `???` kept as the marker string, not raised)."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf  # noqa: PLC0415

        if isinstance(cfg, DictConfig):
            from omegaconf.errors import OmegaConfBaseException  # noqa: PLC0415

            out = {}
            for k in cfg.keys():
                try:
                    out[str(k)] = MISSING_VALUE if OmegaConf.is_missing(cfg, k) else _container(cfg[k])
                except OmegaConfBaseException as e:  # an interpolation that does not resolve: ${oops}, ${oc.env:X}
                    where, raw, err = _unresolved(cfg, prefix) or (_dotted(prefix, str(k)), "?", e)
                    why = " ".join(str(err).split("\n")[0].split())
                    raise ConfigError(
                        f"{where}={raw} cannot be resolved ({why}): give a value, or an interpolation "
                        f"of an existing key"
                    ) from None
            return out
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        pass
    if isinstance(cfg, Mapping):
        return {str(k): v for k, v in cfg.items()}
    if dataclasses.is_dataclass(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys to values, got {type(cfg).__name__}")


def _unresolved(node: Any, path: str) -> tuple[str, str, Exception] | None:
    """(dotted key, its raw text, the error) of the first interpolation under `node` that does not resolve."""
    from omegaconf import DictConfig, ListConfig  # noqa: PLC0415
    from omegaconf.errors import OmegaConfBaseException  # noqa: PLC0415

    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for k in keys:
        where = _dotted(path, str(k)) if isinstance(node, DictConfig) else f"{path}[{k}]"
        try:
            value = node[k]
        except OmegaConfBaseException as e:
            return where, str(node._get_node(k)._value()), e
        if isinstance(value, (DictConfig, ListConfig)):
            found = _unresolved(value, where)
            if found:
                return found
    return None


def _container(v: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf  # noqa: PLC0415

    if isinstance(v, (DictConfig, ListConfig)):
        return OmegaConf.to_container(v, resolve=True)
    return v
