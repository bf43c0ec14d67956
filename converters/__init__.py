"""Converters from other frameworks' checkpoints to pleas-jax models (needs the ``torch`` extra)."""

from converters.torch_to_flax import (
    ConversionError,
    Converted,
    TorchResNet,
    Verification,
    check_state_dict,
    convert_file,
    flax_to_state_dict,
    infer_module,
    load_state_dict,
    num_batches_tracked,
    randomize_batch_norm,
    sha256_file,
    state_dict_to_flax,
    torch_model,
    torch_shapes,
    verify,
)

__all__ = [
    "ConversionError",
    "Converted",
    "TorchResNet",
    "Verification",
    "check_state_dict",
    "convert_file",
    "flax_to_state_dict",
    "infer_module",
    "load_state_dict",
    "num_batches_tracked",
    "randomize_batch_norm",
    "sha256_file",
    "state_dict_to_flax",
    "torch_model",
    "torch_shapes",
    "verify",
]
