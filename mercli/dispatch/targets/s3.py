"""Delivery to an `s3` target: any S3-compatible store (AWS, MinIO, Ceph RGW), SPEC §5.1.

Each instance becomes the object `<prefix><StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`
(Content-Type application/dicom), with the UIDs of its sidecar in `mercli.names.safe_name`
form: a well-formed UID as it is, anything else `x` + a hash, so a hostile UID can never
make a key such as `../` or one with control characters. A store has no rename, so a consumer
learns that a series is complete from a manifest written last:
`<prefix><StudyUID>/<SeriesUID>/.complete.json` (job id, count, and per instance its key,
size and SOP Instance UID; nothing about the patient beyond the UIDs the keys carry).

A study job uploads the instances of all its series first, then writes one manifest per
series; each lists the job's other series too. So whichever manifest a consumer sees first,
every instance of the job is already in the bucket (per-series manifests written as each
series finished would announce a study the consumer cannot yet read whole).

Resuming: an instance is recorded in `progress.delivered` once the store acknowledged it
(a PUT, or CompleteMultipartUpload, answered 200: S3 has it durably) and is not sent again
on a retry. An attempt that died before dispatch saved that record is covered by one listing
per series: a key already there with the same size and the same content (its ETag, which is
the MD5 of a single-part object, or computed the same way for a multipart one) is not sent
again. Credentials that may only write (no s3:ListBucket) simply skip that check. The
manifest is rewritten on every attempt that reaches it: it is small and always the same.

Files are streamed from disk: objects of MULTIPART_THRESHOLD bytes or more go as multipart
uploads in PART_SIZE parts, CONCURRENCY requests at a time over one connection pool; at most
WINDOW instances are in flight at once (each holds an open file). Files are opened without
following symlinks and then read through `/proc/self/fd`, so the bytes sent are those of the
file the spool checked.

botocore retries each request RETRY_ATTEMPTS times at most ("standard" mode, throttling
included) and waits `timeout` seconds at most to connect and for each read, so an attempt
never hangs. Checksum headers are only sent where a request needs them: newer botocore's
default trailing CRC32 is refused by several S3-compatible stores.

boto3 takes longer to import than the rest of dispatch together, so it is imported when an
s3 job is sent, not when the registry is.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.dispatch.targets.base import Attempt
from mercli.jobs import JobInfo, Progress, Target
from mercli.names import printable, safe_name
from mercli.secrets import SecretError, read_secret_file
from mercli.spool import INSTANCE_SUFFIX, SIDECAR_SUFFIX, open_regular, read_regular

MIB = 1024 * 1024
MULTIPART_THRESHOLD = 16 * MIB
PART_SIZE = 16 * MIB
CONCURRENCY = 8
WINDOW = 64
RETRY_ATTEMPTS = 3
CONTENT_TYPE = "application/dicom"
MANIFEST = ".complete.json"
log = logging.getLogger(__name__)
_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

# The store refuses this target as configured: every job of it would fail the same way.
_REFUSED = {
    "NoSuchBucket": "bucket {bucket} does not exist",
    "AccessDenied": "access denied to bucket {bucket} (check the credentials and the policy)",
    "AllAccessDisabled": "all access to bucket {bucket} is disabled",
    "InvalidAccessKeyId": "the access key id is not known to the store (check credentials)",
    "SignatureDoesNotMatch": "the secret key does not match the access key id",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is not valid",
    "AuthorizationHeaderMalformed": "the store refused the signature (check region)",
    "PermanentRedirect": "bucket {bucket} is in another region (check region/endpoint_url)",
    "InvalidBucketName": "the store refuses the bucket name {bucket}",
}
# Refused for this object: sending it again cannot help.
_PERMANENT = {"KeyTooLongError", "EntityTooLarge", "MetadataTooLarge", "InvalidObjectName"}


class S3Failure(Exception):
    """Why an attempt stopped: the Attempt's error text and how dispatch should treat it."""

    def __init__(self, message: str, *, permanent: bool = False, target_down: bool = False):
        super().__init__(message)
        self.permanent = permanent
        self.target_down = target_down


@dataclass(frozen=True)
class Instance:
    """One instance of the job: its progress key (NAME or <series>/NAME), file and object."""

    done_key: str
    path: Path
    key: str
    size: int
    sop: str


@dataclass(frozen=True)
class Series:
    """The instances of one series in the job, and where its manifest goes."""

    folder: str  # the prefix all its keys share, ending in "/"
    study_uid: str
    series_uid: str
    instances: tuple[Instance, ...]


