"""The memory model: analytic walk against real CPU steps, max-batch math, budgets and their errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.profiler import ProfilerActivity, profile, record_function

from mpifed import memory as mem
from mpifed.bench.memory import oom_search
from mpifed.client import prepare_client, run_client
from mpifed.memory.measured import _profiled_phase_peaks
from mpifed.models import build_model
from mpifed.progress import Progress
from mpifed.server import run_server
from mpifed.worker import prepare_worker, run_worker
from recording import _Writer, session

SHAPE, CLASSES = (3, 32, 32), 10
ROOT = Path(__file__).resolve().parents[1]
MiB = 2 ** 20


@pytest.fixture(scope="module")
def cnn():
    return build_model("cnn", CLASSES)


@pytest.fixture(scope="module")
def resnet18():
    return build_model("resnet18", CLASSES)


@pytest.fixture(scope="module")
def cnn_analytic(cnn):
    return mem.analytic_memory_model(cnn, SHAPE, CLASSES, "sgd", "cpu")


def relative(a: float, b: float) -> float:
    return abs(a - b) / b


def test_parse_bytes():
    assert mem.parse_bytes("2GiB") == 2 * 2 ** 30
    assert mem.parse_bytes("512MiB") == 512 * 2 ** 20
    assert mem.parse_bytes("16GB") == 16 * 10 ** 9
    with pytest.raises(ValueError, match="unknown size unit"):
        mem.parse_bytes("3 parsecs")


def test_cpu_ground_truth_counts_known_allocations_exactly():
    """The profiler-based accounting the CPU ground truth rests on: a known sequence of allocations
    and frees gives exactly the expected live peaks per phase."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(1000)  # 4000 bytes, live before the first phase
        with record_function("mpifed.memory::forward_backward"):
            b = torch.empty(500)  # 6000 live
            del a  # 2000
            c = torch.empty(250)  # 3000
        with record_function("mpifed.memory::update"):
            del b, c  # 0
            d = torch.empty(100)  # 400
        del d
    peaks = _profiled_phase_peaks(prof, ("forward_backward", "update"))
    assert peaks == {"forward_backward": 6000, "update": 3000}  # update opens with b and c live


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_analytic_matches_cpu_ground_truth_cnn(cnn, batch):
    predicted = mem.analytic_peak(cnn, SHAPE, CLASSES, "sgd", "cpu", batch).total
    measured = mem.measured_peak(cnn, SHAPE, CLASSES, "sgd", "cpu", batch).total
    assert relative(predicted, measured) <= 0.05, (batch, predicted, measured)  # README: within 3.75%


@pytest.mark.parametrize("batch", [1, 2])
def test_analytic_matches_cpu_ground_truth_resnet18(resnet18, batch):
    predicted = mem.analytic_peak(resnet18, SHAPE, CLASSES, "sgd", "cpu", batch)
    measured = mem.measured_peak(resnet18, SHAPE, CLASSES, "sgd", "cpu", batch)
    assert relative(predicted.total, measured.total) <= 0.05
    assert relative(predicted.update, measured.update) <= 0.05


def test_analytic_and_probed_models_agree_on_cnn(cnn, cnn_analytic):
    probed = mem.measured_memory_model(cnn, SHAPE, CLASSES, "sgd", "cpu", probes=(2, 4, 8, 16))
    assert relative(cnn_analytic.per_sample_bytes, probed.per_sample_bytes) <= 0.05
    for batch in (16, 64, 256):  # inside and far beyond the probed range
        assert relative(cnn_analytic.peak(batch), probed.peak(batch)) <= 0.05


def test_linear_model_reproduces_the_walk_at_large_batches(cnn, cnn_analytic):
    for batch in (64, 128):
        walk = mem.analytic_peak(cnn, SHAPE, CLASSES, "sgd", "cpu", batch).total
        assert relative(cnn_analytic.peak(batch), walk) <= 0.005


