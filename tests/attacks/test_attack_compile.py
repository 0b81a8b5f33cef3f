"""attack.compile: the inner step through torch.compile, compiled once, equal to eager.

The fast tests trace with a counting backend (dynamo traces the step, the graph then runs
on eager kernels), so they check the mechanism: one trace per (step, model, shape), reuse
across batches, padding of smaller batches, the eager fallback, parameters read at call
time. A compile that was silently skipped fails them (no frame counted, no compiled call).
The slow tests run inductor itself on a tiny model.
"""

from __future__ import annotations

import copy
import logging
import pickle
from functools import partial

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from pse_lightning.attacks import (
    APGD,
    CWL2,
    DDN,
    EAD,
    FAB,
    FGSM,
    FMN,
    PGD,
    AutoAttack,
    StrAttack,
    compiled,
)
from pse_lightning.attacks.base import ascent
from pse_lightning.attacks.compiled import Gradients, eager_gradient, objective_key


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    ).eval()


def tiny_batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(n) % 5
    return x, y


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> CompileCounter:
    """Compiled steps trace with a counting backend; dynamo's caches start empty."""
    torch._dynamo.reset()
    backend = CompileCounter()
    monkeypatch.setattr(compiled, "BACKEND", backend)
    yield backend
    torch._dynamo.reset()


CE = partial(ascent, targeted=False, loss="ce")


def test_one_trace_serves_every_batch_and_equals_eager(counter: CompileCounter) -> None:
    """Second batch and a smaller (padded) batch reuse the first trace, and match eager."""
    model, grads = tiny_model(), Gradients(True)
    for n, seed in ((6, 1), (6, 2), (4, 3)):
        x, y = tiny_batch(n, seed)
        got = grads(model, CE, x, y, None)
        want = eager_gradient(model, CE, x, y, None)
        assert [t.shape[0] for t in got] == [n, n, n]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    assert grads.compiled_calls == 3


def test_a_larger_batch_runs_eagerly_with_a_note(
    counter: CompileCounter, caplog: pytest.LogCaptureFixture
) -> None:
    model, grads = tiny_model(), Gradients(True)
    grads(model, CE, *tiny_batch(4), None)
    x, y = tiny_batch(6)
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        got = grads(model, CE, x, y, None)
    assert "a batch of 6 > the compiled 4 runs eagerly" in caplog.text
    assert grads.compiled_calls == 1 and counter.frame_count == 1
    torch.testing.assert_close(got[0], eager_gradient(model, CE, x, y, None)[0])


class GraphBreak(nn.Module):
    """A model dynamo cannot trace as one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return self.inner(x)


def test_a_step_that_cannot_compile_runs_eagerly_with_a_note(
    counter: CompileCounter, caplog: pytest.LogCaptureFixture
) -> None:
    """Never silently half-compiled: a graph break means eager, said once in the log."""
    model, grads = GraphBreak().eval(), Gradients(True)
    x, y = tiny_batch()
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        got = [grads(model, CE, x, y, None) for _ in range(2)]
    assert caplog.text.count("compilation failed") == 1
    assert grads.compiled_calls == 0
    torch.testing.assert_close(got[1][0], eager_gradient(model, CE, x, y, None)[0])


def test_parameters_are_read_at_call_time(counter: CompileCounter) -> None:
    """An in-place update (an optimizer step) is seen without a new trace: no stale weights."""
    model, grads = tiny_model(), Gradients(True)
    x, y = tiny_batch()
    before = grads(model, CE, x, y, None)[1]
    with torch.no_grad():
        model[0].weight.mul_(-2.0)
    after = grads(model, CE, x, y, None)[1]
    torch.testing.assert_close(after, model(x))
    assert not torch.allclose(before, after)
    assert counter.frame_count == 1


def test_compiled_pgd_traces_its_step_once_and_equals_eager(counter: CompileCounter) -> None:
    model, (x, y) = tiny_model(), tiny_batch()
    kwargs = dict(norm="l2", eps=0.5, step_size=0.1, steps=4)
    eager = PGD(**kwargs)(model, x, y)
    attack = PGD(**kwargs, compile=True)
    result = attack(model, x, y)
    torch.testing.assert_close(result.x_adv, eager.x_adv, rtol=0, atol=1e-6)
    assert torch.equal(result.success, eager.success)
    assert counter.frame_count == 1 and attack.gradients.compiled_calls == 4


def test_compiled_cw_with_early_abort_equals_eager(counter: CompileCounter) -> None:
    """CW's abort drops rows: the smaller batches are padded onto the one trace."""
    model, (x, y) = tiny_model(), tiny_batch()
    kwargs = dict(steps=12, binary_search_steps=2, abort_early=True, initial_const=1.0)
    eager = CWL2(**kwargs)(model, x, y)
    attack = CWL2(**kwargs, compile=True)
    result = attack(model, x, y)
    torch.testing.assert_close(result.x_adv, eager.x_adv, rtol=0, atol=1e-5)
    assert torch.equal(result.success, eager.success)
    assert counter.frame_count == 1 and attack.gradients.compiled_calls > 0


def test_objectives_must_not_hide_tensors() -> None:
    """A bound tensor would be frozen into the first trace: refused."""
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(TypeError, match="as arguments"):
        objective_key(partial(ascent, y, targeted=False, loss="ce"))
    with pytest.raises(TypeError, match="closure"):
        objective_key(lambda logits: ascent(logits, y, None, targeted=False, loss="ce"))
    assert objective_key(CE) == objective_key(partial(ascent, targeted=False, loss="ce"))


