// Python module ip_runtime._core: imagepiece::Runtime bound 1:1 (same names and arguments).
// Uses torch's own pybind11 and tensor casters, so torch.Tensor crosses without copies; numpy
// arrays are wrapped with torch.from_numpy (zero-copy) and numpy comes back for numpy in.
#include <torch/python.h>

#include "imagepiece/runtime.h"

namespace py = pybind11;
using imagepiece::ErrorCode;
using imagepiece::Runtime;
using imagepiece::RuntimeOptions;

namespace {

py::dict info_dict(const imagepiece::ModelInfo& info) {
  py::dict out;
  out["model_name"] = info.model_name;
  out["arch"] = info.arch;
  out["method"] = info.method;
  out["dtype"] = info.dtype;
  out["device_type"] = info.device_type;
  out["cuda_capability"] = info.cuda_capability.empty() ? py::object(py::none()) : py::object(py::str(info.cuda_capability));
  out["torch_version"] = info.torch_version;
  out["created"] = info.created;
  out["checkpoint_sha256"] = info.checkpoint_sha256;
  out["input_shape"] = info.input_shape;
  out["num_classes"] = info.num_classes;
  out["batch_min"] = info.batch_min;
  out["batch_max"] = info.batch_max;
  out["dynamic_batch"] = info.dynamic_batch;
  out["tokens_per_block"] = info.tokens_per_block;
  out["mean"] = info.mean;
  out["std"] = info.std;
  out["interpolation"] = info.interpolation;
  out["crop_pct"] = info.crop_pct;
  out["metadata"] = py::module_::import("json").attr("loads")(info.metadata_json);
  return out;
}

bool is_ndarray(const py::handle& object) {
  static py::object ndarray = py::module_::import("numpy").attr("ndarray");
  return py::isinstance(object, ndarray);
}

at::Tensor as_tensor(const py::handle& object) {
  if (THPVariable_Check(object.ptr())) return THPVariable_Unpack(object.ptr());
  if (is_ndarray(object)) {
    static py::object from_numpy = py::module_::import("torch").attr("from_numpy");
    return THPVariable_Unpack(from_numpy(object).ptr());
  }
  throw imagepiece::Error(ErrorCode::kInvalidType, std::string("images must be a torch.Tensor or numpy.ndarray, got ") +
                                                        py::str(py::type::of(object).attr("__name__")).cast<std::string>());
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "ImagePiece C++ runtime (imagepiece::Runtime) for Python";

  // ip_runtime.Error carries `.code`, the ErrorCode's name ("invalid_batch", "incompatible", ...).
  static py::handle error_type = py::exception<imagepiece::Error>(m, "Error", PyExc_RuntimeError).release();
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const imagepiece::Error& e) {
      py::object instance = py::reinterpret_borrow<py::object>(error_type)(e.what());
      instance.attr("code") = imagepiece::error_code_name(e.code());
      PyErr_SetObject(error_type.ptr(), instance.ptr());
    }
  });

  py::class_<RuntimeOptions>(m, "RuntimeOptions")
      .def(py::init<>())
      .def_readwrite("device", &RuntimeOptions::device)
      .def_readwrite("instances", &RuntimeOptions::instances)
      .def_readwrite("cuda_graphs", &RuntimeOptions::cuda_graphs)
      .def_readwrite("batch_buckets", &RuntimeOptions::batch_buckets);

  py::class_<Runtime>(m, "Runtime")
      .def(py::init([](const std::string& artifact, const std::string& device, int instances, bool cuda_graphs,
                       std::vector<int64_t> batch_buckets) {
             RuntimeOptions options;
             options.device = device;
             options.instances = instances;
             options.cuda_graphs = cuda_graphs;
             options.batch_buckets = std::move(batch_buckets);
             py::gil_scoped_release release;  // loading and CUDA-graph capture take a while
             return std::make_unique<Runtime>(artifact, std::move(options));
           }),
           py::arg("artifact"), py::arg("device") = "", py::arg("instances") = 1, py::arg("cuda_graphs") = false,
           py::arg("batch_buckets") = std::vector<int64_t>{})
      .def(
          "run",
          [](Runtime& self, const py::object& images, const py::object& logits) -> py::object {
            const bool numpy_in = is_ndarray(images);
            at::Tensor input = as_tensor(images);
            if (!logits.is_none()) {
              at::Tensor output = as_tensor(logits);
              {
                py::gil_scoped_release release;
                self.run(input, output);
              }
              return logits;
            }
            at::Tensor output;
            {
              py::gil_scoped_release release;
              output = self.run(input);
            }
            py::object tensor = py::reinterpret_steal<py::object>(THPVariable_Wrap(output));
            return numpy_in ? tensor.attr("numpy")() : tensor;
          },
          py::arg("images"), py::arg("logits") = py::none(),
          "Logits for a batch of images (torch.Tensor or numpy.ndarray, NCHW, contiguous). With `logits` given, "
          "fills it in place and returns it.")
      .def_property_readonly("info", [](const Runtime& self) { return info_dict(self.info()); })
      .def_property_readonly("options", [](const Runtime& self) { return self.options(); });
}
