"""Orthanc (Debian `orthanc`) as a real peer: started per test on free ports with a temp config."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.netkit import DCMTK_ENV, free_port, port_open, wait_until


class Orthanc:
    """A running Orthanc; `get` talks to its REST API."""

    def __init__(
        self, folder: Path, aet: str = "ORTHANC", config: Mapping[str, Any] | None = None
    ) -> None:
        self.folder = folder
        self.aet = aet
        self.extra = dict(config or {})  # merged over the defaults (plugins, TLS, users...)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "mercli-test",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "StorageCompression": False,
            "Plugins": [],
            **self.extra,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        self.log = (self.folder / "orthanc.log").open("wb")
        # Orthanc's DICOM side is DCMTK: without TCP_NODELAY=1 every C-STORE answer waits on
        # Nagle (~50 ms an instance over loopback), whatever environment the caller has.
        self.process = subprocess.Popen(
            ["Orthanc", str(self.folder / "orthanc.json")],
            stdout=self.log,
            stderr=self.log,
            env=DCMTK_ENV,
        )
        wait_until(lambda: port_open(self.http_port) and port_open(self.dicom_port), what="Orthanc")
        return self

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def sop_instance_uids(self) -> set[str]:
        """Every SOP Instance UID stored (main DICOM tags of each instance)."""
        found = set()
        for instance in self.get("/instances?expand"):
            found.add(instance["MainDicomTags"]["SOPInstanceUID"])
        return found

    def file_of(self, sop_instance_uid: str) -> bytes:
        (hit,) = [h for h in self.get_lookup(sop_instance_uid) if h["Type"] == "Instance"]
        data = self.get(f"/instances/{hit['ID']}/file")
        assert isinstance(data, bytes)
        return data

    def get_lookup(self, value: str) -> list[dict[str, Any]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/tools/lookup", data=value.encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            result: list[dict[str, Any]] = json.loads(response.read())
        return result

    def get_as(self, path: str, user: str, password: str) -> Any:
        """`get` with HTTP basic credentials, for an Orthanc with AuthenticationEnabled."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def sha256_of(self, sop_instance_uid: str) -> str:
        """SHA-256 of a stored instance's file, streamed (instances of hundreds of MB)."""
        (hit,) = [h for h in self.get_lookup(sop_instance_uid) if h["Type"] == "Instance"]
        digest = hashlib.sha256()
        url = f"http://127.0.0.1:{self.http_port}/instances/{hit['ID']}/file"
        with urllib.request.urlopen(url, timeout=120) as response:
            while chunk := response.read(1024 * 1024):
                digest.update(chunk)
        return digest.hexdigest()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self.log.close()


@contextmanager
def orthanc(
    folder: Path, aet: str = "ORTHANC", config: Mapping[str, Any] | None = None
) -> Iterator[Orthanc]:
    running = Orthanc(folder, aet, config).start()
    try:
        yield running
    finally:
        running.stop()
