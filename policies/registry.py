"""Finding policies by name: the built-ins plus plug-ins from the ``adaptive_pin.policies`` entry points.

A plug-in package declares, in its pyproject.toml::

    [project.entry-points."adaptive_pin.policies"]
    my-policy = "my_package.module:MyPolicy"

where ``MyPolicy(**options)`` returns an object satisfying :class:`policies.base.Policy`. Options
are the factory's keyword parameters; values given as strings (command line, config file) are
converted to the type of the parameter's default. A plug-in that fails to load is logged as a
warning naming it and left out; it never stops the others.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from adaptive_pin.errors import UsageError
from policies.base import Policy

log = logging.getLogger("adaptive_pin.policies")

ENTRY_POINT_GROUP = "adaptive_pin.policies"
DEFAULT_POLICY = "cache-aware"

BUILTINS: Mapping[str, str] = {
    "cache-aware": "policies.cache_aware:CacheAwarePolicy",
    "numa": "policies.numa:NumaPolicy",
    "pack": "policies.pack:PackPolicy",
    "uncore": "policies.uncore:UncorePolicy",
    "spread": "policies.spread:SpreadPolicy",
    "none": "policies.none:NonePolicy",
}

Factory = Callable[..., Policy]


def _load_builtin(spec: str) -> Factory:
    module, _, attr = spec.partition(":")
    factory: Factory = getattr(importlib.import_module(module), attr)
    return factory


def _plugins() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        if ep.name in BUILTINS:
            log.warning("plug-in policy %r (%s) ignored: a built-in policy has that name", ep.name, ep.value)
        elif ep.name in found:
            log.warning(
                "plug-in policy %r (%s) ignored: %s already has that name",
                ep.name,
                ep.value,
                found[ep.name].value,
            )
        else:
            found[ep.name] = ep
    return found


def _factories() -> dict[str, Factory]:
    """Every policy factory that loads, by name; broken plug-ins are logged and skipped."""
    out = {name: _load_builtin(spec) for name, spec in BUILTINS.items()}
    for name, ep in _plugins().items():
        try:
            factory = ep.load()
        except Exception as exc:  # anything a third-party import can raise
            log.warning(
                "plug-in policy %r (%s) failed to load: %s: %s", name, ep.value, type(exc).__name__, exc
            )
            continue
        if not callable(factory):
            log.warning("plug-in policy %r (%s) is not callable", name, ep.value)
            continue
        out[name] = factory
    return out


def _description(name: str, factory: Factory) -> str | None:
    desc = getattr(factory, "description", None)
    if isinstance(desc, str):
        return desc.strip().splitlines()[0] if desc.strip() else name
    try:
        desc = getattr(factory(), "description", None)
    except Exception as exc:
        log.warning(
            "plug-in policy %r cannot be built with default options: %s: %s", name, type(exc).__name__, exc
        )
        return None
    return desc.strip().splitlines()[0] if isinstance(desc, str) and desc.strip() else name


def available_policies() -> dict[str, str]:
    """Policy name -> one-line description: the built-ins, then plug-ins, each sorted by name."""
    out: dict[str, str] = {}
    for name, factory in _factories().items():
        desc = _description(name, factory)
        if desc is not None:
            out[name] = desc
    return out


def option_names(factory: Factory) -> dict[str, inspect.Parameter]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {n: p for n, p in params.items() if p.kind in kinds}


def _coerce(policy: str, param: inspect.Parameter, value: Any) -> Any:
    """A string option converted to the type of the parameter's default (bool, int, float); a
    typed one (a config file's) checked against it: ``max_moves = 32.5`` or ``= true`` is
    refused here, not by the first decision of a running daemon."""
    default = param.default
    if default is inspect.Parameter.empty or isinstance(default, str):
        return value
    if not isinstance(value, str):
        if isinstance(default, bool | int | float):
            _check_type(policy, param.name, default, value)
        return value
    text = value.strip()
    try:
        if isinstance(default, bool):
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError as exc:
        raise UsageError(f"policy {policy}: option {param.name}={value!r}: {exc}") from None
    return value


def _check_type(policy: str, name: str, default: bool | int | float, value: Any) -> None:
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok, want = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    if not ok:
        shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML spells it
        raise UsageError(f"policy {policy}: option {name}={shown}: expected {want}")


def get_policy(name: str, **options: Any) -> Policy:
    """Build the policy called ``name`` with ``options``; UsageError naming the choices if wrong."""
    factories = _factories()
    factory = factories.get(name)
    if factory is None:
        raise UsageError(f"unknown policy {name!r}: choose one of {', '.join(factories)}")
    params = option_names(factory)
    has_var_kw = _accepts_any_keyword(factory)
    unknown = sorted(k for k in options if k not in params)
    if unknown and not has_var_kw:
        valid = ", ".join(sorted(params)) or "(none)"
        raise UsageError(f"policy {name}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    kwargs = {k: _coerce(name, params[k], v) if k in params else v for k, v in options.items()}
    try:
        policy = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        valid = ", ".join(sorted(params)) or "(none)"
        raise UsageError(f"policy {name}: bad option: {exc} (valid options: {valid})") from None
    except Exception as exc:  # a plug-in's constructor may raise anything
        raise UsageError(f"policy {name} could not be built: {type(exc).__name__}: {exc}") from None
    if not isinstance(policy, Policy):
        raise UsageError(
            f"policy {name}: {factory!r} did not build a Policy (name, description, initial_state, decide)"
        )
    return policy


def _accepts_any_keyword(factory: Factory) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
