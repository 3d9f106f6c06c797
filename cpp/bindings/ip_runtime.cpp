// Python module ip_runtime._core: imagepiece::Runtime bound 1:1 (same names and arguments).
// Uses torch's own pybind11 and tensor casters, so torch.Tensor crosses without copies; numpy
// arrays are wrapped zero-copy and numpy comes back for numpy in.
//
// Every failure of a call is an ip_runtime.Error: arguments are taken as Python objects and converted
// here (paths may be os.PathLike; an option of the wrong type is `invalid_type`), and a numpy array
// torch cannot wrap is refused with the code of what is wrong with it, never a TypeError/ValueError.
#include <torch/csrc/utils/tensor_numpy.h>
#include <torch/python.h>

#include <cstring>

#include "batcher_bindings.h"
#include "conversions.h"
#include "imagepiece/runtime.h"

namespace py = pybind11;
using imagepiece::Error;
using imagepiece::ErrorCode;
using imagepiece::Runtime;
using imagepiece::RuntimeOptions;

namespace {

std::string type_name(const py::handle& object) { return py::str(py::type::of(object).attr("__name__")).cast<std::string>(); }

// A tensor over the array's memory (no copy). For images, problems are named by their own code; for
// the output buffer every problem is `invalid_output` (it must be writable: torch would otherwise
// write into a read-only array, a bytes object or a read-only mmap).
at::Tensor tensor_from_array(const py::handle& array, bool is_output) {
  auto refuse = [&](ErrorCode code, const std::string& why) -> Error {
    return Error(is_output ? ErrorCode::kInvalidOutput : code, std::string(is_output ? "logits" : "images") + " " + why);
  };
  const py::object dtype = array.attr("dtype");
  if (!dtype.attr("isnative").cast<bool>()) {
    throw refuse(ErrorCode::kInvalidDtype, "must be in native byte order, got numpy dtype " + py::str(dtype).cast<std::string>());
  }
  if (is_output && !array.attr("flags").attr("writeable").cast<bool>()) {
    throw refuse(ErrorCode::kInvalidOutput, "must be a writable array (this one is read-only: a view of bytes, a read-only mmap, "
                                            "or writeable=False)");
  }
  const auto itemsize = array.attr("itemsize").cast<int64_t>();
  for (const auto& stride : array.attr("strides")) {
    if (stride.cast<int64_t>() < 0) throw refuse(ErrorCode::kNotContiguous, "must be contiguous (this array has negative strides)");
    // A field of a structured array, or a byte-offset view: not a dtype problem, a layout one.
    if (itemsize > 0 && stride.cast<int64_t>() % itemsize != 0) {
      throw refuse(ErrorCode::kNotContiguous, "must be contiguous (its strides are not whole elements: a view into wider records)");
    }
  }
  try {
    return torch::utils::tensor_from_numpy(array.ptr(), /*warn_if_not_writeable=*/false);
  } catch (const std::exception& error) {
    PyErr_Clear();
    throw refuse(ErrorCode::kInvalidDtype, "cannot be used as a tensor (numpy dtype " + py::str(dtype).cast<std::string>() + "): " + error.what());
  }
}

py::handle error_type;  // ip_runtime.Error, made at import

}  // namespace

// Conversions shared by every binding file of the module (declared for them in conversions.h): each
// refuses a wrong argument with an imagepiece::Error, never a TypeError.
namespace imagepiece::python {

[[noreturn]] void wrong_type(const std::string& what, const std::string& wanted, const py::handle& object) {
  throw Error(ErrorCode::kInvalidType, what + " must be " + wanted + ", got " + type_name(object));
}

int64_t int_argument(const std::string& what, const py::handle& object) {
  // operator.index: ints and numpy integers, never floats, strings or bools.
  if (!py::isinstance<py::bool_>(object)) {
    try {
      return py::module_::import("operator").attr("index")(object).cast<int64_t>();
    } catch (const py::error_already_set&) {
    } catch (const py::cast_error&) {
      throw Error(ErrorCode::kInvalidOption, what + " is out of range");
    }
  }
  wrong_type(what, "an int", object);
}

bool bool_argument(const std::string& what, const py::handle& object) {
  static py::object numpy_bool = py::module_::import("numpy").attr("bool_");
  if (py::isinstance<py::bool_>(object) || py::isinstance(object, numpy_bool)) return PyObject_IsTrue(object.ptr()) == 1;
  wrong_type(what, "True or False", object);
}

std::vector<int64_t> int_list_argument(const std::string& what, const py::handle& object) {
  if (py::isinstance<py::str>(object) || !py::hasattr(object, "__iter__")) wrong_type(what, "a sequence of ints", object);
  std::vector<int64_t> values;
  try {
    for (const auto& item : object) values.push_back(int_argument(what + " item", item));
  } catch (const py::error_already_set&) {
    wrong_type(what, "a sequence of ints", object);
  }
  return values;
}

bool is_ndarray(const py::handle& object) {
  static py::object ndarray = py::module_::import("numpy").attr("ndarray");
  return py::isinstance(object, ndarray);
}

at::Tensor as_tensor(const py::handle& object, bool is_output) {
  if (THPVariable_Check(object.ptr())) return THPVariable_Unpack(object.ptr());
  if (is_ndarray(object)) return tensor_from_array(object, is_output);
  const std::string what = is_output ? "logits" : "images";
  throw Error(is_output ? ErrorCode::kInvalidOutput : ErrorCode::kInvalidType,
              what + " must be a torch.Tensor or numpy.ndarray, got " + type_name(object));
}

py::object numpy_logits(const at::Tensor& logits) {
  // CUDA logits to the host and bf16 to float32 (every bf16 value is a float32 value) in one copy; none for CPU float32.
  const at::ScalarType type = logits.scalar_type() == at::kBFloat16 ? at::kFloat : logits.scalar_type();
  const at::Tensor host = logits.to(at::kCPU, type);
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(host)).attr("numpy")();
}

