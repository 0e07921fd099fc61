"""Evaluation behind ``evaluate.py``: the metrics (Face Sim, CLIP-T, CLIP-I), scoring of generated images, and
the checkpoint × identity × seed grid."""