def test_optimizer_state_is_counted(cnn):
    param_bytes = sum(p.numel() * p.element_size() for p in cnn.parameters())
    sgd = mem.analytic_peak(cnn, SHAPE, CLASSES, "sgd", "cpu", 64)
    adam = mem.analytic_peak(cnn, SHAPE, CLASSES, "adam", "cpu", 64)
    bare = mem.analytic_peak(cnn, SHAPE, CLASSES, "none", "cpu", 64)
    # Adam holds one more parameter-sized buffer than SGD with momentum; 'none' holds neither.
    assert adam.forward_backward - sgd.forward_backward == param_bytes
    assert sgd.forward_backward - bare.forward_backward == param_bytes


def test_cuda_walk_runs_without_a_gpu_and_rounds_to_blocks(cnn):
    cuda = mem.analytic_peak(cnn, SHAPE, CLASSES, "sgd", "cuda", 16, overhead_bytes=0)
    cpu = mem.analytic_peak(cnn, SHAPE, CLASSES, "sgd", "cpu", 16)
    assert cuda.forward_backward % mem.CUDA_BLOCK_BYTES == 0
    assert cpu.total <= cuda.total <= cpu.total * 1.2


def test_max_batch_math():
    m = mem.MemoryModel(static_bytes=100, per_sample_bytes=10, update_bytes=150,
                        update_per_sample_bytes=1, method="analytic", device="cpu", fit_batches=(16, 32))
    assert mem.max_batch(m, 1000, margin=0.0) == 90
    assert mem.max_batch(m, 1000, margin=0.1) == 80
    assert mem.max_batch(m, 1000, margin=0.05) == 85
    assert mem.max_batch(m, 1000, margin=0.05, multiple_of=8) == 80
    # the update phase binds when it holds more than the activations would
    heavy = mem.MemoryModel(100, 10, 900, 1, "analytic", "cpu", (16, 32))
    assert mem.max_batch(heavy, 1000, margin=0.05) == 50
    with pytest.raises(ValueError, match="margin"):
        mem.max_batch(m, 1000, margin=1.0)
    # flat phases (a least-squares slope clamped at 0): either phase alone can rule out every batch
    for flat in (mem.MemoryModel(2000, 0, 100, 0, "analytic", "cpu", (16, 32)),
                 mem.MemoryModel(100, 0, 2000, 0, "analytic", "cpu", (16, 32))):
        with pytest.raises(mem.MemoryBudgetError):
            mem.max_batch(flat, 1000)


def test_max_batch_is_tight(cnn_analytic):
    budget = 64 * MiB
    b = mem.max_batch(cnn_analytic, budget)
    assert cnn_analytic.peak(b) <= budget * (1 - mem.DEFAULT_MARGIN)
    assert cnn_analytic.peak(b + 1) > budget * (1 - mem.DEFAULT_MARGIN)
    assert cnn_analytic.peak(math.ceil(1.15 * b)) > budget


def test_budget_below_batch_one_names_client_and_budget(resnet18):
    with pytest.raises(mem.MemoryBudgetError) as info:
        mem.size_client(resnet18, SHAPE, CLASSES, "sgd", "cpu", 64 * MiB, 32, client="client 3")
    message = str(info.value)
    assert "client 3" in message and "64.00 MiB" in message and str(64 * MiB) in message
    assert info.value.need > 64 * MiB


def test_requested_batch_is_capped_or_refused(cnn):
    sizing = mem.size_client(cnn, SHAPE, CLASSES, "sgd", "cpu", 16 * MiB, 4096, client="client 1")
    assert sizing.batch == sizing.max_batch < 4096
    assert "client 1" in sizing.message and "capped" in sizing.message
    with pytest.raises(mem.MemoryBudgetError, match="client 1"):
        mem.size_client(cnn, SHAPE, CLASSES, "sgd", "cpu", 16 * MiB, 4096, client="client 1", strict=True)
    fits = mem.size_client(cnn, SHAPE, CLASSES, "sgd", "cpu", 16 * MiB, 8, client="client 1")
    assert fits.batch == 8 and fits.message == ""


def test_the_cpu_guard_passes_the_max_batch_and_refuses_more(cnn, cnn_analytic):
    budget = 8 * MiB
    guard = mem.enforce_budget("cpu", budget, cnn_analytic, "client 2")
    largest = mem.max_batch(cnn_analytic, budget)
    guard.check(largest)
    with pytest.raises(mem.MemoryBudgetError, match="client 2"):
        guard.check(4 * largest)


