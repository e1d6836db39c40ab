"""One registration mechanism for every pluggable concept: stems, mask samplers, targets, data sources, probe
poolings, fine-tune modes.

A `Registry` maps a config name (`stem.name: hmlp`) to an implementation. New options are one class (or function)
with `@REGISTRY.register("name")` plus one YAML file in the matching `conf/` group. Every registry reports an
unknown name and an unknown option in the same words, naming the config key and what is allowed:

    error: stem.name='mlp' is not a stem: choose one of conv, hmlp, linear
    error: mask.min_patch is not an option of mask 'block': its options are max_patches, min_aspect, min_patches

`build(name, **options)` checks option names against the implementation's keyword parameters before calling it, so
a misspelt option in a YAML file or on the command line fails before anything is computed; the implementation
checks the values (each option's range is declared once, where it is used).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar

from sslvit.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named implementations of one concept.

    `kind` names the concept in messages ("stem"), `key` is the config key that selects one ("stem.name"), and
    `options_key` the prefix of its options in the config ("stem", so an unknown option reads `stem.<option>`)."""

    def __init__(self, kind: str, key: str, options_key: str | None = None):
        self.kind = kind
        self.key = key
        self.options_key = options_key if options_key is not None else key.rsplit(".", 1)[0]
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@STEMS.register("hmlp")` on a class or function. Names are unique."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def add(self, name: str, obj: T) -> T:
        """Register `obj` under `name` without a decorator."""
        return self.register(name)(obj)

    def get(self, name: Any) -> T:
        """The implementation registered as `name`; a ConfigError naming the config key and the choices otherwise."""
        if not isinstance(name, str) or name not in self._entries:
            raise ConfigError(f"{self.key}={name!r} is not a {self.kind}: choose one of {', '.join(self.names())}")
        return self._entries[name]

    def options(self, name: str) -> list[str]:
        """The options `build(name, ...)` accepts: the implementation's keyword parameters."""
        return _keyword_options(self.get(name))

    def check_options(
        self, name: str, options: Mapping[str, Any], *, ignore: Iterable[str] = (), given: Iterable[str] = ()
    ) -> None:
        """ConfigError for the first config option `name` does not take. Config keys in `ignore` are not options
        (e.g. `name` itself); parameters in `given` are passed by the program, so a config may not set them."""
        ignore, given = set(ignore), set(given)
        allowed = [o for o in self.options(name) if o not in given]
        unknown = sorted(k for k in options if k not in allowed and k not in ignore)
        if unknown:
            listed = ", ".join(sorted(set(allowed) | ignore)) or "none"
            raise ConfigError(
                f"{self.options_key}.{unknown[0]} is not an option of {self.kind} {name!r}: its options are {listed}"
            )

    def build(
        self,
        name: str,
        /,
        *args: Any,
        config: Mapping[str, Any] | None = None,
        ignore: Iterable[str] = (),
        **given: Any,
    ) -> Any:
        """Call the implementation `name` with `args`, the program's keyword arguments `given` and the options of
        its config group `config` (their names checked first; keys in `ignore`, such as `name`, dropped)."""
        obj = self.get(name)
        config = dict(config or {})
        self.check_options(name, config, ignore=ignore, given=given)
        options = {k: v for k, v in config.items() if k not in set(ignore)}
        return obj(*args, **given, **options)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, implementation) pairs in the order they were registered."""
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def _keyword_options(obj: Any) -> list[str]:
    """Keyword parameters of a class's __init__ (or a function) that a config may set: keyword-only ones, and
    positional-or-keyword ones with a default."""
    fn = obj.__init__ if inspect.isclass(obj) else obj
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY or (
            p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty
        ):
            out.append(p.name)
    return out
