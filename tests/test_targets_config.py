"""rules.toml for the transports of SPEC §5.1 (dicom TLS, dicomweb, sftp, s3) and their
secrets: what loads, what job.json then carries (references, never values), every refusal
with its file:line, and what `rules check` warns about secret files."""

# ruff: noqa: E501  (tables of exact messages read best one per line)

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mercli.errors import ConfigError
from mercli.jobs import Target
from mercli.rules.config import load_rules
from mercli.secrets import SecretError, exposure_warnings, read_secret

RULE = '[[rules]]\nname = "r"\ntargets = ["t"]\n'
WEB = '[targets.t]\ntype = "dicomweb"\nurl = "https://pacs.example.org/dicom-web/"\n'
SFTP = (
    '[targets.t]\ntype = "sftp"\nhost = "sftp.example.org"\nuser = "mercli"\nknown_hosts = "kh"\n'
)
S3 = '[targets.t]\ntype = "s3"\nbucket = "imaging"\n'
TLS = '[targets.t]\ntype = "dicom"\nhost = "pacs"\nport = 2762\ncalled_aet = "PACS"\n'


def load(tmp_path: Path, text: str) -> Target:
    path = tmp_path / "rules.toml"
    path.write_text(text + RULE)
    return load_rules(path).targets["t"]


def test_every_transport_loads_with_references_made_absolute(tmp_path: Path) -> None:
    web = load(tmp_path, WEB + 'auth = "bearer"\ntoken_file = "cloud.token"\nbatch = 20\n')
    assert (web.url, web.auth, web.batch) == ("https://pacs.example.org/dicom-web", "bearer", 20)
    assert web.token_file == str(tmp_path / "cloud.token")
    sftp = load(tmp_path, SFTP + 'key_file = "id"\npath = "/incoming"\n')
    assert (sftp.port, sftp.known_hosts, sftp.key_file) == (
        22,
        str(tmp_path / "kh"),
        str(tmp_path / "id"),
    )
    assert str(sftp.path) == "/incoming"  # a remote path: as given
    s3 = load(tmp_path, S3 + 'prefix = "router/"\nendpoint_url = "http://127.0.0.1:9000"\n')
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == (
        "imaging",
        "router/",
        "http://127.0.0.1:9000",
    )
    tls = load(
        tmp_path,
        TLS
        + 'tls = true\ntls_ca = "ca.pem"\ntls_cert = "me.pem"\ntls_key = "me.key"\ntimeout = "20s"\n',
    )
    assert tls.tls and tls.tls_ca == str(tmp_path / "ca.pem") and tls.timeout == 20


def test_job_json_carries_what_the_type_uses_and_only_references(tmp_path: Path) -> None:
    web = load(tmp_path, WEB + 'auth = "basic"\nusername = "u"\npassword = "${PACS_PASSWORD}"\n')
    data = web.to_json()
    assert data["password"] == "${PACS_PASSWORD}" and "token_file" not in data
    assert Target.from_json(json.loads(json.dumps(data))) == web
    plain = load(tmp_path, TLS).to_json()
    assert not {"tls", "url", "bucket", "known_hosts"} & set(plain)


