"""Values from the network are data (SPEC §9): control characters, ANSI escapes and rich
markup in AE titles, UIDs and reasons never forge a log line, act on a terminal, or crash
`mercli status`."""

from __future__ import annotations

import json
import logging
import re
import socket
from pathlib import Path

from click.testing import CliRunner

from mercli.cli import cli
from mercli.commands.options import EscapingFormatter
from mercli.names import printable
from mercli.spool import Spool, Worker
from tests.kit import CT, EXPLICIT
from tests.netkit import Receiver
from tests.reliability.rawpdu import associate_rq, read_pdu

HOSTILE = "A\n2026 FORGED\x1b[2J\x9b[/x]"  # newline, ESC, CSI, rich markup
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline


def test_printable_escapes_controls_and_cuts_long_values() -> None:
    assert printable(HOSTILE) == "A\\x0a2026 FORGED\\x1b[2J\\x9b[/x]"
    assert printable("x" * 100, 10) == "x" * 10 + "..."
    assert printable("1.2.840.10008", 0) == "1.2.840.10008"
    assert printable("Müller\u202eevil\u2028x") == "Müller\\u202eevil\\u2028x"  # bidi, line sep


def test_the_log_formatter_escapes_every_message_but_not_tracebacks() -> None:
    formatter = EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "from %s", (HOSTILE,), None)
    assert formatter.format(record) == "INFO from A\\x0a2026 FORGED\\x1b[2J\\x9b[/x]"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("t", logging.ERROR, __file__, 1, "x\ny", (), sys.exc_info())
    lines = formatter.format(failed).splitlines()
    assert lines[0] == "ERROR x\\x0ay" and lines[-1] == "ValueError: boom"


def test_a_hostile_calling_ae_title_forges_no_log_line(tmp_path: Path) -> None:
    running = Receiver(tmp_path / "spool", "--processes", "1", "--allow-aet", "CT1").start()
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=15) as sock:
            sock.sendall(associate_rq("A\n2026 X\x1b[2J", "MERCLI", CT, EXPLICIT))
            answer = read_pdu(sock)
            assert answer is not None and answer[0] in (0x03, 0x07)  # rejected or aborted
    finally:
        assert running.stop() == 0, running.output()
    log = running.output()
    assert "2026 X" in log, log  # the value was logged, escaped
    assert not RAW_CONTROL.search(log), "a raw control character reached the log"
    assert not any(line.startswith("2026 X") for line in log.splitlines()), "forged log line"


def test_status_prints_hostile_reasons_and_targets_as_text(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool")
    with Worker(spool, "test") as worker:
        loose = worker.tmp_path(".dcm")
        loose.write_bytes(b"not dicom")
        worker.quarantine_files({"instance.dcm": loose}, f"bad UID {HOSTILE}", "receive")
    runner = CliRunner()
    result = runner.invoke(cli, ["status", "--spool", str(spool.root)])
    assert result.exit_code == 0, result.output
    assert "bad UID A\\x0a2026 FORGED\\x1b[2J\\x9b[/x]" in result.output
    assert "\x1b" not in result.output and "\x9b" not in result.output
    document = json.loads(
        runner.invoke(cli, ["status", "--spool", str(spool.root), "--json"]).output
    )
    assert document["recent_errors"][0]["reason"] == f"bad UID {HOSTILE}"  # JSON keeps the value
