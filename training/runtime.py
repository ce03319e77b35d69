"""Process-level set-up: XLA flags, multi-host start, the device mesh, and what ran where."""

import ctypes
import os
import platform as platform_lib
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from absl import logging

# XLA flags the project sets by default, per platform, measured in benchmarks/README.md.
# On CPU, XLA hands convolutions to YNNPACK, which is slow for these networks' backward passes;
# restricting YNNPACK to reductions makes this project's training steps 1.2-2x faster (2-4x
# for plain JAX layers).
DEFAULT_XLA_FLAGS = {
    "cpu": ("--xla_cpu_experimental_ynn_fusion_type=reduce",),
}


def configure_xla_flags(platform: str = "cpu", *, project_flags: bool = True) -> str:
    """Adds the project's default XLA flags for `platform` to $XLA_FLAGS; returns the result.

    Must run before JAX starts its backend (i.e. before the first computation). A flag the user
    already set in $XLA_FLAGS is left as the user set it. `project_flags=False` adds nothing
    (a benchmark's before/after comparison of the flags).
    """
    current = os.environ.get("XLA_FLAGS", "")
    user_names = {f.split("=", 1)[0] for f in current.split()}
    defaults = DEFAULT_XLA_FLAGS.get(platform, ()) if project_flags else ()
    added = [f for f in defaults if f.split("=", 1)[0] not in user_names]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return os.environ.get("XLA_FLAGS", "")


def default_compilation_cache_dir() -> Path:
    """$XDG_CACHE_HOME/convnets/jax, or ~/.cache/convnets/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convnets" / "jax"


def configure_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache; returns its folder (None when turned off).

    A compiled program is written there when its compilation took at least 0.5 s, and the next
    process that compiles the same program with the same JAX, flags and devices loads it
    instead: ResNet-56's first step comes 2-3x sooner from the second run on (a new seed, a
    resume, the next run of an experiment; benchmarks/README.md). The user's own
    $JAX_COMPILATION_CACHE_DIR and $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS are kept;
    $JAX_ENABLE_COMPILATION_CACHE=false turns the cache off. Call before importing JAX.
    """
    if os.environ.get("JAX_ENABLE_COMPILATION_CACHE", "true").lower() in ("0", "false", "no"):
        return None
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        folder = default_compilation_cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. a read-only home on a cluster: run without the cache
            logging.warning(
                "no compilation cache: cannot create %s (%s); set $JAX_COMPILATION_CACHE_DIR "
                "to a writable folder to keep compiled programs between runs.",
                folder,
                e,
            )
            return None
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    return os.environ["JAX_COMPILATION_CACHE_DIR"] or None


def configure_jax(platform: str = "cpu", *, project_flags: bool = True) -> None:
    """The process set-up that must come before JAX starts: the CPU cores and parent of a
    program the experiment runner started (`follow_runner`), the project's XLA flags for
    `platform` (unless not `project_flags`), the persistent compilation cache, glibc's malloc
    for XLA:CPU's buffers (`configure_host_memory`), and JAX's hint
    about a GPU without its plugin left to `warn_about_hardware` (which names the extra). The
    user's environment comes first."""
    follow_runner()
    configure_xla_flags(platform, project_flags=project_flags)
    configure_compilation_cache()
    configure_host_memory()
    replace_jax_gpu_hint()


def signal_name(signum: int) -> str:
    """'SIGTERM', 'SIGINT (Ctrl-C)': how the one-line stop messages name a signal."""
    return "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name


# Set by the experiment runner (experiments/runner.py) in the programs it starts side by side:
# the CPU cores the run may use ("0,1"), and the runner's process id.
CORES_ENV = "CONVNETS_CPU_CORES"
RUNNER_ENV = "CONVNETS_RUNNER_PID"
_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def follow_runner() -> None:
    """In a program the experiment runner started: keeps to the CPU cores it was given
    ($CONVNETS_CPU_CORES; XLA's and OpenMP's thread pools are sized by them) and asks the
    kernel for SIGTERM when the runner dies (Linux), so that a run whose runner was killed
    saves its checkpoint and stops instead of training on unwatched. Set here, in the program,
    rather than between fork and exec in the runner, which may already run JAX's threads."""
    cores = os.environ.get(CORES_ENV, "").strip()
    if cores:
        try:
            os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
        except (ValueError, OSError) as e:
            sys.exit(f"error: ${CORES_ENV}={cores!r} ({e}); it names CPU cores, e.g. 0,1")
    runner = os.environ.get(RUNNER_ENV, "").strip()
    if runner.isdigit() and sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != int(runner):  # it died before the signal was asked for
            os.kill(os.getpid(), signal.SIGTERM)


