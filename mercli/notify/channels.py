"""`[notify.NAME]` channels, who subscribes to which events, and rendering their templates.

A `Channel` is one webhook or email destination with its Jinja2 templates (the body; for
email also the subject). Templates run in Jinja2's sandbox: no attribute access to Python
internals, ranges capped; what they render is cut at RENDER_LIMIT characters. `rules check`
(through `check_templates`) renders each template with every documented variable set and
a deadline, so a syntax error, an unknown variable or a template that takes too long stops
the rules file from loading instead of losing notifications later.

A `Subscription` is a channel and the events it wants from one rule, target or module; job
files carry them as JSON so dispatch and process need no rules file.

Variables (`VARIABLES`): event, at, hostname, rule, rules, target, module, item, series_uid,
study_uid, series_description, study_description, modality, instances, sender_aet, error,
result (result.json of a processing module), notification (its
`__mercure_notification.text`). With `phi = true` only: patient_name, patient_id,
patient_birth_date, accession_number.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

from mercli.notify import EVENTS

RENDER_LIMIT = 64 * 1024  # characters of a rendered subject or body
RENDER_SECONDS = 2.0  # of template code per rendering, when collected (as `rules check` allows)
TRACE_EVERY = 64  # template lines between two looks at the clock
CHECK_SECONDS = 2.0  # what a template may take with the sample values at `rules check`
PHI_VARIABLES = ("patient_name", "patient_id", "patient_birth_date", "accession_number")
VARIABLES = (
    *("event", "at", "hostname", "rule", "rules", "target", "module", "item", "series_uid"),
    *("study_uid", "series_description", "study_description", "modality", "instances"),
    *("sender_aet", "error", "result", "notification"),
)
DEFAULT_BODY = (
    '{"event": {{ event | tojson }}, "rule": {{ rule | tojson }}, '
    '"target": {{ target | tojson }}, "module": {{ module | tojson }}, '
    '"series": {{ series_uid | tojson }}, "study": {{ study_uid | tojson }}, '
    '"modality": {{ modality | tojson }}, "instances": {{ instances | tojson }}, '
    '"error": {{ error | tojson }}, "notification": {{ notification | tojson }}}'
)
DEFAULT_EMAIL_BODY = (
    "mercli {{ event }}: rule {{ rule }}{% if target %}, target {{ target }}{% endif %}"
    "{% if module %}, module {{ module }}{% endif %}\n"
    "series {{ series_uid }} ({{ modality }} {{ series_description }}), "
    "{{ instances }} instance(s)\nstudy {{ study_uid }}\n"
    "{% if error %}error: {{ error }}\n{% endif %}"
    "{% if notification %}{{ notification }}\n{% endif %}"
)
DEFAULT_SUBJECT = "mercli {{ event }}: {{ rule or target or module }}"
DEFAULT_EVENTS = {  # notify_on when not given
    "rule": ("delivered", "failed"),
    "target": ("failed",),
    "module": ("processed", "failed"),
}
ALLOWED_EVENTS = {
    "rule": EVENTS,
    "target": ("delivered", "failed"),
    "module": ("processed", "failed"),
}


@dataclass(frozen=True)
class Channel:
    """One `[notify.NAME]`: where notifications go and how `mercli notify` retries them."""

    name: str
    type: str
    body: str = ""  # the body template ("" = the default for the type)
    subject: str = ""  # email only ("" = DEFAULT_SUBJECT)
    phi: bool = False
    timeout: float = 10.0
    retry_delay: float = 10.0
    retry_backoff: float = 2.0
    retry_max_delay: float = 600.0
    max_attempts: int = 20
    max_age: float = 86400.0
    tls_ca: str | None = None
    # webhook
    url: str | None = None
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    content_type: str = "application/json"
    # email
    smtp_host: str | None = None
    smtp_port: int | None = None
    starttls: bool = False
    tls: bool = False
    user: str | None = None
    password: str | None = None  # "${ENV}" only
    password_file: str | None = None
    sender: str | None = None  # `from` in rules.toml
    to: tuple[str, ...] = ()

    def body_template(self) -> str:
        if self.body:
            return self.body
        return DEFAULT_BODY if self.type == "webhook" else DEFAULT_EMAIL_BODY

    def subject_template(self) -> str:
        return self.subject or (DEFAULT_SUBJECT if self.type == "email" else "")

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["headers"], data["to"] = dict(self.headers), list(self.to)
        data["from"] = data.pop("sender")
        return data

    def record(self) -> dict[str, Any]:
        """The channel as notification items and job files carry it: its name, its type and
        what differs from the defaults (`from_json` fills those in again). A few keys instead
        of two dozen: every routed series writes it once per job and notification."""
        return {key: _fresh(value) for key, value in self.shared_record.items()}

    @functools.cached_property
    def shared_record(self) -> dict[str, Any]:
        """`record`, worked out once per channel and the same dict every time: for records
        that are only encoded (a notification log's line), never changed."""
        data = self.to_json()
        return {key: data[key] for key in _recorded_keys(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Channel:
        values = dict(data)
        values["sender"] = values.pop("from", None)
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in values.items() if key in known}
        values["to"] = tuple(values.get("to") or ())
        values["headers"] = dict(values.get("headers") or {})
        return cls(**values)


@dataclass(frozen=True)
class Subscription:
    """A channel and the events one rule, target or module wants on it."""

    channel: Channel
    events: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"channel": self.channel.record(), "on": list(self.events)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Subscription:
        return cls(Channel.from_json(data["channel"]), tuple(data.get("on") or ()))


def _fresh(value: Any) -> Any:
    """A caller's own copy of a record value (headers and `to` are the mutable ones)."""
    if isinstance(value, dict):
        return dict(value)
    return list(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=64)
def _recorded_keys(channel: Channel) -> tuple[str, ...]:
    """The keys of `Channel.record`, worked out once per channel."""
    data, defaults = channel.to_json(), Channel(name=channel.name, type=channel.type).to_json()
    return tuple(key for key in data if key in ("name", "type") or data[key] != defaults[key])


def subscriptions_json(subscriptions: Iterable[Subscription]) -> list[dict[str, Any]]:
    """The JSON of some subscriptions, each channel once per event set (no duplicates)."""
    seen: list[dict[str, Any]] = []
    for subscription in subscriptions:
        data = subscription.to_json()
        if data not in seen:
            seen.append(data)
    return seen


# -- rendering -------------------------------------------------------------------------------


class TemplateProblem(Exception):
    """A template that does not compile, names an unknown variable, or takes too long."""


def _environment(strict: bool) -> Any:
    from jinja2 import StrictUndefined, Undefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(
        autoescape=False,
        undefined=StrictUndefined if strict else Undefined,
        keep_trailing_newline=True,
    )


@functools.lru_cache(maxsize=64)
def _compiled(template: str) -> Any:
    """A template compiled once per process (compiling costs a millisecond; rendering, tens
    of microseconds)."""
    return _environment(strict=False).from_string(template)


def render(template: str, variables: Mapping[str, Any], seconds: float = RENDER_SECONDS) -> str:
    """A template rendered with `variables` (unknown names render empty), at most
    RENDER_LIMIT characters and `seconds` of the template's own work (a loop over a large
    value from a module's result.json that `rules check`'s sample values did not show).
    Raises TemplateProblem (the caller writes a notification saying the template failed
    rather than none)."""
    from jinja2 import TemplateError

    try:
        compiled = _compiled(template)
        out: list[str] = []
        size = 0
        with _time_budget(seconds):
            for chunk in compiled.generate(**variables):
                out.append(chunk)
                size += len(chunk)
                if size > RENDER_LIMIT:
                    break
        return "".join(out)[:RENDER_LIMIT]
    except _OutOfTime:
        raise TemplateProblem(f"template failed: took over {seconds:g} s") from None
    except (TemplateError, ArithmeticError, TypeError, ValueError, RecursionError) as exc:
        raise TemplateProblem(f"template failed: {exc}") from None


class _OutOfTime(Exception):
    """Raised inside a template's code when its time budget is spent."""


@contextmanager
def _time_budget(seconds: float) -> Iterator[None]:
    """Stop template code that runs past `seconds`, in any thread (SIGALRM serves only the
    main one): a trace function on the templates' own frames (Jinja2 compiles them with the
    file name "<template>") checks the clock every TRACE_EVERY lines and raises in them.
    Filters run as Python outside the budget; what they work on is bounded in size."""
    deadline = time.monotonic() + seconds
    lines = 0

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
            if lines % TRACE_EVERY == 0 and time.monotonic() > deadline:
                raise _OutOfTime
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def sample_variables(phi: bool) -> dict[str, Any]:
    """Every documented variable with a plausible value (what `rules check` renders with)."""
    values: dict[str, Any] = dict.fromkeys(VARIABLES, "x")
    values |= {"rules": ["rule"], "instances": 3, "result": {"finding": "none"}}
    if phi:
        values |= dict.fromkeys(PHI_VARIABLES, "x")
    return values


def check_templates(channel: Channel) -> None:
    """Compile and render the channel's templates with sample values, strictly (an unknown
    variable is an error; PHI variables are unknown unless `phi = true`) and within
    CHECK_SECONDS. Raises TemplateProblem."""
    from jinja2 import TemplateError

    environment = _environment(strict=True)
    for what, template in (("body", channel.body_template()), ("subject", channel.subject)):
        if not template:
            continue
        try:
            compiled = environment.from_string(template)
            with _deadline(CHECK_SECONDS):
                rendered = 0
                for chunk in compiled.generate(**sample_variables(channel.phi)):
                    rendered += len(chunk)
                    if rendered > RENDER_LIMIT:
                        break
        except TimeoutError:
            raise TemplateProblem(f"{what} template takes over {CHECK_SECONDS:g} s") from None
        except (TemplateError, ArithmeticError, TypeError, ValueError, RecursionError) as exc:
            hint = ""
            if any(name in str(exc) for name in PHI_VARIABLES) and not channel.phi:
                hint = " (patient data needs phi = true)"
            raise TemplateProblem(f"{what} template: {exc}{hint}") from None


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds` (main thread only; elsewhere no deadline)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
