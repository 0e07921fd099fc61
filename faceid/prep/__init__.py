"""Dataset preprocessing behind ``get_face_info.py``: dataset sources, the sharded resumable engine and its
crash-safe part files."""
