"""The memory format every op of the package gives its outputs: a channels_last input's layout
(downstream convolutions and pooling are faster in it), contiguous otherwise."""
import torch


def output_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
