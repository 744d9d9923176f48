"""Augmentations and multi-crop, checked against torch.flip/rot90, F.interpolate, scipy.ndimage
and hand-worked numbers; determinism under a torch.Generator; config switches really switch."""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

import celldino.augment as A
from celldino.config import AugmentConfig, load_config

# every random operation off and the crop box = the whole image
ALL_OFF = AugmentConfig(
    random_resized_crop=False,
    hflip_p=0.0,
    vflip_p=0.0,
    rot90=False,
    affine_p=0.0,
    elastic_p=0.0,
    brightness_p=0.0,
    contrast_p=0.0,
    channel_drop_p=0.0,
    protein_channel=-1,
    blur_p=0.0,
    solarize_p=0.0,
    greyscale_p=0.0,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 4, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand((b, c, h, w), generator=gen(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# flips and 90° rotations: exact, per sample
# --------------------------------------------------------------------------------------------


def test_flip_matches_torch_flip_per_sample():
    x = images(4)
    hor = torch.tensor([True, False, True, False])
    ver = torch.tensor([False, False, True, True])
    y = A.flip(x, hor, ver)
    for i in range(4):
        ref = x[i]
        if hor[i]:
            ref = torch.flip(ref, dims=(-1,))
        if ver[i]:
            ref = torch.flip(ref, dims=(-2,))
        assert torch.equal(y[i], ref)


def test_rot90_matches_torch_rot90_per_sample():
    x = images(5)
    k = torch.tensor([0, 1, 2, 3, 5])
    y = A.rot90(x, k)
    for i in range(5):
        assert torch.equal(y[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)))
    with pytest.raises(ValueError, match="square"):
        A.rot90(images(2, h=8, w=6), torch.tensor([1, 0]))


def test_pipeline_flip_rotation_only_is_a_dihedral_copy():
    cfg = dataclasses.replace(ALL_OFF, hflip_p=0.5, vflip_p=0.5, rot90=True)
    x = images(32)
    y = A.CellAugment(cfg)(x, size=16, generator=gen(1))
    for i in range(32):
        variants = []
        for f in (x[i], torch.flip(x[i], dims=(-1,))):
            variants += [torch.rot90(f, k, dims=(-2, -1)) for k in range(4)]
        assert any(torch.equal(y[i], v) for v in variants)
    assert not torch.equal(y, x)  # something was flipped or turned


# --------------------------------------------------------------------------------------------
# random resized crop
# --------------------------------------------------------------------------------------------


def test_crop_box_matches_manual_crop_and_interpolate():
    x = images(3, c=2, h=40, w=48)
    boxes = torch.tensor([[0, 0, 40, 48], [5, 7, 20, 30], [13, 2, 26, 26]])
    size = 16  # every box is larger than the output: exact everywhere
    y = A.warp(x, A.boxes_to_theta(boxes, 40, 48), size, padding_mode="zeros")
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        crop = x[i : i + 1, :, t : t + h, l : l + w]
        ref = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        torch.testing.assert_close(y[i : i + 1], ref, rtol=0, atol=1e-12)


def test_upsampled_crop_matches_interpolate_inside_the_box():
    # upsampling: F.interpolate clamps at the crop edge, we read the neighbouring real pixels;
    # away from the border of the output both sample the same points
    x = images(1, c=1, h=32, w=32)
    box = torch.tensor([[6, 9, 10, 10]])
    y = A.warp(x, A.boxes_to_theta(box, 32, 32), 40)
    ref = F.interpolate(x[:, :, 6:16, 9:19], size=(40, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(y[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], rtol=0, atol=1e-12)


def test_crop_boxes_respect_scale_ratio_and_bounds():
    h, w, n = 64, 80, 4000
    scale, ratio = (0.1, 0.6), (0.75, 4 / 3)
    b = A.sample_crop_boxes(n, h, w, scale=scale, ratio=ratio, generator=gen(3))
    top, left, bh, bw = b.T.double()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()
    frac = bh * bw / (h * w)
    # rounding each side to whole pixels moves the area by at most about one row and column
    slack = (bh + bw + 1) / (h * w)
    assert (frac >= scale[0] - slack).all() and (frac <= scale[1] + slack).all()
    r = bw / bh
    assert (r >= ratio[0] * (1 - 1 / bh) - 1e-9).all() and (r <= ratio[1] * (1 + 1 / bh)).all()
    # area fraction is uniform on `scale`: mean (0.35) and positions cover the whole image
    assert abs(frac.mean().item() - 0.35) < 0.01
    assert top.min() == 0 and (top + bh).max() == h and left.min() == 0


def test_crop_boxes_fall_back_to_a_central_crop():
    # a 10 x 100 strip cannot hold a square box of >= 90% of its area: torchvision's fallback
    b = A.sample_crop_boxes(3, 10, 100, scale=(0.9, 1.0), ratio=(1.0, 1.0), generator=gen())
    assert b.tolist() == [[0, 45, 10, 10]] * 3


# --------------------------------------------------------------------------------------------
# affine and elastic warps
# --------------------------------------------------------------------------------------------


def _affine(deg=0.0, zoom=1.0, shear=0.0, shift=(0.0, 0.0)):
    m = A.affine_matrices(
        torch.tensor([deg]), torch.tensor([zoom]), torch.tensor([shear]), torch.tensor([shift])
    )
    return m[:, :2].double()


def test_affine_quarter_turn_is_rot90():
    x = images(1, c=2, h=12, w=12)
    y = A.warp(x, _affine(deg=90.0), 12)
    torch.testing.assert_close(y, torch.rot90(x, 1, dims=(-2, -1)), rtol=0, atol=1e-10)


def test_affine_rotation_matches_scipy_rotate():
    img = ndi.gaussian_filter(np.random.default_rng(0).random((41, 41)), 2.0)
    y = A.warp(torch.from_numpy(img)[None, None], _affine(deg=30.0), 41)[0, 0].numpy()
    ref = ndi.rotate(img, 30.0, reshape=False, order=1, mode="nearest")
    inner = (slice(8, -8), slice(8, -8))  # corners differ only by the padding rule
    np.testing.assert_allclose(y[inner], ref[inner], atol=1e-6)


def test_affine_zoom_and_shift_match_scipy_affine_transform():
    img = ndi.gaussian_filter(np.random.default_rng(1).random((32, 32)), 1.5)
    y = A.warp(torch.from_numpy(img)[None, None], _affine(zoom=1.25, shift=(0.125, 0.0)), 32)
    # content enlarged 1.25x about the centre (15.5, 15.5) then moved 0.125 * 32 = 4 px right:
    # output (r, c) reads input (c0 + (r - c0) / 1.25, c0 + (c - 4 - c0) / 1.25)
    c0 = 15.5
    ref = ndi.affine_transform(
        img, np.diag([0.8, 0.8]), offset=[c0 - 0.8 * c0, c0 - 0.8 * (c0 + 4)], order=1
    )
    inner = (slice(4, -4), slice(8, -4))
    np.testing.assert_allclose(y[0, 0].numpy()[inner], ref[inner], atol=1e-6)


def test_displacement_of_two_pixels_shifts_the_image():
    x = images(2, c=1, h=20, w=20)
    d = torch.zeros(2, 20, 20, 2, dtype=torch.float64)
    d[..., 0] = 2 * 2 / 20  # two pixels along x, in normalised units
    ident = _affine().expand(2, 2, 3)
    y = A.warp(x, ident, 20, displacement=d)
    torch.testing.assert_close(y[..., :-2], x[..., 2:], rtol=0, atol=1e-10)


def test_elastic_field_is_smooth_and_scales_with_alpha():
    d1 = A.elastic_displacement(3, 32, alpha=0.05, grid=4, generator=gen(2))
    d2 = A.elastic_displacement(3, 32, alpha=0.10, grid=4, generator=gen(2))
    torch.testing.assert_close(d2, 2 * d1)
    assert d1.shape == (3, 32, 32, 2)
    # neighbouring pixels move together: white noise would have mean |step| ~ 1.13 std
    step = (d1[:, 1:] - d1[:, :-1]).abs().mean()
    assert step < 0.2 * d1.std()


# --------------------------------------------------------------------------------------------
# intensity operations: hand-worked numbers
# --------------------------------------------------------------------------------------------

SMALL = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [2.0, 6.0]]]])  # (1, 2, 2, 2)


