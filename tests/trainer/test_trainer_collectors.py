"""SWA's average is the mean of the collected weights; SWAG's samples have the stored mean and
variance; BatchNorm statistics are recomputed as torch.optim.swa_utils does."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import update_bn as torch_update_bn

from snapserve.trainer.collectors import AveragingCollector, StepCollector, update_bn
from snapserve.trainer.loop import TensorBatches


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def randomize(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5 + 1.0)


def inputs(batches: int = 5, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 4, generator=g) * 3 + 2 for _ in range(batches)]


def test_swa_average_is_the_mean_of_the_collected_weights() -> None:
    model, g = small_model(), torch.Generator().manual_seed(0)
    collector = AveragingCollector([10, 20, 30, 40], lambda: inputs())
    averaged = AveragedModel(model)  # the PyTorch implementation, as a second opinion
    seen = []
    for step in collector.steps:
        randomize(model, g)
        seen.append({k: v.clone() for k, v in model.named_parameters()})
        assert collector.should_collect(step) and not collector.should_collect(step + 1)
        collector.collect(model, step)
        averaged.update_parameters(model)
    final = copy.deepcopy(model.state_dict())
    (member,) = collector.members(model)
    assert member.step == 40 and member.info == {"averaged_models": 4} and collector.collected == 4
    for name, _ in model.named_parameters():
        mean = torch.stack([s[name] for s in seen]).mean(0)
        torch.testing.assert_close(member.state_dict[name], mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(member.state_dict[name], dict(averaged.module.named_parameters())[name],
                                   rtol=0, atol=1e-6)
    # the template gets its own weights back
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def stale(model: nn.Module) -> nn.Module:
    """Running statistics that belong to no weights: what must not survive a BatchNorm pass."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.fill_(123.0)
    return model


def test_members_recompute_batchnorm_statistics_like_swa_utils() -> None:
    model = stale(small_model())  # the template's own statistics are stale
    collector = AveragingCollector([1], lambda: inputs())
    collector.collect(model, 1)
    (member,) = collector.members(model)
    reference = stale(copy.deepcopy(model))
    reference.load_state_dict(member.state_dict)
    reference.train()
    torch_update_bn(inputs(), reference)
    bn = dict(reference.named_buffers())
    # recomputed, not the template's 123s (a member that kept them would fail here)
    assert not torch.isclose(member.state_dict["1.running_var"], torch.tensor(123.0)).any()
    torch.testing.assert_close(member.state_dict["1.running_mean"], bn["1.running_mean"])
    torch.testing.assert_close(member.state_dict["1.running_var"], bn["1.running_var"])
    # a cumulative mean over batches: the mean of the per-batch means of BatchNorm's input
    with torch.no_grad():
        first = [model[0](x) for x in inputs()]
    torch.testing.assert_close(bn["1.running_mean"], torch.stack([h.mean(0) for h in first]).mean(0),
                               rtol=1e-5, atol=1e-6)
    assert model[1].momentum == 0.1 and model.training  # momenta and mode restored
    assert (model[1].running_mean == 123.0).all()  # and the template's own statistics


