"""Evaluation behind ``evaluate.py``: the metrics (Face Sim, CLIP-T, CLIP-I), scoring of generated images, and
the checkpoint × identity × seed grid, and the editability protocol (identity vs copy-paste, attribute following,
head-angle change on persons with several photos)."""
