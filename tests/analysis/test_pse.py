"""Known-answer tests of the promotion-suppression (PSE) analysis (docs/METHODS.md §2)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from pse_lightning.analysis.base import AdversarialBatch, AnalysisResult
from pse_lightning.analysis.pse import PSE
from pse_lightning.analysis.pse.attribution import (
    integrated_gradients,
    midpoints,
    pse_attributions,
    refinement_points,
)
from pse_lightning.analysis.pse.samples import ROW_STATES
from pse_lightning.analysis.pse.statistics import (
    BALANCED,
    MIN_PAIR_IMAGES,
    NONE,
    PROMOTION,
    SUPPRESSION,
    attribution_totals,
    classify,
    eta_squared,
    grid_group_map,
    group_scores,
    image_shares,
    pair_breakdown,
    pair_ids,
    promotion_suppression_maps,
    pse_type,
)
from pse_lightning.models import SmallCNN

CONF = Path(__file__).resolve().parents[2] / "conf" / "analysis" / "pse.yaml"


class Linear(nn.Module):
    """Z = W flatten(x) + b: every first-order attribution is exact."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        self.weight = nn.Parameter(torch.randn(num_classes, d, generator=gen))
        self.bias = nn.Parameter(torch.randn(num_classes, generator=gen))
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


class TwoLogits(nn.Module):
    """Logit 0 (true) and logit 1 (target) are chosen nonlinear functions of s = sum(x).

    ``true_fn``/``target_fn`` map s (N,) to a logit; a third logit stays constant. Logit 0
    is shifted by 30, so the clean prediction is the true class (a constant shift changes
    no gradient and no logit change).
    """

    def __init__(self, true_fn, target_fn) -> None:
        super().__init__()
        self.true_fn, self.target_fn = true_fn, target_fn
        self.num_classes = 3

    def forward(self, x: Tensor) -> Tensor:
        s = x.flatten(1).mean(1)
        true = self.true_fn(s) + 30.0
        return torch.stack([true, self.target_fn(s), torch.zeros_like(s)], dim=1)


def small_cnn(seed: int = 0) -> SmallCNN:
    """An untrained SmallCNN whose BatchNorm statistics are calibrated on random images,
    so its logits respond to the input as a trained net's do (default statistics leave
    the logits nearly constant)."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=10, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3,
                     widths=(8, 16))  # fmt: skip
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        for i in range(4):
            model(images(64, seed=100 + i))
    return model.eval()


def images(n: int, shape=(3, 8, 8), seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(n, *shape, generator=gen)


def towards_target(model: nn.Module, x: Tensor, y: Tensor, t: Tensor, eps: float) -> Tensor:
    """One signed-gradient step raising Z_t - Z_{t0}: both logits move substantially."""
    xv = x.clone().requires_grad_(True)
    z = model(xv)
    (g,) = torch.autograd.grad((z.gather(1, t[:, None]) - z.gather(1, y[:, None])).sum(), xv)
    return (x + eps * g.sign()).clamp(0, 1).detach()


def make_batch(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, t: Tensor, **kw):
    with torch.no_grad():
        logits_clean, logits_adv = model(x), model(x_adv)
    fields = dict(
        x=x, y=y, index=torch.arange(len(x)), logits_clean=logits_clean, x_adv=x_adv,
        logits_adv=logits_adv, target=t, success=torch.ones(len(x), dtype=torch.bool),
        targeted=True,
    )  # fmt: skip
    fields.update(kw)
    return AdversarialBatch(**fields)


# -- functional: known answers -------------------------------------------------------------


@pytest.mark.parametrize("center", [False, True])
def test_linear_model_attributions_are_analytic(center: bool) -> None:
    model = Linear((2, 4, 4), 5)
    x, x_adv = images(6, (2, 4, 4)), images(6, (2, 4, 4), seed=1)
    y, t = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 2, 3, 4, 0, 3])
    w = model.weight.detach()
    if center:
        w = w - w.mean(0, keepdim=True)
    delta = (x_adv - x).flatten(1)
    expected_true, expected_target = delta * w[y], delta * w[t]
    for method in ("grad", "ig"):
        attr = pse_attributions(model, x, x_adv, y, t, method=method, steps=3, center=center)
        torch.testing.assert_close(attr.attr_true.flatten(1), expected_true)
        torch.testing.assert_close(attr.attr_target.flatten(1), expected_target)
        torch.testing.assert_close(attr.delta_true, expected_true.sum(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attr.delta_target, expected_target.sum(1), atol=1e-5, rtol=0)
        assert attr.residual.max() < 1e-4
    # promotion and suppression maps: channel sums of [a^t]+ and [-a^t0]+
    promotion, suppression = promotion_suppression_maps(
        expected_true.view(x.shape), expected_target.view(x.shape)
    )
    torch.testing.assert_close(promotion, expected_target.view(x.shape).clamp_min(0).sum(1))
    torch.testing.assert_close(suppression, (-expected_true.view(x.shape)).clamp_min(0).sum(1))


def test_linear_ig_does_not_refine_and_equals_grad() -> None:
    model = Linear((1, 5, 5), 4, seed=3)
    x, x_adv = images(5, (1, 5, 5)), images(5, (1, 5, 5), seed=2)
    y, t = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 2, 3, 0, 2])
    ig = pse_attributions(model, x, x_adv, y, t, method="ig", steps=4, max_steps=64)
    grad = pse_attributions(model, x, x_adv, y, t, method="grad")
    assert ig.steps.tolist() == [4] * 5  # already complete: no doubling
    torch.testing.assert_close(ig.attr_true, grad.attr_true)
    torch.testing.assert_close(ig.attr_target, grad.attr_target)


def test_ig_totals_match_logit_changes_on_small_cnn() -> None:
    model = small_cnn()
    x = images(16)
    y = torch.arange(16) % 10
    t = (y + 3) % 10
    x_adv = towards_target(model, x, y, t, eps=0.02)
    attr = pse_attributions(model, x, x_adv, y, t, method="ig", steps=32, max_steps=256)
    with torch.no_grad():
        change = model(x_adv) - model(x)
    delta_true, delta_target = (
        change.gather(1, y[:, None])[:, 0],
        change.gather(1, t[:, None])[:, 0],
    )
    total = delta_true.abs() + delta_target.abs()
    for a, delta in ((attr.attr_true, delta_true), (attr.attr_target, delta_target)):
        error = (a.flatten(1).sum(1) - delta).abs()
        # each logit within 1% of its own change (of 10% of the total for a barely moved one)
        assert (error < 0.01 * torch.maximum(delta.abs(), 0.1 * total)).all()
    assert (attr.residual < 0.01).all()
    assert (attr.steps == 32).float().mean() >= 0.75  # 32 steps suffice for most images
    # first order is visibly worse on the same nonlinear path: the check can fail
    grad = pse_attributions(model, x, x_adv, y, t, method="grad")
    assert grad.residual.mean() > 5 * attr.residual.mean()


class CountingModel(nn.Module):
    """Wraps a model and counts the images it is evaluated on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.images = model, 0
        self.num_classes = model.num_classes

    def forward(self, x: Tensor) -> Tensor:
        self.images += len(x)
        return self.model(x)


