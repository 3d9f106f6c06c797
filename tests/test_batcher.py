"""ip_runtime.Batcher (imagepiece::Batcher): dynamic micro-batching of single images over a Runtime."""
import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import ip_runtime

LONG_DELAY_MS = 10_000  # longer than any test: a batch that is not full only runs when the test says so
TIMEOUT = 120


@pytest.fixture(scope="module")
def dynamic(compiled):
    return ip_runtime.Runtime(str(compiled.path("ti_imagepiece_dynamic")))


@pytest.fixture(scope="module")
def pool(dynamic):
    """50 distinct images and each one's logits when run alone (batch 1)."""
    images = torch.randn(50, *dynamic.info["input_shape"], generator=torch.Generator().manual_seed(13))
    alone = torch.cat([dynamic.run(images[i : i + 1]) for i in range(len(images))])
    return images, alone


def close_within(batcher, drain, seconds=TIMEOUT):
    """close() in a thread: a hang fails the test instead of stalling the suite."""
    closer = threading.Thread(target=batcher.close, args=(drain,), daemon=True)
    closer.start()
    closer.join(seconds)
    assert not closer.is_alive(), f"close(drain={drain}) did not return within {seconds} s"


def test_concurrent_single_image_submits_equal_running_each_image_alone(dynamic, pool):
    images, alone = pool
    threads, per_thread = 16, 50
    results = [[None] * per_thread for _ in range(threads)]
    errors = []
    with ip_runtime.Batcher(dynamic, max_batch=32, max_delay_ms=2) as batcher:
        def client(t):
            try:
                futures = [batcher.submit(images[(t * 7 + i) % len(images)]) for i in range(per_thread)]
                results[t] = [future.result(TIMEOUT) for future in futures]
            except Exception as error:  # reported below: an assert in a thread would be lost
                errors.append(error)

        workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    stats = batcher.stats  # after close: a worker counts its batch done only after completing its futures
    assert not errors
    for t in range(threads):
        for i in range(per_thread):
            torch.testing.assert_close(results[t][i], alone[(t * 7 + i) % len(images)], rtol=0, atol=1e-5)
    assert stats["requests"] == stats["completed"] == threads * per_thread
    assert stats["batched_images"] == threads * per_thread and sum(stats["batch_sizes"]) == stats["batches"]
    assert stats["queue_depth"] == stats["in_flight"] == stats["failed"] == 0


def test_invalid_submits_fail_alone_and_valid_ones_complete(dynamic, pool):
    images, alone = pool
    bad = [
        ("invalid_shape", torch.randn(3, 224)),
        ("invalid_dtype", images[0].double()),
        ("invalid_type", "not an image"),
        # A sparse image passed the shape checks and then failed the copy into its batch, and every other request of it.
        ("invalid_type", images[0].to_sparse()),
    ]
    with ip_runtime.Batcher(dynamic, max_batch=8, max_delay_ms=5) as batcher:
        futures = {}
        for i in range(12):
            futures[i] = batcher.submit(images[i])
            code, image = bad[i % len(bad)]
            with pytest.raises(ip_runtime.Error) as refused:
                batcher.submit(image)
            assert refused.value.code == code
        for i, future in futures.items():
            torch.testing.assert_close(future.result(TIMEOUT), alone[i], rtol=0, atol=1e-5)
        stats = batcher.stats
    assert stats["completed"] == 12 and stats["failed"] == 0
    # Every refusal counts, the binding's own (a str, no tensor to hand to C++) as well as the C++ Batcher's.
    assert stats["rejected"] == {"invalid_shape": 3, "invalid_dtype": 3, "invalid_type": 6}


@pytest.mark.parametrize("layout", ["sparse", "mkldnn"])
def test_non_dense_images_are_refused_with_a_code(dynamic, pool, layout):
    images, _ = pool
    image = images[0].to_sparse() if layout == "sparse" else images[0].to_mkldnn()
    with ip_runtime.Batcher(dynamic) as batcher:
        with pytest.raises(ip_runtime.Error, match="must be a dense") as refused:
            batcher.submit(image)
    assert refused.value.code == "invalid_type"
    with pytest.raises(ip_runtime.Error, match="must be a dense") as refused:
        dynamic.run(image.unsqueeze(0) if layout == "sparse" else images[:1].to_mkldnn())
    assert refused.value.code == "invalid_type"
    with pytest.raises(ip_runtime.Error, match="logits must be a dense") as refused:
        dynamic.run(images[:1], torch.zeros(1, 1000).to_sparse() if layout == "sparse" else torch.zeros(1, 1000).to_mkldnn())
    assert refused.value.code == "invalid_output"


