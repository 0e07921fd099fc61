"""Offline stand-ins built by ``download.py --tiny``: tiny SDXL / IdentityNet / adapter / CLIP, a tiny
antelopev2 that insightface loads, and synthetic face images."""
