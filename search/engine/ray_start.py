"""Ray start-up: join a cluster (with its token) or start a private instance; slot sizing.

Token authentication in Ray 2.60: docs/SEARCH.md, "Running on a cluster".
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from search.engine.private_api import reload_auth_mode
from search.study import (
    StudyConfig,
)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast with a one-line ValueError when ``host:port`` accepts no connection."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address: expected HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ValueError(f"address: cannot reach a Ray cluster at {address} ({exc})") from None


def quiet_ray() -> None:
    """Our own progress view instead of Ray's result dumps; no per-trial warnings."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def init_ray(config: StudyConfig, address: str | None = None, num_cpus: int | None = None
             ) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start a private Ray here.

    ``num_cpus`` sets the logical CPU slots of a private instance (default: this machine's
    cores; ``kdsearch bench --scheduler`` simulates more).

    Token authentication (Ray 2.60; docs/SEARCH.md, "Running on a cluster"): joining, the
    driver presents the token Ray finds (``$RAY_AUTH_TOKEN``, the file
    ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and, with ``RAY_AUTH_MODE`` unset, turns
    token mode on for itself (Ray never does for an explicit address; a token-mode driver
    still joins a cluster without authentication). A cluster that refuses the driver is one
    line naming authentication and the fix. The study's own model code (``MODULE:CALLABLE``
    specs) travels in the job's ``runtime_env`` (``search.engine.user_code``). A private
    instance keeps authentication on (its GCS and raylet listen on every interface) with the
    token found, else with a random one that only this process's environment holds: nothing
    is written to ``~/.ray``.
    """
    import ray

    if ray.is_initialized():
        return
    from search.engine.user_code import runtime_env

    address = address or os.environ.get("RAY_ADDRESS") or None
    mode, source = os.environ.get("RAY_AUTH_MODE"), token_source()
    env = runtime_env(config) if config is not None else None  # the user's model code
    if address:
        _join(address, mode, source, env)
    else:
        _start_private(mode, source, num_cpus, env)


def token_source() -> str | None:
    """Where Ray would find an authentication token here (``$RAY_AUTH_TOKEN``, the file
    ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    files = [Path(token_path).expanduser()] if token_path else []
    files.append(Path.home() / ".ray" / "auth_token")
    return next((str(f) for f in files if f.is_file()), None)


def _join(address: str, mode: str | None, source: str | None, env: dict | None = None) -> None:
    """``ray.init(address)``, presenting the token found; one-line ValueError on failure."""
    import ray
    from ray.exceptions import AuthenticationError

    check_reachable(address)
    if mode is None and source:
        os.environ["RAY_AUTH_MODE"] = "token"
        reload_auth_mode()  # a process reads RAY_AUTH_MODE once, when Ray is imported
    failure = None
    with _quiet_refusals():
        try:
            ray.init(address=address, logging_level="warning", runtime_env=env)
        except (AuthenticationError, ConnectionError, RuntimeError, ValueError,
                TimeoutError) as exc:
            failure = exc
    if failure is not None:
        raise ValueError(_join_failure(address, failure, mode, source)) from None


@contextlib.contextmanager
def _quiet_refusals() -> Iterator[None]:
    """Hold back what Ray's core prints on fd 2 — a warning for every refused connection
    attempt, about 20 in 20 s — and replay it without those lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(x for x in lines if "InvalidAuthToken" not in x))
            sys.stderr.flush()


def _join_failure(address: str, failure: BaseException, mode: str | None,
                  source: str | None) -> str:
    """The one line for a failed join: authentication and its fix, or the first line."""
    chain, exc = [], failure
    while exc is not None and len(chain) < 8:
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    if not any("AuthenticationError" in c or "InvalidAuthToken" in c for c in chain):
        first = (str(failure).strip().splitlines() or [failure.__class__.__name__])[0]
        return f"address: cannot join Ray at {address}: {first}"
    now = os.environ.get("RAY_AUTH_MODE", "disabled")
    why = (f"RAY_AUTH_MODE={now} here" if now != "token"
           else f"the cluster refused the token from {source}" if source
           else "RAY_AUTH_MODE=token but this driver has no token")
    if mode is None and not source:
        why = "this driver has no token"
    return (f"address: token authentication failed joining Ray at {address} ({why}): give "
            "this driver the cluster's token (the head's ~/.ray/auth_token copied here, or "
            "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) and leave RAY_AUTH_MODE unset or "
            "'token' (docs/SEARCH.md, Running on a cluster)")


def _start_private(mode: str | None, source: str | None, num_cpus: int | None,
                   env: dict | None = None) -> None:
    """A private Ray instance on this machine; never joins one that ``ray start`` began.

    Its GCS and raylet listen on every interface, so token authentication stays on (Ray's
    default for a new local instance). Without a token Ray would write a new one to
    ~/.ray/auth_token, which then turns authentication on for every later ``ray start
    --head`` of this user: a random token in this process's environment instead (the
    instance's processes inherit it). Only Ray's warning that it turned the default on is
    kept off the console.
    """
    import ray

    if mode != "disabled" and source is None:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 dashboard_host="127.0.0.1", logging_level="warning", runtime_env=env)
    finally:
        notice.setLevel(level)


def cluster_slots(config: StudyConfig) -> int:
    """How many trials the cluster can run at once with the study's per-trial resources."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    slots = math.floor(cpus / config.cpus_per_trial + 1e-9)
    if config.gpus_per_trial > 0:
        slots = min(slots, math.floor(gpus / config.gpus_per_trial + 1e-9))
    if slots < 1:
        raise ValueError(f"resources: the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs, not "
                         f"enough for one trial ({config.cpus_per_trial:g} CPUs, "
                         f"{config.gpus_per_trial:g} GPUs)")
    return slots


def live_trials(config: StudyConfig, slots: int) -> tuple[int, int]:
    """(trials running at most, trials alive at most: running plus queued).

    With every slot in use, a few trials wait in the queue: when a trial ends, Tune hands its
    worker process to a queued trial rather than stopping it and starting a new one.
    """
    running = min(config.max_concurrent or slots, slots)
    queued = max(1, running // 4) if running >= slots else 0
    return running, running + queued
