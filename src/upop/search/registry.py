"""What the search's registries (scores, rankings, allocations) share: :class:`Registry` (the
``register_*`` decorator and the ``get_*`` lookup by name, with a one-line :class:`ConfigError`)
and :class:`Names`, a live, read-only view of a registry's names that the settings, the config and
the CLI parser show as choices.

Torch-free: the CLI's parser reads these names before any model is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Generic, TypeVar, overload

from upop.errors import ConfigError, show

T = TypeVar("T")


class Names(Sequence[str]):
    """The names of a registry in registration order, read at each use (not copied at import).

    ``table`` returns the registry's current mapping, so a name registered later (by a user's module
    or a test's monkeypatch, of an entry or of the whole mapping) is a valid choice everywhere this
    view is: ``UPopConfig``'s validation, the CLI's ``choices``, the search's checks.
    """

    def __init__(self, table: Callable[[], Mapping[str, object]]):
        self._table = table

    def _names(self) -> tuple[str, ...]:
        return tuple(self._table())

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._table())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, value: object) -> bool:
        """True for a registered name; any other value (an unhashable one included) is False."""
        return isinstance(value, str) and value in self._table()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Names, tuple, list)):
            return self._names() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable contents

    def __repr__(self) -> str:
        return repr(self._names())


class Registry(Generic[T]):
    """A registry of small classes by name (the search's scores, rankings and allocations): a
    :meth:`register` decorator, :meth:`get` (a new instance of the class of a name, or a one-line
    :class:`ConfigError` naming the value and the registered names) and :attr:`names`, the live
    view of the names.

    ``table`` returns the mapping the registry reads and fills at each use (the module's
    ``*_REGISTRY`` dict), so a mapping replaced later (a test's monkeypatch) is what every use sees.
    ``base`` is the class every entry subclasses; ``what`` names the setting in messages.
    """

    def __init__(self, base: type[T], what: str, table: Callable[[], dict[str, type[T]]]):
        self.base, self.what, self._table = base, what, table
        self.names = Names(table)

    def register(self, cls: type[T]) -> type[T]:
        """Register the subclass ``cls`` of ``base`` under ``cls.name`` (a decorator: returns ``cls``).
        A name taken by another class is a :class:`ConfigError` (registering the same class again is a
        no-op), a class without a non-empty str ``name`` too; a non-subclass is a TypeError."""
        base, what, table = self.base, self.what, self._table()
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"a {what} must be a subclass of {base.__name__}, got {show(cls)}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{what} class {cls.__name__} needs a non-empty str attribute 'name', got {show(name)}")
        if table.get(name, cls) is not cls:
            raise ConfigError(f"{what} {name!r} is already registered (by {table[name].__name__}); pick another name")
        table[name] = cls
        return cls

    def cls(self, name: object) -> type[T]:
        """The class registered as ``name``; an unknown name (or a value that is no name) is a one-line
        :class:`ConfigError` naming it and the registered names."""
        table = self._table()
        if isinstance(name, str) and name in table:
            return table[name]
        raise ConfigError(f"{self.what} must be one of {', '.join(table)}, got {show(name)}")

    def get(self, name: object) -> T:
        """A new instance of the class registered as ``name`` (see :meth:`cls` for an unknown one)."""
        return self.cls(name)()
