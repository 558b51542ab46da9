"""SFTP targets against a real OpenSSH sshd on loopback: `<path>/<job id>/` appears complete or
not at all, interrupted uploads resume, unknown host keys and bad credentials are refused."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import paramiko
import pytest

from mercli.dispatch.targets import DELIVER, sftp
from mercli.jobs import JobInfo, Progress, Target
from mercli.spool import SUCCESS, Spool
from tests.sshkit import Sshd, ThrowawayUser, descendants, keygen, public_key
from tests.test_dispatch import dispatch_once, routed, rules_for


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(tmp_path / "sshd").start()
    yield server
    server.stop()


@pytest.fixture
def user() -> Iterator[ThrowawayUser]:
    made = ThrowawayUser.create()
    yield made
    made.remove()


@pytest.fixture
def outside() -> Iterator[Path]:
    """A folder a throwaway user can reach (pytest's tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="mercli-sftp-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def make_job(folder: Path, count: int = 3, size: int = 100_000, series: str = "") -> Path:
    """count instances (.dcm of `size` bytes, distinct content) + sidecars in folder[/series]."""
    where = folder / series if series else folder
    where.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        (where / f"{series}{n}.dcm").write_bytes(os.urandom(size))
        (where / f"{series}{n}.tags").write_text(f'{{"InstanceNumber": {n}}}')
    return folder


def sftp_target(server: Sshd, dest: Path, **options: Any) -> Target:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "user": "root",
        "key_file": str(server.client_key),
        "known_hosts": str(server.known_hosts),
        "path": dest,
        "timeout": 10.0,
    }
    return Target(name="research", type="sftp", **(settings | options))


def job_info(target: Target, name: str = "job-1", series: tuple[str, ...] = ()) -> JobInfo:
    return JobInfo(name, target, study="1.2.3", first_received="", created=0.0, series=series)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below folder by relative path, with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def job_tree(folder: Path) -> dict[str, bytes]:
    return {name: data for name, data in tree(folder).items() if name.endswith((".dcm", ".tags"))}


# -- delivery ---------------------------------------------------------------------------------


def test_registered_as_the_sftp_type() -> None:
    assert DELIVER["sftp"] is sftp.deliver


def test_series_job_lands_byte_for_byte_then_counts_as_delivered(
    tmp_path: Path, sshd: Sshd
) -> None:
    job = make_job(tmp_path / "job", count=4)
    (job / "job.json").write_text("{}")  # spool files of the job are not sent
    dest = tmp_path / "dest"
    dest.mkdir()
    info = job_info(sftp_target(sshd, dest))
    result = sftp.deliver(job, info, Progress())
    assert result.ok and result.delivered == 4, result.error
    assert os.listdir(dest) == ["job-1"]  # no temporary left
    assert tree(dest / "job-1") == job_tree(job)
    stamp = (dest / "job-1").stat().st_mtime_ns
    again = sftp.deliver(job, info, Progress())  # a crash after the rename: nothing rewritten
    assert again.ok and (dest / "job-1").stat().st_mtime_ns == stamp


def test_study_job_keeps_a_folder_per_series(tmp_path: Path, sshd: Sshd) -> None:
    job = make_job(tmp_path / "job", count=2, size=40_000, series="1.2.10")
    make_job(job, count=3, size=70_000, series="1.2.11")
    dest = tmp_path / "dest"
    dest.mkdir()
    info = job_info(sftp_target(sshd, dest), "study-1", series=("1.2.10", "1.2.11"))
    result = sftp.deliver(job, info, Progress())
    assert result.ok and result.delivered == 5, result.error
    assert sorted(os.listdir(dest / "study-1")) == ["1.2.10", "1.2.11"]
    assert tree(dest / "study-1") == job_tree(job)


