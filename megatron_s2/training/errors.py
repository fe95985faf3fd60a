"""The two ways a launch ends early on purpose, each shown to the user as one line.

- ``ConfigError``: a refused config, before any work: the key the user sets, its value, what is
  wrong and how to fix it. ``scripts/pretrain.py`` prints ``error: <key>=<value>: <reason>`` from
  rank 0 and exits with status 2 (``megatron_s2.training.cli``).
- ``RunInterrupted``: Ctrl-C, with where the run stopped; the CLI prints it and exits with 130.

Both subclass what callers already catch (ValueError, KeyboardInterrupt).
"""
from __future__ import annotations

from enum import Enum


def show_value(value) -> str:
    """A value as it is written on the command line: true/false, null, [a,b], enums by value."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show_value(v) for v in value) + "]"
    return str(value)


class ConfigError(ValueError):
    """A config the launcher refuses; str() is ``<key>=<value>: <reason>``."""

    def __init__(self, key: str, value, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={show_value(value)}: {reason}")


def require(ok: bool, key: str, value, reason: str) -> None:
    """Raise ConfigError(key, value, reason) unless ``ok``."""
    if not ok:
        raise ConfigError(key, value, reason)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; str() says where it stopped and how to resume."""
