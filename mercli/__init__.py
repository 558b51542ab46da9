"""mercli: a DICOM router as composable Unix commands over one crash-safe spool."""

__version__ = "0.1.0"
