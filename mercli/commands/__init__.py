"""One module per subcommand; COMMANDS lists those that really work."""

from __future__ import annotations

import click

from mercli.commands.cmd_dispatch import dispatch
from mercli.commands.cmd_purge import purge
from mercli.commands.cmd_receive import receive
from mercli.commands.cmd_resend import resend
from mercli.commands.cmd_route import route
from mercli.commands.cmd_rules import rules
from mercli.commands.cmd_run import run
from mercli.commands.cmd_status import status
from mercli.commands.cmd_tags import tags

COMMANDS: list[click.Command] = [dispatch, purge, receive, resend, route, rules, run, status, tags]
