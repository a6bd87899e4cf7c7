"""Draw an answer onto its image as a meme: big outlined text on a dark band, readable in CJK too.

    from clot.meme import render, save_png
    meme = render(image, "When the coffee finally kicks in")   # same size as the image
    save_png(meme, "meme.png")

The font is a CJK-capable one when the machine has it (Noto CJK, as `packages.txt` installs on a
Space), found through `CLOT_MEME_FONT`, fontconfig or known paths; otherwise Pillow's default.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from clot.engine import prepare_image

# Where Debian/Ubuntu (fonts-noto-cjk), Fedora and macOS keep a CJK font.
KNOWN_FONTS = [
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Bold.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Bold.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
]
MAX_TEXT_HEIGHT = 0.45  # the caption may cover at most this share of the image
ELLIPSIS = "…"
# Wrapping units: a run of Latin letters/digits (kept whole, with its trailing space) or any single character.
_UNITS = re.compile(r"[0-9A-Za-z\u00c0-\u024f'’.,!?;:\-]+\s*|\s+|.", re.S)


@functools.lru_cache(maxsize=1)
def font_path() -> str | None:
    """A CJK-capable font file, or None to fall back on Pillow's default font."""
    chosen = os.environ.get("CLOT_MEME_FONT")
    if chosen and Path(chosen).is_file():
        return chosen
    if shutil.which("fc-match"):
        try:
            found = subprocess.run(["fc-match", "-f", "%{file}", "Noto Sans CJK JP:bold"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found = ""
        # fc-match always answers with *some* font: accept it only if it is a CJK one.
        if found and "CJK" in Path(found).name and Path(found).is_file():
            return found
    return next((p for p in KNOWN_FONTS if Path(p).is_file()), None)


@functools.lru_cache(maxsize=64)
def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = font_path()
    if path:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def wrap(text: str, font, max_width: int) -> list[str]:
    """Break text into lines no wider than max_width pixels (CJK may break between any characters)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for unit in _UNITS.findall(paragraph):
            if font.getlength(line + unit.rstrip()) <= max_width:
                line += unit
                continue
            if line.strip():
                lines.append(line.rstrip())
            line = unit.lstrip()
            while font.getlength(line.rstrip()) > max_width and len(line) > 1:  # a word wider than the image
                cut = len(line) - 1
                while cut > 1 and font.getlength(line[:cut]) > max_width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        if line.strip():
            lines.append(line.rstrip())
    return lines


def _layout(text: str, width: int, height: int) -> tuple[ImageFont.ImageFont, list[str], int]:
    """The largest font (down to a readable minimum) whose wrapped text fits the allowed height."""
    max_width = int(width * 0.92)
    size = max(12, width // 11)
    minimum = max(10, width // 28)
    while True:
        font = load_font(size)
        line_height = int(size * 1.25)
        lines = wrap(text, font, max_width)
        if len(lines) * line_height <= height * MAX_TEXT_HEIGHT or size <= minimum:
            break
        size = max(minimum, int(size * 0.88))
    fits = max(1, int(height * MAX_TEXT_HEIGHT // line_height))
    if len(lines) > fits:  # still too long at the smallest size: cut the tail
        last = lines[fits - 1]
        while last and font.getlength(last + ELLIPSIS) > max_width:
            last = last[:-1]
        lines = lines[:fits - 1] + [last + ELLIPSIS]
    return font, lines, line_height


def render(image: Image.Image, text: str, position: str = "bottom") -> Image.Image:
    """The image (EXIF-rotated, RGB, same size) with `text` across its lower (or upper) part."""
    if position not in ("bottom", "top"):
        raise ValueError(f"position must be 'bottom' or 'top', got {position!r}.")
    meme = prepare_image(image).copy()
    # Glyph-less characters (controls, the decoder's U+FFFD for broken bytes) would draw as boxes.
    text = "".join(ch for ch in (text or "") if ch.isprintable() and ch != "\ufffd" or ch.isspace())
    text = " ".join(text.split())
    if not text:
        return meme
    width, height = meme.size
    font, lines, line_height = _layout(text, width, height)
    stroke = max(1, line_height // 14)
    block = len(lines) * line_height
    margin = max(4, height // 30)
    top = height - block - margin if position == "bottom" else margin
    if position == "bottom":
        band_top, band_bottom = max(0, top - line_height // 4), height
    else:
        band_top, band_bottom = 0, top + block + line_height // 4

    # A translucent band keeps light text readable on any background.
    band = Image.new("RGBA", meme.size, (0, 0, 0, 0))
    ImageDraw.Draw(band).rectangle([0, band_top, width, band_bottom], fill=(0, 0, 0, 110))
    meme = Image.alpha_composite(meme.convert("RGBA"), band).convert("RGB")

    draw = ImageDraw.Draw(meme)
    for i, line in enumerate(lines):
        x = (width - font.getlength(line)) / 2
        draw.text((x, top + i * line_height), line, font=font, fill="white", stroke_width=stroke, stroke_fill="black")
    return meme


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG through a temporary name, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", optimize=False)
    os.replace(tmp, path)
    return path
