"""SIGTERM that arrives while a launch checks its command line waits for the verdict.

Under torchrun every worker checks the same config; when the first one refuses it (exit status 2),
torchrun sends SIGTERM to the others at once, and a worker still importing torch or checking the
config would end with -15 instead of refusing in turn. An entry point calls ``defer()`` before its
first heavy import; the trainer calls ``release()`` once the config is accepted (validated and
checked against the disk, before any process group exists), which restores the default action
and delivers a SIGTERM that came meanwhile (the process then ends at once, as before any step).
A refused config exits 2 without releasing, and the entry point calls ``ignore()`` before it
exits. When the ranks refuse together later, after the process group exists (directories not
shared between nodes), the trainer defers again before it raises. Without ``defer()``,
``release()`` does nothing.

Importing this module imports nothing but the standard library.
"""
from __future__ import annotations

import signal

_held: list[int] = []
_previous = None


def defer() -> None:
    """Hold SIGTERM back until ``release()`` (main thread only)."""
    global _previous
    _previous = signal.signal(signal.SIGTERM, lambda signum, frame: _held.append(signum))


def release() -> None:
    """Restore SIGTERM's previous action and deliver it if it came while deferred."""
    global _previous
    if _previous is None:
        return
    signal.signal(signal.SIGTERM, _previous)
    _previous = None
    if _held:
        signal.raise_signal(signal.SIGTERM)


def ignore() -> None:
    """Ignore SIGTERM from now on, one held back included: for a process that is exiting with a
    refusal. (A Python handler would not do: interpreter shutdown resets it to the default action,
    and torchrun's SIGTERM during the shutdown would still end the process with -15.)"""
    global _previous
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _previous = None
