"""Faces and data for InstantID: face analysis, face-info files, keypoint drawing, dataset readers and the tiny
offline checkpoints. See docs/design.md for the map of modules."""
