"""``attack.compile``: an attack's inner step through ``torch.compile``, compiled once.

Every gradient-based attack spends its time in one operation: forward the iterate, score
it with a per-sample objective, and differentiate the objective's sum with respect to the
input. :class:`Gradients` performs that operation for all attacks. Eager (the default), it
is the plain ``torch.autograd.grad`` path. Compiled, the same operation is written with
``torch.func.grad_and_value`` (forward, objective and input gradient in one traceable
function; parameters are not differentiated, so no parameter gradient is ever formed) and
handed to ``torch.compile``. Attacks whose update is simple (PGD) compile their whole step,
update and projection included, through the same cache (:meth:`Gradients.run`).

Compilation is slow (seconds on a tiny CNN, minutes on a ResNet on a loaded CPU), so a
compiled function is built once per (attack, step kind, static settings, model, per-sample
shape, dtype, device) and reused for every later batch:

- ``dynamic=False``: one graph for one shape. A smaller batch (the last one, or the row
  subsets of APGD restarts and CW's early abort) is padded to the compiled batch size by
  repeating its last row, and the outputs are cut back: every sample's step is independent
  of its batch mates (eval mode, summed objectives), so padding changes no real row. A
  larger batch than the first one runs eagerly, with one logged note.
- Parameters are read at call time (dynamo treats a module's parameters as graph inputs),
  so an optimizer step between batches (adversarial training) is seen; a different model
  object gets its own entry.
- The step is one graph (``fullgraph=True``); dynamo's per-function recompile limit is
  raised and made fatal while a compiled step runs; a graph break or any failure falls
  back to eager with a logged note, so compilation is never silently skipped
  (:attr:`Gradients.compiled_calls` counts the calls that ran compiled).

The compiled path uses the default ``torch.compile`` mode on every device (no CUDA
graphs: their outputs are overwritten by the next replay, while the attacks keep iterates
and logits across steps); docs/METHODS.md §1.14 gives the tolerance and the costs.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: A per-sample objective of the logits: ``objective(logits, *args) -> (N,)``. Compiled
#: steps are cached by it, so it must be a module-level function or a ``functools.partial``
#: of one with hashable, non-tensor settings; every tensor it reads is an argument.
Objective = Callable[..., Tensor]
#: A step: batch-aligned tensors (or None) in, a tuple of batch-aligned tensors out.
Step = Callable[..., tuple[Tensor, ...]]

#: ``torch.compile`` settings of compiled steps (tests swap the backend for a counting one).
BACKEND: str | Callable = "inductor"
#: Distinct compiled steps one process may hold per step function before dynamo refuses.
RECOMPILE_LIMIT = 64


def objective_key(objective: Objective) -> Hashable:
    """What identifies an objective across batches: the function and its fixed settings.

    Raises:
        TypeError: a closure or a partial that binds a tensor (a compiled step would keep
            using the first batch's tensor).
    """
    if isinstance(objective, functools.partial):
        bound = (*objective.args, *objective.keywords.values())
        if any(isinstance(v, Tensor) for v in bound):
            raise TypeError("a compiled objective takes its tensors as arguments, not bound")
        return (objective.func, objective.args, tuple(sorted(objective.keywords.items())))
    if getattr(objective, "__closure__", None):
        raise TypeError(f"a compiled objective cannot be a closure, got {objective!r}")
    return objective


def functional_gradient(model: nn.Module, objective: Objective) -> Step:
    """``(x_adv, *args) -> (grad, logits, objective)`` written with ``torch.func`` so that
    ``torch.compile`` traces forward and backward into one graph."""

    def summed(x_adv: Tensor, *args: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        logits = model(x_adv)
        value = objective(logits, *args)
        return value.sum(), (logits, value)

    grad_and_value = torch.func.grad_and_value(summed, has_aux=True)

    def step(x_adv: Tensor, *args: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        grad, (_, (logits, value)) = grad_and_value(x_adv, *args)
        return grad, logits, value

    return step


def input_gradient(objective: Tensor, x: Tensor) -> Tensor:
    """d(sum of per-sample objectives)/dx: each sample's gradient ignores its batch mates.

    ``torch.autograd.grad`` never fills parameter ``.grad`` and never fires a DDP reducer,
    unlike ``.backward()`` (pytorch #22436).
    """
    (grad,) = torch.autograd.grad(objective.sum(), x)
    return grad


def eager_gradient(
    model: nn.Module, objective: Objective, x_adv: Tensor, *args: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The eager operation: one forward, one input-gradient backward."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    value = objective(logits, *args)
    return input_gradient(value, x_adv), logits.detach(), value.detach()


@dataclass
class _Entry:
    """One compiled step: the function, the batch size it was compiled for, its model."""

    fn: Step
    eager: Step
    size: int
    model: weakref.ref
    noted: bool = False


def _signature(tensors: tuple[Tensor | None, ...]) -> tuple:
    """Per-sample shape, dtype and device of each argument (None stays None)."""
    return tuple(
        None if t is None else (tuple(t.shape[1:]), t.dtype, t.device.type, t.device.index)
        for t in tensors
    )


def pad_rows(t: Tensor | None, size: int) -> Tensor | None:
    """``t`` grown to ``size`` rows by repeating its last row (None stays None).

    Per-sample vectors (labels, aims, constants) are made contiguous: a graph is compiled
    for the strides it first saw, and a column of a matrix would otherwise recompile when a
    padded copy arrives. Images keep their memory format (channels-last stays so).
    """
    if t is None:
        return t
    if len(t) < size:
        t = torch.cat([t, t[-1:].expand(size - len(t), *t.shape[1:])])
    return t if t.dim() >= 4 else t.contiguous()


@dataclass
class Gradients:
    """Input gradients for one attack: eager, or compiled once and reused (``enabled``).

    Attributes:
        enabled: compile (``attack.compile``).
        compiled_calls: calls that ran a compiled function (a test and the bench read it).
        compile_seconds: wall time of the calls that compiled (first call of each entry).
    """

    enabled: bool = False
    compiled_calls: int = 0
    compile_seconds: float = 0.0
    _entries: dict[Hashable, _Entry] = field(default_factory=dict, repr=False)

    def __call__(
        self, model: nn.Module, objective: Objective, x_adv: Tensor, *args: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(grad, logits, objective)`` at ``x_adv``: the gradient of the objective's sum
        (each row's gradient ignores its batch mates); logits and objective detached."""
        if not self.enabled:
            return eager_gradient(model, objective, x_adv, *args)
        key = ("gradient", objective_key(objective))
        build = functools.partial(functional_gradient, model, objective)
        return self.run(key, model, build, x_adv, *args)

    def run(
        self, key: Hashable, model: nn.Module, build: Callable[[], Step], *tensors: Tensor | None
    ) -> tuple[Tensor, ...]:
        """``build()(*tensors)``, compiled once per (key, model, shapes) and reused.

        Args:
            key: the step kind and every setting ``build`` fixes (hashable).
            model: the model the step forwards (an entry belongs to one model object).
            build: makes the eager step; called only when an entry is created.
            tensors: batch-aligned inputs (None allowed); outputs are batch-aligned too.
        """
        n = len(tensors[0])
        full = (key, id(model), _signature(tensors))
        entry = self._entries.get(full)
        if entry is None or entry.model() is not model:
            eager = build()
            fn = torch.compile(eager, fullgraph=True, dynamic=False, backend=BACKEND)
            entry = self._entries[full] = _Entry(fn, eager, n, weakref.ref(model))
            return self._first_call(entry, tensors)
        if n > entry.size:
            self._note(entry, f"a batch of {n} > the compiled {entry.size} runs eagerly")
            return self._eager(entry, tensors)
        return self._compiled(entry, tensors, n)

    def _first_call(self, entry: _Entry, tensors: tuple[Tensor | None, ...]) -> tuple:
        start = time.perf_counter()
        out = self._compiled(entry, tensors, entry.size)
        if len(tensors[0]) and tensors[0].is_cuda:
            torch.cuda.synchronize(tensors[0].device)
        self.compile_seconds += time.perf_counter() - start
        return out

    def _compiled(self, entry: _Entry, tensors: tuple[Tensor | None, ...], n: int) -> tuple:
        padded = tuple(pad_rows(t, entry.size) for t in tensors)
        try:
            with dynamo_limits(), torch.no_grad():
                out = entry.fn(*padded)
        except Exception as err:  # any compiler failure: run eagerly, with a note
            self._note(entry, f"compilation failed ({type(err).__name__}: {err})")
            entry.fn = entry.eager
            return self._eager(entry, tensors)
        if entry.fn is not entry.eager:
            self.compiled_calls += 1
        return tuple(t[:n] for t in out)

    @staticmethod
    def _eager(entry: _Entry, tensors: tuple[Tensor | None, ...]) -> tuple:
        with torch.no_grad():
            return entry.eager(*tensors)

    @staticmethod
    def _note(entry: _Entry, why: str) -> None:
        if not entry.noted:
            entry.noted = True
            log.warning("attack.compile: %s; this step runs eagerly there", why)

    def __getstate__(self) -> dict:
        """Compiled functions do not pickle (DDP spawn, checkpoints): they are rebuilt."""
        return {"enabled": self.enabled, "compiled_calls": 0, "compile_seconds": 0.0,
                "_entries": {}}  # fmt: skip

    def __deepcopy__(self, memo: dict) -> Gradients:
        return Gradients(self.enabled)


#: The eager operation, for helpers called without an attack (tests, other attacks' parts).
EAGER = Gradients(False)


def dynamo_limits() -> object:
    """Dynamo settings while a compiled step runs: room for every attack's entries, and a
    hit limit raises (then the step falls back to eager with a note) instead of silently
    running uncompiled."""
    return torch._dynamo.config.patch(
        recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True
    )
