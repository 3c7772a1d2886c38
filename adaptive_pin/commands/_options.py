"""KEY=VALUE arguments (a policy's options on the command line), one parser for every command."""

from __future__ import annotations

from adaptive_pin.errors import UsageError


def split_option(item: str, flag: str, form: str = "KEY=VALUE", example: str = "") -> tuple[str, str]:
    """``item`` as (key, value), both stripped; UsageError naming ``flag`` when it is no KEY=VALUE."""
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        raise UsageError(f"{flag} {item!r}: expected {form}{f', e.g. {example}' if example else ''}")
    return key.strip(), value.strip()
