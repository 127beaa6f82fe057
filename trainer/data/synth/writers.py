"""Write phantom cases in the exact on-disk layouts of BraTS 2019, Decathlon Task01 and nnU-Net v2 raw.

See ../shared/DATASETS.md. The output folder is built under a temporary name and renamed
into place only when every case is written, so an interrupted run leaves nothing behind.
"""
from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from trainer.data.nifti import Geometry, write_volume
from trainer.data.synth.phantom import (ENHANCING, MODALITY_ORDER, NECROTIC, OEDEMA, REAL_SHAPE,
                                        make_case)
from trainer.fsutil import atomic_dir

BRATS_LABELS = {OEDEMA: 2, NECROTIC: 1, ENHANCING: 4}      # BraTS: 1 NCR/NET, 2 ED, 4 ET
DECATHLON_LABELS = {OEDEMA: 1, NECROTIC: 2, ENHANCING: 3}  # MSD: 1 edema, 2 non-enh., 3 enh.
BRATS_ROOT_NAME = "MICCAI_BraTS_2019_Data_Training"
DECATHLON_ROOT_NAME = "Task01_BrainTumour"
NNUNET_ROOT_NAME = "Dataset001_BrainTumour"  # what nnU-Net's convert_MSD_dataset.py makes of Task01
NNUNET_CHANNELS = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}  # _0000 ... _0003, MODALITY_ORDER's order

# The 26-byte header of an empty macOS AppleDouble file (magic 0x00051607, version 2).
APPLEDOUBLE_STUB = bytes.fromhex("00051607" "00020000") + b"Mac OS X        " + b"\x00\x00"

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def brats_geometry(shape: Sequence[int]) -> Geometry:
    """Where real BraTS 2017-2020 volumes sit, as SimpleITK (LPS) reads them.

    Their NIfTI affine (RAS) is diag(-1, -1, 1, 1) with translation (0, 239, 0): in LPS that
    is the identity direction and origin (0, -239, 0) for 240 x 240 x 155 at 1 mm. Writing
    it (not SimpleITK's defaults) makes a reader/writer that drops or transposes geometry
    fail the tests. For a smaller phantom the y offset scales the same way: -(ny - 1).
    """
    return Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, -float(shape[1] - 1), 0.0), direction=_IDENTITY)


def decathlon_geometry(shape: Sequence[int]) -> Geometry:
    """Where MSD Task01 volumes sit, as SimpleITK (LPS) reads them: 1 mm, origin 0 and
    direction diag(-1, -1, 1), because the files store an identity RAS affine."""
    return Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                    direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


@dataclass(frozen=True)
class SynthRequest:
    out: Path
    cases: int
    seed: int
    shape: tuple[int, int, int] = REAL_SHAPE
    test_cases: int | None = None  # Decathlon imagesTs; default: about a third of --cases
    appledouble: bool = True       # Decathlon: the official tarball carries ._* files
    workers: int = 0               # 0 = one per CPU core
    overwrite: bool = False
    difficulty: str = "standard"   # "hard": faint, infiltrative, heterogeneous lesions (phantom.py)


def write_brats(request: SynthRequest, progress: bool = True) -> Path:
    """BraTS 2019 training layout: HGG/ and LGG/ case folders, name_mapping.csv, survival_data.csv."""
    names = _brats_case_names(request.cases, request.seed)
    with atomic_dir(request.out, request.overwrite) as root:
        jobs = [(_write_brats_case, (root, name, (request.seed, index), request.shape, request.difficulty))
                for index, name in enumerate(names)]
        grades = _run_jobs(jobs, request.workers, progress, "synth brats")
        _write_brats_tables(root, names, grades, request.seed)
    return request.out


