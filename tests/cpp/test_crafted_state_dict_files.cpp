// torchmha::load_state_dict on files made to break it, each written here by the test: pickles
// that declare more data than their records hold or views past their storages (with every CRC-32
// right), compressed records, paths that are not regular files, quantized tensors, OrderedDicts.
// Each is a c10::Error that names the file (and the key), and the module keeps every weight.
#include <caffe2/serialize/inline_container.h>
#include <sys/stat.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torchmha/torchmha.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "state_dict_files.h"
#include "test_helpers.h"

namespace {

using torchmha::testing::expect_error_containing;
using torchmha::testing::has_values;
using torchmha::testing::snapshot;
using torchmha::testing::TempFile;
using namespace std::string_literals;

// The module's tensors as save_state_dict pickles them: detached CPU copies.
c10::impl::GenericDict state_of(const torch::nn::Module& module) {
  c10::impl::GenericDict state(c10::StringType::get(), c10::AnyType::get());
  for (const auto& item : module.named_parameters()) {
    state.insert(item.key(), item.value().detach().clone());
  }
  return state;
}

// A zip archive in torch.save()'s layout holding `pickle` as data.pkl and `records` as data/0,
// data/1, ...; PyTorchStreamWriter writes every CRC-32 right.
void write_archive(const std::string& path, const std::string& pickle,
                   const std::vector<std::string>& records, bool compress = false) {
  caffe2::serialize::PyTorchStreamWriter writer(path);
  writer.writeRecord("byteorder", "little", 6, compress);
  for (size_t index = 0; index < records.size(); ++index) {
    writer.writeRecord("data/" + std::to_string(index), records[index].data(),
                       records[index].size(), compress);
  }
  writer.writeRecord("data.pkl", pickle.data(), pickle.size(), compress);
  writer.writeEndOfFile();
}

// Writes `state` as save_state_dict does, except that a storage without data (see
// `declared_tensor`) gets a record of `short_record` instead of its own bytes.
void write_state(const std::string& path, const c10::impl::GenericDict& state,
                 const std::string& short_record = "", bool compress = false) {
  std::string pickle;
  torch::jit::Pickler pickler([&](const char* data, size_t size) { pickle.append(data, size); },
                              /*tensor_table=*/nullptr, /*type_renamer=*/nullptr,
                              /*memoized_class_types=*/nullptr,
                              /*get_tensor_id=*/nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(state);
  pickler.stop();
  std::vector<std::string> records;
  for (const auto& tensor : pickler.tensorData()) {
    if (tensor.storage().data() == nullptr) {
      records.push_back(short_record);
      continue;
    }
    const auto data = torch::jit::getWriteableTensorData(tensor);
    records.emplace_back(static_cast<const char*>(data.data()), data.sizeInBytes());
  }
  write_archive(path, pickle, records, compress);
}

// A float tensor with the given view of a storage that declares `storage_numel` elements and has
// no data: the pickler writes only its metadata, and write_state writes its record.
at::Tensor declared_tensor(int64_t storage_numel, int64_t offset, at::IntArrayRef sizes,
                           at::IntArrayRef strides) {
  c10::Storage storage(c10::Storage::use_byte_size_t(),
                       storage_numel * static_cast<int64_t>(sizeof(float)),
                       at::DataPtr(nullptr, at::kCPU), /*allocator=*/nullptr, /*resizable=*/false);
  auto tensor = at::empty({0}, at::kFloat);
  auto* impl = tensor.unsafeGetTensorImpl();
  impl->set_storage_keep_dtype(storage);
  impl->set_storage_offset(offset);
  impl->set_sizes_and_strides(sizes, strides);
  return tensor;
}

// A module to load into and the weights it holds before.
struct Target {
  TempFile file{"crafted.pt"};
  torchmha::MultiHeadAttention module{8, 2};
  std::map<std::string, torch::Tensor> before = snapshot(*module);
  void expect_refused(const std::vector<std::string>& parts) {
    auto all_parts = parts;
    all_parts.push_back(file.path());
    expect_error_containing([&] { torchmha::load_state_dict(*module, file.path()); }, all_parts);
    EXPECT_TRUE(has_values(*module, before));
  }
};

// The control for every crafted file below: write_state's file of a real state dict loads.
TEST(CraftedStateDictFiles, WriterOfTheseTestsMakesLoadableFiles) {
  Target target;
  torchmha::MultiHeadAttention source(8, 2);
  write_state(target.file.path(), state_of(*source));
  torchmha::load_state_dict(*target.module, target.file.path());
  EXPECT_TRUE(has_values(*target.module, snapshot(*source)));
}

// LibTorch's own torch.save()-compatible writer tags the dict's type (restore_type_tag).
TEST(CraftedStateDictFiles, FileOfTorchPickleSaveLoads) {
  Target target;
  torchmha::MultiHeadAttention source(8, 2);
  c10::Dict<std::string, at::Tensor> state;
  for (const auto& item : source->named_parameters()) {
    state.insert(item.key(), item.value().detach().clone());
  }
  const auto bytes = torch::pickle_save(state);
  target.file.write(std::string(bytes.begin(), bytes.end()));
  torchmha::load_state_dict(*target.module, target.file.path());
  EXPECT_TRUE(has_values(*target.module, snapshot(*source)));
}

// `out_proj.weight` (8 x 8) as a view of a storage that the pickle declares with
// `storage_numel` floats while its record holds `record_numel`.
struct MisfitTensor {
  const char* name;
  int64_t storage_numel, record_numel, offset;
  std::vector<int64_t> strides;
};

void PrintTo(const MisfitTensor& misfit, std::ostream* stream) { *stream << misfit.name; }

class MisfitTensors : public ::testing::TestWithParam<MisfitTensor> {};

// The bug this guards against: LibTorch's unpickler sizes each storage by the pickle's count,
// whatever its record holds, and nothing checked a view against its storage: small overruns
// loaded garbage silently, far ones (as a large declared tensor makes) died with SIGSEGV.
TEST_P(MisfitTensors, AreRefusedBeforeAnythingIsRead) {
  const auto& misfit = GetParam();
  Target target;
  auto state = state_of(*target.module);
  state.insert_or_assign("out_proj.weight", declared_tensor(misfit.storage_numel, misfit.offset,
                                                            {8, 8}, misfit.strides));
  write_state(target.file.path(), state, std::string(misfit.record_numel * sizeof(float), '\1'));
  target.expect_refused({"\"out_proj.weight\"", "the file is corrupted or crafted"});
}

constexpr int64_t kFar = int64_t{1} << 40;
INSTANTIATE_TEST_SUITE_P(
    CraftedStateDictFiles, MisfitTensors,
    ::testing::Values(MisfitTensor{"storage_one_element_past_record", 65, 64, 0, {8, 1}},
                      MisfitTensor{"storage_far_past_record", kFar, 64, kFar / 2, {8, 1}},
                      MisfitTensor{"empty_record", 64, 0, 0, {8, 1}},
                      MisfitTensor{"offset_past_storage", 64, 64, 57, {8, 1}},
                      MisfitTensor{"stride_past_storage", 64, 64, 0, {16, 1}},
                      MisfitTensor{"span_overflows", 64, 64, 0, {int64_t{1} << 61, 1}}),
    [](const auto& info) { return std::string(info.param.name); });

// torch.save never compresses; LibTorch's reader inflates without checking the CRC-32, so a
// flipped bit in a re-zipped file loaded as a wrong weight.
TEST(CraftedStateDictFiles, CompressedRecordsAreRefused) {
  Target target;
  torchmha::MultiHeadAttention source(8, 2);
  write_state(target.file.path(), state_of(*source), "", /*compress=*/true);
  target.expect_refused({"is compressed", "torch.save() never compresses"});
  auto bytes = target.file.read();
  caffe2::serialize::PyTorchStreamReader reader(target.file.path());
  bytes[reader.getRecordOffset("data/0") + 3] ^= 0x10;
  target.file.write(bytes);
  target.expect_refused({"is compressed"});
}

TEST(CraftedStateDictFiles, DirectoryIsRefusedAtOnce) {
  Target target;
  std::filesystem::create_directory(target.file.path());
  target.expect_refused({"is a directory, not a regular file"});
}

// Opening a pipe with no writer would block forever: it must be refused before it is opened.
TEST(CraftedStateDictFiles, NamedPipeIsRefusedUnopened) {
  Target target;
  ASSERT_EQ(mkfifo(target.file.path().c_str(), 0600), 0);
  target.expect_refused({"is a named pipe, not a regular file"});
}

// Reading /dev/zero never ends: it used to run until std::bad_alloc.
TEST(CraftedStateDictFiles, DeviceIsRefusedUnread) {
  torchmha::MultiHeadAttention module(8, 2);
  const auto before = snapshot(*module);
  expect_error_containing([&] { torchmha::load_state_dict(*module, "/dev/zero"); },
                          {"/dev/zero is a character device, not a regular file"});
  EXPECT_TRUE(has_values(*module, before));
}

// A sparse file just over the limit: refused by its size, none of it read.
TEST(CraftedStateDictFiles, FileOverTheSizeLimitIsRefusedUnread) {
  Target target;
  target.file.write("");
  std::filesystem::resize_file(target.file.path(), torchmha::kMaxStateDictFileBytes + 1);
  target.expect_refused({"(64 GiB) that a state dict file may have"});
}

// A state dict pickled by Python's torch.save(module.state_dict()): an OrderedDict ({"a": 1}).
const std::string kOrderedDictPickle =
    "\x80\x02"
    "ccollections\nOrderedDict\nq\x00)Rq\x01"
    "X\x01\x00\x00\x00"
    "aq\x02K\x01s."s;

TEST(CraftedStateDictFiles, OrderedDictGetsItsHint) {
  Target target;
  write_archive(target.file.path(), kOrderedDictPickle, {});
  target.expect_refused({"holds an OrderedDict", "torchmha.save_state_dict(module, path)"});
}

// The hint used to come with every unpickling error, whatever the file held.
TEST(CraftedStateDictFiles, OtherPicklesGetNoOrderedDictHint) {
  const std::vector<std::pair<std::string, std::string>> pickles = {
      // A dict holding a module object: {"a": torch.nn.Linear(...)}.
      {"\x80\x02}q\x00X\x01\x00\x00\x00"
       "aq\x01"
       "ctorch.nn.modules.linear\nLinear\nq\x02)\x81q\x03s."s,
       "holds torch.nn.modules.linear.Linear"},
      // A dict cut off before its STOP opcode.
      {"\x80\x02}q\x00X\x01\x00\x00\x00"
       "aq\x01K\x01"s,
       "ends before its STOP"},
  };
  for (const auto& [pickle, expected] : pickles) {
    Target target;
    write_archive(target.file.path(), pickle, {});
    try {
      torchmha::load_state_dict(*target.module, target.file.path());
      ADD_FAILURE() << "loaded " << expected;
    } catch (const c10::Error& error) {
      const std::string message = error.what_without_backtrace();
      EXPECT_NE(message.find(expected), std::string::npos) << message;
      EXPECT_NE(message.find(target.file.path()), std::string::npos) << message;
      EXPECT_EQ(message.find("OrderedDict"), std::string::npos) << message;
    }
    EXPECT_TRUE(has_values(*target.module, target.before));
  }
}

TEST(CraftedStateDictFiles, QuantizedTensorIsRefusedByKey) {
  const auto weight = torch::randn({8, 8});
  const std::vector<at::Tensor> quantized = {
      at::quantize_per_tensor(weight, 0.1, 0, at::kQInt8),
      at::quantize_per_channel(weight, torch::rand({8}) + 0.1, torch::zeros({8}, at::kLong), 0,
                               at::kQInt8)};
  for (const auto& tensor : quantized) {
    Target target;
    auto state = state_of(*target.module);
    state.insert_or_assign("out_proj.weight", tensor);
    write_state(target.file.path(), state);
    target.expect_refused({"\"out_proj.weight\"", "is a quantized tensor", "dequantize()"});
  }
}

TEST(CraftedStateDictFiles, EntryThatIsNotATensorIsRefusedByKey) {
  Target target;
  auto state = state_of(*target.module);
  state.insert_or_assign("out_proj.weight", int64_t{3});
  write_state(target.file.path(), state);
  target.expect_refused({"\"out_proj.weight\"", "is a int, not a tensor"});
}

}  // namespace
