"""The PySyft 0.2 names, backed by the course's reference implementation.

Code written for the classic PySyft 0.2 tutorials runs with only its import line changed::

    import torch
    from fedcourse import syft_compat as sy   # was: import syft as sy

    hook = sy.TorchHook(torch)
    bob = sy.VirtualWorker(hook, id="bob")
    x_ptr = torch.tensor([1, 2, 3]).send(bob)

Workers, pointers and the hook come from ``fedcourse.pointers`` (lesson 01); federated data sets
and the federated data loader from ``fedcourse.federated_data`` (lesson 02).
"""

from fedcourse.pointers import (  # noqa: F401
    PointerError,
    PointerLocationError,
    PointerTensor,
    TorchHook,
    VirtualWorker,
    local_worker,
)

try:
    from fedcourse.federated_data import BaseDataset, FederatedDataLoader, FederatedDataset  # noqa: F401
except ImportError:  # lesson 02's module not there yet
    pass

__all__ = [
    "TorchHook", "VirtualWorker", "PointerTensor", "PointerError", "PointerLocationError",
    "BaseDataset", "FederatedDataLoader", "FederatedDataset", "local_worker",
]
