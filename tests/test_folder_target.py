"""Folder targets: `DEST/<job id>/` appears complete or not at all, on real filesystems."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mercli.dispatch.targets.folder import TargetError, deliver_to_folder
from mercli.errors import ConfigError
from mercli.rules.config import load_rules
from mercli.spool import NotRegularFile


def job_files(folder: Path, count: int = 3, size: int = 5000) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for n in range(count):
        dcm, tags = folder / f"{n}.dcm", folder / f"{n}.tags"
        dcm.write_bytes(bytes([n]) * size)
        tags.write_text(f'{{"InstanceNumber": {n}}}')
        files += [dcm, tags]
    return files


def test_job_lands_complete_with_hard_links(tmp_path: Path) -> None:
    files = job_files(tmp_path / "spool")
    dest = tmp_path / "archive" / "deep"  # created on demand
    final = deliver_to_folder(files, dest, "job-1", link=True)
    assert final == dest / "job-1"
    assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in files)
    for source in files:
        assert (final / source.name).read_bytes() == source.read_bytes()
        assert (final / source.name).stat().st_ino == source.stat().st_ino  # no copy
    assert os.listdir(dest) == ["job-1"]  # no temporary left


def test_copies_by_default_make_independent_files(tmp_path: Path) -> None:
    files = job_files(tmp_path / "spool")
    final = deliver_to_folder(files, tmp_path / "dest", "job-2")
    for source in files:
        copy = final / source.name
        assert copy.read_bytes() == source.read_bytes()
        assert copy.stat().st_ino != source.stat().st_ino


def test_leftovers_of_a_crashed_attempt_are_removed(tmp_path: Path) -> None:
    files = job_files(tmp_path / "spool")
    dest = tmp_path / "dest"
    stale = dest / ".job-3.tmp-deadbeef"
    stale.mkdir(parents=True)
    (stale / "0.dcm").write_bytes(b"half")
    other = dest / ".job-30.tmp-cafe"  # another job's temporary is not ours to touch
    other.mkdir()
    final = deliver_to_folder(files, dest, "job-3")
    assert sorted(os.listdir(dest)) == [".job-30.tmp-cafe", "job-3"]
    assert (final / "0.dcm").read_bytes() == files[0].read_bytes()


def test_delivered_files_and_folders_get_the_spools_modes(tmp_path: Path) -> None:
    files = job_files(tmp_path / "spool")
    old = os.umask(0)
    try:
        final = deliver_to_folder(files, tmp_path / "dest", "job-m")
    finally:
        os.umask(old)
    assert final.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in final.iterdir()} == {0o640}


@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
def test_a_symlink_in_a_job_is_refused_never_followed(tmp_path: Path, link: bool) -> None:
    secret = tmp_path / "root-only"
    secret.write_bytes(b"SECRET-ROOT-ONLY-CONTENT")
    secret.chmod(0o600)
    files = job_files(tmp_path / "spool", count=2)
    files[2].unlink()
    files[2].symlink_to(secret)  # 1.dcm -> a file outside the spool
    dest = tmp_path / "dest"
    with pytest.raises(NotRegularFile, match="symlink") as info:
        deliver_to_folder(files, dest, "job-s", link=link)
    assert info.value.filename == str(files[2])
    assert os.listdir(dest) == []  # no job, no temporary, nothing of the secret
    os.mkfifo(tmp_path / "spool" / "2.dcm")  # a FIFO must not hang the dispatcher either
    with pytest.raises(NotRegularFile, match="FIFO"):
        deliver_to_folder([tmp_path / "spool" / "2.dcm"], dest, "job-f", link=link)
    assert os.listdir(dest) == []


def test_existing_final_folder_counts_as_delivered(tmp_path: Path) -> None:
    files = job_files(tmp_path / "spool")
    dest = tmp_path / "dest"
    first = deliver_to_folder(files, dest, "job-4")
    marker = os.stat(first).st_mtime_ns
    assert deliver_to_folder(files, dest, "job-4") == first  # crash after rename: no rewrite
    assert os.stat(first).st_mtime_ns == marker
    (dest / "job-5").write_text("not a folder")
    with pytest.raises(TargetError, match="not a folder"):
        deliver_to_folder(files, dest, "job-5")


@pytest.mark.parametrize("job_id", ["", ".", "..", "../x", "a/b", ".hidden", "a\x00b", "a\nb"])
def test_unsafe_job_ids_are_refused(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(TargetError, match="not a safe folder name"):
        deliver_to_folder(job_files(tmp_path / "spool", 1), tmp_path / "dest", job_id)
    assert not (tmp_path / "dest").exists()


def test_unwritable_destination_is_a_target_error(tmp_path: Path) -> None:
    files = job_files(tmp_path / "spool")
    with pytest.raises(TargetError, match="not a folder"):
        deliver_to_folder(files, files[0], "job-6")  # dest is a file


def _in_namespace(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Run Python code as root of a private mount namespace (a tmpfs of our own)."""
    script = tmp_path / "namespace.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(
        ["unshare", "-rm", sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=60,
        check=False,
    )


def test_cross_filesystem_copy_and_full_disk(tmp_path: Path) -> None:
    """DEST on a 1 MB tmpfs: the first job is copied across, the big one hits ENOSPC."""
    files = job_files(tmp_path / "spool", count=3, size=100_000)
    big = job_files(tmp_path / "big", count=8, size=200_000)
    mount = tmp_path / "small"
    mount.mkdir()
    result = _in_namespace(
        tmp_path,
        f"""
        import os, subprocess
        from pathlib import Path
        from mercli.dispatch.targets.folder import TargetError, deliver_to_folder
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "{mount}"], check=True)
        dest = Path("{mount}") / "dest"
        files = [Path(p) for p in {[str(p) for p in files]!r}]
        final = deliver_to_folder(files, dest, "small-job")
        for source in files:
            copy = final / source.name
            assert copy.read_bytes() == source.read_bytes()
            assert copy.stat().st_dev != source.stat().st_dev
        try:
            deliver_to_folder([Path(p) for p in {[str(p) for p in big]!r}], dest, "big-job")
        except TargetError as exc:
            print("ERROR", exc)
        print("LISTING", sorted(os.listdir(dest)))
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR cannot deliver to folder target: no space left" in result.stdout
    assert "LISTING ['small-job']" in result.stdout  # no big-job, no temporary


FOLDER_RULES = """
[targets.archive]
type = "folder"
path = "archive"
{link}
[[rules]]
name = "all"
targets = ["archive"]
"""


@pytest.mark.parametrize(
    ("line", "value"), [("", False), ("link = true", True), ("link = false", False)]
)
def test_rules_accept_link_on_folder_targets(tmp_path: Path, line: str, value: bool) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(FOLDER_RULES.format(link=line))
    target = load_rules(path).targets["archive"]
    assert target.link is value and target.to_json()["link"] is value


@pytest.mark.parametrize("value", ['"yes"', "1", "[true]"])
def test_rules_refuse_a_link_that_is_not_a_boolean(tmp_path: Path, value: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(FOLDER_RULES.format(link=f"link = {value}"))
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    assert str(info.value).startswith(f'{path}:5: target "archive": "link" must be true or false')
