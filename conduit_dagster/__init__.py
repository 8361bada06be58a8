"""conduit-dagster: declarative ingestion for Dagster with exact checkpoint/resume.

The engine (``conduit_dagster.engine``) is plain Python and never imports dagster;
the Dagster glue (resources, assets, definitions) sits beside it in this package.
"""

__version__ = "0.1.0"
