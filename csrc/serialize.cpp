// State dicts in torch.save()'s file format, so weights move between C++ and Python unchanged.
// First: caffe2/serialize/in_memory_adapter.h uses off_t without including its header.
#include <sys/types.h>

#include <caffe2/serialize/in_memory_adapter.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torchmha/serialize.h>

#include <algorithm>
#include <array>
#include <cstdint>
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

// CRC-32 (IEEE 802.3, as in zip archives), one table lookup per byte.
uint32_t crc32(const char* data, size_t size) {
  static const auto table = [] {
    std::array<uint32_t, 256> entries{};
    for (uint32_t index = 0; index < 256; ++index) {
      uint32_t value = index;
      for (int bit = 0; bit < 8; ++bit) {
        value = (value & 1) ? 0xEDB88320u ^ (value >> 1) : value >> 1;
      }
      entries[index] = value;
    }
    return entries;
  }();
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t index = 0; index < size; ++index) {
    crc = table[(crc ^ static_cast<uint8_t>(data[index])) & 0xFFu] ^ (crc >> 8);
  }
  return crc ^ 0xFFFFFFFFu;
}

// Messages that quote a corrupted file keep ASCII only: Python cannot decode other bytes.
std::string printable(const std::string& text) {
  std::string result = text;
  for (auto& character : result) {
    const bool ascii = character == '\n' || (character >= 0x20 && character < 0x7F);
    character = ascii ? character : '?';
  }
  return result;
}

void check_within(const std::vector<char>& bytes, size_t offset, size_t width,
                  const std::string& name) {
  TORCH_CHECK(offset <= bytes.size() && width <= bytes.size() - offset, "the zip entry of ", name,
              " runs past the end");
}

// A little-endian field of 2 or 4 bytes of a zip header.
uint32_t read_le(const std::vector<char>& bytes, size_t offset, size_t width,
                 const std::string& name) {
  check_within(bytes, offset, width, name);
  uint32_t value = 0;
  for (size_t index = 0; index < width; ++index) {
    value |= static_cast<uint32_t>(static_cast<uint8_t>(bytes[offset + index])) << (8 * index);
  }
  return value;
}

// LibTorch's reader (like torch.load) ignores the CRC-32 that torch.save writes for each record,
// so a flipped byte in a tensor would load as a wrong weight; check every stored record here.
void verify_record_checksums(const std::vector<char>& bytes) {
  constexpr uint32_t kDataDescriptorSignature = 0x08074b50;
  caffe2::serialize::PyTorchStreamReader reader(
      std::make_shared<caffe2::serialize::MemoryReadAdapter>(bytes.data(), bytes.size()));
  for (const auto& name : reader.getAllRecords()) {
    const size_t header = reader.getRecordHeaderOffset(name);
    const uint32_t flags = read_le(bytes, header + 6, 2, name);
    const uint32_t method = read_le(bytes, header + 8, 2, name);
    const size_t name_length = read_le(bytes, header + 26, 2, name);
    check_within(bytes, header + 30, name_length, name);
    const std::string stored_name(bytes.data() + header + 30, name_length);
    // A corrupted directory could point one record at another's data.
    TORCH_CHECK(stored_name.size() > name.size() &&
                    stored_name.compare(stored_name.size() - name.size() - 1, std::string::npos,
                                        "/" + name) == 0,
                "the zip entry of ", name, " holds another name");
    if (method != 0) {
      continue;  // Compressed records are checked by the zip reader itself; torch.save stores.
    }
    const size_t offset = reader.getRecordOffset(name);
    const size_t size = reader.getRecordSize(name);
    TORCH_CHECK(offset <= bytes.size() && size <= bytes.size() - offset, "the record ", name,
                " runs past the end");
    // torch.save puts the CRC in a data descriptor after the data (general purpose flag bit 3).
    size_t crc_offset = header + 14;
    if (flags & 0x8u) {
      crc_offset = offset + size;
      if (read_le(bytes, crc_offset, 4, name) == kDataDescriptorSignature) {
        crc_offset += 4;
      }
    }
    const uint32_t stored = read_le(bytes, crc_offset, 4, name);
    if (stored == 0) {
      continue;  // Written without checksums (torch.serialization.set_crc32_options(False)).
    }
    // Check what the reader returns, not the bytes in the file: for an entry whose directory
    // flag or compressed size is corrupted, the reader returns an unfilled buffer.
    const auto [data, data_size] = reader.getRecord(name);
    TORCH_CHECK(data_size == size && stored == crc32(static_cast<const char*>(data.get()), size),
                "the record ", name, " fails its CRC-32 check (the file is corrupted)");
  }
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
  try {
    verify_record_checksums(bytes);
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, "torchmha::load_state_dict: ", path,
                " is not an intact torch.save() zip archive (truncated, corrupted, or saved "
                "with _use_new_zipfile_serialization=False): ",
                printable(error.what_without_backtrace()));
  }
  c10::IValue loaded;
  try {
    loaded = torch::jit::pickle_load(bytes);
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, "torchmha::load_state_dict: cannot read ", path,
                " as a torch.save() file of a plain dict of name -> tensor. From Python, save it "
                "with torchmha.save_state_dict(module, path) (LibTorch cannot read the "
                "OrderedDict that state_dict() returns). Reason: ",
                printable(error.what_without_backtrace()));
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
    TORCH_CHECK(known, "torchmha::load_state_dict: ", path, " has the unexpected key \"",
                printable(name), "\"");
  }
  // Convert before copying: a conversion that throws must not leave the module half loaded.
  std::vector<at::Tensor> converted;
  for (const auto& [name, target] : targets) {
    converted.push_back(state_dict.at(name).to(target.device(), target.scalar_type()));
  }
  torch::NoGradGuard no_grad;
  for (size_t index = 0; index < targets.size(); ++index) {
    const_cast<at::Tensor&>(targets[index].second).copy_(converted[index]);
  }
}

}  // namespace torchmha
