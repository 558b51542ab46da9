"""A real OpenSSH sshd on loopback for SFTP target tests: keys, known_hosts and a throwaway
user made in a temporary folder, the daemon on a free port, stopped and cleaned up after.

A missing sshd or ssh-keygen fails the test with what to install; nothing here skips.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netkit import free_port, port_open, wait_until

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """A passphrase-less key pair at `path` and `path`.pub; returns the private key's path."""
    tool = shutil.which("ssh-keygen")
    if tool is None:
        pytest.fail("ssh-keygen is missing: apt-get install openssh-client")
    subprocess.run(
        [tool, "-q", "-t", kind, "-N", "", "-C", "mercli-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


def public_key(private: Path) -> str:
    """`type base64` of a key pair's public half (no comment)."""
    return " ".join(private.with_name(private.name + ".pub").read_text().split()[:2])


CONFIG = """\
ListenAddress 127.0.0.1
HostKey {root}/host_ed25519
AuthorizedKeysFile {root}/authorized_keys
PidFile {root}/sshd.pid
UsePAM no
StrictModes no
PermitRootLogin yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
LogLevel VERBOSE
{extra}
"""


@dataclass
class Sshd:
    """`sshd -D -e` with its own host key, authorized_keys and config, all under `root`."""

    root: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # a throwaway user's sshd child reads authorized_keys here
        self.port = self.port or free_port()
        self.host_key = keygen(self.root / "host_ed25519")
        self.client_key = keygen(self.root / "client_ed25519")
        (self.root / "authorized_keys").write_text(public_key(self.client_key) + "\n")
        (self.root / "authorized_keys").chmod(0o644)
        self.known_hosts = self.root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {public_key(self.host_key)}\n")
        self.log = self.root / "sshd.log"

    def start(self, extra: str = "", wrapper: Sequence[str] = ()) -> Sshd:
        """Start the daemon (under `wrapper`, e.g. unshare, if given) and wait for its port."""
        if not SSHD.is_file():
            pytest.fail(f"{SSHD} is missing: apt-get install openssh-server")
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        config = self.root / "sshd_config"
        config.write_text(CONFIG.format(root=self.root, extra=extra))
        command = [*wrapper, str(SSHD), "-D", "-e", "-f", str(config), "-p", str(self.port)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"sshd exited with {process.returncode}:\n{self.log.read_text()}")
            return port_open(self.port)

        wait_until(ready, timeout=20, what=f"sshd on port {self.port}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


@dataclass
class ThrowawayUser:
    """A local user with a known password, for password logins; removed by `remove`."""

    name: str
    password: str

    @classmethod
    def create(cls) -> ThrowawayUser:
        name = f"mercli-t{secrets.token_hex(4)}"
        password = f"pw-{secrets.token_urlsafe(12)}"
        for tool in ("useradd", "chpasswd", "userdel"):
            if shutil.which(tool) is None:
                pytest.fail(f"{tool} is missing: apt-get install passwd")
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/bin/sh", name],
            check=True,
            capture_output=True,
            timeout=30,
        )
        user = cls(name, password)
        try:
            subprocess.run(
                ["chpasswd"],
                input=f"{name}:{password}\n".encode(),
                check=True,
                capture_output=True,
                timeout=30,
            )
        except BaseException:
            user.remove()
            raise
        return user

    def remove(self) -> None:
        """userdel, once sshd's session processes of the user have gone (it refuses while
        the user runs anything: exit 8); forced after a deadline."""

        def deleted() -> bool:
            run = subprocess.run(["userdel", self.name], capture_output=True, timeout=30)
            return run.returncode == 0

        try:
            wait_until(deleted, timeout=10, what=f"userdel {self.name}")
        except AssertionError:
            subprocess.run(
                ["userdel", "-f", self.name], check=True, capture_output=True, timeout=30
            )


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (sshd's per-connection children), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found
