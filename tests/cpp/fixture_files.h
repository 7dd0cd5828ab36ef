// Files that a fixture script wrote in Python for the C++ tests: the folder ctest names in an
// environment variable, and the dict of tensors each script saves as `expected.pt`.
#pragma once

#include <torch/script.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace torchmha::testing {

// The folder named by `variable`, which ctest sets for the tests that read it.
inline std::filesystem::path fixture_folder(const char* variable) {
  const char* folder = std::getenv(variable);
  if (folder == nullptr) {
    throw std::runtime_error(std::string(variable) + " is not set; run these tests through ctest");
  }
  return folder;
}

// A plain dict saved by torch.save in Python.
inline c10::Dict<c10::IValue, c10::IValue> load_pickled_dict(const std::filesystem::path& path) {
  std::ifstream stream(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(stream)),
                                std::istreambuf_iterator<char>());
  return torch::jit::pickle_load(bytes).toGenericDict();
}

}  // namespace torchmha::testing