def test_lazily_negated_views_are_refused_not_read_as_their_memory(dynamic, pool):
    images, _ = pool
    negated = torch._neg_view(-images[:1])  # equals images[:1], but its memory holds -images[:1]
    assert negated.is_neg() and negated.is_contiguous()
    with pytest.raises(ip_runtime.Error, match="lazily negated view; call .resolve_neg") as refused:
        dynamic.run(negated)
    assert refused.value.code == "invalid_type"
    with pytest.raises(ip_runtime.Error, match="logits must not be a lazily negated view") as refused:
        dynamic.run(images[:1], torch._neg_view(torch.zeros(1, 1000)))
    assert refused.value.code == "invalid_output"


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_tensors_are_refused_and_odd_size_one_strides_run(dynamic, pool):
    images, alone = pool
    nested = torch.nested.nested_tensor([images[0], images[1]])
    with pytest.raises(ip_runtime.Error, match="nested tensor") as refused:
        dynamic.run(nested)
    assert refused.value.code == "invalid_type"
    # ATen calls these contiguous (a size-1 dimension's stride never matters) and .contiguous() returns them as they
    # are; AOTInductor compared the strides exactly and failed.
    odd = images[0].clone().as_strided((1, *images.shape[1:]), (0, *images[0].stride()))
    assert odd.is_contiguous() and odd.contiguous().stride(0) == 0
    torch.testing.assert_close(dynamic.run(odd)[0], alone[0], rtol=0, atol=1e-5)


def test_a_submitted_request_cannot_be_cancelled_and_still_completes(dynamic, pool):
    images, alone = pool
    batcher = ip_runtime.Batcher(dynamic, max_batch=64, max_delay_ms=LONG_DELAY_MS, queue_capacity=1)
    future = batcher.submit(images[0])
    # cancel() answering True would promise a freed queue slot and no result; neither would hold.
    assert future.running() and not future.cancel()
    close_within(batcher, drain=True)
    torch.testing.assert_close(future.result(TIMEOUT), alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 3, 224, 224), r"expected one 3-D image, got 4-D \[2, 3, 224, 224\] \(submit one image, not a batch\)"),
        ((3, 224), r"expected one 3-D image, got 2-D \[3, 224\]$"),
        ((3, 224, 100), r"image \[3, 224, 100\] is not a row of a batch"),
    ],
)
def test_error_messages_name_the_single_image_rule(dynamic, shape, message):
    with ip_runtime.Batcher(dynamic) as batcher:
        with pytest.raises(ip_runtime.Error, match=message) as refused:
            batcher.submit(torch.randn(*shape))
        assert refused.value.code == "invalid_shape"


def test_a_numpy_scalar_is_refused_as_the_0_d_array_it_is(dynamic):
    with ip_runtime.Batcher(dynamic) as batcher:  # numpy's ascontiguousarray had made it 1-D [1] on its way in
        with pytest.raises(ip_runtime.Error, match=r"expected one 3-D image, got 0-D \[\]"):
            batcher.submit(np.array(1.0, dtype=np.float32))


