"""check_inputs names the bad argument; the __call__ docstring lists every argument."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from faceid.face.kps import draw_kps

KPS = np.array([[20, 24], [44, 24], [32, 34], [22, 46], [42, 46]], dtype=np.float32)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(image_embeds=None), "image_embeds"),
        (dict(image=None), "image"),
        (dict(prompt=None), "prompt"),
        (dict(height=60), "height"),
        (dict(width=-8), "width"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(control_guidance_start=0.9, control_guidance_end=0.2), "control_guidance_start"),
        (dict(controlnet_conditioning_scale=[0.5, 0.5]), "controlnet_conditioning_scale"),
        (dict(callback_on_step_end_tensor_inputs=["bogus"]), "callback_on_step_end_tensor_inputs"),
    ],
)
def test_check_inputs_names_the_argument(tiny_pipe, kwargs, name):
    args = dict(
        prompt="a person",
        image_embeds=np.zeros(512, np.float32),
        image=draw_kps((64, 64), KPS),
        num_inference_steps=2,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        tiny_pipe(**args)


def test_call_docstring_lists_every_argument(tiny_pipe):
    doc = type(tiny_pipe).__call__.__doc__
    params = [
        p for p in inspect.signature(type(tiny_pipe).__call__).parameters if p not in ("self", "kwargs")
    ]
    missing = [p for p in params if p not in doc]
    assert not missing, missing
