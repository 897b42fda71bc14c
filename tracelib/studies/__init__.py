"""Robustness studies over prompt sets: `tl.study` runs them, `tl.load_study` reads them back.

`items` (what a study runs over), `store` (the folder: manifest and Parquet shards), `run` (the
shards, batched, resumable, split across `accelerate` processes), `result` (the `Study`).
"""

from tracelib.studies.items import InjectionSpec, Item, StudySpecError, arithmetic_items, parse_injection, read_items  # noqa: F401
from tracelib.studies.result import Study, load_study, wilson_interval  # noqa: F401
from tracelib.studies.run import process_state, study  # noqa: F401
from tracelib.studies.store import StudyFolderError, StudyMismatchError, StudyVersionWarning  # noqa: F401