def test_numpy_in_numpy_out_and_non_contiguous_images(dynamic, pool):
    images, alone = pool
    with ip_runtime.Batcher(dynamic, max_delay_ms=1) as batcher:
        from_numpy = batcher.submit(images[0].numpy()).result(TIMEOUT)
        # A channels-last view is copied into the batch like any other row.
        strided = images[1].permute(1, 2, 0).contiguous().permute(2, 0, 1)
        from_view = batcher.submit(strided).result(TIMEOUT)
        # Negative strides (OpenCV's BGR -> RGB flip): copied into the batch like a torch view, not refused.
        reversed_view = batcher.submit(np.ascontiguousarray(images[2].numpy()[::-1])[::-1]).result(TIMEOUT)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.shape == (1000,)
    np.testing.assert_allclose(from_numpy, alone[0].numpy(), rtol=0, atol=1e-5)
    torch.testing.assert_close(from_view, alone[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(reversed_view, alone[2].numpy(), rtol=0, atol=1e-5)


def test_full_queue_raises_overloaded(dynamic, pool):
    images, _ = pool
    # A long delay and a batch that cannot fill keep the three requests queued until close().
    batcher = ip_runtime.Batcher(dynamic, max_batch=64, max_delay_ms=LONG_DELAY_MS, queue_capacity=3)
    queued = [batcher.submit(images[i]) for i in range(3)]
    with pytest.raises(ip_runtime.Error, match="overloaded") as refused:
        batcher.submit(images[3])
    assert refused.value.code == "overloaded"
    assert batcher.stats["queue_depth"] == 3 and batcher.stats["rejected"] == {"overloaded": 1}
    close_within(batcher, drain=False)
    for future in queued:
        assert future.exception(TIMEOUT).code == "cancelled"


@pytest.mark.parametrize("drain", [True, False])
def test_shutdown_completes_or_cancels_every_pending_request(dynamic, pool, drain):
    images, alone = pool
    batcher = ip_runtime.Batcher(dynamic, max_batch=64, max_delay_ms=LONG_DELAY_MS)
    pending = [batcher.submit(images[i]) for i in range(5)]
    assert not any(future.done() for future in pending)
    close_within(batcher, drain)
    assert all(future.done() for future in pending)
    for i, future in enumerate(pending):
        if drain:
            torch.testing.assert_close(future.result(), alone[i], rtol=0, atol=1e-5)
        else:
            assert isinstance(future.exception(), ip_runtime.Error) and future.exception().code == "cancelled"
    stats = batcher.stats
    assert (stats["completed"], stats["cancelled"]) == ((5, 0) if drain else (0, 5))
    with pytest.raises(ip_runtime.Error) as refused:
        batcher.submit(images[0])
    assert refused.value.code == "cancelled"
    close_within(batcher, drain=True)  # a second close is harmless


def test_expedite_runs_what_waits_at_once_and_later_requests_as_they_come(dynamic, pool):
    images, alone = pool
    batcher = ip_runtime.Batcher(dynamic, max_batch=64, max_delay_ms=LONG_DELAY_MS)
    waiting = [batcher.submit(images[i]) for i in range(2)]
    time.sleep(0.2)
    assert not any(future.done() for future in waiting), "a batch of 2 waits for 64 or the 10 s delay"
    batcher.expedite()  # a server's shutdown began: requests still uploading are yet to come
    later = batcher.submit(images[2])
    for i, future in enumerate([*waiting, later]):
        torch.testing.assert_close(future.result(timeout=LONG_DELAY_MS / 1000 / 2), alone[i], rtol=0, atol=1e-5)
    assert batcher.stats["completed"] == 3 and batcher.options["max_delay_ms"] == LONG_DELAY_MS
    close_within(batcher, drain=True)


def test_an_image_buffer_reused_after_submit_does_not_change_the_queued_request(dynamic, pool):
    # A decode loop filling one buffer: the batch is assembled later, and the first request returned the second's logits.
    images, alone = pool
    batcher = ip_runtime.Batcher(dynamic, max_batch=64, max_delay_ms=LONG_DELAY_MS)
    buffer, array = images[0].clone(), images[0].numpy().copy()
    first, first_numpy = batcher.submit(buffer), batcher.submit(array)
    buffer.copy_(images[1])
    array[...] = images[1].numpy()
    second = batcher.submit(buffer)
    close_within(batcher, drain=True)
    torch.testing.assert_close(first.result(TIMEOUT), alone[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(first_numpy.result(TIMEOUT), alone[0].numpy(), rtol=0, atol=1e-5)
    torch.testing.assert_close(second.result(TIMEOUT), alone[1], rtol=0, atol=1e-5)


def test_dropping_the_batcher_drains_it(dynamic, pool):
    images, alone = pool
    batcher = ip_runtime.Batcher(dynamic, max_batch=64, max_delay_ms=LONG_DELAY_MS)
    pending = [batcher.submit(images[i]) for i in range(3)]
    del batcher
    gc.collect()
    for i, future in enumerate(pending):
        torch.testing.assert_close(future.result(TIMEOUT), alone[i], rtol=0, atol=1e-5)


def test_a_callback_that_drops_the_last_reference_does_not_deadlock(dynamic, pool):
    images, _ = pool
    holder = [ip_runtime.Batcher(dynamic, max_batch=1, max_delay_ms=0)]
    first = holder[0].submit(images[0])
    first.add_done_callback(lambda _: holder.clear())  # runs on the worker thread, which then destroys the batcher
    assert first.result(TIMEOUT).shape == (1000,)
    deadline = time.monotonic() + TIMEOUT
    while holder and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not holder


def test_exit_with_queued_requests_whose_callbacks_drop_other_batchers(compiled):
    # At exit ip_runtime cancels what each live Batcher still holds; these cancellations' callbacks drop the last
    # reference to the *other* Batcher, which the exit hook then closed after it was freed (SIGSEGV, 3 runs of 3).
    script = f"""
import ip_runtime, torch
runtime = ip_runtime.Runtime({str(compiled.path("ti_imagepiece_dynamic"))!r})
image = torch.zeros(*runtime.info["input_shape"])
holder = {{name: ip_runtime.Batcher(runtime, max_delay_ms={LONG_DELAY_MS}) for name in "xy"}}
holder["x"].submit(image).add_done_callback(lambda _: holder.pop("y", None))
holder["y"].submit(image).add_done_callback(lambda _: holder.pop("x", None))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])


def test_exit_while_a_batcher_dropped_in_a_callback_still_completes_a_batch(compiled):
    # Dropped on a worker, a Batcher waits for no worker (a C++ callback could hold a lock the others need); its other
    # worker finishes its batch on its own. At exit ip_runtime waits for it: a worker that wants the GIL while the
    # interpreter finalizes is ended, which aborted the process.
    script = f"""
import threading, time, ip_runtime, torch
runtime = ip_runtime.Runtime({str(compiled.path("ti_imagepiece_dynamic"))!r}, instances=2)  # two workers
image = torch.zeros(*runtime.info["input_shape"])
holder, dropped, started = [ip_runtime.Batcher(runtime, max_batch=1, max_delay_ms=0)], threading.Event(), threading.Barrier(2)
def first(_):
    started.wait()
    holder.clear()  # the last reference: the Batcher is destroyed on this worker
    dropped.set()
def second(_):
    started.wait()
    time.sleep(0.5)  # the GIL is free meanwhile: the main thread goes on to exit
    print("second done", flush=True)
holder[0].submit(image).add_done_callback(first)
holder[0].submit(image).add_done_callback(second)
dropped.wait(60)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0 and "second done" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_preferred_batch_runs_without_waiting_for_the_delay(dynamic, pool):
    images, alone = pool
    batcher = ip_runtime.Batcher(dynamic, max_batch=8, max_delay_ms=LONG_DELAY_MS, preferred_batches=[4])
    futures = [batcher.submit(images[i]) for i in range(5)]
    for i in range(4):  # long before the delay: the preferred size was queued
        torch.testing.assert_close(futures[i].result(TIMEOUT), alone[i], rtol=0, atol=1e-5)
    assert batcher.stats["batch_sizes"][4] == 1 and batcher.stats["queue_depth"] == 1 and not futures[4].done()
    close_within(batcher, drain=True)
    torch.testing.assert_close(futures[4].result(), alone[4], rtol=0, atol=1e-5)


def test_a_full_batch_runs_at_once_as_one_batch(dynamic, pool):
    images, alone = pool
    batcher = ip_runtime.Batcher(dynamic, max_batch=8, max_delay_ms=LONG_DELAY_MS)
    futures = [batcher.submit(images[i]) for i in range(8)]
    for i, future in enumerate(futures):  # long before the delay: max_batch requests were queued
        torch.testing.assert_close(future.result(TIMEOUT), alone[i], rtol=0, atol=1e-5)
    close_within(batcher, drain=True)
    stats = batcher.stats
    assert stats["batches"] == 1 and stats["batch_sizes"][8] == 1 and stats["mean_batch_size"] == 8


def wait_for_child(pid, seconds=TIMEOUT):
    """The child's exit status; a child still running after `seconds` (hung) is killed and fails the test."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child did not exit within {seconds} s (hung)")


CHILD_OK, CHILD_WRONG_ERROR, CHILD_NO_ERROR, CHILD_CRASHED = 0, 3, 4, 5


def test_a_batcher_created_before_fork_refuses_work_in_the_child(dynamic, pool):
    images, alone = pool
    batcher = ip_runtime.Batcher(dynamic, max_batch=8, max_delay_ms=0)
    pid = os.fork()
    if pid == 0:  # the child: its workers were not forked with it; submit must refuse, close must not wait for them
        status = CHILD_CRASHED
        try:
            try:
                batcher.submit(images[0])
                status = CHILD_NO_ERROR
            except ip_runtime.Error as error:
                status = CHILD_OK if error.code == "cancelled" and "before fork()" in str(error) else CHILD_WRONG_ERROR
            batcher.close()
            del batcher
            gc.collect()
        finally:
            os._exit(status)
    assert wait_for_child(pid) == CHILD_OK
    with batcher:  # the parent's batcher is unaffected
        torch.testing.assert_close(batcher.submit(images[0]).result(TIMEOUT), alone[0], rtol=0, atol=1e-5)


def test_static_batch_artifact_pads_a_short_batch(compiled, pool):
    images, _ = pool
    runtime = ip_runtime.Runtime(str(compiled.path("ti_imagepiece")))  # batch exactly 2
    with ip_runtime.Batcher(runtime, max_delay_ms=0) as batcher:
        assert batcher.options["max_batch"] == 2
        logits = batcher.submit(images[0]).result(TIMEOUT)
        stats = batcher.stats
    padded = torch.stack([images[0], torch.zeros_like(images[0])])
    torch.testing.assert_close(logits, runtime.run(padded)[0], rtol=0, atol=1e-5)
    assert stats["padded_rows"] == 1 and stats["batch_sizes"] == [0, 1, 0]


def test_asyncio_clients(dynamic, pool):
    images, alone = pool

    async def classify_all(batcher):
        return await asyncio.gather(*(asyncio.wrap_future(batcher.submit(images[i])) for i in range(8)))

    with ip_runtime.Batcher(dynamic, max_batch=8, max_delay_ms=20) as batcher:
        results = asyncio.run(asyncio.wait_for(classify_all(batcher), TIMEOUT))
    torch.testing.assert_close(torch.stack(results), alone[:8], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, code, message",
    [
        ({"max_batch": 65}, "invalid_option", r"max_batch must be in \[1, 64\]"),
        ({"max_batch": -1}, "invalid_option", "max_batch"),
        ({"max_delay_ms": -1}, "invalid_option", "max_delay_ms"),
        ({"max_delay_ms": float("nan")}, "invalid_option", "max_delay_ms"),
        ({"max_delay_ms": True}, "invalid_type", "max_delay_ms"),
        ({"queue_capacity": 0}, "invalid_option", "queue_capacity"),
        ({"queue_capacity": 1.5}, "invalid_type", "queue_capacity"),
        ({"max_batch": 8, "preferred_batches": [4, 9]}, "invalid_option", "preferred batch 9"),
        ({"preferred_batches": "4"}, "invalid_type", "preferred_batches"),
        ({"max_delay_ms": np.array([1.0, 2.0])}, "invalid_type", "max_delay_ms must be a number"),  # float() raises on these
        ({"max_delay_ms": torch.ones(2)}, "invalid_type", "max_delay_ms must be a number"),
        ({"max_delay_ms": 10**400}, "invalid_option", "past the float range"),
    ],
)
def test_invalid_options(dynamic, kwargs, code, message):
    with pytest.raises(ip_runtime.Error, match=message) as refused:
        ip_runtime.Batcher(dynamic, **kwargs)
    assert refused.value.code == code


def test_runtime_must_be_a_runtime():
    with pytest.raises(ip_runtime.Error) as refused:
        ip_runtime.Batcher("model.so")
    assert refused.value.code == "invalid_type"


@pytest.mark.parametrize("use", [lambda b: ip_runtime.Batcher.submit(b, torch.zeros(3, 224, 224)),
                                 lambda b: ip_runtime.Batcher.stats.fget(b), lambda b: ip_runtime.Batcher.options.fget(b),
                                 lambda b: ip_runtime.Batcher.close(b), lambda b: ip_runtime.Batcher.expedite(b)])
def test_a_batcher_made_without_init_is_refused_not_read(use):
    # Batcher.__new__(Batcher) holds no C++ object: its methods read garbage (SIGSEGV, a hang, SIGILL).
    with pytest.raises(ip_runtime.Error, match="made without __init__") as refused:
        use(ip_runtime.Batcher.__new__(ip_runtime.Batcher))
    assert refused.value.code == "invalid_type"
    with pytest.raises(ip_runtime.Error, match="self must be an ip_runtime.Batcher, got str"):  # not a Batcher at all
        use("x")
    with pytest.raises(ip_runtime.Error, match="ip_runtime.Runtime was made without __init__"):
        ip_runtime.Batcher(ip_runtime.Runtime.__new__(ip_runtime.Runtime))


def test_a_batcher_made_while_the_interpreter_exits_is_refused(compiled):
    # After ip_runtime closed the live Batchers at exit, a new one's worker would ask for the GIL during
    # finalization, which ends that thread: the process aborted ("FATAL: exception not rethrown").
    script = f"""
import atexit

def late():
    runtime = ip_runtime.Runtime({str(compiled.path("ti_imagepiece_dynamic"))!r})
    try:
        ip_runtime.Batcher(runtime, max_delay_ms=300).submit(torch.zeros(*runtime.info["input_shape"]))
    except ip_runtime.Error as error:
        print(error.code, error)

atexit.register(late)  # runs after ip_runtime's own exit hook, registered later
import ip_runtime, torch
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "cancelled the interpreter is exiting" in result.stdout
