// State dicts in torch.save()'s file format, so weights move between C++ and Python unchanged.
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torchmha/serialize.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <map>
#include <vector>

namespace torchmha {
namespace {

std::vector<std::pair<std::string, at::Tensor>> named_tensors(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& item : module.named_parameters()) {
    tensors.emplace_back(item.key(), item.value());
  }
  for (const auto& item : module.named_buffers()) {
    tensors.emplace_back(item.key(), item.value());
  }
  return tensors;
}

}  // namespace

void save_state_dict(const torch::nn::Module& module, const std::string& path) {
  c10::Dict<std::string, at::Tensor> state_dict;
  for (const auto& [name, tensor] : named_tensors(module)) {
    // A compact CPU copy without autograd history, as state_dict() gives in Python.
    state_dict.insert(name, tensor.detach().to(at::kCPU).clone());
  }
  std::vector<char> pickled;
  // Untagged containers and literal tensors: exactly what torch.load(weights_only=True) accepts.
  torch::jit::Pickler pickler(
      [&](const char* data, size_t size) { pickled.insert(pickled.end(), data, data + size); },
      /*tensor_table=*/nullptr, /*type_renamer=*/nullptr,
      /*memoized_class_types=*/nullptr, /*get_tensor_id=*/nullptr,
      /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(state_dict);
  pickler.stop();

  caffe2::serialize::PyTorchStreamWriter writer(path);
  writer.writeRecord("byteorder", "little", 6);
  const auto& tensors = pickler.tensorData();
  for (size_t index = 0; index < tensors.size(); ++index) {
    const auto data = torch::jit::getWriteableTensorData(tensors[index]);
    writer.writeRecord("data/" + std::to_string(index), data.data(), data.sizeInBytes());
  }
  writer.writeRecord("data.pkl", pickled.data(), pickled.size());
  writer.writeEndOfFile();
}

void load_state_dict(torch::nn::Module& module, const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  TORCH_CHECK(stream, "torchmha::load_state_dict: cannot open ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(stream)),
                                std::istreambuf_iterator<char>());
  c10::IValue loaded;
  try {
    loaded = torch::jit::pickle_load(bytes);
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, "torchmha::load_state_dict: cannot read ", path,
                " as a torch.save() file of a plain dict of name -> tensor. From Python, save it "
                "with torchmha.save_state_dict(module, path) (LibTorch cannot read the "
                "OrderedDict that state_dict() returns). Reason: ",
                error.what_without_backtrace());
  }
  TORCH_CHECK(loaded.isGenericDict(), "torchmha::load_state_dict: ", path,
              " does not hold a dict of name -> tensor (a state dict), but a ",
              loaded.type()->str());
  std::map<std::string, at::Tensor> state_dict;
  for (const auto& item : loaded.toGenericDict()) {
    TORCH_CHECK(item.key().isString() && item.value().isTensor(),
                "torchmha::load_state_dict: ", path, " holds an entry that is not name -> tensor");
    state_dict.emplace(item.key().toStringRef(), item.value().toTensor());
  }
  // Check everything first, so a bad file leaves the module as it was.
  const auto targets = named_tensors(module);
  for (const auto& [name, target] : targets) {
    const auto found = state_dict.find(name);
    TORCH_CHECK(found != state_dict.end(), "torchmha::load_state_dict: ", path, " lacks the key \"",
                name, "\"");
    TORCH_CHECK(found->second.sizes() == target.sizes(), "torchmha::load_state_dict: \"", name,
                "\" has shape ", found->second.sizes(), " in ", path, ", but the module's is ",
                target.sizes());
  }
  for (const auto& [name, tensor] : state_dict) {
    const bool known =
        std::any_of(targets.begin(), targets.end(),
                    [&name = name](const auto& target) { return target.first == name; });
    TORCH_CHECK(known, "torchmha::load_state_dict: ", path, " has the unexpected key \"", name,
                "\"");
  }
  torch::NoGradGuard no_grad;
  for (const auto& [name, target] : targets) {
    const_cast<at::Tensor&>(target).copy_(state_dict.at(name));
  }
}

}  // namespace torchmha
