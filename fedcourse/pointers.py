"""A mini PySyft 0.2: virtual workers, pointer tensors, remote execution and remote autograd.

This is the reference version of what lesson 01-pointer-tensors has students build; lesson 02
and later lessons use it (through the PySyft-0.2-compatible names in ``fedcourse.syft_compat``).

The pieces
----------
- ``VirtualWorker(hook, id="bob")`` is a machine simulated in this process. It keeps what it
  was sent in ``_objects`` (id -> object) and talks to other workers only through *messages*:
  every message is serialized to bytes by the sender and deserialized by the receiver, so a
  worker never holds a Python object that its sender also holds. Each worker counts
  ``bytes_sent``, ``bytes_received``, ``messages_sent`` and ``messages_received``.
- ``PointerTensor`` is what the owner keeps after sending a tensor: the owner (``me``), the
  ``location`` and the remote ``id_at_location``. Arithmetic, matmul, tensor methods,
  torch functions (``torch.add``, ``torch.nn.functional.nll_loss`` ...) and reductions on
  pointers run *at the location* and give back pointers to the results. Only a command
  (function name, argument ids, scalars) travels to the worker and only a small descriptor
  comes back; the values stay where they are until somebody calls ``.get()``. Operations
  that mix pointers at two workers, or a pointer and a local tensor, raise
  ``PointerLocationError`` naming both ends instead of copying data behind your back.
  Dropping the last reference to a pointer deletes the remote object (garbage collection).
  A pointer can itself be sent on, as in PySyft 0.2: ``x.send(bob).send(alice)`` leaves the
  tensor at bob, a pointer to it (owned by alice) at alice, and gives a pointer to alice's
  pointer. Operations travel down such a chain; ``.get()`` brings back one link at a time and
  ``.remote_get()`` makes alice fetch the value from bob.
- ``TorchHook(torch)`` adds ``torch.Tensor.send``, ``torch.nn.Module.send``,
  ``torch.nn.Module.get``, ``.move`` and ``.copy``, creates the local worker ``me``
  (``hook.local_worker``), and lets a sent model be called on pointers and trained by an
  optimizer created on the local model.

Design choice: pointers are tensor-likes, models are proxies
------------------------------------------------------------
PySyft 0.2 wrapped every tensor in a chain of Python objects and rewrote every torch method.
Here a ``PointerTensor`` is a plain Python object that implements torch's
``__torch_function__`` protocol (a "tensor-like", not a ``torch.Tensor`` subclass): every torch
function that receives a pointer, including those inside ``torch.nn.functional``, hands the
call to the pointer, which forwards it to its location. A subclass of ``torch.Tensor`` would
have to pretend to have a local storage, shape and device it does not have; a tensor-like has
none, so nothing can read remote values by accident (``.item()``, ``bool(ptr)`` and friends
raise and say to call ``.get()``).

A model is not turned into a tree of pointers. ``model.send(worker)`` ships the whole module
(parameters, gradients, buffers) to the worker and leaves a *shell* behind: the same module
object and the same ``nn.Parameter`` objects, emptied. The shell forwards:

- ``model(data_ptr)`` (and calls of its submodules) run the module at its location;
- ``optimizer.step()``: an optimizer built on the local model before the loop still holds the
  shell's parameters. A global optimizer step pre-hook notices parameters that are away and
  runs the same optimizer class with the same hyper-parameters at the model's location on the
  remote parameters, shipping the optimizer's per-parameter state there and back (empty for
  plain SGD). The local step then skips those parameters (their ``.grad`` is ``None``);
- ``optimizer.zero_grad()`` and ``model.zero_grad()`` also clear the remote gradients;
- ``model.get()`` brings the module back and pours its values, gradients and buffers into the
  shell's existing parameter objects, so the optimizer keeps working on the same objects;
- reading a parameter or buffer by name, ``model.weight`` (or ``model.fc1.weight``), gives a
  pointer to it at the model's location, as in PySyft 0.2, so that ``(m1.weight.data +
  m2.weight.data) / 2`` computes with the real values there; ``model.parameters()`` still yields
  the shell's parameter objects, which is what optimizers hold; while the model is away they
  refuse to compute (a ``PointerError`` naming the model's location, never a silent empty
  result) and only their metadata reads. ``model.state_dict()``
  and ``model.copy()`` refuse while the model is away (an empty copy would be a silent error);
- ``model.move(worker)`` moves the model from its worker straight to another one, and dropping
  the last reference to the shell deletes the model where it is.

So the classic PySyft 0.2 loop runs unchanged: ``model.send(data.location)``,
``optimizer.zero_grad()``, ``output = model(data)``, ``loss = F.nll_loss(output, target)``,
``loss.backward()``, ``optimizer.step()``, ``model.get()``, ``loss = loss.get()``. The data and
the targets never leave their worker: what travels is the model (there and back), commands,
descriptors, optimizer state, and the loss when asked for.

Serialization packs a tensor as its dtype, shape, raw bytes, ``requires_grad`` and gradient,
so that byte counts mean what they say (``torch.save`` would add about a kilobyte of zip
container per tensor). Values leave a worker detached from its autograd graph: a graph never
travels.
"""

from __future__ import annotations

import io
import pickle
import random
import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from fedcourse.checks import toolbox

