"""A local Ray that only this machine can reach: every server on loopback, token authentication on.

Ray started by a plain ``ray.init()`` on Linux listens on every interface (its GCS, raylet,
object manager, workers' gRPC servers, dashboard and runtime-env agents) so that other nodes can
join it; a laptop's sweep has no other nodes, and an open GCS lets anyone on the network submit
code. Ray has one switch that keeps a node's address on loopback, the one it turns on for macOS
and Windows (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by
``ray._private.services.get_node_ip_address``); with it, every server Ray starts binds
127.0.0.1. ``tests/sweeps/test_security.py`` lists the listening sockets of a real local run and fails on
any other address, so a Ray release that changes this is caught.

Token authentication is what a cluster uses too (``cluster.yaml`` starts its nodes with
``RAY_AUTH_MODE=token``), and what Ray (>= 2.59) turns on for a local ``ray.init()``: a client
without the token is refused even on loopback, so another user of the same machine cannot drive
it. The token lives in ``~/.ray/auth_token``, which Ray writes readable by everyone; it is
written (or narrowed) here for its owner alone, before Ray looks for it. An explicit
``RAY_AUTH_MODE`` in the environment is Ray's to respect.

Joining a cluster (``--address``, ``RAY_ADDRESS``) does not come through here: the cluster's own
configuration decides its addresses.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def init(num_cpus: int | None = None, **options) -> None:
    """Starts Ray on this machine only (loopback, token authentication), without the dashboard
    and without Ray's own logging set-up; ``options`` go to ``ray.init``."""
    import ray
    from ray._private import ray_constants

    os.environ[LOOPBACK_SWITCH] = "0"  # the processes Ray starts read it from their environment
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported Ray before the line above
    if os.environ.get(AUTH_MODE, "token").lower() == "token":
        private_token()
    # Ray (>= 2.59) turns token authentication on for a local cluster unless RAY_AUTH_MODE says
    # otherwise, and says so in a warning meant for those who did not choose it
    logging.getLogger(TOKEN_LOGGER).addFilter(_quiet_default_token_warning)
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False, **options}
    ray.init(num_cpus=num_cpus if num_cpus is not None else os.cpu_count(), **options)


def token_path() -> Path:
    """Where Ray reads its token when neither ``RAY_AUTH_TOKEN`` nor ``RAY_AUTH_TOKEN_PATH`` says."""
    return Path(os.environ["RAY_AUTH_TOKEN_PATH"]) if os.environ.get("RAY_AUTH_TOKEN_PATH") else (
        Path.home() / ".ray" / "auth_token")


def private_token() -> None:
    """Makes sure the token file Ray will use exists and only its owner can read it: a new one is
    written with mode 0600 (64 hex digits, like Ray's own), an existing one is narrowed to 0600."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = token_path()
    if path.exists():
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            path.chmod(0o600)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another launch wrote it meanwhile: use that one
        return
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32))


def _quiet_default_token_warning(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()
