"""--loss_type l2|l1|huber|smooth_l1 and the Huber schedules; --ip_noise_gamma_random_strength; immiscible noise."""
from __future__ import annotations

import itertools

import pytest
import torch

from library import noise
from library.immiscible import assign_noise, assignment
from library.loss_functions import LossSettings, elementwise_loss, huber_threshold

SCHED = noise.make_noise_scheduler()


def _pair(seed=0, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_l2_and_l1_are_the_plain_losses():
    pred, target = _pair()
    t = torch.tensor([10, 500, 990])
    torch.testing.assert_close(elementwise_loss(pred, target, t, SCHED, LossSettings("l2")), (pred - target) ** 2)
    torch.testing.assert_close(elementwise_loss(pred, target, t, SCHED, LossSettings("l1")), (pred - target).abs())


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_with_huge_c_equals_l2_and_smooth_l1_with_tiny_c_equals_twice_l1(schedule):
    pred, target = _pair(1)
    t = torch.tensor([0, 400, 999])
    huge = LossSettings("huber", "constant", 1e6, 1.0)  # the exponential / snr thresholds are <= 1
    torch.testing.assert_close(elementwise_loss(pred, target, t, SCHED, huge), (pred - target) ** 2,
                               rtol=1e-5, atol=1e-6)
    tiny = LossSettings("smooth_l1", "constant", 1e-6, 1.0)
    torch.testing.assert_close(elementwise_loss(pred, target, t, SCHED, tiny), 2 * (pred - target).abs(),
                               rtol=1e-4, atol=1e-5)
    # the stable form equals the textbook formula 2c(sqrt(d^2+c^2)-c) where that one is accurate
    s = LossSettings("huber", schedule, 0.1, 1.0)
    c = huber_threshold(t, SCHED, s).view(-1, 1, 1, 1).double()
    d = (pred - target).double()
    textbook = 2 * c * (torch.sqrt(d**2 + c**2) - c)
    torch.testing.assert_close(elementwise_loss(pred, target, t, SCHED, s).double(), textbook, rtol=1e-5, atol=1e-7)


def test_huber_schedules_give_the_documented_thresholds_and_are_finite_at_every_timestep():
    t = torch.tensor([0, 999])
    assert huber_threshold(t, SCHED, LossSettings("huber", "constant", 0.1, 2.0)).tolist() == pytest.approx([0.2, 0.2])
    exp = huber_threshold(torch.tensor([0, 500, 1000]), SCHED, LossSettings("huber", "exponential", 0.1, 2.0))
    assert exp.tolist() == pytest.approx([2.0, 2.0 * 0.1 ** 0.5, 0.2], rel=1e-5)
    ztsnr = noise.make_noise_scheduler(zero_terminal_snr=True)  # alphas_cumprod reaches 0 at t = 999
    all_t = torch.arange(1000)
    for sched in (SCHED, ztsnr):
        c = huber_threshold(all_t, sched, LossSettings("huber", "snr", 0.1, 1.0))
        abar0 = float(sched.alphas_cumprod[0])
        sigma0 = ((1 - abar0) / abar0) ** 0.5
        assert float(c[0]) == pytest.approx(0.9 / (1 + sigma0) ** 2 + 0.1, rel=1e-5)
        assert torch.isfinite(c).all() and abs(float(c[-1]) - 0.1) < 0.01  # pure noise: c
        pred, target = _pair(2, (1000, 1, 2, 2))
        for kind in ("huber", "smooth_l1"):
            loss = elementwise_loss(pred, target, all_t, sched, LossSettings(kind, "snr", 0.1, 1.0))
            assert torch.isfinite(loss).all() and (loss >= 0).all()


def test_ip_noise_gamma_random_strength_draws_the_strength_from_the_noise_generator():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    settings = noise.NoiseSettings(ip_noise_gamma=0.5, ip_noise_gamma_random_strength=True)
    eps, noisy, t = noise.sample_noise_and_timesteps(latents, SCHED, settings, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws by hand: noise, timesteps, strength, perturbation
    eps_ref = torch.randn(latents.shape, generator=g)
    t_ref = torch.randint(0, 1000, (2,), generator=g)
    gamma = float(torch.rand((), generator=g)) * 0.5
    expected = SCHED.add_noise(latents, eps_ref + gamma * torch.randn(latents.shape, generator=g), t_ref)
    assert 0 < gamma < 0.5
    torch.testing.assert_close(eps, eps_ref)
    torch.testing.assert_close(noisy, expected)


def test_immiscible_assignment_is_the_minimum_total_distance_and_k_equal_b_permutes():
    g = torch.Generator().manual_seed(5)
    latents, candidates = torch.randn(5, 4, 4, 4, generator=g), torch.randn(7, 4, 4, 4, generator=g)
    order = assignment(latents, candidates)
    dist = torch.cdist(latents.flatten(1).double(), candidates.flatten(1).double())
    best = min(sum(float(dist[i, p[i]]) for i in range(5)) for p in itertools.permutations(range(7), 5))
    assert len(set(order.tolist())) == 5
    assert sum(float(dist[i, order[i]]) for i in range(5)) == pytest.approx(best)
    eps = candidates[:5]
    same = assign_noise(latents, eps, 5)  # K = B: a permutation of the batch's own noise, nothing drawn
    assert sorted(same.flatten().tolist()) == sorted(eps.flatten().tolist())
    assert (same - latents).flatten(1).norm(dim=1).sum() <= (eps - latents).flatten(1).norm(dim=1).sum() + 1e-6
    settings = noise.NoiseSettings(immiscible_noise=8)
    a = noise.sample_noise_and_timesteps(latents, SCHED, settings, torch.Generator().manual_seed(1))
    b = noise.sample_noise_and_timesteps(latents, SCHED, settings, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a[0], b[0])  # seeded: reproducible


def test_immiscible_with_per_sample_generators_assigns_across_the_batch():
    """The trainer's path (one generator per sample, library.distributed): the samples' first draws plus the
    extra candidates are assigned across the batch at minimal total distance, then each sample goes on alone."""
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(3, 4, 4, 4, generator=g) * 3

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(3)]

    plain = noise.sample_noise_and_timesteps(latents, SCHED, noise.NoiseSettings(), gens())
    mixed = noise.sample_noise_and_timesteps(latents, SCHED, noise.NoiseSettings(immiscible_noise=6), gens())
    own = torch.cat([torch.randn((1, 4, 4, 4), generator=gen) for gen in gens()])
    extra_gen = gens()[0]
    torch.randn((1, 4, 4, 4), generator=extra_gen)
    candidates = torch.cat([own, torch.randn((3, 4, 4, 4), generator=extra_gen)])
    expected = candidates[assignment(latents, candidates)]
    torch.testing.assert_close(mixed[0], expected)
    total = lambda n: float((n - latents).flatten(1).norm(dim=1).sum())  # noqa: E731
    assert total(mixed[0]) < total(plain[0])
    # timesteps: each sample's own stream, unchanged by the assignment (the first also drew the extra candidates)
    assert torch.equal(mixed[2][1:], plain[2][1:])


def test_training_with_huber_of_huge_c_follows_l2_and_smooth_l1_differs(tmp_path):
    from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train

    model, data = tiny_model_dir(), solid_dataset(tmp_path / "data", colours=((200, 40, 40), (40, 40, 200)))
    common = ("--max_train_steps", "3", "--network_train_unet_only", "--learning_rate", "1e-2")
    l2 = train(base_args(model, data, tmp_path / "l2", *common))
    huge = train(base_args(model, data, tmp_path / "huber", *common, "--loss_type", "huber", "--huber_schedule",
                           "constant", "--huber_c", "1e6"))
    assert huge.step_losses == pytest.approx(l2.step_losses, rel=1e-4)  # the whole trajectory, not one loss
    smooth = train(base_args(model, data, tmp_path / "smooth", *common, "--loss_type", "smooth_l1"))
    assert smooth.step_losses[0] != pytest.approx(l2.step_losses[0], rel=1e-2)
    from library.file_io import read_metadata

    meta = read_metadata(tmp_path / "smooth" / "lora.safetensors")
    assert meta["ss_loss_type"] == "smooth_l1" and meta["ss_huber_schedule"] == "snr" and meta["ss_huber_c"] == "0.1"


@pytest.mark.parametrize("extra, message", [
    (("--loss_type", "huber", "--huber_c", "0"), "--huber_c 0.0: expected a positive number"),
    (("--huber_schedule", "exponential", "--huber_c", "2"), "c must be in \\(0, 1\\]"),
    (("--immiscible_noise", "0"), "--immiscible_noise 0: expected a number of candidate noises >= 1"),
])
def test_bad_options_are_refused_before_loading(tmp_path, extra, message):
    from library import train_args
    from tests.train_helpers import base_args, parse, solid_dataset, tiny_model_dir

    args = parse(base_args(tiny_model_dir(), solid_dataset(tmp_path), tmp_path / "out", *extra))
    with pytest.raises(ValueError, match=message):
        train_args.validate_args(args)