def test_brightness_is_a_per_channel_gain():
    y = A.adjust_brightness(SMALL, torch.tensor([[1.5, 0.5]]))
    assert y.tolist() == [[[[1.5, 3.0], [4.5, 6.0]], [[0.0, 0.0], [1.0, 3.0]]]]


def test_contrast_scales_around_the_channel_mean():
    # channel 0: mean 2.5, factor 0.5 → 2.5 + 0.5 (x - 2.5); channel 1: mean 2, factor 2
    y = A.adjust_contrast(SMALL, torch.tensor([[0.5, 2.0]]))
    assert y.tolist() == [[[[1.75, 2.25], [2.75, 3.25]], [[-2.0, -2.0], [2.0, 10.0]]]]


def test_rescale_channel_touches_only_that_channel():
    y = A.rescale_channel(SMALL.repeat(2, 1, 1, 1), 1, torch.tensor([3.0, 0.0]))
    assert torch.equal(y[:, 0], SMALL.repeat(2, 1, 1, 1)[:, 0])
    assert y[0, 1].tolist() == [[0.0, 0.0], [6.0, 18.0]] and y[1, 1].abs().sum() == 0
    with pytest.raises(ValueError, match="protein_channel=5 but the images have 2 channels"):
        A.rescale_channel(SMALL, 5, torch.tensor([1.0]))


