"""The one error a user's image or archive member can raise while it is read (:class:`ImageDefect`),
and the most pixels any decode may be asked for (:data:`DECODE_CEILING`). Imports nothing: the
package's ``__init__`` reads the ceiling before OpenCV loads."""

from __future__ import annotations

#: the ceiling of every decode budget: Pillow refuses headers above twice its ``MAX_IMAGE_PIXELS``
#: (89,478,485), so a budget above this could not be honoured. Its one home: ``prepare.max_pixels``'
#: bound (config/schema.py), OpenCV's ``OPENCV_IO_MAX_IMAGE_PIXELS`` (products10k/__init__.py) and
#: imaging/images.py read it here; a test checks it against Pillow's
DECODE_CEILING = 178_956_970


class ImageDefect(Exception):
    """An image file that cannot be used; ``reason`` is one of empty / truncated / undecodable /
    unreadable / too-large, ``detail`` says why in words (the prepare report's and predict's rows)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
