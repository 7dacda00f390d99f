"""Reading training/evaluation images as 8-bit arrays, including 16-bit grayscale files.

Detectron2's ``read_image`` converts with PIL's ``Image.convert``, which clips 16-bit grayscale
values (PIL modes ``I;16*`` and ``I``) at 255: a 16-bit PNG is read as an almost white image.
``read_image_8bit`` scales those to 8 bits instead (value / 257, rounded: 0 -> 0, 65535 -> 255)
and refuses images whose values cannot be mapped (32-bit integer values outside 0..65535,
floating-point images) with an error naming the file. Every other image is read exactly as
Detectron2 reads it (EXIF orientation applied, converted to ``format``).
"""
import numpy as np
from PIL import Image, ImageOps

from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager

__all__ = ["read_image_8bit", "SIXTEEN_BIT_MODES"]

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image_8bit(file_name: str, format: str = "RGB") -> np.ndarray:
    """Read ``file_name`` as an HxWxC uint8 array in ``format`` (Detectron2's format names;
    HxWx1 for "L"). 16-bit grayscale is scaled to 8 bits; see the module docstring."""
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"image file '{file_name}': 32-bit integer image (PIL mode {image.mode}) "
                             f"with values {values.min()}..{values.max()} outside 0..65535; convert it to "
                             f"8 or 16 bits per channel")
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))  # mode L
    elif image.mode == "F":
        raise ValueError(f"image file '{file_name}': floating-point image (PIL mode F) is not supported; "
                         f"convert it to 8 or 16 bits per channel")
    return utils.convert_PIL_to_numpy(image, format)
