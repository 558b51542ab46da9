"""Files into the spool: `mercli ingest PATH...` and the drop folder `mercli watch DIR`.

Both publish into `incoming/` through receive's own store handler (`publish.Ingester`), so an
ingested instance is indistinguishable from a received one but for its receive metadata:
`SenderAET` is `--sender-aet` (default `INGEST`), `SenderAddress` is `file`. Same Part 10
header, sidecar, durability, duplicate rule, quarantine of unreadable instances in `error/`,
`received` events, and completion hints when the ingest (or a watch pass) ends.

Modules, each depending only on those before it: `header` (what a file's head says),
`sources` (which files: folders, DICOMDIRs, symlink rules), `publish` (`Ingester`: files and
zip members through the store handler, with size limits), `run` (`ingest`, the command's
library function), `journal` and `ready` (the drop folder's exactly-once record and its test
for complete files), `watch` (the drop folder loop).
"""

from mercli.ingest.publish import FileResult, IngestConfig, Ingester
from mercli.ingest.run import IngestReport, ingest
from mercli.ingest.watch import WatchConfig, watch

__all__ = [
    "FileResult",
    "IngestConfig",
    "IngestReport",
    "Ingester",
    "WatchConfig",
    "ingest",
    "watch",
]
