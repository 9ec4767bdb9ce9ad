"""``from syft.federated.floptimizer import Optims``: one optimizer per worker.

A stateful optimizer (Adam, SGD with momentum) keeps statistics of the gradients it has seen.
When one model is trained at several workers in turn, ``Optims`` gives each worker its own
optimizer over the same parameters, so that each worker's statistics come from its own data
only. With the course's hook, each one steps the model where it is (see ``fedcourse.pointers``).
"""

from __future__ import annotations

import torch

__all__ = ["Optims"]


class Optims:
    """``Optims(workers, optim=optimizer)``: a copy of ``optimizer`` for each worker id.

    ``workers`` are worker ids (or workers: their ``str`` is used, as in PySyft 0.2). Each copy
    is a new optimizer of the same class over the same parameters, with the same
    hyper-parameters and a copy of the state the original had; ``get_optim(worker_id)``
    returns that worker's copy.
    """

    def __init__(self, workers, optim: torch.optim.Optimizer) -> None:
        if not isinstance(optim, torch.optim.Optimizer):
            raise TypeError(f"Optims needs an optimizer instance (optim=torch.optim.Adam(...)), got {optim!r}")
        self.optim = optim
        self.workers = list(workers)
        self.optimizers = {}
        for worker in self.workers:
            groups = [dict(group, params=list(group["params"])) for group in optim.param_groups]
            twin = type(optim)(groups)
            twin.load_state_dict(optim.state_dict())
            self.optimizers[self._key(worker)] = twin

    @staticmethod
    def _key(worker) -> str:
        return str(getattr(worker, "id", worker))

    def get_optim(self, worker):
        """The optimizer of ``worker`` (its id, or the worker)."""
        key = self._key(worker)
        if key not in self.optimizers:
            raise KeyError(f"no optimizer for worker {key!r}; Optims was made for {list(self.optimizers)}")
        return self.optimizers[key]

    def count(self) -> int:
        """How many workers (and optimizers) there are."""
        return len(self.workers)
