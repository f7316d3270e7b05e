"""Public releases in, the data contract out: Things-EEG2 (both preprocessed releases),
THINGS-MEG and NSD-fMRI.

Each ``ingest_*`` function checks every input before writing (keys, shapes, dtypes,
channels, sampling rate and times, counts per split, duplicated images, train/test concept
overlap), reads pickled release files only through :mod:`.safe_pickle`, streams the data in
chunks (bounded memory), and writes one dataset root atomically, resumably per subject and
idempotently (see :func:`._common.run_ingest`). ``docs/real-data.md`` is the walkthrough.
"""

from ._common import IngestResult
from .nsd import ingest_nsd, ingest_nsd_per_subject
from .safe_pickle import FileBackedArray, UnsafePickleError, load_release_file
from .things_eeg2 import FORMATS as THINGS_EEG2_RELEASES
from .things_eeg2 import ingest_things_eeg2, read_image_metadata
from .things_meg import ingest_things_meg

__all__ = [
    "THINGS_EEG2_RELEASES",
    "FileBackedArray",
    "IngestResult",
    "UnsafePickleError",
    "ingest_nsd",
    "ingest_nsd_per_subject",
    "ingest_things_eeg2",
    "ingest_things_meg",
    "load_release_file",
    "read_image_metadata",
]
