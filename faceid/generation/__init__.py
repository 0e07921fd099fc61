"""What interactive generation (``app.py``) needs besides the UI: style presets, face conditioning from uploaded
files, the checkpoints of a training run, and a pipeline cache that swaps IdentityNet and the face adapter without
reloading the base SDXL. Nothing here imports gradio or a top-level script."""
