"""experiments/gpu_check.py, the one-shot GPU check, on the CPU: its failure paths (no CuPy,
CuPy without a driver), the SIGINT on timeout, the verdict on the test counts, and the
record it writes.  A device run is scarce, so everything but the GPU itself is tested here."""
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import sgd_by_layer_reference

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def run_check(tmp_path, **env):
    """Run the whole check as `make gpu-check` does, through gpu_check.sh with this
    interpreter (whose xpmlp is this checkout, so the script installs nothing); returns
    (returncode, stdout, stderr, the $OUT folder)."""
    import xpmlp
    if not xpmlp.__file__.startswith(f"{REPO}/"):
        pytest.skip(f"xpmlp here comes from {xpmlp.__file__}: gpu_check.sh would install this checkout over it")
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(["bash", str(SCRIPT.with_suffix(".sh"))], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, check=False,
                            env=dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env))
    return result.returncode, result.stdout, result.stderr, out


def cupy_state():
    """'missing', 'no-gpu' or 'gpu'."""
    if importlib.util.find_spec("cupy") is None:
        return "missing"
    try:
        import cupy
        return "gpu" if cupy.cuda.runtime.getDeviceCount() > 0 else "no-gpu"
    except Exception:  # noqa: BLE001 - no driver
        return "no-gpu"


# ---------------------------------------------------------------- failure paths, for real

def test_without_cupy_the_check_stops_at_the_preflight_with_the_reason(tmp_path):
    fake = tmp_path / "fake" / "cupy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("No module named cupy (hidden by the test)")\n')
    rc, out, err, out_dir = run_check(tmp_path, PYTHONPATH=str(tmp_path / "fake"))
    assert rc == 1
    assert "gpu-check: FAILED: preflight: no usable CUDA GPU: CuPy is not installed" in err, out + err
    assert "CuPy tests" not in out, "nothing runs after a failed preflight"
    assert list(out_dir.iterdir()) == [], "no record that could pass for a result"


@pytest.mark.skipif(cupy_state() != "no-gpu", reason="needs CuPy installed on a machine without a usable GPU")
def test_with_cupy_but_no_driver_the_check_stops_at_the_preflight_with_the_reason(tmp_path):
    rc, out, err, out_dir = run_check(tmp_path)
    assert rc == 1
    line = next(line for line in err.splitlines() if line.startswith("gpu-check: FAILED"))
    assert "no usable CUDA GPU: CuPy is installed but" in line, err
    assert "driver" in line or "no CUDA device" in line or "could not list devices" in line, line
    assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------------- the pieces

def test_the_listed_test_files_are_the_ones_holding_cupy_tests():
    """The check runs only the files with CuPy tests: the list must follow the suite."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                             "-p", "no:cacheprovider", "tests"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=False)
    tests = [line for line in result.stdout.splitlines() if "::" in line]
    files = {line.split("::")[0] for line in tests}
    assert files == set(gpu_check.GPU_TEST_FILES), result.stdout[-2000:] + result.stderr[-2000:]
    # docs/gpu_check.md's estimate of the check's time counts them: it must name the number they are
    stated = re.search(r"the (\d+) CUDA tests \(CuPy's and\s+torch:cuda's\)", (REPO / "docs" / "gpu_check.md").read_text())
    assert stated and int(stated.group(1)) == len(tests), \
        f"docs/gpu_check.md: {stated and stated.group(0)}; {len(tests)} collected"


def numpy_kernels():
    """The fused kernels' contracts in NumPy (the Numba ones where they exist): a stand-in
    for CupyKernels on the CPU."""
    import types

    import xpmlp
    plain = {"relu_backward": lambda y, grad_y, grad_x: np.multiply(grad_y, y > 0, out=grad_x),
             "sigmoid_forward": lambda x, y: np.divide(1, 1 + np.exp(-x), out=y),
             "sigmoid_backward": lambda y, grad_y, grad_x: np.multiply(grad_y * y, 1 - y, out=grad_x)}
    numba = xpmlp.get_backend("numpy").kernels
    if numba is None:
        pytest.skip("Numba (the [fast] extra) is not installed")
    def stacked(loss):  # the stacked losses' contract: each model's slice as one model
        def run(output, labels, grad_out, out=None):
            out = out or (np.empty(output.shape[:1], output.dtype), np.empty(output.shape[:1], output.dtype))
            for k in range(output.shape[0]):
                loss(output[k], labels if labels.ndim == 1 else labels[k], grad_out[k],
                     (out[0][..., k:k + 1], out[1][..., k:k + 1]))
            return out
        return run

    plain |= {"softmax_xent_stacked": stacked(numba.softmax_xent), "euclidean_stacked": stacked(numba.euclidean),
              "sgd_step_by_layer": sgd_by_layer_reference}
    return types.SimpleNamespace(**plain | {name: getattr(numba, name) for name in dir(numba)
                                            if not name.startswith("_")})


def test_preflight_launches_every_fused_kernel():
    """Every public kernel of CupyKernels has tiny arguments in the preflight; they are tried
    here on the kernels' NumPy and Numba stand-ins, which keep the same contracts."""
    from xpmlp.backends.cupy_kernels import CupyKernels
    public = {name for name in vars(CupyKernels) if not name.startswith("_") and callable(getattr(CupyKernels, name))}
    assert set(gpu_check.PREFLIGHT_ARGS) == public
    kernels = numpy_kernels()
    for dtype in (np.float32, np.float64):
        for name in gpu_check.PREFLIGHT_ARGS:
            arrays = gpu_check.launch(kernels, name, np, dtype)
            assert arrays and all(np.isfinite(a).all() for a in arrays), name


