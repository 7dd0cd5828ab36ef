// pybind11 bindings of the C++ modules for torchmha._C (loading it also registers the op).
#include <torch/python.h>
#include <torchmha/torchmha.h>

#include <optional>
#include <sstream>

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

template <typename ModuleType>
torch::python::detail::PyModuleClass<ModuleType> bind_common(py::module& m, const char* name) {
  return torch::python::add_module_bindings(
             torch::python::detail::PyModuleClass<ModuleType>(m, name))
      .def("pretty_print", &pretty<ModuleType>)
      // Every parameter with its dotted name, as a state dict spells it.
      .def_property_readonly("_flat_parameters",
                             [](ModuleType& module) { return module.named_parameters(true); });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchmha C++ extension: registers torch.ops.torchmha and binds the C++ modules.";
  m.def("version", &torchmha::version, "The version of the C++ library.");
  m.def("save_state_dict", &torchmha::save_state_dict, py::arg("module"), py::arg("path"),
        "Saves a C++ module's state dict in torch.save()'s format (torchmha::save_state_dict).");
  m.def("load_state_dict", &torchmha::load_state_dict, py::arg("module"), py::arg("path"),
        "Loads a torch.save()d state dict into a C++ module (torchmha::load_state_dict).");

  using torchmha::MultiHeadAttentionImpl;
  bind_common<MultiHeadAttentionImpl>(m, "MultiHeadAttention")
      .def(py::init([](int64_t embed_dim, int64_t num_heads, double dropout, bool bias,
                       bool add_bias_kv, bool add_zero_attn, std::optional<int64_t> kdim,
                       std::optional<int64_t> vdim, bool batch_first) {
             return std::make_shared<MultiHeadAttentionImpl>(
                 torchmha::MultiHeadAttentionOptions(embed_dim, num_heads)
                     .dropout(dropout)
                     .bias(bias)
                     .add_bias_kv(add_bias_kv)
                     .add_zero_attn(add_zero_attn)
                     .kdim(kdim.value_or(embed_dim))
                     .vdim(vdim.value_or(embed_dim))
                     .batch_first(batch_first));
           }),
           py::arg("embed_dim"), py::arg("num_heads"), py::arg("dropout") = 0.0,
           py::arg("bias") = true, py::arg("add_bias_kv") = false, py::arg("add_zero_attn") = false,
           py::arg("kdim") = py::none(), py::arg("vdim") = py::none(),
           py::arg("batch_first") = false)
      .def(
          "forward",
          [](MultiHeadAttentionImpl& module, const torch::Tensor& query, const torch::Tensor& key,
             const torch::Tensor& value, const std::optional<torch::Tensor>& key_padding_mask,
             bool need_weights, const std::optional<torch::Tensor>& attn_mask,
             bool average_attn_weights, bool is_causal) {
            return module.forward(query, key, value, or_undefined(key_padding_mask), need_weights,
                                  or_undefined(attn_mask), average_attn_weights, is_causal);
          },
          py::arg("query"), py::arg("key"), py::arg("value"),
          py::arg("key_padding_mask") = py::none(), py::arg("need_weights") = true,
          py::arg("attn_mask") = py::none(), py::arg("average_attn_weights") = true,
          py::arg("is_causal") = false)
      .def_property_readonly(
          "embed_dim",
          [](const MultiHeadAttentionImpl& module) { return module.options.embed_dim(); })
      .def_property_readonly(
          "num_heads",
          [](const MultiHeadAttentionImpl& module) { return module.options.num_heads(); })
      .def_property_readonly("batch_first", [](const MultiHeadAttentionImpl& module) {
        return module.options.batch_first();
      });

  using torchmha::TextbookMultiHeadAttentionImpl;
  bind_common<TextbookMultiHeadAttentionImpl>(m, "TextbookMultiHeadAttention")
      .def(py::init([](int64_t h, int64_t d_model, double dropout) {
             return std::make_shared<TextbookMultiHeadAttentionImpl>(
                 torchmha::TextbookMultiHeadAttentionOptions(h, d_model).dropout(dropout));
           }),
           py::arg("h"), py::arg("d_model"), py::arg("dropout") = 0.1)
      .def(
          "forward",
          [](TextbookMultiHeadAttentionImpl& module, const torch::Tensor& query,
             const torch::Tensor& key, const torch::Tensor& value,
             const std::optional<torch::Tensor>& mask) {
            return module.forward(query, key, value, or_undefined(mask));
          },
          py::arg("query"), py::arg("key"), py::arg("value"), py::arg("mask") = py::none())
      .def_property_readonly(
          "attn", [](const TextbookMultiHeadAttentionImpl& module) { return module.attn; });
}
