"""Qwen-VL-Chat's image preprocessing, as the original `visual.py`: RGB, PIL bicubic resize to 448×448
(aspect ratio not kept), /255, CLIP mean/std. Built on transformers' PIL backend, so it works with or
without torchvision; a tensor-based resize would land far from the original's pixels.
"""

from __future__ import annotations

from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from clot.tasks import ClotError

IMAGE_SIZE = 448


def readable_rgb(image) -> Image.Image:
    """`image` as RGB, or a ClotError saying why it cannot be used. Alpha is dropped, not composited,
    as the original's `convert("RGB")` does."""
    if not isinstance(image, Image.Image):
        raise ClotError(f"Qwen-VL takes PIL images; got {type(image).__name__}.")
    if image.width == 0 or image.height == 0:
        raise ClotError(f"The image is empty ({image.width}×{image.height} pixels).")
    try:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt image data, read lazily
        raise ClotError(f"The image could not be read ({error}); use another file.") from error


class QwenVLImageProcessor(PilBackend):
    """`pixel_values` [N, 3, 448, 448] float32, equal to the original's `image_transform`."""

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def fetch_images(self, images):
        """Images come as PIL images: no path, URL or base64 string is opened."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(image) for image in images]
        if not isinstance(images, Image.Image):
            raise ClotError(f"Qwen-VL takes PIL images; got {type(images).__name__}.")
        return images

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs):
        return super().process_image(readable_rgb(image), do_convert_rgb=False, input_data_format=input_data_format,
                                     **kwargs)
