"""The job file format, in one place: what route writes, dispatch reads, resend rewrites.

A job folder holds its instances (`NAME.dcm` + `NAME.tags`), `job.json` and, once dispatch has
tried it, `dispatch.json`. `job.json` is written once, inside the transaction that creates the
job, and never changed: it carries the target's whole definition (`Target.to_json()`), so
dispatch needs no rules file. `dispatch.json` is rewritten whole by the worker holding the
job's claim (`Worker.replace_file`), so it never tears.

job.json keys: id, created, series (the incoming/ folder name), the `JOB_KEYS` of the first
instance, instances, first_received / last_received (ReceivedAt range), rules (that matched),
reason (why discarded; discard items only), target (jobs only), priority (jobs only:
"urgent", "normal" or "offpeak"; a job without it is normal), offpeak (offpeak jobs only: the
local time window "22:00-06:00" they may be claimed in), resent_from (resent jobs).
status, purge and resend read the same records through `read_json_object`.

A **study job** (SPEC §4.1, `study_record`) has `"study": true`, its instances in one
sub-folder per series (`<series>/NAME.dcm` + `.tags`), and `series` is then a list, in
arrival order, of `{"series": <sub-folder>, "SeriesInstanceUID", "instances": [NAME, ...]}`;
`instances` is the total count, the `JOB_KEYS` are the first series' (SeriesInstanceUID aside).
A discarded incomplete study has the same shape with `reason` instead of `target`.

A **processing job** (SPEC §7, in processing/; `processing_record`) is a series or study job
without `target`. Instead it has `process` (the module chain, each as `Module.to_json()`),
`process_settings` (the rule's), `targets` (a list of `Target.to_json()` for the output) or
`results: "route"` (the output goes back to incoming/ as new series), `rules` (the one rule
that asked for it), `priority` and `processing_hops`: how many processing runs the output
will have been through. Output sidecars carry it as HOPS_KEY and `SenderAET` PROCESS_SENDER +
the module, so routing never processes a series by the module that made it again, and never
past MAX_PROCESS_HOPS.

`cancel.json` (`CancelRequest`): `mercli cancel` asking the dispatcher that holds a job's claim
to stop it (reason, by, uid, at). Written into the claimed item, whole (`Worker.replace_file`);
dispatch checks for it before an attempt, between instances, and after; it ends the job in
error/ with error.json `reason` "cancelled: <reason>". resend never copies it.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Self

from mercli.dicom import DEFAULT_AET, NETWORK_TIMEOUT
from mercli.spool import JOB_FILE, NotRegularFile, Worker, read_regular

log = logging.getLogger(__name__)

DISPATCH_FILE = "dispatch.json"
PROCESS_FILE = "process.json"
CANCEL_FILE = "cancel.json"
JOB_KEYS = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "AccessionNumber", "Modality")
RESEND_RULE = "resend"  # the `rules` of a job that resend made
PRIORITIES = ("urgent", "normal", "offpeak")  # highest first
NORMAL = "normal"
_WINDOW = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*")


def highest_priority(priorities: Iterable[str]) -> str:
    """The most urgent of some priorities (unknown values count as normal); normal if none."""
    known = [p if p in PRIORITIES else NORMAL for p in priorities]
    return min(known, key=PRIORITIES.index, default=NORMAL)


@dataclass(frozen=True)
class OffpeakWindow:
    """A daily local-time window `HH:MM-HH:MM`, start included, end excluded; it may wrap
    midnight (`22:00-06:00`). Start and end must differ."""

    start: int  # minutes after midnight
    end: int

    @classmethod
    def parse(cls, text: str) -> OffpeakWindow:
        """Raises ValueError naming the expected form."""
        found = _WINDOW.fullmatch(text)
        if found is None:
            raise ValueError(f"not a time window: {text!r} (use HH:MM-HH:MM, e.g. 22:00-06:00)")
        hour1, minute1, hour2, minute2 = (int(group) for group in found.groups())
        if hour1 > 23 or hour2 > 23 or minute1 > 59 or minute2 > 59:
            raise ValueError(f"not a time of day in {text!r} (00:00 to 23:59)")
        start, end = hour1 * 60 + minute1, hour2 * 60 + minute2
        if start == end:
            raise ValueError(f"empty time window: {text!r} (start and end are equal)")
        return cls(start, end)

    def contains(self, moment: datetime) -> bool:
        """Whether a (local) time of day is inside the window."""
        minute = moment.hour * 60 + moment.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return (
            f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"
        )


@dataclass(frozen=True)
class Target:
    """`[targets.NAME]`: where jobs go and how dispatch retries them (durations in seconds).

    The one place target defaults live. A job carries its target as `to_json()`.
    `max_attempts` and `max_age` of 0 mean no limit. `path` (folder targets) is absolute.
    `priority` (PRIORITIES), when set: the least priority of this target's jobs; a job gets
    the highest of it and of the rules that created the job. None: the rules alone decide.
    `link` (folder targets): hard-link the spool's files into `path` when it is on the
    spool's filesystem, instead of copying them. Off by default: a linked file is the spool's
    own (and every other target's) copy, so a consumer editing it in place would edit those
    too. A job without the key (written before it existed) copies.

    The other types' keys follow (SPEC §5.1): `tls*` for dicom targets, `url`, `auth`,
    `batch` for dicomweb, `user`, `key_file`, `known_hosts` (and `host`, `port`, `path`: a
    remote path, as given) for sftp, `bucket`, `prefix`, `endpoint_url`, `region` for s3.
    Secrets are only ever references: a file path (`*_file`, `tls_key`) or `"${NAME}"`
    (`password`, `token`), read at send time by `mercli.secrets.read_secret`.

    The edits (`deidentify*`, `modify`, `transfer_syntax`, `edits`): what dispatch does to
    the target's private copy of each job (`mercli.dispatch.edits`); `modify` is kept as the
    admin wrote it, checked by `rules check` and parsed again at dispatch.
    """

    name: str
    type: str
    host: str | None = None
    port: int | None = None
    called_aet: str | None = None
    calling_aet: str = DEFAULT_AET
    ordered: bool = False
    timeout: float = NETWORK_TIMEOUT
    path: Path | None = None
    retry_delay: float = 10.0
    retry_backoff: float = 2.0
    retry_max_delay: float = 600.0
    max_attempts: int = 20
    max_age: float = 3 * 86400.0
    link: bool = False
    priority: str | None = None
    # DICOM TLS (dicom targets; tls_ca/tls_cert/tls_key also for https dicomweb targets)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # dicomweb (STOW-RS)
    url: str | None = None
    auth: str = "none"
    username: str | None = None
    password: str | None = None  # "${ENV}" only: secrets are references (mercli.secrets)
    password_file: str | None = None
    token: str | None = None  # "${ENV}" only
    token_file: str | None = None
    batch: int = 50
    # sftp (host, port, path and password/password_file as above)
    user: str | None = None
    key_file: str | None = None
    known_hosts: str | None = None
    # s3
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    credentials_file: str | None = None
    profile: str | None = None
    # per-target edits (SPEC §5.1, at dispatch time on the job's own copies)
    deidentify: str | None = None  # "basic": PS3.15 Annex E (mercli.deid)
    deidentify_options: tuple[str, ...] = ()
    pseudonym_secret_file: str | None = None
    allow_burned_in: bool = False
    keep_private: tuple[str, ...] = ()
    modify: tuple[tuple[str, Any], ...] = ()  # (keyword or "(gggg,eeee)", value), as written
    transfer_syntax: str | None = None  # a UID of mercli.dicom.convert.SYNTAXES
    allow_lossy: bool = False  # transfer_syntax may be a lossy one
    # notifications (SPEC §8): channel names and the events they get (defaults applied)
    notify: tuple[str, ...] = ()
    notify_on: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (path as a string)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["path"] = None if self.path is None else str(self.path)
        data["notify"], data["notify_on"] = list(self.notify), list(self.notify_on)
        data["deidentify_options"] = list(self.deidentify_options)
        data["keep_private"] = list(self.keep_private)
        data["modify"] = dict(self.modify)
        for key in _TRANSPORT_KEYS:  # only what this target's type uses
            if data[key] in (_DEFAULTS[key], [], {}):
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Target:
        """The target `to_json` wrote; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if values.get("path") is not None:
            values["path"] = Path(values["path"])
        for key in ("notify", "notify_on", "deidentify_options", "keep_private"):
            values[key] = tuple(values.get(key) or ())
        values["modify"] = tuple(dict(values.get("modify") or {}).items())
        return cls(**values)

    @property
    def edits(self) -> bool:
        """Whether the target gets a private, edited copy of each job (mercli.dispatch.edits)."""
        return bool(self.deidentify or self.modify or self.transfer_syntax)


_DEFAULTS = {f.name: f.default for f in fields(Target)}
_TRANSPORT_KEYS = tuple(list(_DEFAULTS)[list(_DEFAULTS).index("tls") :])


PROCESS_SENDER = "mercli-process:"  # + module name: the SenderAET of processing output
HOPS_KEY = "ProcessingHops"  # sidecar key: processing runs a series has been through
MAX_PROCESS_HOPS = 4
CONTAINERS = ("docker", "podman", "apptainer")  # engines a module's `image` can run under


@dataclass(frozen=True)
class Module:
    """`[modules.NAME]`: a processing module (SPEC §7) and how `process` retries it (seconds).

    The one place module defaults live. A processing job carries each module of its chain as
    `to_json()`, so `process` needs no rules file. Exactly one of `command` (argv, run on the
    host) and `image` (run by `container`, one of CONTAINERS) is set. `settings` go to the
    module in task.json (merged with the rule's `process_settings`), `env` into its
    environment. The retry fields mean what a Target's do; the defaults retry less, because a
    module that fails usually fails again, and every try costs its run time.
    """

    name: str
    command: tuple[str, ...] = ()
    image: str | None = None
    container: str | None = None
    timeout: float = 1800.0
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    retry_delay: float = 30.0
    retry_backoff: float = 2.0
    retry_max_delay: float = 600.0
    max_attempts: int = 3
    max_age: float = 86400.0
    notify: tuple[str, ...] = ()  # channel names (SPEC §8) and the events they get
    notify_on: tuple[str, ...] = ()
    # where it runs (SPEC §7.1): "local", or "slurm" with [runners.slurm]'s options merged in
    runner: str = "local"
    partition: str | None = None
    gpus: str | None = None
    sbatch_args: tuple[str, ...] = ()
    poll_max: float = 30.0  # the longest wait between two squeue calls for one job

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data |= {"command": list(self.command), "settings": dict(self.settings)}
        data["sbatch_args"] = list(self.sbatch_args)
        data["env"] = dict(self.env)
        data["notify"], data["notify_on"] = list(self.notify), list(self.notify_on)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Module:
        """The module `to_json` wrote; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["command"] = tuple(values.get("command") or ())
        values["sbatch_args"] = tuple(values.get("sbatch_args") or ())
        for key in ("notify", "notify_on"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)


def input_hops(sidecars: Iterable[Mapping[str, Any]]) -> int:
    """The processing runs some instances have been through (HOPS_KEY; 0 for received ones)."""
    hops = 0
    for sidecar in sidecars:
        value = sidecar.get(HOPS_KEY, 0)
        if isinstance(value, int) and not isinstance(value, bool):
            hops = max(hops, value)
    return hops


def processed_again(chain: Sequence[str], sidecars: Iterable[Mapping[str, Any]]) -> str | None:
    """Why a chain must not run on these instances (the loop guard), or None if it may."""
    hops = 0
    for sidecar in sidecars:
        sender = str(sidecar.get("SenderAET", ""))
        if sender.startswith(PROCESS_SENDER) and sender[len(PROCESS_SENDER) :] in chain:
            return f'made by module "{sender[len(PROCESS_SENDER) :]}", not processed by it again'
        hops = max(hops, input_hops([sidecar]))
    if hops >= MAX_PROCESS_HOPS:
        return f"processed {hops} times already (at most {MAX_PROCESS_HOPS})"
    return None


def processing_record(
    record: Mapping[str, Any],
    modules: Sequence[Module],
    targets: Sequence[Target],
    *,
    results: str | None,
    settings: Mapping[str, Any],
    hops: int,
    priority: str,
) -> dict[str, Any]:
    """job.json of a processing job: a series or study record made without a target (its
    empty `reason` dropped), with the processing keys described above."""
    document = {key: value for key, value in record.items() if key != "reason"}
    document["process"] = [module.to_json() for module in modules]
    document["process_settings"] = dict(settings)
    if results is not None:
        document["results"] = results
    else:
        document["targets"] = [target.to_json() for target in targets]
    document["priority"] = priority
    document["processing_hops"] = hops
    return document


def job_record(
    item: str,
    series: str,
    sidecars: Sequence[Mapping[str, Any]],
    rules: Sequence[str],
    *,
    target: Mapping[str, Any] | None = None,
    reason: str = "",
    priority: str = NORMAL,
    offpeak: str | None = None,
) -> dict[str, Any]:
    """job.json of a job (with `target` and `priority`; `offpeak`, the window, is kept only for
    an offpeak job) or of a discarded item (with `reason`)."""
    received = sorted(str(s["ReceivedAt"]) for s in sidecars if s.get("ReceivedAt"))
    first = sidecars[0] if sidecars else {}
    record: dict[str, Any] = {
        "id": item,
        "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "series": series,
        **{key: first[key] for key in JOB_KEYS if key in first},
        "instances": len(sidecars),
        "first_received": received[0] if received else None,
        "last_received": received[-1] if received else None,
        "rules": list(rules),
    }
    if target is None:
        record["reason"] = reason
    else:
        record["target"] = dict(target)
        record["priority"] = priority
        if priority == "offpeak" and offpeak:
            record["offpeak"] = offpeak
    return record


def study_record(
    item: str,
    series: Sequence[Mapping[str, Any]],
    keys: Mapping[str, Any],
    rules: Sequence[str],
    *,
    target: Mapping[str, Any] | None = None,
    reason: str = "",
    priority: str = NORMAL,
    offpeak: str | None = None,
) -> dict[str, Any]:
    """job.json of a study job (or of a discarded study): `series` as described above, `keys`
    the JOB_KEYS and first_received / last_received of the series (the first's keys win)."""
    record = job_record(
        item, "", [], rules, target=target, reason=reason, priority=priority, offpeak=offpeak
    )
    record.pop("SeriesInstanceUID", None)
    first = [str(keys[k]) for k in ("first_received",) if keys.get(k)]
    last = [str(keys[k]) for k in ("last_received",) if keys.get(k)]
    record.update(
        {
            "study": True,
            "series": [dict(entry) for entry in series],
            **{key: keys[key] for key in JOB_KEYS if key in keys and key != "SeriesInstanceUID"},
            "instances": sum(len(entry["instances"]) for entry in series),
            "first_received": min(first, default=None),
            "last_received": max(last, default=None),
        }
    )
    return record


def resend_record(
    job_id: str,
    series: str,
    sidecars: Sequence[Mapping[str, Any]],
    target: Mapping[str, Any],
    resent_from: str,
    *,
    priority: str = NORMAL,
    offpeak: str | None = None,
) -> dict[str, Any]:
    """job.json of a resent job: route's shape, `rules: ["resend"]`, and where it came from."""
    record = job_record(
        job_id,
        series,
        sidecars,
        (RESEND_RULE,),
        target=target,
        priority=priority,
        offpeak=offpeak,
    )
    return {**record, "resent_from": resent_from}


def resend_study_record(
    job_id: str,
    series: Sequence[Mapping[str, Any]],
    keys: Mapping[str, Any],
    target: Mapping[str, Any],
    resent_from: str,
    *,
    priority: str = NORMAL,
    offpeak: str | None = None,
) -> dict[str, Any]:
    """job.json of a resent study job: `study_record`'s shape, `rules: ["resend"]`, and where
    it came from."""
    record = study_record(
        job_id,
        series,
        keys,
        (RESEND_RULE,),
        target=target,
        priority=priority,
        offpeak=offpeak,
    )
    return {**record, "resent_from": resent_from}


def job_priority(record: Mapping[str, Any]) -> str:
    """A job record's priority: normal when missing (jobs older than priorities) or unknown."""
    value = record.get("priority")
    return value if isinstance(value, str) and value in PRIORITIES else NORMAL


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a file; {} if it is missing, unreadable, a symlink or not an object."""
    try:
        value = json.loads(read_regular(path))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class JobInfo:
    """What job.json says, as dispatch needs it: read once per job and cached."""

    name: str
    target: Target
    study: str
    first_received: str
    created: float
    priority: str = NORMAL
    offpeak: OffpeakWindow | None = None  # offpeak jobs: when they may be claimed
    series: tuple[str, ...] = ()  # study jobs: their series sub-folders, in arrival order
    notify: tuple[Mapping[str, Any], ...] = ()  # subscriptions (mercli.notify), as JSON
    keys: Mapping[str, Any] = field(default_factory=dict)  # the JOB_KEYS job.json holds
    rules: tuple[str, ...] = ()  # that made the job

    @classmethod
    def load(cls, name: str, folder: Path) -> JobInfo:
        """Raises OSError, ValueError, KeyError or TypeError for a missing or bad job.json
        (NotRegularFile, an OSError, for one that is a symlink or not a regular file)."""
        record = json.loads(read_regular(folder / JOB_FILE))
        created = datetime.fromisoformat(record["created"]).timestamp()
        priority = job_priority(record)
        return cls(
            name=name,
            target=Target.from_json(record["target"]),
            study=str(record.get("StudyInstanceUID", "")),
            first_received=str(record.get("first_received") or ""),
            created=created,
            priority=priority,
            offpeak=_window(record) if priority == "offpeak" else None,
            series=study_series(record),
            notify=tuple(item for item in record.get("notify") or () if isinstance(item, dict)),
            keys={key: record[key] for key in JOB_KEYS if key in record},
            rules=tuple(str(rule) for rule in record.get("rules") or ()),
        )


def study_series(record: Mapping[str, Any]) -> tuple[str, ...]:
    """A study job's series sub-folders in arrival order; () for a series job. ValueError
    for a name that is not one plain folder name (a job.json no route wrote)."""
    if not record.get("study"):
        return ()
    names = tuple(str(entry["series"]) for entry in record["series"])
    for name in names:
        if not name or name.startswith(".") or "/" in name or "\x00" in name:
            raise ValueError(f"bad series folder {name!r} in a study job")
    return names


def _window(record: Mapping[str, Any]) -> OffpeakWindow | None:
    """An offpeak job's window; None (claimable any time, last) if it is missing or bad:
    a job that no window will ever admit would wait forever."""
    try:
        return OffpeakWindow.parse(str(record["offpeak"]))
    except (KeyError, ValueError):
        return None


def _same_kind(value: Any, default: Any) -> bool:
    """Whether a saved progress value has the type of its field (judged by its default)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return default is None and (value is None or isinstance(value, str))


@dataclass
class Progress:
    """dispatch.json: how far a job has got."""

    FILE: ClassVar[str] = DISPATCH_FILE

    attempts: int = 0
    next_attempt: float = 0.0  # wall-clock seconds; 0 = now
    delivered: list[str] = field(default_factory=list)
    last_error: str = ""
    finished: str | None = None

    @classmethod
    def load(cls, folder: Path) -> Self:
        """The progress saved in `folder`; fresh progress if there is none, or if the file
        cannot be read as what it should be (cut short, edited by hand, a value of the wrong
        type): the worst that costs is attempts counted anew and instances sent again, never
        an item that no worker can take any more."""
        try:
            record = json.loads(read_regular(folder / cls.FILE))
        except (FileNotFoundError, NotRegularFile):  # dispatch fails a job holding a symlink
            return cls()
        except ValueError as exc:  # an OSError (a read that failed) is raised: tried later
            log.warning("%s in %s unreadable (%s): starting afresh", cls.FILE, folder.name, exc)
            return cls()
        fresh = asdict(cls())
        if not isinstance(record, dict) or not all(
            _same_kind(record[key], fresh[key]) for key in fresh if key in record
        ):
            log.warning("%s in %s is not what mercli wrote: starting afresh", cls.FILE, folder.name)
            return cls()
        return cls(**{key: record[key] for key in fresh if key in record})

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def save(self, worker: Worker, folder: Path) -> None:
        """Replace dispatch.json in a claimed job, durably."""
        worker.replace_file(folder / self.FILE, self.to_bytes())


class ProcessProgress(Progress):
    """process.json: the runs of a processing job so far (`delivered` unused)."""

    FILE: ClassVar[str] = PROCESS_FILE


@dataclass(frozen=True)
class CancelRequest:
    """Who cancelled a job, when and why (cancel.json; error.json of a cancelled job)."""

    reason: str
    by: str
    uid: int
    at: str

    @classmethod
    def now(cls, reason: str) -> CancelRequest:
        """A request by the user running this process, made now."""
        uid = os.getuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:  # a uid with no passwd entry (containers)
            name = str(uid)
        return cls(reason, name, uid, datetime.now(UTC).isoformat(timespec="milliseconds"))

    @classmethod
    def load(cls, folder: Path) -> CancelRequest | None:
        """The request in a job folder, or None (none, or unreadable: not a request)."""
        try:
            record = json.loads(read_regular(folder / CANCEL_FILE))
            return cls(
                str(record["reason"]), str(record["by"]), int(record["uid"]), str(record["at"])
            )
        except (OSError, NotRegularFile, ValueError, KeyError, TypeError):
            return None

    @property
    def error(self) -> str:
        """error.json's `reason` of the cancelled job."""
        return f"cancelled: {self.reason}"

    def detail(self) -> dict[str, Any]:
        """error.json's further fields: who cancelled, and when."""
        return {"cancelled_by": self.by, "uid": self.uid, "cancelled_at": self.at}

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()
