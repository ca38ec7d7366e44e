"""A secret seed, mixed into every random draw of every graded test, so that a submission cannot memorise its inputs.

The tests are public and seed their inputs with fixed numbers (`torch.Generator().manual_seed(15)`), so a submission
could recognise an input and return a stored answer. An instructor sets a secret (`--seed-secret TEXT`, or the
environment variable INFERLAB_SEED_SECRET, e.g. in the Gradescope autograder), and while a graded test runs (setup,
call and teardown) every seed it asks for is replaced by `mix(secret, seed)`, a hash of both:

- `torch.manual_seed(k)`, `torch.Generator().manual_seed(k)` (torch.Generator is a subclass for the duration),
  `random.seed(k)`, `random.Random(k)`, and numpy's `seed` and `default_rng` when numpy is loaded;
- hypothesis's derandomised examples (they are derived from the test function's digest, mixed with the secret);
- and before each graded test, torch's, random's and numpy's global generators are seeded with a hash of the secret
  and the test's id, so that a test that draws without seeding gets the same inputs whichever order tests run in
  (a test re-run in a fresh process after a crash sees what it would have seen).

The same seed still gives the same stream within a run, so tests that draw twice from seed k and compare, and
expectations computed from the drawn values, hold as before; only a test whose seeds were picked by hand for the data
they give (data checked to sit away from a rounding boundary, say) would not: mark it `@pytest.mark.public_seeds`
and its seeds are left alone, or better, let it try the next seed until its data passes its own check. Without a
secret, seeds are left alone and only the per-test seeding of the global generators happens.
"""

from __future__ import annotations

import hashlib
import random
import sys

SECRET_ENV = "INFERLAB_SEED_SECRET"


def mix(secret: str, value, bits: int = 63) -> int:
    """A seed derived from the secret and `value` (an int, str or bytes); `bits` wide."""
    digest = hashlib.sha256(f"inferlab-seed\0{secret}\0{type(value).__name__}\0{value!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)


class Seeding:
    """Installs the secret's seed mixing around each graded test; `overrides` tells the guard what it replaced."""

    def __init__(self, secret: str | None):
        self.secret = secret or None
        self.overrides: dict[tuple[int, str], object] = {}
        self._saved: list[tuple[object, str, object]] = []

    def begin(self, nodeid: str, mix_secret: bool = True) -> None:
        """Seed the global generators for test `nodeid`; with a secret (unless `mix_secret` is False, for a test marked
        `public_seeds`), mix it into every seed the test asks for until `end`."""
        import torch

        seed = mix(self.secret or "", f"test:{nodeid}")
        torch.manual_seed(seed)
        random.seed(seed)
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed(seed & 0xFFFFFFFF)
        if self.secret and mix_secret:
            for owner, name, replacement in self._replacements(torch, numpy):
                self._saved.append((owner, name, vars(owner)[name]))
                setattr(owner, name, replacement)
                self.overrides[(id(owner), name)] = replacement

    def end(self) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)
        self.overrides.clear()

    def _replacements(self, torch, numpy) -> list[tuple[object, str, object]]:
        secret = self.secret
        manual_seed = torch.manual_seed
        replacements = [
            (torch, "manual_seed", lambda seed: manual_seed(mix(secret, int(seed)))),
            (torch, "Generator", _mixing_subclass(torch.Generator, "manual_seed", lambda s: mix(secret, int(s)))),
            (random, "seed", lambda a=None, version=2: random._inst.seed(_mixed(secret, a), version)),
            (random, "Random", _mixing_subclass(random.Random, "seed", lambda a: _mixed(secret, a))),
        ]
        if numpy is not None:
            seed, default_rng = numpy.random.seed, numpy.random.default_rng
            replacements += [
                (numpy.random, "seed", lambda s=None: seed(None if s is None else mix(secret, s, bits=32))),
                (numpy.random, "default_rng", lambda s=None: default_rng(_mixed(secret, s))),
            ]
        core = sys.modules.get("hypothesis.core")
        if core is not None and hasattr(core, "function_digest"):
            digest = core.function_digest
            mixed_digest = lambda f: hashlib.sha256(secret.encode() + digest(f)).digest()  # noqa: E731
            replacements.append((core, "function_digest", mixed_digest))
        return replacements


def _mixed(secret: str, value):
    return None if value is None else mix(secret, value)


def _mixing_subclass(base: type, method: str, mixed) -> type:
    """A subclass of `base` whose `method(seed, ...)` gets `mixed(seed)`; isinstance checks still see every `base`
    (torch's own generators, the random module's instance), so code that checks types behaves as before."""

    class Meta(type(base)):
        def __instancecheck__(cls, obj):
            return isinstance(obj, base)

        def __subclasscheck__(cls, sub):
            return issubclass(sub, base)

    def seeded(self, seed=None, *args, **kwargs):
        return getattr(super(subclass, self), method)(mixed(seed), *args, **kwargs)

    subclass = Meta(base.__name__, (base,), {method: seeded, "__qualname__": base.__qualname__})
    return subclass
