"""Coming from mercure (SPEC §10): mercure.json as a mercli rules.toml.

What maps how (README "Coming from mercure" has the table for people):

- targets (`targets.py`): dicom, dicomtls (tls = true + the files), dicomweb (STOW url,
  bearer token or basic auth into secret files), sftp (password into a secret file;
  known_hosts to fill), s3 (keys into an AWS credentials file), folder. dummy: rules that
  only name it become discard-like fallbacks. rsync, xnat: not carried over.
  mercure's global retry_delay/retry_max become each target's retry_delay (no backoff) and
  max_attempts.
- rules (`rules.py`): the expression as written (mercli reads `tags.X` and `@X@`; only the
  case of keywords is corrected), action, action_trigger, the received-series condition as
  `require` (`series.py`), force-completion as on_timeout, priority, processing modules and
  settings, notifications (`notify.py`), fallback, disabled (commented out).
- modules: docker_tag -> image + container = "docker", settings, environment -> env.
- settings (`convert.py`): series/study triggers -> [route], retention -> [purge], off-peak
  hours -> [route] offpeak, port and dicom_receiver.additional_tags -> the receive command.

`writer.import_mercure` converts, verifies with `load_rules`, and writes atomically. Items
that cannot be carried over are in the returned `Report` (dropped: exit 1).
"""

from __future__ import annotations

from mercli.migrate.convert import NotMercure
from mercli.migrate.report import Report
from mercli.migrate.writer import ImportResult, import_mercure

__all__ = ["ImportResult", "NotMercure", "Report", "import_mercure"]
