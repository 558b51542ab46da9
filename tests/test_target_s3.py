"""`s3` targets against moto's S3 emulator (`moto_server`, a subprocess on loopback).

moto stands in for AWS, MinIO or Ceph: the client goes over real TCP, with real SigV4
signatures, which this emulator checks (it runs with IAM authentication enforced, so wrong
keys are refused as by a real store). The server's request log (one line per request, in the
order it answered them) shows what was sent, and in which order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from mercli.dispatch.targets import DELIVER, s3
from mercli.jobs import JobInfo, Progress, Target
from mercli.spool import SUCCESS, Spool
from tests.certs import make_pki
from tests.netkit import free_port, port_open, wait_until
from tests.test_dispatch import dispatch_once, routed, rules_for

try:
    import boto3
    from botocore.exceptions import ClientError
except ImportError as exc:  # boto3 is a dependency: never skip, say what is missing
    raise RuntimeError("boto3 is missing: run `make setup` (pip install -e '.[test]')") from exc

MIB = 1024 * 1024
ALL_S3 = {"Effect": "Allow", "Action": "*", "Resource": "*"}
PUT_ONLY = {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": "*"}


@dataclass
class Emulator:
    """A running moto_server: its endpoint, an admin client, keys, and its request log."""

    endpoint: str
    log: Path
    admin: Any
    keys: dict[str, tuple[str, str]]  # user -> (access key id, secret)

    def requests(self, bucket: str) -> list[str]:
        """`METHOD /path?query` of each request on `bucket`, in the order they were answered."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if f" /{bucket}/" in line and '"' in line:
                method, path = line.split('"')[1].split()[:2]
                found.append(f"{method} {path}")
        return found


def _moto_server() -> str:
    found = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("moto_server is missing: install the test extra (pip install -e '.[test]')")
    return found


@contextmanager
def moto_server(folder: Path, *args: str, auth: bool = False) -> Iterator[tuple[int, Path]]:
    """Run moto_server on a free loopback port; (port, its request log). With `auth`, the
    first three requests may be unsigned (they make the admin user), every later one not."""
    port, log = free_port(), folder / "requests.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    with log.open("wb") as out:
        command = [_moto_server(), "-H", "127.0.0.1", "-p", str(port), *args]
        server = subprocess.Popen(command, stdout=out, stderr=out, env=env)
    try:
        wait_until(lambda: port_open(port) or server.poll() is not None, 30, "moto_server")
        if server.poll() is not None:
            pytest.fail(f"moto_server exited: {log.read_text()[-2000:]}")
        yield port, log
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="session")
def s3_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """moto's S3 emulator with IAM auth on: users "admin" (may do anything) and "writer"
    (may only PutObject); requests must be signed with their keys."""
    with moto_server(tmp_path_factory.mktemp("moto"), auth=True) as (port, log):
        endpoint = f"http://127.0.0.1:{port}"
        keys = {"admin": _user(endpoint, ("x", "y"), "admin", ALL_S3)}
        keys["writer"] = _user(endpoint, keys["admin"], "writer", PUT_ONLY)
        yield Emulator(endpoint, log, _client(endpoint, keys["admin"]), keys)


def _client(
    endpoint: str, keys: tuple[str, str], service: str = "s3", verify: str | None = None
) -> Any:
    return boto3.client(
        service,
        verify=verify,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=keys[0],
        aws_secret_access_key=keys[1],
    )


def _user(
    endpoint: str, keys: tuple[str, str], name: str, policy: dict[str, Any]
) -> tuple[str, str]:
    iam = _client(endpoint, keys, "iam")
    iam.create_user(UserName=name)
    made = iam.create_access_key(UserName=name)["AccessKey"]
    document = json.dumps({"Version": "2012-10-17", "Statement": [policy]})
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=document)
    return str(made["AccessKeyId"]), str(made["SecretAccessKey"])


@pytest.fixture
def bucket(s3_emulator: Emulator, request: pytest.FixtureRequest) -> str:
    name = "t-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:20]
    s3_emulator.admin.create_bucket(Bucket=name)
    return name


