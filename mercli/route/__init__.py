"""`mercli route`: complete series batches in incoming/ become jobs or discarded items.

`router` decides when a batch is complete and turns it into jobs (one transaction per batch);
`service` runs it once or as a service woken by file events.
"""