def test_solarize_and_greyscale():
    x = torch.tensor([[[[0.2, 0.7]], [[0.6, 0.1]]]])
    assert torch.allclose(A.solarize(x, 0.5), torch.tensor([[[[0.2, 0.3]], [[0.4, 0.1]]]]))
    assert torch.allclose(A.greyscale(x), torch.tensor([[[[0.4, 0.4]], [[0.4, 0.4]]]]))


def test_gaussian_blur_matches_scipy_per_sample():
    x = images(2, c=2, h=24, w=20)
    sigma = torch.tensor([1.0, 1.0])
    y = A.gaussian_blur(x, sigma)
    for i in range(2):
        for c in range(2):
            ref = ndi.gaussian_filter(x[i, c].numpy(), 1.0, mode="mirror", truncate=3.0)
            np.testing.assert_allclose(y[i, c].numpy(), ref, atol=1e-12)
    # a second sample with another sigma gets its own kernel (narrow sigma inside a wider radius)
    y2 = A.gaussian_blur(x, torch.tensor([1.0, 0.5]))
    ref = ndi.gaussian_filter(x[1, 0].numpy(), 0.5, mode="mirror", truncate=6.0)  # radius 3
    np.testing.assert_allclose(y2[1, 0].numpy(), ref, atol=1e-12)


# --------------------------------------------------------------------------------------------
# channel dropping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "p"), [(2, 0.9), (5, 0.3), (1, 0.5)])
def test_channel_drop_never_drops_all_and_has_the_configured_rate(channels, p):
    n = 20000
    keep = A.sample_channel_keep(n, channels, p, gen(4))
    assert keep.any(dim=1).all()
    expected = p - p**channels / channels  # one channel is rescued when all were drawn
    rate = 1 - keep.double().mean().item()
    sd = math.sqrt(expected * (1 - expected) / (n * channels))
    assert abs(rate - expected) < 5 * sd + 1e-12, (rate, expected)


def test_drop_channels_zeroes_exactly_the_dropped_ones():
    x = images(2, c=3)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    y = A.drop_channels(x, keep)
    assert torch.equal(y[0, 0], x[0, 0]) and torch.equal(y[1, 2], x[1, 2])
    assert y[0, 1].abs().sum() == 0 and y[1, :2].abs().sum() == 0


def test_pipeline_channel_drop_keeps_some_channel_in_every_crop():
    cfg = dataclasses.replace(ALL_OFF, channel_drop_p=0.95)
    x = images(64, c=3) + 1.0  # strictly positive so a dropped channel is recognisable
    y = A.CellAugment(cfg)(x, size=16, generator=gen(5))
    alive = y.abs().sum(dim=(-2, -1)) > 0  # (B, C)
    assert alive.any(dim=1).all() and (~alive).any()
    assert torch.equal(y[alive], x[alive])


# --------------------------------------------------------------------------------------------
# config switches, determinism, devices, multi-crop
# --------------------------------------------------------------------------------------------


def test_everything_off_returns_the_input():
    x = images(3, c=5, h=24, w=24).float()
    aug = A.CellAugment(ALL_OFF)
    assert torch.equal(aug(x, size=24, generator=gen()), x)
    ref = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
    assert torch.equal(aug(x, size=12, generator=gen()), ref)  # only resized
    crops = A.MultiCrop(dataclasses.replace(ALL_OFF, global_crop_size=24, n_local_crops=2))(
        x, generator=gen()
    )
    assert torch.equal(crops[0], x) and torch.equal(crops[1], x)