def test_steps_triple_per_sample_until_complete() -> None:
    model = small_cnn(1)
    x = images(6)
    y, t = torch.arange(6), (torch.arange(6) + 1) % 10
    x_adv = towards_target(model, x, y, t, eps=0.1)
    coarse = pse_attributions(model, x, x_adv, y, t, steps=1, max_steps=1)
    tol = float(coarse.residual.median())  # about half the samples must be refined
    fine = pse_attributions(model, x, x_adv, y, t, steps=1, max_steps=64, tol=tol)
    refined = coarse.residual > tol
    assert refined.any() and (~refined).any()
    assert (fine.steps[~refined] == 1).all() and (fine.steps[refined] >= 3).all()
    assert set(fine.steps.tolist()) <= {1, 3, 9, 27}  # 81 > max_steps
    assert ((fine.residual <= tol) | (fine.steps == 27)).all()
    # each sample's result is its own: the same when attributed alone
    alone = pse_attributions(model, x[-1:], x_adv[-1:], y[-1:], t[-1:], steps=1, max_steps=64,
                             tol=tol)  # fmt: skip
    assert alone.steps.item() == fine.steps[-1].item()
    torch.testing.assert_close(alone.attr_target[0], fine.attr_target[-1], atol=1e-6, rtol=1e-4)


