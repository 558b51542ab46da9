"""`mercli tags FILE...`: print the sidecar JSON that receive would write for each file."""

from __future__ import annotations

import json
import traceback
import warnings
from pathlib import Path
from typing import Any

import click

from mercli.commands.options import check_extra_tags
from mercli.errors import ExitCode
from mercli.tags import UnreadableDicom, read_tags


@click.command("tags", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument(
    "files", metavar="FILE...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@click.option(
    "--extra-tag",
    "--extra",
    "extra",
    metavar="TAG",
    multiple=True,
    callback=check_extra_tags,
    help="Also print this attribute: a keyword (PatientWeight) or a tag ((0019,100A), "
    "0019100A). Repeatable. Tags without a keyword are keyed GGGG,EEEE.",
)
@click.option(
    "--indent",
    type=click.IntRange(min=0),
    metavar="N",
    default=None,
    help="Pretty-print each object, indented by N spaces (default: one compact line each).",
)
@click.option(
    "-v", "--verbose", count=True, help="Show pydicom's warnings, and tracebacks on errors."
)
@click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors (the default).")
def tags(
    files: tuple[Path, ...], extra: tuple[str, ...], indent: int | None, verbose: int, quiet: bool
) -> None:
    """Print the sidecar JSON that receive writes next to each instance.

    Every instance that receive stores as NAME.dcm gets a sidecar NAME.tags: one flat JSON
    object with the attributes routing needs, keyed by DICOM keyword (SOPInstanceUID,
    Modality, PatientName, StudyDescription, ImageType, ...). Rules in rules.toml are
    evaluated on the sidecar, never on the DICOM file. This command prints the same object
    for any DICOM file (without receive's SenderAET, SenderAddress, ReceiverAET and
    ReceivedAt), so you can see exactly what a rule will see.

    \b
    The format:
      text        UTF-8 strings, decoded per Specific Character Set;
                  PN as Family^Given
      numbers     IS US UL SS SL as integers, DS FL FD as floats; a value
                  that does not parse stays a string
      multiple    multi-valued attributes are lists: ["ORIGINAL", "PRIMARY"]
      missing     attributes that are missing or empty are left out
                  (a rule reads them as "")
      skipped     sequences and binary data (OB, OW, UN, ...)

    One JSON object per FILE and line (NDJSON) on stdout, keys in a fixed order;
    --indent pretty-prints. A FILE that cannot be read gives "Error: <reason> (<FILE>)"
    on stderr; the other files are still printed, and the exit code is 1.

    \b
    Examples:
      mercli tags image.dcm
      mercli tags --indent 2 --extra PatientWeight --extra '(0019,100A)' image.dcm
      mercli tags series/*.dcm | jq -r .SeriesInstanceUID | sort -u
    """
    failed = 0
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")  # pydicom warns about every odd value it reads
        for path in files:
            try:
                sidecar = read_tags(path, extra=extra)
            except UnreadableDicom as exc:
                failed += 1
                click.echo(f"Error: {exc} ({path})", err=True)
                if verbose:
                    click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
                continue
            click.echo(_dumps(sidecar, indent))
    if failed:
        click.get_current_context().exit(int(ExitCode.SOME_FAILED))


def _dumps(sidecar: dict[str, Any], indent: int | None) -> str:
    if indent is None:
        return json.dumps(sidecar, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return json.dumps(sidecar, ensure_ascii=False, allow_nan=False, indent=indent)
