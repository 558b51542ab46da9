"""The accepting side: our own blocking upper layer on pynetdicom's PDU codecs.

`listener` accepts connections (one thread per association), `connection` runs one
association's PDU and DIMSE state machine and streams each data set to the store handler,
`negotiation` decides what the A-ASSOCIATE-RQ gets (AE checks, presentation contexts).
"""