def test_refinement_reuses_every_point_and_equals_a_fresh_run() -> None:
    model = small_cnn(4)
    x = images(6)
    y, t = torch.arange(6), (torch.arange(6) + 5) % 10
    x_adv = towards_target(model, x, y, t, eps=0.1)
    counting = CountingModel(model)
    with torch.no_grad():
        logits_clean, logits_adv = model(x), model(x_adv)
    attr = pse_attributions(counting, x, x_adv, y, t, steps=4, max_steps=36, tol=1e-9,
                            logits_clean=logits_clean, logits_adv=logits_adv)  # fmt: skip
    assert attr.steps.tolist() == [36] * 6  # tol unreachable: 4 -> 12 -> 36 for all
    assert counting.images == 6 * 36  # each of the 36 midpoints evaluated exactly once
    fresh = integrated_gradients(model, x, x_adv, y, t, steps=36)
    torch.testing.assert_close(attr.attr_true, fresh[0], atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(attr.attr_target, fresh[1], atol=1e-7, rtol=1e-4)
    # the refinement nodes are exactly the 3N midpoints the N midpoints lack
    kw = dict(device=x.device, dtype=torch.float64)
    both = torch.cat([midpoints(5, **kw), refinement_points(5, **kw)])
    torch.testing.assert_close(both.sort().values, midpoints(15, **kw))


@pytest.mark.parametrize("channels_last", [False, True])
def test_chunking_does_not_change_integrated_gradients(channels_last: bool) -> None:
    model = small_cnn(2)
    x = images(4)
    y, t = torch.arange(4), torch.arange(4) + 4
    x_adv = towards_target(model, x, y, t, eps=0.05)
    reference = integrated_gradients(model, x, x_adv, y, t, steps=8, chunk_size=1,
                                     channels_last=False)  # fmt: skip
    # chunk sizes that split steps (3, 7), hold whole steps (8) or everything (1000)
    for chunk in (3, 7, 8, 1000):
        got = integrated_gradients(model, x, x_adv, y, t, steps=8, chunk_size=chunk,
                                   channels_last=channels_last)  # fmt: skip
        for a, b in zip(reference, got, strict=True):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    batched = integrated_gradients(model, x, x_adv, y, t, steps=8, mode="vmap",
                                   channels_last=channels_last)  # fmt: skip
    for a, b in zip(reference, batched, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)


class ViewsActivations(nn.Module):
    """A conv net that flattens its activation with .view (fails on channels-last)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)
        self.num_classes = 3

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return self.fc(h.view(len(h), -1))


def test_channels_last_failure_names_the_key() -> None:
    model = ViewsActivations()
    x = images(2)
    y, t = torch.zeros(2).long(), torch.ones(2).long()
    with pytest.raises(RuntimeError, match="analysis.pse.channels_last=false"):
        pse_attributions(model, x, x + 0.01, y, t, steps=2, max_steps=2)
    attr = pse_attributions(model, x, x + 0.01, y, t, steps=2, max_steps=2, channels_last=False)
    assert attr.residual.max() < 1e-3  # conv + linear: linear in x, exact


def test_matches_captum_integrated_gradients() -> None:
    captum_attr = pytest.importorskip("captum.attr")
    model = small_cnn(3)
    x = images(4)
    y, t = torch.arange(4), torch.arange(4) + 2
    x_adv = towards_target(model, x, y, t, eps=0.05)
    ours_true, ours_target = integrated_gradients(model, x, x_adv, y, t, steps=16)
    ig = captum_attr.IntegratedGradients(model)
    for ours, cls in ((ours_true, y), (ours_target, t)):
        ref = ig.attribute(x_adv, baselines=x, target=cls, n_steps=16, method="riemann_middle")
        torch.testing.assert_close(ours, ref, atol=1e-7, rtol=1e-4)


# -- types ---------------------------------------------------------------------------------


def test_classify_boundaries() -> None:
    r = torch.tensor([0.0, 0.2, 1 / 3, 0.5, 2 / 3, 0.9, 1.0, math.nan])
    kinds = classify(r, 1 / 3, 2 / 3).tolist()
    assert kinds == [SUPPRESSION, SUPPRESSION, BALANCED, BALANCED, BALANCED, PROMOTION,
                     PROMOTION, NONE]  # fmt: skip
    r, kind = pse_type(torch.tensor([-2.0, -1.0, 0.5, 0.0]), torch.tensor([1.0, 3.0, -1.0, 0.0]),
                       1 / 3, 2 / 3)  # fmt: skip
    torch.testing.assert_close(r[:2], torch.tensor([1 / 3, 0.75]))
    assert kind.tolist() == [BALANCED, PROMOTION, NONE, NONE]


@pytest.mark.parametrize(
    ("true_fn", "target_fn", "expected"),
    [
        (lambda s: -torch.exp(3 * s), lambda s: torch.zeros_like(s), "suppression"),
        (lambda s: torch.ones_like(s), lambda s: torch.sinh(4 * s), "promotion"),
        (lambda s: -(s**2), lambda s: s**2, "balanced"),
    ],
)
def test_only_suppressing_or_promoting_perturbations_are_typed_so(true_fn, target_fn, expected):
    model = TwoLogits(true_fn, target_fn)
    x = images(5, (1, 6, 6))
    x_adv = (x + 0.1).clamp(0, 1)  # raises s = mean(x): only moves the logits that depend on s
    y, t = torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)
    metric = PSE(steps=32)
    metric.update(model, make_batch(model, x, x_adv, y, t))
    result = metric.compute().scalars
    assert result[f"frac_{expected}"] == 1.0
    attr = pse_attributions(model, x, x_adv, y, t)
    promotion, suppression = promotion_suppression_maps(attr.attr_true, attr.attr_target)
    if expected == "suppression":
        assert (promotion == 0).all() and (suppression > 0).all()
        assert result["suppression_share"] == 1.0
    if expected == "promotion":
        assert (suppression == 0).all() and (promotion > 0).all()
        assert result["promotion_share"] == 1.0


def test_no_effect_is_typed_none() -> None:
    model = TwoLogits(lambda s: s, lambda s: -s)  # the perturbation helps the true class
    x = images(3, (1, 4, 4))
    batch = make_batch(
        model, x, (x + 0.05).clamp(0, 1), torch.zeros(3).long(), torch.ones(3).long()
    )
    metric = PSE(method="grad")
    metric.update(model, batch)
    result = metric.compute().scalars
    assert result["frac_none"] == 1.0 and math.isnan(float(result["mean_r"]))


# -- groups --------------------------------------------------------------------------------


def test_grid_groups_and_scores() -> None:
    ids = grid_group_map(5, 5, 2, torch.device("cpu"))
    assert ids[0].tolist() == [0, 0, 1, 1, 2] and ids[4].tolist() == [6, 6, 7, 7, 8]
    attr_true = -torch.ones(1, 3, 5, 5)
    attr_target = torch.zeros(1, 3, 5, 5)
    attr_target[..., :2, :2] = 2.0  # group 0 promotes
    promotion, suppression = group_scores(attr_true, attr_target, ids)
    sizes = torch.bincount(ids.flatten()).float() * 3
    torch.testing.assert_close(suppression[0], sizes)
    assert promotion[0, 0] == 24.0 and (promotion[0, 1:] == 0).all()
    totals = attribution_totals(attr_true, attr_target)
    torch.testing.assert_close(totals, torch.tensor([[24.0, 75.0, 0.0, 0.0]]))


def test_group_map_from_attack_extras() -> None:
    # left half of the image only suppresses, right half only promotes (linear model)
    model = Linear((1, 4, 4), 2)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0].view(4, 4)[:, :2] = -1.0  # true logit falls on the left
        model.weight[1].view(4, 4)[:, 2:] = 1.0  # target logit rises on the right
        model.bias.copy_(torch.tensor([20.0, 0.0]))  # the clean prediction is the true class
    x = torch.full((2, 1, 4, 4), 0.5)
    group_map = torch.zeros(4, 4, dtype=torch.long)
    group_map[:, 2:] = 1
    batch = make_batch(model, x, x + 0.1, torch.zeros(2).long(), torch.ones(2).long(),
                       extras={"group_map": group_map})  # fmt: skip
    metric = PSE(method="grad")
    metric.update(model, batch)
    assert metric.group_type_counts.tolist() == [2, 0, 2, 0]
    result = metric.compute().scalars
    assert result["group_frac_suppression"] == 0.5 and result["group_frac_promotion"] == 0.5
    assert result["frac_balanced"] == 1.0  # 0.8 up and 0.8 down: r = 1/2


# -- the Metric ----------------------------------------------------------------------------


def predicted(model: nn.Module, x: Tensor) -> Tensor:
    """The model's clean prediction: used as the label, so every image is analysed."""
    with torch.no_grad():
        return model(x).argmax(dim=1)


def cnn_batch(n: int = 12, seed: int = 0):
    model = small_cnn(seed)
    x = images(n, seed=seed)
    y = predicted(model, x)
    t = (y + 1 + torch.arange(n) % 3) % 10
    x_adv = towards_target(model, x, y, t, eps=0.05)
    success = torch.arange(n) % 4 != 3
    return model, make_batch(model, x, x_adv, y, t, success=success)


def sub_batch(batch: AdversarialBatch, sel: Tensor) -> AdversarialBatch:
    fields = {k: getattr(batch, k) for k in ("x", "y", "index", "logits_clean", "x_adv",
                                             "logits_adv", "target", "success")}  # fmt: skip
    return AdversarialBatch(**{k: v[sel] for k, v in fields.items()}, targeted=batch.targeted)


def assert_same_samples(got: dict, expected: dict) -> None:
    """Rows and examples of two compute() results agree column by column."""
    for kind in ("rows", "examples"):
        for column, value in vars(expected[kind]).items():
            torch.testing.assert_close(getattr(got[kind], column), value, equal_nan=True,
                                       atol=1e-6, rtol=1e-4, msg=f"{kind}.{column}")  # fmt: skip


def test_split_and_merged_states_equal_one_pass() -> None:
    model, batch = cnn_batch()
    kw = dict(steps=8, max_steps=32, max_rows=7, max_figures=3)
    whole = PSE(**kw)
    whole.update(model, batch)
    # two "ranks" that see interleaved samples, as the shard sampler deals them
    rank0, rank1 = PSE(**kw), PSE(**kw)
    rank0.update(model, sub_batch(batch, torch.arange(0, 12, 2)))
    rank1.update(model, sub_batch(batch, torch.arange(1, 12, 2)))
    rank1.merge_state(rank0)
    expected, merged = whole.compute(), rank1.compute()
    assert expected.scalars.keys() == merged.scalars.keys()
    # Float32 attributions of one image can round differently when the passes hold other
    # images; the residual (a small difference of sums) amplifies that to ~1e-7. Counts
    # are integers and a lost or doubled row would be off by far more than the tolerance.
    for key, value in expected.scalars.items():
        torch.testing.assert_close(merged.scalars[key].double(), value.double(), equal_nan=True,
                                   atol=1e-6, rtol=1e-5)  # fmt: skip
    assert expected.scalars["n_images"] == 9 and expected.scalars["analysed_fraction"] == 0.75
    rows, examples = expected.details["rows"], expected.details["examples"]
    assert rows.index.tolist() == [0, 1, 2, 4, 5, 6]  # success only, index < 7
    assert_same_samples(merged.details, expected.details)
    assert examples.index.tolist() == [0, 1, 2]
    # the kept columns are the batch's own values, cut back to their shapes
    idx = rows.index
    assert rows.label.tolist() == batch.y[idx].tolist()
    assert rows.target.tolist() == batch.target[idx].tolist()
    assert rows.success.all() and rows.steps.dtype == torch.long
    change = batch.logits_adv - batch.logits_clean
    torch.testing.assert_close(rows.delta_true, change.gather(1, batch.y[:, None])[idx, 0])
    torch.testing.assert_close(examples.x, batch.x[examples.index])
    torch.testing.assert_close(examples.delta, (batch.x_adv - batch.x)[examples.index])
    assert examples.promotion.shape == (3, 8, 8) and examples.net.shape == (3, 8, 8)
    # net = promotion - suppression where the counter-effects vanish, in general the sum
    # over pixels of the net map is Delta_t - Delta_t0 up to the completeness residual
    net_total = examples.net.flatten(1).sum(1)
    margin = (rows.delta_target - rows.delta_true)[:3]
    torch.testing.assert_close(net_total, margin, atol=0.02 * float(margin.abs().max()), rtol=0)


def _shifted(batch: AdversarialBatch, shift: int) -> AdversarialBatch:
    """The same images under dataset indices ``index + shift``."""
    return AdversarialBatch(**{**vars(batch), "index": batch.index + shift})


def test_the_per_image_state_stays_bounded_and_samples_uniformly() -> None:
    """10 batches of 12 images (90 analysed) with max_images=5: the per-image state never
    holds more than 2 x 5 + one batch, and compute keeps exactly the 5 analysed images of
    smallest seeded key (the known sample), whatever the order or split of the batches;
    the counts still cover all 90 and the class-pair effect is that of the sample."""
    from pse_lightning.analysis.pse.report import sample_note
    from pse_lightning.analysis.pse.samples import IMAGE_STATES, sample_images, sample_keys

    model, batch = cnn_batch()
    batches = [_shifted(batch, 12 * k) for k in range(10)]
    whole = PSE(method="grad", max_images=5, mixture_bootstrap=0, bootstrap=10)
    for b in batches:
        whole.update(model, b)
        held = sum(len(part) for part in getattr(whole, IMAGE_STATES["index"]))
        assert held <= 2 * 5 + 12
    analysed = torch.cat([b.index[b.success] for b in batches])
    expected = analysed[sample_keys(analysed).argsort()[:5]].sort().values
    result = whole.compute()
    images = result.details["images"]
    assert images.index.tolist() == expected.tolist()
    assert int(result.scalars["n_images"]) == 90 == len(analysed)
    assert int(result.details["pairs"].counts.sum()) == 5
    label, target = batch.y[images.index % 12], batch.target[images.index % 12]
    assert images.label.tolist() == label.tolist()
    eta = eta_squared(images.r, pair_ids(label, target))
    torch.testing.assert_close(result.scalars["pair_eta2"], eta["eta2"], equal_nan=True)
    # two "ranks", each seeing every other batch in reverse order, merged: the same sample
    rank0, rank1 = (PSE(method="grad", max_images=5, mixture_bootstrap=0, bootstrap=10)
                    for _ in range(2))  # fmt: skip
    for k, b in reversed(list(enumerate(batches))):
        (rank0 if k % 2 else rank1).update(model, b)
    rank1.merge_state(rank0)
    merged = sample_images(rank1._columns(IMAGE_STATES), 5)  # what compute() keeps
    assert sorted(merged["index"].long().tolist()) == expected.tolist()
    note = sample_note(result.scalars, images, 5)
    assert "uniform random sample of 5 of the 90 analysed images" in note
    assert sample_note(result.scalars, images, 90) == ""  # nothing left out: no note


def test_images_under_the_bound_are_all_kept_unchanged() -> None:
    """The default bound keeps every analysed image in its own order (the results are
    those of an unbounded state), and the sample keys do not follow the dataset's order:
    of 10,000 indices sorted by class (1,000 a class), the 1,000 smallest keys fall about
    equally in each class."""
    from pse_lightning.analysis.pse.samples import sample_images, sample_keys

    index = torch.tensor([5.0, 3.0, 9.0, 3.0])
    columns = {"index": index, "r": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    kept = sample_images(columns, 3)
    assert kept["index"] is index and kept["r"] is columns["r"]  # 3 distinct images fit
    assert sorted(sample_images(columns, 2)["index"].tolist()) in ([3.0, 5.0], [3.0, 9.0],
                                                                   [5.0, 9.0])  # fmt: skip
    keys = sample_keys(torch.arange(10_000))
    assert keys.min() >= 0 and keys.max() < 1 and len(keys.unique()) == 10_000
    per_class = torch.bincount(keys.argsort()[:1000] // 1000, minlength=10)
    # binomial(1000, 0.1) per class: sd 9.5; 60..140 is a > 4 sd band
    assert int(per_class.min()) >= 60 and int(per_class.max()) <= 140, per_class.tolist()
    assert PSE().max_images == 50_000


def test_clean_misclassified_rows_are_skipped_and_counted() -> None:
    model, batch = cnn_batch()
    wrong = torch.tensor([1, 5, 8])  # labels the model does not predict on clean images
    y = batch.y.clone()
    y[wrong] = (y[wrong] + 1) % 10
    mislabelled = AdversarialBatch(**{**vars(batch), "y": y, "attacked": None})
    kw = dict(steps=4, max_steps=4, max_rows=12)
    metric, reference = PSE(**kw), PSE(**kw)
    metric.update(model, mislabelled)
    keep = torch.tensor([i for i in range(12) if i not in wrong.tolist()])
    reference.update(model, sub_batch(batch, keep))  # only the clean-correct rows
    got, expected = metric.compute(), reference.compute()
    assert int(got.scalars["n_clean_misclassified"]) == 3
    assert int(expected.scalars["n_clean_misclassified"]) == 0
    # success rows 0..11 but 3, 7, 11; of those 1, 5, 8 are skipped
    assert got.details["rows"].index.tolist() == [0, 2, 4, 6, 9, 10]
    assert got.scalars["analysed_fraction"] == pytest.approx(6 / 12)
    for key in ("frac_suppression", "frac_balanced", "promotion_share", "mean_r", "residual_max"):
        torch.testing.assert_close(got.scalars[key], expected.scalars[key], equal_nan=True)


def test_incomplete_attributions_are_counted_listed_and_kept_out_of_shares(
    tmp_path: Path,
) -> None:
    model, batch = cnn_batch(12, seed=1)
    x, x_adv, y, t = batch.x, batch.x_adv, batch.y, batch.target
    ok = batch.success
    coarse = pse_attributions(model, x[ok], x_adv[ok], y[ok], t[ok], steps=1, max_steps=1,
                              logits_clean=batch.logits_clean[ok],
                              logits_adv=batch.logits_adv[ok])  # fmt: skip
    tol = float(coarse.residual.median())  # one integration step: about half incomplete
    incomplete = coarse.residual > tol
    assert incomplete.any() and (~incomplete).any()
    metric = PSE(steps=1, max_steps=2, tol=tol)  # 3 steps > max_steps: no refinement
    metric.update(model, batch)
    result = metric.compute()
    assert int(result.scalars["n_incomplete"]) == int(incomplete.sum())
    # the shares average the complete images only
    totals = attribution_totals(coarse.attr_true, coarse.attr_target).double()
    expected = image_shares(totals[~incomplete]).mean(0)
    got = torch.stack([result.scalars[k] for k in ("promotion_share", "suppression_share",
                                                   "counter_share")])  # fmt: skip
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, image_shares(totals).mean(0), atol=1e-4)
    # the types still count every analysed image (r comes from the measured logits)
    assert int(result.scalars["n_images"]) == int(ok.sum())
    # every incomplete image is listed, with its residual
    section = metric.report(result, tmp_path, [f"c{c}" for c in range(10)])
    columns, rows = section.tables["pse_incomplete"]
    assert [row[0] for row in rows] == batch.index[ok][incomplete].tolist()
    listed = torch.tensor([row[3] for row in rows], dtype=torch.float64)
    torch.testing.assert_close(listed, coarse.residual[incomplete].double(), rtol=1e-5, atol=0)
    assert f"{int(incomplete.sum())} images keep a completeness residual" in section.markdown
    # nothing complete: the shares are undefined, not 0
    strict = PSE(steps=1, max_steps=1, tol=1e-9)
    strict.update(model, batch)
    scalars = strict.compute().scalars
    assert scalars["n_incomplete"] == scalars["n_images"] == int(ok.sum())
    assert math.isnan(float(scalars["promotion_share"]))
    assert math.isnan(float(scalars["group_frac_active"]))  # no groups measured


# -- class pairs ---------------------------------------------------------------------------


def test_eta_squared_hand_computed() -> None:
    groups = torch.tensor([0, 0, 1, 1])
    split = eta_squared(torch.tensor([0.0, 0.0, 1.0, 1.0]), groups, min_size=3)
    assert split["eta2"] == 1.0 and split["epsilon2"] == 1.0
    assert split["eta2_null"] == pytest.approx(1 / 3) and split["n_small"] == 2
    # within-group spread only: SS_b = 0, SS_t = 1, MS_w = 1 / 2 -> epsilon^2 = -1/2
    mixed = eta_squared(torch.tensor([0.0, 1.0, 0.0, 1.0]), groups)
    assert mixed["eta2"] == 0.0 and mixed["epsilon2"] == pytest.approx(-0.5)
    # NaN (type none) is left out; no spread leaves eta^2 undefined
    nan = eta_squared(torch.tensor([0.0, math.nan, 1.0, 0.0]), groups)  # {0}, {1, 0}
    assert int(nan["n"]) == 3 and nan["eta2"] == pytest.approx(1 - 0.5 / (2 / 3))
    assert math.isnan(float(eta_squared(torch.ones(4), groups)["eta2"]))
    one = eta_squared(torch.rand(3), torch.zeros(3).long())  # one pair explains nothing
    assert one["eta2"] == 0.0 and one["eta2_null"] == 0.0
    alone = eta_squared(torch.rand(3), torch.arange(3))  # n <= G: no within-pair spread
    assert all(math.isnan(float(alone[k])) for k in ("eta2", "eta2_null", "epsilon2"))


def _pairs(n: int, classes: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    label = torch.randint(0, classes, (n,), generator=gen)
    return label, (label + 1 + torch.randint(0, classes - 1, (n,), generator=gen)) % classes


def test_planted_pair_effect_gives_eta_squared_near_one() -> None:
    gen = torch.Generator().manual_seed(0)
    label, target = _pairs(400, 4, gen)  # 12 pairs
    pair_mean = torch.rand(4, 4, generator=gen)
    r = pair_mean[label, target] + 0.01 * torch.randn(400, generator=gen)
    effect = eta_squared(r, pair_ids(label, target))
    assert int(effect["n_groups"]) == 12
    assert effect["eta2"] > 0.99 and effect["epsilon2"] > 0.99


def test_independent_r_gives_the_null_eta_squared() -> None:
    gen = torch.Generator().manual_seed(1)
    n, draws = 120, 300
    eta2, eps2, null = [], [], []
    for _ in range(draws):
        label, target = _pairs(n, 4, gen)
        effect = eta_squared(torch.rand(n, generator=gen), pair_ids(label, target))
        eta2.append(float(effect["eta2"]))
        eps2.append(float(effect["epsilon2"]))
        null.append(float(effect["eta2_null"]))  # (G - 1) / (n - 1), G = 12 almost surely
    eta2_t, eps2_t = torch.tensor(eta2), torch.tensor(eps2)
    se = float(eta2_t.std()) / draws**0.5
    assert abs(float(eta2_t.mean()) - sum(null) / draws) < 4 * se  # about 11/119 = 0.092
    assert abs(float(eps2_t.mean())) < 4 * float(eps2_t.std()) / draws**0.5


def test_pair_breakdown_counts_types_per_pair() -> None:
    label = torch.tensor([0, 0, 0, 1, 1, 2])
    target = torch.tensor([1, 1, 2, 0, 0, 0])
    r = torch.tensor([0.1, 0.9, 0.5, math.nan, 0.2, 0.4])
    pairs = pair_breakdown(label, target, classify(r, 1 / 3, 2 / 3), r)
    assert pairs.label.tolist() == [0, 0, 1, 2] and pairs.target.tolist() == [1, 2, 0, 0]
    assert pairs.counts.tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 1], [0, 1, 0, 0]]
    torch.testing.assert_close(pairs.mean_r, torch.tensor([0.5, 0.5, 0.2, 0.4]).double())
    assert pairs.n_defined.tolist() == [2, 1, 1, 1]


def test_metric_pair_effect_and_report(tmp_path: Path) -> None:
    model, batch = cnn_batch(16, seed=2)
    metric = PSE(method="grad", successful_only=False)
    metric.update(model, batch)
    result = metric.compute()
    images = result.details["images"]
    assert images.index.tolist() == list(range(16))
    expected = eta_squared(images.r, pair_ids(batch.y, batch.target))
    for name, key in (("eta2", "pair_eta2"), ("eta2_null", "pair_eta2_null"),
                      ("n_groups", "n_pairs"), ("n_small", "n_pairs_small")):  # fmt: skip
        torch.testing.assert_close(result.scalars[key], expected[name], equal_nan=True)
    pairs = result.details["pairs"]
    assert int(pairs.counts.sum()) == 16 and len(pairs) == int(result.scalars["n_pairs"])
    names = [f"c{c}" for c in range(10)]
    section = metric.report(result, tmp_path, names)
    columns, rows = section.tables["pse_pairs"]
    assert columns[:3] == ["true class", "target class", "images"]
    assert sum(row[2] for row in rows) == 16 and rows[0][0].startswith("c")
    small = [row for row in rows if row[-1]]
    assert len(small) == int(result.scalars["n_pairs_small"])  # every pair here is small
    assert f"fewer than {MIN_PAIR_IMAGES}" in small[0][-1]
    assert "explains eta^2" in section.markdown


def test_metric_leaves_model_untouched() -> None:
    model, batch = cnn_batch(4)
    model.train()
    model.net.features[0][1].eval()  # a deliberately frozen BatchNorm must stay frozen
    state = {k: v.clone() for k, v in model.state_dict().items()}
    PSE(steps=4, max_steps=4).update(model, batch)
    assert model.training and not model.net.features[0][1].training
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_report_uses_only_the_result(tmp_path: Path) -> None:
    model, batch = cnn_batch(8)
    kw = dict(steps=4, max_steps=8, max_rows=5, max_figures=2, successful_only=False)
    metric = PSE(**kw)
    metric.update(model, batch)
    result = metric.compute()
    metric.reset()  # the evaluation module resets before the report is written
    # a fresh instance with the same settings writes the same report: no state on the side
    names = [f"class {c}" for c in range(10)]
    section = PSE(**kw).report(result, tmp_path, names)
    assert section.markdown == metric.report(result, tmp_path / "again", names).markdown
    assert sorted(p.name for p in section.figures) == [
        "pse_examples.png", "pse_ratio_hist.png", "pse_scatter.png", "pse_sweep.png"]  # fmt: skip
    for path in section.figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    columns, rows = section.tables["pse_images"]
    assert columns == [
        "index",
        "label",
        "target",
        "type",
        "delta_true",
        "delta_target",
        "promotion",
        "suppression",
        "r",
        "residual",
        "steps",
        "success",
    ]
    assert list(ROW_STATES) == columns
    assert [row[0] for row in rows] == [0, 1, 2, 3, 4]
    assert all(len(row) == len(columns) for row in rows)
    assert {row[columns.index("type")] for row in rows} <= {"suppression", "balanced",
                                                           "promotion", "none"}  # fmt: skip
    assert [row[columns.index("success")] for row in rows] == batch.success[:5].tolist()
    assert "frac_suppression" not in section.markdown and "| suppression |" in section.markdown
    assert "8 images." in section.markdown


@pytest.mark.unit  # report() refuses before drawing anything
def test_report_of_a_foreign_result_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PSE.compute"):
        PSE().report(AnalysisResult({}, {}), tmp_path, [])


def test_example_images_must_share_a_shape() -> None:
    metric = PSE(method="grad")
    for shape, fails in (((1, 4, 4), False), ((1, 2, 8), True)):
        model, x = Linear(shape, 2), torch.full((1, *shape), 0.5)
        y = predicted(model, x)
        batch = make_batch(model, x, x + 0.1, y, 1 - y)
        if fails:
            with pytest.raises(ValueError, match="one image shape"):
                metric.update(model, batch)
        else:
            metric.update(model, batch)
    assert int(metric.type_counts.sum()) == 1


def test_inference_mode_is_refused() -> None:
    model, batch = cnn_batch(2)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=false"):
        PSE().update(model, batch)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"method": "saliency"}, "analysis.pse.method"),
        ({"steps": 0}, "analysis.pse.steps"),
        ({"steps": 32, "max_steps": 16}, "analysis.pse.max_steps"),
        ({"tau_s": 0.8, "tau_p": 0.6}, "analysis.pse.tau_s"),
        ({"tau_p": 1.5}, "analysis.pse.tau_p"),
        ({"tol": 0}, "analysis.pse.tol"),
        ({"group_size": 0}, "analysis.pse.group_size"),
        ({"center_logits": "yes"}, "analysis.pse.center_logits"),
        ({"channels_last": 1}, "analysis.pse.channels_last"),
        ({"max_rows": -1}, "analysis.pse.max_rows"),
        ({"max_rows": 2**24 + 1}, "analysis.pse.max_rows"),
        ({"max_figures": -1}, "analysis.pse.max_figures"),
    ],
)
def test_bad_config_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        PSE(**kwargs)


