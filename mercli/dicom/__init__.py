"""DICOM on the wire, both roles, without pydicom on the hot paths.

`scp/` accepts associations (what `receive` listens with), `scu/` requests them (what
`dispatch` delivers with); `dimse` (command sets, PDU framing) and `part10` (file meta) are
shared by both, and `sender` names who sent an instance. The defaults both roles start from
live here, once.
"""

DEFAULT_AET = "MERCLI"  # our AE title: what receive answers to and dispatch calls itself
NETWORK_TIMEOUT = 60.0  # seconds a peer may stay silent once associated (receive: and per PDU)
ACSE_TIMEOUT = 30.0  # seconds for the association request or its answer (receive: in total)
