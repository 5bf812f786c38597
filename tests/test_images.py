"""Subject image checks: every bad file is built here, in tmp_path, and must be named in the report."""
from __future__ import annotations

import io
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.data.decode import to_rgb
from dreambooth.data.images import (
    ImageCheckReport,
    check_images,
    crop_offset,
    load_rgb,
    prepare_image,
    resize_short_side,
)
from dreambooth.errors import ImageCheckError, Problem

RES = 32  # small training resolution keeps every test file tiny


def textured(seed: int, size: tuple[int, int] = (64, 64), gray: bool = False) -> Image.Image:
    """A smooth random picture: structured enough for perceptual hashes, distinct per seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6, 1 if gray else 3), dtype=np.uint8)
    coarse = np.repeat(coarse, 3, axis=2) if gray else coarse
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def save_set(folder: Path, count: int, start: int = 0, **kwargs) -> list[Path]:
    """`count` distinct textured PNGs named img-NN.png."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img-{i:02d}.png"
        textured(i, **kwargs).save(path)
        paths.append(path)
    return paths


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height (1-bit gray) with almost no pixel data: costs nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                     + png_chunk(b"IDAT", zlib.compress(b"\x00" * 8)) + png_chunk(b"IEND", b""))


def by_file(problems: tuple[Problem, ...] | list[Problem], path: Path) -> list[Problem]:
    return [p for p in problems if p.where == str(path)]


def messages(report: ImageCheckReport, severity: str) -> list[str]:
    return [f"{p.where}: {p.message}" for p in report.problems if p.severity == severity]


# --- loading: orientation and modes -------------------------------------------------------------

def test_exif_orientation_6_swaps_size_and_rotates_pixels(tmp_path: Path) -> None:
    stored = Image.new("RGB", (80, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 40, 40))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge becomes the top
    path = tmp_path / "turned.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    save_set(tmp_path, 2, size=(64, 64))

    report = check_images(tmp_path, resolution=RES)
    subject = next(s for s in report.images if s.path == path)
    assert (subject.width, subject.height, subject.exif_rotated) == (40, 80, True)
    rgb = load_rgb(path)
    assert rgb.size == (40, 80)
    top, bottom = rgb.getpixel((20, 10)), rgb.getpixel((20, 70))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_cmyk_jpeg_loads_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (48, 48), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    r, g, b = rgb.getpixel((24, 24))
    assert r > 240 and g < 20 and b < 20


def test_rgba_png_is_flattened_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # transparent black must become white
    image.paste((255, 0, 0, 128), (20, 0, 40, 40))  # half-transparent red over white -> pink
    path = tmp_path / "alpha.png"
    image.save(path)
    rgb = load_rgb(path)
    assert rgb.getpixel((5, 5)) == (255, 255, 255)
    r, g, b = rgb.getpixel((30, 5))
    assert r == 255 and 120 <= g <= 135 and g == b


@pytest.mark.parametrize("mode, value, expected", [
    ("L", 77, (77, 77, 77)),
    ("I;16", 65535, (255, 255, 255)),  # plain convert("RGB") would clip this image to garbage
    ("I;16", 32896, (128, 128, 128)),  # 32896 / 257 = 128
])
def test_gray_and_16_bit_png_scale_to_8_bit_rgb(tmp_path: Path, mode: str, value: int,
                                                 expected: tuple[int, int, int]) -> None:
    dtype = np.uint16 if mode == "I;16" else np.uint8
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((20, 30), value, dtype=dtype)).save(path)
    assert Image.open(path).mode == mode
    assert load_rgb(path).getpixel((3, 3)) == expected


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (20, 20), 0)
    image.putpalette([0, 255, 0] + [0, 0, 255] + [0] * 762)
    image.paste(1, (10, 0, 20, 20))
    path = tmp_path / "pal.png"
    image.save(path, transparency=0)  # palette entry 0 (green) is transparent -> white
    rgb = load_rgb(path)
    assert rgb.getpixel((2, 2)) == (255, 255, 255)
    assert rgb.getpixel((15, 2)) == (0, 0, 255)


