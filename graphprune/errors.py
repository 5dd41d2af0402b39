"""The exceptions graphprune raises on purpose.

Bad configuration values raise plain ``ValueError`` (see ``graphprune.config``);
everything else that is the user's to fix has its own class here.
"""


class GraphpruneError(Exception):
    """Base class of graphprune's own errors."""


class TraceError(GraphpruneError):
    """A model could not be traced into a graph."""


class CheckpointError(GraphpruneError):
    """A checkpoint could not be written or read."""


class PassError(GraphpruneError):
    """A pass failed while running (its configuration was valid)."""


class PipelineError(GraphpruneError):
    """A pipeline step failed; names the step and the steps that ran before it."""

    def __init__(self, message: str, *, step: int, name: str, previous: list[str]):
        super().__init__(message)
        self.step = step
        self.name = name
        self.previous = previous
