// contract_checks ARTIFACT CHECK: one C++ API promise per CHECK, "ok" on stdout when it holds; a broken
// promise prints why and exits 1, a crash is the test's failure signal. ARTIFACT: a dynamic-batch one.
#include <imagepiece/batcher.h>
#include <imagepiece/runtime.h>

#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

bool fail(const std::string& why) {
  std::printf("%s\n", why.c_str());
  return false;
}

// Every method of a moved-from Runtime throws kInvalidOption; none dereferences the moved-away state.
bool moved_from_runtime(const std::string& artifact) {
  imagepiece::Runtime runtime(artifact, {.device = "cpu", .instances = 1});  // the README's initialiser form
  imagepiece::Runtime moved_to(std::move(runtime));
  const auto& shape = moved_to.info().input_shape;
  const at::Tensor images = at::randn({1, shape[0], shape[1], shape[2]});
  const std::vector<std::pair<const char*, std::function<void()>>> calls = {
      {"run", [&] { runtime.run(images); }},
      {"run into logits", [&] { at::Tensor logits = at::empty({1, moved_to.info().num_classes}); runtime.run(images, logits); }},
      {"check_sample", [&] { runtime.check_sample(images[0]); }},
      {"info", [&] { (void)runtime.info(); }},
      {"options", [&] { (void)runtime.options(); }},
      {"artifact", [&] { (void)runtime.artifact(); }},
      {"Batcher", [&] { imagepiece::Batcher batcher(runtime); }},
  };
  for (const auto& [name, call] : calls) {
    try {
      call();
      return fail(std::string(name) + " on a moved-from Runtime did not throw");
    } catch (const imagepiece::Error& error) {
      if (error.code() != imagepiece::ErrorCode::kInvalidOption) return fail(std::string(name) + ": " + error.what());
    }
  }
  if (moved_to.artifact() != artifact) return fail("the moved-to Runtime names " + moved_to.artifact() + ", not " + artifact);
  return moved_to.run(images).size(0) == 1 || fail("the moved-to Runtime does not run");
}

// A Batcher shares its Runtime's model: the Runtime may move (a vector growing) or be destroyed meanwhile.
bool batcher_keeps_a_moved_or_destroyed_runtimes_model(const std::string& artifact) {
  std::vector<imagepiece::Runtime> runtimes;
  runtimes.emplace_back(artifact);
  const auto& shape = runtimes[0].info().input_shape;
  const at::Tensor image = at::randn({shape[0], shape[1], shape[2]});
  const at::Tensor expected = runtimes[0].run(image.unsqueeze(0))[0];
  imagepiece::Batcher batcher(runtimes[0]);
  for (int i = 0; i < 3; ++i) runtimes.emplace_back(artifact);  // reallocates: runtimes[0] is moved
  if (!at::allclose(batcher.submit(image).get(), expected, 1e-4, 1e-4)) return fail("wrong logits after the Runtime moved");
  runtimes.clear();
  return at::allclose(batcher.submit(image).get(), expected, 1e-4, 1e-4) || fail("wrong logits after the Runtime was destroyed");
}

// shutdown(false) completes queued requests with kCancelled on the calling thread; a callback may destroy
// the Batcher there (as it may on a worker thread) without shutdown() touching the freed object.
bool batcher_destroyed_by_a_cancellation_callback(const std::string& artifact) {
  imagepiece::Runtime runtime(artifact);
  const auto& shape = runtime.info().input_shape;
  auto batcher = std::make_unique<imagepiece::Batcher>(
      runtime, imagepiece::BatcherOptions{.max_batch = runtime.info().batch_max, .max_delay_us = imagepiece::BatcherOptions::kMaxDelayUs});
  std::vector<imagepiece::ErrorCode> outcomes;
  for (int i = 0; i < 3; ++i) {
    batcher->submit(at::randn({shape[0], shape[1], shape[2]}), [&, i](at::Tensor, std::exception_ptr error) {
      try {
        if (error) std::rethrow_exception(error);
      } catch (const imagepiece::Error& failure) {
        outcomes.push_back(failure.code());
      }
      if (i == 0) batcher.reset();  // the Batcher whose shutdown() is running
    });
  }
  batcher->shutdown(/*drain=*/false);
  if (batcher) return fail("the callback did not destroy the Batcher");
  return outcomes == std::vector<imagepiece::ErrorCode>(3, imagepiece::ErrorCode::kCancelled) ||
         fail("not every queued request was cancelled once");
}

// Runs `scenario` on a thread of its own: false when it has not returned within `seconds` (a deadlock).
bool returns_within(int seconds, const std::function<void()>& scenario) {
  auto finished = std::async(std::launch::async, scenario);
  if (finished.wait_for(std::chrono::seconds(seconds)) == std::future_status::ready) {
    finished.get();
    return true;
  }
  std::printf("deadlock: the scenario has not returned after %d s\n", seconds);
  std::fflush(stdout);
  std::_Exit(1);  // a hung std::async would hang the process's exit too
}

