"""Hostile load on `mercli receive` (SPEC §9): peers that open sockets and say nothing,
trickle one byte at a time, send command fragments that never end, declare PDUs of 4 GiB,
stuff requests with presentation contexts, or put garbage and terminal escapes into UIDs and
AE titles. For each attack: a real sender (DCMTK storescu) sent meanwhile is acknowledged and
its instance stored whole, the receiver's memory stays under RSS_LIMIT_MB and its threads
under THREAD_LIMIT, and nothing acknowledged is lost. Short timeouts through the receiver's
own options keep the suite fast; every wait is polled with a deadline."""

from __future__ import annotations

import logging
import re
import select
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from mercli.dicom.scp.listener import MAX_CONTEXTS, Listener
from mercli.receive.handler import InstanceStore, ReceiveConfig
from mercli.spool import Spool, Worker
from tests.dicomfiles import dataset_bytes, make_instance
from tests.kit import CT, EXPLICIT
from tests.netkit import Receiver, published, storescu, wait_until
from tests.reliability.rawpdu import (
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    P_DATA,
    RELEASE_RQ,
    associate,
    associate_rq,
    c_store_rq,
    header,
    p_data,
    read_pdu,
    status_of,
    store_pdus,
)

RSS_LIMIT_MB = 200
THREAD_LIMIT = 32  # main, acceptor, watchdog, scratch files, 8 fsync, associations: ~20
INVALID_UID = 0xC213
RAW_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# -- the receiver under load ---------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _family(pid: int) -> list[int]:
    """The process and all its descendants (from /proc/<pid>/task/*/children)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = (task / "children").read_text().split()
            queue.extend(int(child) for child in children)
    return found


def usage(pid: int) -> tuple[float, int]:
    """RSS in MB and threads, summed over the receiver and its children."""
    statuses = [_proc_status(member) for member in _family(pid)]
    rss = sum(int(status["VmRSS"].split()[0]) for status in statuses) / 1024
    return rss, sum(int(status["Threads"]) for status in statuses)


@dataclass
class Load:
    """One receiver under attack, and what it acknowledged to real senders."""

    running: Receiver
    source: Path
    acknowledged: dict[Path, bytes] = field(default_factory=dict)  # stored path -> data set

    @property
    def pid(self) -> int:
        assert self.running.process is not None
        return self.running.process.pid

    def legit_send(self) -> None:
        """storescu sends one new instance: acknowledged, and stored whole right then."""
        series = f"1.2.826.0.1.3680043.9.95.{len(self.acknowledged) + 1}"
        path = make_instance(self.source, series=series)
        result = storescu(self.running.port, [path])
        assert result.returncode == 0, result.stderr
        stored = published(self.running.spool / "incoming" / series / path.name)
        assert dataset_bytes(stored) == dataset_bytes(path)
        self.acknowledged[stored] = dataset_bytes(path)

    def assert_bounded(self) -> None:
        rss, threads = usage(self.pid)
        assert rss < RSS_LIMIT_MB, f"receiver RSS {rss:.0f} MB"
        assert threads <= THREAD_LIMIT, f"receiver has {threads} threads"

    def stop_and_check(self) -> str:
        """SIGTERM: exit 0, and every acknowledged instance is in the spool, whole."""
        assert self.running.stop() == 0, self.running.output()
        for stored, data in self.acknowledged.items():
            assert stored.is_file() and dataset_bytes(stored) == data, stored
        return self.running.output()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Load]]:
    """Start a receiver (`--processes 1` plus the given options); killed if a test failed."""
    started: list[Receiver] = []

    def run(*args: str) -> Load:
        source = tmp_path / f"source{len(started)}"
        source.mkdir()
        running = Receiver(tmp_path / f"spool{len(started)}", "--processes", "1", *args)
        started.append(running.start())
        return Load(running, source)

    yield run
    for running in started:
        if running.process is not None and running.process.poll() is None:
            running.process.kill()
            running.process.wait(timeout=30)
            running.log_file.close()


class Trickler(threading.Thread):
    """Sends `data` one byte every `every` seconds until the receiver ends the connection
    (`ended` is then "abort" or "closed") or `stop` is set: a bounded loop."""

    def __init__(self, sock: socket.socket, data: bytes, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.sock, self.data, self.every = sock, data, every
        self.stop = threading.Event()
        self.ended: str | None = None

    def run(self) -> None:
        for byte in self.data:
            # Wait for the receiver's answer *before* each byte: a byte sent after its A-ABORT
            # and close draws a reset, which would destroy the unread A-ABORT on our side.
            readable = select.select([self.sock], [], [], self.every)[0]
            if self.stop.is_set():
                return
            if readable:
                answer = read_pdu(self.sock)
                self.ended = "abort" if answer and answer[0] == ABORT else "closed"
                return
            try:
                self.sock.send(bytes([byte]))
            except OSError:
                self.ended = "closed"
                return

    def __enter__(self) -> Trickler:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.join(timeout=10)
        self.sock.close()


def closed_by_peer(sockets: list[socket.socket], closed: set[int]) -> int:
    """How many of `sockets` the receiver has closed so far (EOF or reset), kept in `closed`."""
    poller = select.poll()
    for sock in sockets:
        if sock.fileno() not in closed:
            poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    for fd, _ in poller.poll(0):
        sock = next(s for s in sockets if s.fileno() == fd)
        try:
            if sock.recv(16) == b"":
                closed.add(fd)
        except OSError:
            closed.add(fd)
    return len(closed)


def answer_to(sock: socket.socket, data: bytes) -> int | None:
    """Send `data` and return the type of the PDU that answers (None: closed, no answer)."""
    sock.sendall(data)
    answer = read_pdu(sock)
    return None if answer is None else answer[0]


def store_status(sock: socket.socket, data: bytes) -> int | None:
    sock.sendall(data)
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == P_DATA, answer
    return status_of(answer[1])


# -- the attacks ---------------------------------------------------------------------------------


def test_silent_sockets_are_capped_before_they_cost_threads_or_memory(
    start: Callable[..., Load],
) -> None:
    """300 sockets that send one byte each: the receiver keeps at most 2 x --max-associations
    of them, closing the longest waiting, without a thread or a buffer for any. (The
    reviewer's 1000 cost 1.09 GB and 1003 threads before admission came first.)"""
    load = start("--max-associations", "4")  # at most 8 connections wait for a request
    sockets: list[socket.socket] = []
    closed: set[int] = set()
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", load.running.port), timeout=15)
            sock.sendall(b"\x01")
            sockets.append(sock)
        wait_until(
            lambda: closed_by_peer(sockets, closed) >= len(sockets) - 8,
            timeout=15,
            what="the receiver to close all but 8 of the silent sockets",
        )
        load.assert_bounded()
        load.legit_send()
        load.assert_bounded()
    finally:
        for sock in sockets:
            sock.close()
    load.stop_and_check()


def test_trickling_peers_hold_no_slot_past_their_deadlines(start: Callable[..., Load]) -> None:
    """One byte every 0.2 s, before and after associating: the association request must be
    whole within --acse-timeout, each PDU within --network-timeout, so two tricklers on
    --max-associations 2 lock a real sender out for a bounded time, not forever."""
    load = start("--max-associations", "2", "--acse-timeout", "1", "--network-timeout", "2")
    request = associate_rq("TRICKLER", "MERCLI", CT, EXPLICIT)
    pdu = p_data(1, 0x03, c_store_rq(CT, "1.2.826.0.1.3680043.9.96.1"))
    with (
        Trickler(socket.create_connection(("127.0.0.1", load.running.port)), request) as asking,
        Trickler(associate(load.running.port, "TRICKLE1"), pdu) as first,
        Trickler(associate(load.running.port, "TRICKLE2"), pdu) as second,
    ):
        # Both slots are the tricklers' now; a real sender gets in once they are aborted.
        wait_until(lambda: storescu_ok(load), timeout=20, what="a slot for a real sender")
        wait_until(lambda: None not in (asking.ended, first.ended, second.ended), timeout=10)
        load.assert_bounded()
    assert asking.ended == "closed", "a trickled association request was not cut"
    assert first.ended == second.ended == "abort", (first.ended, second.ended)
    load.legit_send()
    output = load.stop_and_check()
    assert "no whole A-ASSOCIATE-RQ" in output and "a PDU took more than 2 s" in output


def storescu_ok(load: Load) -> bool:
    """One attempt of a real sender; True once acknowledged (and checked stored whole)."""
    try:
        load.legit_send()
    except AssertionError:
        return False
    return True


def test_sigterm_aborts_what_is_still_open_after_the_grace_period(
    start: Callable[..., Load],
) -> None:
    """A peer trickling a PDU (inside --network-timeout) and an idle one: SIGTERM ends both
    with A-ABORT after --shutdown-grace, and the receiver exits 0 with everything it
    acknowledged stored."""
    load = start("--network-timeout", "60", "--shutdown-grace", "1")
    idle = AE(ae_title="IDLE")
    idle.add_requested_context(CT, EXPLICIT)
    idle.acse_timeout = idle.dimse_timeout = idle.network_timeout = 30
    held = idle.associate("127.0.0.1", load.running.port, ae_title="MERCLI")
    series = "1.2.826.0.1.3680043.9.97"
    path = make_instance(load.source, series=series)
    assert held.send_c_store(dcmread(path)).Status == 0
    load.acknowledged[load.running.spool / "incoming" / series / path.name] = dataset_bytes(path)
    pdu = p_data(1, 0x03, c_store_rq(CT, "1.2.826.0.1.3680043.9.97.9")) * 10
    with Trickler(associate(load.running.port, "TRICKLER"), pdu) as trickler:
        load.legit_send()
        load.assert_bounded()
        assert load.running.process is not None
        load.running.process.send_signal(signal.SIGTERM)
        assert load.running.process.wait(timeout=20) == 0, "shutdown was not bounded"
        wait_until(lambda: trickler.ended is not None, timeout=10, what="the trickler's end")
    assert trickler.ended == "abort"
    wait_until(lambda: held.is_aborted, timeout=10, what="the idle association's A-ABORT")
    output = load.stop_and_check()
    assert "aborted 2 association(s) still open after 1 s" in output


def test_what_a_peer_declares_is_never_buffered(start: Callable[..., Load]) -> None:
    """Command fragments that never end, an A-RELEASE-RQ of 4 GiB, a P-DATA-TF longer than
    we announced, an A-ASSOCIATE-RQ of 200 KiB: each is answered with A-ABORT (or a closed
    connection) as soon as the limit is crossed, before anything is allocated for it."""
    load = start("--network-timeout", "30")
    peak_before = int(_proc_status(load.pid)["VmPeak"].split()[0])
    with associate(load.running.port, "FRAGMENTS") as sock:
        fragments = p_data(1, 0x01, bytes(16 << 10)) * 64  # 1 MiB of command, never the last
        sent = 0
        try:
            while sent < 300:  # MiB; the receiver must stop us long before
                sock.sendall(fragments)
                sent += 1
        except OSError:
            pass
        assert sent < 300, "300 MiB of command fragments were swallowed"
    load.assert_bounded()
    with associate(load.running.port, "RELEASE") as sock:
        sock.settimeout(10)
        assert answer_to(sock, header(RELEASE_RQ, 0xFFFFFFF0) + bytes(16)) == ABORT
    with associate(load.running.port, "PDATA") as sock:
        sock.settimeout(10)
        assert answer_to(sock, header(P_DATA, 64 << 20) + bytes(64)) == ABORT
    with socket.create_connection(("127.0.0.1", load.running.port), timeout=10) as sock:
        assert answer_to(sock, header(0x01, 200 << 10)) == ABORT
    peak_after = int(_proc_status(load.pid)["VmPeak"].split()[0])
    assert peak_after - peak_before < 1 << 20, "a declared length was allocated (VmPeak, kB)"
    load.legit_send()
    load.assert_bounded()
    output = load.stop_and_check()
    assert "command set of more than 64 KiB" in output and "A-RELEASE-RQ of" in output


def test_context_floods_and_duplicate_ids_are_refused_after_the_ae_check(
    start: Callable[..., Load],
) -> None:
    """More than 128 presentation contexts or one id twice: A-ASSOCIATE-RJ (permanent), read
    by hand, never decoded. An unknown AE is refused for being unknown, whatever it proposes."""
    load = start("--allow-aet", "LOAD", "--allow-aet", "STORESCU")
    many = [(2 * n + 1) % 256 for n in range(1500)]  # ~120 KiB, under the request size cap
    answers: dict[str, bytes] = {}
    for name, calling, ids in (
        ("flood", "LOAD", many),
        ("duplicate", "LOAD", [1, 3, 1]),
        ("unknown", "INTRUDER", many),
    ):
        with socket.create_connection(("127.0.0.1", load.running.port), timeout=15) as sock:
            sock.sendall(associate_rq(calling, "MERCLI", CT, EXPLICIT, ids))
            answer = read_pdu(sock)
            assert answer is not None and answer[0] == ASSOCIATE_RJ, (name, answer)
            answers[name] = answer[1]
    assert answers["flood"][1:4] == answers["duplicate"][1:4] == b"\x01\x01\x01"  # permanent
    assert answers["unknown"][1:4] == b"\x01\x01\x03"  # calling AE title not recognised
    with socket.create_connection(("127.0.0.1", load.running.port), timeout=15) as sock:
        ids = [2 * n + 1 for n in range(MAX_CONTEXTS)]  # the most a request may have
        assert answer_to(sock, associate_rq("LOAD", "MERCLI", CT, EXPLICIT, ids)) == ASSOCIATE_AC
        assert answer_to(sock, header(RELEASE_RQ, 4) + bytes(4)) == 0x06
    load.legit_send()
    load.assert_bounded()
    output = load.stop_and_check()
    assert "more than 128 presentation contexts" in output and "id 1 twice" in output


def test_a_command_with_an_invalid_uid_is_refused_and_nothing_stored(
    start: Callable[..., Load],
) -> None:
    """The Affected SOP Class/Instance UID of a C-STORE-RQ must be a UID (padding forgiven):
    `[/x]` and friends are answered 0xC213 and never reach the spool."""
    load = start()
    good = make_instance(load.source, series="1.2.826.0.1.3680043.9.98")
    data = dataset_bytes(good)
    sop = dcmread(good).SOPInstanceUID
    with associate(load.running.port, "UIDS") as sock:
        for n, (sop_class, instance) in enumerate(
            [
                ("[/x]", sop),
                (CT, "../../x"),
                (CT, "1.2..3"),
                (CT, "1." + "2" * 70),
                (CT, b"1.2.3\x1b[2J\n2026 FORGED"),
                (CT.encode() + b"\x00\x00\x00", b"\x001.2.3"),
            ]
        ):
            status = store_status(sock, store_pdus(sop_class, instance, data, message_id=n + 1))
            assert status == INVALID_UID, (sop_class, instance, status)
        assert not list((load.running.spool / "incoming").rglob("*.dcm")), "a refused one landed"
        padded = sop.encode() + b"  "  # space padding, as some devices send
        assert store_status(sock, store_pdus(CT.encode() + b"\x00", padded, data, 9)) == 0
        assert answer_to(sock, header(RELEASE_RQ, 4) + bytes(4)) == 0x06
    stored = published(load.running.spool / "incoming" / "1.2.826.0.1.3680043.9.98" / good.name)
    assert dataset_bytes(stored) == data
    load.acknowledged[stored] = data
    load.legit_send()
    load.assert_bounded()
    output = load.stop_and_check()
    assert "Affected SOP Class UID [/x] is not a UID" in output
    assert "1.2.3\\x1b[2J\\x0a2026 FORGED" in output


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_peer_values_are_escaped_before_they_reach_a_log_record(tmp_path: Path) -> None:
    """The receiving code escapes AE titles, addresses and UIDs itself (mercli.names.printable),
    before any formatter: checked on the raw log records of an in-process listener, so the
    escaping log formatter (the second line of defence) cannot hide a miss."""
    spool = Spool.open(tmp_path / "spool")
    records = _Records()
    logger = logging.getLogger("mercli")
    logger.addHandler(records)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with Worker(spool, "receive") as worker:
            store = InstanceStore(spool, worker, ReceiveConfig(allow_aets=("CT1", "STORESCU")))
            listener = Listener("127.0.0.1", 0, store).start()
            port = listener.address[1]
            try:
                for calling, called in (
                    (b"A\n2026 X\x1b[2J", b"MERCLI"),  # ASCII: pynetdicom would quote it raw
                    (b"CT1", b"B\n2026 Z\x1b[2J\x9b"),
                ):
                    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
                        request = associate_rq(calling, called, CT, EXPLICIT)
                        assert answer_to(sock, request) == ASSOCIATE_RJ
                with associate(port, "CT1") as sock:
                    command = store_pdus(CT, b"1.2\x1b]0;owned\x07\n2026 Y", b"")
                    assert store_status(sock, command) == INVALID_UID
                path = make_instance(tmp_path, series="1.2.826.0.1.3680043.9.99")
                assert storescu(port, [path]).returncode == 0
                stored = published(spool.root / "incoming" / "1.2.826.0.1.3680043.9.99" / path.name)
                assert dataset_bytes(stored) == dataset_bytes(path)
            finally:
                listener.close()
                assert listener.shutdown(5) == 0
                store.close()
    finally:
        logger.removeHandler(records)
        logger.setLevel(previous)
    raw = [message for message in records.messages if RAW_CONTROL.search(message)]
    assert raw == [], raw
    text = "\n".join(records.messages)  # ...and each value was logged, escaped
    assert "2026 X\\x1b[2J" in text and "2026 Z\\x1b[2J\\x9b" in text, text
    assert "\\x1b]0;owned\\x07\\x0a2026 Y" in text, text


def test_the_request_scanner_counts_without_decoding() -> None:
    """The hand scan behind admission: AE titles (NUL padding forgiven), context count and
    duplicates, and a request whose items do not tile the PDU."""
    from mercli.dicom.dimse import ProtocolError
    from mercli.dicom.scp.negotiation import scan_associate_rq

    summary = scan_associate_rq(associate_rq(b"CT1\x00\x00", "MERCLI", CT, EXPLICIT, [1, 3, 3]))
    assert (summary.calling, summary.called, summary.contexts) == ("CT1", "MERCLI", 3)
    assert summary.duplicate_context == 3 and summary.pdu[26:42] == b"CT1".ljust(16)
    flood = scan_associate_rq(associate_rq("A", "B", CT, EXPLICIT, [1] * 5000))
    assert flood.contexts == MAX_CONTEXTS + 1  # counting stops there
    assert scan_associate_rq(associate_rq(b"A\\B", b" ", CT, EXPLICIT)).calling is None
    broken = associate_rq("A", "B", CT, EXPLICIT)
    with pytest.raises(ProtocolError):
        scan_associate_rq(broken[:-3])