def test_an_interrupted_upload_resumes_without_resending_whole_files(
    tmp_path: Path, sshd: Sshd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection dies in the middle of the third instance; the next attempt sends only
    what is missing or short, and the job then lands whole."""
    job = make_job(tmp_path / "job", count=4, size=100_000)  # 4 writes of 32 KiB per .dcm
    dest = tmp_path / "dest"
    dest.mkdir()
    info = job_info(sftp_target(sshd, dest))
    real_write = paramiko.SFTPFile._write
    writes = 0

    def dying_write(self: paramiko.SFTPFile, data: bytes) -> int:
        nonlocal writes
        writes += 1
        if writes == 12:  # 0.dcm 0.tags 1.dcm 1.tags = 10 writes; 2.dcm is half sent
            self.sftp.sock.get_transport().close()
        return int(real_write(self, data))

    monkeypatch.setattr(paramiko.SFTPFile, "_write", dying_write)
    first = sftp.deliver(job, info, Progress())
    assert not first.ok and not first.unreachable and not first.permanent
    assert "sftp:" in first.error and str(dest) in first.error
    temporary = dest / ".job-1.tmp"
    assert sorted(os.listdir(dest)) == [".job-1.tmp"]  # no job-1 yet
    whole = {"0.dcm", "0.tags", "1.dcm", "1.tags"}
    assert whole <= set(os.listdir(temporary))
    assert (temporary / "2.dcm").stat().st_size < 100_000  # opened, cut short
    stamps = {name: (temporary / name).stat() for name in whole}

    monkeypatch.setattr(paramiko.SFTPFile, "_write", real_write)
    sent: list[str] = []
    real_send = sftp._send
    monkeypatch.setattr(sftp, "_send", lambda c, u, r: (sent.append(u.name), real_send(c, u, r)))
    second = sftp.deliver(job, info, Progress())
    assert second.ok and second.delivered == 4, second.error
    assert sent == ["2.dcm", "2.tags", "3.dcm", "3.tags"]  # the whole ones were not sent again
    assert tree(dest / "job-1") == job_tree(job)
    for name, before in stamps.items():
        after = (dest / "job-1" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name


def test_a_server_that_stalls_mid_upload_times_out(
    tmp_path: Path, sshd: Sshd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sshd frozen (SIGSTOP) after the first file: the next wait ends after `timeout`."""
    job = make_job(tmp_path / "job", count=3, size=3_000_000)  # more than the 2 MB window
    dest = tmp_path / "dest"
    dest.mkdir()
    real_send = sftp._send
    frozen: list[int] = []

    def freezing_send(client: Any, upload: sftp.Upload, remote: Any) -> None:
        if upload.name == "1.dcm":
            assert sshd.process is not None
            frozen.extend(descendants(sshd.process.pid))
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
        real_send(client, upload, remote)

    monkeypatch.setattr(sftp, "_send", freezing_send)
    started = time.monotonic()
    try:
        result = sftp.deliver(job, job_info(sftp_target(sshd, dest, timeout=1.5)), Progress())
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert time.monotonic() - started < 10
    assert frozen and not result.ok and not result.unreachable
    assert result.error == f"sftp: timed out ({dest}/.job-1.tmp/1.dcm)"


def test_a_known_rsa_key_is_asked_for_when_the_server_has_several(tmp_path: Path) -> None:
    """The server has an ed25519 and an RSA host key, known_hosts only the RSA one."""
    server = Sshd(tmp_path / "sshd")
    rsa = keygen(server.root / "host_rsa", "rsa")
    server.known_hosts.write_text(f"[127.0.0.1]:{server.port} {public_key(rsa)}\n")
    server.start(extra=f"HostKey {rsa}")
    dest = tmp_path / "dest"
    dest.mkdir()
    try:
        result = sftp.deliver(
            make_job(tmp_path / "job", 1), job_info(sftp_target(server, dest)), Progress()
        )
    finally:
        server.stop()
    assert result.ok, result.error  # paramiko alone would ask for ed25519 and refuse it


def test_servers_without_posix_rename_get_a_plain_rename(
    tmp_path: Path, sshd: Sshd, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(self: paramiko.SFTPClient, old: str, new: str) -> None:
        raise OSError("Operation unsupported")  # what paramiko raises for SSH_FX_OP_UNSUPPORTED

    monkeypatch.setattr(paramiko.SFTPClient, "posix_rename", unsupported)
    job = make_job(tmp_path / "job", count=2)
    dest = tmp_path / "dest"
    dest.mkdir()
    result = sftp.deliver(job, job_info(sftp_target(sshd, dest)), Progress())
    assert result.ok, result.error
    assert os.listdir(dest) == ["job-1"] and tree(dest / "job-1") == job_tree(job)


def test_a_file_where_the_job_folder_belongs_is_an_error(tmp_path: Path, sshd: Sshd) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "job-1").write_text("not mercli's")
    result = sftp.deliver(
        make_job(tmp_path / "job", 1), job_info(sftp_target(sshd, dest)), Progress()
    )
    assert result.error == f"{dest}/job-1 exists and is not a folder mercli delivered"
    assert os.listdir(dest) == ["job-1"]


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["unknown", "changed"])
def test_a_host_key_not_in_known_hosts_is_refused_before_login(
    tmp_path: Path, sshd: Sshd, case: str
) -> None:
    other = keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    if case == "unknown":  # the file knows other hosts only (another port is another host)
        known.write_text(f"[127.0.0.1]:1 {public_key(sshd.host_key)}\n")
    else:  # the file has another key for this host: reinstalled server, or a man in the middle
        known.write_text(f"[127.0.0.1]:{sshd.port} {public_key(other)}\n")
    job = make_job(tmp_path / "job", count=1)
    dest = tmp_path / "dest"
    dest.mkdir()
    result = sftp.deliver(
        job, job_info(sftp_target(sshd, dest, known_hosts=str(known))), Progress()
    )
    served = paramiko.PKey.from_path(sshd.host_key).fingerprint
    assert not result.ok and result.unreachable and not result.permanent
    assert f"[127.0.0.1]:{sshd.port}" in result.error and f"ssh-ed25519 {served}" in result.error
    assert str(known) in result.error
    if case == "changed":
        assert "does NOT match" in result.error
        assert paramiko.PKey.from_path(other).fingerprint in result.error
    else:
        assert "is not in known_hosts" in result.error
    assert os.listdir(dest) == []
    assert "Accepted" not in sshd.log.read_text()  # no login was even tried


