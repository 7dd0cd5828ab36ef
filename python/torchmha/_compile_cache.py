"""Keeps ``torch.compile``'s on-disk caches from serving graphs of another build of the op.

AOTAutograd's cache keys a graph on what Dynamo captured, where the op is just its name
(``torchmha.multi_head_attention``); the ATen ops it decomposes into are not part of the key. A
rebuilt or upgraded torchmha would then get the decomposition of the build that compiled first.
Adding the extension's identity to ``torch.compiler.config.cache_key_tag`` keys every cached
graph on the build that made it.
"""

import os

import torch


def extension_identity(path: str) -> str:
    """The extension file's size and modification time: new for every build or install."""
    status = os.stat(path)
    return f"torchmha:{status.st_size}:{status.st_mtime_ns}"


def tag_compile_caches(extension_path: str) -> None:
    """Appends this build's identity to the cache key tag (once; kept beside the user's own)."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return  # a PyTorch whose caches take no tag
    identity = extension_identity(extension_path)
    if identity not in config.cache_key_tag:
        config.cache_key_tag = " ".join(filter(None, (config.cache_key_tag, identity)))
