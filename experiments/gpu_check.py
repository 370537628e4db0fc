"""The one-shot GPU check behind `make gpu-check` (run through experiments/gpu_check.sh).

A session is lent a GPU for about 15 minutes in all, so this does everything in one run,
stops at the first thing that makes the rest meaningless, and keeps what a reviewer needs:
  1. preflight: one line per fact (card, driver, CUDA runtime, NVRTC, CuPy, torch's CUDA),
     then every fused kernel compiled and launched once on tiny inputs; any failure stops
     the check here with the reason and exit status 1;
  2. the CuPy tests (the files that hold them, `-m gpu`), the full log kept in a file and
     its last lines printed; on its timeout pytest gets SIGINT, so it still prints its
     summary; fails unless at least one CuPy test passed and none failed;
  3. agreement: the ten networks' losses and weights over a few SGD steps on CuPy and on
     torch:cuda, float32 and float64, each against NumPy float64 (a few seconds, in a child);
  4. `xpmlp bench --device cuda --json`, and `--stack 17` where the bench has --stack;
     then, with the time left, the CPU thread-scaling table (`xpmlp bench --device cpu
     --threads 1,2,4,...` up to the cores, one epoch a row), for what more cores give the
     compiled CPU step: recorded, never a problem of the check;
  5. one JSON record: into $OUT when set (the device tool brings back what is written
     there), else into experiments/results/gpu/; the logs go beside it ($OUT) or under
     runs/gpu-check/.  It is rewritten after every step (status "incomplete" until the
     end), so a run cut short still brings back what was measured.
The whole run is held under DEADLINE_S; each step also has a cap of its own, and the tests
leave the benches the time they are capped at.  Every child runs in a process group of its
own, and the whole group is ended with it: no pytest-xdist worker outlives a timeout.
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# 300 s, about 5.5 minutes at worst with the interruptions: a 15-minute loan then holds the
# machine's start, the check and a rerun.
DEADLINE_S = 300
CAPS_S = {"preflight": 90, "tests": 180, "agreement": 30, "bench": 60, "bench_stack": 60, "bench_cpu": 45}
# What each step must leave for the steps after it (their caps): a slow test run then cannot
# starve the agreement check and the GPU benches of their results (the CPU scaling table
# takes what is left).
RESERVED_AFTER_S = {"preflight": 0, "tests": CAPS_S["agreement"] + CAPS_S["bench"] + CAPS_S["bench_stack"],
                    "agreement": CAPS_S["bench"] + CAPS_S["bench_stack"], "bench": 0, "bench_stack": 0,
                    "bench_cpu": 0}
MIN_STEP_S = 10  # a step with less time left than this is not started
SIGINT_GRACE_S = 20  # after SIGINT, time for pytest to print its summary before a kill
TAIL_LINES = 60
XDIST_WORKERS = 4
# The test files that hold CUDA tests, CuPy's and torch:cuda's (tests/test_gpu_check.py checks
# this list against a collection of `-m gpu` over the whole suite).
GPU_TEST_FILES = ("tests/test_backends.py", "tests/test_cross_backend.py", "tests/test_estimator.py",
                  "tests/test_gradients.py", "tests/test_kernels.py", "tests/test_oracle.py", "tests/test_stack.py",
                  "tests/test_torch_backend.py", "tests/test_train.py")
STACK_MODELS = 17
# The agreement step: the GPU paths it compares with NumPy float64, and the largest difference
# it accepts, relative to each array's largest value (the cross-backend tests' tolerances).
AGREEMENT_DEVICES = ("cupy", "torch:cuda")
AGREEMENT_TOL = {"float32": 1e-4, "float64": 1e-9}
AGREEMENT_STEPS, AGREEMENT_BATCH = 3, 64
SHOWN_BENCH_KEYS = ("epoch_s", "torch_epoch_s", "gemm_limit_epoch_s", "ratio_torch", "ratio_limit", "ratio_floor",
                    "stacked_epoch_s", "ratio_stack", "ratio_wide")
# One BLAS/OpenMP thread per test process.  Set here, in the children's environment: the GPU
# image's jaxtyping pytest plugin imports NumPy before tests/conftest.py could set them, and
# 4 xdist workers of 16 OpenBLAS threads each were measured 20x slower on small matrices.
TEST_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class CheckFailed(Exception):
    """A step that makes the rest of the check meaningless failed; the message says why."""


def python():
    """This interpreter, with -P where gpu_check.sh runs a staged copy (keeps xpmlp/ off sys.path)."""
    return [sys.executable, "-P"] if sys.flags.safe_path else [sys.executable]


def _end_group(pgid):
    """SIGKILL whatever is left of process group ``pgid`` (xdist workers, a bench's helpers)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def run_with_timeout(command, timeout_s, log_path=None, env=None):
    """Run ``command`` in a process group of its own; on timeout send SIGINT to the command
    alone (pytest then prints its summary and stops its workers), then kill after
    SIGINT_GRACE_S; whatever of its group is still alive after it is killed too.  Output goes
    to ``log_path`` (else is returned).  Returns (returncode, timed_out, output or None)."""
    log = open(log_path, "w") if log_path else subprocess.PIPE
    proc = None
    try:
        # A check started from a background job (nohup, &) inherits SIGINT ignored; the child
        # needs it back, or the timeout's SIGINT would not stop it.
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                                process_group=0, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)
            grace_ends = time.monotonic() + SIGINT_GRACE_S
            while True:
                try:
                    output, _ = proc.communicate(timeout=1)
                    break
                except subprocess.TimeoutExpired:
                    # Once the command has gone (or its grace is spent), a child that still holds
                    # its output open (an xdist worker) would keep communicate() waiting: end
                    # the whole group first.
                    if proc.poll() is not None or time.monotonic() > grace_ends:
                        proc.kill()
                        _end_group(proc.pid)
                        output, _ = proc.communicate()
                        break
    finally:
        if proc is not None:  # also on Ctrl-C of the check: its own group no longer gets it
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _end_group(proc.pid)
        if log_path:
            log.close()
    return proc.returncode, timed_out, output


