"""``brainalign data ingest things-eeg2|things-eeg2-gifford|things-meg|nsd``.

Registered into the ``data`` group by :func:`register_ingest` (called from ``cli/data.py``).
The library is imported inside the handlers so ``brainalign --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .._checks import BrainalignError

__all__ = ["register_ingest"]

_EPILOG = "Walkthrough with download links, sizes and run times: docs/real-data.md."


def _common(p: argparse.ArgumentParser, *, repetitions: str, name: str) -> None:
    p.add_argument("--out", required=True, type=Path, help="dataset root to create (e.g. data/things-eeg2)")
    p.add_argument(
        "--subjects",
        nargs="+",
        metavar="SUBJECT",
        help="subjects to ingest (1 2 ..., 01, sub-01); default: all found",
    )
    p.add_argument(
        "--repetitions",
        choices=("keep", "average"),
        default=repetitions,
        help=f"keep one row per repetition, or store repetition averages (default: {repetitions})",
    )
    p.add_argument("--name", default=name, help=f"dataset name (default: {name})")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset at --out that was built from other inputs or options",
    )
    p.add_argument(
        "--chunk-mb",
        type=float,
        default=128.0,
        help="source megabytes converted per chunk; bounds memory (default: 128)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register_ingest(data_subparsers: Any) -> None:
    """Add ``ingest`` and its four sources to the ``brainalign data`` sub-commands.

    Parameters
    ----------
    data_subparsers : argparse._SubParsersAction
        The ``add_subparsers()`` result of the ``data`` command.
    """
    p = data_subparsers.add_parser(
        "ingest",
        help="convert a public release (Things-EEG2, THINGS-MEG, NSD) into the data contract",
        description="Validate a downloaded public release and write it as a brainalign dataset: atomic, "
        "resumable per subject, a no-op when re-run on the same inputs.",
        epilog=_EPILOG,
    )
    isub = p.add_subparsers(dest="ingest_source", required=True, metavar="SOURCE")

    for cmd, release, folder in (
        ("things-eeg2", "nice", "Preprocessed_data_250Hz"),
        ("things-eeg2-gifford", "gifford", "preprocessed_eeg"),
    ):
        e = isub.add_parser(
            cmd,
            epilog=_EPILOG,
            help=(
                "Things-EEG2, NICE/AlignVis preprocessing (63 ch, 250 Hz, 0-1 s)"
                if release == "nice"
                else "Things-EEG2, Gifford's official preprocessed release (17 ch, 100 Hz, -0.2-0.8 s)"
            ),
        )
        e.add_argument(
            "--eeg-dir", required=True, type=Path, help=f"folder with sub-XX/ (the release's {folder})"
        )
        e.add_argument("--metadata", required=True, type=Path, help="image_metadata.npy")
        e.add_argument(
            "--images",
            type=Path,
            help="THINGS image folder with training_images/ and test_images/ (checked to exist)",
        )
        _common(e, repetitions="keep", name="things-eeg2" if release == "nice" else "things-eeg2-gifford")
        e.set_defaults(func=_things_eeg2, release=release)

    m = isub.add_parser(
        "things-meg",
        epilog=_EPILOG,
        help="THINGS-MEG preprocessed epochs (OpenNeuro ds004212), cropped to 0-1 s",
    )
    m.add_argument(
        "--meg-dir",
        required=True,
        type=Path,
        help="folder with preprocessed_P{n}-epo.fif (derivatives/preprocessed)",
    )
    m.add_argument("--images", type=Path, help="image root the metadata's image_path values are relative to")
    m.add_argument("--tmin", type=float, default=0.0, help="window start, s (default: 0)")
    m.add_argument("--tmax", type=float, default=1.0, help="window end, s, inclusive (default: 1.0)")
    _common(m, repetitions="keep", name="things-meg")
    m.set_defaults(func=_things_meg)

    n = isub.add_parser(
        "nsd",
        epilog=_EPILOG,
        help="NSD nsdgeneral single-trial responses (HDF5) + nsd_expdesign.mat",
        description="Subjects' nsdgeneral ROIs have different voxel counts, so they can share "
        "a root only if the counts agree; put '{subject}' in --out (e.g. "
        "--out 'data/nsd-sub{subject}') to write one root per subject.",
    )
    n.add_argument(
        "--betas",
        required=True,
        action="append",
        metavar="SUBJECT=PATH",
        help="a subject's HDF5 file, e.g. 1=nsdgeneral/subj01_nsdgeneral.hdf5 (repeatable)",
    )
    n.add_argument("--expdesign", required=True, type=Path, help="nsd_expdesign.mat")
    n.add_argument(
        "--stimuli",
        type=Path,
        help="nsd_stimuli.hdf5: export the subjects' images as PNG into the root (for brainalign embed)",
    )
    n.add_argument("--key", help="HDF5 dataset name (default: 'betas' or 'voxels', whichever exists)")
    n.add_argument("--n-trials", type=int, help="use only the first N trials (AlignVis: 27750)")
    _common(n, repetitions="average", name="nsd")
    n.set_defaults(func=_nsd)


def _report(results: list[Any]) -> int:
    """One line per dataset. The *dataset* fingerprint comes first: it is what ``dataset.json``
    and every MLflow run (tag ``data_fingerprint``) record; the inputs fingerprint only decides
    whether a re-run has anything to do."""
    for r in results:
        fps = f"dataset fingerprint {r.dataset_fingerprint} (MLflow tag data_fingerprint); inputs fingerprint {r.fingerprint}"
        if r.up_to_date:
            sys.stdout.write(f"dataset: {r.root} (up to date; {fps})\n")
        else:
            rows = ", ".join(f"sub-{s} {sp} {k}" for (s, sp), k in sorted(r.rows.items()))
            sys.stdout.write(f"dataset: {r.root} ({fps}; rows: {rows})\n")
    return 0


def _things_eeg2(args: argparse.Namespace) -> int:
    from ..data.ingest import ingest_things_eeg2

    res = ingest_things_eeg2(
        args.eeg_dir,
        args.metadata,
        args.out,
        release=args.release,
        subjects=args.subjects,
        images=args.images,
        repetitions=args.repetitions,
        name=args.name,
        overwrite=args.overwrite,
        chunk_mb=args.chunk_mb,
        show_progress=not args.no_progress,
    )
    return _report([res])


def _things_meg(args: argparse.Namespace) -> int:
    from ..data.ingest import ingest_things_meg

    res = ingest_things_meg(
        args.meg_dir,
        args.out,
        subjects=args.subjects,
        images=args.images,
        repetitions=args.repetitions,
        tmin=args.tmin,
        tmax=args.tmax,
        name=args.name,
        overwrite=args.overwrite,
        chunk_mb=args.chunk_mb,
        show_progress=not args.no_progress,
    )
    return _report([res])


def _nsd(args: argparse.Namespace) -> int:
    from ..data.ingest import ingest_nsd, ingest_nsd_per_subject
    from ..data.ingest._common import subject_id

    betas: dict[int | str, Path | str] = {}
    for item in args.betas:
        subject, sep, path = item.partition("=")
        if not sep or not path:
            raise BrainalignError(f"--betas {item!r}: expected SUBJECT=PATH, e.g. 1=subj01_nsdgeneral.hdf5.")
        betas[subject] = Path(path)
    if args.subjects:
        wanted = {subject_id(s) for s in args.subjects}
        betas = {s: p for s, p in betas.items() if subject_id(s) in wanted}
    kwargs = dict(
        stimuli=args.stimuli,
        key=args.key,
        n_trials=args.n_trials,
        repetitions=args.repetitions,
        overwrite=args.overwrite,
        chunk_mb=args.chunk_mb,
        show_progress=not args.no_progress,
    )
    if "{subject}" in str(args.out):
        name = args.name if "{subject}" in args.name else f"{args.name}-sub{{subject}}"
        return _report(ingest_nsd_per_subject(betas, args.expdesign, str(args.out), name=name, **kwargs))
    return _report([ingest_nsd(betas, args.expdesign, args.out, name=args.name, **kwargs)])
