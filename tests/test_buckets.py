"""Aspect-ratio bucketing against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from library.buckets import BucketManager, Crop, flipped_crop_top_left, make_bucket_resolutions, resize_and_crop


def test_sd_512_steps_64_bucket_list():
    # area 512*512 = 262144. Square: 512. For width w: height = min(1024, (262144 // w) // 64 * 64):
    # 256->1024, 320->768 (819), 384->640 (682), 448->576 (585), 512->512, 576->448 (455), 640->384 (409),
    # 704->320 (372), 768->320 (341), 832->256 (315), 896->256 (292), 960->256 (273), 1024->256.
    expected = {(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
                (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)}
    expected |= {(h, w) for w, h in expected}
    got = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert set(got) == expected
    assert len(got) == 17
    assert got == sorted(got)


def test_sdxl_1024_steps_32_buckets():
    # area 1048576; height for width w = (1048576 // w) // 32 * 32, capped at 2048
    got = set(make_bucket_resolutions((1024, 1024), 512, 2048, 32))
    for w, h in [(512, 2048), (576, 1792), (640, 1632), (704, 1472), (768, 1344), (832, 1248), (896, 1152),
                 (960, 1088), (1024, 1024)]:
        assert (w, h) in got and (h, w) in got
    assert all(w * h <= 1024 * 1024 and w % 32 == 0 and h % 32 == 0 for w, h in got)
    assert min(min(r) for r in got) == 512 and max(max(r) for r in got) == 2048


def test_min_bucket_reso_drops_narrow_buckets():
    got = make_bucket_resolutions((512, 512), 384, 1024, 64)
    assert (256, 1024) not in got and (320, 768) not in got and (384, 640) in got


def test_select_nearest_aspect_and_cover_size():
    m = BucketManager((512, 512), 256, 1024, 64)
    # 600x400 (1.5): 640/384 = 1.667 (err .167) beats 576/448 = 1.286 (err .214)
    c = m.select(600, 400)
    assert c.bucket_reso == (640, 384)
    # wider than 1.5? no: 1.5 < 1.667, so match widths: scale 640/600, height int(426.67 + .5) = 427
    assert c.resized_size == (640, 427)
    assert c.ar_error == pytest.approx(640 / 384 - 1.5)
    assert m.select(1000, 1000).bucket_reso == (512, 512)
    assert m.select(448, 576).resized_size == (448, 576)  # an exact bucket size is kept as is
    assert m.select(100, 1000).bucket_reso == (256, 1024)  # very tall: the tallest bucket


def test_no_upscale_buckets_follow_image():
    m = BucketManager((512, 512), 256, 1024, 64, no_upscale=True)
    c = m.select(300, 200)  # smaller than the area: no resize, bucket rounded down to steps
    assert (c.bucket_reso, c.resized_size) == ((256, 192), (300, 200))
    # 2000x1000, aspect 2: sqrt(262144*2) = 724.1 -> width rounding gives 704x320 (ar 2.2), height rounding
    # 362 -> 320, width 640 (ar 2.0): the height rounding wins, resized to 640x320
    c = m.select(2000, 1000)
    assert (c.bucket_reso, c.resized_size) == ((640, 320), (640, 320))


def test_fixed_resolution_without_buckets():
    m = BucketManager((512, 512), enabled=False)
    c = m.select(600, 400)
    assert c.bucket_reso == (512, 512) and c.resized_size == (768, 512)


def test_resize_and_crop_center_offsets():
    img = np.zeros((400, 600, 3), np.uint8)
    img[:, :, 0] = np.arange(600)[None, :] * 255 // 599  # a horizontal ramp
    out, crop = resize_and_crop(img, (512, 512))
    assert out.shape == (512, 512, 3)
    # resized to 768x512, crop left (768 - 512) // 2 = 128
    assert crop == Crop(original_size_hw=(400, 600), crop_top_left=(0, 128), resized_size=(768, 512))
    assert abs(int(out[0, 0, 0]) - 128 * 255 // 767) <= 2
    assert flipped_crop_top_left(crop, (512, 512)) == (0, 128)


def test_random_crop_offsets_in_range_and_flip_mirror():
    img = np.zeros((400, 600, 3), np.uint8)
    rng = np.random.default_rng(0)
    offsets = {resize_and_crop(img, (512, 512), random_crop=True, rng=rng)[1].crop_top_left for _ in range(30)}
    assert all(top == 0 and 0 <= left <= 256 for top, left in offsets) and len(offsets) > 5
    crop = Crop((400, 600), (0, 40), (768, 512))
    assert flipped_crop_top_left(crop, (512, 512)) == (0, 768 - 512 - 40)
