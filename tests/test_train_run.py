"""qualityguide.train.run: the step every recipe and training eval shares, against a hand-written loop."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import reset_accelerate

from qualityguide.errors import TrainingError
from qualityguide.train.run import identity_difference, train_step


def problem(seed=0):
    """A linear model, two micro-batches per step, and an LR schedule."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(5, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5, generator=g))
        model.bias.copy_(torch.randn(3, generator=g))
    data = [(torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(6)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, data, optimizer, schedule


def terms(model, x, y):
    err = model(x) - y
    return {"loss": (err ** 2).mean() * 40, "abs": err.abs().mean()}  # x40: gradients big enough to be clipped


def by_hand(steps=3, accum=2, max_norm=1.0):
    """The step written out: summed micro-batch gradients of loss/accum, the global norm and clip factor computed
    here (not torch's clip_grad_norm_), AdamW, the schedule."""
    model, data, optimizer, schedule = problem()
    records = []
    for step in range(steps):
        grads = [torch.zeros_like(p) for p in model.parameters()]
        mean = {"loss": 0.0, "abs": 0.0}
        for micro in range(accum):
            x, y = data[step * accum + micro]
            model.zero_grad()
            values = terms(model, x, y)
            (values["loss"] / accum).backward()
            grads = [g + p.grad for g, p in zip(grads, model.parameters())]
            mean = {k: mean[k] + float(values[k].detach()) / accum for k in mean}
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        factor = min(1.0, max_norm / (norm + 1e-6))
        for g, p in zip(grads, model.parameters()):
            p.grad = g * factor
        records.append({**mean, "lr": schedule.get_last_lr()[0], "grad_norm": norm})
        optimizer.step()
        schedule.step()
    return model, records


def with_train_step(accelerator=None, steps=3, accum=2, max_norm=1.0):
    model, data, optimizer, schedule = problem()
    prepared = model
    if accelerator is not None:
        prepared, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    records = []
    for step in range(steps):
        records.append(train_step(accelerator, prepared, optimizer, schedule, model.parameters(),
                                  lambda micro, step=step: terms(prepared, *data[step * accum + micro]), accum,
                                  max_norm, step))
    return model, records


@pytest.mark.parametrize("use_accelerator", [False, True])
def test_train_step_equals_the_hand_written_loop(use_accelerator):
    accelerator = None
    if use_accelerator:
        from accelerate import Accelerator

        reset_accelerate()
        accelerator = Accelerator(cpu=True)
    try:
        model, records = with_train_step(accelerator)
    finally:
        reset_accelerate()
    expected_model, expected = by_hand()
    assert all(r["grad_norm"] > 1.0 for r in expected)  # every step was clipped: the clip is tested
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.025, 0.05 / 3], rel=1e-9)
    for got, want in zip(records, expected):
        assert set(got) == {"loss", "abs", "lr", "grad_norm"}
        assert got == pytest.approx(want, rel=1e-5)
    for p, q in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_non_finite_term_stops_before_the_optimizer_step():
    model, data, optimizer, schedule = problem()
    before = [p.detach().clone() for p in model.parameters()]

    def micro_step(micro):
        values = terms(model, *data[micro])
        return {**values, "abs": values["abs"] * float("nan")}

    with pytest.raises(TrainingError, match="step 7: loss term 'abs' is nan"):
        train_step(None, model, optimizer, schedule, model.parameters(), micro_step, 2, 1.0, step=7)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the weights stay as checkpointed


def test_a_micro_step_without_a_loss_is_refused():
    model, data, optimizer, _ = problem()
    with pytest.raises(TypeError, match="'loss' term"):
        train_step(None, model, optimizer, None, model.parameters(), lambda micro: {"mse": torch.tensor(1.0)})


def test_identity_difference_names_the_first_differing_field_in_the_run_order():
    current = {"lr_scheduler": "cosine", "lora": {"rank": 4}, "data": {"count": 8}}
    assert identity_difference(current, dict(current)) is None
    assert identity_difference({**current, "lora": {"rank": 8}, "data": {}}, current) == \
        'lora={"rank": 8} there, {"rank": 4} here'
    assert identity_difference(None, current).startswith("lr_scheduler=null there")
