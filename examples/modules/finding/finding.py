"""finding: a processing module that checks slice thickness and reports, writing no DICOM.

Written against mercure's module contract only, so it runs under mercure and under mercli:
it reads the instances in $MERCURE_IN_DIR (`<SeriesInstanceUID>#<SOPInstanceUID>.dcm`), from
their `.tags` sidecars where they hold what it needs, else from the DICOM header (pixels are
never read), and writes only `result.json` to $MERCURE_OUT_DIR:

    {"__mercure_notification": {"text": "<n> instances of <Modality> series <SeriesDescription>
                                         checked"},   (one clause per series, joined by "; ")
     "max_slice_thickness": 5.0,
     "series": [{"SeriesInstanceUID": ..., "Modality": ..., "SeriesDescription": ...,
                 "instances": n, "flagged": k}],
     "findings": [{"SeriesInstanceUID": ..., "SOPInstanceUID": ..., "file": ...,
                   "SliceThickness": 7.5, "finding": "slice thickness 7.5 mm > 5.0 mm"}]}

Setting (task.json `process.settings`): `max_slice_thickness` in mm (default 5.0). Exit
status 0 on success (findings or not), 1 on any error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from pydicom import dcmread

KEYS = ("SeriesInstanceUID", "SOPInstanceUID", "Modality", "SeriesDescription", "SliceThickness")
DEFAULT_LIMIT = 5.0


def limit(in_dir: Path) -> float:
    task_file = in_dir / "task.json"
    if not task_file.exists():
        return DEFAULT_LIMIT
    process = json.loads(task_file.read_text(encoding="utf-8")).get("process") or {}
    step = (process[0] if process else {}) if isinstance(process, list) else process
    return float((step.get("settings") or {}).get("max_slice_thickness", DEFAULT_LIMIT))


def header(path: Path) -> dict[str, Any]:
    """The tags this module needs: from the sidecar if it has them all, else from the file."""
    sidecar = path.with_suffix(".tags")
    tags: dict[str, Any] = {}
    if sidecar.exists():
        try:
            tags = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError:
            tags = {}
    if all(key in tags for key in KEYS):
        return tags
    ds = dcmread(path, stop_before_pixels=True, specific_tags=list(KEYS))
    return {key: ds.get(key) for key in KEYS if ds.get(key) not in (None, "")} | tags


def thickness(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def main() -> int:
    in_dir = Path(os.environ.get("MERCURE_IN_DIR", "/tmp/data"))
    out_dir = Path(os.environ.get("MERCURE_OUT_DIR", "/tmp/output"))
    most = limit(in_dir)
    series: dict[str, dict[str, Any]] = {}
    findings = []
    for path in sorted(in_dir.glob("*.dcm")):
        tags = header(path)
        uid = str(tags.get("SeriesInstanceUID") or path.name.partition("#")[0])
        entry = series.setdefault(
            uid,
            {
                "SeriesInstanceUID": uid,
                "Modality": str(tags.get("Modality", "")),
                "SeriesDescription": str(tags.get("SeriesDescription", "")),
                "instances": 0,
                "flagged": 0,
            },
        )
        entry["instances"] += 1
        value = thickness(tags.get("SliceThickness"))
        if value is not None and value > most:
            entry["flagged"] += 1
            findings.append(
                {
                    "SeriesInstanceUID": uid,
                    "SOPInstanceUID": str(tags.get("SOPInstanceUID", "")),
                    "file": path.name,
                    "SliceThickness": value,
                    "finding": f"slice thickness {value:g} mm > {most:g} mm",
                }
            )
    text = "; ".join(
        f"{s['instances']} instances of {s['Modality']} series {s['SeriesDescription']} checked"
        for s in series.values()
    )
    result = {
        "__mercure_notification": {"text": text or "no instances checked"},
        "max_slice_thickness": most,
        "series": list(series.values()),
        "findings": findings,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    checked = sum(s["instances"] for s in series.values())
    print(f"finding: {checked} instance(s) checked, {len(findings)} flagged")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as error:  # any failure: reported by the exit status
        print(f"finding: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