def tail(path, lines=TAIL_LINES):
    text = Path(path).read_text(errors="replace") if Path(path).exists() else ""
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------- 1. preflight

# Every fused kernel's arguments on tiny inputs: name -> args(xp, dtype).  A test checks that
# this covers every public method of CupyKernels.
def _preflight_args():
    def arrays(xp, dtype, *shapes):
        return [xp.linspace(-1, 1, math.prod(s), dtype=dtype).reshape(s) for s in shapes]

    def labels(xp):
        return xp.asarray([0, 2, 1, 2])

    return {
        "sgd_step": lambda xp, dt: (*arrays(xp, dt, (8,), (8,), (8,)), 0.01, 0.9, 5e-4),
        "sgd_step_stacked": lambda xp, dt: (*arrays(xp, dt, (2, 8), (2, 8), (2, 8), (2,), (2,), (2,)),
                                            xp.asarray([True, False])),
        # two models of two parameters (3 and 2 values a model): blocks start at 0 and 6
        "sgd_step_by_layer": lambda xp, dt: (*arrays(xp, dt, (10,), (10,), (10,), (2,), (2,), (2,)),
                                             xp.asarray([True, False]), xp.asarray([0, 6, 10]), xp.asarray([3, 2])),
        "relu_backward": lambda xp, dt: arrays(xp, dt, (4, 3), (4, 3), (4, 3)),
        "sigmoid_forward": lambda xp, dt: arrays(xp, dt, (4, 3), (4, 3)),
        "sigmoid_backward": lambda xp, dt: arrays(xp, dt, (4, 3), (4, 3), (4, 3)),
        "softmax_xent": lambda xp, dt: (*arrays(xp, dt, (4, 3)), labels(xp), *arrays(xp, dt, (4, 3))),
        "euclidean": lambda xp, dt: (*arrays(xp, dt, (4, 3)), labels(xp), *arrays(xp, dt, (4, 3))),
        # two models, one launch: shared labels for one loss, a row a model for the other
        "softmax_xent_stacked": lambda xp, dt: (*arrays(xp, dt, (2, 4, 3)), labels(xp), *arrays(xp, dt, (2, 4, 3))),
        "euclidean_stacked": lambda xp, dt: (*arrays(xp, dt, (2, 4, 3)), xp.asarray([[0, 2, 1, 2], [1, 1, 0, 2]]),
                                             *arrays(xp, dt, (2, 4, 3))),
    }


def launch(kernels, name, xp, dtype):
    """Call one fused kernel on tiny inputs; returns every array it read, wrote or returned."""
    args = PREFLIGHT_ARGS[name](xp, dtype)
    result = getattr(kernels, name)(*args)
    return [a for a in (*args, *(result if isinstance(result, tuple) else ())) if hasattr(a, "shape")]


PREFLIGHT_ARGS = _preflight_args()


