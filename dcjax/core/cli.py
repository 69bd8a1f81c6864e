"""Command lines that answer bad input in one line: ``error: ...`` and a hint, no traceback.

``run(main)`` replaces ``absl.app.run(main)`` for dcjax's entry points. Log lines below
WARNING (JAX's backend probing, orbax, absl) are off unless ``--verbosity`` is given
(``--verbosity=0``: INFO lines). A ``UserError`` (a bad
config field, data file or workdir) and a config file or ``--config.<field>`` override that
cannot be applied end the process with exit status 2 and two lines on stderr; ``--verbosity=1``
(or more) lets the exception and its traceback through instead. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

from dcjax.core.errors import UserError

__all__ = ["EXIT_USER_ERROR", "config_value", "one_line", "run"]

EXIT_USER_ERROR = 2
_HINT = "--verbosity=1 shows the traceback"


def one_line(error: BaseException) -> str:
    """The error's message with its whitespace (newlines included) collapsed."""
    return " ".join(str(error).split()) or type(error).__name__


def _fail(message: str, hint: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    print(f"hint: {hint}", file=sys.stderr)
    if "jax" in sys.modules:  # a multi-process run may have been joined
        from dcjax.core import distributed

        distributed.exit_process(EXIT_USER_ERROR)
    sys.exit(EXIT_USER_ERROR)


def _verbose(argv: Sequence[str]) -> bool:
    """Whether ``--verbosity`` (``-v``) >= 1 was given (read before the flags are parsed)."""
    for i, arg in enumerate(argv):
        match = re.fullmatch(r"--?(?:verbosity|v)(?:=(-?\d+))?", arg)
        if match:
            value = match.group(1) or (argv[i + 1] if i + 1 < len(argv) else "0")
            return value.lstrip("-").isdigit() and int(value) >= 1
    return False


def _override_at_fault(argv: Sequence[str], error: Exception) -> str | None:
    """The ``--config.<field>=...`` argument an override error is about, if one can be told."""
    overrides = [a for a in argv if a.startswith("--config.")]
    keys = re.findall(r"'([A-Za-z_][\w.]*)'", str(error))
    for arg in overrides:
        path = arg[len("--config.") :].split("=", 1)[0]
        if any(key in path.split(".") for key in keys):
            return arg
    return overrides[0] if len(overrides) == 1 else None


def _last_error_line(text: str) -> str:
    """The ``SomeError: message`` line closing a traceback quoted in ``text``, else ``text``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"[\w.]*(Error|Exception): ", line):
            line = re.sub(r"^[\w.]*\.(\w+: )", r"\1", line)  # drop the module path
            return re.sub(r"^(ConfigError|UserError|DataError): ", "", line)
    return " ".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with every flag error answered in one line: unknown or malformed flags,
    a config file whose ``get_config`` raises, an override naming no field."""
    try:
        remaining = flags.FLAGS(argv)
        if not flags.FLAGS["verbosity"].present:  # library INFO lines only when asked for
            absl_logging.set_verbosity(absl_logging.WARNING)
        return remaining
    except flags.Error as error:
        if _verbose(argv):
            raise
        _fail(_last_error_line(str(error)), "--helpshort lists the flags; " + _HINT)
    except Exception as error:  # an override that cannot be applied
        if _verbose(argv):
            raise
        arg = _override_at_fault(argv, error)
        if arg is not None and isinstance(error, AttributeError | KeyError):
            field = arg[len("--config.") :].split("=", 1)[0]
            _fail(f"{arg}: the config has no field {field}", "check its spelling")
        where = f"{arg}: " if arg else ""
        _fail(f"{where}{type(error).__name__}: {one_line(error)}", _HINT)
    return []  # unreachable: _fail exits


def config_value(holder: flags.FlagHolder):
    """The ``--config`` flag's ConfigDict; a config file that failed to load raises a
    ``UserError`` naming it (ml_collections defers that error to the first access)."""
    try:
        value = holder.value
        value.keys()  # a file that failed to load gives a stand-in that raises on any access
        return value
    except OSError as error:
        reason = [line.strip() for line in str(error).splitlines() if "Errno" in line]
        raise UserError(f"--config: {reason[-1] if reason else one_line(error)}") from None


def _answering(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    def wrapped(argv: list[str]) -> None:
        try:
            main(argv)
        except UserError as error:
            if absl_logging.get_verbosity() >= 1:
                raise
            _fail(one_line(error), _HINT)

    return wrapped


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)`` with bad input answered in one line (see the module docstring)."""
    app.run(_answering(main), flags_parser=_parse_flags)
