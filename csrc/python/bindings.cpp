// pybind11 bindings of the C++ modules for torchmha._C (loading it also registers the op).
#include <ATen/CPUGeneratorImpl.h>
#include <torch/python.h>
#include <torchmha/torchmha.h>

#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <typeinfo>

namespace py = pybind11;

namespace {

torch::Tensor or_undefined(const std::optional<torch::Tensor>& tensor) {
  return tensor.value_or(torch::Tensor());
}

template <typename ModuleType>
std::string pretty(const ModuleType& module) {
  std::ostringstream stream;
  stream << module;
  return stream.str();
}

// Whether `tensor` is a plain dense tensor: a c10::TensorImpl itself, no subclass (sparse,
// nested, wrapper) and no Python subclass, whose metadata another plain one can take over.
bool is_plain_dense(const torch::Tensor& tensor) {
  const auto& impl = *tensor.unsafeGetTensorImpl();
  return typeid(impl) == typeid(c10::TensorImpl) && tensor.layout() == torch::kStrided &&
         !tensor.key_set().has(c10::DispatchKey::Python) && !tensor.is_inference();
}

// Gives `variable` the data of `data` (storage, shape, dtype, device) and keeps the variable
// itself, which the C++ module holds as a member: what `variable.data = data` does, also across
// backends (CPU, CUDA <-> meta), which set_data refuses only because other TensorImpl kinds
// cannot take each other's metadata; two plain dense ones can.
void replace_data(torch::Tensor& variable, const torch::Tensor& data) {
  TORCH_CHECK_VALUE(variable.defined() && data.defined(),
                    "torchmha: cannot replace the data of an undefined tensor or with one");
  TORCH_CHECK_VALUE(!variable.requires_grad() || at::isFloatingType(data.scalar_type()) ||
                        at::isComplexType(data.scalar_type()),
                    "torchmha: a C++ module's tensor that requires gradients cannot take data of ",
                    data.scalar_type(), ", only a floating point or complex dtype");
  if (!at::_has_compatible_shallow_copy_type(variable, data)) {
    TORCH_CHECK_VALUE(is_plain_dense(variable) && is_plain_dense(data),
                      "torchmha: a C++ module's tensor on ", variable.device(), " (",
                      variable.layout(), ") cannot take the data of a tensor on ", data.device(),
                      " (", data.layout(), "); only plain strided tensors move between devices");
    variable.unsafeGetTensorImpl()->shallow_copy_from(data.getIntrusivePtr());
  }
  // Now of one kind: set_data does its bookkeeping (the gradient accumulator on a new device).
  variable.set_data(data);
}

// What pickle keeps of a module: its format, options, training flag and every parameter
// (detached, as PyTorch's parameters pickle without their gradients, and its requires_grad).
// Format 1 keeps nn.MultiheadAttention's options (or the textbook module's); format 2 adds the
// grouped-query and rotary options. A module at their defaults still pickles as format 1, which
// earlier releases read; one that uses them pickles as format 2, which those releases refuse
// instead of silently dropping the options.
constexpr int64_t kPickleFormat = 1;
constexpr int64_t kGroupedRotaryPickleFormat = 2;
constexpr size_t kFieldCount = 4;

template <typename ModuleType>
py::tuple module_state(const ModuleType& module, int64_t format, py::tuple options) {
  py::list parameters;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    parameters.append(
        py::make_tuple(item.key(), item.value().detach(), item.value().requires_grad()));
  }
  return py::make_tuple(format, std::move(options), module.is_training(), parameters);
}

// Builds a module from its pickled options without drawing from the caller's random stream:
// the initial weights are replaced by the pickled ones anyway.
template <typename ModuleType, typename Build>
std::shared_ptr<ModuleType> build_quietly(const Build& build) {
  auto generator = at::detail::getDefaultCPUGenerator();
  torch::Tensor random_state;
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    random_state = generator.get_state();
  }
  auto module = build();
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(random_state);
  return module;
}

