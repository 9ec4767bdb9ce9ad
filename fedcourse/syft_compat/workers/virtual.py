"""``from syft.workers.virtual import VirtualWorker``: lesson 01's reference worker."""

from fedcourse.pointers import VirtualWorker

__all__ = ["VirtualWorker"]
