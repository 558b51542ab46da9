"""Delivery to an `sftp` target: `<path>/<job id>/` appears on the server complete or not at all.

A study job appears as `<path>/<job id>/<series>/` (one sub-folder per series), in one rename.

The protocol, the folder target's (`folder.py`) carried over one SSH connection per job:

1. connect with `target.timeout` on every wait (TCP connect, banner, key exchange, auth,
   channel open, each SFTP request and each write), and check the server's host key against
   the target's `known_hosts` file only: never ~/.ssh/known_hosts, never added automatically;
2. authenticate with `key_file` (a private key without passphrase: dispatch runs unattended)
   and/or the password (`password = "${ENV}"` or `password_file`, read now, never logged);
3. if `<path>/<job id>` exists, an earlier attempt crashed after its rename but before the
   spool recorded success: the job is delivered, nothing is written again;
4. fill `<path>/.<job id>.tmp/` (hidden, so watchers that skip dot-files never see it). Its
   name is fixed, so an interrupted attempt **resumes**: a file already there with its full
   size is not sent again (the server writes each file's requests in order, so a file of full
   size was written whole). Files are streamed in pipelined 32 KiB writes, and the status
   of every write is read before the next file (paramiko alone drops those: `_confirm_writes`);
5. check every file's size in one listing per folder, then rename the temporary folder to
   `<path>/<job id>` (posix-rename@openssh.com where the server has it, else SFTP rename).

`<path>` itself is never created: a missing folder is a configuration (or mount) problem on
the server that the admin must see. Uploaded files and folders get the server's default modes
(its umask decides who may read them there).

How failures settle (an `Attempt`, never an exception, except errors reading the job itself):

- no TCP connection or no SSH banner: `unreachable` (nothing was done);
- the host key is unknown or changed, authentication is refused, or the key or password
  cannot be read: also `unreachable`, not permanent. They are the target's failures, not the
  job's: every job of the target would fail the same way, so dispatch leaves the others alone
  until the retry, and once the admin fixes `known_hosts` (or the key) the jobs go out without
  a resend. The message says what to fix, names host and key fingerprint, never a secret;
- permission denied, missing folder, full disk, a dropped connection or a timeout: an error
  naming the remote path, retried with the target's backoff.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from stat import S_ISDIR
from typing import TypeVar

import paramiko
from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY

from mercli.dispatch.targets.base import Attempt
from mercli.dispatch.targets.folder import TargetError, check_job_id
from mercli.jobs import JobInfo, Progress, Target
from mercli.secrets import SecretError, read_secret
from mercli.spool import INSTANCE_SUFFIX, SIDECAR_SUFFIX, NotRegularFile, open_regular

CHUNK = 1024 * 1024  # local read size; paramiko splits it into pipelined 32 KiB requests
STATVFS = "statvfs@openssh.com"
T = TypeVar("T")
log = logging.getLogger(__name__)
_RSA_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256")}


class Unusable(TargetError):
    """The target cannot be used as configured (unreachable, host key, auth, secrets)."""


class RemoteError(TargetError):
    """An SFTP operation failed; the message names the remote path."""


@dataclass(frozen=True)
class Upload:
    """One job file: its local path and its name below the job's remote folder."""

    local: Path
    name: str  # "NAME.dcm" or, in a study job, "<series>/NAME.dcm"
    size: int


def deliver(folder: Path, job: JobInfo, progress: Progress) -> Attempt:
    """Deliver the job's instances and sidecars as `<path>/<job id>/` (all or nothing).

    `progress` stays as it is: what the server already has is read from the server itself
    (the temporary folder), which is right even when dispatch.json is not."""
    try:
        check_job_id(job.name)
        uploads = _job_files(folder, job.series)
        with connect(job.target) as sftp:
            upload_job(sftp, uploads, PurePosixPath(str(job.target.path or ".")), job.name)
    except NotRegularFile as exc:  # dispatch checks first; this is the race-free second look
        return Attempt(
            error=f"job file {Path(str(exc.filename)).name}: {exc.strerror}", permanent=True
        )
    except Unusable as exc:
        return Attempt(error=str(exc), unreachable=True)
    except TargetError as exc:
        return Attempt(error=str(exc))
    return Attempt(delivered=sum(u.name.endswith(INSTANCE_SUFFIX) for u in uploads))


def _job_files(folder: Path, series: Sequence[str]) -> list[Upload]:
    """The job's .dcm and .tags files with their remote names, series sub-folders kept."""
    found = []
    for sub in series or [""]:
        for path in sorted((folder / sub).iterdir()):
            if path.suffix in (INSTANCE_SUFFIX, SIDECAR_SUFFIX):
                name = f"{sub}/{path.name}" if sub else path.name
                found.append(Upload(path, name, path.lstat().st_size))
    return found


