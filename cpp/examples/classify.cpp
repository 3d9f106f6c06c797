// classify: load an ImagePiece artifact, classify a batch, print top-5 per image and latency.
//
//   classify ARTIFACT [--input images.f32] [--batch N] [--device cpu|cuda] [--repeats N] [--cuda-graphs]
//
// --input is raw float32 NCHW data, already preprocessed (B is the file size over 3*224*224*4), or for
// an artifact compiled with --input-format uint8, raw uint8 NHWC RGB pixels (B = size over 224*224*3);
// without it the batch is synthetic (seeded noise, --batch images), so the app runs with nothing but the artifact.
// Exit status 2 on bad arguments; 1 on any other failure (an imagepiece::Error with its code, such as a --batch the
// artifact does not run, known once it is loaded), message on stderr.
#include <imagepiece/runtime.h>

#include <ATen/ATen.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Arguments {
  std::string artifact, input, device;
  int64_t batch = 0;
  int repeats = 20;
  bool cuda_graphs = false;
};

int64_t positive_number(const std::string& flag, const std::string& text) {
  size_t used = 0;
  int64_t number = 0;
  try {
    number = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || number < 1) throw std::invalid_argument(flag + " needs a whole number >= 1, got '" + text + "'");
  return number;
}

// Checked before the artifact loads (which can take seconds); an empty name (an unset shell variable) is not "no
// --input", which would classify synthetic noise as if it were the file.
std::string existing_file(const std::string& flag, const std::string& path) {
  if (path.empty()) throw std::invalid_argument(flag + " needs a file name, got ''");
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) throw std::invalid_argument(flag + " " + path + " is not a file");
  return path;
}

Arguments parse(int argc, char** argv) {
  Arguments args;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--input") args.input = existing_file(flag, value());
    else if (flag == "--batch") args.batch = positive_number(flag, value());
    else if (flag == "--device") args.device = value();
    else if (flag == "--repeats") args.repeats = static_cast<int>(std::min<int64_t>(positive_number(flag, value()), 1'000'000));
    else if (flag == "--cuda-graphs") args.cuda_graphs = true;
    else if (flag.rfind("--", 0) == 0) throw std::invalid_argument("unknown option " + flag);
    else if (!args.artifact.empty()) throw std::invalid_argument("one ARTIFACT, got '" + args.artifact + "' and '" + flag + "'");
    else args.artifact = flag;
  }
  if (args.artifact.empty()) throw std::invalid_argument("usage: classify ARTIFACT [--input images.f32] [--batch N] [--device cpu|cuda] [--repeats N] [--cuda-graphs]");
  if (!args.input.empty() && args.batch) throw std::invalid_argument("--batch sets the synthetic batch; with --input the file's size sets it");
  return args;
}

// Before anything is allocated for them: a batch the artifact would refuse can be huge.
void check_batch(int64_t batch, const imagepiece::ModelInfo& info) {
  if (batch < info.batch_min || batch > info.batch_max) {
    throw imagepiece::Error(imagepiece::ErrorCode::kInvalidBatch, "a batch of " + std::to_string(batch) + " images; the artifact runs " +
                            std::to_string(info.batch_min) + ".." + std::to_string(info.batch_max));
  }
}