def test_modes_are_recorded_and_all_convert(tmp_path: Path) -> None:
    base = textured(1, size=(40, 40))
    for mode in ("RGBA", "LA", "P", "L", "1"):
        base.convert(mode).save(tmp_path / f"m-{mode}.png")
    report = check_images(tmp_path, resolution=RES)
    assert sorted(s.mode for s in report.images) == sorted(["RGBA", "LA", "P", "L", "1"])
    assert all(to_rgb(base.convert(m)).mode == "RGB" for m in ("F", "I", "CMYK", "YCbCr"))


# --- bad files ----------------------------------------------------------------------------------

def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path: Path) -> None:
    save_set(tmp_path, 3)
    buffer = io.BytesIO()
    textured(9, size=(256, 256)).save(buffer, "JPEG", quality=95)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageCheckError) as info:
        check_images(tmp_path, resolution=RES)
    [problem] = [p for p in info.value.problems if p.severity == "error"]
    assert problem.where == str(broken) and "truncated" in problem.message
    assert "broken.jpg" in str(info.value)


def test_text_named_jpg_is_corrupt_but_txt_is_skipped_with_note(tmp_path: Path) -> None:
    save_set(tmp_path, 3)
    (tmp_path / "notes.txt").write_text("my dog photos")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    fake = tmp_path / "fake.jpg"
    fake.write_text("not really a jpeg")
    with pytest.raises(ImageCheckError) as info:
        check_images(tmp_path, resolution=RES)
    problems = info.value.problems
    [fake_problem] = by_file(problems, fake)
    assert fake_problem.severity == "error" and "corrupt" in fake_problem.message
    for skipped in ("notes.txt", ".DS_Store"):
        [note] = by_file(problems, tmp_path / skipped)
        assert note.severity == "note" and "skipped" in note.message

    fake.unlink()  # without the corrupt file the set is usable, the notes stay
    report = check_images(tmp_path, resolution=RES)
    assert len(report.images) == 3 and len(messages(report, "note")) == 2
    assert "0 warning(s), 2 note(s)" in report.summary()


def test_one_pixel_image_warns_it_will_be_upscaled(tmp_path: Path) -> None:
    save_set(tmp_path, 3)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tiny)
    report = check_images(tmp_path, resolution=RES)
    [warning] = by_file(report.problems, tiny)
    assert warning.severity == "warning" and "upscaled" in warning.message and "1x1" in warning.message
    assert len(report.images) == 4


def test_decompression_bomb_refused_from_header_naming_the_limit(tmp_path: Path) -> None:
    save_set(tmp_path, 3)
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 20000, 20000)  # 400 MP declared; no pixels exist to decode
    with pytest.raises(ImageCheckError) as info:
        check_images(tmp_path, resolution=RES)
    [problem] = by_file(info.value.problems, bomb)
    assert problem.severity == "error" and "64,000,000" in problem.message


def test_own_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    save_set(tmp_path, 3, size=(40, 40))
    big = tmp_path / "big.png"
    png_header_only(big, 300, 300)  # would fail to decode: the refusal must come first
    with pytest.raises(ImageCheckError) as info:
        check_images(tmp_path, resolution=RES, max_pixels=50_000)
    [problem] = by_file(info.value.problems, big)
    assert "300x300" in problem.message and "50,000" in problem.message
    with pytest.raises(ImageCheckError, match="50,000"):
        load_rgb(big, max_pixels=50_000)


def test_all_errors_reported_together_with_warnings(tmp_path: Path) -> None:
    save_set(tmp_path, 3)
    (tmp_path / "fake.png").write_text("text")
    png_header_only(tmp_path / "bomb.png", 20000, 20000)
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 10)
    Image.new("RGB", (4, 4), (1, 2, 200)).save(tmp_path / "small.png")
    with pytest.raises(ImageCheckError) as info:
        check_images(tmp_path, resolution=RES)
    errors = {Path(p.where).name for p in info.value.problems if p.severity == "error"}
    assert errors == {"fake.png", "bomb.png", "cut.jpg"}
    assert any(p.severity == "warning" and p.where.endswith("small.png") for p in info.value.problems)
    assert "3 error(s)" in str(info.value)


