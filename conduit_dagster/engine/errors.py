"""The one exception tree of conduit-dagster.

    ConduitError                  every error the engine raises on purpose
    ├── SpecError                 ingest.yml is malformed or inconsistent
    ├── CheckpointError           a checkpoint cannot be read, trusted or written
    ├── PipelineBusyError         another live run holds the pipeline
    ├── SourceError               the source could not be read, or its rows break a rule
    │   └── OrderingError         checkpoint values go backwards or are NULL
    └── DestinationError          the destination could not be written

Every message says what went wrong, where (file, key, column, value) and how to fix it,
and never contains a secret.
"""


class ConduitError(Exception):
    """Root of every error raised on purpose by conduit-dagster."""


class SpecError(ConduitError):
    """ingest.yml is malformed or inconsistent."""


class CheckpointError(ConduitError):
    """A checkpoint cannot be read, trusted or written."""


class PipelineBusyError(ConduitError):
    """Another live run holds the pipeline."""


class SourceError(ConduitError):
    """The source could not be read."""


class OrderingError(SourceError):
    """Checkpoint column values went backwards or were NULL."""


class DestinationError(ConduitError):
    """The destination could not be written."""
