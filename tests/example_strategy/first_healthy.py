"""Always the first healthy backend not yet tried: active/passive failover."""

from proxy.errors import NoBackendError


class FirstHealthy:
    def __init__(self, options, *, rng=None):
        for key in options:
            raise ValueError(f"{key}: unknown option")
        self.backends = []

    def update(self, backends):
        self.backends = list(backends)

    def pick(self, ctx):
        for backend in self.backends:
            if backend.healthy and backend.id not in ctx.exclude:
                return backend
        for backend in self.backends:
            if backend.healthy:
                return backend
        raise NoBackendError("no healthy backend")
