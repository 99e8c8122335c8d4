"""Submission (stage ``submit``): the top-k predictions file, the ensemble, the Kaggle CSV and its
upload."""