# glibc's mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# freed memory at the top of the heap that glibc keeps instead of returning it to the kernel:
# above the largest temporary buffer of a step (ResNet-20 at batch 128: 0.3 GB)
HEAP_KEEP_BYTES = 1 << 30
MALLOPT_ENV = "CONVNETS_MALLOPT"
# the user's own settings of glibc's allocator, which come first
_GLIBC_MALLOC_ENV = (
    "GLIBC_TUNABLES",
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)


def configure_host_memory() -> str:
    """Makes glibc's malloc keep and reuse the memory of XLA:CPU's buffers; returns what was
    done ('on', or why not).

    XLA:CPU allocates each execution's temporary buffers as one block (ResNet-20's training
    step at batch 128: 302 MB) from one of its threads. glibc serves a block that large from a
    fresh mmap in a thread's arena, whatever its mmap threshold, and unmaps it when freed, so
    every step touched 74,000 new pages: a quarter of the step's CPU time went to the kernel's
    page faults (benchmarks/README.md). With one arena (`M_ARENA_MAX` 1), no mmap
    (`M_MMAP_MAX` 0) and up to `HEAP_KEEP_BYTES` of free heap kept (`M_TRIM_THRESHOLD`), the
    block is carved from the heap once and reused by every later step: no page faults after
    the first steps (ResNet-20's step 1.4-1.5x faster on a 2-core CPU). The price is memory:
    the heap keeps the buffers of about two steps (ResNet-20: 1.28 GB resident, not 0.79 GB).
    Only on Linux with glibc, only where no accelerator plugin is installed
    (its host buffers have their own allocator), and not when the user set glibc's malloc
    variables (GLIBC_TUNABLES, MALLOC_*_) or CONVNETS_MALLOPT=0 (off / false / no). Must run
    before JAX starts its threads (a thread keeps the arena it first used)."""
    global _host_memory
    if _host_memory == "on":  # set once per process
        return _host_memory
    if os.environ.get(MALLOPT_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        _host_memory = f"off (${MALLOPT_ENV})"
    elif sys.platform != "linux" or platform_lib.libc_ver()[0] != "glibc":
        _host_memory = "off (not Linux with glibc)"
    elif any(v in os.environ for v in _GLIBC_MALLOC_ENV):
        _host_memory = "off (the environment sets glibc's malloc)"
    elif _accelerator_plugin_installed():
        _host_memory = "off (an accelerator plugin is installed)"
    else:
        libc = ctypes.CDLL(None)
        done = [
            libc.mallopt(_M_ARENA_MAX, 1),
            libc.mallopt(_M_MMAP_MAX, 0),
            libc.mallopt(_M_TRIM_THRESHOLD, HEAP_KEEP_BYTES),
        ]
        _host_memory = "on" if all(done) else "off (mallopt refused)"
    return _host_memory


_host_memory = "not set up (training.runtime.configure_jax was not called)"


def _accelerator_plugin_installed() -> bool:
    """Whether one of JAX's accelerator plugins (ACCELERATOR_EXTRAS) is installed."""
    import importlib.metadata as md

    for distribution in ACCELERATOR_EXTRAS.values():
        try:
            md.version(distribution)
            return True
        except md.PackageNotFoundError:
            pass
    return False


_CLUSTER_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def _cluster_detected() -> bool:
    """Whether the environment names a cluster JAX can read the coordinator address from."""
    return any(v in os.environ for v in _CLUSTER_VARIABLES)


def _cluster_environment() -> bool:
    return (
        _cluster_detected()
        and int(os.environ.get("SLURM_NTASKS", os.environ.get("JAX_NUM_PROCESSES", "2"))) > 1
    )


def check_distributed(dist_cfg) -> None:
    """Raises UserError naming the field when the multi-host settings cannot work."""
    from errors import UserError

    d = dist_cfg
    if d.num_processes < 0:
        raise UserError("config.distributed.num_processes: must be >= 0 (0: from the cluster)")
    if d.process_id < -1 or (d.num_processes and d.process_id >= d.num_processes):
        raise UserError(
            f"config.distributed.process_id: {d.process_id} must be -1 (from the cluster) or in "
            f"[0, num_processes={d.num_processes or '?'})"
        )
    if d.initialization_timeout <= 0:
        raise UserError("config.distributed.initialization_timeout: must be > 0 seconds")
    address = d.coordinator_address
    host, _, port = address.rpartition(":")
    if address and not (host and port.isdigit()):
        raise UserError(
            f"config.distributed.coordinator_address: {address!r} is not host:port (process "
            "0's address and a free port, e.g. 10.0.0.1:1234)"
        )
    if d.initialize == "on" and not address and not _cluster_detected():
        raise UserError(
            "config.distributed.initialize='on' needs config.distributed.coordinator_address "
            "(host:port of process 0) with num_processes and process_id, or a cluster "
            "environment that names them (SLURM, a TPU pod, $JAX_COORDINATOR_ADDRESS)."
        )


def _watchdog(dist_cfg, timeout: float) -> threading.Timer:
    """A timer that ends the process with one line when the processes have not all joined
    within `timeout` seconds (JAX would wait on, then abort with a C++ stack trace)."""

    def fire():
        sys.stderr.write(
            f"error: jax.distributed: not all {dist_cfg.num_processes or 'declared'} processes "
            f"joined the coordinator {dist_cfg.coordinator_address or '(from the cluster)'} "
            f"within {timeout:g} s (config.distributed.initialization_timeout). Start every "
            "process with the same coordinator_address and num_processes and its own "
            "process_id, or declare as many processes as you start.\n"
        )
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(timeout, fire)
    timer.daemon = True
    return timer


def maybe_initialize_distributed(dist_cfg) -> None:
    """Starts `jax.distributed` when the config or the environment asks for several processes.

    `dist_cfg.initialize`: 'on' always, 'off' never, 'auto' when a cluster environment (SLURM,
    a TPU pod, or $JAX_COORDINATOR_ADDRESS) with more than one process is detected. Explicit
    coordinator address, process count and id in the config take precedence over detection.
    When not every process has joined within `dist_cfg.initialization_timeout` seconds, the
    process ends with one line saying so. Raises UserError for settings that cannot work.
    """
    import jax

    from errors import UserError

    if dist_cfg.initialize == "off":
        return
    check_distributed(dist_cfg)
    if dist_cfg.initialize == "auto" and not (
        dist_cfg.coordinator_address or _cluster_environment()
    ):
        return
    timeout = dist_cfg.initialization_timeout
    # JAX's own limit comes later: the watchdog's line comes first, not JAX's abort
    kwargs = {"initialization_timeout": int(timeout) + 60}
    if dist_cfg.coordinator_address:
        kwargs["coordinator_address"] = dist_cfg.coordinator_address
    if dist_cfg.num_processes > 0:
        kwargs["num_processes"] = dist_cfg.num_processes
    if dist_cfg.process_id >= 0:
        kwargs["process_id"] = dist_cfg.process_id
    logging.info(
        "jax.distributed: joining %s as process %s of %s (up to %g s)",
        dist_cfg.coordinator_address or "the cluster's coordinator",
        dist_cfg.process_id if dist_cfg.process_id >= 0 else "?",
        dist_cfg.num_processes or "?",
        timeout,
    )
    watchdog = _watchdog(dist_cfg, timeout)
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:  # e.g. nothing to detect the cluster from
        raise UserError(
            f"jax.distributed could not start: {str(e).splitlines()[0]} (config.distributed)"
        ) from None
    finally:
        watchdog.cancel()
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def make_mesh():
    """Returns a 1-D mesh named 'data' over every device of every process (data parallelism)."""
    import jax
    from jax.sharding import AxisType

    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def git_commit() -> str:
    """Returns the project's git commit (with '+dirty' when the tree has changes), or ''."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("+dirty" if sha and dirty else "")


def environment() -> dict:
    """Returns what a result depends on besides the config: versions, devices, commit, flags."""
    import importlib.metadata as md
    import platform

    import jax

    packages = (
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "tensorflow-datasets",
        "numpy",
    )
    versions = {}
    for name in packages:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_cores_used": len(os.sched_getaffinity(0)),  # those this process may run on
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host_memory": _host_memory,  # configure_host_memory: glibc's malloc set up or not
        "git_commit": git_commit(),
    }


def quiet_library_logs() -> None:
    """Keeps INFO lines from the project and drops the libraries' (Orbax logs every file it
    closes); their warnings and errors still show."""
    import logging as std_logging

    class OwnInfoOnly(std_logging.Filter):
        def filter(self, record: std_logging.LogRecord) -> bool:
            return record.levelno >= std_logging.WARNING or "site-packages" not in record.pathname

    logging.get_absl_handler().addFilter(OwnInfoOnly())


# --------------------------------------------------------------------------------------------
# Hardware and install: a GPU or TPU the system shows while JAX runs on the CPU.

# `pip install -e '.[EXTRA]'` (pyproject.toml): JAX's own plugin packages, pinned.
ACCELERATOR_EXTRAS = {
    "cuda12": "jax-cuda12-plugin",
    "cuda13": "jax-cuda13-plugin",
    "tpu": "libtpu",
}
# CUDA 13's libraries need an NVIDIA driver of at least this major version, CUDA 12's at least
# 525 (NVIDIA's CUDA release notes; JAX's installation guide).
CUDA13_MIN_DRIVER = 580
CUDA12_MIN_DRIVER = 525
# SLURM's variables that say GPUs were requested or given to the job.
_SLURM_GPU_VARIABLES = (
    "SLURM_GPUS",
    "SLURM_GPUS_ON_NODE",
    "SLURM_GPUS_PER_NODE",
    "SLURM_GPUS_PER_TASK",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
)
# bfloat16 against float32 on the CPU backend, measured (benchmarks/README.md, "bfloat16 on
# the CPU"): training step time, and compile time, in the same process, interleaved.
CPU_BFLOAT16_RATIO = "1.04x"
CPU_BFLOAT16_COMPILE_RATIO = "1.2x"


def nvidia_driver_major(proc: Path = Path("/proc")) -> int | None:
    """The loaded NVIDIA kernel driver's major version (580 for 580.159.03), or None."""
    import re

    try:
        text = (proc / "driver" / "nvidia" / "version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+)\.\d+", text)
    return int(match.group(1)) if match else None