__all__ = [
    "VirtualWorker", "PointerTensor", "TorchHook", "PointerLocationError", "PointerError",
    "serialize", "deserialize", "send", "local_worker",
]

_ID_RANDOM = random.Random()  # separate generator: seeding the lesson's RNG must not collide ids


def _new_id() -> int:
    return _ID_RANDOM.randint(10**10, 10**11 - 1)  # PySyft-style 11-digit ids


def _not_in_course(what: str):
    raise NotImplementedError(
        f"{what}: PySyft 0.2 had it, the course's mini PySyft does not. The course builds the "
        "cryptography of private aggregation itself instead: lesson 06 (Paillier-encrypted aggregation, "
        "fixed point) and lesson 07 (secure aggregation with masks and Shamir secret sharing)")


class PointerError(RuntimeError):
    """A pointer was used in a way that cannot work (already fetched, value needed locally ...)."""


class PointerLocationError(PointerError, ValueError):
    """An operation mixed objects that live at different workers (a ValueError, as in lesson 01)."""


# --------------------------------------------------------------------------------------------
# Serialization: what goes over the (virtual) wire


def _tensor_state(tensor: torch.Tensor) -> tuple:
    flat = tensor.detach().contiguous().reshape(-1)
    raw = flat.cpu().view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    grad = None
    if tensor.is_leaf and tensor.grad is not None:
        grad = _tensor_state(tensor.grad)
    requires_grad = tensor.requires_grad and tensor.is_leaf
    return (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), str(tensor.device),
            raw, requires_grad, grad, isinstance(tensor, torch.nn.Parameter))


def _rebuild_tensor(state: tuple) -> torch.Tensor:
    dtype_name, shape, device, raw, requires_grad, grad, is_parameter = state
    dtype = getattr(torch, dtype_name)
    if raw:
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)
    else:
        flat = torch.empty(0, dtype=dtype)
    tensor = flat.reshape(shape).to(device)
    if is_parameter:
        tensor = torch.nn.Parameter(tensor, requires_grad=requires_grad)
    elif requires_grad:
        tensor.requires_grad_(True)
    if grad is not None:
        tensor.grad = _rebuild_tensor(grad)
    return tensor


# Classes (and functions) that pickle cannot find by name, e.g. a model class defined inside a
# function. Code is not data: like PySyft, we assume every worker runs the same program, so such
# an object travels as a name into this table rather than being refused.
_UNNAMED_CODE: dict[str, Any] = {}


def _findable_by_name(obj) -> bool:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    if not module or "<locals>" in qualname or "<lambda>" in qualname:
        return False
    found = sys.modules.get(module)  # e.g. a class defined by exec() in a namespace other than its module's
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, type) and not _findable_by_name(obj):
            key = f"{obj.__module__}.{obj.__qualname__}@{id(obj)}"
            _UNNAMED_CODE[key] = obj
            return key
        return None

    def reducer_override(self, obj):
        if type(obj) in (torch.Tensor, torch.nn.Parameter):
            return _rebuild_tensor, (_tensor_state(obj),)
        if isinstance(obj, PointerTensor):
            if not _TRANSFER["pointers"]:
                raise PointerError(f"cannot send a pointer ({obj!r}) inside a message; use .move(worker) "
                                   "to move the object it points to, or ptr.send(worker) to send the pointer")
            # The pointer itself changes hands (ptr.send(alice), or a pointer fetched with .get()):
            # the receiver's copy now owns the remote object, and this one may no longer use or delete it.
            obj._check_alive()
            obj._alive = False
            obj._spent_because = "it was sent on to another worker; use the pointer that send returned"
            return _rebuild_pointer, (obj.location._address, obj.id_at_location, obj.id, obj.garbage_collect_data)
        return NotImplemented


# Pointers may travel inside a message only where a pointer changes hands on purpose: sending a
# pointer on (``x_ptr.send(alice)``), fetching one (``pointer_to_x_ptr.get()``) or moving one.
_TRANSFER = {"pointers": False}
# The worker that is deserializing a message: a pointer that arrives belongs to it.
_RECEIVING: list = []


class _transferring_pointers:
    def __enter__(self):
        self.before = _TRANSFER["pointers"]
        _TRANSFER["pointers"] = True

    def __exit__(self, *exc):
        _TRANSFER["pointers"] = self.before


def _rebuild_pointer(address, id_at_location, pointer_id, garbage_collect_data):
    owner = _RECEIVING[-1] if _RECEIVING else local_worker()
    return PointerTensor(_WORKERS[address], id_at_location, owner, id=pointer_id,
                         garbage_collect_data=garbage_collect_data)


@toolbox
def serialize(obj: Any) -> bytes:
    """Bytes for `obj`; tensors travel as dtype, shape, raw values, requires_grad and gradient."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, key):
        return _UNNAMED_CODE[key]


@toolbox
def deserialize(data: bytes) -> Any:
    """The object `serialize` packed: a fresh copy that shares nothing with the sender's."""
    return _Unpickler(io.BytesIO(data)).load()


# --------------------------------------------------------------------------------------------
# Workers


class _Ref:
    """Stands for an object at the receiving worker inside a command."""

    __slots__ = ("id",)

    def __init__(self, obj_id: int):
        self.id = obj_id

    def __reduce__(self):
        return _Ref, (self.id,)