def test_attack_copies_drop_compiled_functions(counter: CompileCounter) -> None:
    """DDP spawn pickles the module (and its attack): compiled entries are rebuilt there."""
    model, attack = tiny_model(), PGD(eps=0.03, steps=1, compile=True)
    attack(model, *tiny_batch())
    for clone in (pickle.loads(pickle.dumps(attack)), copy.deepcopy(attack)):
        assert clone.compile and clone.gradients.enabled and not clone.gradients._entries


def test_compile_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=r"^attack.compile must be true or false, got 'yes'$"):
        PGD(compile="yes")


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [partial(PGD, norm="linf", eps=0.03, step_size=0.01, steps=3), partial(DDN, steps=8)],
    ids=["pgd_linf", "ddn"],
)
def test_inductor_matches_eager(make) -> None:
    """The real compiler (inductor): same examples within float tolerance (docs/METHODS.md
    §1.14); a sign step may flip only on a gradient coordinate within rounding of zero."""
    torch._dynamo.reset()
    model, (x, y) = tiny_model(), tiny_batch()
    eager = make()(model, x, y)
    attack = make(compile=True)
    result = attack(model, x, y)
    assert attack.gradients.compiled_calls > 0 and attack.gradients.compile_seconds > 0
    torch.testing.assert_close(result.x_adv, eager.x_adv, rtol=0, atol=1e-5)
    assert torch.equal(result.success, eager.success)


def _check_config(composed, choice: str, compile_value: object) -> None:
    """``attack=<choice> attack.compile=<compile_value>`` as the CLI composes it, through its
    static config check (no attack is built). The session's composition of the choice is
    shared with tests/cli/test_config.py; the value is set on a copy, in struct mode as a
    command-line override is (a key the attack's file lacks fails, as Hydra fails it)."""
    from helpers import CONF_DIR
    from omegaconf import OmegaConf

    from pse_lightning.cli.check import check_config

    cfg = copy.deepcopy(composed(f"attack={choice}"))
    assert OmegaConf.is_struct(cfg) and "compile" in cfg.attack, f"attack={choice}: no compile"
    cfg.attack.compile = compile_value
    check_config(cfg, OmegaConf.to_container(cfg.hydra.runtime.choices), CONF_DIR)


def test_compile_is_a_key_of_every_attack_and_a_wrong_type_is_one_line(composed) -> None:
    from helpers import group_choices

    from pse_lightning.validation import InputError

    for choice in group_choices("attack"):
        _check_config(composed, choice, True)
    with pytest.raises(InputError, match=r"^attack\.compile must be true or false, got 'maybe'$"):
        _check_config(composed, "cw", "maybe")


@pytest.mark.slow
def test_lightning_test_loop_with_compile_gives_the_eager_metrics(
    make_cfg, counter: CompileCounter, tmp_path
) -> None:
    """The evaluation loop (two batches, the last one smaller: padded) with
    attack.compile=true: one trace, the same metrics as eager."""
    from pse_lightning import pipeline

    eager = pipeline.run(make_cfg())
    again = make_cfg("stage=evaluate", "attack.compile=true", f"paths.run_dir={tmp_path}/c")
    compiled_metrics = pipeline.run(again)
    assert counter.frame_count == 1
    assert compiled_metrics.keys() == eager.keys()
    for key, value in eager.items():
        assert compiled_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key


def test_a_strided_label_column_and_its_padded_copy_share_one_trace(
    counter: CompileCounter,
) -> None:
    """AutoAttack aims at a column of a ranking matrix: full and padded calls, one trace."""
    model, grads = tiny_model(), Gradients(True)
    x, _ = tiny_batch()
    ranked = torch.arange(30).view(6, 5) % 5
    grads(model, CE, x, ranked[:, 1], None)
    grads(model, CE, x[:4], ranked[:4, 2], None)
    assert counter.frame_count == 1 and grads.compiled_calls == 2


@pytest.mark.parametrize(
    "make",
    [
        partial(FGSM, eps=0.03),
        partial(APGD, eps=0.03, steps=4, restarts=2),
        partial(AutoAttack, eps=0.03, steps=3, target_classes=2, square_queries=20),
        partial(FAB, eps=0.03, steps=4, target_classes=0),
        partial(EAD, steps=5, binary_search_steps=2, abort_early=True),
        partial(EAD, steps=5, binary_search_steps=1, fista=False),
        partial(StrAttack, eps=0.1, steps=4, binary_search_steps=1, group_size=2),
        partial(FMN, steps=6),
        partial(DDN, steps=6, targeted=True),
    ],
    ids=[
        "fgsm",
        "apgd",
        "autoattack",
        "fab",
        "ead",
        "ead_ista",
        "strattack",
        "fmn",
        "ddn_targeted",
    ],
)
def test_every_attack_runs_compiled_and_equals_eager(counter: CompileCounter, make) -> None:
    model, (x, y) = tiny_model(), tiny_batch()
    eager = make()(model, x, y)
    attack = make(compile=True)
    result = attack(model, x, y)
    assert attack.gradients.compiled_calls > 0
    torch.testing.assert_close(result.x_adv, eager.x_adv, rtol=0, atol=1e-5)
    assert torch.equal(result.success, eager.success)
