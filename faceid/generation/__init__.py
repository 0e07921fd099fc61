"""Generation: everything between a loaded InstantID pipeline and the images, shared by ``infer_from_pkl.py``,
``app.py`` and (through them) evaluation.

* ``request.py`` — the one generation path: a ``GenerationRequest`` → images (``generate``);
* ``defaults.py`` — the generation defaults, the ``--tiny`` shrinking rule, the "weights exist" check;
* ``composition.py`` — faces of a photo, pose from a photo, several people (who goes where), face inpaint/detail;
* ``prompts.py`` (weights syntax, prompt windows), ``latents.py`` (VAE encode/decode, strength, inpainting),
  ``conditioning.py`` (control images, regions, residuals), ``call_inputs.py`` (the call's checks) — the
  pipeline's helpers, called by ``pipeline_stable_diffusion_xl_instantid.py``;
* ``loras.py``, ``memory.py``, ``schedulers.py`` — options applied to a loaded pipeline;
* ``faces.py`` (face conditioning from uploads), ``studio.py`` (the app without its UI), ``styles.py``,
  ``runs.py`` (a training run's checkpoints), ``cache.py`` (one pipeline, checkpoints swapped).

Nothing here imports gradio or a top-level script: functions receive the pipeline object, and loaders are passed in.
"""
