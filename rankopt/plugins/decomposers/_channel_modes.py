"""The base of the decomposers whose ranks follow a conv kernel's two channel modes
(Tucker-2 and CP): the same rank matrices, the same data-aware whitening of them, and
the same bias set-up of the built module."""

from __future__ import annotations

import torch
import torch.nn as nn

from rankopt.compression.calibration import channel_whitened_matrices, correct_bias
from rankopt.contract.decomposer import Decomposer, Options
from rankopt.plugins.decomposers._layers import copy_bias, input_output_unfoldings

__all__ = ["ChannelModesDecomposer"]


class ChannelModesDecomposer(Decomposer):
    """A conv decomposer ranked by the input- and output-channel unfoldings of the kernel."""

    def rank_matrices(self, weight: torch.Tensor, options: Options = None) -> list[torch.Tensor]:
        """[mode-1 unfolding (S x T*kh*kw: input channels), mode-0 unfolding (T x S*kh*kw:
        output channels)]."""
        return input_output_unfoldings(weight)

    def module_rank_matrices(self, module: nn.Module, options: Options = None) -> list[torch.Tensor]:
        """The unfoldings of ``W x_1 L^T`` when the layer carries input statistics."""
        return channel_whitened_matrices(module, self.rank_matrices, options) or super().module_rank_matrices(
            module, options)

    @staticmethod
    def set_output_bias(built: nn.Module, module: nn.Module) -> None:
        """The original bias on ``built.pointwise_out``, corrected for the input mean the
        approximation now maps differently (when the layer carries input statistics)."""
        copy_bias(built.pointwise_out, module)
        correct_bias(built.pointwise_out.bias, module, built.reconstruct_weight(), "channel")