def one_line(exc):
    """An exception as one line for the check's verdict.  NVRTC's compile log runs to many
    lines; a missing CUDA header (CuPy 14 compiles against the toolkit's headers) is named."""
    text = str(exc)
    header = re.search(r'cannot open source file "([^"]+)"', text)
    if header:
        return (f"CUDA headers missing: NVRTC cannot open {header.group(1)!r} (CuPy needs the CUDA toolkit's "
                f"headers to compile kernels: install them or set CUDA_PATH)")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}"


def _version(number):
    """CUDA's 12080 as '12.8'."""
    return f"{number // 1000}.{number % 1000 // 10}"


def preflight():
    """In a child process: print one line per fact, compile and launch every fused kernel,
    and print the facts as JSON on the last line (prefixed FACTS).  Exit 1 with the reason
    on the first failure."""
    import numpy as np

    import xpmlp
    try:
        backend = xpmlp.get_backend("cuda")
    except xpmlp.BackendUnavailable as exc:
        sys.exit(f"no usable CUDA GPU: {' '.join(str(exc).split())}")
    cp = backend.cupy
    props = cp.cuda.runtime.getDeviceProperties(backend.cuda_device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    nvrtc = cp.cuda.nvrtc.getVersion()
    facts = {"card": name, "compute_capability": f"{props['major']}.{props['minor']}",
             "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
             "driver_cuda": _version(cp.cuda.runtime.driverGetVersion()),
             "cuda_runtime": _version(cp.cuda.runtime.runtimeGetVersion()),
             "nvrtc": f"{nvrtc[0]}.{nvrtc[1]}", "cupy": cp.__version__, "numpy": np.__version__,
             "python": sys.version.split()[0], "xpmlp": xpmlp.__version__, "xpmlp_from": xpmlp.__file__}
    print(f"card: {name} (compute capability {facts['compute_capability']}, {facts['memory_gib']} GiB)")
    print(f"driver: supports CUDA {facts['driver_cuda']}")
    print(f"CUDA runtime: {facts['cuda_runtime']}")
    print(f"NVRTC: {facts['nvrtc']}")
    print(f"CuPy {facts['cupy']}, NumPy {facts['numpy']}, Python {facts['python']}, xpmlp from {xpmlp.__file__}")
    try:
        import torch
        facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                     torch_cuda_usable=bool(torch.cuda.is_available()))
        print(f"torch.version.cuda: {torch.version.cuda} (torch {torch.__version__}, "
              f"CUDA usable: {facts['torch_cuda_usable']})")
    except Exception as exc:  # noqa: BLE001 - the bench then leaves PyTorch out
        facts.update(torch=None, torch_cuda=None, torch_cuda_usable=False)
        print(f"torch.version.cuda: n/a (torch unusable: {type(exc).__name__}: {exc})")
    start = time.perf_counter()
    for dtype in (np.float32, np.float64):
        for kernel in PREFLIGHT_ARGS:
            try:
                arrays = launch(backend.kernels, kernel, cp, dtype)
                backend.synchronize()
            except Exception as exc:  # noqa: BLE001 - any failure here is the reason to stop
                sys.exit(f"fused kernel {kernel} ({np.dtype(dtype).name}) failed: {one_line(exc)}")
            if not all(bool(cp.isfinite(a).all()) for a in arrays):
                sys.exit(f"fused kernel {kernel} ({np.dtype(dtype).name}) gave non-finite values on tiny inputs")
    facts["kernels_s"] = round(time.perf_counter() - start, 2)
    print(f"fused kernels: {len(PREFLIGHT_ARGS)} x 2 dtypes compiled and launched in {facts['kernels_s']} s")
    print("FACTS " + json.dumps(facts))


def run_preflight(timeout_s):
    """Facts (a dict) from the preflight child, its lines relayed; CheckFailed with its reason."""
    rc, timed_out, output = run_with_timeout(python() + [__file__, "--preflight"], timeout_s)
    lines = output.strip().splitlines()
    reason = lines.pop() if rc != 0 and lines else None  # the child's last words: printed once, below
    facts = None
    for line in lines:
        if line.startswith("FACTS "):
            facts = json.loads(line[len("FACTS "):])
        else:
            print(line, flush=True)
    if timed_out:
        raise CheckFailed(f"preflight did not finish in {timeout_s:.0f} s")
    if rc != 0 or facts is None:
        raise CheckFailed(f"preflight: {reason or f'exit status {rc}, no facts reported'}")
    return facts


# ---------------------------------------------------------------- 2. the CuPy tests