// A callback destroys its Batcher while another worker's callbacks wait for a lock the destroying callback holds
// (the once-per-batch lock around_completions is for): the destructor waits for no worker, and the requests it
// cancels complete inside the same hook call (a second call would take the lock again on this thread).
bool batcher_destroyed_by_a_callback_under_the_completions_lock(const std::string& artifact) {
  imagepiece::Runtime runtime(artifact, {.instances = 2});  // two workers
  const auto& shape = runtime.info().input_shape;
  std::mutex completions_lock;
  auto owner = std::make_shared<std::unique_ptr<imagepiece::Batcher>>();
  *owner = std::make_unique<imagepiece::Batcher>(
      runtime, imagepiece::BatcherOptions{.max_batch = 1, .max_delay_us = 0, .around_completions = [&](const std::function<void()>& complete) {
        std::lock_guard<std::mutex> lock(completions_lock);
        complete();
      }});
  std::atomic<int> completed{0}, first{0};
  const int requests = 6;
  if (!returns_within(60, [&] {
        for (int i = 0; i < requests; ++i) {
          (*owner)->submit(at::randn({shape[0], shape[1], shape[2]}), [&, owner](at::Tensor, std::exception_ptr) {
            if (first++ == 0) {
              std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the other worker's batch ends: it waits for the lock
              owner->reset();
            }
            ++completed;
          });
        }
        while (completed < requests) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      })) {
    return false;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the detached workers exit before the process does
  return !*owner || fail("the callback did not destroy the Batcher");
}

// shutdown() joins the workers while one of their callbacks destroys the Batcher: neither waits for the other.
bool batcher_destroyed_by_a_callback_during_shutdown(const std::string& artifact) {
  imagepiece::Runtime runtime(artifact);
  const auto& shape = runtime.info().input_shape;
  auto owner = std::make_shared<std::unique_ptr<imagepiece::Batcher>>(
      std::make_unique<imagepiece::Batcher>(runtime, imagepiece::BatcherOptions{.max_batch = 1, .max_delay_us = 0}));
  imagepiece::Batcher* batcher = owner->get();
  std::atomic<bool> in_callback{false};
  batcher->submit(at::randn({shape[0], shape[1], shape[2]}), [&, owner](at::Tensor, std::exception_ptr) {
    in_callback = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // shutdown() is joining this worker meanwhile
    owner->reset();
  });
  while (!in_callback) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return returns_within(60, [&] { batcher->shutdown(/*drain=*/true); }) && (!*owner || fail("the callback did not destroy the Batcher"));
}

// A submit() without a completion callback is refused (kInvalidType) and counted with the other refusals.
bool submit_without_a_callback(const std::string& artifact) {
  imagepiece::Runtime runtime(artifact);
  const auto& shape = runtime.info().input_shape;
  imagepiece::Batcher batcher(runtime);
  try {
    batcher.submit(at::randn({shape[0], shape[1], shape[2]}), imagepiece::Batcher::Completion{});
    return fail("an empty callback was accepted");
  } catch (const imagepiece::Error& error) {
    if (error.code() != imagepiece::ErrorCode::kInvalidType) return fail(error.what());
  }
  const auto rejected = batcher.stats().rejected;
  return (rejected.count(imagepiece::ErrorCode::kInvalidType) && rejected.at(imagepiece::ErrorCode::kInvalidType) == 1) ||
         fail("the refusal is not in stats().rejected");
}

// options() reports the device in effect: "" (the artifact's) and "cpu:0" both run on, and say, "cpu".
bool options_name_the_device_in_effect(const std::string& artifact) {
  for (const std::string given : {"", "cpu", "cpu:0"}) {
    imagepiece::Runtime runtime(artifact, {.device = given});
    if (runtime.options().device != "cpu") return fail("device '" + given + "' is reported as '" + runtime.options().device + "'");
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, bool (*)(const std::string&)> checks = {
      {"moved_from_runtime", moved_from_runtime},
      {"batcher_keeps_a_moved_or_destroyed_runtimes_model", batcher_keeps_a_moved_or_destroyed_runtimes_model},
      {"batcher_destroyed_by_a_cancellation_callback", batcher_destroyed_by_a_cancellation_callback},
      {"batcher_destroyed_by_a_callback_under_the_completions_lock", batcher_destroyed_by_a_callback_under_the_completions_lock},
      {"batcher_destroyed_by_a_callback_during_shutdown", batcher_destroyed_by_a_callback_during_shutdown},
      {"submit_without_a_callback", submit_without_a_callback},
      {"options_name_the_device_in_effect", options_name_the_device_in_effect},
  };
  if (argc != 3 || !checks.count(argv[2])) {
    std::fprintf(stderr, "usage: contract_checks ARTIFACT CHECK\n");
    return 2;
  }
  try {
    if (!checks.at(argv[2])(argv[1])) return 1;
  } catch (const std::exception& error) {
    std::printf("unexpected exception: %s\n", error.what());
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