# --- the set as a whole -------------------------------------------------------------------------

def test_zero_usable_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ImageCheckError, match="no usable images"):
        check_images(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageCheckError, match="no usable images"):
        check_images(empty)


def test_missing_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ImageCheckError) as info:
        check_images(missing)
    assert info.value.problems[0].where == str(missing) and "does not exist" in str(info.value)
    file = tmp_path / "a.png"
    textured(0).save(file)
    with pytest.raises(ImageCheckError, match="is not a folder"):
        check_images(file)


def test_fewer_than_three_and_more_than_twenty_warn(tmp_path: Path) -> None:
    save_set(tmp_path / "two", 2)
    assert any("only 2 usable" in m for m in messages(check_images(tmp_path / "two", RES), "warning"))
    save_set(tmp_path / "many", 21, size=(32, 32))
    report = check_images(tmp_path / "many", RES)
    assert len(report.images) == 21
    assert any("more than 20" in m for m in messages(report, "warning"))
    save_set(tmp_path / "fine", 5)
    assert check_images(tmp_path / "fine", RES).problems == ()


def test_exact_and_near_duplicates_warn(tmp_path: Path) -> None:
    originals = save_set(tmp_path, 3, size=(96, 96))
    exact = tmp_path / "z-copy.png"
    shutil.copy(originals[0], exact)
    near = tmp_path / "z-near.jpg"
    Image.open(originals[1]).resize((86, 86), Image.Resampling.BILINEAR).save(near, quality=70)
    report = check_images(tmp_path, resolution=RES)
    [exact_warning] = by_file(report.problems, exact)
    assert "exact duplicate of" in exact_warning.message and "img-00.png" in exact_warning.message
    [near_warning] = by_file(report.problems, near)
    assert "near duplicate of" in near_warning.message and "img-01.png" in near_warning.message
    assert len(messages(report, "warning")) == 2  # the distinct originals are not flagged


def test_near_duplicate_detected_after_exif_transpose(tmp_path: Path) -> None:
    upright = textured(4, size=(60, 90))
    upright.save(tmp_path / "a.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes with tag 6
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "b.jpg", exif=exif.tobytes(), quality=90)
    report = check_images(tmp_path, resolution=RES)
    assert any("near duplicate of" in m and "b.jpg" in m for m in messages(report, "warning"))


def test_grayscale_only_set_warns_even_when_stored_as_rgb(tmp_path: Path) -> None:
    save_set(tmp_path / "gray", 3, gray=True)
    assert Image.open(tmp_path / "gray" / "img-00.png").mode == "RGB"
    report = check_images(tmp_path / "gray", resolution=RES)
    assert any("no colour" in m for m in messages(report, "warning"))

    save_set(tmp_path / "mixed", 2, gray=True)
    save_set(tmp_path / "mixed", 1, start=7)  # one colour photo is enough
    assert not any("no colour" in m for m in messages(check_images(tmp_path / "mixed", RES), "warning"))


# --- prepare_image ------------------------------------------------------------------------------

def test_prepare_image_shape_and_range() -> None:
    tensor = prepare_image(textured(3, size=(90, 60)), 48)
    assert tensor.shape == (3, 48, 48) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert torch.all(prepare_image(Image.new("RGB", (10, 10), "white"), 16) == 1.0)
    assert torch.all(prepare_image(Image.new("L", (10, 10), 0), 16) == -1.0)  # non-RGB accepted


def column_ramp(width: int, height: int) -> Image.Image:
    """Red channel = x coordinate, so a crop's left edge can be read from its pixels."""
    ramp = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :, None], (height, width, 3))
    return Image.fromarray(np.ascontiguousarray(ramp))


def test_center_crop_math() -> None:
    assert resize_short_side(Image.new("RGB", (200, 100)), 50).size == (100, 50)
    assert resize_short_side(Image.new("RGB", (10, 30)), 20).size == (20, 60)
    assert crop_offset((100, 50), 50, "center", random.Random(0)) == (25, 0)
    assert crop_offset((50, 101), 50, "center", random.Random(0)) == (0, 25)  # floor of 25.5
    tensor = prepare_image(column_ramp(100, 50), 50)  # no resize: short side is already 50
    left_red = round((tensor[0, 0, 0].item() + 1) * 127.5)
    right_red = round((tensor[0, 0, -1].item() + 1) * 127.5)
    assert (left_red, right_red) == (25, 74)