// Restores what module_state kept into a module built from the kept options.
// `build(format, options)` checks that it knows the format and makes the module.
template <typename ModuleType, typename Build>
std::shared_ptr<ModuleType> restore_module(const py::tuple& state, const Build& build) {
  TORCH_CHECK_VALUE(state.size() == kFieldCount,
                    "torchmha: cannot unpickle a C++ module from this state (expected format ",
                    kPickleFormat, " or ", kGroupedRotaryPickleFormat, " with ", kFieldCount,
                    " fields, got ", state.size(), " fields)");
  auto module = build_quietly<ModuleType>(
      [&] { return build(state[0].cast<int64_t>(), state[1].cast<py::tuple>()); });
  module->train(state[2].cast<bool>());
  auto parameters = module->named_parameters(/*recurse=*/true);
  const auto pickled = state[3].cast<py::list>();
  TORCH_CHECK_VALUE(pickled.size() == parameters.size(), "torchmha: the pickled C++ module has ",
                    pickled.size(), " parameters, but a module with its options has ",
                    parameters.size());
  for (const auto& item : pickled) {
    const auto entry = item.cast<py::tuple>();
    const auto name = entry[0].cast<std::string>();
    const auto tensor = entry[1].cast<torch::Tensor>();
    auto* parameter = parameters.find(name);
    TORCH_CHECK_VALUE(parameter != nullptr, "torchmha: the pickled C++ module has a parameter `",
                      name, "` that a module with its options does not have");
    TORCH_CHECK_VALUE(tensor.sizes() == parameter->sizes(), "torchmha: the pickled parameter `",
                      name, "` has shape ", tensor.sizes(), ", but a module with its options has ",
                      parameter->sizes());
    replace_data(*parameter, tensor);
    parameter->set_requires_grad(entry[2].cast<bool>());
  }
  return module;
}

template <typename ModuleType>
torch::python::detail::PyModuleClass<ModuleType> bind_common(py::module& m, const char* name) {
  return torch::python::add_module_bindings(
             torch::python::detail::PyModuleClass<ModuleType>(m, name))
      .def("pretty_print", &pretty<ModuleType>)
      // Every parameter with its dotted name, as a state dict spells it.
      .def_property_readonly("_flat_parameters",
                             [](ModuleType& module) { return module.named_parameters(true); });
}

bool uses_grouped_or_rotary(const torchmha::MultiHeadAttentionOptions& options) {
  return options.num_kv_heads().has_value() || options.rope_theta().has_value() ||
         options.rotary_dim().has_value() || options.rotary_interleaved();
}

// Options pickled in format 1; format 2 appends the grouped-query and rotary ones.
constexpr size_t kOptionCount = 9;
constexpr size_t kGroupedRotaryOptionCount = 13;

int64_t pickle_format(const torchmha::MultiHeadAttentionImpl& module) {
  return uses_grouped_or_rotary(module.options) ? kGroupedRotaryPickleFormat : kPickleFormat;
}

py::tuple options_tuple(const torchmha::MultiHeadAttentionOptions& options) {
  auto pytorch_options =
      py::make_tuple(options.embed_dim(), options.num_heads(), options.dropout(), options.bias(),
                     options.add_bias_kv(), options.add_zero_attn(), options.kdim(), options.vdim(),
                     options.batch_first());
  if (!uses_grouped_or_rotary(options)) {
    return pytorch_options;
  }
  const auto grouped_rotary_options =
      py::make_tuple(options.num_kv_heads(), options.rope_theta(), options.rotary_dim(),
                     options.rotary_interleaved());
  return py::tuple(pytorch_options + grouped_rotary_options);
}

