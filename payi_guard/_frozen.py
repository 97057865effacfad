"""Frozen, slotted dataclasses built on hot paths without their ``__init__``'s cost.

A frozen dataclass's generated ``__init__`` sets each field through
``object.__setattr__`` (its own ``__setattr__`` refuses), a slot-wrapper call that
packs and unpacks an argument tuple: on CPython 3.11 about 1,400 instructions a field,
so about 19,000 for a :class:`~payi_guard.engine.calls.CallRecord`. The constructor
:func:`frozen_maker` returns sets the fields on an instance of a plain twin class with
the same slots, then gives it the dataclass as its class (CPython allows the swap
between classes of the same layout). The result is the object ``cls(*values)`` makes:
the same type, fields, equality, hash, repr and pickling, frozen from then on, its
``__post_init__`` run as the constructor runs it. Each store is one slot write, so a
:class:`~payi_guard.engine.calls.CallRecord` costs about a fifth of what its
constructor does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["frozen_maker"]

T = TypeVar("T")


def frozen_maker(cls: type[T], *, post_init: bool = True) -> Callable[..., T]:
    """A positional constructor of ``cls``, a frozen dataclass with ``slots=True``.

    ``make(*values)`` gives what ``cls(*values)`` gives when every field is passed, in
    the order the dataclass declares them (defaults are not filled in).

    Args:
        cls: the dataclass.
        post_init: run ``cls.__post_init__`` (its checks) on each object made. Only a
            caller that has made those checks itself passes ``False``.

    Raises:
        TypeError: ``cls`` is not a frozen, slotted dataclass (directly under
            ``object``) whose fields are all set by ``__init__``; when called, a number
            of values other than its fields'.
    """
    params = getattr(cls, "__dataclass_params__", None)
    fields = dataclasses.fields(cls) if params is not None else ()  # type: ignore[arg-type]
    names = tuple(field.name for field in fields)
    if (
        params is None
        or not params.frozen
        or "__slots__" not in cls.__dict__
        or tuple(cls.__dict__["__slots__"]) != names
        or not all(field.init for field in fields)
        or cls.__bases__ != (object,)
    ):
        raise TypeError(f"{cls.__name__} is not a frozen, slotted dataclass of init fields")
    twin: type[Any] = type(f"_{cls.__name__}Fields", (), {"__slots__": names})
    # Written out as dataclasses writes __init__: one statement a field (a slot store).
    arguments = ", ".join(f"v{index}" for index in range(len(names)))
    lines = [f"def make({arguments}):", "    obj = new(twin)"]
    lines += [f"    obj.{name} = v{index}" for index, name in enumerate(names)]
    lines.append("    obj.__class__ = cls")
    if post_init and hasattr(cls, "__post_init__"):
        lines.append("    obj.__post_init__()")
    lines.append("    return obj")
    scope: dict[str, Any] = {"new": object.__new__, "twin": twin, "cls": cls}
    exec("\n".join(lines), scope)  # noqa: S102 - dataclass field names only
    make: Callable[..., T] = scope["make"]
    make.__doc__ = f"``{cls.__name__}(*values)``, every field given (see frozen_maker)."
    return make