SWITCHES = {
    "random_resized_crop": {"random_resized_crop": True},
    "hflip": {"hflip_p": 1.0},
    "vflip": {"vflip_p": 1.0},
    "rot90": {"rot90": True},
    "affine": {"affine_p": 1.0},
    "elastic": {"elastic_p": 1.0, "elastic_alpha": 0.05},
    "brightness": {"brightness_p": 1.0},
    "contrast": {"contrast_p": 1.0},
    "channel_drop": {"channel_drop_p": 0.5},
    "protein": {"protein_channel": 1, "protein_rescale_p": 1.0},
    "blur": {"blur_p": 1.0},
    "solarize": {"solarize_p": 1.0},
    "greyscale": {"greyscale_p": 1.0},
}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_each_switch_turns_exactly_its_operation_on(name):
    x = images(8, c=3, h=24, w=24)
    cfg = dataclasses.replace(ALL_OFF, **SWITCHES[name])
    y = A.CellAugment(cfg)(x, size=24, scale=(0.3, 0.6), generator=gen(6))
    assert not torch.equal(y, x), f"{name} on changed nothing"
    if name == "hflip":
        assert torch.equal(y, x.flip(-1))
    if name == "vflip":
        assert torch.equal(y, x.flip(-2))


def test_same_generator_state_gives_the_same_crops():
    cfg = AugmentConfig(
        global_crop_size=32,
        local_crop_size=16,
        n_local_crops=3,
        affine_p=0.5,
        elastic_p=0.5,
        channel_drop_p=0.2,
        protein_channel=0,
        blur_p=0.3,
    )
    mc = A.MultiCrop(cfg)
    x = images(4, c=3, h=40, w=40).float()
    g = gen(7)
    first = mc(x, generator=g)
    state = g.get_state()  # a resumed run restores this
    second = mc(x, generator=g)
    g2 = torch.Generator()
    g2.set_state(state)
    again = mc(x, generator=g2)
    rerun = mc(x, generator=gen(7))
    assert all(torch.equal(a, b) for a, b in zip(first, rerun))
    assert all(torch.equal(a, b) for a, b in zip(second, again))
    assert not torch.equal(first[0], second[0])  # the stream moves on between batches
    assert not torch.equal(first[0], first[1])  # the two global views differ


def test_multicrop_shapes_and_ws_dino_local_source():
    cfg = dataclasses.replace(
        ALL_OFF, random_resized_crop=True, global_crop_size=20, local_crop_size=8, n_local_crops=4
    )
    mc = A.MultiCrop(cfg)
    glob = torch.zeros(3, 2, 32, 32)
    other = torch.ones(3, 2, 24, 24)  # another image with the same weak label (other size too)
    crops = mc(glob, generator=gen(), local_images=other)
    assert mc.n_crops == 6 and len(crops) == 6
    assert [tuple(c.shape) for c in crops] == [(3, 2, 20, 20)] * 2 + [(3, 2, 8, 8)] * 4
    assert all(c.abs().sum() == 0 for c in crops[:2])  # global crops from `images`
    assert all(torch.allclose(c, torch.ones_like(c)) for c in crops[2:])  # locals from the other
    with pytest.raises(ValueError, match="batch size and channels"):
        mc(glob, generator=gen(), local_images=torch.ones(2, 2, 24, 24))


def test_local_crops_cover_a_smaller_area_than_global_crops():
    # a ramp image: a crop's spread of values grows with the side of its box
    ramp = torch.linspace(0, 1, 64).expand(64, 64).reshape(1, 1, 64, 64).repeat(256, 1, 1, 1)
    cfg = dataclasses.replace(
        ALL_OFF, random_resized_crop=True, global_crop_size=16, local_crop_size=16, n_local_crops=1
    )
    g, _, loc = A.MultiCrop(cfg)(ramp, generator=gen(8))
    spread = lambda c: (c.amax(dim=(-2, -1)) - c.amin(dim=(-2, -1))).mean().item()  # noqa: E731
    # global boxes cover 0.4-1.0 of the area (side ~0.8), local 0.05-0.4 (side ~0.45)
    assert spread(g) > 1.5 * spread(loc)


