"""Evaluation (stage ``evaluate``): test-time views and batched prediction, metrics, the gallery,
and the per-phase evaluation that writes them."""
