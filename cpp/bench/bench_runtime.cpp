// bench_runtime ARTIFACT [google-benchmark flags]
//
// BM_AotiRunner: PyTorch's AOTI runner called directly (the floor); BM_Runtime: imagepiece::Runtime
// allocating its output; BM_RuntimeInto: run(images, logits) into a reused buffer. Batch sizes sweep
// 1..256 within the artifact's batch range; the ratio of BM_Runtime to BM_AotiRunner at the same
// batch is the runtime's overhead (validation, dispatch, copies).
#include <benchmark/benchmark.h>
#include <imagepiece/runtime.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cpu.h>

#include <ATen/ATen.h>

#include <iostream>
#include <memory>
#include <string>

namespace {

std::string g_artifact;

at::Tensor make_images(const imagepiece::ModelInfo& info, int64_t batch) {
  at::manual_seed(0);
  return at::randn({batch, info.input_shape[0], info.input_shape[1], info.input_shape[2]});
}

imagepiece::Runtime& shared_runtime() {
  static imagepiece::Runtime runtime(g_artifact);
  return runtime;
}

void BM_AotiRunner(benchmark::State& state) {
  static torch::inductor::AOTIModelContainerRunnerCpu runner(g_artifact, 1);
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
  auto logits = at::empty({state.range(0), runtime.info().num_classes});
  for (auto _ : state) runtime.run(images, logits);
  state.SetItemsProcessed(state.iterations() * state.range(0));
}

void register_all(const imagepiece::ModelInfo& info) {
  for (int64_t batch : {1, 2, 4, 8, 16, 32, 64, 128, 256}) {
    if (batch < info.batch_min || batch > info.batch_max) continue;
    // Interleave the variants per batch size so drift hits them alike.
    benchmark::RegisterBenchmark("BM_AotiRunner", BM_AotiRunner)->Arg(batch)->UseRealTime()->Unit(benchmark::kMillisecond);
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
    register_all(info);
  } catch (const imagepiece::Error& error) {
    std::cerr << "bench_runtime: error [" << imagepiece::error_code_name(error.code()) << "]: " << error.what() << "\n";
    return 1;
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