def junit_counts(path):
    """passed / failed / errors / skipped and the ids of failing tests from a JUnit XML file,
    or None when pytest wrote none."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    for case in root.iter("testcase"):
        if case.get("name") is None:  # the test an interruption cut short leaves an empty entry
            continue
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failing"].append(test_id)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failing"].append(test_id)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def problems_of_tests(counts, returncode, timed_out):
    """Why the test step failed (an empty list when it passed)."""
    if counts is None:
        return [f"pytest wrote no report (exit status {returncode})"]
    problems = []
    if timed_out:
        problems.append("the tests ran out of time and were interrupted")
    if counts["failed"] or counts["errors"]:
        problems.append(f"{counts['failed']} CuPy test(s) failed, {counts['errors']} error(s)")
    if counts["passed"] == 0:
        problems.append(f"no CuPy test passed ({counts['skipped']} skipped: see the skip reasons above)")
    if returncode not in (0, 1, 2) and not problems:  # 1: failures, 2: interrupted; else pytest broke
        problems.append(f"pytest exited with status {returncode}")
    return problems


def parallel_args():
    """pytest-xdist's -n where it is installed (the GPU image has it) and cores are many: the
    tests' CPU side (NumPy references, the torch oracle, Python driving the launches) is most
    of their time, so workers share it; [] otherwise."""
    workers = min(XDIST_WORKERS, (os.cpu_count() or 1) // 2)
    return ["-n", str(workers)] if workers > 1 and importlib.util.find_spec("xdist") is not None else []


def one_thread_env():
    """The tests' environment: this one with one BLAS/OpenMP thread per process, unless the
    caller set a count."""
    env = {var: "1" for var in TEST_THREAD_VARS}
    env.update(os.environ)
    return env


def run_tests(files, timeout_s, log_dir, marker="gpu"):
    """Run the tests, print the log's tail; returns the counts dict with ``problems``."""
    log, report = Path(log_dir) / "gpu_check_pytest.log", Path(log_dir) / "gpu_check_junit.xml"
    report.unlink(missing_ok=True)
    command = python() + ["-m", "pytest", "-m", marker, "-rfEs", "--tb=short", "--durations=15",
                          "-p", "no:cacheprovider", f"--junitxml={report}", *parallel_args(), *files]
    start = time.perf_counter()
    rc, timed_out, _ = run_with_timeout(command, timeout_s, log_path=log, env=one_thread_env())
    print(tail(log), flush=True)
    print(f"(full log: {log})")
    counts = junit_counts(report) or {}
    result = dict(counts, exit_status=rc, timed_out=timed_out, seconds=round(time.perf_counter() - start, 1),
                  log=log.name)
    result["problems"] = problems_of_tests(counts or None, rc, timed_out)
    return result


# ---------------------------------------------------------------- 3. agreement

def _trajectory(backend, name, dtype, batches, ops=None):
    """The losses of a few SGD steps of network ``name`` and its weights after them, as
    float64 host arrays."""
    import numpy as np

    import xpmlp
    model = xpmlp.build_model(name, backend=backend, dtype=dtype, seed=0, ops=ops)
    opt = xpmlp.SGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    dt, losses = backend.dtype(dtype), []
    for x, labels in batches:
        out = model.forward(backend.asarray(x, dtype=dt))
        losses.append(float(backend.to_numpy(model.loss.forward(out, backend.asarray(labels)))))
        model.backward(model.loss.backward())
        opt.step()
    return [np.asarray(losses)] + [np.asarray(a, dtype=np.float64) for a in model.state_arrays()]


def agreement(devices=AGREEMENT_DEVICES):
    """{device: {dtype: {network: largest difference from NumPy float64 on the plain ops,
    relative to each array's largest value}}}; a device that cannot run: the reason (a str)."""
    import numpy as np

    import xpmlp
    rng = np.random.default_rng(10)
    batches = [(np.where(rng.random((AGREEMENT_BATCH, 784)) < 0.25, rng.random((AGREEMENT_BATCH, 784)), 0.0),
                rng.integers(0, 10, AGREEMENT_BATCH)) for _ in range(AGREEMENT_STEPS)]
    numpy = xpmlp.get_backend("numpy")
    reference = {name: _trajectory(numpy, name, "float64", batches, ops="plain") for name in xpmlp.MODELS}
    found = {}
    for device in devices:
        try:
            backend = xpmlp.get_backend(device)
        except xpmlp.BackendUnavailable as exc:
            found[device] = str(exc)
            continue
        found[device] = {dtype: {name: max(float(np.max(np.abs(a - b))) / (float(np.max(np.abs(b))) or 1.0)
                                           for a, b in zip(_trajectory(backend, name, dtype, batches), want))
                                 for name, want in reference.items()}
                         for dtype in AGREEMENT_TOL}
    return found


