"""metapool_kernels: fused kernels for Meta-Pooling (learnable receptive fields for lightweight CNNs)."""
from . import export, ops  # export: the ops' decompositions for torch.onnx / torch.export
from .insert import EnhancedBlock, find_blocks, fixed_layer, insert_enhancers
from .modules import BACKENDS, FusedMetaPooling
from .reference import PAPER_CANDIDATES, MetaPooling

__version__ = "0.1.0"
__all__ = ["BACKENDS", "PAPER_CANDIDATES", "EnhancedBlock", "FusedMetaPooling", "MetaPooling", "export", "find_blocks",
           "fixed_layer", "insert_enhancers", "ops", "__version__"]
