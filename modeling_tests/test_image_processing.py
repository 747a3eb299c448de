"""Tests of UniF2aceImageProcessor: colour conversion, EXIF, geometry, scaling, postprocess, save/load, errors.

Expected values are worked out by hand (alpha compositing on white, 16-bit scaling, CLIP / ArcFace normalisation) or
by a naive reference (PIL resize of the whole image, then a numpy crop).
"""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from transformers_f2ace.configuration_unif2ace import UniF2aceConfig
from transformers_f2ace.image_processing_unif2ace import UniF2aceImageProcessor


CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def plain_processor(**kwargs) -> UniF2aceImageProcessor:
    """No resize, no crop, no extra views: pixel_values is the converted image itself, scaled to [-1, 1]."""
    defaults = dict(do_resize=False, do_center_crop=False, do_semantic_view=False, do_identity_view=False)
    return UniF2aceImageProcessor(**{**defaults, **kwargs})


def rgb255(pixel_values) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) float64 in [0, 255]."""
    return (np.asarray(pixel_values, dtype=np.float64).transpose(0, 2, 3, 1) + 1) * 127.5


def converted(image, **kwargs) -> np.ndarray:
    return rgb255(plain_processor(**kwargs)(image).pixel_values)[0]


# ----- colour conversion -----
@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("RGBA", (3, 2), (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent red → white
        (Image.new("RGBA", (3, 2), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("RGBA", (3, 2), (255, 0, 0, 128)), (255, 127, 127)),  # 255·(1 − 128/255) = 127
        (Image.new("LA", (3, 2), (100, 51)), (224, 224, 224)),  # 100·0.2 + 255·0.8
        (Image.new("La", (3, 2), (40, 51)), (244, 244, 244)),  # premultiplied: 40 + 255·0.8
        (Image.new("RGBa", (3, 2), (40, 20, 0, 51)), (244, 224, 204)),
        (Image.new("L", (3, 2), 77), (77, 77, 77)),
        (Image.new("1", (3, 2), 1), (255, 255, 255)),
        (Image.new("1", (3, 2), 0), (0, 0, 0)),
        (Image.new("I;16", (3, 2), 65535), (255, 255, 255)),
        (Image.new("I;16", (3, 2), 257), (1, 1, 1)),  # 257 · 255 / 65535 = 1
        (Image.new("I", (3, 2), 65535), (255, 255, 255)),
        (Image.new("I", (3, 2), 100000), (255, 255, 255)),  # clipped to the 16-bit range
        (Image.new("F", (3, 2), 0.5), (127.5, 127.5, 127.5)),
        (Image.new("CMYK", (3, 2), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("CMYK", (3, 2), (255, 0, 0, 0)), (0, 255, 255)),
        (Image.new("CMYK", (3, 2), (0, 0, 0, 100)), (155, 155, 155)),
        (Image.new("RGBX", (3, 2), (1, 2, 3, 0)), (1, 2, 3)),
    ],
    ids=lambda value: value.mode if isinstance(value, Image.Image) else str(value),
)
def test_pil_modes_convert_to_expected_rgb(image, expected):
    np.testing.assert_allclose(converted(image), np.broadcast_to(expected, (2, 3, 3)), atol=1e-3)


def test_16_bit_png_file_is_scaled_not_clipped():
    gray = np.array([[0, 32768, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    np.testing.assert_allclose(converted(buffer.getvalue())[0, :, 0], [0.0, 32768 * 255 / 65535, 255.0], atol=1e-3)


def test_palette_colours_and_transparency():
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([10, 200, 30, 250, 5, 99] + [0] * (256 * 3 - 6))
    palette_image.putpixel((1, 0), 1)
    np.testing.assert_allclose(converted(palette_image)[0], [[10, 200, 30], [250, 5, 99]], atol=1e-3)

    palette_image.info["transparency"] = 1  # palette index 1 is transparent → white
    np.testing.assert_allclose(converted(palette_image)[0], [[10, 200, 30], [255, 255, 255]], atol=1e-3)

    with_alpha = Image.new("PA", (1, 1))
    with_alpha.putpalette([10, 200, 30] + [0] * 765)
    with_alpha.putpixel((0, 0), (0, 0))
    np.testing.assert_allclose(converted(with_alpha)[0, 0], [255, 255, 255], atol=1e-3)


def test_numpy_and_torch_inputs_follow_their_dtype_conventions():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    expected = hwc.astype(np.float64)
    np.testing.assert_allclose(converted(hwc), expected, atol=1e-3)
    np.testing.assert_allclose(converted(np.ascontiguousarray(hwc.transpose(2, 0, 1))), expected, atol=1e-3)
    np.testing.assert_allclose(converted(torch.from_numpy(hwc.transpose(2, 0, 1)) / 255.0), expected, atol=1e-3)
    np.testing.assert_allclose(converted(hwc.astype(np.float32) / 255), expected, atol=1e-3)
    np.testing.assert_allclose(converted(hwc.astype(np.uint16) * 257), expected, atol=1e-3)  # 16-bit
    np.testing.assert_allclose(converted(hwc.astype(np.int64)), expected, atol=1e-3)  # ints within [0, 255]
    np.testing.assert_allclose(converted(np.ones((2, 2), dtype=bool)), np.full((2, 2, 3), 255.0), atol=1e-3)
    # ambiguous (3, H, 3): numpy is read channels-last, torch channels-first, unless input_data_format says otherwise
    cube = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    np.testing.assert_allclose(converted(cube), cube.astype(np.float64), atol=1e-3)
    np.testing.assert_allclose(converted(torch.from_numpy(cube)), cube.transpose(1, 2, 0).astype(np.float64), atol=1e-3)
    np.testing.assert_allclose(
        converted(cube, input_data_format="channels_first"), cube.transpose(1, 2, 0).astype(np.float64), atol=1e-3
    )


def test_array_alpha_channels_composite_on_white():
    gray_alpha = np.zeros((2, 2, 2), dtype=np.uint8)  # black, fully transparent
    np.testing.assert_allclose(converted(gray_alpha), np.full((2, 2, 3), 255.0), atol=1e-3)
    rgba = np.zeros((2, 2, 4), dtype=np.float32)
    rgba[..., 0], rgba[..., 3] = 1.0, 0.6  # red at 60 % → (255, 0.4·255, 0.4·255)
    np.testing.assert_allclose(converted(rgba)[0, 0], [255, 102, 102], atol=1e-3)


def test_batches_and_nested_lists_are_flattened():
    batch = np.zeros((4, 6, 6, 3), dtype=np.uint8)
    assert plain_processor()(batch).pixel_values.shape == (4, 3, 6, 6)
    nested = [[Image.new("RGB", (6, 6))], [Image.new("L", (6, 6)), np.zeros((6, 6), dtype=np.uint8)]]
    assert plain_processor()(nested, return_tensors="pt").pixel_values.shape == (3, 3, 6, 6)


# ----- EXIF orientation -----
def _exif_png(orientation: int) -> bytes:
    """An 8 (wide) x 4 (high) black PNG with one red pixel at the stored top-left, tagged with `orientation`."""
    image = Image.new("RGB", (8, 4))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "orientation, marker_row, marker_col",
    [(6, 0, 3), (8, 7, 0)],  # 6: rotate 90° clockwise → top-right; 8: 90° counter-clockwise → bottom-left
)
def test_exif_orientation_is_applied(orientation, marker_row, marker_col):
    image = converted(_exif_png(orientation))
    assert image.shape == (8, 4, 3)  # displayed portrait
    red = np.argwhere(image[..., 0] > 128)
    assert red.tolist() == [[marker_row, marker_col]]


def test_exif_orientation_can_be_ignored():
    image = converted(_exif_png(6), do_exif_transpose=False)
    assert image.shape == (4, 8, 3)
    assert np.argwhere(image[..., 0] > 128).tolist() == [[0, 0]]


# ----- geometry -----
def _three_bands(height: int, band_width: int) -> np.ndarray:
    """Red | green | blue vertical bands."""
    image = np.zeros((height, 3 * band_width, 3), dtype=np.uint8)
    for channel in range(3):
        image[:, channel * band_width : (channel + 1) * band_width, channel] = 255
    return image


@pytest.mark.parametrize("scale", [1, 2])
def test_resize_and_crop_keeps_the_centre(scale):
    processor = UniF2aceImageProcessor(size=30, crop_size=30, do_semantic_view=False, do_identity_view=False)
    wide = _three_bands(30 * scale, 30 * scale)  # (30s, 90s) → shortest side 30 → (30, 90) → middle 30 columns
    out = rgb255(processor(wide).pixel_values)[0]
    assert out.shape == (30, 30, 3)
    inner = out[:, 3:-3]  # away from the bicubic ringing at the band edges
    np.testing.assert_allclose(inner, np.broadcast_to([0, 255, 0], inner.shape), atol=1e-3)
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
    out = rgb255(processor(tall).pixel_values)[0][3:-3]
    np.testing.assert_allclose(out, np.broadcast_to([0, 255, 0], out.shape), atol=1e-3)


def test_resize_and_crop_match_naive_resize_then_crop():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    processor = UniF2aceImageProcessor(size=24, crop_size=20, do_semantic_view=False, do_identity_view=False)
    out = rgb255(processor(image).pixel_values)[0]
    # naive: resize the whole image so the short side is 24 (long side int(24·70/45) = 37), then crop the centre 20
    channels = [
        np.asarray(Image.fromarray(image[..., c].astype(np.float32)).resize((37, 24), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    resized = np.clip(np.stack(channels, -1), 0, 255)
    top, left = (24 - 20) // 2, (37 - 20) // 2
    np.testing.assert_allclose(out, resized[top : top + 20, left : left + 20], atol=1e-2)


def test_scaling_range_is_exactly_minus_one_to_one():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[:2] = 255
    values = plain_processor()(image).pixel_values
    assert values.dtype == np.float32
    assert set(np.unique(values).tolist()) == {-1.0, 1.0}


def test_postprocess_inverts_preprocess_exactly_on_the_grid():
    grid = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = np.stack([grid, grid[::-1], grid.T], axis=-1)
    processor = UniF2aceImageProcessor(size=16, crop_size=16, do_semantic_view=False, do_identity_view=False)
    pixel_values = processor(image, return_tensors="pt").pixel_values
    (restored,) = processor.postprocess(pixel_values)
    assert restored.mode == "RGB" and restored.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(restored), image)
    np.testing.assert_array_equal(np.asarray(processor.postprocess(pixel_values[0].numpy())[0]), image)


def test_postprocess_clamps():
    values = np.array([5.0, -3.0, np.nan, 0.0], dtype=np.float32).reshape(1, 1, 1, 4).repeat(3, axis=1)
    (image,) = UniF2aceImageProcessor().postprocess(values)
    np.testing.assert_array_equal(np.asarray(image)[0, :, 0], [255, 0, 0, 128])  # 0 ↦ 127.5 rounds to even 128
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        UniF2aceImageProcessor().postprocess(np.zeros((1, 4, 2, 2)))


# ----- extra views -----
def test_semantic_view_is_clip_normalised():
    value = 200
    processor = UniF2aceImageProcessor(semantic_size=24, do_identity_view=False)
    out = processor(np.full((50, 40, 3), value, dtype=np.uint8))
    assert out.semantic_pixel_values.shape == (1, 3, 24, 24)
    expected = (value / 255 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(out.semantic_pixel_values[0].mean(axis=(1, 2)), expected, atol=1e-5)
    np.testing.assert_allclose(out.semantic_pixel_values[0].std(axis=(1, 2)), 0, atol=1e-5)


def test_identity_view_centred_crop_and_arcface_range():
    # 100x100 image: a centred 80x80 white square (fraction 0.8) on black; the crop is all white.
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    image[10:90, 10:90] = 255
    processor = UniF2aceImageProcessor(identity_size=16, do_semantic_view=False)
    identity = processor(image).identity_pixel_values
    assert identity.shape == (1, 3, 16, 16)
    inner = identity[0, :, 2:-2, 2:-2]  # (255 − 127.5) / 127.5 = 1 away from the bicubic border support
    np.testing.assert_allclose(inner, 1.0, atol=1e-5)
    black = processor(np.zeros((20, 20), dtype=np.uint8)).identity_pixel_values
    np.testing.assert_allclose(black, -1.0, atol=1e-6)


def test_identity_view_uses_face_boxes():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    image[20:50, 10:40] = (0, 255, 0)  # the "face"
    processor = UniF2aceImageProcessor(identity_size=16, do_semantic_view=False)
    out = processor([image, image], face_boxes=[(10, 20, 40, 50), None])
    green = (np.asarray([0, 255, 0]) / 127.5 - 1).reshape(3, 1, 1)
    inner = out.identity_pixel_values[0, :, 2:-2, 2:-2]
    np.testing.assert_allclose(inner, np.broadcast_to(green, inner.shape), atol=1e-5)
    # the default crop of the second image (centred 48x48) is not all green
    assert not np.allclose(out.identity_pixel_values[1], out.identity_pixel_values[0])


def test_from_model_config_sizes_every_view():
    config = UniF2aceConfig.tiny()
    processor = UniF2aceImageProcessor.from_model_config(config)
    out = processor(Image.new("RGB", (50, 40)), return_tensors="pt")
    side = config.vq_config.resolution
    assert out.pixel_values.shape == (1, 3, side, side)
    assert out.semantic_pixel_values.shape[-1] == config.semantic_config.image_size
    assert out.identity_pixel_values.shape[-1] == config.identity_config.image_size
    assert out.pixel_values.dtype == torch.float32


# ----- save / load -----
@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(size=64, crop_size=48, semantic_size=32, identity_crop_fraction=0.6, identity_image_mean=[0.4, 0.5, 0.6],
              do_identity_view=False, max_image_pixels=10_000)],
)
def test_save_and_load_round_trip(tmp_path, kwargs):
    processor = UniF2aceImageProcessor(**kwargs)
    processor.save_pretrained(tmp_path)
    loaded = UniF2aceImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = np.random.default_rng(2).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    first, second = processor(image), loaded(image)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


# ----- bad inputs -----
def _png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _with_png_header_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width / height of a PNG (and its CRC): a small file that claims a huge image."""
    ihdr_start = 8 + 8  # signature, then chunk length + type
    body = struct.pack(">II", width, height) + data[ihdr_start + 8 : ihdr_start + 13]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return data[:ihdr_start] + body + crc + data[ihdr_start + 17 :]