ERRORS = [
    (TLS + 'tls_ca = "ca.pem"\n', 6, '"tls_ca" needs tls = true'),
    (TLS + 'tls = true\ntls_key = "k"\n', 7, '"tls_key" needs "tls_cert" (the client certificate)'),
    (
        WEB.replace("https", "ftp"),
        3,
        "\"url\" must be an http:// or https:// URL, not 'ftp://pacs.example.org/dicom-web/'",
    ),
    (WEB + 'auth = "digest"\n', 4, 'unknown auth "digest" (known: none, basic, bearer)'),
    (WEB + 'auth = "basic"\npassword_file = "p"\n', 1, 'auth = "basic" needs "username"'),
    (
        WEB + 'auth = "bearer"\n',
        1,
        'give "token_file" (a file) or token = "${ENV_VAR}", one of them',
    ),
    (
        WEB + 'auth = "bearer"\ntoken = "hunter2"\n',
        5,
        '"token" must be "${ENV_VAR}": a secret written here would be copied into every job.json; put it in "token_file" or the environment',
    ),
    (
        WEB + 'auth = "bearer"\ntoken = "${T}"\ntoken_file = "t"\n',
        6,
        'give "token_file" (a file) or token = "${ENV_VAR}", one of them',
    ),
    (WEB + 'token_file = "t"\n', 4, '"token_file" does not go with auth = "none"'),
    (WEB.replace("https", "http") + 'tls_ca = "ca"\n', 4, '"tls_ca" needs an https:// url'),
    (WEB + "batch = 0\n", 4, '"batch" must be between 1 and 10000, not 0'),
    (
        SFTP.replace('known_hosts = "kh"\n', 'key_file = "id"\n'),
        1,
        'missing key "known_hosts" (unknown host keys are refused; see README)',
    ),
    (SFTP, 1, 'give "key_file" or "password_file" (or password = "${ENV}")'),
    (
        SFTP + 'password = "secret"\n',
        6,
        '"password" must be "${ENV_VAR}": a secret written here would be copied into every job.json; put it in "password_file" or the environment',
    ),
    (SFTP + 'key_file = "k"\nport = 0\n', 7, '"port" must be between 1 and 65535, not 0'),
    (
        S3.replace("imaging", "Imaging_Bucket"),
        3,
        "bad bucket name 'Imaging_Bucket' (3-63 of a-z, 0-9, '.', '-')",
    ),
    (S3 + 'prefix = "/root"\n', 4, '"prefix" must not start with "/": \'/root\''),
    (S3 + 'endpoint_url = "s3.example.org"\n', 4, '"endpoint_url" must be an http(s):// URL'),
    (
        S3 + 'secret_key = "x"\n',
        4,
        'unknown key "secret_key" (allowed: type, bucket, prefix, endpoint_url, region, credentials_file, profile, timeout, tls_ca, retry_delay, retry_backoff, retry_max_delay, max_attempts, max_age, priority, notify, notify_on, deidentify, deidentify_options, pseudonym_secret_file, allow_burned_in, keep_private, modify, transfer_syntax, allow_lossy)',
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), ERRORS)
def test_refusals_name_file_line_and_target(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    where = f"{tmp_path / 'rules.toml'}:{line}"
    assert str(info.value) == f'{where}: target "t": {message}'


def test_read_secret_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cr3t-value\n")
    assert read_secret(str(secret), "target") == "s3cr3t-value"
    monkeypatch.setenv("MERCLI_TEST_TOKEN", "from-env")
    assert read_secret("${MERCLI_TEST_TOKEN}", "target") == "from-env"
    with pytest.raises(SecretError, match="environment variable MERCLI_NOT_SET is not set"):
        read_secret("${MERCLI_NOT_SET}", 'target "t" token')
    with pytest.raises(SecretError) as info:
        read_secret(str(tmp_path / "missing"), 'target "t" token')
    assert (
        str(info.value)
        == f'target "t" token: cannot read {tmp_path / "missing"}: No such file or directory'
    )
    big = tmp_path / "big"
    big.write_bytes(b"x" * 70_000)
    with pytest.raises(SecretError, match="larger than"):
        read_secret(str(big), "t")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(SecretError) as info:
        read_secret(str(binary), "t")
    assert "\\xff" not in str(info.value) and "not UTF-8" in str(info.value)


def test_exposure_warnings(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("x")
    secret.chmod(0o640)
    assert exposure_warnings({"token_file": str(secret)}) == []
    secret.chmod(0o644)
    (warning,) = exposure_warnings({"token_file": str(secret)})
    assert warning == f"token_file {secret} is open to other users (chmod o-rwx {secret})"
    (missing,) = exposure_warnings({"key_file": str(tmp_path / "nope")})
    assert "No such file or directory" in missing
    assert exposure_warnings({"password": "${PW}", "token_file": None}) == []


def test_rules_check_warns_on_stderr_and_never_prints_a_secret(tmp_path: Path) -> None:
    token = tmp_path / "cloud.token"
    token.write_text("very-secret-token-value\n")
    token.chmod(0o604)
    rules = tmp_path / "rules.toml"
    rules.write_text(WEB + f'auth = "bearer"\ntoken_file = "{token}"\n' + RULE)
    result = subprocess.run(
        [sys.executable, "-m", "mercli", "rules", "check", str(rules)],
        capture_output=True,
        text=True,
        env={**os.environ},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ok: " in result.stdout
    assert f'warning: target "t": token_file {token} is open to other users' in result.stderr
    assert "very-secret" not in result.stdout + result.stderr
