// State dicts in torch.save()'s file format, so weights move between C++ and Python unchanged.
// First: caffe2/serialize/in_memory_adapter.h uses off_t without including its header.
#include <sys/types.h>

#include <ATen/Context.h>
#include <c10/util/safe_numerics.h>
#include <caffe2/serialize/in_memory_adapter.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/csrc/jit/serialization/unpickler.h>
#include <torchmha/serialize.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <new>
#include <optional>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

namespace torchmha {
namespace {

constexpr const char* kPrefix = "torchmha::load_state_dict: ";

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

// Messages that quote a corrupted file keep ASCII only: Python cannot decode other bytes.
std::string printable(const std::string& text) {
  std::string result = text;
  for (auto& character : result) {
    const bool ascii = character == '\n' || (character >= 0x20 && character < 0x7F);
    character = ascii ? character : '?';
  }
  return result;
}

// A state-dict key as messages show it: quoted, and printable whatever the file holds.
std::string quote_key(const std::string& key) {
  std::string quoted = "\"";
  quoted += printable(key);
  quoted += '"';
  return quoted;
}

// ---------------------------------------------------------------------------------------------
// Reading the file

std::string describe_file_type(std::filesystem::file_type type) {
  switch (type) {
    case std::filesystem::file_type::directory:
      return "a directory";
    case std::filesystem::file_type::character:
      return "a character device";
    case std::filesystem::file_type::block:
      return "a block device";
    case std::filesystem::file_type::fifo:
      return "a named pipe";
    case std::filesystem::file_type::socket:
      return "a socket";
    default:
      return "not a regular file";
  }
}

// The whole file, after checking with stat() that it is a regular file of at most
// kMaxStateDictFileBytes: a device, a pipe or a directory is never opened or read.
std::vector<char> read_state_dict_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code error;
  const fs::file_status status = fs::status(path, error);
  TORCH_CHECK(status.type() != fs::file_type::not_found, kPrefix, "cannot open ", path,
              ": no such file");
  TORCH_CHECK(!error, kPrefix, "cannot open ", path, ": ", error.message());
  TORCH_CHECK(fs::is_regular_file(status), kPrefix, path, " is ", describe_file_type(status.type()),
              ", not a regular file holding a state dict");
  const std::uintmax_t size = fs::file_size(path, error);
  TORCH_CHECK(!error, kPrefix, "cannot open ", path, ": ", error.message());
  TORCH_CHECK(size <= kMaxStateDictFileBytes, kPrefix, path, " has ", size,
              " bytes, more than the ", kMaxStateDictFileBytes, " bytes (",
              kMaxStateDictFileBytes >> 30, " GiB) that a state dict file may have");
  std::ifstream stream(path, std::ios::binary);
  TORCH_CHECK(stream, kPrefix, "cannot open ", path);
  std::vector<char> bytes;
  try {
    bytes.resize(size);
  } catch (const std::bad_alloc&) {
    TORCH_CHECK(false, kPrefix, "not enough memory to read ", path, " (", size, " bytes)");
  }
  stream.read(bytes.data(), static_cast<std::streamsize>(size));
  TORCH_CHECK(static_cast<std::uintmax_t>(stream.gcount()) == size, kPrefix, path,
              " changed size while it was read");
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// The zip archive: every record stored, each one's CRC-32 right

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

// A record whose zip entry says it is compressed (and its method), if any. LibTorch's zip reader
// inflates without checking the CRC-32, and inflating a crafted record can ask for any amount of
// memory: compressed records, which torch.save never writes, are refused.
std::optional<std::pair<std::string, uint32_t>> first_compressed(
    caffe2::serialize::PyTorchStreamReader& reader, const std::vector<char>& bytes) {
  for (const auto& name : reader.getAllRecords()) {
    const uint32_t method = read_le(bytes, reader.getRecordHeaderOffset(name) + 8, 2, name);
    if (method != 0) {
      return std::make_pair(name, method);
    }
  }
  return std::nullopt;
}

// A record's bytes inside the file that was read, after its CRC-32 check.
struct RecordSpan {
  const char* data = nullptr;
  size_t size = 0;
};
using VerifiedRecords = std::map<std::string, RecordSpan>;

// LibTorch's reader (like torch.load) ignores the CRC-32 that torch.save writes for each record,
// so a flipped byte in a tensor would load as a wrong weight; check every record here. The bytes
// checked are the bytes loaded: every record is read from the file's own bytes, never through the
// zip reader, which returns an unfilled buffer for an entry whose directory flags are corrupted.
VerifiedRecords verify_records(caffe2::serialize::PyTorchStreamReader& reader,
                               const std::vector<char>& bytes) {
  constexpr uint32_t kDataDescriptorSignature = 0x08074b50;
  VerifiedRecords records;
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
    TORCH_CHECK(method == 0, "the record ", name, " is compressed");  // See first_compressed.
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
    // 0: written without checksums (torch.serialization.set_crc32_options(False)).
    TORCH_CHECK(stored == 0 || stored == crc32(bytes.data() + offset, size), "the record ", name,
                " fails its CRC-32 check (the file is corrupted)");
    records[name] = {bytes.data() + offset, size};
  }
  return records;
}

// ---------------------------------------------------------------------------------------------
// Tensors that fit their records: every storage exactly its record, every view within it

constexpr const char* kCraftedHint = " (the file is corrupted or crafted)";

// Why a storage of `declared_bytes` does not match its record, or "" when it does.
std::string storage_problem(uint64_t declared_bytes, const std::string& record,
                            std::optional<size_t> record_size) {
  if (!record_size) {
    return "declares a storage of " + std::to_string(declared_bytes) + " bytes, but its record " +
           record + " is missing" + kCraftedHint;
  }
  if (*record_size != declared_bytes) {
    return "declares a storage of " + std::to_string(declared_bytes) + " bytes, but its record " +
           record + " holds " + std::to_string(*record_size) + " bytes" + kCraftedHint;
  }
  return "";
}

// The bytes from a storage's start to one past a view's last element, or nullopt when a size,
// a stride or the offset is negative, or the sum overflows.
std::optional<uint64_t> bytes_spanned(int64_t offset, at::IntArrayRef sizes,
                                      at::IntArrayRef strides, int64_t itemsize) {
  if (offset < 0 || sizes.size() != strides.size()) {
    return std::nullopt;
  }
  bool empty = false;
  uint64_t last = static_cast<uint64_t>(offset);
  for (size_t dim = 0; dim < sizes.size(); ++dim) {
    if (sizes[dim] < 0 || strides[dim] < 0) {
      return std::nullopt;
    }
    empty = empty || sizes[dim] == 0;
    uint64_t reach = 0;
    if (sizes[dim] > 0 && (c10::mul_overflows(static_cast<uint64_t>(sizes[dim] - 1),
                                              static_cast<uint64_t>(strides[dim]), &reach) ||
                           c10::add_overflows(last, reach, &last))) {
      return std::nullopt;
    }
  }
  uint64_t bytes = 0;
  if (c10::add_overflows(last, uint64_t{1}, &last) ||
      c10::mul_overflows(last, static_cast<uint64_t>(itemsize), &bytes)) {
    return std::nullopt;
  }
  return empty ? 0 : bytes;
}

// Why a view reaches outside its storage of `storage_bytes`, or "" when it fits.
std::string view_problem(int64_t offset, at::IntArrayRef sizes, at::IntArrayRef strides,
                         int64_t itemsize, uint64_t storage_bytes) {
  const auto spanned = bytes_spanned(offset, sizes, strides, itemsize);
  if (spanned && *spanned <= storage_bytes) {
    return "";
  }
  return c10::str("has sizes ", sizes, ", strides ", strides, " and storage offset ", offset,
                  ", which reach outside its storage of ", storage_bytes, " bytes", kCraftedHint);
}

// ---------------------------------------------------------------------------------------------
// The pickle, checked on a model of the unpickler before LibTorch's unpickler runs it

// How a state dict's pickle may use a global (a function or class it names).
enum class GlobalUse { kAllowed, kQuantizedTensor, kSparseTensor, kParameter, kRefused };

// Only globals whose unpickling reads no tensor data: LibTorch's unpickler builds per-channel
// quantizers (which convert their scales) and sparse tensors from tensors it has just made, before
// this loader could check their storages against their records.
GlobalUse classify_global(const std::string& module, const std::string& name) {
  static const std::set<std::pair<std::string, std::string>> allowed = {
      {"torch._utils", "_rebuild_tensor_v2"},
      // A tensor with Python attributes: the attributes are dropped, the tensor kept.
      {"torch._tensor", "_rebuild_from_type_v2"},
      {"torch", "Tensor"},
      // Each tensor's (empty) backward hooks.
      {"collections", "OrderedDict"},
      // Type tags of containers pickled by LibTorch (torch::pickle_save).
      {"torch.jit._pickle", "restore_type_tag"},
      {"torch.jit._pickle", "build_intlist"},
      {"torch.jit._pickle", "build_doublelist"},
      {"torch.jit._pickle", "build_boollist"},
      {"torch.jit._pickle", "build_tensorlist"},
  };
  const std::string storage_suffix = "Storage";
  if (allowed.count({module, name}) != 0 ||
      (module == "torch" && name.size() > storage_suffix.size() &&
       name.compare(name.size() - storage_suffix.size(), std::string::npos, storage_suffix) == 0)) {
    return GlobalUse::kAllowed;
  }
  if (module == "torch._utils" && name == "_rebuild_qtensor") {
    return GlobalUse::kQuantizedTensor;
  }
  if (module == "torch._utils" && name == "_rebuild_sparse_tensor") {
    return GlobalUse::kSparseTensor;
  }
  if (module == "torch._utils" &&
      (name == "_rebuild_parameter" || name == "_rebuild_parameter_with_state")) {
    return GlobalUse::kParameter;
  }
  return GlobalUse::kRefused;
}

// The element size of a storage class the unpickler knows (torch.FloatStorage: 4).
std::optional<int64_t> storage_itemsize(const std::string& global) {
#define TORCHMHA_STORAGE_ITEMSIZE(_, type)                      \
  if (global == "torch." #type "Storage") {                     \
    return static_cast<int64_t>(c10::elementSize(at::k##type)); \
  }
  AT_FORALL_SCALAR_TYPES_WITH_COMPLEX_AND_QINTS(TORCHMHA_STORAGE_ITEMSIZE)
#undef TORCHMHA_STORAGE_ITEMSIZE
  return std::nullopt;
}

// A value of the pickle as PickleCheck models it: enough to follow storages and tensors. Its
// parts are shared, as the unpickler's are: a pickle may fetch one value any number of times.
struct PickleValue {
  enum class Kind { kOther, kString, kInt, kTuple, kGlobal, kStorage, kDict };
  Kind kind = Kind::kOther;
  int64_t number = 0;    // an int; a storage's size in bytes
  int64_t itemsize = 0;  // a storage's element size

  static PickleValue of(Kind kind, std::string text = "", int64_t number = 0) {
    PickleValue value;
    value.kind = kind;
    value.text_ = std::make_shared<const std::string>(std::move(text));
    value.number = number;
    return value;
  }
  // A string; a global's module.name; a storage's record name.
  const std::string& text() const {
    static const std::string none;
    return text_ ? *text_ : none;
  }
  // A tuple's elements.
  const std::vector<PickleValue>& items() const {
    static const std::vector<PickleValue> none;
    return items_ ? *items_ : none;
  }
  void set_items(std::vector<PickleValue> items) {
    items_ = std::make_shared<const std::vector<PickleValue>>(std::move(items));
  }
  // Why this value, or one it was built from, is refused.
  bool refused() const { return problem_ != nullptr; }
  const std::string& problem() const {
    static const std::string none;
    return problem_ ? *problem_ : none;
  }
  void refuse(std::string why) {
    if (!why.empty()) {
      problem_ = std::make_shared<const std::string>(std::move(why));
    }
  }
  // Keeps the first problem of the values this one is built from.
  void absorb(const PickleValue& part) {
    if (!problem_) {
      problem_ = part.problem_;
    }
  }

 private:
  std::shared_ptr<const std::string> text_;
  std::shared_ptr<const std::vector<PickleValue>> items_;
  std::shared_ptr<const std::string> problem_;
};

std::optional<std::vector<int64_t>> int_tuple(const PickleValue& value) {
  if (value.kind != PickleValue::Kind::kTuple) {
    return std::nullopt;
  }
  std::vector<int64_t> numbers;
  for (const auto& item : value.items()) {
    if (item.kind != PickleValue::Kind::kInt) {
      return std::nullopt;
    }
    numbers.push_back(item.number);
  }
  return numbers;
}

// Runs a protocol-2 pickle on a model of LibTorch's unpickler, without building any tensor: every
// storage is checked against its record and every tensor's view against its storage, and only
// globals of classify_global's list may be used. A problem is raised where a dict entry is set,
// naming its key, or at the end; so LibTorch's unpickler, which runs after, reads nothing
// that does not fit.
class PickleCheck {
 public:
  PickleCheck(const char* data, size_t size, const VerifiedRecords& records, std::string path)
      : data_(data), size_(size), records_(records), path_(std::move(path)) {}

  void run() {
    TORCH_CHECK(read_byte() == 0x80, kPrefix, path_,
                " does not start as a pickle (no PROTO opcode in data.pkl)");
    const int protocol = read_byte();
    TORCH_CHECK(protocol == 2, kPrefix, path_, " is pickled with protocol ", protocol,
                ", but LibTorch reads only protocol 2 (torch.save's default pickle_protocol)");
    TORCH_CHECK(!starts_with_global("collections", "OrderedDict"), kPrefix, path_,
                " holds an OrderedDict (what state_dict() returns), which LibTorch cannot read: "
                "save a plain dict instead, from Python with "
                "torchmha.save_state_dict(module, path)");
    while (position_ < size_) {
      if (step()) {
        for (const auto& value : stack_) {
          TORCH_CHECK(!value.refused(), kPrefix, path_, " ", value.problem());
        }
        return;
      }
    }
    malformed("ends before its STOP opcode");
  }

 private:
  using Kind = PickleValue::Kind;

  [[noreturn]] void malformed(const std::string& what) const {
    TORCH_CHECK(false, kPrefix, "cannot read ", path_, ": the pickle in data.pkl ", what);
    std::abort();  // Unreachable: TORCH_CHECK(false) throws.
  }
  void need(uint64_t count) const {
    if (count > size_ - position_) {
      malformed("ends inside an opcode");
    }
  }
  int read_byte() {
    need(1);
    return static_cast<uint8_t>(data_[position_++]);
  }
  uint64_t read_le(size_t width) {
    need(width);
    uint64_t value = 0;
    for (size_t index = 0; index < width; ++index) {
      value |= static_cast<uint64_t>(static_cast<uint8_t>(data_[position_ + index])) << (8 * index);
    }
    position_ += width;
    return value;
  }
  std::string read_line() {
    const void* end = std::memchr(data_ + position_, '\n', size_ - position_);
    if (end == nullptr) {
      malformed("ends inside a GLOBAL");
    }
    const size_t length = static_cast<const char*>(end) - (data_ + position_);
    std::string line(data_ + position_, length);
    position_ += length + 1;
    return line;
  }
  bool starts_with_global(const std::string& module, const std::string& name) const {
    const std::string global = "c" + module + "\n" + name + "\n";
    return size_ - position_ >= global.size() &&
           std::memcmp(data_ + position_, global.data(), global.size()) == 0;
  }

  PickleValue& top() {
    if (stack_.empty()) {
      malformed("uses an empty stack");
    }
    return stack_.back();
  }
  PickleValue pop() {
    PickleValue value = std::move(top());
    stack_.pop_back();
    return value;
  }
  std::vector<PickleValue> pop_to_mark() {
    if (marks_.empty() || marks_.back() > stack_.size()) {
      malformed("has no MARK where it needs one");
    }
    std::vector<PickleValue> items(std::make_move_iterator(stack_.begin() + marks_.back()),
                                   std::make_move_iterator(stack_.end()));
    stack_.resize(marks_.back());
    marks_.pop_back();
    return items;
  }
  void push_tuple(std::vector<PickleValue> items) {
    PickleValue tuple = PickleValue::of(Kind::kTuple);
    for (const auto& item : items) {
      tuple.absorb(item);
    }
    tuple.set_items(std::move(items));
    stack_.push_back(std::move(tuple));
  }
  void push_tuple_of(size_t count) {
    std::vector<PickleValue> items(count);
    for (size_t index = count; index > 0; --index) {
      items[index - 1] = pop();
    }
    push_tuple(std::move(items));
  }

  PickleValue global(const std::string& module, const std::string& name) const {
    PickleValue value = PickleValue::of(Kind::kGlobal, module + "." + name);
    switch (classify_global(module, name)) {
      case GlobalUse::kAllowed:
        break;
      case GlobalUse::kQuantizedTensor:
        value.refuse(
            "is a quantized tensor; torchmha's modules hold floating-point weights: save "
            "tensor.dequantize() instead");
        break;
      case GlobalUse::kSparseTensor:
        value.refuse(
            "is a sparse tensor; torchmha's modules hold dense (strided) weights: save "
            "tensor.to_dense() instead");
        break;
      case GlobalUse::kParameter:
        value.refuse(
            "is an nn.Parameter, which LibTorch's unpickler cannot read: save plain tensors, as "
            "state_dict() holds them (from Python, torchmha.save_state_dict(module, path))");
        break;
      case GlobalUse::kRefused:
        value.refuse("holds " + printable(value.text()) +
                     ", which a plain dict of name -> tensor never holds (this loader reads only "
                     "tensors saved as torch.save() saves them)");
        break;
    }
    return value;
  }

  // BINPERSID's storage: ('storage', torch.<Type>Storage, key, location, element count).
  PickleValue storage(const PickleValue& id) const {
    PickleValue storage;
    storage.absorb(id);
    const auto& items = id.items();
    if (id.kind != Kind::kTuple || items.size() != 5 || items[1].kind != Kind::kGlobal ||
        items[2].kind != Kind::kString || items[4].kind != Kind::kInt) {
      return storage;  // Not a storage LibTorch's unpickler reads: it refuses the file itself.
    }
    const auto itemsize = storage_itemsize(items[1].text());
    if (!itemsize) {
      return storage;
    }
    const std::string record = "data/" + items[2].text();
    storage = PickleValue::of(Kind::kStorage, printable(record));
    storage.absorb(id);
    storage.itemsize = *itemsize;
    const int64_t numel = items[4].number;
    uint64_t bytes = 0;
    if (numel < 0 || c10::mul_overflows(static_cast<uint64_t>(numel),
                                        static_cast<uint64_t>(*itemsize), &bytes)) {
      storage.refuse(c10::str("declares a storage of ", numel, " elements", kCraftedHint));
      return storage;
    }
    storage.number = static_cast<int64_t>(bytes);
    if (numel > 0 && !storage.refused()) {  // The unpickler reads no record for none.
      storage.refuse(storage_problem(bytes, storage.text(),
                                     records_.count(record) != 0
                                         ? std::optional<size_t>(records_.at(record).size)
                                         : std::nullopt));
    }
    return storage;
  }

  // REDUCE (and BUILD, which LibTorch's unpickler runs the same way).
  PickleValue call(const PickleValue& callable, const PickleValue& args) const {
    PickleValue result;
    result.absorb(callable);
    result.absorb(args);
    const auto& items = args.items();
    if (result.refused() || callable.kind != Kind::kGlobal || args.kind != Kind::kTuple) {
      return result;
    }
    if (callable.text() == "torch._tensor._rebuild_from_type_v2" && items.size() >= 3) {
      return call(items[0], items[2]);
    }
    if (callable.text() == "torch._utils._rebuild_tensor_v2" && items.size() >= 4) {
      const PickleValue& storage = items[0];
      const auto sizes = int_tuple(items[2]);
      const auto strides = int_tuple(items[3]);
      if (storage.kind == Kind::kStorage && items[1].kind == Kind::kInt && sizes && strides) {
        result.refuse(view_problem(items[1].number, *sizes, *strides, storage.itemsize,
                                   static_cast<uint64_t>(storage.number)));
      }
    }
    return result;
  }

  // An entry of a dict names its key when it is refused; unless a value the dict is part of is
  // refused already (an object of a refused class, say), which the message then names.
  void set_item(PickleValue& container, const PickleValue& key, const PickleValue& value) {
    const bool inside_refused =
        std::any_of(stack_.begin(), stack_.end(), [](const auto& item) { return item.refused(); });
    if (container.kind == Kind::kDict && key.kind == Kind::kString && !inside_refused) {
      TORCH_CHECK(!value.refused(), kPrefix, quote_key(key.text()), " in ", path_, " ",
                  value.problem());
    }
    container.absorb(key);
    container.absorb(value);
  }

  void memoize(uint64_t index) { memo_[index] = top(); }
  void fetch(uint64_t index) {
    const auto found = memo_.find(index);
    if (found == memo_.end()) {
      malformed("reads a memo entry that it never wrote");
    }
    stack_.push_back(found->second);
  }
  void push_int(int64_t number) { stack_.push_back(PickleValue::of(Kind::kInt, "", number)); }

  // One opcode of those LibTorch's unpickler knows; returns true at STOP.
  bool step() {
    const size_t at = position_;
    const int opcode = read_byte();
    switch (opcode) {
      case '.':  // STOP
        return true;
      case 'c': {  // GLOBAL
        const std::string module = read_line();
        stack_.push_back(global(module, read_line()));
        break;
      }
      case 'X': {  // BINUNICODE
        const uint64_t length = read_le(4);
        need(length);
        stack_.push_back(PickleValue::of(Kind::kString, std::string(data_ + position_, length)));
        position_ += length;
        break;
      }
      case 'q':  // BINPUT
        memoize(read_le(1));
        break;
      case 'r':  // LONG_BINPUT
        memoize(read_le(4));
        break;
      case 'h':  // BINGET
        fetch(read_le(1));
        break;
      case 'j':  // LONG_BINGET
        fetch(read_le(4));
        break;
      case 'K':  // BININT1
        push_int(static_cast<int64_t>(read_le(1)));
        break;
      case 'M':  // BININT2
        push_int(static_cast<int64_t>(read_le(2)));
        break;
      case 'J':  // BININT
        push_int(static_cast<int32_t>(read_le(4)));
        break;
      case 0x8a: {  // LONG1: LibTorch reads only 8-byte ones, and refuses others itself.
        const uint64_t length = read_le(1);
        if (length == 8) {
          push_int(static_cast<int64_t>(read_le(8)));
        } else {
          need(length);
          position_ += length;
          stack_.emplace_back();
        }
        break;
      }
      case 'G':  // BINFLOAT
        read_le(8);
        stack_.emplace_back();
        break;
      case '(':  // MARK
        marks_.push_back(stack_.size());
        break;
      case '}':  // EMPTY_DICT
        stack_.push_back(PickleValue::of(Kind::kDict));
        break;
      case ')':  // EMPTY_TUPLE
        push_tuple({});
        break;
      case ']':   // EMPTY_LIST
      case 'N':   // NONE
      case 0x88:  // NEWTRUE
      case 0x89:  // NEWFALSE
        stack_.emplace_back();
        break;
      case 't':  // TUPLE
        push_tuple(pop_to_mark());
        break;
      case 0x85:  // TUPLE1
      case 0x86:  // TUPLE2
      case 0x87:  // TUPLE3
        push_tuple_of(opcode - 0x84);
        break;
      case 'l':    // LIST
      case 'd': {  // DICT
        PickleValue container;
        for (const auto& item : pop_to_mark()) {
          container.absorb(item);
        }
        stack_.push_back(std::move(container));
        break;
      }
      case 'a': {  // APPEND
        const PickleValue item = pop();
        top().absorb(item);
        break;
      }
      case 'e': {  // APPENDS
        const auto items = pop_to_mark();
        for (const auto& item : items) {
          top().absorb(item);
        }
        break;
      }
      case 's': {  // SETITEM
        const PickleValue value = pop();
        const PickleValue key = pop();
        set_item(top(), key, value);
        break;
      }
      case 'u': {  // SETITEMS
        const auto items = pop_to_mark();
        for (size_t index = 0; index < items.size(); index += 2) {
          set_item(top(), items[index],
                   index + 1 < items.size() ? items[index + 1] : PickleValue{});
        }
        break;
      }
      case 0x81: {  // NEWOBJ: LibTorch drops the arguments and keeps the class for BUILD.
        const PickleValue args = pop();
        top().absorb(args);
        break;
      }
      case 'b':    // BUILD
      case 'R': {  // REDUCE
        const PickleValue args = pop();
        const PickleValue callable = pop();
        stack_.push_back(call(callable, args));
        break;
      }
      case 'Q':  // BINPERSID
        stack_.push_back(storage(pop()));
        break;
      default:
        malformed(c10::str("has the opcode ", opcode, " at byte ", at,
                           ", which LibTorch's unpickler does not read"));
    }
    return false;
  }

  const char* data_;
  size_t size_;
  const VerifiedRecords& records_;
  std::string path_;
  size_t position_ = 0;
  std::vector<PickleValue> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, PickleValue> memo_;
};

// ---------------------------------------------------------------------------------------------
// Unpickling, with each tensor checked again against the record it was read from

// The record that became each storage, by the address of its data.
struct Record {
  std::string name;
  size_t size = 0;
};
using RecordsByData = std::unordered_map<const void*, Record>;

// LibTorch's unpickler with every storage on the CPU (moving one to a device would read it),
// remembering which record each storage's data came from.
c10::IValue unpickle(const VerifiedRecords& verified, uint64_t version, const char* pickle,
                     size_t pickle_size, RecordsByData& records) {
  size_t consumed = 0;
  auto read_pickle = [&](char* buffer, size_t length) -> size_t {
    length = std::min(length, pickle_size - consumed);
    std::memcpy(buffer, pickle + consumed, length);
    consumed += length;
    return length;
  };
  auto read_record = [&](const std::string& key) {
    const std::string name = "data/" + key;
    const auto found = verified.find(name);
    TORCH_CHECK(found != verified.end(), "the record ", name, " is missing");
    const RecordSpan span = found->second;
    at::DataPtr data = at::getCPUAllocator()->allocate(span.size);
    if (span.size > 0) {
      std::memcpy(data.get(), span.data, span.size);
    }
    records[data.get()] = {name, span.size};
    return data;
  };
  torch::jit::Unpickler unpickler(read_pickle, /*type_resolver=*/nullptr, /*obj_loader=*/nullptr,
                                  read_record, /*device=*/at::Device(at::kCPU));
  unpickler.set_version(version);
  return unpickler.parse_ivalue();
}

// PickleCheck's checks, on the tensor LibTorch built: a second line of defence, so that a
// difference between the model and the unpickler cannot let a tensor read past its record.
void check_tensor(const std::string& key, const at::Tensor& tensor, const RecordsByData& records,
                  const std::string& path) {
  TORCH_CHECK(!tensor.is_quantized() && tensor.layout() == at::kStrided && tensor.has_storage(),
              kPrefix, quote_key(key), " in ", path,
              " is not a dense, non-quantized tensor; torchmha's modules hold floating-point "
              "weights");
  const at::Storage& storage = tensor.storage();
  const auto record = records.find(storage.data());
  std::string problem;
  if (storage.nbytes() > 0 || record != records.end()) {
    problem = record == records.end()
                  ? storage_problem(storage.nbytes(), "(none)", std::nullopt)
                  : storage_problem(storage.nbytes(), record->second.name, record->second.size);
  }
  if (problem.empty()) {
    problem = view_problem(tensor.storage_offset(), tensor.sizes(), tensor.strides(),
                           static_cast<int64_t>(tensor.itemsize()), storage.nbytes());
  }
  TORCH_CHECK(problem.empty(), kPrefix, quote_key(key), " in ", path, " ", problem);
}

// The file's dict of name -> tensor, each tensor checked against its record before anything
// reads it.
std::map<std::string, at::Tensor> read_state_dict(const std::vector<char>& bytes,
                                                  const std::string& path) {
  std::optional<caffe2::serialize::PyTorchStreamReader> reader;
  std::optional<std::pair<std::string, uint32_t>> compressed;
  VerifiedRecords verified;
  try {
    reader.emplace(
        std::make_shared<caffe2::serialize::MemoryReadAdapter>(bytes.data(), bytes.size()));
    compressed = first_compressed(*reader, bytes);
    if (!compressed) {
      verified = verify_records(*reader, bytes);
      TORCH_CHECK(verified.count("data.pkl") != 0, "the record data.pkl is missing");
    }
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, kPrefix, path,
                " is not an intact torch.save() zip archive (truncated, corrupted, or saved "
                "with _use_new_zipfile_serialization=False): ",
                printable(error.what_without_backtrace()));
  }
  TORCH_CHECK(!compressed, kPrefix, path, ": the record ", printable(compressed->first),
              " is compressed (zip method ", compressed->second,
              "); torch.save() never compresses records, so the file was re-zipped by another "
              "tool: load it in Python with torch.load and save it again with torch.save");
  const RecordSpan pickle = verified.at("data.pkl");
  PickleCheck(pickle.data, pickle.size, verified, path).run();
  RecordsByData records;
  c10::IValue loaded;
  try {
    loaded = unpickle(verified, reader->version(), pickle.data, pickle.size, records);
  } catch (const c10::Error& error) {
    TORCH_CHECK(false, kPrefix, "cannot read ", path,
                " as a torch.save() file of a plain dict of name -> tensor: ",
                printable(error.what_without_backtrace()));
  }
  TORCH_CHECK(loaded.isGenericDict(), kPrefix, path,
              " does not hold a dict of name -> tensor (a state dict), but a ",
              loaded.type()->str());
  std::map<std::string, at::Tensor> state_dict;
  for (const auto& item : loaded.toGenericDict()) {
    TORCH_CHECK(item.key().isString(), kPrefix, path, " holds a key that is a ",
                item.key().type()->str(), ", not a name");
    const std::string& key = item.key().toStringRef();
    TORCH_CHECK(item.value().isTensor(), kPrefix, quote_key(key), " in ", path, " is a ",
                item.value().type()->str(), ", not a tensor");
    check_tensor(key, item.value().toTensor(), records, path);
    state_dict.emplace(key, item.value().toTensor());
  }
  return state_dict;
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
  const auto state_dict = read_state_dict(read_state_dict_file(path), path);
  // Check everything first, so a bad file leaves the module as it was.
  const auto targets = named_tensors(module);
  for (const auto& [name, target] : targets) {
    const auto found = state_dict.find(name);
    TORCH_CHECK(found != state_dict.end(), kPrefix, path, " lacks the key \"", name, "\"");
    TORCH_CHECK(found->second.sizes() == target.sizes(), kPrefix, "\"", name, "\" has shape ",
                found->second.sizes(), " in ", path, ", but the module's is ", target.sizes());
  }
  for (const auto& [name, tensor] : state_dict) {
    const bool known =
        std::any_of(targets.begin(), targets.end(),
                    [&name = name](const auto& target) { return target.first == name; });
    TORCH_CHECK(known, kPrefix, path, " has the unexpected key ", quote_key(name));
  }
  // Convert before copying: a conversion that throws must not leave the module half loaded.
  std::vector<at::Tensor> converted;
  for (const auto& [name, target] : targets) {
    try {
      converted.push_back(state_dict.at(name).to(target.device(), target.scalar_type()));
    } catch (const c10::Error& error) {
      TORCH_CHECK(false, kPrefix, "cannot convert \"", name, "\" in ", path, " to ",
                  target.scalar_type(), " on ", target.device(), ": ",
                  error.what_without_backtrace());
    }
  }
  torch::NoGradGuard no_grad;
  for (size_t index = 0; index < targets.size(); ++index) {
    const_cast<at::Tensor&>(targets[index].second).copy_(converted[index]);
  }
}

}  // namespace torchmha
