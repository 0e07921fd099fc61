"""Downloads behind ``download.py``: InstantID and SDXL weights, the antelopev2 mirror, and datasets."""
