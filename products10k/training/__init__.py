"""Training (stages ``train``, ``finetune_balanced``, ``finetune_accuracy``): the phase (``loop.py``,
``state.py``, ``epoch.py``, ``resume.py``, ``live.py``), its losses and its optimizer and schedule.
It stands beside evaluation and retrieval on the shared torch parts: ``models``, ``data``, ``dist``."""
