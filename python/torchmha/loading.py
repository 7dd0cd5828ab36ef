"""``load_state_dict`` that loads every tensor or, on error, leaves the module as it was."""

from typing import Any, Mapping

import torch
from torch import nn


class AllOrNothingLoading(nn.Module):
    """``nn.Module.load_state_dict`` raises on a missing, extra or misshapen key only after
    copying the keys that did fit; modules with this base restore their tensors before raising.
    """

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        if assign:
            # Assigning replaces the tensors themselves; restoring values would write into the
            # caller's tensors, so this mode keeps nn.Module's behaviour.
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        saved = {name: tensor.detach().clone() for name, tensor in self.state_dict().items()}
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except Exception:
            current = self.state_dict(keep_vars=True)
            with torch.no_grad():
                for name, tensor in saved.items():
                    current[name].copy_(tensor)
            raise