def test_config_instantiates_with_its_keys() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF)
    metric = instantiate(cfg)
    assert isinstance(metric, PSE) and metric.name == "pse"
    for key, value in cfg.items():
        if key != "_target_":
            assert getattr(metric, key) == value, key


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        torch.set_num_threads(1)
        model, batch = cnn_batch()
        metric = PSE(steps=8, max_steps=32, max_rows=7, max_figures=3)
        if rank == 0:  # rank 0 sees no row or figure sample at all: the empty-rank case
            metric.update(model, sub_batch(batch, torch.arange(8, 12)))
        else:
            metric.update(model, sub_batch(batch, torch.arange(0, 8)))
        result = metric.compute()  # every rank, it synchronises
        if rank == 0:
            torch.save({"scalars": result.scalars, "details": result.details}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_rank, args=(2, port, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    model, batch = cnn_batch()
    whole = PSE(steps=8, max_steps=32, max_rows=7, max_figures=3)
    whole.update(model, batch)
    expected = whole.compute()
    for key, value in expected.scalars.items():
        torch.testing.assert_close(got["scalars"][key].double(), value.double(),
                                   equal_nan=True, atol=1e-6, rtol=1e-5)  # fmt: skip
    assert_same_samples(got["details"], expected.details)
    assert got["details"]["rows"].index.tolist() == [0, 1, 2, 4, 5, 6]
    assert got["details"]["examples"].index.tolist() == [0, 1, 2]


def test_no_analysed_image_gives_empty_examples_not_an_error() -> None:
    """Every image misclassified (a zoo model on a tiny slice): compute() still answers."""
    model, batch = cnn_batch()
    y = (batch.logits_clean.argmax(1) + 1) % 10  # no clean-correct row
    metric = PSE(steps=4, max_steps=4, max_rows=12)
    metric.update(model, AdversarialBatch(**{**vars(batch), "y": y, "attacked": None}))
    got = metric.compute()
    assert int(got.scalars["n_clean_misclassified"]) == 12
    assert int(got.scalars["n_images"]) == 0
    examples = got.details["examples"]
    assert examples.x.shape[0] == 0 and examples.index.numel() == 0
