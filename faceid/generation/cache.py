"""One loaded pipeline for every checkpoint of a comparison: the base SDXL (VAE, text encoders, UNet) is loaded
once; switching to another checkpoint replaces only IdentityNet (a ControlNetModel) and the face adapter
(Resampler + the UNet's IP layers), which the pipeline's ``load_ip_adapter_instantid`` installs.

The loaders are passed in (this package never imports the pipeline script): ``load_pipeline(weights)`` builds the
whole pipeline for one :class:`~faceid.generation.runs.Weights`, ``load_controlnet(path)`` one IdentityNet on the
pipeline's device and dtype. The last ``max_controlnets`` IdentityNets stay in memory, so going back and forth
between checkpoints reads only the adapter file again.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

from faceid.generation.runs import Weights


class PipelineCache:
    def __init__(self, load_pipeline, load_controlnet, max_controlnets: int = 2):
        self._load_pipeline = load_pipeline
        self._load_controlnet = load_controlnet
        self.max_controlnets = max(1, int(max_controlnets))
        self.pipe = None
        self.current: Weights | None = None
        self._nets: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.RLock()
        # What was read from disk, for the user (status line) and the tests.
        self.base_loads = 0
        self.controlnet_loads = 0
        self.adapter_loads = 0
        self.swaps = 0

    def stats(self) -> dict:
        return {
            "base_loads": self.base_loads,
            "controlnet_loads": self.controlnet_loads,
            "adapter_loads": self.adapter_loads,
            "swaps": self.swaps,
        }

    @contextlib.contextmanager
    def use(self, weights: Weights):
        """The pipeline with ``weights`` installed, held for the duration of the ``with`` (no swap meanwhile)."""
        with self._lock:
            yield self.get(weights)

    def get(self, weights: Weights):
        with self._lock:
            if self.pipe is None:
                self.pipe = self._load_pipeline(weights)
                self.base_loads += 1
                self.controlnet_loads += 1
                self.adapter_loads += 1
                self._remember(weights.controlnet, self.pipe.controlnet)
            elif self.current is None or weights.key != self.current.key:
                if weights.controlnet != self.current.controlnet:
                    net = self._nets.get(weights.controlnet)
                    if net is None:
                        net = self._load_controlnet(weights.controlnet)
                        self.controlnet_loads += 1
                    self._remember(weights.controlnet, net)
                    self.pipe.controlnet = net
                # Also after an IdentityNet-only change: it sets the new IdentityNet's attention processors.
                self.pipe.load_ip_adapter_instantid(weights.face_adapter)
                self.adapter_loads += 1
                self.swaps += 1
            self.current = weights
            return self.pipe

    def _remember(self, path: str, net) -> None:
        self._nets[path] = net
        self._nets.move_to_end(path)
        while len(self._nets) > self.max_controlnets:
            self._nets.popitem(last=False)