def _first_device_node(dev: Path, pattern: str) -> str | None:
    """The first device file of `dev` matching `pattern` (e.g. /dev/nvidia0), or None."""
    try:
        nodes = sorted(p.name for p in dev.glob(pattern))
    except OSError:
        nodes = []
    return str(dev / nodes[0]) if nodes else None


def visible_gpu(
    environ: dict | None = None, dev: Path = Path("/dev"), which=shutil.which
) -> str | None:
    """What shows an NVIDIA GPU to this process without asking JAX: '/dev/nvidia0',
    'nvidia-smi on the PATH', 'CUDA_VISIBLE_DEVICES=0', 'SLURM_GPUS_ON_NODE=1'; None when
    nothing does. `environ`, `dev` and `which` are parameters so tests can fake the machine."""
    env = os.environ if environ is None else environ
    node = _first_device_node(dev, "nvidia[0-9]*")
    if node:
        return node
    if which("nvidia-smi"):
        return "nvidia-smi on the PATH"
    cuda = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if cuda and cuda not in ("-1", "NoDevFiles", "none", "void"):
        return f"CUDA_VISIBLE_DEVICES={cuda}"
    for name in _SLURM_GPU_VARIABLES:
        value = env.get(name, "").strip()
        if value and value not in ("0", "(null)"):
            return f"{name}={value}"
    if "gpu" in env.get("SLURM_TRES_PER_TASK", "") + env.get("SLURM_JOB_GRES", ""):
        return "a SLURM GPU request"
    return None