@pytest.mark.parametrize("workers", [0, 2], ids=["serial", "xdist"])
def test_a_timeout_interrupts_pytest_with_sigint_and_keeps_its_summary(tmp_path, monkeypatch, workers):
    """Serial, and with pytest-xdist's workers as the check uses them where it is installed."""
    if workers:
        pytest.importorskip("xdist")
    monkeypatch.setattr(gpu_check, "parallel_args", lambda: ["-n", str(workers)] if workers else [])
    tests = tmp_path / "test_slow.py"
    tests.write_text(
        "import time\nimport pytest\n\n"
        "@pytest.mark.gpu\ndef test_fast():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_skipped():\n    pytest.skip('no GPU here, said the test')\n\n"
        "@pytest.mark.gpu\ndef test_slow():\n    time.sleep(120)\n")
    # The timeout leaves room for pytest's start-up on a loaded machine (8 s was not enough).
    result = gpu_check.run_tests([str(tests)], timeout_s=45 if workers else 30, log_dir=tmp_path)
    log = (tmp_path / "gpu_check_pytest.log").read_text()
    assert "KeyboardInterrupt" in log and "1 passed, 1 skipped" in log, log
    assert "SKIPPED" in log and "no GPU here, said the test" in log, "-rs shows skip reasons"
    assert result["timed_out"] and (result["passed"], result["skipped"]) == (1, 1)
    assert result["problems"] == ["the tests ran out of time and were interrupted"]


@pytest.mark.parametrize("counts, rc, timed_out, needle", [
    (None, 4, False, "pytest wrote no report"),
    ({"passed": 0, "failed": 0, "errors": 0, "skipped": 30}, 0, False, "no CuPy test passed (30 skipped"),
    ({"passed": 0, "failed": 0, "errors": 0, "skipped": 0}, 5, False, "no CuPy test passed"),
    ({"passed": 20, "failed": 1, "errors": 2, "skipped": 0}, 1, False, "1 CuPy test(s) failed, 2 error(s)"),
    ({"passed": 20, "failed": 0, "errors": 0, "skipped": 0}, 2, True, "ran out of time"),
])
def test_the_test_step_fails_unless_cupy_tests_passed(counts, rc, timed_out, needle):
    problems = gpu_check.problems_of_tests(counts, rc, timed_out)
    assert any(needle in p for p in problems), problems
    assert gpu_check.problems_of_tests({"passed": 20, "failed": 0, "errors": 0, "skipped": 3}, 0, False) == []


def fake_command(tmp_path, monkeypatch, code):
    """Make the check's child commands run ``code`` instead of python -m xpmlp ..."""
    script = tmp_path / "fake.py"
    script.write_text(code)
    monkeypatch.setattr(gpu_check, "python", lambda: [sys.executable, str(script)])