std::shared_ptr<torchmha::MultiHeadAttentionImpl> build_multi_head_attention(
    int64_t format, const py::tuple& options) {
  const bool grouped_rotary = format == kGroupedRotaryPickleFormat;
  TORCH_CHECK_VALUE((format == kPickleFormat && options.size() == kOptionCount) ||
                        (grouped_rotary && options.size() == kGroupedRotaryOptionCount),
                    "torchmha: cannot unpickle a C++ module from this state (expected format ",
                    kPickleFormat, " with ", kOptionCount, " options or format ",
                    kGroupedRotaryPickleFormat, " with ", kGroupedRotaryOptionCount,
                    ", got format ", format, " with ", options.size(), ")");
  auto module_options =
      torchmha::MultiHeadAttentionOptions(options[0].cast<int64_t>(), options[1].cast<int64_t>())
          .dropout(options[2].cast<double>())
          .bias(options[3].cast<bool>())
          .add_bias_kv(options[4].cast<bool>())
          .add_zero_attn(options[5].cast<bool>())
          .kdim(options[6].cast<int64_t>())
          .vdim(options[7].cast<int64_t>())
          .batch_first(options[8].cast<bool>());
  if (grouped_rotary) {
    module_options.num_kv_heads(options[9].cast<std::optional<int64_t>>())
        .rope_theta(options[10].cast<std::optional<double>>())
        .rotary_dim(options[11].cast<std::optional<int64_t>>())
        .rotary_interleaved(options[12].cast<bool>());
  }
  return std::make_shared<torchmha::MultiHeadAttentionImpl>(module_options);
}

int64_t pickle_format(const torchmha::TextbookMultiHeadAttentionImpl& /*module*/) {
  return kPickleFormat;
}

py::tuple options_tuple(const torchmha::TextbookMultiHeadAttentionOptions& options) {
  return py::make_tuple(options.h(), options.d_model(), options.dropout());
}

std::shared_ptr<torchmha::TextbookMultiHeadAttentionImpl> build_textbook(int64_t format,
                                                                         const py::tuple& options) {
  TORCH_CHECK_VALUE(format == kPickleFormat && options.size() == 3,
                    "torchmha: cannot unpickle a C++ module from this state (expected format ",
                    kPickleFormat, " with 3 options, got format ", format, " with ", options.size(),
                    ")");
  return std::make_shared<torchmha::TextbookMultiHeadAttentionImpl>(
      torchmha::TextbookMultiHeadAttentionOptions(options[0].cast<int64_t>(),
                                                  options[1].cast<int64_t>())
          .dropout(options[2].cast<double>()));
}

// pickle (and so copy.deepcopy and torch.save) rebuilds a module from its options and state.
template <typename ModuleType, typename Build>
auto pickling(const Build& build) {
  return py::pickle(
      [](const ModuleType& module) {
        return module_state(module, pickle_format(module), options_tuple(module.options));
      },
      [build](const py::tuple& state) { return restore_module<ModuleType>(state, build); });
}

// What pickle keeps of a C++ cache (and so copy.deepcopy and torch.save): its tensors, from
// which the sizes, dtype and device follow.
constexpr int64_t kCachePickleFormat = 1;

py::tuple cache_state(const torchmha::KVCacheImpl& cache) {
  return py::make_tuple(kCachePickleFormat, cache.key, cache.value, cache.seq_lens);
}