def credentials(
    folder: Path, keys: tuple[str, str], section: str = "default", name: str = "s3.ini"
) -> Path:
    path = folder / name
    path.write_text(
        f"[{section}]\naws_access_key_id = {keys[0]}\naws_secret_access_key = {keys[1]}\n"
    )
    path.chmod(0o600)
    return path


def s3_target(
    emulator: Emulator, bucket: str, folder: Path, user: str = "admin", **extra: Any
) -> Target:
    values: dict[str, Any] = {
        "name": "lake",
        "type": "s3",
        "bucket": bucket,
        "prefix": "router/",
        "endpoint_url": emulator.endpoint,
        "region": "us-east-1",
        "credentials_file": str(credentials(folder, emulator.keys[user])),
        "timeout": 10.0,
    }
    return Target(**(values | extra))


STUDY = "1.2.826.0.1.3680043.8.498.1"


def job_folder(
    folder: Path, series: str, sizes: list[int], sops: list[str] | None = None
) -> dict[str, Path]:
    """Instances NAME.dcm with sidecars NAME.tags (UIDs, and a patient name that must never
    reach the bucket's manifests); returns SOP UID -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for n, size in enumerate(sizes):
        sop = sops[n] if sops else f"{series}.{n + 1}"
        path = folder / f"i{n:04d}.dcm"
        path.write_bytes(
            hashlib.sha256(sop.encode()).digest() * (size // 32) + b"\x01" * (size % 32)
        )
        tags = {"StudyInstanceUID": STUDY, "SeriesInstanceUID": series, "SOPInstanceUID": sop}
        tags |= {"PatientName": "Doe^Jane", "PatientID": "SECRET-PID", "InstanceNumber": n}
        path.with_suffix(".tags").write_text(json.dumps(tags))
        made[sop] = path
    return made


def job_for(target: Target, series: tuple[str, ...] = ()) -> JobInfo:
    return JobInfo("job-1", target, STUDY, "2026-11-30T00:00:00+00:00", 0.0, series=series)


def objects(emulator: Emulator, bucket: str) -> dict[str, bytes]:
    listed = emulator.admin.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {
        o["Key"]: emulator.admin.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listed
    }


def manifest(emulator: Emulator, bucket: str, series: str) -> dict[str, Any]:
    key = f"router/{STUDY}/{series}/.complete.json"
    return dict(json.loads(emulator.admin.get_object(Bucket=bucket, Key=key)["Body"].read()))


def writes(requests: list[str]) -> list[str]:
    return [r for r in requests if r.startswith(("PUT ", "POST "))]


def instance_puts(requests: list[str]) -> list[str]:
    return [r for r in requests if r.startswith(("PUT ", "POST ")) and ".complete.json" not in r]


# -- keys, bytes, manifest -------------------------------------------------------------------


def test_s3_emulator_keys_bytes_and_manifest_written_last(
    s3_emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    hostile = "1.2.3/../../etc\nx"  # not a UID: becomes a hashed, harmless key part
    files = job_folder(
        tmp_path / "job", "1.2.3.4", [3000] * 5, [f"1.2.3.4.{n}" for n in range(4)] + [hostile]
    )
    target = s3_target(s3_emulator, bucket, tmp_path)
    progress = Progress()
    result = s3.deliver(tmp_path / "job", job_for(target), progress)
    assert result.ok and result.delivered == 5, result
    assert sorted(progress.delivered) == [f"i{n:04d}" for n in range(5)]
    stored = objects(s3_emulator, bucket)
    hashed = "x" + hashlib.sha256(hostile.encode()).hexdigest()[:40]
    expected = {
        f"router/{STUDY}/1.2.3.4/{sop}.dcm": path for sop, path in files.items() if sop != hostile
    }
    expected[f"router/{STUDY}/1.2.3.4/{hashed}.dcm"] = files[hostile]
    assert set(stored) == set(expected) | {f"router/{STUDY}/1.2.3.4/.complete.json"}
    for key, path in expected.items():
        assert stored[key] == path.read_bytes()
        head = s3_emulator.admin.head_object(Bucket=bucket, Key=key)
        assert head["ContentType"] == "application/dicom"
    document = manifest(s3_emulator, bucket, "1.2.3.4")
    assert document["job"] == "job-1" and document["count"] == 5
    assert {i["key"]: i["size"] for i in document["instances"]} == {k: 3000 for k in expected}
    assert {i["SOPInstanceUID"] for i in document["instances"]} == set(files)
    text = json.dumps(document)
    assert "Doe" not in text and "SECRET-PID" not in text
    requests = writes(s3_emulator.requests(bucket))
    assert requests[-1] == f"PUT /{bucket}/router/{STUDY}/1.2.3.4/.complete.json"
    assert len(instance_puts(requests)) == 5  # each instance once, all before the manifest


def test_s3_emulator_failed_attempt_leaves_no_manifest_and_retry_sends_the_rest(
    s3_emulator: Emulator, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_folder(tmp_path / "job", "1.2.5", [2000] * 6)
    target = s3_target(s3_emulator, bucket, tmp_path)
    real = s3.make_client

    def failing_client(target: Target) -> Any:
        """The real client, whose PUT of one instance fails before it reaches the store."""
        client = real(target)

        def refuse(request: Any, **_: Any) -> None:
            if request.url.endswith("/1.2.5.3.dcm"):
                raise ClientError(
                    {"Error": {"Code": "InternalError", "Message": "injected"}}, "PutObject"
                )

        client.meta.events.register("before-send.s3.PutObject", refuse)
        return client

    monkeypatch.setattr(s3, "make_client", failing_client)
    progress = Progress()
    first = s3.deliver(tmp_path / "job", job_for(target), progress)
    assert not first.ok and not first.permanent and not first.unreachable
    assert "InternalError" in first.error and "1.2.5.3.dcm" in first.error
    assert first.delivered == 5 and "i0002" not in progress.delivered
    assert not any(
        k.endswith(".complete.json") for k in objects(s3_emulator, bucket)
    )  # no manifest
    monkeypatch.setattr(s3, "make_client", real)
    before = len(s3_emulator.requests(bucket))
    second = s3.deliver(tmp_path / "job", job_for(target), progress)
    assert second.ok and second.delivered == 1
    retry = s3_emulator.requests(bucket)[before:]
    assert instance_puts(retry) == [f"PUT /{bucket}/router/{STUDY}/1.2.5/1.2.5.3.dcm"]
    assert writes(retry)[-1].endswith("/.complete.json")
    assert manifest(s3_emulator, bucket, "1.2.5")["count"] == 6


def test_s3_emulator_objects_already_there_are_skipped_only_when_identical(
    s3_emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    """An attempt killed before dispatch saved its progress: the next one lists the series
    and sends only what the bucket does not hold byte for byte."""
    files = job_folder(tmp_path / "job", "1.2.6", [4000] * 4)
    target = s3_target(s3_emulator, bucket, tmp_path)
    assert s3.deliver(tmp_path / "job", job_for(target), Progress()).ok
    changed = files["1.2.6.2"]
    changed.write_bytes(b"\x00" * 4000)  # same size, other bytes: must go again
    before = len(s3_emulator.requests(bucket))
    progress = Progress()  # the record of the first attempt is lost
    assert s3.deliver(tmp_path / "job", job_for(target), progress).ok
    assert len(progress.delivered) == 4
    assert instance_puts(s3_emulator.requests(bucket)[before:]) == [
        f"PUT /{bucket}/router/{STUDY}/1.2.6/1.2.6.2.dcm"
    ]
    assert objects(s3_emulator, bucket)[f"router/{STUDY}/1.2.6/1.2.6.2.dcm"] == b"\x00" * 4000


def test_s3_emulator_multipart_upload_for_a_100_mb_instance(
    s3_emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    files = job_folder(tmp_path / "job", "1.2.7", [100 * MIB + 5, 1000])
    target = s3_target(s3_emulator, bucket, tmp_path)
    assert s3.deliver(tmp_path / "job", job_for(target), Progress()).ok
    key = f"router/{STUDY}/1.2.7/1.2.7.1.dcm"
    head = s3_emulator.admin.head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-7")  # 16 MiB parts
    assert head["ContentType"] == "application/dicom"
    body = s3_emulator.admin.get_object(Bucket=bucket, Key=key)["Body"]
    digest = hashlib.sha256()
    for chunk in iter(lambda: body.read(MIB), b""):
        digest.update(chunk)
    assert digest.digest() == hashlib.sha256(files["1.2.7.1"].read_bytes()).digest()
    parts = [r for r in s3_emulator.requests(bucket) if "partNumber=" in r]
    assert len(parts) == 7
    before = len(s3_emulator.requests(bucket))
    assert s3.deliver(tmp_path / "job", job_for(target), Progress()).ok  # multipart ETag matched
    assert instance_puts(s3_emulator.requests(bucket)[before:]) == []


def test_s3_emulator_study_job_uploads_every_series_before_any_manifest(
    s3_emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    job = tmp_path / "job"
    first = job_folder(job / "1.2.8.1", "1.2.8.1", [1500] * 3)
    second = job_folder(job / "1.2.8.2", "1.2.8.2", [2500] * 2)
    target = s3_target(s3_emulator, bucket, tmp_path)
    progress = Progress()
    result = s3.deliver(job, job_for(target, ("1.2.8.1", "1.2.8.2")), progress)
    assert result.ok and result.delivered == 5
    assert sorted(progress.delivered) == [
        "1.2.8.1/i0000",
        "1.2.8.1/i0001",
        "1.2.8.1/i0002",
        "1.2.8.2/i0000",
        "1.2.8.2/i0001",
    ]
    stored = objects(s3_emulator, bucket)
    for series, files in (("1.2.8.1", first), ("1.2.8.2", second)):
        for sop, path in files.items():
            assert stored[f"router/{STUDY}/{series}/{sop}.dcm"] == path.read_bytes()
        document = manifest(s3_emulator, bucket, series)
        assert document["count"] == len(files)
        assert document["job_series"] == [f"router/{STUDY}/1.2.8.1/", f"router/{STUDY}/1.2.8.2/"]
    requests = s3_emulator.requests(bucket)
    assert [r.endswith(".complete.json") for r in requests if r.startswith("PUT")] == [
        False
    ] * 5 + [True] * 2


# -- credentials, errors ----------------------------------------------------------------------


def test_s3_emulator_wrong_keys_give_a_clear_error_without_the_secret(
    s3_emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    job_folder(tmp_path / "job", "1.2.9", [1000] * 2)
    good = s3_target(s3_emulator, bucket, tmp_path)
    key_id, secret = s3_emulator.keys["admin"]
    cases = {
        "the secret key does not match": (key_id, "WRONG-SECRET-value-42"),
        "access key id is not known": ("AKIAIOSFODNN7UNKNOWN", "OTHER-SECRET-value-43"),
    }
    for number, (expected, keys) in enumerate(cases.items()):
        wrong = credentials(tmp_path, keys, name=f"wrong{number}.ini")
        target = replace(good, credentials_file=str(wrong))
        result = s3.deliver(tmp_path / "job", job_for(target), Progress())
        assert expected in result.error, result
        assert result.unreachable and not result.permanent  # the target refuses: retried later
        assert keys[1] not in result.error and keys[0] not in result.error
    missing = replace(good, bucket="no-such-bucket-here")
    result = s3.deliver(tmp_path / "job", job_for(missing), Progress())
    assert "bucket no-such-bucket-here does not exist" in result.error and result.unreachable
    assert objects(s3_emulator, bucket) == {}
    (tmp_path / "bad.ini").write_text(f"aws_secret_access_key = {secret}\n")
    broken = replace(good, credentials_file=str(tmp_path / "bad.ini"))
    result = s3.deliver(tmp_path / "job", job_for(broken), Progress())
    assert (
        result.error.endswith(f"{tmp_path / 'bad.ini'} is not an ini file")
        and secret not in result.error
    )
    profile = replace(
        good, credentials_file=str(credentials(tmp_path, (key_id, secret), "archive", "p.ini"))
    )
    result = s3.deliver(tmp_path / "job", job_for(profile), Progress())
    assert "has no [default] section" in result.error
    assert s3.deliver(tmp_path / "job", job_for(replace(profile, profile="archive")), Progress()).ok


def test_s3_emulator_without_credentials_file_uses_the_aws_environment(
    s3_emulator: Emulator, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_folder(tmp_path / "job", "1.2.15", [1000])
    target = s3_target(s3_emulator, bucket, tmp_path, credentials_file=None)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(s3, "_SESSIONS", {})  # a dispatch process with this environment
    result = s3.deliver(tmp_path / "job", job_for(target), Progress())
    assert "no S3 credentials (set credentials_file" in result.error and result.unreachable
    monkeypatch.setattr(s3, "_SESSIONS", {})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_emulator.keys["writer"][0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_emulator.keys["writer"][1])
    assert s3.deliver(tmp_path / "job", job_for(target), Progress()).ok


def test_s3_emulator_write_only_credentials_deliver(
    s3_emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    """Keys that may only PutObject (a common drop-box policy): no listing, still delivered."""
    job_folder(tmp_path / "job", "1.2.10", [1000] * 3)
    target = s3_target(s3_emulator, bucket, tmp_path, user="writer")
    result = s3.deliver(tmp_path / "job", job_for(target), Progress())
    assert result.ok and result.delivered == 3, result
    assert len(objects(s3_emulator, bucket)) == 4


def test_s3_emulator_unreachable_endpoint(s3_emulator: Emulator, tmp_path: Path) -> None:
    job_folder(tmp_path / "job", "1.2.11", [1000])
    target = s3_target(
        s3_emulator, "any-bucket", tmp_path, endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    result = s3.deliver(tmp_path / "job", job_for(target), Progress())
    assert result.unreachable and not result.permanent and result.delivered == 0
    assert "cannot reach http://127.0.0.1:" in result.error and "connection refused" in result.error


def test_s3_emulator_sidecar_without_uids_fails_for_good(
    s3_emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    job_folder(tmp_path / "job", "1.2.12", [1000] * 2)
    (tmp_path / "job" / "i0001.tags").write_text('{"SOPInstanceUID": "1.2.3"}')
    result = s3.deliver(
        tmp_path / "job", job_for(s3_target(s3_emulator, bucket, tmp_path)), Progress()
    )
    assert result.permanent and result.error == "instance i0001 has no StudyInstanceUID"
    assert objects(s3_emulator, bucket) == {}


def test_s3_emulator_https_endpoint_is_verified_against_tls_ca(
    s3_emulator: Emulator, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    job_folder(tmp_path / "job", "1.2.14", [1000] * 2)
    args = ("-c", str(pki.server_cert), "-k", str(pki.server_key))
    with moto_server(tmp_path, *args) as (port, _):
        endpoint = f"https://localhost:{port}"
        _client(endpoint, ("a", "b"), verify=str(pki.ca)).create_bucket(Bucket="tls-bucket")
        good = s3_target(s3_emulator, "tls-bucket", tmp_path, endpoint_url=endpoint)
        assert s3.deliver(
            tmp_path / "job", job_for(replace(good, tls_ca=str(pki.ca))), Progress()
        ).ok
        wrong = replace(good, tls_ca=str(pki.other_ca))
        result = s3.deliver(tmp_path / "job", job_for(wrong), Progress())
    assert result.unreachable and f"TLS with {endpoint} failed" in result.error, result
    assert "certificate verify failed" in result.error


# -- through mercli dispatch ------------------------------------------------------------------


def test_s3_emulator_dispatch_once_end_to_end(
    s3_emulator: Emulator, bucket: str, tmp_path: Path, spool: Spool
) -> None:
    assert DELIVER["s3"] is s3.deliver
    ini = credentials(tmp_path, s3_emulator.keys["admin"])
    target = (
        f'[targets.lake]\ntype = "s3"\nbucket = "{bucket}"\nprefix = "router/"\n'
        f'endpoint_url = "{s3_emulator.endpoint}"\nregion = "us-east-1"\n'
        f'credentials_file = "{ini}"\nretry_delay = "0s"\n'
    )
    files = routed(tmp_path, spool, rules_for(tmp_path, target, '"lake"'), {"1.2.13": 4})
    result = dispatch_once(spool)
    assert result.returncode == 0, result.stderr
    assert len(spool.items(SUCCESS)) == 1
    stored = objects(s3_emulator, bucket)
    assert len(stored) == 5
    by_content = {body for key, body in stored.items() if key.endswith(".dcm")}
    assert by_content == {path.read_bytes() for path in files}
    assert all(key.startswith("router/1.2.9/1.2.13/") for key in stored)
    assert s3_emulator.keys["admin"][1] not in result.stderr
