"""`mercli dispatch`: jobs in outgoing/ delivered to their targets, retried, settled.

`dispatcher` picks jobs (ordering, backoff, unreachable targets) and settles each attempt,
`service` runs worker threads once or as a service, and `targets/` has one module per target
type behind one interface.
"""
