"""Hostile input: a hypothesis corpus of malformed data sets (tests/reliability/hostile.py)
given to `mercli.tags.read_tags`, to `build/getdcmtags` (print mode and `--publish`), and sent
over the network to `mercli receive`. Nothing may crash, hang, or write outside the spool;
every input gets a clear answer; the receiver keeps serving. read_tags and getdcmtags agree on
every file: readable or not, the same JSON, and `--publish` publishes exactly the files whose
sidecar has the three instance UIDs. (The classes of damage they once disagreed on each have a
hand-made case in tests/test_tags_damaged.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from pynetdicom import AE

from mercli.names import safe_name
from mercli.spool import Spool
from mercli.tags import UnreadableDicom, read_tags
from tests.dicomfiles import dataset_bytes, make_instance
from tests.kit import CT, EXPLICIT, GETDCMTAGS, IMPLICIT
from tests.netkit import Receiver, storescu
from tests.reliability.hostile import MARKER, Hostile, hostile_files, many_elements, many_items
from tests.reliability.kit import fuzz_seed, items, mercli

EXAMPLES = int(os.environ.get("MERCLI_FUZZ_EXAMPLES") or 150)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


class Hang(Exception):
    pass


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise Hang


def read_within(path: Path, seconds: float = 10) -> dict[str, Any] | UnreadableDicom:
    """read_tags, or the UnreadableDicom it raised; any other exception fails the test."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return read_tags(path)
    except UnreadableDicom as exc:
        return exc
    except Hang:
        raise AssertionError(f"read_tags hung on {path}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def getdcmtags(*args: str | Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [str(GETDCMTAGS), *map(str, args)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"getdcmtags hung on {args}") from None


def no_escape(root: Path) -> None:
    """No file name anywhere under root, nor in /tmp, was made from a hostile UID."""
    escaped = [p for p in root.rglob(f"*{MARKER}*")] + list(Path("/tmp").glob(f"*{MARKER}*"))
    assert escaped == [], escaped


def test_read_tags_and_getdcmtags_survive_hostile_files(tmp_path: Path) -> None:
    files, staging = tmp_path / "files", tmp_path / "staging"
    files.mkdir()
    staging.mkdir()
    spool = Spool.open(tmp_path / "spool")
    findings: list[str] = []
    outcomes = {"readable": 0, "unreadable": 0}
    readable_files: dict[Path, bool] = {}

    @seed(fuzz_seed())
    @FUZZ
    @given(case=hostile_files())
    def check(case: Hostile) -> None:
        path = files / f"{case.sop}.dcm"
        path.write_bytes(case.data)
        result = read_within(path)
        readable = isinstance(result, dict)
        ours = result if isinstance(result, dict) else {}
        readable_files[path] = readable
        outcomes["readable" if readable else "unreadable"] += 1

        printed = getdcmtags(path)
        assert printed.returncode in (0, 1), (printed.returncode, printed.stderr, case.damage)
        if printed.returncode == 1:
            assert printed.stderr.startswith("Error: ") and str(path) in printed.stderr
        else:
            assert printed.stdout.count("\n") == 1 and printed.stdout.endswith("\n"), printed.stdout
        if readable != (printed.returncode == 0):
            why = result if not readable else printed.stderr.strip()
            findings.append(f"readable: read_tags={readable} {case.damage} {why}")
        elif readable and json.loads(printed.stdout) != ours:
            theirs = json.loads(printed.stdout)
            diff = {
                k: (ours.get(k), theirs.get(k))
                for k in {*ours, *theirs}
                if ours.get(k) != theirs.get(k)
            }
            findings.append(f"values differ {case.damage}: {diff}")

        staged = staging / path.name
        staged.write_bytes(case.data)
        published = getdcmtags(
            "--publish",
            "--spool",
            spool.root,
            "--calling-aet",
            "FUZZ",
            "--called-aet",
            "MERCLI",
            "--address",
            "127.0.0.1",
            staged,
        )
        assert published.returncode in (0, 1), (published.returncode, published.stderr)
        (line,) = published.stdout.rstrip("\n").split("\n")
        kind, _, rest = line.partition(" ")
        if kind == "ok":
            series, _, instance = rest.partition("/")
            stored = spool.root / "incoming" / series / f"{instance}.dcm"
            assert stored.read_bytes() == case.data and stored.with_suffix(".tags").is_file()
            assert "/" not in instance and series not in ("", ".", "..")
            if readable and all(ours.get(k) for k in UIDS):
                assert series == safe_name(str(ours["SeriesInstanceUID"]))
        elif kind == "error":
            item = spool.root / "error" / rest.split(" ")[0]
            assert (item / "instance.dcm").read_bytes() == case.data
            assert json.loads((item / "error.json").read_text())["reason"]
        else:
            raise AssertionError(f"getdcmtags --publish: {line} ({case.damage})")
        if (kind == "ok") != (readable and all(ours.get(k) for k in UIDS)):
            findings.append(f"publish: {line[:120]} but read_tags={readable} {case.damage}")

    check()
    no_escape(tmp_path)
    assert list((spool.root / "tmp").iterdir()) == [] and not list(staging.iterdir())
    # `mercli tags` over the whole corpus in one process: one answer per file, no traceback.
    cli = mercli("tags", *readable_files, timeout=120)
    assert cli.returncode == (0 if all(readable_files.values()) else 1), cli.stderr[-2000:]
    assert "Traceback" not in cli.stderr
    errors = [line for line in cli.stderr.split("\n") if line.startswith("Error: ")]
    assert len(errors) == list(readable_files.values()).count(False)
    assert cli.stdout.count("\n") == list(readable_files.values()).count(True)
    print(f"{outcomes}; {len(findings)} finding(s)")
    for finding in findings:
        print("FINDING", finding[:400])
    assert outcomes["readable"] and outcomes["unreadable"], "the corpus is not hostile enough"
    assert findings == [], f"read_tags and getdcmtags disagree on {len(findings)} file(s)"


def test_getdcmtags_finishes_on_many_small_elements(tmp_path: Path) -> None:
    """300 000 small elements, or 200 000 items in one sequence, before NumberOfFrames: print
    and --publish finish within 30 s (a hang guard, not a speed test: about a second here;
    reaching each element by index took over a minute, while storescp kept acknowledging
    what the dcmtk engine's publisher could not keep up with), with read_tags' answer."""
    sop = "1.2.826.0.1.3680043.9.79.1"
    files = {"elements": many_elements(sop, 300_000), "items": many_items(f"{sop}.1", 200_000)}
    spool = Spool.open(tmp_path / "spool")
    for name, data in files.items():
        path = tmp_path / f"many_{name}.dcm"
        path.write_bytes(data)
        printed = getdcmtags(path, timeout=30)
        assert printed.returncode == 0, printed.stderr
        assert json.loads(printed.stdout) == read_within(path, seconds=30)
        published = getdcmtags(
            "--publish",
            "--spool",
            spool.root,
            "--calling-aet",
            "MANY",
            "--called-aet",
            "MERCLI",
            "--address",
            "127.0.0.1",
            path,
            timeout=30,
        )
        assert published.returncode == 0 and published.stdout.startswith("ok "), published


def test_receive_answers_every_hostile_instance_and_keeps_serving(
    tmp_path: Path, chunked_send: None
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    spool = tmp_path / "spool"
    running = Receiver(spool, "--processes", "1").start()
    ae = AE(ae_title="FUZZ")
    ae.add_requested_context(CT, [EXPLICIT])
    ae.add_requested_context(CT, [IMPLICIT])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    session: dict[str, Any] = {}
    statuses: dict[int, int] = {}
    sent_ok: dict[str, bytes] = {}

    @seed(fuzz_seed())
    @FUZZ
    @given(case=hostile_files())
    def check(case: Hostile) -> None:
        assoc = session.get("assoc")
        if assoc is None or not assoc.is_established:
            assoc = session["assoc"] = ae.associate("127.0.0.1", running.port, ae_title="MERCLI")
            assert assoc.is_established, "the receiver stopped accepting associations"
        path = files / f"{case.sop}.dcm"
        path.write_bytes(case.data)
        quarantined = len(items(spool, "error"))
        answer = assoc.send_c_store(path)
        status = answer.get("Status")
        assert status is not None, f"no answer (aborted or hung) for {case.damage}"
        statuses[status] = statuses.get(status, 0) + 1
        assert status == 0 or status >> 8 in (0xA7, 0xC2), (hex(status), case.damage)
        if status >> 8 == 0xC2:
            assert len(items(spool, "error")) == quarantined + 1, "C2xx without quarantine"
            (newest,) = sorted(items(spool, "error"), key=lambda p: p.stat().st_mtime)[-1:]
            sent = dataset_bytes(path)
            if len(sent) >= 8:  # pynetdicom's split_dataset swallows a shorter tail unsent
                assert dataset_bytes(newest / "instance.dcm") == sent
        if status == 0:
            sent_ok[case.sop] = dataset_bytes(path)
        result = read_within(path)
        understood = isinstance(result, dict) and all(result.get(k) for k in UIDS)
        assert (status == 0) == understood, (hex(status), case.damage, result)

    try:
        check()
        good = make_instance(tmp_path, series="1.2.826.0.1.3680043.9.60")
        assert storescu(running.port, [good]).returncode == 0, "receiver stopped serving"
    finally:
        if session.get("assoc") is not None:
            session["assoc"].release()
        assert running.stop() == 0, running.output()
    print(f"statuses: { {hex(k): v for k, v in statuses.items()} }")
    stored = {dataset_bytes(p) for p in (spool / "incoming").glob("*/*.dcm")}
    assert set(sent_ok.values()) <= stored, "an acknowledged instance is missing"
    assert len(stored) == len(sent_ok) + 1  # nothing invented: those, and the good one
    no_escape(tmp_path)
