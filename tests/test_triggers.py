"""Triggers: exact pixel semantics, FTrojan against an explicit DCT, spec parsing, PSNR/SSIM."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.fft import dctn
from scipy.ndimage import gaussian_filter

from backdoorlab.errors import BadInput
from backdoorlab.metrics_image import (
    gaussian_window,
    image_quality,
    psnr_batch,
    psnr_mean,
    psnr_per_image,
    ssim_per_image,
)
from backdoorlab.triggers import (
    BlendTrigger,
    FTrojanTrigger,
    ImageTrigger,
    PatchTrigger,
    TriggerStack,
    make_trigger,
    parse_spec,
)
from backdoorlab.triggers.ftrojan import SPACES


def rand_images(n=6, h=32, w=32, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def smooth_images(n=8, h=32, w=32, seed=0):
    """Natural-ish images: blurred noise in a mid range (no saturation)."""
    z = np.random.default_rng(seed).normal(size=(n, h, w, 3))
    z = gaussian_filter(z, sigma=(0, 3, 3, 0))
    z = (z - z.mean()) / z.std()
    return np.clip(128 + 40 * z, 0, 255).round().astype(np.uint8)


# -- patch -------------------------------------------------------------------------------------

def test_default_patch_exact_pixels_and_rest_untouched():
    x = rand_images()
    before = x.copy()
    y = make_trigger("patch", (32, 32, 3)).apply(x)
    np.testing.assert_array_equal(x, before)  # input not modified
    assert y.dtype == np.uint8 and y.shape == x.shape
    mask = np.zeros((32, 32), bool)
    mask[27:31, 27:31] = True  # 4x4, margin 1 from the bottom-right corner
    assert np.all(y[:, mask] == 255)
    np.testing.assert_array_equal(y[:, ~mask], x[:, ~mask])


def test_patch_color_position_and_corners():
    x = rand_images()
    t = make_trigger("patch:size=3,color=255;0;0,pos=tl,margin=2", (32, 32, 3))
    y = t.apply(x)
    np.testing.assert_array_equal(y[:, 2:5, 2:5], np.broadcast_to([255, 0, 0], (6, 3, 3, 3)))
    y[:, 2:5, 2:5] = x[:, 2:5, 2:5]
    np.testing.assert_array_equal(y, x)
    # explicit x (column), y (row) of the top-left pixel
    y = make_trigger("patch:size=2,color=7,pos=5,9", (32, 32, 3)).apply(x)
    assert np.all(y[:, 9:11, 5:7] == 7) and not np.all(y[:, 5:7, 9:11] == 7)
    assert (y != x).any(axis=3).sum(axis=(1, 2)).max() <= 4
    for pos, (r, c) in {"tr": (1, 27), "bl": (27, 1), "br": (27, 27)}.items():
        y = make_trigger(f"patch:pos={pos},color=0", (32, 32, 3)).apply(x)
        assert np.all(y[:, r:r + 4, c:c + 4] == 0)


def test_checkerboard_pattern():
    x = np.full((2, 10, 10, 3), 100, np.uint8)
    y = make_trigger("patch:size=3,pattern=checker,pos=0,0,color=200", (10, 10, 3)).apply(x)
    expect = np.array([[200, 0, 200], [0, 200, 0], [200, 0, 200]])
    np.testing.assert_array_equal(y[0, :3, :3, 1], expect)
    assert np.all(y[:, 3:] == 100) and np.all(y[:, :, 3:] == 100)


def test_patch_grey_and_array_stamp():
    x = np.zeros((3, 8, 8, 1), np.uint8)
    y = make_trigger("patch:size=2", (8, 8, 1)).apply(x)
    assert y[:, 5:7, 5:7].min() == 255 and y.sum() == 3 * 4 * 255
    stamp = np.array([[1, 2], [3, 4]], np.uint8)
    y = PatchTrigger(array=stamp, pos=(1, 0)).apply(np.zeros((1, 4, 4, 3), np.uint8))
    np.testing.assert_array_equal(y[0, 0:2, 1:3, 2], stamp)
    with pytest.raises(BadInput, match="grey"):
        make_trigger("patch:color=255;0;0", (8, 8, 1))


# -- image with alpha --------------------------------------------------------------------------

def test_image_trigger_alpha_compositing(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, 0, 3] = 255  # opaque
    rgba[0, 1, 3] = 0  # transparent
    rgba[1, 0, 3] = 51  # 0.2
    rgba[1, 1, 3] = 102  # 0.4
    f = tmp_path / "t.png"
    Image.fromarray(rgba, "RGBA").save(f)
    x = np.full((2, 6, 6, 3), 100, np.uint8)
    t = make_trigger(f"image:{f},pos=3,1", (6, 6, 3))
    y = t.apply(x)
    # trigger occupies rows 1-2, columns 3-4
    assert np.all(y[:, 1, 3] == 200) and np.all(y[:, 1, 4] == 100)
    assert np.all(y[:, 2, 3] == 120) and np.all(y[:, 2, 4] == 140)  # 0.2*200+0.8*100, 0.4*...
    outside = np.ones((6, 6), bool)
    outside[1:3, 3:5] = False
    assert np.all(y[:, outside] == 100)
    # global alpha multiplies the PNG alpha: a = 0.5 * 1 at the opaque pixel -> 150
    y = make_trigger(f"image:{f},pos=3;1,alpha=0.5", (6, 6, 3)).apply(x)
    assert np.all(y[:, 1, 3] == 150) and np.all(y[:, 2, 3] == 110)
    # grey images: luminance of the colour (200 for a grey colour)
    yg = make_trigger(f"image:{f},pos=tl", (6, 6, 1)).apply(np.full((1, 6, 6, 1), 100, np.uint8))
    assert yg[0, 0, 0, 0] == 200 and yg[0, 1, 0, 0] == 120


def test_image_trigger_resize_and_fit(tmp_path):
    f = tmp_path / "rgb.png"
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(f)  # no alpha channel: opaque
    t = make_trigger(f"image:{f},scale=0.5", (8, 8, 3))
    assert isinstance(t, ImageTrigger) and t.rgba.shape == (2, 2, 4)
    y = t.apply(np.zeros((1, 8, 8, 3), np.uint8))
    assert np.all(y[0, 6:8, 6:8] == 9) and y[0, :6].sum() == 0  # default: bottom-right, margin 0
    with pytest.raises(BadInput, match="does not fit"):
        make_trigger(f"image:{f},scale=3", (8, 8, 3))
    with pytest.raises(BadInput, match="no such file"):
        make_trigger(f"image:{tmp_path / 'missing.png'}", (8, 8, 3))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(BadInput, match="not a readable image"):
        make_trigger(f"image:{bad}", (8, 8, 3))


# -- blend -------------------------------------------------------------------------------------

def test_blend_arithmetic_and_rounding():
    x = rand_images(4, 8, 8, 3, seed=1)
    p = rand_images(1, 8, 8, 3, seed=2)[0]
    y = BlendTrigger(p, alpha=0.25).apply(x)
    expect = np.rint(0.75 * x.astype(np.float64) + 0.25 * p)  # exact in binary: no rounding doubt
    np.testing.assert_array_equal(y, expect.astype(np.uint8))
    # half-way values round to even: 0.5*1 + 0.5*0 = 0.5 -> 0 ; 0.5*3 + 0 = 1.5 -> 2
    t = BlendTrigger(np.zeros((1, 2, 1), np.uint8), alpha=0.5)
    np.testing.assert_array_equal(t.apply(np.array([[[[1], [3]]]], np.uint8)).ravel(), [0, 2])


def test_blend_noise_seeded_and_picture(tmp_path):
    a = make_trigger("blend:alpha=0.1,seed=0", (8, 8, 3))
    b = make_trigger("blend:seed=0,alpha=0.1", (8, 8, 3))
    c = make_trigger("blend:alpha=0.1,seed=1", (8, 8, 3))
    np.testing.assert_array_equal(a.pattern, b.pattern)
    assert not np.array_equal(a.pattern, c.pattern)
    assert a.pattern.min() < 30 and a.pattern.max() > 225  # uniform over 0..255
    f = tmp_path / "kitty.png"
    Image.fromarray(np.full((20, 10, 3), 250, np.uint8)).save(f)
    t = make_trigger(f"blend:{f},alpha=0.2", (8, 8, 3))
    assert t.pattern.shape == (8, 8, 3) and np.all(t.pattern == 250)
    y = t.apply(np.full((1, 8, 8, 3), 100, np.uint8))
    assert np.all(y == 130)
    with pytest.raises(BadInput, match="pattern is 8x8x3"):
        t.apply(np.zeros((1, 9, 9, 3), np.uint8))


# -- FTrojan -----------------------------------------------------------------------------------

def _space_dct(trig: FTrojanTrigger, rgb: np.ndarray, n: int) -> np.ndarray:
    """Per-window orthonormal DCT of every colour-space channel (float64), (N, nh, nw, n, n, 3)."""
    m, off, _ = SPACES[trig.space]
    s = rgb.astype(np.float64) @ m.T + off
    N, H, W, _ = s.shape
    w = s[:, : H // n * n, : W // n * n].reshape(N, H // n, n, W // n, n, 3).transpose(0, 1, 3, 2, 4, 5)
    return dctn(w, axes=(3, 4), norm="ortho")


@pytest.mark.parametrize("route", ["perturb_float", "perturb_float_dct"])
@pytest.mark.parametrize("space", ["ycrcb", "yuv"])
def test_ftrojan_coefficient_moves_by_magnitude(route, space):
    x = rand_images(3, 32, 32, 3, seed=3)
    t = make_trigger(f"ftrojan:space={space}", (32, 32, 3))
    f = getattr(t, route)(x)  # unclipped float output
    delta = _space_dct(t, f, 32) - _space_dct(t, x, 32)
    expect = np.zeros_like(delta)
    for u, v in ((31, 31), (15, 15)):
        expect[:, :, :, u, v, 1:] = 20.0  # chroma channels 1 and 2
    np.testing.assert_allclose(delta, expect, atol=2e-3)


@pytest.mark.parametrize("route", ["perturb_float", "perturb_float_dct"])
def test_ftrojan_windows_remainder_and_presets(route):
    x = rand_images(2, 40, 40, 3, seed=4)
    t = make_trigger("ftrojan:window=16,pos=15;15|3;5,magnitude=7,channels=cb", (40, 40, 3))
    f = getattr(t, route)(x)
    delta = _space_dct(t, f, 16) - _space_dct(t, x, 16)  # 2x2 full windows
    expect = np.zeros_like(delta)
    expect[:, :, :, 15, 15, 2] = 7.0
    expect[:, :, :, 3, 5, 2] = 7.0
    np.testing.assert_allclose(delta, expect, atol=2e-3)
    assert np.abs(f[:, 32:] - x[:, 32:]).max() < 1e-3 and np.abs(f[:, :, 32:] - x[:, :, 32:]).max() < 1e-3
    g = make_trigger("ftrojan:preset=gtsrb", (32, 32, 3))
    assert g.positions == ((31, 31),) and g.magnitude == 50 and g.channels == (1, 2)
    assert make_trigger("ftrojan:preset=gtsrb,magnitude=30", (32, 32, 3)).magnitude == 30


def test_ftrojan_uint8_clipping_rounding_routes_and_determinism():
    x = rand_images(16, 32, 32, 3, seed=5)
    x[:4] = 255  # saturated images must clip
    x[4:6] = 0
    t = make_trigger("ftrojan:magnitude=60", (32, 32, 3))
    before = x.copy()
    y = t.apply(x)
    np.testing.assert_array_equal(x, before)
    f = t.perturb_float(x)
    assert f.dtype == np.float64 and f.min() < 0 and f.max() > 255  # unclipped
    np.testing.assert_array_equal(y, np.rint(np.clip(f, 0, 255)).astype(np.uint8))
    assert np.abs(y.astype(int) - t.apply_dct(x)).max() <= 1
    np.testing.assert_array_equal(y, make_trigger("ftrojan:magnitude=60", (32, 32, 3)).apply(x))
    assert (y[:4] < 255).any() and (y[4:6] > 0).any()  # the pattern goes both ways


def test_ftrojan_half_way_values_round_to_even():
    t = FTrojanTrigger(channels=(0,), positions=((0, 0),), magnitude=0.0, window=2)
    shape = (2, 2, 1)
    t._delta[shape] = np.array([[0.5, -0.5], [1.5, 0.25]])[:, :, None]  # exact ties
    x = np.array([[[1, 1], [1, 1]], [[2, 2], [2, 254]]], np.uint8)[..., None]
    y = t.apply(x)[..., 0]
    np.testing.assert_array_equal(y, [[[2, 0], [2, 1]], [[2, 2], [4, 254]]])  # rint(x + delta)


def test_ftrojan_invisible_on_natural_images():
    x = smooth_images()
    y = make_trigger("ftrojan", (32, 32, 3)).apply(x)
    assert (y != x).any()
    assert psnr_per_image(x, y).min() >= 35.0
    assert ssim_per_image(x, y).min() > 0.95


def test_ftrojan_grey_perturbs_the_single_channel():
    x = (smooth_images(3)[..., :1]).copy()
    t = make_trigger("ftrojan:pos=31;31,magnitude=10", (32, 32, 1))
    f = t.perturb_float(x).astype(np.float64)
    d = dctn(f[..., 0] - x[..., 0], axes=(1, 2), norm="ortho")
    expect = np.zeros_like(d)
    expect[:, 31, 31] = 10.0
    np.testing.assert_allclose(d, expect, atol=1e-3)
    assert np.abs(t.apply(x).astype(int) - t.apply_dct(x)).max() <= 1


# -- specs -------------------------------------------------------------------------------------

def test_parse_spec_and_to_dict_json():
    assert parse_spec("patch:size=3,pos=2,5") == ("patch", None, {"size": "3", "pos": "2,5"})
    assert parse_spec("blend:kitty.png,alpha=0.2") == ("blend", "kitty.png", {"alpha": "0.2"})
    assert parse_spec("ftrojan:pos=31;31|15;15") == ("ftrojan", None, {"pos": "31;31|15;15"})
    for spec in ["patch", "patch:pattern=checker", "blend", "ftrojan:space=yuv,channels=u;v"]:
        d = make_trigger(spec, (32, 32, 3)).to_dict()
        assert json.loads(json.dumps(d)) == d and d["kind"] == spec.split(":")[0]


@pytest.mark.parametrize("spec, msg", [
    ("", "empty"),
    ("laser", "unknown kind"),
    ("patch:colour=1", "unknown option"),
    ("patch:size=big", "whole number"),
    ("patch:size=3,size=4", "twice"),
    ("patch:size=40", "does not fit"),
    ("patch:pos=middle", "pos must be"),
    ("patch:color=300", "0-255"),
    ("patch:pattern=stripes", "square or checker"),
    ("blend:alpha=1.5", r"\[0, 1\]"),
    ("image", "name the picture"),
    ("ftrojan:window=64", "does not fit"),
    ("ftrojan:window=16", "outside a 16x16 window"),
    ("ftrojan:channels=u", "not one of y, cr, cb"),
    ("ftrojan:preset=imagenet", "preset must be"),
    ("ftrojan:space=hsv", "space must be"),
    ("ftrojan:pos=31", "2 whole numbers"),
    ("ftrojan:magnitude=nan", "magnitude"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(BadInput, match=msg):
        make_trigger(spec, (32, 32, 3))


def test_bad_batches_and_stack():
    t = make_trigger("patch", (32, 32, 3))
    with pytest.raises(BadInput, match="uint8"):
        t.apply(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(BadInput, match=r"\(N, H, W, C\)"):
        t.apply(np.zeros((32, 32, 3), np.uint8))
    assert t.preview(np.zeros((32, 32, 3), np.uint8))[28, 28, 0] == 255
    s = TriggerStack.from_specs(["patch:pos=tl", "patch:pos=br"], [1, 2], (32, 32, 3))
    assert s.targets == [1, 2] and len(s) == 2 and json.dumps(s.to_dict())
    with pytest.raises(BadInput, match="one target per trigger"):
        TriggerStack.from_specs(["patch"], [1, 2], (32, 32, 3))


# -- PSNR / SSIM -------------------------------------------------------------------------------

def test_psnr_known_values():
    a = np.full((2, 4, 4, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 1  # MSE 1 -> 10 log10(255^2) = 48.13 dB
    b[1, 0, 0, 0] = 116  # MSE 256/48 on image 1
    p = psnr_per_image(a, b)
    np.testing.assert_allclose(p, [20 * np.log10(255), 10 * np.log10(255**2 * 48 / 256)])
    assert psnr_mean(a, b) == pytest.approx(p.mean())
    assert psnr_batch(a, b) == pytest.approx(10 * np.log10(255**2 / ((1 + 256 / 48) / 2)))
    assert psnr_per_image(a, a)[0] == np.inf
    q = image_quality(a, np.concatenate([b[:1], a[1:]]))
    assert q.changed == 1 and q.psnr_mean == pytest.approx(p[0]) and q.ssim_mean is None


def test_ssim_constant_images_and_bruteforce():
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a = np.full((1, 12, 12, 1), 80, np.uint8)
    b = np.full((1, 12, 12, 1), 120, np.uint8)
    assert ssim_per_image(a, b)[0] == pytest.approx((2 * 80 * 120 + c1) / (80**2 + 120**2 + c1))
    x = rand_images(2, 13, 14, 3, seed=6)
    y = np.clip(x.astype(int) + rand_images(2, 13, 14, 3, seed=7) // 8 - 16, 0, 255).astype(np.uint8)
    g = np.outer(gaussian_window(), gaussian_window())
    vals = []
    for i in range(2):
        for r in range(13 - 10):
            for c in range(14 - 10):
                for ch in range(3):
                    px = x[i, r:r + 11, c:c + 11, ch].astype(float)
                    py = y[i, r:r + 11, c:c + 11, ch].astype(float)
                    mx, my = (g * px).sum(), (g * py).sum()
                    vx, vy = (g * (px - mx) ** 2).sum(), (g * (py - my) ** 2).sum()
                    cxy = (g * (px - mx) * (py - my)).sum()
                    vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    expect = np.array(vals).reshape(2, -1).mean(axis=1)
    np.testing.assert_allclose(ssim_per_image(x, y), expect, rtol=1e-9)
    assert ssim_per_image(x, x) == pytest.approx([1.0, 1.0])
    with pytest.raises(BadInput, match="smaller than"):
        ssim_per_image(x[:, :8, :8], y[:, :8, :8])
