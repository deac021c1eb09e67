"""One explicit registry type, used for strategies, models, data sets and partitioners.

Registries never discover plugins by import side effects: each one is filled by
explicit ``register`` calls in one module, and ``get`` fails with the list of
valid names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedmem.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping whose lookups fail with the valid choices.

    Parameters
    ----------
    kind:
        What the registry holds, used in error messages ("strategy", "dataset").
    key:
        The config key that selects an entry ("strategy.name"), used in error messages.
    """

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name``; a second entry with the same name is an error."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its target under ``name``."""

        def wrap(item: T) -> T:
            return self.register(name, item)

        return wrap

    def get(self, name: str) -> T:
        """Return the entry called ``name`` or raise :class:`ConfigError` listing the valid names."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"{self.key} = {name!r} is not a known {self.kind}; "
                f"valid choices: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs sorted by name."""
        return sorted(self._items.items())
