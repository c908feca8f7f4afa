"""Replay a U-Net's forward as one CUDA graph per input shape.

At batch 1 a Stable Diffusion U-Net step is about a thousand small kernels, and the CPU issues them more slowly
than an H100 runs them; a captured graph launches them all at once. torch.compile's own CUDA graphs (Inductor's
cudagraph trees) cannot be used with regional compilation: blocks of one shape share their compiled code, and a
block's second call in a forward overwrites its first call's output while a skip connection still holds it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    output: torch.Tensor


@dataclass
class GraphedForward:
    """A replacement for a diffusers U-Net's `forward(sample, timestep, encoder_hidden_states)`."""

    forward: object  # the module's own bound forward
    output_class: type
    graphs: dict[tuple, _Captured] = field(default_factory=dict)
    # One memory pool for every captured shape. A replay may overwrite another graph's static output, which is
    # safe: each output is copied out right after its own replay, and the graphs never run concurrently.
    pool: tuple | None = None

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 return_dict: bool = True, **kwargs):
        inputs = (sample, timestep, encoder_hidden_states)
        if not self.replayable(inputs, kwargs):
            return self.forward(sample, timestep, encoder_hidden_states, return_dict=return_dict, **kwargs)
        key = tuple((t.shape, t.dtype) for t in inputs) + (torch.is_inference_mode_enabled(),)
        captured = self.graphs.get(key) or self._capture(key, inputs)
        for static, given in zip(captured.inputs, inputs):
            static.copy_(given)
        captured.graph.replay()
        output = captured.output.clone()  # the next replay overwrites the static output
        return self.output_class(sample=output) if return_dict else (output,)

    @staticmethod
    def replayable(inputs: tuple, kwargs: dict) -> bool:
        """A replay has no autograd history and reads only what was on the device when captured: so only
        gradient-free calls on CUDA tensors, with no extra conditioning, are replayed."""
        return (not torch.is_grad_enabled() and not any(value is not None for value in kwargs.values())
                and all(torch.is_tensor(t) and t.is_cuda for t in inputs))

    def _capture(self, key: tuple, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        static = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: cuDNN and compiled kernels pick their plans here
            for _ in range(2):
                self.forward(*static, return_dict=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.forward(*static, return_dict=False)[0]
        self.pool = graph.pool()
        self.graphs[key] = _Captured(graph, static, output)
        return self.graphs[key]


def replay_as_cuda_graphs(unet: torch.nn.Module, forward=None) -> None:
    """Make `unet` (a diffusers UNet2DConditionModel on a CUDA device) replay captured graphs of `forward` (its
    own forward, or a compiled one), in place."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    unet.forward = GraphedForward(forward or unet.forward, UNet2DConditionOutput)
