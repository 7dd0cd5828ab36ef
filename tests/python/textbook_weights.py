"""The chapter's parameter names <-> ``torch.nn.MultiheadAttention``'s, for tests and the benchmark.

``linear_layers.0/1/2`` are the row blocks (query, key, value) of ``in_proj_weight`` and
``in_proj_bias``; ``output_linear`` is ``out_proj``.
"""

from typing import Dict

import torch
from torch import Tensor


def textbook_to_pytorch(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The chapter's names -> ``nn.MultiheadAttention``'s packed parameters."""
    return {
        "in_proj_weight": torch.cat([state[f"linear_layers.{i}.weight"] for i in range(3)]),
        "in_proj_bias": torch.cat([state[f"linear_layers.{i}.bias"] for i in range(3)]),
        "out_proj.weight": state["output_linear.weight"],
        "out_proj.bias": state["output_linear.bias"],
    }


def pytorch_to_textbook(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``nn.MultiheadAttention``'s packed parameters -> the chapter's names."""
    weights = state["in_proj_weight"].chunk(3)
    biases = state["in_proj_bias"].chunk(3)
    converted = {f"linear_layers.{i}.weight": weights[i] for i in range(3)}
    converted.update({f"linear_layers.{i}.bias": biases[i] for i in range(3)})
    converted["output_linear.weight"] = state["out_proj.weight"]
    converted["output_linear.bias"] = state["out_proj.bias"]
    return converted
