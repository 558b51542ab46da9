"""Options every command shares: --spool, --group, -v/--verbose, -q/--quiet, and logging setup."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from mercli.names import printable

F = TypeVar("F", bound=Callable[..., Any])


class EscapingFormatter(logging.Formatter):
    """Log lines with every control character of the message escaped (SPEC §9).

    Messages carry values from the network (AE titles, UIDs, descriptions): a newline in one
    would forge a log line, an ANSI escape would act on the admin's terminal. Modules escape
    what they log themselves (`mercli.names.printable`); this is the second line of defence,
    for every message of every module. Tracebacks (`-v`) are ours and stay as they are.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message, limit=0)
        return super().formatMessage(record)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("mercli")
    root.setLevel(level)
    if not any(getattr(h, "_mercli", False) for h in root.handlers):
        handler = logging.StreamHandler()  # stderr: stdout is for results
        handler.setFormatter(EscapingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        handler._mercli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False


def common_options(func: F) -> F:
    """Adds --spool, --group, -v and -q; the wrapped command receives `spool: Path`."""

    @click.option(
        "--spool",
        type=click.Path(path_type=Path),
        envvar="MERCLI_SPOOL",
        default=Path("spool"),
        show_default="$MERCLI_SPOOL, else ./spool",
        help="Spool directory; created with its layout if missing.",
    )
    @click.option(
        "--group",
        envvar="MERCLI_GROUP",
        metavar="NAME",
        callback=_check_group,
        help="Give the spool to this group (setgid): what is created in it is group-readable.",
    )
    @click.option("-v", "--verbose", count=True, help="More log detail (tracebacks included).")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
    @functools.wraps(func)
    def wrapper(*args: Any, verbose: int, quiet: bool, group: int | None, **kwargs: Any) -> Any:
        _setup_logging(verbose, quiet)
        if group is not None:
            from mercli.spool import Spool

            Spool.open(kwargs["spool"], group=group)
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _check_group(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Click callback: a group name or number, as a gid (None stays None)."""
    import grp

    if value is None:
        return None
    try:
        return int(value) if value.isdigit() else grp.getgrnam(value).gr_gid
    except KeyError:
        raise click.BadParameter(f"no such group {value!r}", ctx=ctx, param=param) from None


def duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Click callback: `90s`, `15m`, `2h`, `3d` or plain seconds, as seconds (None stays None)."""
    from mercli.durations import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


def check_extra_tags(
    ctx: click.Context, param: click.Parameter, value: Sequence[str]
) -> tuple[str, ...]:
    """Click callback: every --extra-tag must name a tag (keyword, (gggg,eeee) or gggggeeee)."""
    from mercli.tags import InvalidTag, parse_tag  # pydicom: only for commands that need it

    for spec in value:
        try:
            parse_tag(spec)
        except InvalidTag as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
    return tuple(value)


def read_ids(ids: Sequence[str], states: Sequence[str]) -> frozenset[str] | None:
    """Item names from the arguments, `-` meaning one per line on stdin; None if none given.

    Each is `ID` or `<state>/ID` for one of `states` (as purge, resend and cancel print them);
    anything else is a UsageError."""
    from mercli.resend import parse_id  # pydicom: only for the commands that take ids

    if not ids:
        return None
    texts: list[str] = []
    for text in ids:
        if text == "-":
            texts += [line for line in sys.stdin.read().splitlines() if line.strip()]
        else:
            texts.append(text)
    names = set()
    for text in texts:
        prefix = text.strip().rpartition("/")[0]
        names.add(parse_id(text, prefix if prefix in states else states[0]))
    return frozenset(names)
