"""The PySyft 0.2 names, backed by the course's reference implementation.

Code written for the classic PySyft 0.2 tutorials runs with only its import lines changed::

    import torch
    from fedcourse import syft_compat as sy   # was: import syft as sy

    hook = sy.TorchHook(torch)
    bob = sy.VirtualWorker(hook, id="bob")
    x_ptr = torch.tensor([1, 2, 3]).send(bob)
    x_ptr.owner == sy.local_worker            # True: "me", the worker the hook created

``import syft`` becomes ``import fedcourse.syft_compat as syft`` and ``from syft.a.b import c``
becomes ``from fedcourse.syft_compat.a.b import c``: the submodules the tutorials import exist
here (``federated.floptimizer``, ``frameworks.torch.fl``, ``workers.virtual``, ``sandbox``).

Checked against OpenMined's own tutorials (PySyft repository, branch ``syft_0.2.x``, Parts 01,
02, 03, 04, 06 and 07, run cell by cell by ``tools/run_pysyft_tutorials.py``) and by
``tests/test_syft_compat.py``. What runs:

- workers, pointers and the hook (``fedcourse.pointers``, lesson 01): ``send``/``get``,
  ``_objects``, ``location``/``owner``/``id_at_location``, remote arithmetic, torch functions
  and autograd, ``move``, garbage collection; sending a pointer on (``x_ptr.send(alice)``,
  ``x.send(bob).send(alice)``: pointer chains) and ``remote_get``;
- models: ``model.send``/``model.get``, calling a sent model on pointers, optimizers made
  before or after ``send``, ``model.copy()``, ``model.move(worker)``; a sent model's
  parameters (``model.weight``, ``model.weight.data``) are pointers to them at its location,
  and the parameter objects left here (``model.parameters()``, what optimizers hold) refuse to
  compute until ``model.get()``: a ``PointerError``, never a silent empty result;
- federated data (``fedcourse.federated_data``, lesson 02): ``federate`` on every
  ``torch.utils.data.Dataset`` of ``(example, target)`` items, ``BaseDataset`` of tensors or of
  pointers, ``FederatedDataset`` (also from a list of remote ``BaseDataset``),
  ``FederatedDataLoader``; ``Optims`` from ``syft.federated.floptimizer``;
- ``create_sandbox(globals())``: the sandbox's workers and a grid to ``search`` by tags, with
  synthetic stand-ins of the same shapes as its scikit-learn data sets, made here from a fixed
  seed: nothing is downloaded (see ``fedcourse.syft_compat.sandbox``);
- ``fedcourse.syft_compat.torchvision``: a stand-in for ``from torchvision import datasets,
  transforms`` whose ``datasets.MNIST`` reads the course's embedded MNIST sample, never the
  network.

What does not: secure multi-party computation and fixed precision (``.share``,
``.fix_precision``) and Plans raise ``NotImplementedError`` saying so (lessons 06 and 07 build
the cryptography of private aggregation themselves). As in PySyft 0.2, ``sy.local_worker`` is
the local worker itself (an attribute, not a function), the one the latest hook created.
"""

import torch as _torch

from fedcourse import pointers as _pointers
from fedcourse.federated_data import BaseDataset, FederatedDataLoader, FederatedDataset, hook_datasets
from fedcourse.pointers import PointerError, PointerLocationError, PointerTensor, VirtualWorker

__all__ = [
    "TorchHook", "VirtualWorker", "PointerTensor", "PointerError", "PointerLocationError",
    "BaseDataset", "FederatedDataLoader", "FederatedDataset", "local_worker", "create_sandbox",
]


def _smpc_not_in_course(*args, **kwargs):
    _pointers._not_in_course("Secure multi-party computation and fixed precision (share, fix_precision, "
                             "float_precision)")


class TorchHook(_pointers.TorchHook):
    """``sy.TorchHook(torch)``: tensors and models learn ``send``, data sets learn ``federate``.

    It also gives tensors and models PySyft's SMPC and fixed-precision methods (``share``,
    ``fix_precision``, ``fix_prec``, ``float_precision``, ``float_prec``), which raise
    ``NotImplementedError`` with a pointer to the lessons that cover the subject.
    """

    def __init__(self, torch_module, *args, **kwargs):
        super().__init__(torch_module, *args, **kwargs)
        hook_datasets()
        for cls in (_torch.Tensor, _torch.nn.Module):
            for name in ("share", "fix_precision", "fix_prec", "float_precision", "float_prec"):
                setattr(cls, name, _smpc_not_in_course)


def create_sandbox(gbs, verbose=True, download_data=True):
    """PySyft 0.2's sandbox: see ``fedcourse.syft_compat.sandbox.create_sandbox``."""
    from fedcourse.syft_compat.sandbox import create_sandbox as _create_sandbox

    return _create_sandbox(gbs, verbose=verbose, download_data=download_data)


# PySyft 0.2 names of what the course leaves out on purpose: each raises NotImplementedError
# with the reason when it is used, rather than an AttributeError that reads like a bug.
_NOT_IN_COURSE = {
    "AdditiveSharingTensor": "Secure multi-party computation (AdditiveSharingTensor)",
    "ReplicatedSharingTensor": "Secure multi-party computation (ReplicatedSharingTensor)",
    "FixedPrecisionTensor": "Fixed precision (FixedPrecisionTensor)",
    "MultiPointerTensor": "Secure multi-party computation (MultiPointerTensor)",
    "Plan": "Plans (sy.Plan)",
    "func2plan": "Plans (sy.func2plan)",
    "method2plan": "Plans (sy.method2plan)",
    "Protocol": "Protocols (sy.Protocol)",
}


def _not_in_course_name(name):
    what = _NOT_IN_COURSE[name]

    def not_in_course(*args, **kwargs):
        if what.startswith(("Plans", "Protocols")):
            raise NotImplementedError(
                f"{what} of PySyft 0.2 are not part of the course's mini PySyft: the course sends one "
                "command per operation (lesson 01's first exercise sketches a plan). For the private "
                "parts that PySyft ran in plans, see lesson 06 (Paillier-encrypted aggregation) and "
                "lesson 07 (secure aggregation)")
        _pointers._not_in_course(what)

    not_in_course.__name__ = name
    return not_in_course


def __getattr__(name):
    # ``sy.local_worker`` follows the hook: each TorchHook(torch) makes a new local worker "me".
    if name == "local_worker":
        return _pointers.local_worker()
    if name in _NOT_IN_COURSE:
        return _not_in_course_name(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
