"""One-line user errors: `InputError(file, line, field, message)` says what was wrong and where.

CLIs catch it, print `format_error(err)` (never a traceback) and exit with code 2.
"""

from __future__ import annotations

from pydantic import ValidationError

EXIT_INPUT_ERROR = 2
EXIT_SERVER_FAILED = 1  # the server failed or could not be reached: not the user's input
# The pydantic error type of schema's cross-field plausibility checks (plausibility.implausible); kept
# here as a string so errors imports nothing of the schema.
IMPLAUSIBLE = "implausible"


class InputError(Exception):
    """Bad user input at `file:line`, in `field` (dotted path; "" when no single field is at fault)."""

    def __init__(self, file: str, line: int | None, field: str, message: str) -> None:
        self.file = str(file)
        self.line = line
        self.field = field
        self.message = message
        super().__init__(self.__str__())

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def __str__(self) -> str:
        field = f" {self.field}:" if self.field else ""
        return f"{self.where}:{field} {self.message}"


def loc_to_field(loc: tuple[int | str, ...]) -> str:
    """Pydantic error location as a dotted field path: ('config', 'gpu_name') -> 'config.gpu_name'."""
    return ".".join(str(part) for part in loc)


def from_validation_error(file: str, line: int | None, exc: ValidationError, prefix: str = "") -> InputError:
    """The first pydantic error as an InputError; counts the others so none are hidden silently."""
    errors = exc.errors()
    first = errors[0]
    field = loc_to_field(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value"))
    ctx = first.get("ctx") or {}
    if first.get("type") == IMPLAUSIBLE:  # a cross-field check names its field below the model it ran on
        field = f"{field}.{ctx['field']}" if field else str(ctx["field"])
        message = f"implausible: {ctx['reason']}"
    if prefix:
        field = f"{prefix}.{field}" if field else prefix
    if first.get("type") == "missing":
        message = "required field is missing"
    elif "input" in first and first.get("type") not in ("extra_forbidden", IMPLAUSIBLE):
        shown = repr(first["input"])
        message = f"{message} (got {shown[:60]}{'...' if len(shown) > 60 else ''})"
    if len(errors) > 1:
        message += f" (+{len(errors) - 1} more error{'s' if len(errors) > 2 else ''} on this line)"
    return InputError(file, line, field, message)


def format_error(err: InputError) -> str:
    """The line a CLI prints for `err`."""
    return f"error: {err}"


def write_output(path: str, option: str, text: str) -> None:
    """Write a CLI output file (creating its folder); an OSError becomes a one-line InputError."""
    from pathlib import Path

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(path, None, option, f"cannot write: {exc.strerror or exc}") from None
