"""Generation helpers that the pipeline module and ``app.py`` share besides the UI: prompt weighting
(``prompts.py``), style presets, face conditioning from uploaded files, the checkpoints of a training run, and a
pipeline cache that swaps IdentityNet and the face adapter without reloading the base SDXL. Nothing here imports
gradio or a top-level script."""