def test_bench_json_is_found_among_warnings(tmp_path, monkeypatch):
    fake_command(tmp_path, monkeypatch, "import sys, json\nprint('a warning', file=sys.stderr)\n"
                 "print(json.dumps({'epoch_s': 0.05, 'torch_epoch_s': None, 'ratio_torch': None,"
                 " 'ratio_limit': 2.0}, indent=2))\n")
    assert gpu_check.run_bench(["--device", "cuda"], 30, tmp_path, "bench")["epoch_s"] == 0.05
    fake_command(tmp_path, monkeypatch, "import sys\nsys.exit('xpmlp: no GPU')\n")
    assert gpu_check.run_bench(["--device", "cuda"], 30, tmp_path, "bench") == \
        {"problem": "bench --device cuda: exit status 1"}


FACTS = {"card": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver_cuda": "12.8",
         "cuda_runtime": "12.9", "nvrtc": "12.9", "cupy": "14.2.0", "torch_cuda": "12.8"}


@pytest.mark.parametrize("failed, stack", [(0, False), (0, True), (2, False)])
def test_the_check_writes_one_record_and_its_verdict(tmp_path, monkeypatch, failed, stack):
    benches = []
    monkeypatch.setattr(gpu_check, "run_preflight", lambda timeout_s: dict(FACTS))
    monkeypatch.setattr(gpu_check, "run_tests", lambda files, timeout_s, log_dir: {
        "passed": 40, "failed": failed, "errors": 0, "skipped": 0, "seconds": 1.0,
        "problems": gpu_check.problems_of_tests({"passed": 40, "failed": failed, "errors": 0, "skipped": 0}, 0, False)})
    monkeypatch.setattr(gpu_check, "run_bench", lambda args, timeout_s, log_dir, name: benches.append(args) or
                        {"epoch_s": 0.05, "stack": name == "bench_stack"})
    monkeypatch.setattr(gpu_check, "bench_has_stack", lambda: stack)
    monkeypatch.setattr(gpu_check, "run_agreement", lambda timeout_s: {"devices": {}, "problems": [], "seconds": 1.0})
    status, path = gpu_check.check(tmp_path / "out", tmp_path / "logs")
    assert status == (1 if failed else 0)
    assert list((tmp_path / "out").iterdir()) == [path]
    assert path.name.startswith("gpu-check_nvidia-h100-80gb-hbm3_") and path.suffix == ".json"
    record = json.loads(path.read_text())
    assert record["status"] == ("failed" if failed else "passed")
    assert record["card"] == FACTS["card"] and record["nvrtc"] == "12.9" and record["tests"]["passed"] == 40
    assert record["bench"]["epoch_s"] == 0.05
    assert benches[0] == ["--device", "cuda", "--epochs", "5"]
    if stack:
        assert benches[1][-2:] == ["--stack", "17"] and record["bench_stack"]["stack"] is True
    else:
        assert len(benches) == 2 and record["bench_stack"]["problem"].startswith("not run")
    assert benches[-1][:2] == ["--device", "cpu"] and benches[-1][-2] == "--threads"  # the CPU scaling table
    assert benches[-1][-1].startswith("1,") or benches[-1][-1] == "1"
    assert "bench_cpu_scaling" in record
    assert set(record["seconds"]) >= {"preflight", "tests", "agreement", "bench", "total"}


def test_records_go_to_a_folder_that_git_keeps():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    path = gpu_check.record_path(REPO / "experiments/results/gpu", "NVIDIA H100", datetime.datetime(2026, 1, 1))
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", str(path.relative_to(REPO))], cwd=REPO,
                            check=False)
    assert result.returncode == 1, f"{path} would be git-ignored"


def test_steps_left_without_time_are_not_started_and_fail_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "run_preflight", lambda timeout_s: dict(FACTS))
    monkeypatch.setattr(gpu_check, "run_tests", lambda files, timeout_s, log_dir: {
        "passed": 40, "failed": 0, "errors": 0, "skipped": 0, "seconds": 1.0, "problems": []})
    monkeypatch.setattr(gpu_check, "run_bench", lambda *args: pytest.fail("started without time left"))
    monkeypatch.setattr(gpu_check, "run_agreement", lambda *args: pytest.fail("started without time left"))
    monkeypatch.setattr(gpu_check, "bench_has_stack", lambda: pytest.fail("asked without time left"))
    status, path = gpu_check.check(tmp_path / "out", tmp_path / "logs", deadline_s=gpu_check.MIN_STEP_S - 1)
    record = json.loads(path.read_text())
    assert status == 1 and record["status"] == "failed"
    assert record["bench"]["problem"].startswith("not run: the check's") and record["problems"] == \
        [record["tests"]["problem"], *record["agreement"]["problems"], record["bench"]["problem"],
         record["bench_stack"]["problem"]]
    assert record["agreement"]["problems"][0].startswith("not run: the check's")


