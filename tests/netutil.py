"""Ports and environments for multi-process tests."""
import os
import socket


def free_port() -> int:
    """A port the OS just handed out: pid-derived port ranges collided between runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child launcher (torchrun, deepspeed, python), with `extra`
    added, less the rank variables: pytest may itself run under a launcher, and a child that
    inherits RANK or MASTER_PORT would join the wrong job."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(extra)
    return env
