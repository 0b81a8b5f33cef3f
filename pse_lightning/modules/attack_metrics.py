"""Attack metrics of an evaluation, reduced exactly across processes."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from pse_lightning.attacks import flat_norm


class AttackMetrics(Metric):
    """Clean and adversarial accuracy, success rates and perturbation norms.

    Only correctly classified clean samples are attacked (docs/METHODS.md §1.1): a
    clean-misclassified sample is counted in ``clean_misclassified`` and nowhere else, so
    it can neither pass for a successful attack of norm ~0 nor for a robust sample.
    ``robust_acc`` is the share of all samples classified correctly both clean and
    adversarially; ``success_rate`` is over the attacked (correctly classified) samples;
    the norms are over the successful ones.

    Per-image outcomes (clean correct, adversarially correct) are kept too: a sweep compares
    two variants with a paired test on the images both saw (docs/METHODS.md §7.6).

    Counts are ``sum`` states. Perturbation norms are one float per sample, kept as ``cat``
    states with their dataset index so the median is exact and a sample seen twice (a
    padded DDP shard) would be detected instead of silently counted twice.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("total", "clean_correct", "adv_correct", "success"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("index", [], dist_reduce_fx="cat")
        self.add_state("l2", [], dist_reduce_fx="cat")
        self.add_state("linf", [], dist_reduce_fx="cat")
        self.add_state("succeeded", [], dist_reduce_fx="cat")
        self.add_state("clean_ok", [], dist_reduce_fx="cat")
        self.add_state("adv_ok", [], dist_reduce_fx="cat")

    def update(
        self,
        x: Tensor,
        x_adv: Tensor,
        y: Tensor,
        logits_clean: Tensor,
        logits_adv: Tensor,
        success: Tensor,
        index: Tensor,
    ) -> None:
        clean_ok = logits_clean.argmax(dim=1) == y
        success = success & clean_ok  # already so from an Attack; kept for any caller
        self.total += len(y)
        self.clean_correct += clean_ok.sum()
        adv_ok = clean_ok & (logits_adv.argmax(dim=1) == y)
        self.adv_correct += adv_ok.sum()
        self.success += success.sum()
        delta = x_adv - x
        self.index.append(index)
        self.l2.append(flat_norm(delta, "l2"))
        self.linf.append(flat_norm(delta, "linf"))
        self.succeeded.append(success)
        self.clean_ok.append(clean_ok)
        self.adv_ok.append(adv_ok)

    def per_image(self) -> dict[str, Tensor]:
        """Every process's per-image rows, sorted by dataset index (so the same under any
        sharding), on the CPU: ``index`` (N,) long; ``clean_correct``, ``adv_correct``,
        ``succeeded`` (N,) bool; ``l2``, ``linf`` (N,) norms of δ. One collective under
        DDP: every rank must call it."""
        with self.sync_context():
            index = _cat(self.index, torch.long)
            order = index.argsort()
            rows = {
                "index": index,
                "clean_correct": _cat(self.clean_ok, torch.bool),
                "adv_correct": _cat(self.adv_ok, torch.bool),
                "succeeded": _cat(self.succeeded, torch.bool),
                "l2": _cat(self.l2, torch.float32),
                "linf": _cat(self.linf, torch.float32),
            }
            return {name: values[order].detach().cpu() for name, values in rows.items()}

    def successful_norms(self, rows: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Per-image ``l2`` and ``linf`` norms of δ over the successful adversarial examples,
        ordered by dataset index: the report's norm distribution. From ``rows`` of
        :meth:`per_image` when given, else a collective like it."""
        rows = self.per_image() if rows is None else rows
        ok = rows["succeeded"]
        return {name: rows[name][ok] for name in ("l2", "linf")}

    def compute(self) -> dict[str, Tensor]:
        index = dim_zero_cat(self.index)
        if index.numel() != int(self.total) or index.unique().numel() != index.numel():
            raise RuntimeError(
                f"evaluation saw {int(self.total)} samples but {index.unique().numel()} distinct "
                "indices: a sampler padded or duplicated data; use the datamodule's loaders"
            )
        ok = dim_zero_cat(self.succeeded).bool()
        l2, linf = dim_zero_cat(self.l2)[ok], dim_zero_cat(self.linf)[ok]
        nan = torch.tensor(float("nan"), device=self.total.device)
        return {
            "samples": self.total.float(),
            "clean_acc": share(self.clean_correct, self.total),
            "robust_acc": share(self.adv_correct, self.total),
            "clean_misclassified": (self.total - self.clean_correct).float(),
            # NaN, not 0, when no sample was classified correctly: nothing was attacked
            "success_rate": share(self.success, self.clean_correct),
            "l2_mean": l2.mean() if l2.numel() else nan,
            "l2_median": l2.median() if l2.numel() else nan,
            "linf_mean": linf.mean() if linf.numel() else nan,
            "linf_median": linf.median() if linf.numel() else nan,
        }

    def outcomes(self, rows: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Per-image ``index``, ``clean_correct`` and ``adv_correct``, sorted by dataset
        index (what a sweep's paired test compares). From ``rows`` of :meth:`per_image`
        when given, else a collective like it."""
        rows = self.per_image() if rows is None else rows
        return {name: rows[name] for name in ("index", "clean_correct", "adv_correct")}


def _cat(state: list[Tensor] | Tensor, dtype: torch.dtype) -> Tensor:
    """A ``cat`` state as one tensor (empty when this process saw no batch)."""
    return dim_zero_cat(state).to(dtype) if len(state) else torch.zeros(0, dtype=dtype)


def share(count: Tensor, total: Tensor) -> Tensor:
    """``count / total``, NaN when ``total`` is 0: a share of nothing is unmeasured, not 0."""
    total = total.float()
    return torch.where(total > 0, count.float() / total.clamp_min(1), torch.nan)