at::Tensor load_images(const Arguments& args, const imagepiece::ModelInfo& info) {
  const int64_t channels = info.input_shape[0], height = info.input_shape[1], width = info.input_shape[2];
  const bool pixels = info.input_format == "uint8_nhwc";  // the artifact normalises uint8 [B, H, W, 3] itself
  auto shape = [&](int64_t batch) { return pixels ? std::vector<int64_t>{batch, height, width, channels} : std::vector<int64_t>{batch, channels, height, width}; };
  if (args.input.empty()) {
    const int64_t batch = args.batch ? args.batch : info.batch_min;
    check_batch(batch, info);
    at::manual_seed(0);
    return pixels ? at::randint(0, 256, shape(batch), at::kByte) : at::randn(shape(batch));
  }
  const int64_t per_image = channels * height * width * (pixels ? 1 : 4);
  std::ifstream file(args.input, std::ios::binary | std::ios::ate);
  if (!file) throw std::invalid_argument("cannot open input file " + args.input);
  const auto bytes = static_cast<int64_t>(file.tellg());
  if (bytes == 0 || bytes % per_image != 0) {
    throw std::invalid_argument(args.input + " holds " + std::to_string(bytes) + " bytes, not a whole number of " +
                                (pixels ? "uint8 [H, W, 3] images" : "float32 [3, H, W] images") + " of " + std::to_string(per_image) + " bytes");
  }
  check_batch(bytes / per_image, info);
  auto images = at::empty(shape(bytes / per_image), pixels ? at::kByte : at::kFloat);
  file.seekg(0);
  if (!file.read(static_cast<char*>(images.data_ptr()), bytes) || file.gcount() != bytes) {
    throw std::runtime_error("cannot read " + std::to_string(bytes) + " bytes from " + args.input + " (did it change meanwhile?)");
  }
  return images;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Arguments args = parse(argc, argv);
    imagepiece::RuntimeOptions options;
    options.device = args.device;
    options.cuda_graphs = args.cuda_graphs;
    imagepiece::Runtime runtime(args.artifact, options);
    const auto& info = runtime.info();
    std::cout << "model " << info.model_name << " (" << info.dtype << ", " << info.device_type << ", batch "
              << info.batch_min << ".." << info.batch_max << ")\n";

    at::Tensor images = load_images(args, info);
    if (info.dtype == "fp16") images = images.to(at::kHalf);  // (a uint8 artifact's dtype is "uint8": left as it is)
    if (info.dtype == "bf16") images = images.to(at::kBFloat16);
    at::Tensor logits = runtime.run(images).to(at::kCPU, at::kFloat);
    const int64_t shown = std::min<int64_t>(5, logits.size(1));  // a fine-tuned head may have fewer classes
    auto top = logits.topk(shown, /*dim=*/1);
    auto values = std::get<0>(top), classes = std::get<1>(top);
    std::printf("top-%lld classes (logit):\n", static_cast<long long>(shown));
    for (int64_t i = 0; i < logits.size(0); ++i) {
      std::printf("image %lld:", static_cast<long long>(i));
      for (int64_t k = 0; k < shown; ++k) {
        std::printf(" %lld (%.4f)", static_cast<long long>(classes[i][k].item<int64_t>()), values[i][k].item<float>());
      }
      std::printf("\n");
    }

    // Latency: the output buffer is reused, the model is warm; median over `repeats` calls.
    at::Tensor out = at::empty({images.size(0), info.num_classes}, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
    std::vector<double> milliseconds;
    for (int r = 0; r < args.repeats; ++r) {
      const auto start = std::chrono::steady_clock::now();
      runtime.run(images, out);
      milliseconds.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(milliseconds.begin(), milliseconds.end());
    const double median = milliseconds[milliseconds.size() / 2];
    std::printf("latency: p50 %.2f ms over %d runs, batch %lld -> %.1f img/s\n", median, args.repeats,
                static_cast<long long>(images.size(0)), 1000.0 * static_cast<double>(images.size(0)) / median);
    return 0;
  } catch (const imagepiece::Error& error) {
    std::cerr << "classify: error [" << imagepiece::error_code_name(error.code()) << "]: " << error.what() << "\n";
    return 1;
  } catch (const std::invalid_argument& error) {
    std::cerr << "classify: error: " << error.what() << "\n";
    return 2;
  } catch (const c10::Error& error) {  // ATen's own (e.g. out of memory), without its C++ backtrace
    std::cerr << "classify: error: " << error.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "classify: error: " << error.what() << "\n";
    return 1;
  }
}
