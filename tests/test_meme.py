"""The meme renderer: same size as the input, readable CJK, long text wrapped and cut."""

from __future__ import annotations


import pytest
from PIL import Image, ImageChops

from clot import meme


def changed_rows(before: Image.Image, after: Image.Image) -> tuple[int, int]:
    box = ImageChops.difference(before.convert("RGB"), after).getbbox()
    assert box is not None, "nothing was drawn"
    return box[1], box[3]


def test_caption_goes_on_the_lower_part_and_keeps_the_size():
    image = Image.new("RGB", (400, 300), (30, 120, 200))
    out = meme.render(image, "When the coffee finally kicks in")
    assert out.size == image.size and out.mode == "RGB"
    top, bottom = changed_rows(image, out)
    assert top >= 300 * (1 - meme.MAX_TEXT_HEIGHT) - 20 and bottom == 300
    top, bottom = changed_rows(image, meme.render(image, "When the coffee finally kicks in", "top"))
    assert top == 0 and bottom <= 300 * meme.MAX_TEXT_HEIGHT + 20


def test_characters_without_glyphs_are_dropped():
    image = Image.new("RGB", (300, 200), "gray")
    assert meme.render(image, "\x02\ufffd \x07") == image  # nothing drawable: the image is unchanged
    assert meme.render(image, "ok\ufffd\x02") == meme.render(image, "ok")


@pytest.mark.skipif(meme.font_path() is None, reason="no CJK font installed (packages.txt: fonts-noto-cjk)")
def test_cjk_text_is_drawn_with_real_glyphs():
    font = meme.load_font(40)
    # Distinct characters get distinct glyphs (a font without CJK draws the same empty box for all).
    masks = [bytes(font.getmask(ch)) for ch in "猫犬鳥"]
    assert len(set(masks)) == 3 and all(any(m) for m in masks)


def test_long_text_is_wrapped_to_the_width_and_cut_with_an_ellipsis():
    font = meme.load_font(20)
    lines = meme.wrap("这是一个非常长的句子，用来测试换行。" * 5 + " supercalifragilistic" * 4, font, 150)
    assert len(lines) > 5 and all(font.getlength(line) <= 150 for line in lines)
    image = Image.new("RGB", (200, 120), "white")
    out = meme.render(image, "word " * 400)
    assert out.size == (200, 120)
    _, lines, _ = meme._layout("word " * 400, 200, 120)
    assert lines[-1].endswith(meme.ELLIPSIS)


def test_orientation_alpha_and_empty_text(tmp_path):
    rgba = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
    assert meme.render(rgba, "").getpixel((5, 5)) == (255, 255, 255)  # transparency flattened onto white
    rotated = Image.new("RGB", (60, 40), "red")
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    rotated.save(path, exif=exif)
    with Image.open(path) as loaded:
        out = meme.render(loaded, "hi")
    assert out.size == (40, 60)  # the meme follows the picture as it is displayed
    saved = meme.save_png(out, tmp_path / "meme.png")
    with Image.open(saved) as again:
        assert again.format == "PNG" and again.size == (40, 60)