def visible_tpu(environ: dict | None = None, dev: Path = Path("/dev")) -> str | None:
    """What shows a TPU to this process ('/dev/accel0', 'TPU_ACCELERATOR_TYPE=v5e-8'), or None."""
    env = os.environ if environ is None else environ
    node = _first_device_node(dev, "accel[0-9]*")
    if node:
        return node
    for name in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES"):
        if env.get(name):
            return f"{name}={env[name]}"
    return None


def installed_extras() -> list[str]:
    """The accelerator extras whose JAX plugin package is installed ('cuda12', 'tpu', ...)."""
    import importlib.metadata as md

    found = []
    for extra, package in ACCELERATOR_EXTRAS.items():
        try:
            md.version(package)
        except md.PackageNotFoundError:
            continue
        found.append(extra)
    return found


def cuda_extra_for(driver_major: int | None) -> str:
    """The CUDA extra to install for an NVIDIA driver (None: unknown) and why, as text."""
    if driver_major is None:
        return (
            f"'.[cuda13]' (NVIDIA driver >= {CUDA13_MIN_DRIVER}) or '.[cuda12]' (driver >= "
            f"{CUDA12_MIN_DRIVER}; `nvidia-smi` shows the driver version)"
        )
    if driver_major >= CUDA13_MIN_DRIVER:
        return f"'.[cuda13]' (this machine's NVIDIA driver {driver_major} supports CUDA 13)"
    if driver_major >= CUDA12_MIN_DRIVER:
        return f"'.[cuda12]' (this machine's NVIDIA driver {driver_major} supports CUDA 12)"
    return (
        f"a newer NVIDIA driver first (this machine's is {driver_major}; JAX's CUDA 12 build "
        f"needs >= {CUDA12_MIN_DRIVER}), then '.[cuda12]'"
    )


