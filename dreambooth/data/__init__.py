"""Subject image loading and validation: EXIF, modes, size, corruption, duplicates."""
from dreambooth.data.images import (
    ImageCheckReport,
    SubjectImage,
    check_images,
    load_rgb,
    prepare_image,
)

__all__ = ["ImageCheckReport", "SubjectImage", "check_images", "load_rgb", "prepare_image"]
