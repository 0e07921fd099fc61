"""Training behind ``train_instantId_sdxl.py``: index records and cross-identity references, transforms, the
dataset and sampler, WebDataset shards, the trained model and its loss, and checkpoints."""
