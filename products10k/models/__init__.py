"""The model every torch-side stage shares: the timm backbone + pooling + head (``model.py``), its
ImageNet weights from the registry packages (``weights.py``) and the checkpoint contract with its
loaders (``checkpoint.py``). Training, evaluation, retrieval and the export stand on it side by side.
"""
