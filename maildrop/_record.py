"""``record``: the frozen-dataclass subset maildrop uses, without importing ``dataclasses``.

``import dataclasses`` pulls in ``inspect`` and costs more CPU than the rest of a
``maildrop deliver`` run (see benchmarks/README.md), so the classes on the delivery path are
declared with ``@record`` instead. Type checkers read it as ``dataclasses.dataclass``; at run
time it builds the same behaviour by hand: keyword or positional ``__init__`` with defaults,
``__post_init__``, ``__repr__``, ``__eq__``, ``__hash__``, ``__match_args__``, ``__slots__``
and frozen fields; this module's ``replace()`` does what ``dataclasses.replace()`` does.
``dataclasses.fields()``, ``replace()`` and ``is_dataclass()`` still work on a record: its
``__dataclass_fields__`` is built from a real dataclass on first use.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dataclasses import dataclass as record
    from dataclasses import replace
else:

    def record(cls=None, /, *, frozen=True, slots=True):
        """Turn *cls* into a frozen record of its annotated fields (see the module doc)."""
        if not (frozen and slots):
            raise TypeError("record() only makes frozen, slotted classes")
        if cls is None:
            return _build
        return _build(cls)

    def replace(obj, /, **changes):
        """Return a copy of the record *obj* with the named fields changed."""
        cls = type(obj)
        return cls(
            **{name: changes.pop(name, getattr(obj, name)) for name in _names(cls)}, **changes
        )


__all__ = ["FrozenRecordError", "record", "replace"]

_MISSING = object()


class FrozenRecordError(AttributeError):
    """A field of a frozen record was assigned or deleted."""


class _LazyFields:
    """``__dataclass_fields__``, computed from an equivalent real dataclass on first use."""

    def __get__(self, obj: object, owner: type) -> dict[str, object]:
        cached = owner.__dict__.get("_dataclass_fields")
        if cached is None:
            import dataclasses

            spec = [
                (name, object, dataclasses.field(default=default))
                if default is not _MISSING
                else (name, object)
                for name, default in zip(_names(owner), owner.__dict__["_defaults"], strict=True)
            ]
            twin = dataclasses.make_dataclass(owner.__name__, spec, frozen=True)
            cached = {f.name: f for f in dataclasses.fields(twin)}
            type.__setattr__(owner, "_dataclass_fields", cached)
        return cached


def _build(cls: type) -> type:
    names = tuple(
        name
        # The class's own annotations only (inspect.get_annotations would import inspect).
        for name, kind in cls.__dict__.get("__annotations__", {}).items()  # noqa: RUF063
        if not str(kind).startswith(("ClassVar", "typing.ClassVar"))
    )
    ns = {k: v for k, v in cls.__dict__.items() if k not in names and k != "__dict__"}
    ns.pop("__weakref__", None)
    ns["__slots__"] = names
    ns["__match_args__"] = names
    ns["_defaults"] = tuple(cls.__dict__.get(name, _MISSING) for name in names)
    ns["__dataclass_fields__"] = _LazyFields()
    for attr, fn in _METHODS.items():
        ns.setdefault(attr, fn)
    new = type(cls)(cls.__name__, cls.__bases__, ns)
    new.__qualname__ = cls.__qualname__
    return new


def _names(cls: type) -> tuple[str, ...]:
    names: tuple[str, ...] = cls.__dict__["__match_args__"]
    return names


def _init(self: object, *args: object, **kwargs: object) -> None:
    cls = type(self)
    names = _names(cls)
    if len(args) > len(names):
        raise TypeError(f"{cls.__name__}() takes {len(names)} arguments, got {len(args)}")
    unknown = set(kwargs).difference(names)
    if unknown:
        raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {min(unknown)!r}")
    defaults = cls.__dict__["_defaults"]
    for i, name in enumerate(names):
        if i < len(args):
            if name in kwargs:
                raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
            value = args[i]
        else:
            value = kwargs.get(name, defaults[i])
            if value is _MISSING:
                raise TypeError(f"{cls.__name__}() missing required argument: {name!r}")
        object.__setattr__(self, name, value)
    post = getattr(self, "__post_init__", None)
    if post is not None:
        post()


def _values(self: object) -> tuple[object, ...]:
    return tuple(getattr(self, name) for name in _names(type(self)))


def _repr(self: object) -> str:
    fields = ", ".join(
        f"{name}={value!r}" for name, value in zip(_names(type(self)), _values(self), strict=True)
    )
    return f"{type(self).__qualname__}({fields})"


def _eq(self: object, other: object) -> object:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: object) -> int:
    return hash(_values(self))


def _setattr(self: object, name: str, value: object) -> None:
    raise FrozenRecordError(f"cannot assign to field {name!r}")


def _delattr(self: object, name: str) -> None:
    raise FrozenRecordError(f"cannot delete field {name!r}")


def _getstate(self: object) -> tuple[object, ...]:
    return _values(self)


def _setstate(self: object, state: tuple[object, ...]) -> None:
    for name, value in zip(_names(type(self)), state, strict=True):
        object.__setattr__(self, name, value)


_METHODS = {
    "__init__": _init,
    "__repr__": _repr,
    "__eq__": _eq,
    "__hash__": _hash,
    "__setattr__": _setattr,
    "__delattr__": _delattr,
    "__getstate__": _getstate,
    "__setstate__": _setstate,
}