_NO_REPLY = object()


class _PointerReply:
    """A reply that hands a pointer over to the asker (``get`` on a pointer to a pointer)."""

    __slots__ = ("pointer",)

    def __init__(self, pointer):
        self.pointer = pointer
_WORKERS: "weakref.WeakValueDictionary[int, VirtualWorker]" = weakref.WeakValueDictionary()

# Answers about a remote tensor that reveal its metadata, never its values.
_METADATA = frozenset({"shape", "dtype", "device", "requires_grad", "is_leaf", "ndim", "layout",
                       "size", "dim", "numel", "nelement", "element_size", "is_floating_point"})


class VirtualWorker:
    """A simulated machine: an object store, a message handler and traffic counters."""

    def __init__(self, hook=None, id: str | int | None = None, **ignored_pysyft_options):
        self.hook = hook
        self.id = id if id is not None else f"worker{_new_id()}"
        self._objects: dict[int, Any] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self._address = _new_id()
        _WORKERS[self._address] = self

    def __repr__(self) -> str:
        return f"<VirtualWorker id:{self.id} #objects:{len(self._objects)}>"

    # -- the wire ------------------------------------------------------------------------------
    def _send_msg(self, message: tuple, location: "VirtualWorker") -> Any:
        """Send one message to `location` and return its answer (if it sends one)."""
        data = serialize(message)
        self.bytes_sent += len(data)
        self.messages_sent += 1
        reply = location._receive_msg(data)
        if reply is None:
            return None
        self.bytes_received += len(reply)
        self.messages_received += 1
        _RECEIVING.append(self)
        try:
            return deserialize(reply)
        finally:
            _RECEIVING.pop()

    def _receive_msg(self, data: bytes) -> bytes | None:
        self.bytes_received += len(data)
        self.messages_received += 1
        _RECEIVING.append(self)
        try:
            kind, *payload = deserialize(data)
        finally:
            _RECEIVING.pop()
        answer = getattr(self, f"_on_{kind}")(*payload)
        if answer is _NO_REPLY:
            return None
        if isinstance(answer, _PointerReply):
            with _transferring_pointers():
                reply = serialize(answer.pointer)
        else:
            reply = serialize(answer)
        self.bytes_sent += len(reply)
        self.messages_sent += 1
        return reply

    def reset_counters(self) -> None:
        self.bytes_sent = self.bytes_received = self.messages_sent = self.messages_received = 0

    def clear_objects(self) -> "VirtualWorker":
        self._objects.clear()
        return self

    # -- message handlers ----------------------------------------------------------------------
    def _resolve(self, value):
        if isinstance(value, _Ref):
            if value.id not in self._objects:
                raise PointerError(f"worker {self.id} has no object with id {value.id} "
                                   "(it was fetched with .get(), moved or deleted)")
            return self._objects[value.id]
        if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size) and not hasattr(value, "_fields"):
            return type(value)(self._resolve(v) for v in value)
        if isinstance(value, dict):
            return {k: self._resolve(v) for k, v in value.items()}
        return value

    def _store(self, result, self_obj=None):
        """Keep `result` here and describe it for the owner (ids, not values)."""
        if result is None:
            return None
        if self_obj is not None and result is self_obj:
            return ("self",)
        if isinstance(result, (tuple, list)):
            return ("tuple", [self._store(item, self_obj) for item in result])
        obj_id = _new_id()
        self._objects[obj_id] = result
        return ("object", obj_id)

    def _on_store(self, obj_id, obj):
        self._objects[obj_id] = obj
        return _NO_REPLY

    def _on_get(self, obj_id):
        obj = self._resolve(_Ref(obj_id))
        del self._objects[obj_id]
        if isinstance(obj, PointerTensor):  # a pointer to a pointer: the owner gets this pointer
            return _PointerReply(obj)
        return obj

    def _on_remote_get(self, obj_id):
        obj = self._resolve(_Ref(obj_id))
        if not isinstance(obj, PointerTensor):
            raise PointerError(f"remote_get: {self.id} already holds the value itself, not a pointer "
                               "(remote_get fetches what a pointer at this worker points to)")
        self._objects[obj_id] = obj.get()
        return _NO_REPLY

    def _on_delete(self, obj_id):
        self._objects.pop(obj_id, None)
        return _NO_REPLY

    def _on_move(self, obj_id, address, new_id):
        obj = self._resolve(_Ref(obj_id))
        del self._objects[obj_id]
        with _transferring_pointers():
            self._send_msg(("store", new_id, obj), _WORKERS[address])
        return _NO_REPLY

    def _on_method(self, obj_id, name, args, kwargs):
        target = self._resolve(_Ref(obj_id))
        result = getattr(target, name)(*self._resolve(args), **self._resolve(kwargs))
        return self._store(result, target)

    def _on_function(self, func, args, kwargs):
        return self._store(func(*self._resolve(args), **self._resolve(kwargs)))

    def _on_getattr(self, obj_id, name):
        return self._store(getattr(self._resolve(_Ref(obj_id)), name))

    def _on_metadata(self, obj_id, name, args):
        if name not in _METADATA:
            raise PointerError(f"{name} is not metadata; call .get() to see values")
        value = getattr(self._resolve(_Ref(obj_id)), name)
        return value(*args) if args is not None else value

    def _on_module_tensor(self, module_id, name):
        module = self._resolve(_Ref(module_id))
        *path, attribute = name.split(".")
        owner = module.get_submodule(".".join(path)) if path else module
        return self._store(getattr(owner, attribute))

    def _on_call_module(self, module_id, path, args, kwargs):
        module = self._resolve(_Ref(module_id))
        if path:
            module = module.get_submodule(path)
        return self._store(module(*self._resolve(args), **self._resolve(kwargs)))

    def _on_optimizer_step(self, module_id, optimizer_class, hyper, names, states):
        parameters = dict(self._resolve(_Ref(module_id)).named_parameters())
        params = [parameters[name] for name in names]
        optimizer = optimizer_class([dict(hyper, params=params)])
        for param, state in zip(params, states):
            if state:
                optimizer.state[param] = state
        optimizer.step()
        return [dict(optimizer.state[param]) for param in params]

    def _on_zero_grad(self, module_id, names, set_to_none):
        parameters = dict(self._resolve(_Ref(module_id)).named_parameters())
        for name in names:
            param = parameters[name]
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.detach_().zero_()
        return _NO_REPLY


