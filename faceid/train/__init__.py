"""Training behind ``train_instantId_sdxl.py``: index records and cross-identity references, transforms, the
dataset and sampler, WebDataset shards, the trained model and its loss, the identity loss, the EMA, the disk caches
of ``precompute_cache.py``, checkpoints, and the user-error type both scripts report without a traceback."""
