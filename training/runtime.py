"""Process-level set-up: XLA flags, multi-host start, the device mesh, and what ran where."""

import os
import subprocess
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
    """The process set-up that must come before JAX starts: the project's XLA flags for
    `platform` (unless not `project_flags`) and the persistent compilation cache. The user's
    environment comes first."""
    configure_xla_flags(platform, project_flags=project_flags)
    configure_compilation_cache()


def _cluster_environment() -> bool:
    return (
        any(
            v in os.environ
            for v in (
                "JAX_COORDINATOR_ADDRESS",
                "SLURM_JOB_ID",
                "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS",
            )
        )
        and int(os.environ.get("SLURM_NTASKS", os.environ.get("JAX_NUM_PROCESSES", "2"))) > 1
    )


def maybe_initialize_distributed(dist_cfg) -> None:
    """Starts `jax.distributed` when the config or the environment asks for several processes.

    `dist_cfg.initialize`: 'on' always, 'off' never, 'auto' when a cluster environment (SLURM,
    a TPU pod, or $JAX_COORDINATOR_ADDRESS) with more than one process is detected. Explicit
    coordinator address, process count and id in the config take precedence over detection.
    """
    import jax

    if dist_cfg.initialize == "off":
        return
    if dist_cfg.initialize == "auto" and not (
        dist_cfg.coordinator_address or _cluster_environment()
    ):
        return
    kwargs = {}
    if dist_cfg.coordinator_address:
        kwargs["coordinator_address"] = dist_cfg.coordinator_address
    if dist_cfg.num_processes > 0:
        kwargs["num_processes"] = dist_cfg.num_processes
    if dist_cfg.process_id >= 0:
        kwargs["process_id"] = dist_cfg.process_id
    jax.distributed.initialize(**kwargs)
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
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
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
