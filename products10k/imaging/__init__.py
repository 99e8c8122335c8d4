"""Reading images safely, the ground floor every reader of user files stands on: prepare, the
synthetic data's encoder, the training and evaluation readers, and the light deploy runtime.

``headers.py`` reads an image's size from its own header before anything is decoded, ``archive.py``
reads zips within their declared bounds, ``images.py`` decodes, resizes and encodes within
``ImageLimits``, ``defects.py`` names what is wrong with a file. No torch, no pandas.
"""
