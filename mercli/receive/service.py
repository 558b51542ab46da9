"""Running receivers: one listener per process, SIGINT/SIGTERM handling, clean shutdown.

pynetdicom serves each association in a thread, so one process is bound to one core by the
GIL. With `config.listeners > 1` (--processes) a supervisor forks that many listener
processes, all bound to the same port with SO_REUSEPORT (the kernel spreads connections over
them) and each with its own Worker, so their scratch files and leases never mix. A listener
that dies is restarted; one that cannot even start (port in use) stops the whole receiver
with its error.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

from mercli.dicom.scp.listener import Listener
from mercli.errors import ListenError, MercliError
from mercli.receive.handler import InstanceStore, ReceiveConfig, start_listener, tls_context
from mercli.service import SIGNAL_POLL, ignore_signals, stop_on_signals
from mercli.spool import Spool, Worker, recover

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0  # seconds between restarts of a crashed listener
EARLY_EXIT = 3.0  # a listener that exits within this many seconds of starting failed to start


def serve(spool_root: Path, config: ReceiveConfig) -> None:
    """Receive until SIGINT/SIGTERM, then finish open associations (at most
    `config.shutdown_grace` seconds, then abort them) and return. Unusable TLS files raise
    TlsConfigError before anything listens."""
    tls_context(config)  # each listening process builds its own; this one only checks the files
    if config.engine == "dcmtk":
        from mercli.receive.dcmtk.engine import serve_dcmtk

        serve_dcmtk(spool_root, config)
        return
    Spool.open(spool_root)  # an unusable spool is reported before anything listens
    if config.listeners <= 1:
        serve_one(spool_root, config)
    else:
        _supervise(spool_root, config)


def serve_one(spool_root: Path, config: ReceiveConfig, stop: threading.Event | None = None) -> None:
    """One listening process (threads per association) until `stop` or a signal."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        stop_on_signals(stop, "finishing open associations")
    if not log.isEnabledFor(logging.DEBUG):
        warnings.simplefilter("ignore")  # pydicom warns about every odd value a modality sends
    spool = Spool.open(spool_root)
    recover(spool)  # reap scratch of receivers that died before us
    with Worker(spool, "receive") as worker:
        store = InstanceStore(spool, worker, config)
        try:
            listener = start_listener(config, store)
            _log_listening(listener, config.aet)
            while not stop.wait(SIGNAL_POLL):  # see SIGNAL_POLL
                pass
            _stop_listener(listener, config.shutdown_grace)
        finally:
            store.close()
    _ignore_late_signals()
    log.info("receiver stopped")


def _log_listening(listener: Listener, aet: str) -> None:
    host, port = listener.address
    if listener.tls_address is None:
        log.info("receiving on %s:%d as %s (pid %d)", host, port, aet, os.getpid())
    elif listener.tls_address == listener.address:
        log.info("receiving with TLS on %s:%d as %s (pid %d)", host, port, aet, os.getpid())
    else:
        log.info(
            "receiving on %s:%d, with TLS on port %d, as %s (pid %d)",
            host,
            port,
            listener.tls_address[1],
            aet,
            os.getpid(),
        )


def _stop_listener(listener: Listener, grace: float) -> None:
    """No new associations; open ones get `grace` seconds, then A-ABORT (SPEC §9: a bounded
    shutdown, so a peer trickling bytes cannot keep the receiver from exiting)."""
    listener.close()
    if listener.open_associations():
        log.info(
            "waiting up to %g s for %d open association(s)", grace, listener.open_associations()
        )
    aborted = listener.shutdown(grace)
    if aborted:
        log.warning("aborted %d association(s) still open after %g s", aborted, grace)


def _ignore_late_signals() -> None:
    """The work is done: a second SIGTERM or Ctrl-C while Python exits must not kill us."""
    if threading.current_thread() is threading.main_thread():
        ignore_signals()


def _child_main(spool_root: Path, config: ReceiveConfig) -> None:
    try:
        serve_one(spool_root, config)
    except MercliError as exc:
        log.error("%s", exc)
        os._exit(int(exc.exit_code))
    os._exit(0)


def _supervise(spool_root: Path, config: ReceiveConfig) -> None:
    per_process = replace(
        config, max_associations=math.ceil(config.max_associations / config.listeners)
    )
    context = multiprocessing.get_context("fork")
    stop = threading.Event()
    stop_on_signals(stop, "finishing open associations")

    def start() -> tuple[multiprocessing.process.BaseProcess, float]:
        process = context.Process(target=_child_main, args=(spool_root, per_process))
        process.start()
        return process, time.monotonic()

    children = [start() for _ in range(config.listeners)]
    try:
        while not stop.wait(0.2):
            for index, (process, started) in enumerate(children):
                if process.is_alive():
                    continue
                code = process.exitcode
                if code and time.monotonic() - started < EARLY_EXIT:
                    raise ListenError(f"a receiving process failed to start (exit {code})")
                log.error("receiving process %d exited (%s); restarting it", process.pid, code)
                stop.wait(RESTART_DELAY)
                children[index] = start()
    finally:
        for process, _ in children:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process, _ in children:
            process.join()
        _ignore_late_signals()
