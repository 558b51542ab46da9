"""The command line that runs a module's container image (SPEC §7): one template per engine.

A module configured with `image` + `container` runs as the argv `container_argv` returns;
mercli adds nothing else (no shell is involved). `in/` is mounted read-only at `/tmp/data` and
`out/` read-write at `/tmp/output`, where mercure modules expect them, and the environment
names both. Isolation is on by default: no network, no capabilities, no privilege gain, the
files written as the user running mercli.

docker, podman::

    docker run --rm --network none --cap-drop ALL --security-opt no-new-privileges
        --user UID:GID [--userns keep-id]       # podman, when not run as root
        -v IN:/tmp/data:ro -v OUT:/tmp/output:rw
        -e MERCURE_IN_DIR=/tmp/data -e MERCURE_OUT_DIR=/tmp/output
        -e MERCLI_IN_DIR=/tmp/data -e MERCLI_OUT_DIR=/tmp/output
        -e K=V ...                              # the module's `env`, in key order
        IMAGE

  The image's own entrypoint/CMD runs. Rootless podman maps the host user to root inside the
  container, so `--userns keep-id` keeps the host UID inside and the output owned by mercli.

apptainer::

    apptainer run --containall --no-home --no-privs --net --network none
        --bind IN:/tmp/data:ro --bind OUT:/tmp/output:rw
        --env MERCURE_IN_DIR=/tmp/data ... --env K=V ...
        docker://IMAGE | /path/to/image.sif

  `run`, not `exec`: `exec` needs a command, `run` starts the image's runscript, which for an
  image built from Docker is its ENTRYPOINT/CMD, as under docker. `--containall` isolates the
  file systems, PID and IPC namespaces and cleans the host environment (only `--env` values
  reach the module); `--net --network none` gives a network namespace with loopback only.
  IMAGE is used as given when it names a local file (`.sif`, or an absolute or `./` path) or
  has a scheme (`docker://`, `oras://`, ...); otherwise it is a registry name and gets
  `docker://`.

Refused with ValueError: an unknown engine; an image that is empty, starts with `-` (it would
be read as an option) or holds NUL, a newline, or whitespace; env keys that are not
`[A-Za-z_][A-Za-z0-9_]*` or that would override the four directory variables; env values with
NUL or a newline; directories whose paths hold NUL, a newline, `:` or `,` (the mount syntax's
separators). An env value may start with `-` (e.g. `-Xmx4g`): it is never an argv element of
its own, always `K=V`. Relative directories are made absolute (docker would read a bare name
as a named volume).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

ENGINES = ("docker", "podman", "apptainer")
CONTAINER_IN_DIR = "/tmp/data"
CONTAINER_OUT_DIR = "/tmp/output"
DIRECTORY_VARIABLES = ("MERCURE_IN_DIR", "MERCURE_OUT_DIR", "MERCLI_IN_DIR", "MERCLI_OUT_DIR")

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def container_argv(
    engine: str,
    image: str,
    in_dir: Path,
    out_dir: Path,
    env: Mapping[str, str],
    *,
    uid: int | None = None,
    gid: int | None = None,
    rootless: bool | None = None,
) -> list[str]:
    """The argv that runs `image` on `in_dir`/`out_dir` with `engine` (see the module docs).

    `uid`/`gid` default to the calling process's real user and group; `rootless` (podman's
    `--userns keep-id`) defaults to "mercli does not run as root".
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown container engine {engine!r} (use {', '.join(ENGINES)})")
    _check_image(image)
    source, output = _check_dir(in_dir, "in"), _check_dir(out_dir, "out")
    variables = _environment(env)
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    if engine == "apptainer":
        argv = ["apptainer", "run", "--containall", "--no-home", "--no-privs"]
        argv += ["--net", "--network", "none"]
        argv += ["--bind", f"{source}:{CONTAINER_IN_DIR}:ro"]
        argv += ["--bind", f"{output}:{CONTAINER_OUT_DIR}:rw"]
        for key, value in variables:
            argv += ["--env", f"{key}={value}"]
        return [*argv, _apptainer_image(image)]
    argv = [engine, "run", "--rm", "--network", "none", "--cap-drop", "ALL"]
    argv += ["--security-opt", "no-new-privileges", "--user", f"{uid}:{gid}"]
    if engine == "podman" and (os.geteuid() != 0 if rootless is None else rootless):
        argv += ["--userns", "keep-id"]
    argv += ["-v", f"{source}:{CONTAINER_IN_DIR}:ro", "-v", f"{output}:{CONTAINER_OUT_DIR}:rw"]
    for key, value in variables:
        argv += ["-e", f"{key}={value}"]
    return [*argv, image]


def _check_image(image: str) -> None:
    if not image or image.startswith("-"):
        raise ValueError(f"container image {image!r} is empty or would be read as an option")
    if any(c.isspace() or c == "\0" for c in image):
        raise ValueError(f"container image {image!r} holds whitespace, a newline or NUL")


def _check_dir(path: Path, which: str) -> str:
    text = os.path.abspath(os.fspath(path))
    if any(c in text for c in "\0\n\r:,"):
        raise ValueError(f"{which} directory {text!r} holds NUL, a newline, ':' or ','")
    return text


def _environment(env: Mapping[str, str]) -> list[tuple[str, str]]:
    variables = [("MERCURE_IN_DIR", CONTAINER_IN_DIR), ("MERCURE_OUT_DIR", CONTAINER_OUT_DIR)]
    variables += [("MERCLI_IN_DIR", CONTAINER_IN_DIR), ("MERCLI_OUT_DIR", CONTAINER_OUT_DIR)]
    for key in sorted(env):
        value = env[key]
        if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
            raise ValueError(f"env key {key!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if key in DIRECTORY_VARIABLES:
            raise ValueError(f"env key {key} is set by mercli and cannot be overridden")
        if not isinstance(value, str) or any(c in value for c in "\0\n\r"):
            raise ValueError(f"env value of {key} must be a string without NUL or newline")
        variables.append((key, value))
    return variables


def _apptainer_image(image: str) -> str:
    local = image.endswith(".sif") or image.startswith(("/", "./", "../"))
    return image if local or _SCHEME.match(image) else f"docker://{image}"
