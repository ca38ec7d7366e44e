"""What the code under test gets in a GPU speed test: a fresh input every call, and inputs it may not write.

A submission timed on the same buffers every call could return the result it computed for them last time, or convert
a reused input in place once (in a warm-up call) and be timed on the cheaper work that follows. So, for the code
under test (`speed.bench`):

- every call must get at least one tensor it has not been given before (`setup` makes fresh inputs): a setup that
  only hands back buffers of earlier calls is a mistake in the test, reported as such;
- every tensor argument must come back from the call bit for bit as it went in (a test may reuse a large read-only
  input, such as a KV pool, across calls); arguments the function writes by design are named in `inputs_written`.

The previous call's inputs are kept alive until the next call's are made, so that a fresh buffer cannot land at the
address of the one before it and pass for it (or the other way round).
"""

from __future__ import annotations

from collections.abc import Callable, Collection


class InputsReused(Exception):
    """The test's setup handed the timed function nothing new: a mistake in the test, not in the code under test."""


def tensor_arguments(args: tuple, kwargs: dict) -> list[tuple[str, object]]:
    """(label, tensor) for each tensor argument, looking into tuples, lists and dicts (not into other objects)."""
    import torch

    found = []

    def visit(label, value):
        if isinstance(value, torch.Tensor):
            found.append((label, value))
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                visit(f"{label}[{i}]", item)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(f"{label}[{key!r}]", item)

    for i, value in enumerate(args):
        visit(f"argument {i}", value)
    for key, value in kwargs.items():
        visit(f"argument {key!r}", value)
    return found


def _storage(tensor) -> tuple:
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return ()
    return (tensor.device, tensor.untyped_storage().data_ptr())


def _view(tensor) -> tuple:
    return (*_storage(tensor), tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _same_bits(a, b) -> bool:
    import torch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    size = a.element_size()
    if a.is_complex() or size not in ints:
        return bool(torch.equal(a, b))
    return bool(torch.equal(a.contiguous().view(ints[size]), b.contiguous().view(ints[size])))


class TimedInputs:
    """Wraps a speed test's `setup` and checks the inputs of each timed call (module docstring)."""

    def __init__(self, setup: Callable, inputs_written: Collection[int | str] = ()):
        self.setup = setup
        self.written = {f"argument {w!r}" if isinstance(w, str) else f"argument {w}" for w in inputs_written}
        self._previous: list = []  # the last call's tensors, kept alive
        self._pristine: dict[tuple, object] = {}  # storage -> a copy made before that storage's first call
        self._current: list[tuple[str, object, object]] = []  # (label, tensor, copy) of the call in progress

    def __call__(self):
        args, kwargs = self.setup()
        tensors = [(label, t) for label, t in tensor_arguments(args, kwargs) if _storage(t)]
        earlier = {_storage(t) for t in self._previous}
        if tensors and all(_storage(t) in earlier for _, t in tensors):
            raise InputsReused(
                "speed test setup gave the timed function only buffers it had already been given ("
                + ", ".join(label for label, _ in tensors)
                + "): make setup() return at least one freshly made input each call, or a submission could return "
                "the result it computed for these buffers last time"
            )
        pristine = {}
        for label, t in tensors:
            if label not in self.written:
                key = _view(t)
                pristine[key] = self._pristine.get(key) if _storage(t) in earlier else None
                if pristine[key] is None:
                    pristine[key] = t.clone()
        self._pristine = pristine
        self._current = [(label, t, pristine[_view(t)]) for label, t in tensors if label not in self.written]
        self._previous = [t for _, t in tensors]
        return args, kwargs

    def verify(self) -> None:
        """After the timed call: the inputs it may not write are what they were."""
        for label, tensor, copy in self._current:
            if tensor.shape != copy.shape or not _same_bits(tensor, copy):
                raise AssertionError(
                    f"the timed function wrote into its input ({label}, {list(tensor.shape)} {tensor.dtype}): the "
                    "code under test must leave its inputs as they were (a test may hand the same buffer to every "
                    "call, and work cached in an input would be timed as free)"
                )