def deliver(folder: Path, job: JobInfo, progress: Progress) -> Attempt:
    """Upload the job's instances the bucket does not have yet, then the manifests."""
    before = len(progress.delivered)
    try:
        plan = plan_job(folder, job)
        client = make_client(job.target)
        send_instances(client, job.target, plan, progress)
        for series in plan:
            write_manifest(client, job, series, plan)
    except S3Failure as exc:
        sent = len(progress.delivered) - before
        down = exc.target_down and sent == 0
        return Attempt(sent, str(exc), permanent=exc.permanent, unreachable=down)
    return Attempt(len(progress.delivered) - before)


# -- what goes where -----------------------------------------------------------------------


def plan_job(folder: Path, job: JobInfo) -> list[Series]:
    """The job's series with their instances' keys, from the sidecars (S3Failure, permanent,
    for a sidecar without the UIDs, or two instances that would share a key)."""
    places = [(folder / name, f"{name}/") for name in job.series] or [(folder, "")]
    plan: dict[str, list[Instance]] = {}
    uids: dict[str, tuple[str, str]] = {}
    seen: set[str] = set()
    for place, done_prefix in places:
        for path in sorted(place.glob(f"*{INSTANCE_SUFFIX}")):
            study, series, instance = _instance(path, done_prefix, job.target.prefix)
            if instance.key in seen:
                raise S3Failure(
                    f"two instances of the job have the key {instance.key}", permanent=True
                )
            seen.add(instance.key)
            series_folder = instance.key.rsplit("/", 1)[0] + "/"
            plan.setdefault(series_folder, []).append(instance)
            uids[series_folder] = (study, series)
    return [Series(f, *uids[f], tuple(found)) for f, found in plan.items()]


def _instance(path: Path, done_prefix: str, prefix: str) -> tuple[str, str, Instance]:
    try:
        sidecar = json.loads(read_regular(path.with_suffix(SIDECAR_SUFFIX)))
    except ValueError:
        raise S3Failure(
            f"sidecar of {done_prefix}{path.stem} is not JSON", permanent=True
        ) from None
    values = [sidecar.get(name) if isinstance(sidecar, dict) else None for name in _UIDS]
    for name, value in zip(_UIDS, values, strict=True):
        if not isinstance(value, str) or not value.strip():
            raise S3Failure(f"instance {done_prefix}{path.stem} has no {name}", permanent=True)
    study, series, sop = (str(value).strip() for value in values)
    key = f"{prefix}{safe_name(study)}/{safe_name(series)}/{safe_name(sop)}{INSTANCE_SUFFIX}"
    size = os.lstat(path).st_size
    return study, series, Instance(f"{done_prefix}{path.stem}", path, key, size, sop)


# -- the client ----------------------------------------------------------------------------