def test_preflight_reports_one_line_per_fact_and_the_facts_as_json(monkeypatch, capsys):
    """The preflight's own code, run against a stand-in CUDA backend made of NumPy and the
    Numba kernels: a slip in it would otherwise first show on the lent device."""
    import xpmlp
    backend = stand_in_cuda_backend(numpy_kernels())
    monkeypatch.setattr(xpmlp, "get_backend", lambda name: backend)
    gpu_check.preflight()
    lines = capsys.readouterr().out.splitlines()
    facts = json.loads(lines[-1].removeprefix("FACTS "))
    assert (facts["card"], facts["compute_capability"], facts["driver_cuda"], facts["cuda_runtime"],
            facts["nvrtc"]) == ("NVIDIA H100 80GB HBM3", "9.0", "12.8", "12.9", "12.9")
    for start in ("card: NVIDIA H100 80GB HBM3", "driver: supports CUDA 12.8", "CUDA runtime: 12.9",
                  "NVRTC: 12.9", "torch.version.cuda: ", f"fused kernels: {len(gpu_check.PREFLIGHT_ARGS)} x 2 dtypes"):
        assert any(line.startswith(start) for line in lines), (start, lines)


def test_agreement_compares_the_ten_networks_with_numpy_float64_in_a_child(capsys):
    """The step's machinery on a CPU path (torch CPU, where the GPU check runs CuPy and
    torch:cuda); a device that cannot run is recorded with its reason, not a problem."""
    pytest.importorskip("torch")
    result = gpu_check.run_agreement(120, devices=("torch", "no-such-device"))
    assert result["problems"] == [], result
    assert "unknown device" in result["devices"]["no-such-device"]
    found = result["devices"]["torch"]
    assert set(found) == {"float32", "float64"}
    for dtype, networks in found.items():
        assert len(networks) == 10 and all(0 <= d <= gpu_check.AGREEMENT_TOL[dtype] for d in networks.values())
    assert max(found["float32"].values()) > 0, "float32 and float64 cannot agree exactly"
    assert "torch float64: largest difference" in capsys.readouterr().out


def test_agreement_beyond_tolerance_or_nan_is_a_problem():
    found = {"cupy": {"float32": {"mlp0-mse": 1e-7, "mlp1-relu-sce": 3e-3}, "float64": {"mlp0-mse": float("nan")}},
             "torch:cuda": "PyTorch cannot use CUDA (no driver)"}
    problems = gpu_check.problems_of_agreement(found)
    assert len(problems) == 2 and "cupy float32 mlp1-relu-sce differs" in problems[0] and "nan" in problems[1]


def stand_in_cuda_backend(kernels):
    """A CUDA backend made of NumPy and ``kernels``, as far as the preflight uses one."""
    import types

    runtime = types.SimpleNamespace(
        getDeviceProperties=lambda i: {"name": b"NVIDIA H100 80GB HBM3", "major": 9, "minor": 0,
                                       "totalGlobalMem": 80 * 2**30},
        driverGetVersion=lambda: 12080, runtimeGetVersion=lambda: 12090)
    nvrtc = types.SimpleNamespace(getVersion=lambda: (12, 9))
    cupy = types.SimpleNamespace(__version__="14.2.0", isfinite=np.isfinite, linspace=np.linspace,
                                 asarray=np.asarray, cuda=types.SimpleNamespace(runtime=runtime, nvrtc=nvrtc))
    return types.SimpleNamespace(cupy=cupy, cuda_device=types.SimpleNamespace(id=0), kernels=kernels,
                                 synchronize=lambda: None)


# ---------------------------------------------------------------- issue 25: the check's own defects