@pytest.mark.parametrize(
    "image, message",
    [
        (b"definitely not an image", "could not decode"),
        (_png_bytes(20, 20)[:-30], "truncated or corrupt"),
        (Image.new("RGB", (0, 5)), "zero size"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "zero size"),
        (_with_png_header_size(_png_bytes(2, 2), 6000, 6000), "max_image_pixels"),  # above ours, below PIL's
        (_with_png_header_size(_png_bytes(2, 2), 100_000, 100_000), "decompression-bomb"),  # PIL's own bomb error
        (np.zeros(5, dtype=np.uint8), "dimensions"),
        (np.zeros((1, 1, 2, 2, 3), dtype=np.uint8), "dimensions"),
        (np.zeros((5, 6, 7), dtype=np.uint8), "channel axis"),
        (np.full((2, 2, 3), 2.0, dtype=np.float32), r"\[0, 1\]"),
        (np.full((2, 2, 3), np.nan, dtype=np.float32), "finite"),
        (np.full((2, 2), 300, dtype=np.int32), r"\[0, 255\]"),
        (np.zeros((2, 2), dtype=np.complex64), "dtype"),
        ("/no/such/file.png", "not an existing file"),
        (42, "unsupported image type int"),
        ([], "no images"),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, str) else value[:20],
)
def test_bad_inputs_raise_informative_value_errors(image, message):
    with pytest.raises(ValueError, match=message):
        plain_processor()(image)