std::shared_ptr<torchmha::KVCacheImpl> restore_cache(const py::tuple& state) {
  TORCH_CHECK_VALUE(state.size() == 4 && state[0].cast<int64_t>() == kCachePickleFormat,
                    "torchmha: cannot unpickle a C++ KVCache from this state (expected format ",
                    kCachePickleFormat, " with 4 fields)");
  const auto key = state[1].cast<torch::Tensor>();
  const auto value = state[2].cast<torch::Tensor>();
  const auto seq_lens = state[3].cast<torch::Tensor>();
  TORCH_CHECK_VALUE(key.dim() == 4 && value.sizes() == key.sizes() && seq_lens.dim() == 1 &&
                        seq_lens.size(0) == key.size(0),
                    "torchmha: the pickled C++ KVCache's `key`, `value` and `seq_lens` must be "
                    "(N, H, S, D), (N, H, S, D) and (N), got ",
                    key.sizes(), ", ", value.sizes(), " and ", seq_lens.sizes());
  auto cache = std::make_shared<torchmha::KVCacheImpl>(
      torchmha::KVCacheOptions(key.size(0), key.size(1), key.size(2), key.size(3))
          .dtype(key.scalar_type())
          .device(key.device()));
  const c10::NoGradGuard no_grad;
  cache->key.copy_(key);
  cache->value.copy_(value);
  cache->seq_lens.copy_(seq_lens);
  return cache;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchmha C++ extension: registers torch.ops.torchmha and binds the C++ modules.";
  m.def("version", &torchmha::version, "The version of the C++ library.");
  m.def("save_state_dict", &torchmha::save_state_dict, py::arg("module"), py::arg("path"),
        "Saves a C++ module's state dict in torch.save()'s format (torchmha::save_state_dict).");
  m.def("load_state_dict", &torchmha::load_state_dict, py::arg("module"), py::arg("path"),
        "Loads a torch.save()d state dict into a C++ module (torchmha::load_state_dict).");
  m.def("_replace_data", &replace_data, py::arg("variable"), py::arg("data"),
        "`variable.data = data` for a C++ module's tensor, also to and from the meta device.");

  // Bound before the module, whose forward and new_kv_cache take and return it.
  using torchmha::KVCacheImpl;
  torch::python::add_module_bindings(
      torch::python::detail::PyModuleClass<KVCacheImpl>(m, "KVCache"))
      .def(py::init([](int64_t batch_size, int64_t num_kv_heads, int64_t max_seq_len,
                       int64_t head_dim, std::optional<c10::ScalarType> dtype,
                       std::optional<c10::Device> device) {
             // Python's default dtype, as torchmha.KVCache (torch.zeros) takes it.
             const auto default_dtype = c10::typeMetaToScalarType(at::get_default_dtype());
             return std::make_shared<KVCacheImpl>(
                 torchmha::KVCacheOptions(batch_size, num_kv_heads, max_seq_len, head_dim)
                     .dtype(dtype.value_or(default_dtype))
                     .device(device.value_or(c10::Device(c10::kCPU))));
           }),
           py::arg("batch_size"), py::arg("num_kv_heads"), py::arg("max_seq_len"),
           py::arg("head_dim"), py::arg("dtype") = py::none(), py::arg("device") = py::none())
      .def(py::pickle(&cache_state, &restore_cache))
      .def("pretty_print", &pretty<KVCacheImpl>)
      .def("reset", &KVCacheImpl::reset)
      .def("reorder", &KVCacheImpl::reorder, py::arg("indices"))
      .def_property_readonly("key", [](const KVCacheImpl& cache) { return cache.key; })
      .def_property_readonly("value", [](const KVCacheImpl& cache) { return cache.value; })
      .def_property_readonly("seq_lens", [](const KVCacheImpl& cache) { return cache.seq_lens; });

  using torchmha::MultiHeadAttentionImpl;
  bind_common<MultiHeadAttentionImpl>(m, "MultiHeadAttention")
      .def(py::init([](int64_t embed_dim, int64_t num_heads, double dropout, bool bias,
                       bool add_bias_kv, bool add_zero_attn, std::optional<int64_t> kdim,
                       std::optional<int64_t> vdim, bool batch_first,
                       std::optional<int64_t> num_kv_heads, std::optional<double> rope_theta,
                       std::optional<int64_t> rotary_dim, bool rotary_interleaved) {
             return std::make_shared<MultiHeadAttentionImpl>(
                 torchmha::MultiHeadAttentionOptions(embed_dim, num_heads)
                     .dropout(dropout)
                     .bias(bias)
                     .add_bias_kv(add_bias_kv)
                     .add_zero_attn(add_zero_attn)
                     .kdim(kdim.value_or(embed_dim))
                     .vdim(vdim.value_or(embed_dim))
                     .batch_first(batch_first)
                     .num_kv_heads(num_kv_heads)
                     .rope_theta(rope_theta)
                     .rotary_dim(rotary_dim)
                     .rotary_interleaved(rotary_interleaved));
           }),
           py::arg("embed_dim"), py::arg("num_heads"), py::arg("dropout") = 0.0,
           py::arg("bias") = true, py::arg("add_bias_kv") = false, py::arg("add_zero_attn") = false,
           py::arg("kdim") = py::none(), py::arg("vdim") = py::none(),
           py::arg("batch_first") = false, py::kw_only(), py::arg("num_kv_heads") = py::none(),
           py::arg("rope_theta") = py::none(), py::arg("rotary_dim") = py::none(),
           py::arg("rotary_interleaved") = false)
      .def(pickling<MultiHeadAttentionImpl>(&build_multi_head_attention))
      .def(
          "forward",
          [](MultiHeadAttentionImpl& module, const torch::Tensor& query, const torch::Tensor& key,
             const torch::Tensor& value, const std::optional<torch::Tensor>& key_padding_mask,
             bool need_weights, const std::optional<torch::Tensor>& attn_mask,
             bool average_attn_weights, bool is_causal,
             const std::optional<torch::Tensor>& positions,
             const std::optional<std::shared_ptr<KVCacheImpl>>& kv_cache) {
            return module.forward(query, key, value, or_undefined(key_padding_mask), need_weights,
                                  or_undefined(attn_mask), average_attn_weights, is_causal,
                                  or_undefined(positions),
                                  torchmha::KVCache(kv_cache.value_or(nullptr)));
          },
          py::arg("query"), py::arg("key"), py::arg("value"),
          py::arg("key_padding_mask") = py::none(), py::arg("need_weights") = true,
          py::arg("attn_mask") = py::none(), py::arg("average_attn_weights") = true,
          py::arg("is_causal") = false, py::arg("positions") = py::none(),
          py::arg("kv_cache") = py::none())
      .def(
          "new_kv_cache",
          [](const MultiHeadAttentionImpl& module, int64_t batch_size, int64_t max_seq_len,
             std::optional<c10::ScalarType> dtype, std::optional<c10::Device> device) {
            return module.new_kv_cache(batch_size, max_seq_len, dtype, device).ptr();
          },
          py::arg("batch_size"), py::arg("max_seq_len"), py::arg("dtype") = py::none(),
          py::arg("device") = py::none())
      .def_property_readonly(
          "embed_dim",
          [](const MultiHeadAttentionImpl& module) { return module.options.embed_dim(); })
      .def_property_readonly(
          "num_heads",
          [](const MultiHeadAttentionImpl& module) { return module.options.num_heads(); })
      .def_property_readonly(
          "batch_first",
          [](const MultiHeadAttentionImpl& module) { return module.options.batch_first(); })
      .def_property_readonly("head_dim",
                             [](const MultiHeadAttentionImpl& module) { return module.head_dim(); })
      .def_property_readonly(
          "num_kv_heads",
          [](const MultiHeadAttentionImpl& module) { return module.num_kv_heads(); })
      .def_property_readonly(
          "rope_theta",
          [](const MultiHeadAttentionImpl& module) { return module.options.rope_theta(); })
      .def_property_readonly(
          "rotary_dim",
          [](const MultiHeadAttentionImpl& module) { return module.options.rotary_dim(); })
      .def_property_readonly("rotary_interleaved", [](const MultiHeadAttentionImpl& module) {
        return module.options.rotary_interleaved();
      });

  using torchmha::TextbookMultiHeadAttentionImpl;
  bind_common<TextbookMultiHeadAttentionImpl>(m, "TextbookMultiHeadAttention")
      .def(py::init([](int64_t h, int64_t d_model, double dropout) {
             return std::make_shared<TextbookMultiHeadAttentionImpl>(
                 torchmha::TextbookMultiHeadAttentionOptions(h, d_model).dropout(dropout));
           }),
           py::arg("h"), py::arg("d_model"), py::arg("dropout") = 0.1)
      .def(pickling<TextbookMultiHeadAttentionImpl>(&build_textbook))
      .def(
          "forward",
          [](TextbookMultiHeadAttentionImpl& module, const torch::Tensor& query,
             const torch::Tensor& key, const torch::Tensor& value,
             const std::optional<torch::Tensor>& mask) {
            return module.forward(query, key, value, or_undefined(mask));
          },
          py::arg("query"), py::arg("key"), py::arg("value"), py::arg("mask") = py::none())
      .def_property_readonly(
          "attn", [](const TextbookMultiHeadAttentionImpl& module) { return module.last_attn(); });
}