def write_decathlon(request: SynthRequest, progress: bool = True) -> Path:
    """Decathlon Task01_BrainTumour layout: dataset.json, imagesTr/labelsTr/imagesTs (4D images)."""
    n_test = request.test_cases if request.test_cases is not None else max(1, request.cases // 3)
    train_ids = list(range(1, request.cases + 1))
    test_ids = list(range(request.cases + 1, request.cases + n_test + 1))
    with atomic_dir(request.out, request.overwrite) as root:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (root / sub).mkdir()
        jobs = [(_write_decathlon_case, (root, case_id, (request.seed, case_id), request.shape, True,
                                         request.difficulty)) for case_id in train_ids]
        jobs += [(_write_decathlon_case, (root, case_id, (request.seed, case_id), request.shape, False,
                                          request.difficulty)) for case_id in test_ids]
        _run_jobs(jobs, request.workers, progress, "synth decathlon")
        _write_dataset_json(root, train_ids, test_ids, request.seed)
        if request.appledouble:
            _write_appledouble_files(root)
    return request.out


def write_nnunet(request: SynthRequest, progress: bool = True) -> Path:
    """nnU-Net v2 raw layout, as nnU-Net's convert_MSD_dataset.py writes Dataset001_BrainTumour from the
    Decathlon set of the same request: dataset.json (channel_names, labels name -> value, numTraining,
    file_ending), imagesTr/BRATS_001_0000.nii.gz ... _0003, labelsTr/BRATS_001.nii.gz, imagesTs/. Case
    BRATS_NNN is the phantom of Decathlon's BRATS_NNN (same seed), voxel for voxel. No AppleDouble files:
    the converter skips them."""
    n_test = request.test_cases if request.test_cases is not None else max(1, request.cases // 3)
    train_ids = list(range(1, request.cases + 1))
    test_ids = list(range(request.cases + 1, request.cases + n_test + 1))
    with atomic_dir(request.out, request.overwrite) as root:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (root / sub).mkdir()
        jobs = [(_write_nnunet_case, (root, case_id, (request.seed, case_id), request.shape, case_id in train_ids,
                                      request.difficulty)) for case_id in train_ids + test_ids]
        _run_jobs(jobs, request.workers, progress, "synth nnunet")
        _write_nnunet_json(root, len(train_ids), len(test_ids))
    return request.out


def _run_jobs(jobs: Sequence[tuple[Callable, tuple]], workers: int, progress: bool, label: str) -> list:
    workers = workers or min(os.cpu_count() or 1, len(jobs))
    bar = tqdm(total=len(jobs), desc=label, unit="case", disable=not progress)
    results: list = [None] * len(jobs)
    try:
        if workers <= 1:
            for index, (fn, args) in enumerate(jobs):
                results[index] = fn(*args)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(fn, *args): index for index, (fn, args) in enumerate(jobs)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
    finally:
        bar.close()
    return results


def _relabel(classes: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)
    for internal, label in mapping.items():
        lut[internal] = label
    return lut[classes]


def _write_brats_case(root: Path, name: str, seed: tuple[int, int], shape, difficulty: str = "standard") -> str:
    case = make_case(seed, shape, difficulty)
    grade = "HGG" if case.high_grade else "LGG"
    folder = root / grade / name
    folder.mkdir(parents=True)
    geometry = brats_geometry(shape)
    for modality in MODALITY_ORDER:
        image = np.rint(case.images[modality]).astype(np.int16)
        write_volume(folder / f"{name}_{modality}.nii.gz", image, geometry)
    write_volume(folder / f"{name}_seg.nii.gz", _relabel(case.classes, BRATS_LABELS), geometry)
    return grade


def _write_decathlon_case(root: Path, case_id: int, seed: tuple[int, int], shape, labelled: bool,
                          difficulty: str = "standard") -> None:
    case = make_case(seed, shape, difficulty)
    name = f"BRATS_{case_id:03d}.nii.gz"
    image = np.stack([case.images[m] for m in MODALITY_ORDER], axis=-1).astype(np.float32)
    geometry = decathlon_geometry(shape)
    write_volume(root / ("imagesTr" if labelled else "imagesTs") / name, image, geometry)
    if labelled:
        write_volume(root / "labelsTr" / name, _relabel(case.classes, DECATHLON_LABELS), geometry)


def _write_nnunet_case(root: Path, case_id: int, seed: tuple[int, int], shape, labelled: bool,
                       difficulty: str = "standard") -> None:
    """One case as the channel files of its Decathlon 4D image (float32, Decathlon's geometry)."""
    case = make_case(seed, shape, difficulty)
    geometry = decathlon_geometry(shape)
    folder = root / ("imagesTr" if labelled else "imagesTs")
    for channel, modality in enumerate(MODALITY_ORDER):
        write_volume(folder / f"BRATS_{case_id:03d}_{channel:04d}.nii.gz", case.images[modality].astype(np.float32),
                     geometry)
    if labelled:
        write_volume(root / "labelsTr" / f"BRATS_{case_id:03d}.nii.gz", _relabel(case.classes, DECATHLON_LABELS),
                     geometry)


def _brats_case_names(count: int, seed: int) -> list[str]:
    """Names shaped like BraTS 2019's (BraTS19_CBICA_AAB_1, BraTS19_TCIA01_131_1, ...)."""
    rng = np.random.default_rng((seed, 2019))
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        site = rng.choice(["CBICA", "TCIA01", "TCIA02", "TCIA03", "TCIA06", "TCIA08", "2013", "TMC"])
        if site == "CBICA":
            ident = "".join(rng.choice(letters, 3))
        elif site == "2013":
            ident = str(rng.integers(0, 40))
        elif site == "TMC":
            ident = f"{rng.integers(0, 100000):05d}"
        else:
            ident = f"{rng.integers(100, 700)}"
        name = f"BraTS19_{site}_{ident}_1"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _write_brats_tables(root: Path, names: list[str], grades: list[str], seed: int) -> None:
    rng = np.random.default_rng((seed, 7))
    with open(root / "name_mapping.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID",
                         "TCGA_TCIA_subject_ID", "BraTS_2019_subject_ID"])
        for name, grade in zip(names, grades):
            writer.writerow([grade, "NA", name.replace("BraTS19", "Brats18"), "NA", name])
    with open(root / "survival_data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["BraTS19ID", "Age", "Survival", "ResectionStatus"])
        for name, grade in zip(names, grades):
            if grade == "HGG":
                writer.writerow([name, f"{rng.uniform(20, 85):.3f}", int(rng.integers(5, 1800)),
                                 rng.choice(["GTR", "STR", "NA"])])


def _write_dataset_json(root: Path, train_ids: list[int], test_ids: list[int], seed: int) -> None:
    order = np.random.default_rng((seed, 1)).permutation(len(train_ids))
    description = {
        "name": "BRATS",
        "description": "Gliomas segmentation tumour and oedema in on brain images",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
        "licence": "CC-BY-SA 4.0",
        "release": "2.0 04/05/2018",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(train_ids),
        "numTest": len(test_ids),
        "training": [{"image": f"./imagesTr/BRATS_{train_ids[i]:03d}.nii.gz",
                      "label": f"./labelsTr/BRATS_{train_ids[i]:03d}.nii.gz"} for i in order],
        "test": [f"./imagesTs/BRATS_{case_id:03d}.nii.gz" for case_id in test_ids],
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=4) + "\n")


def _write_nnunet_json(root: Path, n_train: int, n_test: int) -> None:
    description = {
        "name": "BRATS",
        "description": "Gliomas segmentation tumour and oedema in on brain images",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
        "licence": "CC-BY-SA 4.0",
        "release": "2.0 04/05/2018",
        "tensorImageSize": "4D",
        "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3},
        "numTraining": n_train,
        "numTest": n_test,
        "file_ending": ".nii.gz",
        "channel_names": NNUNET_CHANNELS,
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=4) + "\n")


def _write_appledouble_files(root: Path) -> None:
    (root / "._dataset.json").write_bytes(APPLEDOUBLE_STUB)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        for path in sorted((root / sub).iterdir()):
            (path.parent / f"._{path.name}").write_bytes(APPLEDOUBLE_STUB)


WRITERS: dict[str, Callable[..., Path]] = {"brats": write_brats, "decathlon": write_decathlon, "nnunet": write_nnunet}
ROOT_NAMES = {"brats": BRATS_ROOT_NAME, "decathlon": DECATHLON_ROOT_NAME, "nnunet": NNUNET_ROOT_NAME}
