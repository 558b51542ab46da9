"""DICOM on the wire, both roles, without pydicom on the hot paths.

`scp/` accepts associations (what `receive` listens with), `scu/` requests them (what
`dispatch` delivers with); `dimse` (command sets, PDU framing) and `part10` (file meta) are
shared by both, and `sender` names who sent an instance. The defaults both roles start from
live here, once.
"""

DEFAULT_AET = "MERCLI"  # our AE title: what receive answers to and dispatch calls itself
NETWORK_TIMEOUT = 60.0  # seconds a peer may stay silent once associated (receive: and per PDU)
ACSE_TIMEOUT = 30.0  # seconds for the association request or its answer (receive: in total)


def import_pydicom() -> None:
    """Import pydicom without `requests`, which it loads (with urllib3, ~50 ms) only to
    download its own test data, something mercli never asks of it; pydicom falls back to
    urllib by itself. `requests` stays importable for anyone else: it is hidden only while
    pydicom is first imported. For short-lived commands (`dispatch --once` of an editing
    target) that time is a tenth of the run."""
    import sys

    if "pydicom" in sys.modules or "requests" in sys.modules:
        return
    sys.modules["requests"] = None  # type: ignore[assignment]  # import requests: ImportError
    try:
        import pydicom  # noqa: F401
    finally:
        del sys.modules["requests"]
