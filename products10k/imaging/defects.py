"""The one error a user's image or archive member can raise while it is read: :class:`ImageDefect`."""

from __future__ import annotations


class ImageDefect(Exception):
    """An image file that cannot be used; ``reason`` is one of empty / truncated / undecodable /
    unreadable / too-large, ``detail`` says why in words (the prepare report's and predict's rows)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
