#pragma once

// Shared by the state-dict file tests: temporary files, and the values a module holds.
#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>

namespace torchmha::testing {

// A path in the temporary folder, unique to this process, removed (with whatever it names) at
// the end of the test.
class TempFile {
 public:
  explicit TempFile(const std::string& name)
      : path_(std::filesystem::temp_directory_path() /
              ("torchmha_" + std::to_string(getpid()) + "_" + name)) {}
  ~TempFile() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  std::string path() const { return path_.string(); }
  std::string read() const {
    std::ifstream stream(path_, std::ios::binary);
    return {std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
  }
  void write(const std::string& bytes) const {
    std::ofstream(path_, std::ios::binary | std::ios::trunc) << bytes;
  }

 private:
  std::filesystem::path path_;
};

inline std::map<std::string, torch::Tensor> snapshot(const torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> values;
  for (const auto& item : module.named_parameters()) {
    values[item.key()] = item.value().detach().clone();
  }
  return values;
}

inline bool has_values(const torch::nn::Module& module,
                       const std::map<std::string, torch::Tensor>& want) {
  const auto parameters = module.named_parameters();
  if (parameters.size() != want.size()) {
    return false;
  }
  for (const auto& item : parameters) {
    const auto found = want.find(item.key());
    if (found == want.end() || !torch::equal(item.value(), found->second)) {
      return false;
    }
  }
  return true;
}

}  // namespace torchmha::testing