def test_this_process_runs_its_blas_on_the_threads_asked():
    """conftest.py's promise, in whatever process runs this test (see the next test)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    assert blas, "NumPy's BLAS not found by threadpoolctl"
    assert {p["num_threads"] for p in blas} == {int(os.environ["OPENBLAS_NUM_THREADS"])}


def test_one_blas_thread_even_when_a_plugin_imports_numpy_before_conftest(tmp_path):
    """The GPU image's jaxtyping plugin imports NumPy before conftest.py runs: the limit must
    still hold (by threadpoolctl there).  Needs more than one core to be able to fail."""
    pytest.importorskip("threadpoolctl")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: OpenBLAS would use one thread anyway")
    (tmp_path / "numpy_first.py").write_text("import numpy  # as jaxtyping's plugin does\n")
    env = {k: v for k, v in os.environ.items() if k not in gpu_check.TEST_THREAD_VARS}
    env["PYTHONPATH"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "numpy_first", "-p", "no:cacheprovider",
                             "-p", "no:xdist", "-W", "error::pytest.PytestConfigWarning",
                             "tests/test_gpu_check.py::test_this_process_runs_its_blas_on_the_threads_asked"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


def test_the_tests_step_gives_pytest_one_blas_thread(tmp_path, monkeypatch):
    """The check sets the thread variables itself, in pytest's environment, whatever its
    plugins import; a count the caller set wins."""
    for var in gpu_check.TEST_THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    monkeypatch.setattr(gpu_check, "parallel_args", lambda: [])
    tests = tmp_path / "test_env.py"
    tests.write_text("import os\nimport pytest\n\n@pytest.mark.gpu\ndef test_threads():\n"
                     "    assert (os.environ['OPENBLAS_NUM_THREADS'], os.environ['OMP_NUM_THREADS'],"
                     " os.environ['MKL_NUM_THREADS']) == ('1', '1', '3')\n")
    result = gpu_check.run_tests([str(tests)], timeout_s=120, log_dir=tmp_path)
    assert (result["passed"], result["failed"], result["problems"]) == (1, 0, []), \
        (tmp_path / "gpu_check_pytest.log").read_text()


def test_the_stacked_bench_line_shows_its_ratios(tmp_path, monkeypatch, capsys):
    fake_command(tmp_path, monkeypatch, "import json\nprint(json.dumps({'epoch_s': 0.5, 'stacked_epoch_s': 1.25,"
                 " 'ratio_stack': 6.8, 'ratio_wide': 1.1, 'stack': 17}, indent=2))\n")
    gpu_check.run_bench(["--device", "cuda", "--stack", "17"], 30, tmp_path, "bench_stack")
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == "epoch_s 0.5, stacked_epoch_s 1.25, ratio_stack 6.8, ratio_wide 1.1", line


def test_gpu_check_sh_installs_without_a_package_index(tmp_path):
    """The lent machine has no index: pip must not look for one.  A stand-in interpreter
    records pip's arguments (and fails the install, so the staged copy is used)."""
    calls = tmp_path / "pip_args"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/bash\n"
                    f"if [ \"$1\" = -m ] && [ \"$2\" = pip ]; then echo \"$@\" > {calls}; exit 1; fi\n"
                    f"if [ \"$1\" = -c ]; then exit 1; fi  # 'xpmlp is not installed from here'\n"
                    f"exit 0  # the check itself: not run here\n")
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(SCRIPT.with_suffix(".sh"))], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, check=False, env=dict(os.environ, PYTHON=str(fake)))
    assert result.returncode == 0, result.stdout + result.stderr
    args = calls.read_text().split()
    assert args[:3] == ["-m", "pip", "install"] and "--no-index" in args and "--no-deps" in args, args