def problems_of_agreement(found):
    """A problem for each network off NumPy by more than its dtype's tolerance.  A device that
    cannot run is recorded, not a problem: the preflight says whether torch can use CUDA."""
    return [f"agreement: {device} {dtype} {name} differs from NumPy float64 by {diff:.1e} (> {AGREEMENT_TOL[dtype]})"
            for device, dtypes in found.items() if isinstance(dtypes, dict)
            for dtype, networks in dtypes.items() for name, diff in networks.items() if not diff <= AGREEMENT_TOL[dtype]]


def run_agreement(timeout_s, devices=AGREEMENT_DEVICES):
    """agreement() in a child process (CuPy and torch stay out of this one); the result dict
    with ``problems``."""
    start = time.perf_counter()
    rc, timed_out, output = run_with_timeout(python() + [__file__, "--agreement", *devices], timeout_s)
    lines = output.strip().splitlines()
    found = next((json.loads(line[len("AGREEMENT "):]) for line in lines if line.startswith("AGREEMENT ")), None)
    if found is None:
        why = "did not finish in time" if timed_out else f"exit status {rc}: {lines[-1] if lines else 'no output'}"
        return {"problems": [f"agreement: {why}"], "seconds": round(time.perf_counter() - start, 1)}
    for device, dtypes in found.items():
        if isinstance(dtypes, str):
            print(f"{device}: not run ({dtypes})")
            continue
        for dtype, networks in dtypes.items():
            worst = max(networks, key=networks.get)
            print(f"{device} {dtype}: largest difference {networks[worst]:.1e} ({worst}; tolerance {AGREEMENT_TOL[dtype]})")
    return {"devices": found, "problems": problems_of_agreement(found), "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------- 4. the benchmark

def cpu_scaling_args():
    """The CPU scaling table's bench arguments: 1, 2, 4, ... threads up to the cores."""
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= (os.cpu_count() or 1)]
    return ["--device", "cpu", "--epochs", "1", "--no-torch", "--no-jax", "--threads", ",".join(map(str, counts))]


def bench_has_stack():
    rc, _, output = run_with_timeout(python() + ["-m", "xpmlp", "bench", "--help"], 20)
    return rc == 0 and "--stack" in output


def run_bench(args, timeout_s, log_dir, name):
    """The bench's JSON (a dict), or {"problem": why}; its stderr and stdout go to a log."""
    log = Path(log_dir) / f"gpu_check_{name}.log"
    command = python() + ["-m", "xpmlp", "bench", "--json", *args]
    print(f"$ xpmlp bench --json {' '.join(args)}", flush=True)
    rc, timed_out, _ = run_with_timeout(command, timeout_s, log_path=log)
    text = log.read_text(errors="replace")
    found = re.search(r"^\{.*^\}", text, re.S | re.M)  # the JSON object among any warnings
    if timed_out or rc != 0 or not found:
        why = f"timed out after {timeout_s:.0f} s" if timed_out else f"exit status {rc}"
        print(tail(log, 20))
        return {"problem": f"bench {' '.join(args)}: {why}"}
    result = json.loads(found.group(0))
    print(", ".join(f"{key} {result[key]:.4g}" for key in SHOWN_BENCH_KEYS
                    if isinstance(result.get(key), (int, float))), flush=True)
    return result


# ---------------------------------------------------------------- 5. the record

def record_path(out_dir, card, when):
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown-card"
    return Path(out_dir) / f"gpu-check_{slug}_{when:%Y%m%dT%H%M%SZ}.json"


def git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return head.stdout.strip(), bool(dirty.stdout.strip())