# -- the connection --------------------------------------------------------------------------


@contextmanager
def connect(target: Target) -> Iterator[paramiko.SFTPClient]:
    """An SFTP session to the target, its host key checked, authenticated; closed on exit."""
    assert target.host is not None and target.user is not None and target.known_hosts
    where = _host_name(target.host, target.port or 22)
    credentials = _credentials(target)  # before connecting: a missing secret costs no login
    transport = _open_transport(target.host, target.port or 22, target.timeout, where)
    try:
        _check_host_key(transport, Path(target.known_hosts), where, target.timeout)
        _authenticate(transport, target, credentials, where)
        yield _open_sftp(transport, target.timeout, where)
    finally:
        transport.close()


def _host_name(host: str, port: int) -> str:
    """The host as known_hosts names it: `host`, or `[host]:port` off port 22."""
    return host if port == 22 else f"[{host}]:{port}"


@dataclass(frozen=True)
class _Credentials:
    key: paramiko.PKey | None
    password: str | None = field(repr=False)  # never logged, never in a message or a repr


def _credentials(target: Target) -> _Credentials:
    key = None
    if target.key_file:
        try:
            key = paramiko.PKey.from_path(target.key_file)
        except (paramiko.PasswordRequiredException, TypeError):  # cryptography's: encrypted
            raise Unusable(
                f"key_file {target.key_file} is protected by a passphrase: dispatch runs "
                "unattended, give it a key without one"
            ) from None
        except (OSError, paramiko.SSHException, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise Unusable(f"cannot load key_file {target.key_file}: {reason}") from None
    reference = target.password or target.password_file
    what = f'target "{target.name}" password'
    try:
        password = read_secret(reference, what) if reference else None
    except SecretError as exc:
        raise Unusable(str(exc)) from None
    return _Credentials(key, password)


def _open_transport(host: str, port: int, timeout: float, where: str) -> paramiko.Transport:
    """TCP connect and SSH banner; Unusable (unreachable) if either does not happen in time."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise Unusable(f"cannot connect to sftp server {where}: {_why(exc)}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    transport.banner_timeout = transport.handshake_timeout = timeout
    transport.auth_timeout = transport.channel_timeout = timeout
    return transport


def _check_host_key(transport: paramiko.Transport, known: Path, where: str, timeout: float) -> None:
    """Key exchange, then the server's key must be the one `known` lists for it."""
    try:
        keys = paramiko.HostKeys(str(known))
    except (OSError, ValueError, paramiko.SSHException) as exc:
        raise Unusable(f"cannot read known_hosts {known}: {_why(exc)}") from None
    listed = keys.lookup(where) or {}
    _prefer_known_key_types(transport, listed)
    try:
        transport.start_client(timeout=timeout)
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise Unusable(f"no SSH session with {where}: {_why(exc)}") from None
    if not transport.is_active() or transport.host_key is None:  # start_client's timeout
        raise Unusable(f"no SSH session with {where}: timed out after {timeout:g} s")
    offered = transport.get_remote_server_key()
    kind, fingerprint = offered.get_name(), offered.fingerprint
    expected = listed.get(kind)
    if expected is None:
        raise Unusable(
            f"host key of {where} is not in known_hosts {known}: the server offers {kind} "
            f"{fingerprint}; if that is its key, add it (ssh-keyscan, see README)"
        )
    if expected != offered:
        raise Unusable(
            f"host key of {where} does NOT match known_hosts {known}: the server offers "
            f"{kind} {fingerprint}, known_hosts has {expected.fingerprint} (a reinstalled "
            "server, or someone in between); nothing was sent"
        )


def _prefer_known_key_types(transport: paramiko.Transport, listed: Iterable[str]) -> None:
    """Ask for a key type known_hosts has for this host first, as OpenSSH does: a server with
    both an RSA and an ed25519 key must not look "unknown" because we preferred the other.
    An "ssh-rsa" entry stands for RSA keys signed with SHA-2 first (SHA-1 last, as before)."""
    options = transport.get_security_options()
    wanted = [t for name in listed for t in _RSA_ALGORITHMS.get(name, (name,))]
    first = [t for t in wanted if t in options.key_types]
    options.key_types = first + [t for t in options.key_types if t not in first]


def _authenticate(
    transport: paramiko.Transport, target: Target, credentials: _Credentials, where: str
) -> None:
    """The key, then the password, as the target gives them (both, for a server that asks
    for both: a partial success goes on to the next method)."""
    user = target.user or ""
    methods: list[tuple[str, Callable[[], object]]] = []
    if credentials.key is not None:
        methods.append(
            (f"key {target.key_file}", partial(transport.auth_publickey, user, credentials.key))
        )
    if credentials.password is not None:
        password = partial(transport.auth_password, user, credentials.password, fallback=False)
        methods.append(("password", password))
    refused = []
    for label, method in methods:
        try:
            method()
        except paramiko.BadAuthenticationType as exc:
            refused.append(f"{label} not allowed, only {', '.join(exc.allowed_types) or 'none'}")
        except paramiko.AuthenticationException:
            refused.append(f"{label} not accepted")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise Unusable(f"authentication as {user} at {where} failed: {_why(exc)}") from None
        if transport.is_authenticated():
            return
    raise Unusable(f"authentication as {user} at {where} refused: {'; '.join(refused)}")


def _open_sftp(transport: paramiko.Transport, timeout: float, where: str) -> paramiko.SFTPClient:
    """The sftp subsystem; paramiko waits for its reply without a timeout, so a watchdog
    closes the connection if the server does not answer in time."""
    watchdog = threading.Timer(timeout, transport.close)
    watchdog.start()
    try:
        channel = transport.open_session(timeout=timeout)
        channel.settimeout(timeout)  # every later SFTP request and write waits at most this
        channel.invoke_subsystem("sftp")
        return paramiko.SFTPClient(channel)
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise Unusable(f"no sftp subsystem at {where}: {_why(exc)}") from None
    finally:
        watchdog.cancel()


# -- the upload ------------------------------------------------------------------------------


def upload_job(
    sftp: paramiko.SFTPClient, uploads: Sequence[Upload], base: PurePosixPath, job_id: str
) -> PurePosixPath:
    """Publish `uploads` as `base/job_id/` through the temporary folder; returns that folder."""
    final, temporary = base / job_id, base / f".{job_id}.tmp"
    kind = _kind(sftp, base)
    if kind is None:
        raise RemoteError(f"remote folder {base} does not exist (create it on the server)")
    if kind != "dir":
        raise RemoteError(f"remote path {base} is not a folder")
    if _delivered(_kind(sftp, final), final):
        return final
    present = _prepare(sftp, temporary, {str(PurePosixPath(u.name).parent) for u in uploads})
    resumed = sum(present.get(u.name) == u.size for u in uploads)
    if resumed:
        log.info("%s: resuming, %d of %d file(s) already there", temporary, resumed, len(uploads))
    for upload in uploads:
        if present.get(upload.name) != upload.size:
            _send(sftp, upload, temporary / upload.name)
    missing = _short_files(sftp, temporary, uploads)
    if missing:
        raise RemoteError(f"{temporary / missing[0]} does not have its full size after upload")
    _rename(sftp, temporary, final)
    return final


def _kind(sftp: paramiko.SFTPClient, path: PurePosixPath) -> str | None:
    """'dir', 'other', or None if nothing is there."""
    attrs = _remote(sftp, path, lambda: sftp.lstat(str(path)), missing_ok=True)
    if attrs is None:
        return None
    return "dir" if S_ISDIR(attrs.st_mode or 0) else "other"


def _delivered(kind: str | None, final: PurePosixPath) -> bool:
    """Whether the job's final folder is there already (`kind` as `_kind` says)."""
    if kind not in (None, "dir"):
        raise RemoteError(f"{final} exists and is not a folder mercli delivered")
    return kind == "dir"


def _prepare(
    sftp: paramiko.SFTPClient, temporary: PurePosixPath, subfolders: set[str]
) -> dict[str, int]:
    """Create the temporary folder (and series sub-folders) unless an earlier attempt did;
    the sizes of the files already in them, by name below `temporary`."""
    present: dict[str, int] = {}
    for sub in [".", *sorted(subfolders - {"."})]:
        folder = temporary if sub == "." else temporary / sub
        kind = _kind(sftp, folder)
        if kind is None:
            _remote(sftp, folder, partial(sftp.mkdir, str(folder)))
            continue
        if kind != "dir":
            raise RemoteError(f"{folder} is in the way of the upload and is not a folder")
        for name, size in _sizes(sftp, folder).items():
            present[name if sub == "." else f"{sub}/{name}"] = size
    return present


def _sizes(sftp: paramiko.SFTPClient, folder: PurePosixPath) -> dict[str, int]:
    """Regular files in a remote folder and their sizes, in one listing."""
    listing = _remote(sftp, folder, lambda: sftp.listdir_attr(str(folder)))
    return {
        a.filename: a.st_size or 0 for a in listing or [] if a.st_mode and not S_ISDIR(a.st_mode)
    }


def _short_files(
    sftp: paramiko.SFTPClient, temporary: PurePosixPath, uploads: Sequence[Upload]
) -> list[str]:
    """Files whose remote size is not their local size (a listing per folder, not a stat
    per file: over a WAN a round trip per file would cost more than the pixels)."""
    folders = {str(PurePosixPath(u.name).parent) for u in uploads}
    sizes: dict[str, int] = {}
    for sub in folders:
        for name, size in _sizes(sftp, temporary / sub).items():
            sizes[name if sub == "." else f"{sub}/{name}"] = size
    return [u.name for u in uploads if sizes.get(u.name) != u.size]


def _send(sftp: paramiko.SFTPClient, upload: Upload, remote: PurePosixPath) -> None:
    """Stream one file (never through a symlink) in pipelined writes; wait for every ack."""
    reader = open_regular(upload.local)
    with os.fdopen(reader, "rb", buffering=0) as source:

        def write() -> None:
            with sftp.open(str(remote), "wb") as sink:
                sink.set_pipelined(True)
                while chunk := source.read(CHUNK):
                    sink.write(chunk)
                sink.flush()
                _confirm_writes(sftp, sink)

        _remote(sftp, remote, write, size=upload.size)


def _confirm_writes(sftp: paramiko.SFTPClient, sink: paramiko.SFTPFile) -> None:
    """Wait for the status of every pipelined write, raising the first failure.

    paramiko files a pipelined write's reply under no file: close() neither waits for it nor
    reports its error, so a full disk left a short file behind and no exception (seen with
    OpenSSH on a full tmpfs). The request ids wait in `sink._reqs`, as paramiko's own
    unpipelined path reads them; the size check before the rename stays as a second guard.
    """
    pending = getattr(sink, "_reqs", None)
    while pending:
        sftp._read_response(pending.popleft())  # raises IOError for a failed write


def _rename(sftp: paramiko.SFTPClient, temporary: PurePosixPath, final: PurePosixPath) -> None:
    """posix-rename@openssh.com, or plain SFTP rename on servers without it (they answer a
    bare failure, as they do when `final` appeared meanwhile: then it is delivered)."""
    try:
        sftp.posix_rename(str(temporary), str(final))
        return
    except OSError as exc:
        if exc.errno is not None:  # ENOENT or EACCES: a real answer, not "unsupported"
            raise RemoteError(_reason(exc, temporary)) from None
    except (EOFError, paramiko.SSHException) as exc:
        raise RemoteError(_reason(exc, temporary)) from None
    if _delivered(_kind(sftp, final), final):
        return
    _remote(sftp, temporary, lambda: sftp.rename(str(temporary), str(final)))


def _remote(
    sftp: paramiko.SFTPClient,
    path: PurePosixPath,
    operation: Callable[[], T],
    *,
    missing_ok: bool = False,
    size: int = 0,
) -> T | None:
    """Run one SFTP operation; RemoteError naming `path` if it fails (None for a missing
    path with `missing_ok`)."""
    try:
        return operation()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise RemoteError(f"sftp: no such file or folder ({path})") from None
    except OSError as exc:
        if exc.errno == errno.ENOENT and missing_ok:
            return None
        raise RemoteError(_explain(sftp, exc, path, size)) from None
    except (EOFError, paramiko.SSHException) as exc:
        raise RemoteError(_reason(exc, path)) from None


def _explain(sftp: paramiko.SFTPClient, exc: OSError, path: PurePosixPath, size: int) -> str:
    """The reason for a failed operation; a bare "Failure" while writing `size` bytes is a
    full disk if the server says it has less room than that."""
    bare = exc.errno is None and not isinstance(exc, TimeoutError)
    if bare and size and _full(sftp, path, size):
        return f"sftp: no space left on the server ({path})"
    return _reason(exc, path)


def _full(sftp: paramiko.SFTPClient, path: PurePosixPath, size: int) -> bool:
    """Whether the server's filesystem at `path` has less than `size` bytes free: SFTP v3
    reports ENOSPC as a bare "Failure", so ask OpenSSH's statvfs extension why."""
    try:
        kind, message = sftp._request(CMD_EXTENDED, STATVFS, str(path.parent))
        if kind != CMD_EXTENDED_REPLY:
            return False
        _bsize, frsize, _blocks, _bfree, bavail = (message.get_int64() for _ in range(5))
    except (OSError, EOFError, paramiko.SSHException):
        return False
    return bool(frsize * bavail < size)


def _reason(exc: BaseException, path: PurePosixPath) -> str:
    what = {
        errno.ENOENT: "no such file or folder",
        errno.EACCES: "permission denied",
    }.get(getattr(exc, "errno", None) or 0)
    if what is None:
        what = _why(exc)
    return f"sftp: {what} ({path})"


def _why(exc: BaseException) -> str:
    """A short reason for a network or protocol error (never carries a secret: paramiko's
    messages are about the connection, and ours never include one)."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, EOFError) or (isinstance(exc, paramiko.SSHException) and not str(exc)):
        return "the server closed the connection"
    text = str(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).rstrip(".")
    if isinstance(exc.__cause__ or exc.__context__, TimeoutError):
        return f"{text} (timed out)"  # paramiko's banner error hides its timeout there
    return text