def test_a_key_the_server_does_not_know_is_refused(tmp_path: Path, sshd: Sshd) -> None:
    stranger = keygen(tmp_path / "stranger")
    dest = tmp_path / "dest"
    dest.mkdir()
    target = sftp_target(sshd, dest, key_file=str(stranger))
    result = sftp.deliver(make_job(tmp_path / "job", 1), job_info(target), Progress())
    assert not result.ok and result.unreachable
    assert result.error == (
        f"authentication as root at [127.0.0.1]:{sshd.port} refused: key {stranger} not accepted"
    )
    assert os.listdir(dest) == []


def test_a_key_with_a_passphrase_is_refused_clearly(tmp_path: Path, sshd: Sshd) -> None:
    locked = tmp_path / "locked"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "sekrit-phrase", "-f", str(locked)],
        check=True,
        timeout=30,
    )
    target = sftp_target(sshd, tmp_path, key_file=str(locked))
    result = sftp.deliver(make_job(tmp_path / "job", 1), job_info(target), Progress())
    assert result.unreachable and f"key_file {locked} is protected by a passphrase" in result.error


def test_password_login_and_its_refusals_never_show_the_password(
    tmp_path: Path,
    sshd: Sshd,
    user: ThrowawayUser,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    job = make_job(tmp_path / "job", count=2)
    writable, readonly = outside / "rw", outside / "ro"
    writable.mkdir()
    readonly.mkdir()
    shutil.chown(writable, user.name)
    base = sftp_target(sshd, writable, user=user.name, key_file=None)
    password_file = tmp_path / "password"

    monkeypatch.setenv("MERCLI_SFTP_TEST_PW", "wrong-" + user.password)
    wrong = sftp.deliver(
        job, job_info(replace(base, password="${MERCLI_SFTP_TEST_PW}")), Progress()
    )
    assert not wrong.ok and wrong.unreachable
    assert wrong.error == (
        f"authentication as {user.name} at [127.0.0.1]:{sshd.port} refused: password not accepted"
    )

    password_file.write_text(user.password + "\n")
    good = job_info(replace(base, password_file=str(password_file)))
    result = sftp.deliver(job, good, Progress())
    assert result.ok and result.delivered == 2, result.error
    assert tree(writable / "job-1") == job_tree(job)
    assert (writable / "job-1").stat().st_uid == (writable / "job-1" / "0.dcm").stat().st_uid

    denied = sftp.deliver(job, job_info(replace(good.target, path=readonly)), Progress())
    assert denied.error == f"sftp: permission denied ({readonly}/.job-1.tmp)"
    assert not denied.unreachable and os.listdir(readonly) == []

    monkeypatch.delenv("MERCLI_SFTP_TEST_PW")
    unset = sftp.deliver(
        job, job_info(replace(base, password="${MERCLI_SFTP_TEST_PW}")), Progress()
    )
    assert unset.error == (
        'target "research" password: environment variable MERCLI_SFTP_TEST_PW is not set'
    )
    for text in (wrong.error, result.error, denied.error, unset.error, caplog.text):
        assert user.password not in text


def test_a_missing_remote_folder_is_an_error_naming_it(tmp_path: Path, sshd: Sshd) -> None:
    dest = tmp_path / "not" / "there"
    result = sftp.deliver(
        make_job(tmp_path / "job", 1), job_info(sftp_target(sshd, dest)), Progress()
    )
    assert result.error == f"remote folder {dest} does not exist (create it on the server)"
    assert not result.unreachable and not result.permanent
    assert not (tmp_path / "not").exists()


def test_a_full_disk_on_the_server_is_named(tmp_path: Path) -> None:
    """The server's DEST is a 1 MB tmpfs in sshd's own mount namespace."""
    dest = tmp_path / "small"
    dest.mkdir()
    server = Sshd(tmp_path / "sshd")
    mount = f'mount -t tmpfs -o size=1m tmpfs {dest} && exec "$@"'
    server.start(wrapper=["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"])
    try:
        job = make_job(tmp_path / "job", count=3, size=600_000)
        result = sftp.deliver(job, job_info(sftp_target(server, dest)), Progress())
    finally:
        server.stop()
    assert result.error.startswith("sftp: no space left on the server (")
    assert str(dest / ".job-1.tmp") in result.error
    assert os.listdir(dest) == []  # outside the namespace: nothing ever landed here


def test_a_closed_port_is_unreachable(tmp_path: Path, sshd: Sshd) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connection refused
        target = sftp_target(sshd, tmp_path, port=port)
        result = sftp.deliver(make_job(tmp_path / "job", 1), job_info(target), Progress())
    assert result.unreachable and not result.permanent
    assert result.error == f"cannot connect to sftp server [127.0.0.1]:{port}: connection refused"


def test_a_server_that_never_answers_times_out(tmp_path: Path, sshd: Sshd) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepted by the kernel; never a banner
        port = silent.getsockname()[1]
        target = sftp_target(sshd, tmp_path, port=port, timeout=1.0)
        started = time.monotonic()
        result = sftp.deliver(make_job(tmp_path / "job", 1), job_info(target), Progress())
        assert time.monotonic() - started < 5
    assert result.unreachable and "timed out" in result.error.lower(), result.error


# -- through dispatch ---------------------------------------------------------------------------


def test_dispatch_once_delivers_a_routed_series(tmp_path: Path, spool: Spool, sshd: Sshd) -> None:
    """known_hosts made as the README says: ssh-keyscan, hashed."""
    known = tmp_path / "known_hosts"
    scan = ["ssh-keyscan", "-H", "-t", "ed25519", "-p", str(sshd.port), "127.0.0.1"]
    known.write_text(subprocess.run(scan, capture_output=True, text=True, timeout=30).stdout)
    assert known.read_text().startswith("|1|"), "ssh-keyscan found no key"
    dest = tmp_path / "remote"
    dest.mkdir()
    target = (
        f'[targets.research]\ntype = "sftp"\nhost = "127.0.0.1"\nport = {sshd.port}\n'
        f'user = "root"\nkey_file = "{sshd.client_key}"\nknown_hosts = "{known}"\n'
        f'path = "{dest}"\nretry_delay = "0s"\nmax_attempts = 2\n'
    )
    routed(tmp_path, spool, rules_for(tmp_path, target, '"research"'), {"1.2.80": 4})
    run = dispatch_once(spool)
    assert run.returncode == 0, run.stderr
    (done,) = spool.items(SUCCESS)
    assert os.listdir(dest) == [done.name]
    assert tree(dest / done.name) == job_tree(done.path)
    assert len(list((dest / done.name).glob("*.dcm"))) == 4