py::object error_object(const Error& error) {
  // A message may quote bytes of a corrupt file: build it whatever their encoding.
  auto message = py::reinterpret_steal<py::object>(
      PyUnicode_DecodeUTF8(error.what(), static_cast<Py_ssize_t>(std::strlen(error.what())), "backslashreplace"));
  py::object instance = py::reinterpret_borrow<py::object>(error_type)(message);
  instance.attr("code") = error_code_name(error.code());
  return instance;
}

}  // namespace imagepiece::python

namespace {

using namespace imagepiece::python;

std::string path_argument(const py::handle& object) {
  std::string path;
  try {
    // The file system's bytes (os.fsencode), not UTF-8: a name that is not UTF-8 (surrogate-escaped in a str) is a path too.
    py::module_ os = py::module_::import("os");
    path = os.attr("fsencode")(os.attr("fspath")(object)).cast<py::bytes>().cast<std::string>();
  } catch (const py::error_already_set&) {
    wrong_type("artifact", "a path (str, bytes or os.PathLike)", object);
  }
  // The C library would stop reading at the NUL and open another file than the one named (open() refuses it too).
  if (path.find('\0') != std::string::npos) throw Error(ErrorCode::kInvalidType, "artifact path contains a NUL byte");
  return path;
}

std::string device_argument(const py::handle& object) {
  // A torch.device is accepted by its name ("cuda:1").
  if (py::isinstance<py::str>(object) || py::isinstance(object, py::module_::import("torch").attr("device"))) {
    try {
      return py::str(object).cast<std::string>();
    } catch (const py::cast_error&) {  // a lone surrogate: names no device
      throw Error(ErrorCode::kInvalidOption, "device must be a name such as 'cpu' or 'cuda:0', got a str that is not valid UTF-8");
    }
  }
  wrong_type("device", "a str such as 'cpu' or 'cuda:0'", object);
}

int instances_argument(const py::handle& object) {
  const int64_t instances = int_argument("instances", object);
  if (instances < INT32_MIN || instances > INT32_MAX) {
    throw Error(ErrorCode::kInvalidOption, "instances must be in [1, 64], got " + std::to_string(instances));
  }
  return static_cast<int>(instances);  // the runtime checks the range
}

py::dict info_dict(const imagepiece::ModelInfo& info) {
  py::dict out;
  out["model_name"] = info.model_name;
  out["arch"] = info.arch;
  out["method"] = info.method;
  out["dtype"] = info.dtype;
  out["precision"] = info.precision;
  out["input_format"] = info.input_format;
  out["device_type"] = info.device_type;
  out["cuda_capability"] = info.cuda_capability.empty() ? py::object(py::none()) : py::object(py::str(info.cuda_capability));
  out["cpu_capability"] = info.cpu_capability.empty() ? py::object(py::none()) : py::object(py::str(info.cpu_capability));
  out["cpu_features"] = info.device_type == "cpu" ? py::object(py::cast(info.cpu_features)) : py::object(py::none());
  out["torch_version"] = info.torch_version;
  out["created"] = info.created;
  out["checkpoint_sha256"] = info.checkpoint_sha256;
  out["artifact_sha256"] = info.artifact_sha256;
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
  // Valid UTF-8 JSON: the runtime read it strictly.
  out["metadata"] = py::module_::import("json").attr("loads")(info.metadata_json);
  return out;
}

std::string quoted(const std::string& text) { return py::repr(py::str(text)).cast<std::string>(); }

std::string batch_range(int64_t low, int64_t high) { return low == high ? std::to_string(low) : std::to_string(low) + ".." + std::to_string(high); }

std::string options_repr(const RuntimeOptions& options) {
  return "ip_runtime.RuntimeOptions(device=" + quoted(options.device) + ", instances=" + std::to_string(options.instances) +
         ", cuda_graphs=" + (options.cuda_graphs ? "True" : "False") + ", batch_buckets=" + py::repr(py::cast(options.batch_buckets)).cast<std::string>() + ")";
}

std::string runtime_repr(const py::handle& self) {
  const Runtime* loaded = nullptr;
  try {
    loaded = &runtime(self);
  } catch (const Error&) {  // made without __init__: a repr must not raise (debuggers, logs show it)
    return "<ip_runtime.Runtime, not initialised>";
  }
  const imagepiece::ModelInfo& info = loaded->info();
  // The path as the file system's bytes (it need not be UTF-8): shown as os.fsdecode gives it back.
  const py::object path = py::module_::import("os").attr("fsdecode")(py::bytes(loaded->artifact()));
  return "<ip_runtime.Runtime artifact=" + py::repr(path).cast<std::string>() + " model=" + quoted(info.model_name) +
         " device=" + quoted(loaded->options().device) + " batch=" + batch_range(info.batch_min, info.batch_max) +
         " precision=" + quoted(info.precision) + ">";
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "ImagePiece C++ runtime (imagepiece::Runtime) for Python";

  // ip_runtime.Error carries `.code`, the ErrorCode's name ("invalid_batch", "incompatible", ...).
  error_type = py::exception<Error>(m, "Error", PyExc_RuntimeError).release();
  // An Error a caller makes (to stand in for ours in a test or a wrapper) has no code of its own: None, not AttributeError.
  error_type.attr("code") = py::none();
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const Error& e) {
      PyErr_SetObject(error_type.ptr(), error_object(e).ptr());
    }
  });

  py::class_<RuntimeOptions>(m, "RuntimeOptions")
      .def(py::init<>())
      .def_property(
          "device", [](const RuntimeOptions& o) { return o.device; },
          [](RuntimeOptions& o, const py::object& value) { o.device = device_argument(value); })
      .def_property(
          "instances", [](const RuntimeOptions& o) { return o.instances; },
          [](RuntimeOptions& o, const py::object& value) { o.instances = instances_argument(value); })
      .def_property(
          "cuda_graphs", [](const RuntimeOptions& o) { return o.cuda_graphs; },
          [](RuntimeOptions& o, const py::object& value) { o.cuda_graphs = bool_argument("cuda_graphs", value); })
      .def_property(
          "batch_buckets", [](const RuntimeOptions& o) { return o.batch_buckets; },
          [](RuntimeOptions& o, const py::object& value) { o.batch_buckets = int_list_argument("batch_buckets", value); })
      .def("__repr__", &options_repr);

  py::class_<Runtime>(m, "Runtime")
      .def(py::init([](const py::object& artifact, const py::object& device, const py::object& instances, const py::object& cuda_graphs,
                       const py::object& batch_buckets) {
             const std::string path = path_argument(artifact);
             RuntimeOptions options;
             options.device = device_argument(device);
             options.instances = instances_argument(instances);
             options.cuda_graphs = bool_argument("cuda_graphs", cuda_graphs);
             options.batch_buckets = int_list_argument("batch_buckets", batch_buckets);
             py::gil_scoped_release release;  // loading and CUDA-graph capture take a while
             return std::make_unique<Runtime>(path, std::move(options));
           }),
           py::arg("artifact"), py::arg("device") = "", py::arg("instances") = 1, py::arg("cuda_graphs") = false,
           py::arg("batch_buckets") = py::tuple())
      .def(
          "run",
          [](const py::object& instance, const py::object& images, const py::object& logits) -> py::object {
            Runtime& self = runtime(instance);
            const bool numpy_in = is_ndarray(images);
            at::Tensor input = as_tensor(images, /*is_output=*/false);
            if (!logits.is_none()) {
              at::Tensor output = as_tensor(logits, /*is_output=*/true);
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
            return numpy_in ? numpy_logits(output) : py::reinterpret_steal<py::object>(THPVariable_Wrap(output));
          },
          py::arg("images"), py::arg("logits") = py::none(),
          "Logits for a batch of images (torch.Tensor or numpy.ndarray, laid out as info['input_format'] says: "
          "[B, 3, H, W] floats for float_nchw, [B, H, W, 3] uint8 for uint8_nhwc). numpy images give numpy logits (bf16 ones as float32). With "
          "`logits` given (writable, contiguous, without requires_grad), fills it in place and returns it.")
      .def_property_readonly("info", [](const py::object& self) { return info_dict(runtime(self).info()); })
      .def_property_readonly("options", [](const py::object& self) { return runtime(self).options(); },
                             "A copy of the options in effect (device resolved: 'cpu', 'cuda:N'). Setting its fields changes nothing: "
                             "options are fixed at load; create another Runtime to change them.")
      .def("__repr__", &runtime_repr);

  bind_batcher(m);  // ip_runtime.Batcher (batcher_bindings.cpp)
}
