"""State dict files that LibTorch programs read with ``torchmha::load_state_dict``."""

import os
from typing import Union

import torch
from torch import nn


def save_state_dict(module: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Saves ``module.state_dict()`` as a plain ``dict`` with ``torch.save``.

    LibTorch's unpickler cannot read the ``OrderedDict`` that ``state_dict()`` returns, so the
    file holds a plain dict of name -> tensor; C++ loads it with
    ``torchmha::load_state_dict(module, path)``, Python with
    ``module.load_state_dict(torch.load(path))``.
    """
    torch.save(dict(module.state_dict()), path)
