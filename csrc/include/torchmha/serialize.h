#pragma once

#include <torch/nn/module.h>
#include <torchmha/export.h>

#include <cstdint>
#include <string>

namespace torchmha {

/// Saves every parameter and buffer of `module` under its state-dict name (`in_proj_weight`,
/// `out_proj.weight`, ...) in the file format of Python's `torch.save(state_dict, path)`: a zip
/// archive holding a pickled `dict` of name -> CPU tensor. Python reads it with
/// `module.load_state_dict(torch.load(path))`, for torchmha and `torch.nn` modules alike.
TORCHMHA_API void save_state_dict(const torch::nn::Module& module, const std::string& path);

/// The largest file `load_state_dict` reads (64 GiB), far above any attention module's state
/// dict: a larger file is refused before a byte of it is read.
inline constexpr std::uintmax_t kMaxStateDictFileBytes = std::uintmax_t{1} << 36;

/// Loads a file written by Python's `torch.save(dict(module.state_dict()), path)` or by
/// `save_state_dict` into `module`, converting to each parameter's dtype and device. Every
/// parameter and buffer must be present with its exact shape and no other key may be: otherwise
/// c10::Error names the key and the file, and `module` is left unchanged.
///
/// The file is checked before any tensor is read: it must be a regular file of at most
/// kMaxStateDictFileBytes; a zip archive whose records are all stored (torch.save never
/// compresses) with the CRC-32 that torch.save writes; a pickled plain dict of name -> dense,
/// non-quantized tensor; and every tensor's storage exactly the size of its record, its view
/// (storage offset, sizes, strides) within that storage.
TORCHMHA_API void load_state_dict(torch::nn::Module& module, const std::string& path);

}  // namespace torchmha
