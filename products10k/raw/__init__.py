"""Raw data in (stage ``download``): the four official files from the Kaggle CLI, a folder, or the
synthetic generator, checked and placed in ``data/raw``."""
