"""Prepared data (stages ``prepare`` and ``balance``): the raw tables checked, images decoded,
resized and packed into shards, the train/val split, the label map and the balanced subset.
:mod:`.contract` is what the later stages read."""
