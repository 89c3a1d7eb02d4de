"""Ports for multi-process tests."""
import socket


def free_port() -> int:
    """A port the OS just handed out: pid-derived port ranges collided between runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
