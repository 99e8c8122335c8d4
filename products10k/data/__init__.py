"""What the torch-side stages read images through: the prepared-image dataset and its samplers
(``datasets.py``) and the albumentations transforms (``transforms.py``)."""