def test_dtype_and_device_are_kept():
    x = images(2, c=2).float()
    cfg = AugmentConfig(global_crop_size=8, local_crop_size=4, n_local_crops=1, affine_p=1.0)
    crops = A.MultiCrop(cfg)(x, generator=gen())
    assert all(c.dtype == torch.float32 and c.device == x.device for c in crops)
    with pytest.raises(ValueError, match="float tensor"):
        A.CellAugment(cfg)(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), size=4)
    src = "".join(
        inspect.getsource(m) for m in (A.geometric, A.photometric, A.cell_augment, A.multicrop)
    )
    assert ".cuda(" not in src


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_crops_equal_cpu_crops():
    cfg = AugmentConfig(global_crop_size=32, local_crop_size=16, n_local_crops=2, affine_p=0.5)
    x = images(4, c=3, h=48, w=48).float()
    cpu = A.MultiCrop(cfg)(x, generator=gen(9))
    gpu = A.MultiCrop(cfg)(x.to("cuda"), generator=gen(9))  # CPU generator: same draws
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)


def test_config_errors_name_the_key_and_overrides_work():
    with pytest.raises(ValueError, match=r"augment.hflip_p=1.5"):
        A.CellAugment(AugmentConfig(hflip_p=1.5))
    with pytest.raises(ValueError, match=r"augment.local_crop_scale"):
        A.CellAugment(AugmentConfig(local_crop_scale=(0.5, 0.1)))
    with pytest.raises(ValueError, match="padding_mode"):
        A.CellAugment(AugmentConfig(padding_mode="wrap"))
    cfg = load_config(None, ["augment.n_local_crops=2", "augment.local_crop_scale=[0.1,0.3]"])
    assert cfg.augment.n_local_crops == 2 and cfg.augment.local_crop_scale == (0.1, 0.3)
    defaults = AugmentConfig()
    assert defaults.blur_p == defaults.solarize_p == defaults.greyscale_p == 0.0  # paper: off


def test_fused_intensity_pass_equals_the_operations_one_after_another():
    cfg = dataclasses.replace(
        ALL_OFF,
        protein_channel=1,
        protein_rescale_p=1.0,
        brightness_p=1.0,
        contrast_p=1.0,
        channel_drop_p=0.3,
    )
    x = images(6, c=3)
    y = A.CellAugment(cfg)(x, size=16, generator=gen(10))
    # replay the same draws, in the documented order, and apply the ops one after another
    g, b, c = gen(10), 6, 3
    A.geometric.bernoulli((b,), 1.0, g)
    pgain = A.geometric.uniform((b,), *cfg.protein_rescale, g)
    A.geometric.bernoulli((b,), 1.0, g)
    bgain = A.geometric.uniform((b, c), 1 - cfg.brightness, 1 + cfg.brightness, g)
    A.geometric.bernoulli((b,), 1.0, g)
    factor = A.geometric.uniform((b, c), 1 - cfg.contrast, 1 + cfg.contrast, g)
    keep = A.sample_channel_keep(b, c, cfg.channel_drop_p, g)
    ref = A.rescale_channel(x, 1, pgain)
    ref = A.adjust_contrast(A.adjust_brightness(ref, bgain), factor)
    ref = A.drop_channels(ref, keep)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert (~keep).any()


def test_flips_and_turns_folded_into_the_crop_grid_equal_torch_flip_rot90():
    # same seed: the crop boxes are drawn first, so both runs crop the same boxes
    crop = dataclasses.replace(ALL_OFF, random_resized_crop=True)
    both = dataclasses.replace(crop, hflip_p=0.5, vflip_p=0.5, rot90=True)
    x = images(24, c=2, h=32, w=32)
    plain = A.CellAugment(crop)(x, size=16, scale=(0.2, 0.8), generator=gen(11))
    turned = A.CellAugment(both)(x, size=16, scale=(0.2, 0.8), generator=gen(11))
    changed = 0
    for i in range(24):
        variants = []
        for f in (plain[i], torch.flip(plain[i], dims=(-1,))):
            variants += [torch.rot90(f, k, dims=(-2, -1)) for k in range(4)]
        dist = [(turned[i] - v).abs().max().item() for v in variants]
        assert min(dist) < 1e-9
        changed += int(dist[0] > 1e-9)
    assert changed > 12  # most of the 24 crops were flipped or turned