def hardware_warnings(
    platform: str,
    dtype: str = "float32",
    *,
    environ: dict | None = None,
    dev: Path = Path("/dev"),
    proc: Path = Path("/proc"),
    which=shutil.which,
    extras: list[str] | None = None,
) -> list[str]:
    """The warnings for hardware and install that disagree, one line each ([] when they agree).

    `platform`: JAX's backend ('cpu', 'gpu', 'tpu'); `dtype`: config.model.dtype. When JAX runs
    on the CPU but the system shows a GPU (device files, nvidia-smi, CUDA_VISIBLE_DEVICES,
    SLURM's GPU variables) or a TPU, one line names the extra to install (or, when the plugin is
    installed, says JAX could not use it). bfloat16 on the CPU: one line with its cost. Nothing
    when $JAX_PLATFORMS asks for the CPU alone (the user chose it). The machine is read from
    `environ`, `dev`, `proc`, `which` and `extras` (installed extras), so tests can fake it.
    """
    env = os.environ if environ is None else environ
    installed = installed_extras() if extras is None else extras
    out = []
    chose_cpu = env.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
    if platform == "cpu" and not chose_cpu:
        gpu, tpu = visible_gpu(env, dev, which), visible_tpu(env, dev)
        cuda = [e for e in installed if e.startswith("cuda")]
        if gpu and cuda:
            out.append(
                f"an NVIDIA GPU is visible ({gpu}) and the {'/'.join(cuda)} extra is installed, "
                "but JAX found no GPU and runs on the CPU: see JAX's warning above (often a "
                "driver too old for the plugin's CUDA, or a second jaxlib); check with "
                "`python -c 'import jax; print(jax.devices())'`."
            )
        elif gpu:
            out.append(
                f"an NVIDIA GPU is visible ({gpu}) but JAX has only CPU devices: training "
                "would run on the CPU. Install JAX's CUDA plugin into this environment: "
                f"pip install -e {cuda_extra_for(nvidia_driver_major(proc))}, or set "
                "JAX_PLATFORMS=cpu to mean it."
            )
        elif tpu and "tpu" not in installed:
            out.append(
                f"a TPU is visible ({tpu}) but JAX has only CPU devices: training would run "
                "on the CPU. Install libtpu into this environment: pip install -e '.[tpu]'."
            )
    if platform == "cpu" and dtype == "bfloat16":
        out.append(
            "config.model.dtype=bfloat16 on the CPU backend: no faster than float32, and less "
            "precise (measured on a 2-core CPU: ResNet-20's training step took "
            f"{CPU_BFLOAT16_RATIO} the time of float32, its compile {CPU_BFLOAT16_COMPILE_RATIO} "
            "as long; XLA:CPU "
            "has no fast bfloat16 convolutions). Parameters stay float32 either way; use float32 "
            "on a CPU, bfloat16 on a GPU or TPU."
        )
    return out


_WARNED: set[str] = set()


def warn_about_hardware(dtype: str = "float32") -> list[str]:
    """Logs `hardware_warnings` for this process's JAX backend, each line once per process
    (process 0 only); returns the lines it logged."""
    import jax

    if jax.process_index() != 0:
        return []
    lines = [w for w in hardware_warnings(jax.default_backend(), dtype) if w not in _WARNED]
    for line in lines:
        _WARNED.add(line)
        logging.warning("%s", line)
    return lines


class _DropJaxGpuHint:
    """Drops JAX's own 'An NVIDIA GPU may be present ... Falling back to cpu' line: the
    project's warning (`warn_about_hardware`) says the same and names the extra to install."""

    def filter(self, record) -> bool:
        return "CUDA-enabled jaxlib is not installed" not in record.getMessage()


def replace_jax_gpu_hint() -> None:
    """Installs `_DropJaxGpuHint` on JAX's backend logger (before JAX starts its backend)."""
    import logging as std_logging

    logger = std_logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _DropJaxGpuHint) for f in logger.filters):
        logger.addFilter(_DropJaxGpuHint())