def test_batchnorm_pass_reads_class_sorted_data_in_a_seeded_permutation() -> None:
    """With momentum=None each batch's own variance is averaged: batches of one class each (a
    class-sorted .npz or image folder) would give running variances far below the data's."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8).repeat_interleave(64)  # 8 classes of 64, stored sorted by class
    x = (y[:, None].float() * 2.0 + torch.randn(len(y), 4, generator=g)).contiguous()
    model = nn.Sequential(nn.BatchNorm1d(4))
    batches = TensorBatches(x, y, batch_size=64, seed=3)
    assert update_bn(model, batches.inputs()) == 8
    population = x.var(0, unbiased=True)  # ~ 1 + the variance of the class means (21)
    torch.testing.assert_close(model[0].running_mean, x.mean(0), rtol=0, atol=1e-5)  # equal batches
    ratio = model[0].running_var / population
    assert ratio.min() > 0.9 and ratio.max() < 1.1, ratio
    # stored order: each batch is one class, its variance ~1 of ~22: the failure fixed here
    update_bn(model, list(x.split(64)))
    assert (model[0].running_var / population).max() < 0.1
    # fixed by the seed: a resumed run recomputes the same statistics; another seed, another order
    assert all(torch.equal(a, b) for a, b in zip(batches.inputs(), batches.inputs()))
    other = TensorBatches(x, y, batch_size=64, seed=4)
    assert not torch.equal(next(batches.inputs()), next(other.inputs()))


def test_swag_variance_keeps_its_precision_where_e_w2_minus_e_w_squared_cannot() -> None:
    """Late in training weights ~1 move by ~1e-4: a variance of ~1e-8, below float32's
    resolution of E[w^2] and E[w]^2 (~1e-7), so their difference is rounding noise."""
    model = nn.Sequential(nn.Linear(50, 20))
    g = torch.Generator().manual_seed(0)
    collector = AveragingCollector(range(1, 41), None, swag_rank=0)
    seen = []
    for step in range(1, 41):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(1.0 + 1e-4 * torch.randn(p.shape, generator=g))
        seen.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        collector.collect(model, step)
    exact = torch.stack(seen).double().var(0, unbiased=False)
    torch.testing.assert_close(collector.variance().double(), exact, rtol=5e-3, atol=0)  # float32 Welford
    naive = (torch.stack(seen) ** 2).mean(0) - torch.stack(seen).mean(0) ** 2  # float32, as before
    assert ((naive.double() - exact).abs() / exact).max() > 0.5  # what the old formula gave


def test_update_bn_without_batchnorm_is_a_no_op() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    assert update_bn(model, inputs()) == 0


def test_swag_samples_have_the_stored_mean_and_variance() -> None:
    model, g = small_model(), torch.Generator().manual_seed(0)
    K, scale = 20, 0.5
    collector = AveragingCollector(range(1, 31), None, swag_rank=K, samples=3, scale=scale, seed=0)
    weights = []
    for step in range(1, 31):
        randomize(model, g)
        collector.collect(model, step)
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    w = torch.stack(weights).double()
    torch.testing.assert_close(collector.mean.double(), w.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(collector.variance().double(), w.var(0, unbiased=False), rtol=1e-3, atol=1e-5)
    assert len(collector.deviations) == K  # the last K columns: w_i minus the mean after adding w_i
    torch.testing.assert_close(collector.deviations[-1].double(), w[-1] - w.mean(0), rtol=0, atol=1e-5)

    draws = 4000
    gen = torch.Generator().manual_seed(1)
    samples = torch.stack([collector.sample_parameters(gen) for _ in range(draws)]).double()
    D = torch.stack(collector.deviations).double()
    expected_var = scale * (collector.variance().double() + (D**2).sum(0) / (K - 1))
    standard_error = (expected_var / draws).sqrt()
    assert ((samples.mean(0) - collector.mean.double()).abs() < 5 * standard_error).all()
    ratio = samples.var(0) / expected_var  # sample variance of 4000 normals: within ~10%
    assert ratio.min() > 0.85 and ratio.max() < 1.15
    # the low-rank part correlates coordinates as D^T D / (K-1) says
    expected_cov = scale * (torch.diag(collector.variance().double()) + D.T @ D / (K - 1))
    centred = samples - samples.mean(0)
    torch.testing.assert_close(centred.T @ centred / (draws - 1), expected_cov, rtol=0,
                               atol=float(6 * expected_var.max() / draws**0.5))


def test_swag_members_are_seeded_draws_each_with_its_own_batchnorm_pass() -> None:
    model = small_model()

    def run() -> list:
        collector = AveragingCollector([1, 2, 3], lambda: inputs(), swag_rank=20, samples=3, seed=7)
        gen = torch.Generator().manual_seed(0)
        for step in (1, 2, 3):
            randomize(model, gen)
            collector.collect(model, step)
        return collector.members(model)

    first, second = run(), run()
    assert [m.info for m in first] == [{"averaged_models": 3, "sample": i} for i in range(3)]
    for a, b in zip(first, second):
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert not torch.equal(first[0].state_dict["0.weight"], first[1].state_dict["0.weight"])
    # each sample's BatchNorm statistics belong to that sample's weights
    assert not torch.equal(first[0].state_dict["1.running_mean"], first[1].state_dict["1.running_mean"])


def test_collectors_resume_from_their_state_dicts() -> None:
    model, g = small_model(), torch.Generator().manual_seed(0)
    whole = AveragingCollector([1, 2, 3, 4], None, swag_rank=2)
    first = AveragingCollector([1, 2, 3, 4], None, swag_rank=2)
    snapshots = []
    for step in (1, 2, 3, 4):
        randomize(model, g)
        snapshots.append(copy.deepcopy(model))
        whole.collect(model, step)
    for step in (1, 2):
        first.collect(snapshots[step - 1], step)
    resumed = AveragingCollector([1, 2, 3, 4], None, swag_rank=2)
    resumed.load_state_dict(first.state_dict())
    for step in (3, 4):
        resumed.collect(snapshots[step - 1], step)
    assert torch.equal(resumed.mean, whole.mean) and torch.equal(resumed.sq_dev, whole.sq_dev)
    assert all(torch.equal(a, b) for a, b in zip(resumed.deviations, whole.deviations))

    steps = StepCollector([2, 4])
    steps.collect(model, 2)
    again = StepCollector([])
    again.load_state_dict(steps.state_dict())
    assert again.steps == (2, 4) and again.collected == 1 and again.members()[0].step == 2
