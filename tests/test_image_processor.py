"""AdaTokImageProcessor: conversion of every input kind to [0, 1], geometry, randomness, errors, saving."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature

from adatok_vlm.tokenizer.image_processing_adatok import AdaTokImageProcessor


def _random_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pixels(processor, images, **kwargs):
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


# ---------------------------------------------------------------------------------------------
# Conversion: every input kind lands in float32 [B, 3, S, S] in [0, 1] with the right values
# ---------------------------------------------------------------------------------------------


def test_pil_rgb_output_shape_dtype_range_and_values():
    processor = AdaTokImageProcessor(size=32)
    out = processor(Image.fromarray(_random_rgb(40, 60)), return_tensors="pt")
    assert isinstance(out, BatchFeature)
    pixels = out["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    # A flat colour survives bicubic resizing and cropping exactly: 8-bit values are divided by 255.
    flat = Image.new("RGB", (50, 70), (255, 0, 128))
    pixels = _pixels(processor, flat)
    expected = torch.tensor([1.0, 0.0, 128 / 255]).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)


def test_greyscale_is_replicated_to_three_equal_channels():
    grey = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    pixels = _pixels(AdaTokImageProcessor(size=32), Image.fromarray(grey, mode="L"))[0]
    torch.testing.assert_close(pixels[0], torch.from_numpy(grey / 255.0).float())
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])


def test_rgba_is_composited_onto_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # opaque red
    rgba[:, 4:6] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[:, 6:] = (0, 0, 0, 102)  # 40 % black over white -> 0.6 grey
    pixels = _pixels(AdaTokImageProcessor(size=8, resize_mode="pad"), Image.fromarray(rgba, mode="RGBA"))[0]
    torch.testing.assert_close(pixels[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(pixels[:, 0, 4], torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(pixels[:, 0, 7], torch.full((3,), 1 - 102 / 255), atol=1e-6, rtol=0)


def test_palette_with_transparency_and_la_are_composited():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    pixels = _pixels(AdaTokImageProcessor(size=4, resize_mode="pad"), palette)
    assert torch.all(pixels == 1.0)  # index 0 is transparent -> white
    la = Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)]), mode="LA")
    assert torch.all(_pixels(AdaTokImageProcessor(size=4, resize_mode="pad"), la) == 0.0)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_images_scale_by_65535(mode):
    values = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    image = Image.fromarray(values)  # "I;16"
    if mode == "I":
        image = image.convert("I")
    assert image.mode == mode
    pixels = _pixels(AdaTokImageProcessor(size=16, resize_mode="pad"), image)[0]
    torch.testing.assert_close(pixels[0], torch.from_numpy(values / 65535.0).float())
    assert pixels.max().item() == 1.0 and pixels.min().item() == 0.0


def test_numpy_and_torch_inputs_match_pil():
    array = _random_rgb(24, 24, seed=2)
    processor = AdaTokImageProcessor(size=24)
    reference = _pixels(processor, Image.fromarray(array))
    as_float = array.astype(np.float32) / 255.0
    chw = torch.from_numpy(as_float).permute(2, 0, 1)
    for image in (array, as_float, as_float.astype(np.float64), chw, torch.from_numpy(array).permute(2, 0, 1)):
        torch.testing.assert_close(_pixels(processor, image), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(_pixels(processor, chw.half()), reference, atol=1e-3, rtol=0)  # fp16 rounding
    # Batches: numpy [B, H, W, C], torch [B, C, H, W], lists.
    assert _pixels(processor, np.stack([array, array])).shape == (2, 3, 24, 24)
    assert _pixels(processor, torch.stack([chw, chw, chw])).shape == (3, 3, 24, 24)
    torch.testing.assert_close(_pixels(processor, [Image.fromarray(array), chw])[1], reference[0], atol=1e-6, rtol=0)


def test_numpy_greyscale_and_single_channel():
    grey = np.random.default_rng(3).integers(0, 256, (16, 16), dtype=np.uint8)
    processor = AdaTokImageProcessor(size=16)
    a = _pixels(processor, grey)
    b = _pixels(processor, grey[..., None])
    c = _pixels(processor, torch.from_numpy(grey)[None].float() / 255)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert torch.equal(a[0, 0], a[0, 2])


def test_return_tensors_numpy_and_list():
    processor = AdaTokImageProcessor(size=8)
    images = [_random_rgb(10, 12, s) for s in range(3)]
    as_np = processor(images, return_tensors="np")["pixel_values"]
    assert isinstance(as_np, np.ndarray) and as_np.shape == (3, 3, 8, 8) and as_np.dtype == np.float32
    as_list = processor(images)["pixel_values"]
    assert isinstance(as_list, list) and len(as_list) == 3 and as_list[0].shape == (3, 8, 8)
    np.testing.assert_array_equal(np.stack(as_list), as_np)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def test_pad_mode_keeps_28x28_pixels_unresampled_in_the_centre():
    digit = np.random.default_rng(4).integers(0, 256, (28, 28), dtype=np.uint8)
    pixels = _pixels(AdaTokImageProcessor(size=32, resize_mode="pad", fill_value=0.25), Image.fromarray(digit))[0]
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels[0, 2:30, 2:30], torch.from_numpy(digit / 255.0).float(), atol=0, rtol=0)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(pixels[:, border] == 0.25)


def test_pad_mode_shrinks_large_images_keeping_aspect():
    wide = np.full((20, 64, 3), 255, dtype=np.uint8)  # white, 1:3.2
    pixels = _pixels(AdaTokImageProcessor(size=32, resize_mode="pad"), wide)[0]
    rows = (pixels[0] > 0.5).any(dim=1).nonzero().flatten()
    assert len(rows) == 10 and rows.tolist() == list(range(11, 21))  # 20 * 32/64 = 10 rows, centred
    assert torch.all(pixels[0, 11:21] > 0.99)


def test_shortest_edge_resizes_then_centre_crops():
    half = np.zeros((40, 80, 3), dtype=np.uint8)
    half[:, 40:] = 255  # left half black, right half white
    pixels = _pixels(AdaTokImageProcessor(size=20, crop="center"), half)[0]
    # Resized to 20x40, the centre crop spans columns 10..29: black then white, split in the middle.
    assert pixels.shape == (3, 20, 20)
    assert torch.all(pixels[:, :, :8] < 0.02) and torch.all(pixels[:, :, 12:] > 0.98)


# ---------------------------------------------------------------------------------------------
# Randomness: reproducible with a seed or generator, varied across seeds
# ---------------------------------------------------------------------------------------------


def test_random_crop_and_flip_are_deterministic_given_a_seed_and_vary_across_seeds():
    processor = AdaTokImageProcessor(size=16, crop="random", do_flip=True)
    image = Image.fromarray(_random_rgb(48, 64, seed=5))
    first = _pixels(processor, image, seed=123)
    assert torch.equal(first, _pixels(processor, image, seed=123))
    outputs = {_pixels(processor, image, seed=s).numpy().tobytes() for s in range(8)}
    assert len(outputs) >= 4
    twice = [_pixels(processor, image, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(*twice)


def test_flip_mirrors_the_image_horizontally():
    array = _random_rgb(12, 12, seed=6)
    plain = _pixels(AdaTokImageProcessor(size=12), array)
    flipping = AdaTokImageProcessor(size=12, do_flip=True)
    seen = {"plain": False, "mirrored": False}
    for seed in range(16):
        out = _pixels(flipping, array, seed=seed)
        if torch.equal(out, plain):
            seen["plain"] = True
        else:
            assert torch.equal(out, plain.flip(-1))
            seen["mirrored"] = True
    assert all(seen.values())


def test_random_placement_in_pad_mode_keeps_the_image_intact():
    digit = np.random.default_rng(7).integers(1, 256, (28, 28), dtype=np.uint8)
    processor = AdaTokImageProcessor(size=32, resize_mode="pad", crop="random")
    offsets = set()
    for seed in range(10):
        pixels = _pixels(processor, digit, seed=seed)[0, 0]
        rows, cols = (pixels > 0).any(1).nonzero().flatten(), (pixels > 0).any(0).nonzero().flatten()
        top, left = int(rows[0]), int(cols[0])
        torch.testing.assert_close(pixels[top : top + 28, left : left + 28], torch.from_numpy(digit / 255.0).float())
        offsets.add((top, left))
    assert len(offsets) > 1


# ---------------------------------------------------------------------------------------------
# Errors name the argument, what was expected and what arrived
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, error, words",
    [
        ([], ValueError, ["images", "empty"]),
        (object(), TypeError, ["images", "PIL", "object"]),
        ("photo.png", TypeError, ["images", "str"]),
        (Image.new("RGB", (1, 1)), ValueError, ["images[0]", "1x1", "2 pixels"]),
        (np.full((8, 8, 3), np.nan, np.float32), ValueError, ["images[0]", "NaN"]),
        (np.full((8, 8, 3), 1.5, np.float32), ValueError, ["images[0]", "[0, 1]", "1.5"]),
        (torch.full((3, 8, 8), -0.5), ValueError, ["images[0]", "[0, 1]", "-0.5"]),
        (np.zeros((8, 8, 2), np.uint8), ValueError, ["images[0]", "channels", "2"]),
        (torch.zeros(5, 8, 8), ValueError, ["images[0]", "channels", "(5, 8, 8)"]),
        (np.zeros((3, 8, 8), np.uint8), ValueError, ["images[0]", "channels-first"]),
        (np.zeros((8, 8, 3), np.int32) + 300, ValueError, ["images[0]", "0..255", "300"]),
        (np.zeros((8, 8, 3), np.complex64), TypeError, ["images[0]", "complex64"]),
        ([Image.new("RGB", (8, 8)), np.zeros((2, 8, 8, 3), np.uint8)], ValueError, ["images[1]", "batch"]),
    ],
)
def test_bad_images_raise_naming_the_argument(images, error, words):
    with pytest.raises(error) as info:
        AdaTokImageProcessor(size=4)(images)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"size": 0}, ValueError, ["size", "positive int", "0"]),
        ({"size": 3.5}, ValueError, ["size", "3.5"]),
        ({"resize_mode": "stretch"}, ValueError, ["resize_mode", "shortest_edge", "stretch"]),
        ({"crop": "left"}, ValueError, ["crop", "center", "left"]),
        ({"do_flip": "yes"}, TypeError, ["do_flip", "bool", "yes"]),
        ({"resample": "fancy"}, ValueError, ["resample", "bicubic", "fancy"]),
        ({"fill_value": 2}, ValueError, ["fill_value", "[0, 1]", "2"]),
        ({"do_normalize": True}, TypeError, ["do_normalize"]),
    ],
)
def test_bad_settings_raise_naming_the_argument(kwargs, error, words):
    with pytest.raises(error) as info:
        AdaTokImageProcessor(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_call_arguments_raise():
    processor, image = AdaTokImageProcessor(size=4), np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="generator, seed"):
        processor(image, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="seed"):
        processor(image, seed="1")
    with pytest.raises(ValueError, match="return_tensors.*'tf'"):
        processor(image, return_tensors="tf")
    with pytest.raises(TypeError, match="image_mean"):
        processor(image, image_mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="crop"):
        processor(image, crop="middle")


# ---------------------------------------------------------------------------------------------
# Saving, loading, postprocessing
# ---------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip_gives_identical_output(tmp_path):
    processor = AdaTokImageProcessor(size=24, resize_mode="shortest_edge", crop="random", do_flip=True,
                                     resample=Image.Resampling.LANCZOS, fill_value=0.5)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = AdaTokImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    settings = (loaded.size, loaded.crop, loaded.do_flip, loaded.resample)
    assert settings == (24, "random", True, int(Image.Resampling.LANCZOS))
    image = Image.fromarray(_random_rgb(30, 50, seed=8))
    assert torch.equal(_pixels(loaded, image, seed=3), _pixels(processor, image, seed=3))
    assert AdaTokImageProcessor.from_pretrained(tmp_path, size=12).size == 12


def test_auto_image_processor_loads_it(tmp_path):
    import transformers

    import adatok_vlm  # noqa: F401  (registers the Auto classes)

    AdaTokImageProcessor(size=16, resize_mode="pad").save_pretrained(tmp_path)
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, AdaTokImageProcessor) and loaded.resize_mode == "pad"


def test_postprocess_inverts_preprocess_and_clamps():
    processor = AdaTokImageProcessor(size=16, resize_mode="pad")
    array = _random_rgb(16, 16, seed=9)
    images = processor.postprocess(_pixels(processor, [array, array]))
    assert len(images) == 2 and images[0].mode == "RGB" and images[0].size == (16, 16)
    np.testing.assert_array_equal(np.asarray(images[0]), array)
    overshoot = torch.stack([torch.full((3, 2, 2), -0.5), torch.full((3, 2, 2), 1.5)])
    clamped = processor.postprocess(overshoot)
    assert np.asarray(clamped[0]).max() == 0 and np.asarray(clamped[1]).min() == 255
    assert processor.postprocess(torch.full((3, 2, 2), 0.5))[0].getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ValueError, match="pixel_values.*NaN"):
        processor.postprocess(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="pixel_values.*shape"):
        processor.postprocess(torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------
# Files from disk: EXIF orientation and damaged data (issue 20)
# ---------------------------------------------------------------------------------------------


def _asymmetric(width=40, height=24):
    """An image whose every orientation differs: a red block in the top-left corner on grey."""
    array = np.full((height, width, 3), 128, dtype=np.uint8)
    array[: height // 3, : width // 4] = (255, 0, 0)
    return array


# EXIF orientation tag -> the transpose a viewer applies to show the stored pixels upright
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270,
                8: Image.Transpose.ROTATE_90}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_to_images_read_from_files(tmp_path, orientation, fmt):
    stored = Image.fromarray(_asymmetric())
    exif = Image.Exif()
    exif[0x0112] = orientation                       # the Orientation tag a phone camera writes
    path = tmp_path / f"photo.{fmt.lower()}"
    stored.save(path, format=fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    opened = Image.open(path)
    assert opened.getexif()[0x0112] == orientation and opened.size == (40, 24)
    processor = AdaTokImageProcessor(size=16, resize_mode="pad")
    decoded = Image.fromarray(np.asarray(Image.open(path).convert("RGB")))   # the stored pixels, no EXIF
    expected = _pixels(processor, decoded.transpose(ORIENTATIONS[orientation]))
    got = _pixels(processor, opened)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert (got - _pixels(processor, decoded)).abs().max() > 0.3, "the orientation tag was ignored"


def test_an_image_without_orientation_is_unchanged(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(_asymmetric()).save(path)
    processor = AdaTokImageProcessor(size=16, resize_mode="pad")
    torch.testing.assert_close(_pixels(processor, Image.open(path)),
                               _pixels(processor, Image.fromarray(_asymmetric())), atol=0, rtol=0)


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_truncated_png_names_the_image_and_the_cause(tmp_path, cut):
    path = tmp_path / "full.png"
    Image.fromarray(_random_rgb(64, 64)).save(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: int(len(data) * cut)])
    good = Image.fromarray(_random_rgb(40, 40))
    with pytest.raises(ValueError, match=r"images\[1\]: the image data cannot be decoded \(OSError: .*truncated"):
        AdaTokImageProcessor(size=32)([good, Image.open(truncated)], return_tensors="pt")


def test_to_uint8_is_the_one_rounding_and_inverts_the_processor():
    """uint8 -> processor float -> to_uint8 is the identity; the pipeline's PIL output and the pictures'
    helper are that same function (one rounding, half to even, clamped)."""
    from adatok_vlm.generator.pipeline import to_pil
    from adatok_vlm.tokenizer.image_processing_adatok import to_uint8
    from adatok_vlm.training import visualize

    array = _random_rgb(8, 8)
    pixels = _pixels(AdaTokImageProcessor(size=8), [Image.fromarray(array)])
    back = to_uint8(pixels)
    assert back.dtype == np.uint8 and back.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(back[0], array)
    edge = torch.tensor([-0.5, 0.5 / 255, 1.5 / 255, 1.2]).view(1, 4, 1, 1).expand(1, 4, 1, 3).permute(0, 3, 1, 2)
    assert to_uint8(edge)[0, :, 0, 0].tolist() == [0, 0, 2, 255]      # clamped, rounded half to even
    assert visualize.to_uint8 is to_uint8
    np.testing.assert_array_equal(np.asarray(to_pil(pixels)[0]), array)