def test_in_memory_image_above_max_image_pixels_is_refused():
    with pytest.raises(ValueError, match="max_image_pixels=100"):
        plain_processor(max_image_pixels=100)(Image.new("RGB", (20, 20)))


def test_unconvertible_mode_raises_value_error(monkeypatch):
    original_convert = Image.Image.convert

    def convert_without_hsv(self, *args, **kwargs):
        if self.mode == "HSV":
            raise ValueError("conversion from HSV to RGB not supported")
        return original_convert(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", convert_without_hsv)
    with pytest.raises(ValueError, match="cannot convert PIL mode 'HSV' to RGB"):
        plain_processor()(Image.new("HSV", (2, 2)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size=128, crop_size=256), "must fit inside"),
        (dict(identity_crop_fraction=0.0), r"\(0, 1\]"),
        (dict(semantic_size=0), "semantic_size"),
        (dict(do_convert_rgb=False), "always converts to RGB"),
        (dict(face_boxes=[(0, 0, 1, 1)]), "per-call"),
        (dict(semantic_image_std=[1.0, 0.0, 1.0]), "std > 0"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UniF2aceImageProcessor(**kwargs)


@pytest.mark.parametrize(
    "face_boxes, message",
    [
        ([(0, 0, 10, 10)], "one .* per image"),
        ([(0, 0, 10, 10), (5, 5, 5, 9)], "0 <= x0 < x1"),
        ([(0, 0, 1), None], "4 numbers"),
    ],
)
def test_bad_face_boxes(face_boxes, message):
    images = [np.zeros((20, 20, 3), dtype=np.uint8)] * 2
    with pytest.raises(ValueError, match=message):
        UniF2aceImageProcessor()(images, face_boxes=face_boxes)


# ----- property-based: any input gives well-formed tensors or a ValueError -----
SMALL = dict(size=8, crop_size=8, semantic_size=6, identity_size=4)
PIL_MODES = {
    "1": None, "L": 1, "LA": 2, "La": 2, "P": 1, "PA": 2, "RGB": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4,
    "YCbCr": 3, "LAB": 3, "HSV": 3, "I;16": 2, "I;16B": 2, "I": 4, "F": 4,
}
sides = st.one_of(st.integers(0, 12), st.integers(1, 3000))


def _assert_well_formed(out, batch: int) -> None:
    clip_low, clip_high = (0 - CLIP_MEAN) / CLIP_STD, (1 - CLIP_MEAN) / CLIP_STD
    for key, side, low, high in (
        ("pixel_values", SMALL["crop_size"], -1.0, 1.0),
        ("semantic_pixel_values", SMALL["semantic_size"], clip_low.reshape(3, 1, 1), clip_high.reshape(3, 1, 1)),
        ("identity_pixel_values", SMALL["identity_size"], -1.0, 1.0),
    ):
        values = out[key]
        assert isinstance(values, torch.Tensor) and values.dtype == torch.float32
        assert values.shape == (batch, 3, side, side)
        array = values.numpy()
        assert np.isfinite(array).all()
        assert (array >= low - 1e-5).all() and (array <= high + 1e-5).all()


def _run(images, batch: int) -> None:
    try:
        out = UniF2aceImageProcessor(**SMALL)(images, return_tensors="pt")
    except ValueError as error:
        event(f"ValueError: {str(error)[:30]}")
        return
    event("processed")
    _assert_well_formed(out, batch)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(sorted(PIL_MODES)), height=sides, width=sides, seed=st.integers(0, 2**16),
       transparency=st.booleans())
def test_property_random_pil_images(mode, height, width, seed, transparency):
    if height * width > 4000:
        height = min(height, 2)
    rng = np.random.default_rng(seed)
    if height == 0 or width == 0:
        image = Image.new(mode, (width, height))
    else:
        bytes_per_row = (width + 7) // 8 if PIL_MODES[mode] is None else width * PIL_MODES[mode]
        image = Image.frombytes(mode, (width, height), rng.bytes(bytes_per_row * height))
    if mode in ("P", "PA"):
        image.putpalette(list(rng.integers(0, 256, 768)))
    if transparency and mode in ("P", "L", "RGB"):
        image.info["transparency"] = 0 if mode != "RGB" else (0, 0, 0)
    _run(image, 1)


side = st.one_of(st.integers(0, 6), st.integers(1, 1500))
channels = st.sampled_from([1, 2, 3, 4])
image_shapes = st.one_of(
    st.tuples(side, side),
    st.tuples(side, side, channels),
    st.tuples(channels, side, side),
    st.tuples(st.integers(0, 3), side, side, channels),
    st.lists(st.integers(0, 7), min_size=1, max_size=5).map(tuple),  # mostly not an image
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=image_shapes,
    dtype=st.sampled_from(["uint8", "uint16", "bool", "int32", "int64", "float16", "float32", "float64"]),
    low=st.sampled_from([0.0, -1.0, -300.0]),
    high=st.sampled_from([1.0, 255.0, 65535.0]),
    seed=st.integers(0, 2**16),
    as_tensor=st.booleans(),
    with_nan=st.booleans(),
)
def test_property_random_arrays(shape, dtype, low, high, seed, as_tensor, with_nan):
    shape = list(shape)
    while np.prod(shape) > 20_000:
        shape[int(np.argmax(shape))] //= 10
    rng = np.random.default_rng(seed)
    values = rng.uniform(low, high, size=shape)
    if np.dtype(dtype).kind == "f":
        array = values.astype(dtype)
        if with_nan and array.size:
            array.flat[0] = np.nan
    elif dtype == "bool":
        array = values > (low + high) / 2
    else:
        info = np.iinfo(dtype)
        array = np.clip(np.rint(values), info.min, info.max).astype(dtype)
    image = torch.from_numpy(array.astype(np.int32) if dtype == "uint16" else array) if as_tensor else array
    batch = shape[0] if len(shape) == 4 else 1
    _run(image, batch)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=200), cut=st.integers(0, 200), seed=st.integers(0, 2**16))
def test_property_random_and_truncated_bytes(data, cut, seed):
    _run(data, 1)
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(buffer, format="PNG")
    encoded = bytearray(buffer.getvalue()[: max(1, len(buffer.getvalue()) - cut)])
    if encoded and cut % 3 == 0:
        encoded[rng.integers(0, len(encoded))] ^= 0xFF  # and a flipped byte
    _run(bytes(encoded), 1)
