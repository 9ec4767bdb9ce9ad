"""``syft.workers``: the virtual worker (``workers.virtual.VirtualWorker``)."""