def test_a_client_round_over_its_budget_is_refused_before_its_step():
    """A real client round (mpifed.client.run_client, on an in-process recording exchange) with an emulated
    12 MiB budget, after the server's batches grew past what fits: the round ends with the budget error
    naming the client, before any local step ran (E = 2: a step would have moved the model) and before any
    update left it."""
    tiny = ['profiles.tiny.memory="12MiB"', 'clients.groups=[{count = 2, profile = "tiny"}]', "train.local_steps=2",
            "optim.momentum=0.0"]
    s = session(1, tiny)
    setup = prepare_client(s)
    assert setup.guard is not None and 0 < setup.batch <= setup.max_batch  # sized to fit at start-up
    grown = s.batches[s.client] = 4 * setup.max_batch  # what a grown batch from the server would ask
    before = s.model.flat.clone()
    with pytest.raises(mem.MemoryBudgetError, match=rf"^client 0 \(rank 1, profile tiny\): memory budget 12.00 MiB "
                                                 rf".* cannot hold batch {grown}: .*enforced before the step runs"):
        run_client(s, setup)
    assert torch.equal(s.model.flat, before)
    assert all(p.grad is None or not p.grad.any() for p in s.model.module.parameters())
    assert [call[0] for call in s.exchange.calls] == ["barrier", "broadcast"]  # its report, the model; no update
    s.batches[s.client] = setup.batch  # within the budget, the same round trains and moves the model
    assert run_client(s, setup) == 0 and not torch.equal(s.model.flat, before)  # 0: ran to the end


def test_a_pooled_clients_round_over_its_budget_is_refused_before_its_step(tmp_path):
    """The same for a worker that trains several clients (4 on 2 worker ranks): its profile's guard is
    checked before each client's steps, and the error names the client."""
    tiny = ['profiles.tiny.memory="12MiB"', 'clients.groups=[{count = 4, profile = "tiny"}]', "clients.count=4",
            "train.local_steps=2", "optim.momentum=0.0", "train.rounds=1"]
    server = session(0, tiny)
    run_server(server, _Writer(), tmp_path, Progress("off", 1, 1))
    s = session(1, tiny)
    setup = prepare_worker(s)
    cap = int(setup.caps[0])
    assert "tiny" in setup.guards and cap > 0
    s.batches[:] = 4 * cap  # what grown batches from the server would ask
    s.exchange.calls.clear()
    s.exchange.replay = list(server.exchange.sent)
    before = s.model.flat.clone()
    with pytest.raises(mem.MemoryBudgetError, match=rf"^client \d \(rank 1, profile tiny\): memory budget 12.00 "
                                                 rf"MiB .* cannot hold batch {4 * cap}: .*enforced before the step"):
        run_worker(s, setup)
    assert torch.equal(s.model.flat, before)
    assert "reduce" not in [call[0] for call in s.exchange.calls]  # no update left the worker
    s = session(1, tiny)
    s.batches[:] = cap  # within the budget, the same round trains
    s.exchange.replay = list(server.exchange.sent)
    assert run_worker(s, setup) == 0


def test_verification_steps_down_until_a_real_step_runs(cnn_analytic):
    """The CUDA start-up check, with a device that holds 37 samples and not the predicted 50."""
    tried = []

    def step(batch):
        tried.append(batch)
        if batch > 37:
            raise torch.cuda.OutOfMemoryError(f"batch {batch} does not fit")
        return 1000 * batch

    verified = mem.verify_batch(step, 50, "client 4", 64 * MiB, cnn_analytic)
    assert tried == [50, 45, 40, 36] and verified == mem.Verified(36, 36000, (50, 45, 40))
    tried.clear()
    assert mem.verify_batch(step, 12, "client 4", 64 * MiB, cnn_analytic) == mem.Verified(12, 12000, ())
    assert tried == [12]

    def never(batch):
        raise torch.cuda.OutOfMemoryError("no memory at all")

    with pytest.raises(mem.MemoryBudgetError, match=r"client 4.*64.00 MiB.*every batch tried \(3, 2, 1\)"):
        mem.verify_batch(never, 3, "client 4", 64 * MiB, cnn_analytic)


