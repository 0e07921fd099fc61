"""One face: image loading (EXIF, modes, size guard), the five keypoints and their drawing, face-info files, and
face analysis with insightface (largest face, retries, batching)."""
