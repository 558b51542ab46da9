"""One module per subcommand; COMMANDS lists those that really work."""

from __future__ import annotations

import click

from mercli.commands.cmd_status import status

COMMANDS: list[click.Command] = [status]