def test_oom_search_finds_the_boundary():
    result = oom_search(lambda b: b <= 37)
    assert result.batch == 37 and result.failures >= 1
    assert [b for b, _ in result.tried][:6] == [2, 4, 8, 16, 32, 64]
    assert oom_search(lambda b: False).batch == 0


def _table_rows(output: str, columns: int) -> dict[str, list[str]]:
    """The body rows of the printed tables with `columns` cells, by their first cell."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == columns:
            rows[cells[0]] = cells[1:]
    return rows


def test_memory_command_prints_table_and_max_batch(cnn, cnn_analytic):
    """Each batch asked for gets the walk's prediction and a real measurement, and the max batch printed
    is the tight one: its predicted peak fits the budget less the margin, one more sample's does not."""
    from mpifed.commands.memory import OPTIMIZERS, memory
    from mpifed.units import format_bytes

    assert OPTIMIZERS == mem.OPTIMIZERS
    result = CliRunner().invoke(memory, ["--model", "cnn", "--budget", "64MiB", "--batches", "1,16",
                                         "--measure", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    steps = _table_rows(result.output, 4)
    assert list(steps) == ["1", "16"], result.output
    for batch, (predicted, measured, error) in steps.items():
        assert predicted == format_bytes(mem.analytic_peak(cnn, SHAPE, CLASSES, "sgd", "cpu", int(batch)).total)
        assert measured.endswith("B") and abs(float(error)) <= 5, (batch, measured, error)  # a step ran
    printed = re.search(r"max batch for budget 64\.00 MiB \(margin 5%, multiple of 1\): (\d+)\n", result.output)
    assert printed, result.output
    b = int(printed.group(1))
    usable = 64 * MiB * (1 - mem.DEFAULT_MARGIN)
    assert cnn_analytic.peak(b) <= usable < cnn_analytic.peak(b + 1)
    models = _table_rows(result.output, 6)
    assert set(models) == {"analytic", "measured"} and models["analytic"][-1] == str(b)
    # the last line says where the max batch comes from, with the numbers the tables show
    why = " ".join(result.output[printed.end():].split())
    walk = format_bytes(mem.analytic_peak(cnn, SHAPE, CLASSES, "sgd", "cpu", b).total)
    assert why.startswith(f"Why {b}: the analytic line's max batch, confirmed by walking the step at batch {b}: "
                          f"it needs {walk} of {format_bytes(usable)} (the budget less the 5% margin)."), why
    assert f"The measured line's {models['measured'][-1]} is for comparison" in why


def test_memory_command_explains_a_max_batch_below_the_analytic_line():
    """resnet18 in 8 GiB: the line fitted at 16 and 32 allows 1797, but the walk at 1797 needs 8.06 GiB; sizing
    steps down to 1687. The explanation names both batches, both walks and the usable budget."""
    from types import SimpleNamespace

    from mpifed.commands.memory import _why

    walks = {1797: 8649779016, 1687: 8125776856}
    text = _why(1687, {"analytic": 1797, "measured": 1861}, lambda b: SimpleNamespace(total=walks[b]),
                0.95 * 8 * 2 ** 30, 0.05)
    assert text.startswith("Why 1687: the analytic line's 1797, stepped down until a walk of the step at the batch "
                           "itself fits in 7.60 GiB (the budget less the 5% margin): at 1797 it needs 8.06 GiB, "
                           "at 1687 7.57 GiB."), text
    assert "measured line's 1861 is for comparison" in text and "size_client" in text


def test_memory_command_takes_the_users_model_and_data_with_their_options(monkeypatch):
    """`mpifed memory --model examples/my_model.py:mlp --dataset examples/my_data.py:sites`: the factories are
    loaded as a job would load them (paths relative to the working directory, options as keyword arguments),
    and the table's predictions are the walk of that model on that data's task."""
    from mpifed.commands.memory import BUILTIN_DATASETS, memory
    from mpifed.config import BUILTIN_DATASETS as JOB_DATASETS
    from mpifed.learn.factory import load_factory
    from mpifed.learn.tasks import Task
    from mpifed.units import format_bytes

    assert BUILTIN_DATASETS == JOB_DATASETS
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(memory, ["--model", "examples/my_model.py:mlp", "--model-option", "hidden=32",
                                         "--dataset", "examples/my_data.py:sites", "--data-option", "features=12",
                                         "--optimizer", "none", "--device", "cpu", "--budget", "64MiB",
                                         "--batches", "1,16"])
    assert result.exit_code == 0, result.output
    assert "examples/my_model.py:mlp / examples/my_data.py:sites / none on cpu" in " ".join(result.output.split())
    task = Task.classification((12,), 4)  # the data's 12 features and 4 classes
    model = load_factory(f"{ROOT}/examples/my_model.py:mlp", "model.name")(task.input_shape, 4, hidden=32)
    steps = _table_rows(result.output, 4)
    assert list(steps) == ["1", "16"], result.output
    for batch, (predicted, _, _) in steps.items():
        walk = mem.analytic_peak(model, (12,), 4, "none", "cpu", int(batch), task=task).total
        assert predicted == format_bytes(walk), (batch, predicted)
    assert re.search(r"max batch for budget 64\.00 MiB .*: \d+\n", result.output), result.output

    bad = CliRunner().invoke(memory, ["--model", "examples/my_model.py:mpl", "--dataset", "examples/my_data.py:sites",
                                      "--device", "cpu"])
    assert bad.exit_code == 2, bad.output
    assert (f"Invalid value for --model: model.name = '{ROOT}/examples/my_model.py:mpl': {ROOT}/examples/my_model.py "
            f"has no callable 'mpl'; it defines mlp") in " ".join(bad.output.split()), bad.output
    bad = CliRunner().invoke(memory, ["--model", "cnn", "--dataset", "examples/my_data.py:sites", "--device", "cpu"])
    assert bad.exit_code == 2 and "classifies images (channels, height, width)" in bad.output, bad.output


def test_bench_memory_takes_the_users_model_and_data(monkeypatch):
    from mpifed.bench.memory import memory as bench_memory

    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(bench_memory, ["--model", "examples/my_model.py:mlp", "--dataset",
                                               "examples/my_data.py:sites", "--optimizer", "none", "--device", "cpu",
                                               "--budget", "1MiB"])
    assert result.exit_code == 0, result.output
    assert re.search(r"mpifed: max batch \d+ in", result.output) and "OOM search" in result.output, result.output


def test_memory_command_sizes_leaf_lstm_on_shakespeare_from_real_steps():
    """The task is LEAF's next-character one (token ids in, 81 symbols out) without reading the plays; the
    LSTM's fused kernels are invisible to the walk, so the max batch comes from measured steps and says so.
    seq_len 8 instead of 80 keeps the walk of the unrolled LSTM short."""
    from mpifed.commands.memory import memory
    from mpifed.learn.shakespeare import VOCAB, CharLSTM
    from mpifed.learn.tasks import Task
    from mpifed.units import format_bytes

    result = CliRunner().invoke(memory, ["--model", "leaf-lstm", "--dataset", "shakespeare", "--optimizer", "none",
                                         "--data-option", "seq_len=8", "--device", "cpu", "--budget", "256MiB",
                                         "--batches", "1"])
    assert result.exit_code == 0, result.output
    task = Task("next-token", (8,), VOCAB, torch.int64)
    predicted = _table_rows(result.output, 4)["1"][0]
    assert predicted == format_bytes(mem.analytic_peak(CharLSTM(VOCAB), (8,), VOCAB, "none", "cpu", 1, task=task).total)
    text = " ".join(result.output.split())
    assert re.search(r"Why \d+: the walk on meta tensors does not see this model's step", text), text
    assert "real steps at batches 2,4,8,16" in text
    bad = CliRunner().invoke(memory, ["--model", "leaf-lstm", "--dataset", "shakespeare", "--data-option", "seq=8"])
    assert bad.exit_code == 2 and "shakespeare does not take seq; it takes seq_len, min_chars, train_fraction" \
        in " ".join(bad.output.split()), bad.output