def write_record(record, out_dir):
    path = record_path(out_dir, record["card"], datetime.datetime.strptime(record["date_utc"], "%Y-%m-%dT%H:%M:%SZ"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- the check

def verdict(record):
    """The problems found so far in ``record`` (a missing --stack is not one)."""
    problems = list(record.get("tests", {}).get("problems", []))
    problems += record.get("agreement", {}).get("problems", [])
    for step in ("bench", "bench_stack"):
        problem = record.get(step, {}).get("problem", "")
        if problem and "no --stack" not in problem:
            problems.append(problem)
    return problems


def check(out_dir, log_dir, deadline_s=DEADLINE_S):
    """Run every step; returns (exit status, record path or None).  The record is written
    after each step, "incomplete" until the last."""
    start = time.monotonic()

    def budget(step):
        return min(CAPS_S[step], deadline_s - (time.monotonic() - start) - RESERVED_AFTER_S[step])

    out_of_time = {"problem": f"not run: the check's {deadline_s} s were spent"}

    def section(title):
        print(f"\n== {title} ({time.monotonic() - start:.0f} s in)", flush=True)

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    section("device")
    try:
        facts = run_preflight(budget("preflight"))
    except CheckFailed as exc:
        print(f"gpu-check: FAILED: {exc}", file=sys.stderr)
        return 1, None
    seconds = {"preflight": round(time.monotonic() - start, 1)}
    commit, dirty = git_commit()
    record = {"check": "xpmlp gpu-check", "date_utc": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}",
              "git_commit": commit, "git_dirty": dirty, **facts, "seconds": seconds}

    def save(status="incomplete"):
        record["status"], record["problems"] = status, verdict(record)
        return write_record(record, out_dir)

    path = save()
    section(f"CuPy tests: pytest -m gpu {' '.join(GPU_TEST_FILES)}")
    if budget("tests") < MIN_STEP_S:
        record["tests"] = dict(out_of_time, problems=[out_of_time["problem"]])
    else:
        record["tests"] = run_tests(GPU_TEST_FILES, budget("tests"), log_dir)
        seconds["tests"] = record["tests"]["seconds"]
    save()

    section(f"agreement with NumPy float64: {', '.join(AGREEMENT_DEVICES)}, ten networks")
    record["agreement"] = {"problems": [out_of_time["problem"]]} if budget("agreement") < MIN_STEP_S else \
        run_agreement(budget("agreement"))
    seconds["agreement"] = record["agreement"].get("seconds", 0.0)
    save()

    section("GPU benchmark")
    t = time.monotonic()
    record["bench"] = out_of_time if budget("bench") < MIN_STEP_S else \
        run_bench(["--device", "cuda", "--epochs", "5"], budget("bench"), log_dir, "bench")
    seconds["bench"] = round(time.monotonic() - t, 1)
    save()
    if budget("bench_stack") < MIN_STEP_S:
        record["bench_stack"] = out_of_time
    elif bench_has_stack():
        t = time.monotonic()
        record["bench_stack"] = run_bench(["--device", "cuda", "--epochs", "5", "--stack", str(STACK_MODELS)],
                                          budget("bench_stack"), log_dir, "bench_stack")
        seconds["bench_stack"] = round(time.monotonic() - t, 1)
    else:  # HOOK: runs by itself once `xpmlp bench --stack` exists (issue 10)
        record["bench_stack"] = {"problem": "not run: this xpmlp bench has no --stack option yet"}
        print(record["bench_stack"]["problem"])
    if budget("bench_cpu") < MIN_STEP_S:
        record["bench_cpu_scaling"] = out_of_time
    else:
        t = time.monotonic()
        record["bench_cpu_scaling"] = run_bench(cpu_scaling_args(), budget("bench_cpu"), log_dir, "bench_cpu")
        seconds["bench_cpu"] = round(time.monotonic() - t, 1)
    seconds["total"] = round(time.monotonic() - start, 1)
    problems = verdict(record)
    path = save("failed" if problems else "passed")
    section(f"summary: {record['status'].upper()} on {facts['card']}")
    t = record["tests"]
    print(f"tests: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
          f"{t.get('skipped', 0)} skipped in {t.get('seconds', 0)} s")
    for problem in problems:
        print(f"problem: {problem}")
    print(f"seconds: {json.dumps(seconds)}")
    print(f"record: {path}")
    return (1 if problems else 0), path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)  # the child's part
    parser.add_argument("--agreement", nargs="+", metavar="DEVICE", help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args(argv)
    if args.preflight:
        preflight()
        return 0
    if args.agreement:
        print("AGREEMENT " + json.dumps(agreement(args.agreement)))
        return 0
    os.environ["CUPY_TF32"] = "0"  # TF32 GEMMs would change float32 results in comparisons
    out = os.environ.get("OUT")
    out_dir = Path(out) if out else REPO / "experiments/results/gpu"
    log_dir = Path(out) if out else REPO / "runs/gpu-check"
    status, _ = check(out_dir, log_dir)
    return status


if __name__ == "__main__":
    sys.exit(main())
