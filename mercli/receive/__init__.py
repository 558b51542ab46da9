"""`mercli receive`: the C-STORE SCP that writes durably into incoming/.

`handler` is the durable store handler behind our own listener (the default engine),
`service` runs listener processes until a signal; `dcmtk/` is the other engine: DCMTK's
storescp on the wire and getdcmtags into the spool.
"""
