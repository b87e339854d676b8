"""The distillation loop: it lowers the loss, keeps pruned zeros (and 2:4) exactly, resumes bit-exactly,
and walks the samples in seeded epochs with a warm-up-then-decay learning rate."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.distill import Settings, TrainState, batch_indices, distill, lr_factor, restore_masks, zero_masks
from methods.weights import nm_mask


def _pair():
    """A teacher MLP and a student copy whose first Linear is pruned 2:4 and whose bias was reset."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    student = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        w = student[0].weight
        w[nm_mask(w.abs(), 2, 4)] = 0
        student[0].bias.zero_()
    return teacher, student


def _loss(teacher, student):
    def loss(batch):
        with torch.no_grad():
            target = teacher(batch["x"])
        return F.mse_loss(student(batch["x"]), target)
    return loss


def _run(steps, state=None, on_step=None, **kw):
    teacher, student = _pair()
    samples = {"x": torch.randn(40, 16, generator=torch.Generator().manual_seed(1))}
    params = dict(student.named_parameters())
    settings = Settings(lr=1e-2, steps=steps, batch_size=8, warmup_steps=2, weight_decay=0.1, **kw)
    return student, distill(student, params, _loss(teacher, student), samples, settings, state, on_step), samples


def test_training_lowers_the_loss_and_keeps_2_4_and_every_pruned_zero():
    _, student0 = _pair()
    zeros = student0[0].weight == 0
    student, state, samples = _run(30)
    w = student[0].weight
    assert torch.equal(w == 0, zeros)  # no pruned weight moved off zero, no new ones
    assert (w.reshape(32, 4, 4) != 0).sum(-1).max() <= 2  # 2:4 along the input axis
    assert state.losses[-1] < 0.5 * state.losses[0] and len(state.losses) == 30
    assert not any(p.requires_grad for p in student.parameters())
    assert student[0].bias.abs().sum() > 0  # a zero bias is an initial value and trains


def test_accumulation_and_bf16_autocast_run_on_the_cpu():
    student, state, _ = _run(4, accumulation=2, bf16=True)
    assert len(state.losses) == 4 and all(torch.isfinite(torch.tensor(state.losses)))
    assert student[0].weight.dtype == torch.float32


class Interrupted(Exception):
    pass


def test_resume_from_a_saved_state_takes_the_same_steps():
    full, full_state, samples = _run(8)
    settings = Settings(lr=1e-2, steps=8, batch_size=8, warmup_steps=2, weight_decay=0.1)
    teacher, student = _pair()
    buf = io.BytesIO()

    def stop_at_3(s: TrainState):
        if s.step == 3:
            torch.save({"model": student.state_dict(), "state": s.__dict__}, buf)
            raise Interrupted
    with pytest.raises(Interrupted):
        distill(student, dict(student.named_parameters()), _loss(teacher, student), samples, settings, None, stop_at_3)
    buf.seek(0)
    blob = torch.load(buf, weights_only=True)
    teacher, resumed = _pair()
    resumed.load_state_dict(blob["model"])
    state = distill(resumed, dict(resumed.named_parameters()), _loss(teacher, resumed), samples, settings,
                    TrainState(**blob["state"]))
    assert state.step == 8 and state.losses == pytest.approx(full_state.losses, rel=1e-6)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_only_the_chosen_parameters_train():
    teacher, student = _pair()
    before = student[2].weight.clone()
    samples = {"x": torch.randn(16, 16)}
    distill(student, {"0.weight": student[0].weight}, _loss(teacher, student), samples,
            Settings(lr=1e-2, steps=3, batch_size=4))
    assert torch.equal(student[2].weight, before) and torch.equal(student[0].bias, torch.zeros(32))


def test_batches_cover_every_sample_once_per_epoch_seeded():
    epoch = torch.cat([batch_indices(10, i, 5, seed=3) for i in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 1, 5, seed=3), batch_indices(10, 1, 5, seed=3))
    assert not torch.equal(torch.cat([batch_indices(10, i, 5, seed=4) for i in range(2)]), epoch)
    straddling = batch_indices(10, 1, 6, seed=3)  # samples 6..11: the end of epoch 0, the start of epoch 1
    assert straddling[:4].tolist() == epoch[6:].tolist()


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    f = lr_factor(Settings(lr=1.0, steps=10, batch_size=1, warmup_steps=4))
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(7) == pytest.approx(0.5) and f(10) == 0.0


def test_masks_cover_matrices_only_and_restore_zeros():
    params = {"w": nn.Parameter(torch.tensor([[0.0, 1.0], [2.0, 0.0]])), "b": nn.Parameter(torch.zeros(2)),
              "dense": nn.Parameter(torch.ones(2, 2))}
    masks = zero_masks(params)
    assert list(masks) == ["w"]
    with torch.no_grad():
        params["w"].add_(1.0)
    restore_masks(params, masks)
    assert params["w"].tolist() == [[0.0, 2.0], [3.0, 0.0]]
