"""One module per subcommand, loaded only when that command runs.

`mercli dispatch --once` from cron should not pay for importing what `receive`, `status` or
`tags` need (rich, pydicom's whole reader): each command's module is imported on first use.
"""

from __future__ import annotations

import importlib

import click

# command name -> module in mercli.commands (the click command object has the same name,
# with "_" for "-")
COMMAND_MODULES: dict[str, str] = {
    "cancel": "cmd_cancel",
    "dispatch": "cmd_dispatch",
    "ingest": "cmd_ingest",
    "import-mercure": "cmd_import_mercure",
    "log": "cmd_log",
    "metrics": "cmd_metrics",
    "notify": "cmd_notify",
    "process": "cmd_process",
    "purge": "cmd_purge",
    "receive": "cmd_receive",
    "resend": "cmd_resend",
    "route": "cmd_route",
    "rules": "cmd_rules",
    "run": "cmd_run",
    "status": "cmd_status",
    "tags": "cmd_tags",
    "watch": "cmd_watch",
}


def load(name: str) -> click.Command:
    """The click command called `name` (KeyError for an unknown name)."""
    module = importlib.import_module(f"mercli.commands.{COMMAND_MODULES[name]}")
    command = getattr(module, name.replace("-", "_"))
    assert isinstance(command, click.Command)
    return command


def all_commands() -> list[click.Command]:
    """Every command, loaded (for help listings and tests)."""
    return [load(name) for name in sorted(COMMAND_MODULES)]
