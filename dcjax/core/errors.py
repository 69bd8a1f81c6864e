"""The one error type for bad input, so that command lines can answer it in one line.

Everything a user gives (a config field, a data file, a workdir) is checked before a run writes
or compiles anything; what is wrong raises a ``UserError`` (``ConfigError`` for config fields,
``dcjax.data.dataset.DataError`` for data) whose message names the field or file, its value and
what is allowed. Other exceptions are bugs and keep their tracebacks.
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserError"]


class UserError(ValueError):
    """Bad input from the user; the message names the field, file or directory at fault."""


class ConfigError(UserError):
    """A config field holds a value that is not allowed; the message names the field."""
