"""Builds the frozen model-config dataclasses from plain dicts or ConfigDicts, strictly."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """cls(**values), failing with one line that names an unknown key and where it was found."""
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ValueError(
                f"unknown key {where}.{key}; valid keys are: {', '.join(sorted(names))}")
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
