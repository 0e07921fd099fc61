"""IP-Adapter parts of InstantID: the Resampler that turns a 512-d face embedding into tokens, the attention
processors that add face key/value projections to the UNet's cross-attention, and weight I/O in the official
``ip-adapter.bin`` layout."""

from ip_adapter.attention_processor import AttnProcessor, IPAttnProcessor
from ip_adapter.resampler import Resampler, resampler_kwargs_from_state

__all__ = ["AttnProcessor", "IPAttnProcessor", "Resampler", "resampler_kwargs_from_state"]
