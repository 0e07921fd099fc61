"""Training behind ``train_instantId_sdxl.py`` and ``precompute_cache.py``: their shared set-up (flags, data-source
checks, records and buckets, the data of a run, the explicit hooks of ``main``), index records and cross-identity
references, transforms, the dataset and sampler, WebDataset shards, the trained model and its loss, one optimizer
step, the identity loss, the EMA, the disk caches, checkpoints, and the user-error type both scripts report without a
traceback. Never imports ``faceid.tiny``."""