def test_random_crop_is_deterministic_given_rng() -> None:
    image = column_ramp(120, 40)
    first = prepare_image(image, 40, crop="random", rng=random.Random(7))
    again = prepare_image(image, 40, crop="random", rng=random.Random(7))
    assert torch.equal(first, again)
    lefts = {crop_offset((120, 40), 40, "random", random.Random(seed))[0] for seed in range(20)}
    assert len(lefts) > 5 and all(0 <= x <= 80 for x in lefts)
    with pytest.raises(ValueError, match="crop"):
        prepare_image(image, 40, crop="diagonal")


def test_flip_mirrors_horizontally() -> None:
    image = textured(5, size=(64, 48))
    plain = prepare_image(image, 48)
    flipped = prepare_image(image, 48, flip=True)
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))
    assert not torch.equal(flipped, plain)


def cartoon_figure(tilt: float, arm: float, shift_x: int, shift_y: int) -> Image.Image:
    """A red cartoon figure on white in one pose, like google/dreambooth's red_cartoon photos.

    Most of the frame is the same white background, so coarse hashes of distinct poses are close.
    """
    from PIL import ImageDraw

    image = Image.new("RGB", (192, 192), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    cx, cy, t = 96 + shift_x, 104 + shift_y, np.radians(tilt)
    hx, hy = cx + 40 * np.sin(t), cy - 40 * np.cos(t)
    draw.ellipse((cx - 22, cy - 30, cx + 22, cy + 30), fill=(200, 30, 40))
    draw.ellipse((hx - 18, hy - 18, hx + 18, hy + 18), fill=(220, 40, 50))
    for side in (-1, 1):
        a = np.radians(arm * side)
        draw.line((cx + side * 18, cy - 10, cx + side * (18 + 30 * np.cos(a)), cy - 10 - 30 * np.sin(a)),
                  fill=(180, 20, 30), width=8)
    draw.line((cx - 10, cy + 28, cx - 14 + shift_x // 3, cy + 56), fill=(120, 10, 20), width=8)
    draw.line((cx + 10, cy + 28, cx + 14, cy + 56), fill=(120, 10, 20), width=8)
    return image


def test_distinct_poses_on_a_plain_background_are_not_near_duplicates(tmp_path: Path) -> None:
    # 64-bit dHash within 6 bits and colour thumbnails within 12 flagged 4 of these 6 pairs
    poses = [(0, 20, 0, 0), (5, 80, 4, 8), (-8, 70, -6, 8), (8, -20, 8, 0)]
    for i, pose in enumerate(poses):
        cartoon_figure(*pose).save(tmp_path / f"pose-{i}.png")
    report = check_images(tmp_path, RES)
    assert not [p for p in report.problems if "near duplicate" in p.message]


def test_near_duplicate_copies_of_a_figure_are_caught(tmp_path: Path) -> None:
    from PIL import ImageEnhance

    original = cartoon_figure(5, 80, 4, 8)
    original.save(tmp_path / "a.png")
    cartoon_figure(-8, 70, -6, 8).save(tmp_path / "b.png")  # a distinct pose: must stay quiet
    crop = round(192 * 0.03)
    copies = {"half.jpg": original.resize((96, 96), Image.Resampling.LANCZOS),
              "cropped.jpg": original.crop((crop, crop, 192 - crop, 192 - crop)),
              "brighter.jpg": ImageEnhance.Brightness(original).enhance(1.1)}
    for name, copy in copies.items():
        copy.save(tmp_path / name, quality=70)
    report = check_images(tmp_path, RES)
    pairs = [(Path(p.where).name, p.message) for p in report.problems if "near duplicate" in p.message]
    for name in copies:
        assert any({name, "a.png"} <= {where, *[w for w in (name, "a.png") if w in message]}
                   for where, message in pairs), name
    assert not any("b.png" in where or "b.png" in message for where, message in pairs)
