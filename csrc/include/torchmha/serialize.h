#pragma once

#include <torch/nn/module.h>
#include <torchmha/export.h>

#include <string>

namespace torchmha {

/// Saves every parameter and buffer of `module` under its state-dict name (`in_proj_weight`,
/// `out_proj.weight`, ...) in the file format of Python's `torch.save(state_dict, path)`: a zip
/// archive holding a pickled `dict` of name -> CPU tensor. Python reads it with
/// `module.load_state_dict(torch.load(path))`, for torchmha and `torch.nn` modules alike.
TORCHMHA_API void save_state_dict(const torch::nn::Module& module, const std::string& path);

/// Loads a file written by Python's `torch.save(module.state_dict(), path)` or by
/// `save_state_dict` into `module`, converting to each parameter's dtype and device. Every
/// parameter and buffer must be present with its exact shape and no other key may be: otherwise
/// c10::Error names the key, and `module` is left unchanged.
TORCHMHA_API void load_state_dict(torch::nn::Module& module, const std::string& path);

}  // namespace torchmha