# --------------------------------------------------------------------------------------------
# The local worker and sending

_LOCAL = {"worker": None}


def local_worker() -> VirtualWorker:
    """The worker that owns pointers made in this process ("me"; set by TorchHook)."""
    if _LOCAL["worker"] is None:
        _LOCAL["worker"] = VirtualWorker(None, id="me")
    return _LOCAL["worker"]


def send(obj: Any, location: VirtualWorker, owner: VirtualWorker | None = None) -> "PointerTensor":
    """Ship `obj` (a tensor or any picklable object) to `location`; return a pointer to it."""
    if isinstance(obj, torch.nn.Module):
        raise TypeError("send a model with model.send(worker) (after TorchHook(torch))")
    if not isinstance(location, VirtualWorker):
        raise TypeError(f"send needs a VirtualWorker, got {type(location).__name__}")
    owner = owner or local_worker()
    obj_id = _new_id()
    owner._send_msg(("store", obj_id, obj), location)
    return PointerTensor(location, obj_id, owner)


# --------------------------------------------------------------------------------------------
# Pointers


def _pointers_in(value) -> Iterable["PointerTensor"]:
    if isinstance(value, PointerTensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _pointers_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _pointers_in(item)


def _local_tensors_in(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _local_tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _local_tensors_in(item)


def _to_refs(value):
    if isinstance(value, PointerTensor):
        value._check_alive()
        return _Ref(value.id_at_location)
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size) and not hasattr(value, "_fields"):
        return type(value)(_to_refs(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_refs(v) for k, v in value.items()}
    return value


def _common_location(what: str, *values) -> tuple[VirtualWorker, VirtualWorker]:
    """The one worker all pointers in `values` live at, and their owner; else a clear error."""
    pointers = list(_pointers_in(values))
    first = pointers[0]
    for other in pointers[1:]:
        if other.location is not first.location:
            raise PointerLocationError(
                f"{what} mixes a pointer to {first.location.id} with a pointer to {other.location.id}; "
                f"nothing was copied. Move one of them first, e.g. ptr.move({first.location.id}), "
                "or .get() both")
    local = next(iter(_local_tensors_in(values)), None)
    if local is not None:
        raise PointerLocationError(
            f"{what} mixes a pointer to {first.location.id} with a local tensor at "
            f"{first.owner.id} (shape {tuple(local.shape)}); send that tensor to "
            f"{first.location.id} first (tensor.send(...)), or .get() the pointer")
    return first.location, first.owner


def _pointers_from(description, location, owner, same=None):
    if description is None:
        return None
    kind = description[0]
    if kind == "self":
        return same
    if kind == "tuple":
        return tuple(_pointers_from(d, location, owner, same) for d in description[1])
    return PointerTensor(location, description[1], owner)


def _remote(pointer_method):
    name = pointer_method.__name__

    def method(self, *args, **kwargs):
        return self._call_method(name, args, kwargs)

    method.__name__ = name
    method.__doc__ = f"Run tensor.{name} at the pointer's location; returns a pointer."
    return method


class PointerTensor:
    """What the owner holds of an object at another worker: owner, location and remote id."""

    def __init__(self, location: VirtualWorker, id_at_location: int, owner: VirtualWorker | None = None,
                 id: int | None = None, garbage_collect_data: bool = True):
        self.location = location
        self.id_at_location = id_at_location
        self.owner = owner or local_worker()
        self.id = id if id is not None else _new_id()
        self.garbage_collect_data = garbage_collect_data
        self._alive = True

    # -- identity --------------------------------------------------------------------------------
    def __repr__(self) -> str:
        if not self._alive:
            return f"(Wrapper)>[PointerTensor | {self.owner.id}:{self.id} -> (fetched or moved)]"
        return (f"(Wrapper)>[PointerTensor | {self.owner.id}:{self.id} -> "
                f"{self.location.id}:{self.id_at_location}]")

    __str__ = __repr__
    __hash__ = object.__hash__

    def _check_alive(self) -> None:
        if not self._alive:
            because = getattr(self, "_spent_because", None)
            if because:
                raise PointerError(f"this pointer can no longer be used: {because}")
            raise PointerError("this pointer no longer points to anything: its object was fetched "
                               "with .get() or moved with .move(); use the value or pointer those returned")

    def __del__(self):
        try:
            if self._alive and self.garbage_collect_data:
                self._alive = False
                self.owner._send_msg(("delete", self.id_at_location), self.location)
        except Exception:  # interpreter shutdown: the workers may already be gone
            pass

    # -- moving ----------------------------------------------------------------------------------
    def get(self):
        """Bring the object back; it is removed from the worker and this pointer is spent."""
        self._check_alive()
        value = self.owner._send_msg(("get", self.id_at_location), self.location)
        self._alive = False
        return value

    def move(self, destination: VirtualWorker) -> "PointerTensor":
        """Move the object from its worker straight to `destination`; returns the new pointer."""
        self._check_alive()
        if destination is self.location:
            return self
        new_id = _new_id()
        self.owner._send_msg(("move", self.id_at_location, destination._address, new_id), self.location)
        self._alive = False
        return PointerTensor(destination, new_id, self.owner)

    def send(self, *workers, **ignored_pysyft_options) -> "PointerTensor":
        """Send this pointer on to another worker, as PySyft 0.2 did: ``x_ptr.send(alice)``.

        The object stays where it is (at bob); alice now holds this pointer (owned by alice,
        pointing to bob) under this pointer's id, and what comes back is a pointer to it: a
        pointer to a pointer. Operations on it run at alice, who forwards them to bob;
        ``.get()`` brings the pointer back, a second ``.get()`` the value. This pointer is
        spent: alice's copy now owns the object.
        """
        if len(workers) != 1:
            raise TypeError(f"send a pointer on to one worker at a time, got {len(workers)}")
        destination = workers[0]
        if not isinstance(destination, VirtualWorker):
            raise TypeError(f"send needs a VirtualWorker, got {type(destination).__name__}")
        self._check_alive()
        owner = self.owner
        with _transferring_pointers():
            owner._send_msg(("store", self.id, self), destination)
        return PointerTensor(destination, self.id, owner)

    def remote_get(self) -> "PointerTensor":
        """For a pointer to a pointer: its location fetches the value, which then lives there.

        ``p2p2x.remote_get()`` makes alice call ``.get()`` on her pointer to bob: the value moves
        from bob to alice, and this pointer (to alice) now points to the value itself.
        """
        self._check_alive()
        self.owner._send_msg(("remote_get", self.id_at_location), self.location)
        return self

    def _smpc_not_in_course(self, *args, **kwargs):
        _not_in_course("Secure multi-party computation and fixed precision (share, fix_precision)")

    share = fix_precision = fix_prec = float_precision = float_prec = encrypt = decrypt = _smpc_not_in_course

    # -- remote execution ------------------------------------------------------------------------
    def _call_method(self, name: str, args: tuple, kwargs: dict):
        self._check_alive()
        location, owner = _common_location(f"tensor.{name}", self, args, kwargs)
        message = ("method", self.id_at_location, name, _to_refs(args), _to_refs(kwargs))
        return _pointers_from(owner._send_msg(message, location), location, owner, same=self)

    def _metadata(self, name: str, args=None):
        self._check_alive()
        return self.owner._send_msg(("metadata", self.id_at_location, name, args), self.location)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        location, owner = _common_location(name, args, kwargs)
        message = ("function", func, _to_refs(args), _to_refs(kwargs))
        return _pointers_from(owner._send_msg(message, location), location, owner)

    def __getattr__(self, name: str):
        if name.startswith("_") and not name.startswith("__"):
            raise AttributeError(name)
        if name in _METADATA:
            if callable(getattr(torch.Tensor, name, None)):
                return lambda *args: self._metadata(name, args)
            return self._metadata(name)
        attribute = getattr(torch.Tensor, name, None)
        if attribute is None:
            raise AttributeError(f"'PointerTensor' object has no attribute {name!r}")
        if callable(attribute):
            return lambda *args, **kwargs: self._call_method(name, args, kwargs)
        self._check_alive()  # a property of the remote tensor (grad, data, T ...): point to it
        description = self.owner._send_msg(("getattr", self.id_at_location, name), self.location)
        return _pointers_from(description, self.location, self.owner)

    def __len__(self) -> int:
        return self._metadata("shape")[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def _refuse_value(self, *args, **kwargs):
        raise PointerError(f"{self!r} points to a value at {self.location.id}; its value is not here. "
                           "Call .get() to bring it back first")

    __bool__ = __float__ = __int__ = __index__ = __complex__ = __array__ = _refuse_value
    item = tolist = numpy = _refuse_value

    @_remote
    def __add__(self, other): ...
    @_remote
    def __radd__(self, other): ...
    @_remote
    def __iadd__(self, other): ...
    @_remote
    def __sub__(self, other): ...
    @_remote
    def __rsub__(self, other): ...
    @_remote
    def __isub__(self, other): ...
    @_remote
    def __mul__(self, other): ...
    @_remote
    def __rmul__(self, other): ...
    @_remote
    def __imul__(self, other): ...
    @_remote
    def __truediv__(self, other): ...
    @_remote
    def __rtruediv__(self, other): ...
    @_remote
    def __itruediv__(self, other): ...
    @_remote
    def __floordiv__(self, other): ...
    @_remote
    def __mod__(self, other): ...
    @_remote
    def __pow__(self, other): ...
    @_remote
    def __rpow__(self, other): ...
    @_remote
    def __matmul__(self, other): ...
    @_remote
    def __rmatmul__(self, other): ...
    @_remote
    def __neg__(self): ...
    @_remote
    def __abs__(self): ...
    @_remote
    def __eq__(self, other): ...
    @_remote
    def __ne__(self, other): ...
    @_remote
    def __lt__(self, other): ...
    @_remote
    def __le__(self, other): ...
    @_remote
    def __gt__(self, other): ...
    @_remote
    def __ge__(self, other): ...
    @_remote
    def __and__(self, other): ...
    @_remote
    def __or__(self, other): ...
    @_remote
    def __invert__(self): ...
    @_remote
    def __getitem__(self, index): ...
    @_remote
    def __setitem__(self, index, value): ...


# --------------------------------------------------------------------------------------------
# Models at other workers: the shell left behind and the hook

class _IdentityRegistry:
    """Object -> info by identity, forgetting objects that die (tensors cannot be dict keys of a
    WeakKeyDictionary: comparing two of them is elementwise)."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, obj) -> bool:
        return id(obj) in self._entries

    def __getitem__(self, obj):
        return self._entries[id(obj)][1]

    def __setitem__(self, obj, info) -> None:
        key = id(obj)
        entries = self._entries
        self._entries[key] = (weakref.ref(obj, lambda _: entries.pop(key, None)), info)

    def get(self, obj, default=None):
        entry = self._entries.get(id(obj))
        return entry[1] if entry is not None and entry[0]() is obj else default

    def pop(self, obj, default=None):
        entry = self._entries.pop(id(obj), None)
        return entry[1] if entry is not None else default


# Shell module -> (worker, remote id of the root module, path of this submodule in the root).
_AWAY_MODULES = _IdentityRegistry()
# Shell parameter -> (worker, remote id of the root module, parameter name in the root).
_AWAY_PARAMETERS = _IdentityRegistry()


class _SentParameter(torch.nn.Parameter):
    """What a parameter of a sent model becomes here while the model is away: an empty shell that
    optimizers can still hold (they step it at the model's location), but that refuses to compute,
    so that arithmetic on it never gives a silent empty result (PySyft 0.2 gave pointers there).
    Reading its metadata (``grad``, ``requires_grad``, ``is_leaf``, ...) still works."""

    _READABLE = frozenset({"grad", "_grad", "requires_grad", "is_leaf", "dtype", "device", "layout",
                           "grad_fn", "_backward_hooks", "_post_accumulate_grad_hooks", "is_sparse",
                           "is_cuda", "is_meta", "is_nested", "_base", "_version", "names", "shape", "ndim"})

    _SHAPE = frozenset({"numel", "nelement", "size", "dim", "ndimension", "is_floating_point", "element_size"})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        descriptor = getattr(func, "__self__", None)
        if getattr(func, "__name__", None) in ("__get__", "__set__") and \
                getattr(descriptor, "__name__", None) in cls._READABLE \
                or getattr(func, "__name__", None) in cls._SHAPE:
            return super().__torch_function__(func, types, args, kwargs or {})
        shell = next((a for a in args if isinstance(a, _SentParameter)), None)
        away = _AWAY_PARAMETERS.get(shell) if shell is not None else None
        where, name = (away[0].id, away[2]) if away else ("another worker", "this parameter")
        if getattr(func, "__name__", None) == "__repr__":
            return f"<{name} of a model at {where}: its values are there (model.{name} points to them)>"
        raise PointerError(
            f"{name} belongs to a model that was sent to {where}: its values are there, and the local "
            f"shell is empty. Use model.{name} (a pointer to it there), or call model.get() first")


def _module_send(self: torch.nn.Module, location: VirtualWorker) -> torch.nn.Module:
    """Ship the model to `location`; the local module stays behind as an empty shell."""
    if _AWAY_MODULES.get(self) is not None:
        raise PointerError(f"this model is already at {_AWAY_MODULES[self][0].id}; call model.get() "
                           "before sending it elsewhere")
    if not isinstance(location, VirtualWorker):
        raise TypeError(f"model.send needs a VirtualWorker (e.g. data.location), got {type(location).__name__}")
    owner = local_worker()
    module_id = _new_id()
    owner._send_msg(("store", module_id, self), location)
    _register_away(self, owner, location, module_id)
    for path, submodule in self.named_modules():
        for name, buffer in submodule._buffers.items():
            if buffer is not None:
                submodule._buffers[name] = buffer.new_empty(0)
    for name, param in self.named_parameters():
        param.grad = None
        param.data = param.data.new_empty(0)
        if type(param) is torch.nn.Parameter:
            param.__class__ = _SentParameter
    return self


# Remote id of a sent model -> the finalizer that deletes it there if its shell is dropped.
_MODULE_FINALIZERS: dict[int, weakref.finalize] = {}


def _delete_remote_module(owner, location, module_id):
    _MODULE_FINALIZERS.pop(module_id, None)
    try:
        owner._send_msg(("delete", module_id), location)
    except Exception:  # interpreter shutdown: the workers may already be gone
        pass


def _register_away(module, owner, location, module_id) -> None:
    """Record that `module` (and its submodules and parameters) now lives at `location`."""
    for path, submodule in module.named_modules():
        _AWAY_MODULES[submodule] = (location, module_id, path)
    for name, param in module.named_parameters():
        _AWAY_PARAMETERS[param] = (location, module_id, name)
    # Dropping the shell of a model that is away deletes the model there (garbage collection).
    _MODULE_FINALIZERS[module_id] = weakref.finalize(module, _delete_remote_module, owner, location, module_id)


def _forget_finalizer(module_id) -> None:
    finalizer = _MODULE_FINALIZERS.pop(module_id, None)
    if finalizer is not None:
        finalizer.detach()


def _module_move(self: torch.nn.Module, destination: VirtualWorker) -> torch.nn.Module:
    """Move a sent model straight from its worker to `destination` (PySyft 0.2's ``model.move``).

    The values travel from worker to worker, not through the owner; the local shell now stands
    for the model at `destination`. A model that is here is simply sent there.
    """
    if not isinstance(destination, VirtualWorker):
        raise TypeError(f"model.move needs a VirtualWorker, got {type(destination).__name__}")
    away = _AWAY_MODULES.get(self)
    if away is None:
        return _module_send(self, destination)
    location, module_id, path = away
    if path:
        raise PointerError(f"this is submodule {path!r} of a model at {location.id}; move the whole model")
    if destination is location:
        return self
    owner = local_worker()
    new_id = _new_id()
    owner._send_msg(("move", module_id, destination._address, new_id), location)
    _forget_finalizer(module_id)
    _register_away(self, owner, destination, new_id)
    return self


def _module_copy(self: torch.nn.Module) -> torch.nn.Module:
    """An independent copy of a model that is here (PySyft 0.2's ``model.copy()``)."""
    away = _AWAY_MODULES.get(self)
    if away is not None:
        raise PointerError(f"this model is at {away[0].id}: model.copy() copies a model that is here; "
                           "call model.get() first")
    import copy

    return copy.deepcopy(self)


def _module_get(self: torch.nn.Module) -> torch.nn.Module:
    """Bring the model back into this (shell) module, keeping its parameter objects."""
    if _AWAY_MODULES.get(self) is None:
        raise PointerError("this model is not at another worker; nothing to get (send it first)")
    location, module_id, path = _AWAY_MODULES[self]
    if path:
        raise PointerError(f"this is submodule {path!r} of a model at {location.id}; get the whole model")
    remote = local_worker()._send_msg(("get", module_id), location)
    _forget_finalizer(module_id)
    remote_modules = dict(remote.named_modules())
    for sub_path, submodule in self.named_modules():
        _AWAY_MODULES.pop(submodule, None)
        twin = remote_modules[sub_path]
        submodule.training = twin.training
        for name in submodule._buffers:
            submodule._buffers[name] = twin._buffers[name]
    remote_parameters = dict(remote.named_parameters())
    for name, param in self.named_parameters():
        _AWAY_PARAMETERS.pop(param, None)
        if type(param) is _SentParameter:
            param.__class__ = torch.nn.Parameter
        twin = remote_parameters[name]
        param.data = twin.data
        param.grad = twin.grad
    return self


def _module_location(module: torch.nn.Module) -> VirtualWorker | None:
    """The worker a sent model is at, or None when it is here."""
    away = _AWAY_MODULES.get(module)
    return away[0] if away else None


def _hooked_module_call(original_call):
    def __call__(self, *args, **kwargs):
        away = _AWAY_MODULES.get(self) if _AWAY_MODULES else None
        if away is None:
            if any(True for _ in _pointers_in((args, kwargs))):
                pointer = next(iter(_pointers_in((args, kwargs))))
                raise PointerLocationError(
                    f"{type(self).__name__} is here at {pointer.owner.id} but its input is at "
                    f"{pointer.location.id}; send the model to the data first: "
                    "model.send(data.location)")
            return original_call(self, *args, **kwargs)
        location, module_id, path = away
        pointers = list(_pointers_in((args, kwargs)))
        if not pointers:
            raise PointerLocationError(
                f"{type(self).__name__} is at {location.id}, but its input is here; send the input "
                f"to {location.id} or call model.get() first")
        data_location, owner = _common_location(type(self).__name__, args, kwargs)
        if data_location is not location:
            raise PointerLocationError(
                f"{type(self).__name__} is at {location.id} but its input is at {data_location.id}; "
                f"nothing was copied. Call model.get() and model.send({data_location.id}) first")
        message = ("call_module", module_id, path, _to_refs(args), _to_refs(kwargs))
        return _pointers_from(owner._send_msg(message, location), location, owner)

    __call__._fedcourse_hooked = True
    return __call__


def _hooked_module_getattr(original_getattr):
    def __getattr__(self, name):
        away = _AWAY_MODULES.get(self) if _AWAY_MODULES else None
        if away is not None:
            inside = self.__dict__
            if name in inside.get("_parameters", ()) or name in inside.get("_buffers", ()):
                # A sent model's parameter (model.weight) is at the model's location: point to it
                # there, rather than hand out the shell's empty tensor.
                location, module_id, path = away
                owner = local_worker()
                message = ("module_tensor", module_id, f"{path}.{name}" if path else name)
                return _pointers_from(owner._send_msg(message, location), location, owner)
        return original_getattr(self, name)

    __getattr__._fedcourse_hooked = True
    return __getattr__


def _hooked_module_state_dict(original_state_dict):
    def state_dict(self, *args, **kwargs):
        away = _AWAY_MODULES.get(self) if _AWAY_MODULES else None
        if away is not None:
            raise PointerError(f"this model is at {away[0].id}: its values are there, not here. Call "
                               "model.get() first (or read one tensor through a pointer: model.weight)")
        return original_state_dict(self, *args, **kwargs)

    state_dict._fedcourse_hooked = True
    return state_dict


def _away_parameters_by_module(params) -> dict:
    groups: dict = {}
    for param in params:
        away = _AWAY_PARAMETERS.get(param)
        if away is not None:
            location, module_id, name = away
            groups.setdefault((location, module_id), []).append((param, name))
    return groups


def _remote_optimizer_step(optimizer, args, kwargs):
    """Optimizer step pre-hook: step the parameters of sent models where those models are."""
    if not _AWAY_PARAMETERS:
        return None
    for group in optimizer.param_groups:
        hyper = {key: value for key, value in group.items() if key != "params"}
        for (location, module_id), entries in _away_parameters_by_module(group["params"]).items():
            states = [dict(optimizer.state[param]) if param in optimizer.state else {} for param, _ in entries]
            names = [name for _, name in entries]
            message = ("optimizer_step", module_id, type(optimizer), hyper, names, states)
            new_states = local_worker()._send_msg(message, location)
            for (param, _), state in zip(entries, new_states):
                if state:
                    optimizer.state[param] = state
    return None


def _hooked_optimizer_zero_grad(original):
    def zero_grad(self, set_to_none: bool = True):
        original(self, set_to_none)
        if not _AWAY_PARAMETERS:
            return
        params = [p for group in self.param_groups for p in group["params"]]
        for (location, module_id), entries in _away_parameters_by_module(params).items():
            message = ("zero_grad", module_id, [name for _, name in entries], set_to_none)
            local_worker()._send_msg(message, location)

    zero_grad._fedcourse_hooked = True
    return zero_grad


def _hooked_module_zero_grad(original):
    def zero_grad(self, set_to_none: bool = True):
        away = _AWAY_MODULES.get(self) if _AWAY_MODULES else None
        if away is None:
            return original(self, set_to_none)
        location, module_id, path = away
        prefix = f"{path}." if path else ""
        names = [prefix + name for name, _ in self.named_parameters()]
        local_worker()._send_msg(("zero_grad", module_id, names, set_to_none), location)

    zero_grad._fedcourse_hooked = True
    return zero_grad


def _tensor_send(self: torch.Tensor, location: VirtualWorker) -> PointerTensor:
    """Send this tensor to `location`; returns a PointerTensor to the copy there."""
    return send(self, location)


_HOOKED = {"done": False}


def _install_hooks(torch_module) -> None:
    # The plain methods are (re)attached by every hook, so the newest hook wins (a hook written in
    # a lesson may have replaced them); the wrappers below are installed once.
    torch_module.Tensor.send = _tensor_send
    torch_module.nn.Module.send = _module_send
    torch_module.nn.Module.get = _module_get
    torch_module.nn.Module.move = _module_move
    torch_module.nn.Module.copy = _module_copy
    if _HOOKED["done"]:
        return
    module_class = torch_module.nn.Module
    if not getattr(module_class.__call__, "_fedcourse_hooked", False):
        module_class.__call__ = _hooked_module_call(module_class.__call__)
    if not getattr(module_class.__getattr__, "_fedcourse_hooked", False):
        module_class.__getattr__ = _hooked_module_getattr(module_class.__getattr__)
    if not getattr(module_class.state_dict, "_fedcourse_hooked", False):
        module_class.state_dict = _hooked_module_state_dict(module_class.state_dict)
    if not getattr(module_class.zero_grad, "_fedcourse_hooked", False):
        module_class.zero_grad = _hooked_module_zero_grad(module_class.zero_grad)
    optimizer_class = torch_module.optim.Optimizer
    if not getattr(optimizer_class.zero_grad, "_fedcourse_hooked", False):
        optimizer_class.zero_grad = _hooked_optimizer_zero_grad(optimizer_class.zero_grad)
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    register_optimizer_step_pre_hook(_remote_optimizer_step)
    _HOOKED["done"] = True


class TorchHook:
    """``hook = TorchHook(torch)``: tensors and modules learn ``send``; creates the local worker."""

    def __init__(self, torch_module=torch, local_worker: VirtualWorker | None = None, **ignored_pysyft_options):
        if torch_module is not torch:
            raise TypeError("TorchHook hooks the torch module: TorchHook(torch)")
        self.torch = torch_module
        _install_hooks(torch_module)
        self.local_worker = local_worker or VirtualWorker(self, id="me")
        self.local_worker.hook = self
        _LOCAL["worker"] = self.local_worker

    def __repr__(self) -> str:
        return f"<TorchHook local_worker:{self.local_worker.id}>"
