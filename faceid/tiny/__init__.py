"""Offline stand-ins built by ``download.py --tiny``: tiny SDXL / IdentityNet / adapter / CLIP, a tiny antelopev2
that insightface loads, synthetic faces and embeddings, the miniature world they are pretrained on, and the papers'
claims measured in it. Used by tests, ``download.py --tiny``, ``evaluate.py --tiny`` and benchmarks; training and
evaluation code never imports it (tests/test_schema.py)."""
