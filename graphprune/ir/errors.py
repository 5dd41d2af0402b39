"""The exceptions the graph IR raises on purpose.

Bad configuration values raise plain ``ValueError`` (see ``graphprune.infra.config``);
everything else that is the user's to fix has its own class, here or, for pass
failures, in ``graphprune.infra.errors``.
"""


class GraphpruneError(Exception):
    """Base class of graphprune's own errors."""


class TraceError(GraphpruneError):
    """A model could not be traced into a graph."""


class CheckpointError(GraphpruneError):
    """A checkpoint could not be written or read."""


class InputError(GraphpruneError, TypeError):
    """A traced graph was called with an input it cannot honour.

    A ``TypeError`` too, as Python raises for a bad call, so code that catches
    those keeps working; the message names the input and what the graph supports.
    """


class LoweredForAnotherCPU(UserWarning):
    """A lowered graph was loaded on a CPU that needs another int8 scheme (or lacks native bf16)."""


class ExportError(GraphpruneError):
    """An export that cannot be made, or whose artefact failed its check in its own runtime."""
