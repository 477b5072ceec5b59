"""A Worker that keeps idle keep-alive connections (reclaiming turned off)."""

from greenserve.gunicorn import Worker


class KeepWorker(Worker):
    reclaim_idle = False


class PlainWorker(Worker):
    """A Worker that does not install the C accelerator."""

    install_speedups = False