def make_client(target: Target) -> Any:
    """An S3 client for the target: its credentials read now, bounded retries and timeouts,
    path-style addressing for a custom endpoint (MinIO and Ceph rarely have wildcard DNS)."""
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    config = Config(
        retries={"mode": "standard", "total_max_attempts": RETRY_ATTEMPTS},
        connect_timeout=target.timeout,
        read_timeout=target.timeout,
        max_pool_connections=CONCURRENCY,
        s3={"addressing_style": "path" if target.endpoint_url else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    keys = _credentials(target) if target.credentials_file else {}
    try:
        with _SESSIONS_LOCK:  # a session is not thread-safe; the client it makes is
            return _session(None if keys else target.profile).client(
                "s3",
                region_name=target.region,
                endpoint_url=target.endpoint_url,
                config=config,
                verify=target.tls_ca if target.tls_ca else None,
                **keys,
            )
    except BotoCoreError as exc:  # a profile that does not exist, a bad endpoint URL
        raise S3Failure(f"s3 target {target.name}: {exc}", target_down=True) from None


_SESSIONS: dict[str | None, Any] = {}
_SESSIONS_LOCK = threading.Lock()


def _session(profile: str | None) -> Any:
    """One boto3 session per profile for the process: making one loads botocore's service
    models (~0.3 s), which would otherwise be paid for every job. Keys from a
    credentials_file go to the client, so they are read for every job all the same; the
    default chain (AWS_* environment, ~/.aws, an instance role) is resolved once per process,
    and botocore refreshes the temporary credentials it gives (roles) by itself."""
    import boto3

    if profile not in _SESSIONS:
        _SESSIONS[profile] = boto3.session.Session(profile_name=profile)
    return _SESSIONS[profile]


def _credentials(target: Target) -> dict[str, str]:
    """The keys of `credentials_file` (an AWS shared-credentials file), section `profile`
    or `default`. Errors name the file and section, never a value."""
    path = Path(str(target.credentials_file))
    what = f'target "{target.name}" credentials_file'
    try:
        text = read_secret_file(path, what)
    except SecretError as exc:
        raise S3Failure(str(exc), target_down=True) from None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error:  # its message may quote a line of the file: never shown
        raise S3Failure(f"{what}: {path} is not an ini file", target_down=True) from None
    name = target.profile or "default"
    section = next((s for s in (name, f"profile {name}") if parser.has_section(s)), None)
    if section is None:
        raise S3Failure(f"{what}: {path} has no [{name}] section", target_down=True)
    found = {key: parser.get(section, key, fallback="").strip() for key in _CREDENTIAL_KEYS}
    for key in _CREDENTIAL_KEYS[:2]:
        if not found[key]:
            raise S3Failure(f"{what}: [{name}] in {path} has no {key}", target_down=True)
    return {key: value for key, value in found.items() if value}


_CREDENTIAL_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")


def failure(exc: Exception, target: Target, key: str = "") -> S3Failure:
    """An S3Failure saying, in the admin's terms, what a botocore error means."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
        SSLError,
    )

    where = target.endpoint_url or "AWS S3"
    if isinstance(exc, ClientError):
        return _client_error(exc, target, key)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        text = "no S3 credentials (set credentials_file, or AWS_* in dispatch's environment)"
        return S3Failure(f"{text}: {exc}", target_down=True)
    if isinstance(exc, SSLError):
        return S3Failure(f"TLS with {where} failed: {_reason(exc)}", target_down=True)
    if isinstance(exc, ConnectTimeoutError):
        return S3Failure(
            f"cannot reach {where}: no answer in {target.timeout:g} s", target_down=True
        )
    if isinstance(exc, EndpointConnectionError):
        return S3Failure(f"cannot reach {where}: {_reason(exc)}", target_down=True)
    if isinstance(exc, ReadTimeoutError):
        return S3Failure(f"{where} did not answer within {target.timeout:g} s")
    return S3Failure(f"{where}: {printable(exc, 300)}")


def _client_error(exc: Any, target: Target, key: str) -> S3Failure:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
    if code in _REFUSED:
        text = _REFUSED[code].format(bucket=target.bucket)
        return S3Failure(f"s3 {code}: {text} (HTTP {status})", target_down=True)
    what = f"s3 {printable(code or status)}: {printable(error.get('Message', ''), 200)}"
    if key:
        what += f" (key {key})"
    if code in _PERMANENT:
        return S3Failure(what + "; cannot be sent", permanent=True)
    return S3Failure(what)


def _botocore_errors() -> tuple[type[Exception], ...]:
    """What botocore raises for the store's and the network's failures (not for our bugs)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _reason(exc: Exception) -> str:
    """The socket-level reason ("connection refused") under a botocore connection error."""
    inner = getattr(exc, "kwargs", {}).get("error")
    text = str(getattr(inner, "reason", inner) or exc)
    if "refused" in text.lower():
        return "connection refused"
    return printable(text, 200)


# -- sending -------------------------------------------------------------------------------


def send_instances(client: Any, target: Target, plan: list[Series], progress: Progress) -> None:
    """Upload every instance not yet delivered, WINDOW at a time; record each as it lands.
    On a failure the uploads already running finish (and count), the rest are not started."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    done = set(progress.delivered)
    pending = [i for series in plan for i in series.instances if i.done_key not in done]
    pending = _not_stored(client, target, plan, pending, progress)
    config = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=PART_SIZE,
        max_concurrency=CONCURRENCY,
    )
    first: S3Failure | None = None
    running: deque[tuple[Instance, int, Any]] = deque()
    try:
        with create_transfer_manager(client, config) as manager:
            for instance in pending:
                if len(running) >= WINDOW:
                    first = _finish(running.popleft(), target, progress)
                if first is not None:
                    break
                running.append(_start(manager, target, instance))
            while running:
                outcome = _finish(running.popleft(), target, progress)
                first = first or outcome
    finally:  # after a spool error: the manager has cancelled and stopped the rest
        for _, fd, _ in running:
            os.close(fd)
    if first is not None:
        raise first


def _start(manager: Any, target: Target, instance: Instance) -> tuple[Instance, int, Any]:
    """Begin one upload from a file opened without following symlinks."""
    fd = open_regular(instance.path)
    try:
        future = manager.upload(
            f"/proc/self/fd/{fd}",
            target.bucket,
            instance.key,
            extra_args={"ContentType": CONTENT_TYPE},
        )
    except BaseException:
        os.close(fd)
        raise
    return instance, fd, future


def _finish(
    started: tuple[Instance, int, Any], target: Target, progress: Progress
) -> S3Failure | None:
    """Wait for one upload; record it, or say why it failed (local OSErrors propagate)."""
    instance, fd, future = started
    try:
        future.result()
    except _botocore_errors() as exc:
        return failure(exc, target, instance.key)
    finally:
        os.close(fd)
    progress.delivered.append(instance.done_key)
    return None


def _not_stored(
    client: Any, target: Target, plan: list[Series], pending: list[Instance], progress: Progress
) -> list[Instance]:
    """`pending` without the instances the bucket already holds byte for byte (these are
    recorded as delivered). A listing the credentials may not do skips the check."""
    if not pending:
        return pending
    wanted = {instance.key for instance in pending}
    stored: dict[str, tuple[int, str]] = {}
    for series in plan:
        if any(instance.key in wanted for instance in series.instances):
            listed = _listing(client, target, series.folder)
            if listed is None:
                return pending
            stored.update(listed)
    left = []
    for instance in pending:
        size, etag = stored.get(instance.key, (-1, ""))
        if size == instance.size and etag == _etag(instance):
            progress.delivered.append(instance.done_key)
        else:
            left.append(instance)
    if len(left) < len(pending):
        skipped = len(pending) - len(left)
        log.info("%d instance(s) already in bucket %s, not sent again", skipped, target.bucket)
    return left


def _listing(client: Any, target: Target, folder: str) -> dict[str, tuple[int, str]] | None:
    """Key -> (size, ETag) under `folder`; None if the credentials may not list."""
    from botocore.exceptions import ClientError

    found: dict[str, tuple[int, str]] = {}
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=target.bucket, Prefix=folder
        )
        for page in pages:
            for item in page.get("Contents", ()):
                found[item["Key"]] = (int(item["Size"]), str(item.get("ETag", "")).strip('"'))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "AccessDenied":
            return None
        raise failure(exc, target) from None
    except _botocore_errors() as exc:
        raise failure(exc, target) from None
    return found


def _etag(instance: Instance) -> str:
    """The ETag the store gives the file as we upload it: the MD5 of a single-part object,
    or for a multipart one the MD5 of its parts' MD5s and `-<parts>`."""
    digests = []
    part = _part_size(instance.size)
    fd = open_regular(instance.path)
    with os.fdopen(fd, "rb") as stream:
        for chunk in _chunks(stream, part):
            digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    if instance.size < MULTIPART_THRESHOLD:
        return digests[0].hex() if digests else hashlib.md5(b"", usedforsecurity=False).hexdigest()
    whole = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{whole}-{len(digests)}"


def _part_size(size: int) -> int:
    """The part size s3transfer uploads `size` bytes with: PART_SIZE, doubled until the
    parts are at most S3's 10,000 (a mismatch would only mean sending the file again)."""
    part = PART_SIZE
    while -(-size // part) > 10_000:
        part *= 2
    return part


def _chunks(stream: Any, size: int) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk


def write_manifest(client: Any, job: JobInfo, series: Series, plan: list[Series]) -> None:
    """Put `<series folder>.complete.json`: the last object of the series."""
    document = {
        "job": job.name,
        "target": job.target.name,
        "StudyInstanceUID": series.study_uid,
        "SeriesInstanceUID": series.series_uid,
        "count": len(series.instances),
        "bytes": sum(instance.size for instance in series.instances),
        "instances": [
            {"key": i.key, "size": i.size, "SOPInstanceUID": i.sop} for i in series.instances
        ],
        "job_series": [other.folder for other in plan],
        "written": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    key = series.folder + MANIFEST
    try:
        client.put_object(
            Bucket=job.target.bucket,
            Key=key,
            Body=json.dumps(document, indent=1).encode(),
            ContentType="application/json",
        )
    except _botocore_errors() as exc:
        raise failure(exc, job.target, key) from None
