"""The requesting side: what dispatch delivers with, importing neither pydicom nor pynetdicom.

`acse` encodes the A-ASSOCIATE-RQ and decodes the answer, `association` owns one socket
(connect, negotiate, send, release or abort, with typed peer errors), `session` is the
C-STORE / C-ECHO SCU over it, and `transcode` converts an instance the peer cannot take in
its own transfer syntax (loading pydicom only then).
"""
