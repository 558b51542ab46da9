"""`Sender`: who sent an instance, the one name for it on every receiving path.

The default engine learns it from the A-ASSOCIATE-RQ (`mercli.dicom.scp.negotiation`), the
dcmtk engine from storescp's log (`mercli.receive.dcmtk.staging`), and `getdcmtags` reads it
per file from its stdin (C++ `getdcmtags::Sender`). All of them end in the sidecar as
SenderAET, ReceiverAET and SenderAddress (SPEC §3).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sender:
    """The calling and called AE titles of the association that carried an instance, and the
    sender's IP address."""

    calling_aet: str = ""
    called_aet: str = ""
    address: str = ""