def test_a_timeout_ends_the_commands_whole_process_group(tmp_path):
    """pytest-xdist's workers outlive a controller that the timeout stopped, and would compete
    with the benches: the check ends the command's whole process group.  Here the 'worker'
    ignores SIGINT, as a busy one would."""
    pid_file, slept = tmp_path / "worker.pid", tmp_path / "worker.slept"
    worker, controller = tmp_path / "worker.py", tmp_path / "controller.py"
    worker.write_text("import signal, time\n"
                      "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                      "time.sleep(40)\n"
                      f"open({str(slept)!r}, 'w').close()\n")
    controller.write_text(
        "import subprocess, sys, time\n"
        f"worker = subprocess.Popen([sys.executable, {str(worker)!r}])\n"
        f"open({str(pid_file)!r}, 'w').write(str(worker.pid))\n"
        "time.sleep(300)\n")
    _, timed_out, _ = gpu_check.run_with_timeout([sys.executable, str(controller)], 3)
    pid = int(pid_file.read_text())
    try:
        assert timed_out
        # The worker holds the command's output pipe: waiting for the pipe to close would
        # wait for the worker to end by itself (the check hung until it did).
        assert not slept.exists(), "the check waited for the worker instead of ending it"
        deadline = time.monotonic() + 5  # a SIGKILLed process takes a moment to die
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(pid), "the worker outlived the timeout"
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def running(pid):
    """Whether ``pid`` is alive (a zombie waiting for its new parent to reap it is not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_record_is_written_after_every_step(tmp_path, monkeypatch):
    """A device call that runs out of time still brings back what was measured: the record
    on disk holds each step's results as soon as they exist, "incomplete" until the end."""
    seen = []

    def bench(args, timeout_s, log_dir, name):
        (path,) = (tmp_path / "out").iterdir()
        seen.append(json.loads(path.read_text()))
        if name == "bench_stack":
            raise KeyboardInterrupt  # the device call's time runs out here
        return {"epoch_s": 0.05}

    monkeypatch.setattr(gpu_check, "run_preflight", lambda timeout_s: dict(FACTS))
    monkeypatch.setattr(gpu_check, "run_tests", lambda files, timeout_s, log_dir: {
        "passed": 40, "failed": 0, "errors": 0, "skipped": 0, "seconds": 1.0, "problems": []})
    monkeypatch.setattr(gpu_check, "run_bench", bench)
    monkeypatch.setattr(gpu_check, "bench_has_stack", lambda: True)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.check(tmp_path / "out", tmp_path / "logs")
    first, second = seen
    assert first["status"] == "incomplete" and first["tests"]["passed"] == 40 and "bench" not in first
    assert second["status"] == "incomplete" and second["bench"] == {"epoch_s": 0.05}
    assert first["card"] == FACTS["card"] and first["seconds"]["preflight"] >= 0


def test_the_tests_leave_the_benches_their_time(tmp_path, monkeypatch):
    """A slow test run cannot take the agreement step's and the benches' time: the test step's
    limit leaves their caps."""
    limits = {}
    monkeypatch.setattr(gpu_check, "run_preflight", lambda timeout_s: dict(FACTS))
    monkeypatch.setattr(gpu_check, "run_tests", lambda files, timeout_s, log_dir: limits.update(tests=timeout_s) or {
        "passed": 40, "failed": 0, "errors": 0, "skipped": 0, "seconds": 1.0, "problems": []})
    monkeypatch.setattr(gpu_check, "run_bench", lambda args, timeout_s, log_dir, name:
                        limits.update({name: timeout_s}) or {"epoch_s": 0.05})
    monkeypatch.setattr(gpu_check, "run_agreement", lambda timeout_s: limits.update(agreement=timeout_s) or {
        "problems": [], "seconds": 1.0})
    monkeypatch.setattr(gpu_check, "bench_has_stack", lambda: True)
    gpu_check.check(tmp_path / "out", tmp_path / "logs", deadline_s=200)
    caps = gpu_check.CAPS_S
    after_tests = caps["agreement"] + caps["bench"] + caps["bench_stack"]
    assert 200 - after_tests - 5 < limits["tests"] <= 200 - after_tests
    assert limits["agreement"] == caps["agreement"]
    assert limits["bench"] == caps["bench"] and limits["bench_stack"] == caps["bench_stack"]


NVRTC_LOG = ('/usr/local/lib/python3.12/site-packages/cupy/_core/include/cupy/_cuda/cuda-12.2/cuda_fp16.h(128): '
             'catastrophic error: cannot open source file "vector_types.h"\n  #include "vector_types.h"\n'
             '                         ^\n\n1 catastrophic error detected in the compilation of "kern.cu".\n'
             'Compilation terminated.\n')


@pytest.mark.parametrize("message, want", [
    (NVRTC_LOG, "CUDA headers missing: NVRTC cannot open 'vector_types.h'"),
    ("first line\nsecond line\n", "RuntimeError: first line"),
])
def test_a_failing_kernel_is_one_line_and_missing_headers_are_named(monkeypatch, capsys, message, want):
    """The preflight's reason is its last line of output: a many-line NVRTC log must come
    out as one line, and a missing CUDA header say so."""
    import types

    import xpmlp

    def broken(*args):
        raise RuntimeError(message)

    backend = stand_in_cuda_backend(types.SimpleNamespace(**{name: broken for name in gpu_check.PREFLIGHT_ARGS}))
    monkeypatch.setattr(xpmlp, "get_backend", lambda name: backend)
    with pytest.raises(SystemExit) as exited:
        gpu_check.preflight()
    reason = str(exited.value.code)
    assert "\n" not in reason and reason.startswith("fused kernel sgd_step (float32) failed: " + want), reason
