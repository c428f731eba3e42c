import re

import numpy as np
import pytest

from poison import TRIGGERS, ConfigError, make_trigger


def blank(n=3, side=8):
    return np.full((n, side, side, 3), 7, dtype=np.uint8)


def test_checkerboard_is_stamped_exactly_where_placed():
    trig = make_trigger({"kind": "patch", "size": 2, "pattern": "checkerboard"})
    out = trig.apply(blank(2), {"x": np.array([0, 5]), "y": np.array([1, 6])})
    expected = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    assert (out[0, 1:3, 0:2, 0] == expected).all() and (out[1, 6:8, 5:7, 2] == expected).all()
    untouched = np.ones((8, 8), bool)
    untouched[1:3, 0:2] = False
    assert (out[0][untouched] == 7).all()  # nothing else changed
    assert out.dtype == np.uint8 and out.shape == (2, 8, 8, 3)


def test_apply_leaves_its_input_alone():
    images = blank()
    make_trigger({"kind": "patch", "size": 3}).apply(images, {"x": np.zeros(3, int), "y": np.zeros(3, int)})
    assert (images == 7).all()


@pytest.mark.parametrize("location,xy", [("top-left", (0, 0)), ("bottom-right", (5, 5)),
                                         ("top-right", (5, 0)), ("center", (2, 2))])
def test_fixed_locations(location, xy):
    trig = make_trigger({"kind": "patch", "size": 3, "location": location})
    p = trig.placement(4, 8, np.random.default_rng(0))
    assert set(p["x"]) == {xy[0]} and set(p["y"]) == {xy[1]}


def test_random_location_is_seeded_and_inside_the_image():
    trig = make_trigger({"kind": "patch", "size": 0.25})  # a fraction: 8 px of 32
    assert trig.pixels(32) == 8
    a = trig.placement(500, 32, np.random.default_rng(1))
    b = trig.placement(500, 32, np.random.default_rng(1))
    assert (a["x"] == b["x"]).all() and (a["y"] == b["y"]).all()
    assert a["x"].min() == 0 and a["x"].max() == 24  # every position 0..32-8 reachable


def test_noise_pattern_is_fixed_by_its_seed_and_solid_uses_the_colour():
    noise = make_trigger({"kind": "patch", "size": 4, "pattern": "noise", "pattern_seed": 5})
    assert (noise.stamp(4) == noise.stamp(4)).all()
    other = make_trigger({"kind": "patch", "size": 4, "pattern": "noise", "pattern_seed": 6})
    assert not (noise.stamp(4) == other.stamp(4)).all()
    solid = make_trigger({"kind": "patch", "size": 2, "pattern": "solid", "colour": [1, 2, 3]})
    assert (solid.stamp(2) == np.array([1, 2, 3])).all()


def test_bad_triggers_are_rejected_naming_the_key():
    with pytest.raises(ConfigError, match=re.escape(f"attack.trigger.kind: unknown trigger 'star'; valid: {', '.join(TRIGGERS.names())}")):
        make_trigger({"kind": "star"})
    with pytest.raises(ConfigError, match="attack.trigger.pattern"):
        make_trigger({"kind": "patch", "pattern": "plaid"})
    with pytest.raises(ConfigError, match=r"attack.trigger.size: a 40px patch does not fit 32px"):
        make_trigger({"kind": "patch", "size": 40}).check(32)


@pytest.mark.parametrize("name", TRIGGERS.names())
def test_every_trigger_keeps_dtype_shape_and_range(name):
    trig = make_trigger({"kind": name})
    images = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    out = trig.apply(images, trig.placement(5, 16, np.random.default_rng(0)))
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert not (out == images).all()


def test_blended_mixes_with_alpha_by_hand():
    trig = make_trigger({"kind": "blended", "pattern": "checkerboard", "alpha": 0.25, "cell": 1})
    out = trig.apply(np.full((1, 4, 4, 3), 100, np.uint8), {})
    # cell (0,0) is 0 → 0.75*100 = 75; cell (0,1) is 255 → 75 + 63.75 = 138.75 → 139
    assert out[0, 0, 0, 0] == 75 and out[0, 0, 1, 0] == 139 and out[0, 1, 0, 0] == 139


def test_sig_adds_a_sine_along_the_width():
    trig = make_trigger({"kind": "sig", "amplitude": 10, "frequency": 1})
    out = trig.apply(np.full((2, 4, 4, 3), 100, np.uint8), {})
    # x = 0, 1, 2, 3 of 4: sin(0), sin(pi/2), sin(pi), sin(3pi/2) → +0, +10, +0, -10 on every row
    assert out[1, 3, :, 2].tolist() == [100, 110, 100, 90]
    with pytest.raises(ConfigError, match="attack.trigger.frequency: 20.0 periods alias on 32px images"):
        make_trigger({"kind": "sig", "frequency": 20}).check(32)


def test_wanet_is_a_small_fixed_warp():
    trig = make_trigger({"kind": "wanet", "grid_size": 4, "strength": 1.0, "pattern_seed": 3})
    flow = trig.field(32)
    assert np.abs(flow).max() == pytest.approx(1.0)  # largest shift is the strength
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))[None]  # value = 8 * x
    out = trig.apply(ramp, {})
    # on a horizontal ramp, a bilinear warp moves each pixel by its x displacement
    inner = (slice(2, 30), slice(2, 30))
    assert np.abs(out[0][inner][..., 0] - (ramp[0][inner][..., 0] + 8 * flow[inner][..., 1])).max() <= 1
    assert (trig.apply(ramp, {}) == out).all()  # same seed, same warp
    with pytest.raises(ConfigError, match="attack.trigger.grid_size: 40 exceeds the 32px image side"):
        make_trigger({"kind": "wanet", "grid_size": 40}).check(32)
