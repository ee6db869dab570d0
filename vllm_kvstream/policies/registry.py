"""Name -> policy class. Duplicate names are rejected; unknown names get the list of known ones."""

from __future__ import annotations

from typing import Any, TypeVar

from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.policies.base import KVPolicy

_REGISTRY: dict[str, type[KVPolicy]] = {}

P = TypeVar("P", bound=type[KVPolicy])


def register_policy(cls: P) -> P:
    """Class decorator: add a policy under ``cls.name``. A second class with the same name is
    an error (re-registering the very same class is a no-op, so re-imports stay safe)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"policy class {cls.__qualname__} must set a non-empty `name`")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"duplicate KV policy name {name!r}: already registered by "
            f"{existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def get_policy_class(name: str) -> type[KVPolicy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KVStreamConfigError(
            f"unknown KV policy {name!r}; allowed: {', '.join(available_policies())}"
        ) from None


def build_policy(name: str, params: dict[str, Any] | None = None) -> KVPolicy:
    """Validate a policy name and its parameters and return the policy."""
    if not isinstance(name, str):
        raise KVStreamConfigError(
            f"KV policy name must be a string, got {name!r}; allowed: {', '.join(available_policies())}"
        )
    return get_policy_class(name).from_dict(params)
