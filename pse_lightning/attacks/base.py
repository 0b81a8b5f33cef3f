"""The Attack contract shared by every attack.

``Attack.__call__`` is the one public entry point and is the same for all attacks: it
validates the batch, freezes the model in eval mode (restoring every module's own mode
afterwards), resolves the target, calls the subclass's ``_perturb`` with one
:class:`AttackBatch`, enforces the box, the norm budget and the support mask exactly, and
reports logits and success of the exact tensor it returns (the EAD bug of foolbox PR #559
and torchattacks PR #140): an attack may hand back the logits of its final iterate (the
minimum-norm attacks track them for free), and the base class re-forwards only the rows
whose logits are unknown or whose image the enforcement changed. That forward pass runs
when the result's ``success``/``logits_adv``/``target`` is first read, so callers that only
use ``x_adv`` (adversarial training) skip it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar, TypedDict

import torch
from torch import Tensor, nn

from pse_lightning.attacks.compiled import (
    Gradients,
    Step,
    functional_gradient,
    objective_key,
)
from pse_lightning.attacks.losses import ascent_objective, is_success, other_max_index
from pse_lightning.attacks.norms import NORMS, LpBall, Norm, exact_linf
from pse_lightning.core import randomness
from pse_lightning.core.model_state import frozen_eval, model_num_classes, model_version
from pse_lightning.core.rows import clean_correct
from pse_lightning.validation import (
    require_choice,
    require_images,
    require_in_range,
    require_labels,
    require_positive,
)

TARGET_RULES: tuple[str, ...] = ("random", "least_likely", "next")


class AttackOptions(TypedDict, total=False):
    """The keywords every attack takes, declared once: a subclass's constructor ends with
    ``**common: Unpack[AttackOptions]`` and passes ``**common`` to ``Attack.__init__``
    (which documents them). Every attack config sets them, and the static config check
    (:mod:`pse_lightning.cli.signature`) follows ``**common`` to ``Attack.__init__``."""

    targeted: bool
    target_rule: str
    seed: int
    compile: bool


#: The keys of :class:`AttackOptions`, in order.
COMMON_KEYS: tuple[str, ...] = tuple(AttackOptions.__annotations__)
# Streams of the counter-based RNG, one per use, so uses never share noise.
STREAM_START, STREAM_TARGET = 1, 2


class AttackResult:
    """What an attack returns for a batch of N images.

    Attributes:
        x_adv: (N, C, H, W) adversarial images in [0, 1], within the budget.
        attacked: (N,) bool, the clean prediction was correct: only these rows can succeed,
            and attack statistics and analyses use only them (docs/METHODS.md §1.1).
        success: (N,) bool: ``attacked`` and the adversarial prediction is wrong
            (targeted: equals the target), from ``logits_adv``.
        logits_adv: (N, K) logits of exactly ``x_adv`` (after the box, budget and support
            enforcement): from the attack's own forward pass where it had them for a row
            the enforcement left bit-identical, else from a fresh forward pass.
        target: (N,) the class the perturbation aims at: the requested target of a
            targeted attack, else the adversarial runner-up argmax_{j != y} Z_j(x_adv)
            (the class the PSE analysis measures promotion for).
        targeted: whether the attack was targeted.
        extras: attack-specific per-sample tensors (for example the group structure of the
            structured attack), keyed by name.

    ``logits_adv`` (and ``logits_clean``) may be given as functions: the forward pass then
    runs on first access of ``logits_adv``, ``success``, ``attacked`` or (untargeted)
    ``target``, so a caller that only wants ``x_adv`` (adversarial training) never pays it.
    The attack's functions refuse to run once the model's parameters or buffers changed in
    place. A caller that has the clean logits (the evaluation loop) passes them to the
    attack, so reading ``attacked`` costs nothing.
    """

    def __init__(
        self,
        *,
        x_adv: Tensor,
        logits_adv: Tensor | Callable[[], Tensor],
        y: Tensor,
        target: Tensor | None,
        targeted: bool,
        extras: dict[str, Tensor] | None = None,
        logits_clean: Tensor | Callable[[], Tensor] | None = None,
    ) -> None:
        self.x_adv = x_adv
        self._logits_clean = logits_clean
        self.targeted = targeted
        self.extras = dict(extras or {})
        self._logits = logits_adv
        self._y = y
        self._target = target if targeted else None

    @property
    def logits_adv(self) -> Tensor:
        if callable(self._logits):
            self._logits = self._logits()
        return self._logits

    @property
    def attacked(self) -> Tensor:
        if self._logits_clean is None:
            return torch.ones_like(self._y, dtype=torch.bool)
        if callable(self._logits_clean):
            self._logits_clean = self._logits_clean()
        return clean_correct(self._logits_clean, self._y)

    @property
    def success(self) -> Tensor:
        hit = is_success(self.logits_adv, self._y, self._target, self.targeted)
        return hit & self.attacked

    @property
    def target(self) -> Tensor:
        if self._target is not None:
            return self._target
        return other_max_index(self.logits_adv, self._y)

    @property
    def scored(self) -> bool:
        """Whether ``logits_adv`` is known (reading it costs no forward pass)."""
        return not callable(self._logits)


@dataclass(frozen=True)
class AttackBatch:
    """Everything ``_perturb`` gets besides the model, for a batch of N images.

    Attributes:
        x: (N, C, H, W) clean images in [0, 1], detached.
        y: (N,) true labels (also for targeted attacks: region masks need them).
        target: (N,) target classes of a targeted attack, None for an untargeted one.
        index: (N,) dataset indices that key the per-sample randomness.
        support: (N, 1 or C, H, W) bool, the coordinates the perturbation may touch; None
            for all. The base class enforces it on the returned images; attacks also honour
            it while optimising (masked gradients and starts), so an L2 budget or a
            minimum-norm search is spent inside it.
    """

    x: Tensor
    y: Tensor
    target: Tensor | None
    index: Tensor
    support: Tensor | None = None

    @property
    def label(self) -> Tensor:
        """The class the objective is about: the target (targeted) or y."""
        return self.y if self.target is None else self.target

    def confine(self, v: Tensor) -> Tensor:
        """``v`` with the coordinates outside the support zeroed (no-op without one)."""
        return confine(v, self.support)

    def restrict(self, x_adv: Tensor) -> Tensor:
        """``x_adv`` outside the support reset to x exactly (no-op without one)."""
        return restrict(x_adv, self.x, self.support)


def confine(v: Tensor, support: Tensor | None) -> Tensor:
    """``v`` with the coordinates outside ``support`` zeroed (no-op for None): how gradients
    and steps are kept inside a support mask, also on the row subsets of early abort."""
    return v if support is None else v * support


def restrict(x_adv: Tensor, x: Tensor, support: Tensor | None) -> Tensor:
    """``x_adv`` outside ``support`` reset to ``x`` exactly (no-op for None)."""
    return x_adv if support is None else torch.where(support, x_adv, x)


@dataclass(frozen=True)
class Perturbation:
    """What ``_perturb`` returns when it has more than the images.

    Attributes:
        x_adv: (N, C, H, W) the adversarial images.
        logits: (N, K) logits of exactly those images where the attack has them (rows of
            NaN where not): the base class then skips their forward pass. None: unknown.
        extras: attack-specific per-sample outputs (constants, group structure), handed to
            the caller in :attr:`AttackResult.extras`.
    """

    x_adv: Tensor
    logits: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


def keep_logits(before: Tensor, after: Tensor, logits: Tensor | None) -> Tensor | None:
    """``logits`` of ``before`` as logits of ``after``: NaN in the rows that changed.

    Enforcement (projection, support) usually leaves an attack's output bit-identical; a
    row it changes, even by one rounding step, must be forwarded again.
    """
    if logits is None:
        return None
    changed = (before != after).flatten(1).any(dim=1)
    return logits.masked_fill(changed[:, None], float("nan"))


class Attack(ABC):
    """Base class: subclasses implement ``_perturb`` only.

    Args:
        norm: the threat model's norm, 'linf' or 'l2'; None for minimum-norm attacks
            (CW, EAD) that have no budget.
        eps: the budget in [0, 1] pixel units (linf: (0, 1]; l2: > 0).
        targeted: aim at a target class chosen by ``target_rule`` (or passed explicitly).
        target_rule: 'random', 'least_likely' (lowest clean logit) or 'next' ((y + 1) mod K).
        seed: seed of the per-sample counter-based RNG (random starts, random targets).
        compile: run the inner step (forward, objective, input gradient; for PGD also the
            update and projection) through ``torch.compile``, compiled on the first batch
            and reused (:mod:`~pse_lightning.attacks.compiled`, docs/METHODS.md §1.14).

    A subclass takes ``targeted``, ``target_rule``, ``seed`` and ``compile`` as
    ``**common: Unpack[AttackOptions]`` and passes them on unchanged.

    Attributes:
        success_floor: the least share of attacked rows every config of this attack must
            break on a linear net with its configured settings
            (``tests/attacks/test_attack_known_answers.py``, README "Extending"). 0.9 by default;
            a baseline that is not expected to break most inputs (random noise, a weak
            reference attack) declares a lower floor, e.g. ``success_floor = 0.0``.
    """

    success_floor: ClassVar[float] = 0.9

    def __init__(
        self,
        *,
        norm: Norm | None = "linf",
        eps: float | None = 0.03,
        targeted: bool = False,
        target_rule: str = "random",
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        if norm is None:
            self.ball = None
        else:
            require_choice("attack.norm", norm, NORMS)
            if norm == "linf":
                require_in_range(
                    "attack.eps",
                    eps,
                    0.0,
                    1.0,
                    low_open=True,
                    hint="inputs are in [0, 1], for 8/255 write 0.0314",
                )
            else:
                require_positive("attack.eps", eps)
            self.ball = LpBall(norm, float(eps))
        self.norm = norm
        self.eps = None if eps is None else float(eps)
        if not isinstance(targeted, bool):
            raise ValueError(f"attack.targeted must be true or false, got {targeted!r}")
        self.targeted = targeted
        self.target_rule = require_choice("attack.target_rule", target_rule, TARGET_RULES)
        self.seed = int(seed)
        if not isinstance(compile, bool):
            raise ValueError(f"attack.compile must be true or false, got {compile!r}")
        self.compile = compile
        self.gradients = Gradients(compile)

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None = None,
        index: Tensor | None = None,
        support: Tensor | None = None,
        logits_clean: Tensor | None = None,
    ) -> AttackResult:
        """Attack a batch.

        Args:
            model: maps [0, 1] images (N, C, H, W) to logits (N, K).
            x: clean images in [0, 1].
            y: (N,) true labels.
            target: (N,) explicit target classes; only for targeted attacks.
            index: (N,) dataset indices that key the per-sample randomness; defaults to
                0..N-1, so pass them whenever results must not depend on batching.
            support: (N, 1 or C, H, W) bool, the only coordinates the perturbation may
                touch (intersected with the attack's own region, if it has one).
            logits_clean: (N, K) logits of x, when the caller has them: they decide which
                rows count as attacked (clean prediction correct) without a forward pass;
                without them that forward runs when the result's success is first read.

        Returns:
            An :class:`AttackResult`.

        Raises:
            ValueError: an explicit target equal to y (a targeted attack could then
                "succeed" without moving), or an explicit target for an untargeted attack.
        """
        check_images(x)
        if index is None:
            index = torch.arange(len(x), device=x.device)
        x = x.detach()
        with frozen_eval(model), full_precision(x), torch.enable_grad():
            if (
                logits_clean is None
                and self.targeted
                and target is None
                and self.target_rule == "least_likely"
            ):
                with torch.no_grad():
                    logits_clean = model(x)
            num_classes = model_num_classes(model, x, logits_clean)
            require_labels("y", y, len(x), num_classes)
            if logits_clean is not None and logits_clean.shape != (len(x), num_classes):
                raise ValueError(
                    f"logits_clean must have shape ({len(x)}, {num_classes}), got "
                    f"{tuple(logits_clean.shape)}: pass the model's logits of x"
                )
            if target is not None:
                if not self.targeted:
                    raise ValueError(
                        "an explicit target was passed to an untargeted attack; "
                        "set attack.targeted=true"
                    )
                require_labels("target", target, len(x), num_classes)
                check_target_differs(target, y)
            elif self.targeted:
                target = self.choose_target(logits_clean, y, index, num_classes)
            support = intersect_masks(check_support(support, x), self._region(model, x, y))
            batch = AttackBatch(x, y, target if self.targeted else None, index, support)
            out = self._perturb(model, batch)
            if isinstance(out, Tensor):
                out = Perturbation(out)
            x_adv = out.x_adv.detach()
            x_final = batch.restrict(self.enforce_constraints(x, x_adv))
            known = keep_logits(x_adv, x_final, out.logits)
        return AttackResult(
            x_adv=x_final,
            logits_adv=self._scorer(model, x_final, known),
            y=y,
            target=target,
            targeted=self.targeted,
            extras=out.extras,
            logits_clean=self._scorer(model, x, logits_clean),
        )

    # -- hooks for subclasses -------------------------------------------------------------

    @abstractmethod
    def _perturb(self, model: nn.Module, batch: AttackBatch) -> Tensor | Perturbation:
        """Adversarial images for ``batch.x``: the images, or a :class:`Perturbation` with
        their logits (which spares the base class a forward pass) and extras."""

    def _region(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor | None:
        """(N, 1 or C, H, W) bool: where this attack may perturb (None: anywhere).

        A hook for region-restricted attacks (:class:`~pse_lightning.attacks.CAMGuided`);
        the base class intersects it with the caller's ``support`` and enforces it.
        """
        return None

    # -- shared machinery -----------------------------------------------------------------

    def enforce_constraints(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Clip to the budget (if any) and to the box [0, 1], exactly in x's dtype (the
        L-inf bounds are rounded towards x, so float16 rounding cannot exceed eps)."""
        if self.ball is None:
            return x_adv.clamp(0.0, 1.0)
        if self.norm == "linf":  # a clamp, no arithmetic on x_adv: idempotent and exact
            return exact_linf(x, x_adv, self.eps)
        return self.ball.project(x, x_adv)

    def sample_start(self, batch: AttackBatch, restart: int = 0) -> Tensor:
        """A uniformly random point of the ball (inside the support), keyed by (seed,
        sample index, restart)."""
        x = batch.x
        size = self.ball.noise_size(x[0].numel())
        stream = STREAM_START + (restart << 4)  # restart 0 keeps the historical stream
        noise = randomness.uniform(batch.index, (size,), self.seed, stream)
        return batch.restrict(self.ball.sample(x, noise.to(x.dtype), batch.support))

    def objective_gradient(
        self,
        model: nn.Module,
        x_adv: Tensor,
        batch: AttackBatch,
        loss: str,
        reference: Tensor | None = None,
    ) -> Tensor:
        """Gradient of the per-sample ascent objective at ``x_adv`` (one fwd + one bwd),
        zero outside the support."""
        return self.scored_gradient(model, x_adv, batch, loss, reference)[0]

    def scored_gradient(
        self,
        model: nn.Module,
        x_adv: Tensor,
        batch: AttackBatch,
        loss: str,
        reference: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(gradient, logits, objective)`` at ``x_adv`` from one fwd + one bwd: the
        logits and objective score the iterate itself (best-iterate tracking)."""
        objective = partial(ascent, targeted=self.targeted, loss=loss)
        grad, logits, value = self.gradients(model, objective, x_adv, batch.label, reference)
        return batch.confine(grad), logits, value

    def ascent_step(
        self,
        model: nn.Module,
        x_adv: Tensor,
        batch: AttackBatch,
        loss: str,
        step_size: float,
        reference: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(next iterate, logits, objective)``: one projected steepest-ascent step in the
        ball from ``x_adv``, scored at ``x_adv``; compiled as one graph (update and
        projection included) under ``attack.compile``."""
        if not self.compile:
            grad, logits, value = self.scored_gradient(model, x_adv, batch, loss, reference)
            x_next = self.ball.project(batch.x, self.ball.ascend(x_adv, grad, step_size))
            return x_next, logits, value
        objective = partial(ascent, targeted=self.targeted, loss=loss)
        key = ("ascent_step", self.norm, self.eps, step_size, objective_key(objective))
        build = partial(projected_step, model, objective, self.ball, step_size)
        tensors = (x_adv, batch.x, batch.support, batch.label, reference)
        return self.gradients.run(key, model, build, *tensors)

    def choose_target(
        self, logits_clean: Tensor | None, y: Tensor, index: Tensor, num_classes: int
    ) -> Tensor:
        """Resolve ``target_rule`` into (N,) target classes, never equal to y (only
        'least_likely' reads the clean logits)."""
        if self.target_rule == "next":
            return (y + 1) % num_classes
        if self.target_rule == "least_likely":
            return logits_clean.scatter(1, y[:, None], float("inf")).argmin(dim=1)
        return randomness.randint_excluding(index, y, num_classes, self.seed, STREAM_TARGET)

    @staticmethod
    def _scorer(
        model: nn.Module, x_adv: Tensor, logits: Tensor | None
    ) -> Tensor | Callable[[], Tensor]:
        """Logits of ``x_adv``: the known rows of ``logits`` now, or a function that
        forwards the other rows when the result is first read."""
        if logits is not None:
            logits = logits.detach()
            stale = logits.isnan().any(dim=1)
            if not bool(stale.any()):
                return logits
        version = model_version(model)

        def score() -> Tensor:
            if model_version(model) != version:
                raise RuntimeError(
                    "AttackResult.success/logits_adv/target read after the model changed "
                    "(an optimizer step or a train-mode forward since the attack ran): read "
                    "them before updating the model"
                )
            with frozen_eval(model), full_precision(x_adv), torch.no_grad():
                if logits is None or bool(stale.all()):
                    return model(x_adv)
                out = logits.clone()
                out[stale] = model(x_adv[stale]).to(out.dtype)
                return out

        return score


def ascent(
    logits: Tensor, label: Tensor, reference: Tensor | None, *, targeted: bool, loss: str
) -> Tensor:
    """:func:`ascent_objective` with every tensor positional (a compiled step's objective:
    the loss settings are fixed, the labels and reference are arguments)."""
    return ascent_objective(logits, label, targeted, loss, reference)


def projected_step(model: nn.Module, objective: Callable[..., Tensor], ball: LpBall,
                   step_size: float) -> Step:  # fmt: skip
    """The functional (compilable) step ``(x_adv, x, support, *args) -> (x_next, logits,
    objective)`` of :meth:`Attack.ascent_step`."""
    gradient = functional_gradient(model, objective)

    def step(x_adv: Tensor, x: Tensor, support: Tensor | None, *args: Tensor | None) -> tuple:
        grad, logits, value = gradient(x_adv, *args)
        x_next = ball.project(x, ball.ascend(x_adv, confine(grad, support), step_size))
        return x_next, logits, value

    return step


def check_target_differs(target: Tensor, y: Tensor) -> None:
    """An explicit target must differ from the true label in every row."""
    same = (target == y).nonzero()[:, 0]
    if len(same):
        raise ValueError(
            f"target equals y in rows {same[:8].tolist()}: a targeted attack needs "
            "target != y (that row would count as a success without moving); pass other "
            "targets or use attack.target_rule"
        )


def full_precision(x: Tensor) -> torch.autocast:
    """Autocast off on ``x``'s device: an attack's steps, budget and success are computed in
    the model's own precision (float32), whatever ``trainer.precision`` (a bf16-mixed run
    would otherwise round the gradients and the logits that decide success)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def check_images(x: Tensor) -> None:
    """:func:`require_images` at the cost of one min/max pass: the full check (and its
    error messages) runs only when the fast one fails. NaN fails ``lo >= 0``; inf fails the
    range."""
    if isinstance(x, Tensor) and x.dim() == 4 and x.is_floating_point() and x.numel():
        lo, hi = torch.aminmax(x)
        if bool((lo >= 0) & (hi <= 1)):
            return
    require_images("x", x)


def check_support(support: Tensor | None, x: Tensor) -> Tensor | None:
    """Validate a caller's support mask: bool, (N, 1 or C, H, W) for x of (N, C, H, W)."""
    if support is None:
        return None
    n, c, h, w = x.shape
    if (
        support.dtype != torch.bool
        or support.dim() != 4
        or (
            (support.shape[0], support.shape[2], support.shape[3]) != (n, h, w)
            or support.shape[1] not in (1, c)
        )
    ):
        raise ValueError(
            f"support must be a bool tensor of shape ({n}, 1 or {c}, {h}, {w}), got "
            f"{support.dtype} {tuple(support.shape)}"
        )
    return support


def intersect_masks(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The coordinates both masks allow (None allows all)."""
    if a is None:
        return b
    return a if b is None else a & b
