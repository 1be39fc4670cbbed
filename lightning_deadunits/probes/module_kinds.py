"""The one table of module kinds every probe and action classifies modules by.

Each kind is a tuple of classes for ``isinstance`` (subclasses count). Private base classes (``_ConvNd``,
``_BatchNorm``, ``_MaxPoolNd``...) stand for every dimensionality of their family.
"""

from torch import nn

__all__ = [
    "ATTENTION_TYPES",
    "BATCHNORM_TYPES",
    "CHANNELS_LAST_TYPES",
    "DEFAULT_ACTIVATION_TYPES",
    "DEFAULT_KERNEL_TYPES",
    "ELEMENTWISE_TYPES",
    "EMBEDDING_TYPES",
    "FUNCTIONAL_ACTIVATIONS",
    "NORMALIZATION_TYPES",
    "NORM_UNIT_ENTRIES",
    "POOLING_TYPES",
    "PRE_ACTIVATION_TYPES",
    "RECURRENT_TYPES",
    "unit_count",
]

DEFAULT_ACTIVATION_TYPES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardsigmoid,
    nn.Hardtanh,
)
"""Activation modules: what the activation monitor watches by default."""

FUNCTIONAL_ACTIVATIONS: dict[str, type[nn.Module]] = {
    **{name: nn.ReLU for name in ("relu", "relu_")},
    "relu6": nn.ReLU6,
    **{name: nn.LeakyReLU for name in ("leaky_relu", "leaky_relu_")},
    "prelu": nn.PReLU,
    **{name: nn.RReLU for name in ("rrelu", "rrelu_")},
    **{name: nn.ELU for name in ("elu", "elu_")},
    **{name: nn.CELU for name in ("celu", "celu_")},
    **{name: nn.SELU for name in ("selu", "selu_")},
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "softplus": nn.Softplus,
    **{name: nn.Sigmoid for name in ("sigmoid", "sigmoid_")},
    **{name: nn.Tanh for name in ("tanh", "tanh_")},
    "hardsigmoid": nn.Hardsigmoid,
    **{name: nn.Hardtanh for name in ("hardtanh", "hardtanh_")},
}
"""Activation functions by ``__name__`` (``F.relu``, ``torch.relu``, ``Tensor.relu_``...), each with the module
type that applies it: its kind (tolerance, sign) is that module's. The site name drops a trailing ``_``."""

POOLING_TYPES: tuple[type, ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._LPPoolNd,
)
"""Spatial pooling: keeps the channels (dim 1) of its input and shrinks the space after them."""

DEFAULT_KERNEL_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear)
"""Kernel layers (convolutions, incl. transposed, and linear layers): what has per-filter norms and units."""

ATTENTION_TYPES: tuple[type, ...] = (nn.MultiheadAttention,)
"""Attention layers whose query/key/value projections are packed weights, not ``nn.Linear`` modules."""

RECURRENT_TYPES: tuple[type, ...] = (nn.LSTM, nn.GRU, nn.RNN)
"""Recurrent layers whose gates are row blocks of packed weights."""

EMBEDDING_TYPES: tuple[type, ...] = (nn.Embedding,)
"""Lookup tables: one row per token, read, not computed; dead rows are dead tokens, not dead filters."""

BATCHNORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)
"""BatchNorm of any dimensionality (not InstanceNorm, which shares its base ``_NormBase``)."""

NORMALIZATION_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
"""Normalisation layers: batch and instance norms (``_NormBase``), group norm and layer norm."""

PRE_ACTIVATION_TYPES: tuple[type, ...] = (*DEFAULT_KERNEL_TYPES, *BATCHNORM_TYPES)
"""What the activation monitor watches in ``watch="pre_activations"`` mode: kernel layers and BatchNorms."""

ELEMENTWISE_TYPES: tuple[type, ...] = (
    *NORMALIZATION_TYPES,
    *DEFAULT_ACTIVATION_TYPES,
    nn.Softplus,
    nn.Threshold,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
)
"""Modules whose output has the shape of their input, each channel computed from the same channel only."""

CHANNELS_LAST_TYPES: tuple[type, ...] = (nn.Linear, nn.LayerNorm, nn.Embedding)
"""Modules whose output carries its features on the last dim (``(N, *, F)``), not dim 1."""

NORM_UNIT_ENTRIES: dict[str, float] = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
"""A normalisation layer's per-channel parameters and statistics, with the value each starts from."""


def unit_count(module: nn.Module) -> int:
    """Output filters (convolution) or output features (linear) of a kernel layer.

    Example:
        >>> unit_count(nn.Conv2d(3, 8, 3)), unit_count(nn.ConvTranspose2d(8, 4, 3)), unit_count(nn.Linear(8, 2))
        (8, 4, 2)
    """
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(module.out_channels)  # type: ignore[arg-type]
