"""products10k: a DVC pipeline for SKU-level product recognition on Products-10K.

Modules are named for what they hold; stage scripts under ``stages/`` are thin wrappers
that parse paths from the command line, load their typed params and call in here.
"""

import os

from products10k.imaging.defects import DECODE_CEILING

__version__ = "0.1.0"

# OpenCV's own refusal of huge images, a second fence behind the project's header checks
# (imaging/images.py): set before anything imports cv2, which reads it once when it loads. The
# value is the ceiling of any decode budget params.yaml allows (prepare.max_pixels).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DECODE_CEILING))
