"""The PySyft 0.2 names, backed by the course's reference implementation.

Code written for the classic PySyft 0.2 tutorials runs with only its import line changed::

    import torch
    from fedcourse import syft_compat as sy   # was: import syft as sy

    hook = sy.TorchHook(torch)
    bob = sy.VirtualWorker(hook, id="bob")
    x_ptr = torch.tensor([1, 2, 3]).send(bob)
    x_ptr.owner == sy.local_worker            # True: "me", the worker the hook created

Workers, pointers and the hook come from ``fedcourse.pointers`` (lesson 01); federated data sets
and the federated data loader from ``fedcourse.federated_data`` (lesson 02). As in PySyft 0.2,
the hook also gives every ``torch.utils.data.Dataset`` a ``federate((bob, alice))`` method, and
``sy.local_worker`` is the local worker itself (an attribute, not a function), the one the
latest hook created.
"""

from fedcourse import pointers as _pointers
from fedcourse.federated_data import BaseDataset, FederatedDataLoader, FederatedDataset, hook_datasets
from fedcourse.pointers import PointerError, PointerLocationError, PointerTensor, VirtualWorker

__all__ = [
    "TorchHook", "VirtualWorker", "PointerTensor", "PointerError", "PointerLocationError",
    "BaseDataset", "FederatedDataLoader", "FederatedDataset", "local_worker",
]


class TorchHook(_pointers.TorchHook):
    """``sy.TorchHook(torch)``: tensors and models learn ``send``, data sets learn ``federate``."""

    def __init__(self, torch_module, *args, **kwargs):
        super().__init__(torch_module, *args, **kwargs)
        hook_datasets()


def __getattr__(name):
    # ``sy.local_worker`` follows the hook: each TorchHook(torch) makes a new local worker "me".
    if name == "local_worker":
        return _pointers.local_worker()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
