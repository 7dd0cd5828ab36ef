// torchmha::load_state_dict on bad files: missing, extra or misshapen keys, truncated and
// corrupted archives. Each one is a c10::Error that says what is wrong, and the module keeps
// every weight it had.
#include <caffe2/serialize/inline_container.h>
#include <torchmha/torchmha.h>

#include <algorithm>

#include "state_dict_files.h"
#include "test_helpers.h"

namespace {

using torchmha::testing::expect_error_containing;
using torchmha::testing::has_values;
using torchmha::testing::snapshot;
using torchmha::testing::TempFile;

// A saved random module, and a second module of the same shape with other weights to load into.
struct SavedModule {
  TempFile file{"saved.pt"};
  torchmha::MultiHeadAttention source{8, 2};
  torchmha::MultiHeadAttention target{8, 2};
  std::map<std::string, torch::Tensor> source_values, target_values;
  SavedModule() {
    torch::manual_seed(0);
    torch::NoGradGuard no_grad;
    for (auto& parameter : source->parameters()) {
      parameter.normal_();
    }
    torchmha::save_state_dict(*source, file.path());
    source_values = snapshot(*source);
    target_values = snapshot(*target);
  }
};

TEST(BadStateDictFiles, IntactFileLoadsEveryWeight) {
  SavedModule saved;
  torchmha::load_state_dict(*saved.target, saved.file.path());
  EXPECT_TRUE(has_values(*saved.target, saved.source_values));
}

TEST(BadStateDictFiles, MissingKey) {
  TempFile file("no_bias.pt");
  torchmha::save_state_dict(
      *torchmha::MultiHeadAttention(torchmha::MultiHeadAttentionOptions(8, 2).bias(false)),
      file.path());
  torchmha::MultiHeadAttention target(8, 2);
  const auto before = snapshot(*target);
  expect_error_containing([&] { torchmha::load_state_dict(*target, file.path()); },
                          {"lacks the key \"in_proj_bias\"", file.path()});
  EXPECT_TRUE(has_values(*target, before));
}

TEST(BadStateDictFiles, ExtraKey) {
  TempFile file("bias_kv.pt");
  torchmha::save_state_dict(
      *torchmha::MultiHeadAttention(torchmha::MultiHeadAttentionOptions(8, 2).add_bias_kv(true)),
      file.path());
  torchmha::MultiHeadAttention target(8, 2);
  const auto before = snapshot(*target);
  expect_error_containing([&] { torchmha::load_state_dict(*target, file.path()); },
                          {"unexpected key \"bias_", file.path()});
  EXPECT_TRUE(has_values(*target, before));
}

TEST(BadStateDictFiles, WrongShape) {
  TempFile file("wider.pt");
  torchmha::save_state_dict(*torchmha::MultiHeadAttention(16, 4), file.path());
  torchmha::MultiHeadAttention target(8, 2);
  const auto before = snapshot(*target);
  expect_error_containing([&] { torchmha::load_state_dict(*target, file.path()); },
                          {"has shape [", "but the module's is ["});
  EXPECT_TRUE(has_values(*target, before));
}

TEST(BadStateDictFiles, MissingFileAndNotAnArchive) {
  torchmha::MultiHeadAttention target(8, 2);
  const auto before = snapshot(*target);
  TempFile file("text.pt");
  expect_error_containing([&] { torchmha::load_state_dict(*target, file.path()); },
                          {"cannot open", file.path()});
  file.write("in_proj_weight = [1, 2, 3]\n");
  expect_error_containing([&] { torchmha::load_state_dict(*target, file.path()); },
                          {"not an intact torch.save() zip archive", file.path()});
  EXPECT_TRUE(has_values(*target, before));
}

TEST(BadStateDictFiles, TruncatedAtEveryLength) {
  SavedModule saved;
  const auto bytes = saved.file.read();
  TempFile truncated("truncated.pt");
  for (size_t length = 0; length < bytes.size(); ++length) {
    truncated.write(bytes.substr(0, length));
    expect_error_containing([&] { torchmha::load_state_dict(*saved.target, truncated.path()); },
                            {"torchmha::load_state_dict: ", truncated.path()});
    ASSERT_TRUE(has_values(*saved.target, saved.target_values)) << "after " << length << " bytes";
  }
}

// The bug this guards against: LibTorch's reader ignores CRC-32, so a flipped byte in a tensor
// loaded as a wrong weight with no error.
TEST(BadStateDictFiles, FlippedByteInTensorDataFailsItsChecksum) {
  SavedModule saved;
  auto bytes = saved.file.read();
  caffe2::serialize::PyTorchStreamReader reader(saved.file.path());
  bytes[reader.getRecordOffset("data/0") + 5] ^= 0x01;
  saved.file.write(bytes);
  expect_error_containing([&] { torchmha::load_state_dict(*saved.target, saved.file.path()); },
                          {"data/0", "CRC-32", "corrupted"});
  EXPECT_TRUE(has_values(*saved.target, saved.target_values));
}

// The offset of the central-directory entry of the record whose name ends with `suffix`.
size_t central_directory_entry(const std::string& bytes, const std::string& suffix) {
  const std::string signature("PK\x01\x02", 4);
  for (size_t at = bytes.find(signature); at != std::string::npos;
       at = bytes.find(signature, at + 1)) {
    const size_t name_length =
        static_cast<uint8_t>(bytes[at + 28]) | (static_cast<uint8_t>(bytes[at + 29]) << 8);
    const std::string name = bytes.substr(at + 46, name_length);
    if (name.size() >= suffix.size() &&
        name.compare(name.size() - suffix.size(), std::string::npos, suffix) == 0) {
      return at;
    }
  }
  ADD_FAILURE() << "no central-directory entry ends with " << suffix;
  return 0;
}

// LibTorch's zip reader treats an entry whose external attributes carry the MS-DOS directory bit
// as a folder and returns an unfilled buffer for it; the loader reads the file's own bytes, the
// ones it checked, so such a flip loads the saved weights (it used to load whatever was in memory).
TEST(BadStateDictFiles, DirectoryBitOnATensorEntryStillLoadsTheCheckedBytes) {
  SavedModule saved;
  auto bytes = saved.file.read();
  bytes[central_directory_entry(bytes, "/data/1") + 38] |= 0x10;
  saved.file.write(bytes);
  for (int attempt = 0; attempt < 20; ++attempt) {  // Unfilled buffers differ from one to the next.
    torchmha::MultiHeadAttention target(8, 2);
    torchmha::load_state_dict(*target, saved.file.path());
    ASSERT_TRUE(has_values(*target, saved.source_values)) << "attempt " << attempt;
  }
}

// Every single flipped byte: an error that leaves the module unchanged, or (for bytes that
// carry nothing, such as alignment padding) the saved weights exactly. Never other weights; and
// a flip inside any record (tensors, pickle, version) is always an error.
TEST(BadStateDictFiles, EveryFlippedByteIsAnErrorOrHarmless) {
  SavedModule saved;
  const auto bytes = saved.file.read();
  std::vector<bool> in_record(bytes.size(), false);
  caffe2::serialize::PyTorchStreamReader reader(saved.file.path());
  for (const auto& name : reader.getAllRecords()) {
    const size_t offset = reader.getRecordOffset(name);
    std::fill_n(in_record.begin() + offset, reader.getRecordSize(name), true);
  }
  TempFile corrupted("corrupted.pt");
  for (size_t position = 0; position < bytes.size(); ++position) {
    auto copy = bytes;
    copy[position] = static_cast<char>(copy[position] ^ 0xFF);
    corrupted.write(copy);
    torchmha::MultiHeadAttention target(8, 2);
    const auto before = snapshot(*target);
    try {
      torchmha::load_state_dict(*target, corrupted.path());
      ASSERT_FALSE(in_record[position]) << "loaded despite a flipped byte " << position;
      ASSERT_TRUE(has_values(*target, saved.source_values)) << "byte " << position;
    } catch (const c10::Error&) {
      ASSERT_TRUE(has_values(*target, before)) << "byte " << position;
    }
  }
}

}  // namespace
