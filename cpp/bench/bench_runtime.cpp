// bench_runtime ARTIFACT [google-benchmark flags]
//
// BM_AotiRunner: PyTorch's AOTI runner called directly (the floor); BM_Runtime: imagepiece::Runtime
// allocating its output; BM_RuntimeInto: run(images, logits) into a reused buffer. Batch sizes sweep
// 1..256 within the artifact's batch range; the ratio of BM_Runtime to BM_AotiRunner at the same
// batch is the runtime's overhead (validation, dispatch, copies). Images are what the artifact takes (fp32, fp16,
// bf16, or uint8 pixels); a .pt2 has no direct-runner baseline (the CPU runner loads a bare .so).
#include <benchmark/benchmark.h>
#include <imagepiece/runtime.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cpu.h>

#include <ATen/ATen.h>

#include <iostream>
#include <memory>
#include <string>
#include <vector>

namespace {

std::string g_artifact;

at::Tensor make_images(const imagepiece::ModelInfo& info, int64_t batch) {
  at::manual_seed(0);
  const int64_t channels = info.input_shape[0], height = info.input_shape[1], width = info.input_shape[2];
  if (info.input_format == "uint8_nhwc") return at::randint(0, 256, {batch, height, width, channels}, at::kByte);
  const at::Tensor images = at::randn({batch, channels, height, width});
  if (info.dtype == "bf16") return images.to(at::kBFloat16);
  return info.dtype == "fp16" ? images.to(at::kHalf) : images;
}

imagepiece::Runtime& shared_runtime() {
  static imagepiece::Runtime runtime(g_artifact);
  return runtime;
}

torch::inductor::AOTIModelContainerRunnerCpu& direct_runner() {
  static torch::inductor::AOTIModelContainerRunnerCpu runner(g_artifact, 1);
  return runner;
}

void BM_AotiRunner(benchmark::State& state) {
  auto& runner = direct_runner();
  const auto images = make_images(shared_runtime().info(), state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(runner.run({images}));
  state.SetItemsProcessed(state.iterations() * state.range(0));
}

void BM_Runtime(benchmark::State& state) {
  auto& runtime = shared_runtime();
  const auto images = make_images(runtime.info(), state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(runtime.run(images));
  state.SetItemsProcessed(state.iterations() * state.range(0));
}

void BM_RuntimeInto(benchmark::State& state) {
  auto& runtime = shared_runtime();
  const auto images = make_images(runtime.info(), state.range(0));
  auto logits = at::empty_like(runtime.run(images));  // the artifact's logits dtype
  for (auto _ : state) runtime.run(images, logits);
  state.SetItemsProcessed(state.iterations() * state.range(0));
}

void register_all(const imagepiece::ModelInfo& info, bool direct_runner) {
  std::vector<int64_t> batches;
  for (int64_t batch : {1, 2, 4, 8, 16, 32, 64, 128, 256}) {
    if (batch >= info.batch_min && batch <= info.batch_max) batches.push_back(batch);
  }
  if (batches.empty()) batches.push_back(info.batch_min);  // a static batch off the sweep (3, say)
  for (int64_t batch : batches) {
    // Interleave the variants per batch size so drift hits them alike.
    if (direct_runner) {
      benchmark::RegisterBenchmark("BM_AotiRunner", BM_AotiRunner)->Arg(batch)->UseRealTime()->Unit(benchmark::kMillisecond);
    }
    benchmark::RegisterBenchmark("BM_Runtime", BM_Runtime)->Arg(batch)->UseRealTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("BM_RuntimeInto", BM_RuntimeInto)->Arg(batch)->UseRealTime()->Unit(benchmark::kMillisecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (argc < 2) {
    std::cerr << "usage: bench_runtime ARTIFACT.so [--benchmark_* flags]\n";
    return 2;
  }
  g_artifact = argv[1];
  try {
    const auto& info = shared_runtime().info();
    if (info.device_type != "cpu") {
      std::cerr << "bench_runtime measures CPU artifacts (the direct-runner baseline is the CPU runner)\n";
      return 2;
    }
    benchmark::AddCustomContext("artifact", info.model_name + " " + info.dtype + " batch " + std::to_string(info.batch_min) + ".." +
                                                std::to_string(info.batch_max));
    benchmark::AddCustomContext("torch", info.torch_version);
    // Bad input throws inside a benchmark body, which google-benchmark does not catch (std::terminate): one run here first.
    shared_runtime().run(make_images(info, info.batch_min));
    const bool with_direct_runner = !g_artifact.ends_with(".pt2");
    if (with_direct_runner) {
      direct_runner().run({make_images(info, info.batch_min)});  // loaded here too, where a failure is caught
    } else {
      std::cerr << "bench_runtime: a .pt2 has no BM_AotiRunner baseline (PyTorch's CPU runner loads a .so)\n";
    }
    register_all(info, with_direct_runner);
  } catch (const imagepiece::Error& error) {
    std::cerr << "bench_runtime: error [" << imagepiece::error_code_name(error.code()) << "]: " << error.what() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "bench_runtime: error: " << error.what() << "\n";
    return 1;
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
