"""Sort the flat ILSVRC2012 validation folder into class folders, from a mapping file you supply.

    python -m data.imagenet_val --src VALDIR --mapping FILE --out OUT [--mode link|copy]

The mapping file has one image per line: its file name (with or without extension) and its class
folder name, separated by whitespace or a comma; further columns are ignored and a header line is
allowed. Both the common ``FILE WNID`` lists and Kaggle's ``LOC_val_solution.csv``
(``ILSVRC2012_val_00008726,n02119789 255 142 ...``) work as they are.

Files are hard-linked into ``OUT/<class>/`` (no extra disk space; copied when linking is not
possible, or always with ``--mode copy``). Nothing in VALDIR is moved, changed or deleted. A rerun
skips files already in place, so an interrupted run can simply be repeated.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import sys

from tqdm import tqdm

from configs.errors import UserError
from data.image_folder import is_image_file

_SPLIT = re.compile(r"[,\s]+")


def _safe_class_name(name: str, *, mapping: str, line: int) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"{mapping} line {line}: {name!r} cannot be a class folder name; fix the mapping file")
    return name


def read_mapping(mapping: str, *, files: list[str]) -> dict[str, str]:
    """{file name in the val folder: class name}. ``files`` are the val folder's image names."""
    by_stem = {os.path.splitext(f)[0]: f for f in files}
    by_name = {f: f for f in files}
    assignment: dict[str, str] = {}
    unknown: list[str] = []
    try:
        handle = open(mapping, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read the mapping file {mapping} ({exc.strerror}): give an existing file") from None
    with handle:
        for line_number, line in enumerate(handle, 1):
            fields = [f for f in _SPLIT.split(line.strip()) if f]
            if not fields:
                continue
            if len(fields) == 1:
                hint = (" (this looks like ILSVRC2012_validation_ground_truth.txt, whose class ids need the devkit's "
                        "meta.mat; use a 'FILE WNID' list such as LOC_val_solution.csv)") if fields[0].isdigit() else ""
                raise UserError(f"{mapping} line {line_number} has no class column{hint}: "
                                "each line must be 'IMAGE CLASS'")
            image = by_name.get(os.path.basename(fields[0])) or by_stem.get(os.path.basename(fields[0]))
            if image is None:
                if line_number == 1 and not assignment:
                    continue  # a header such as "ImageId,PredictionString"
                unknown.append(fields[0])
                continue
            label = _safe_class_name(fields[1], mapping=mapping, line=line_number)
            if assignment.setdefault(image, label) != label:
                raise UserError(f"{mapping} gives {image} two classes ({assignment[image]} and {label}): "
                                "fix the mapping file")
    if unknown:
        raise UserError(f"{mapping} names {len(unknown)} images that are not in the val folder (first: {unknown[0]}): "
                        "give the complete val folder, or the mapping file that belongs to it")
    unmapped = [f for f in files if f not in assignment]
    if unmapped:
        raise UserError(f"{len(unmapped)} images of the val folder are not in {mapping} (first: {unmapped[0]}): "
                        "give the mapping file for the whole validation set")
    return assignment


def _place(source: str, target: str, *, mode: str) -> bool:
    """Link or copy ``source`` to ``target``; False when it is already there. Never overwrites."""
    if os.path.exists(target):
        if os.path.samefile(source, target) or os.path.getsize(source) == os.path.getsize(target):
            return False
        raise UserError(f"{target} exists and differs from {source}: move it away (nothing was overwritten)")
    if mode == "link":
        try:
            os.link(source, target)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
    partial = f"{target}.partial-{os.getpid()}"
    shutil.copyfile(source, partial)
    os.replace(partial, target)  # a copy cut short never carries the final name
    return True


def sort_val_folder(src: str, mapping: str, out: str, *, mode: str = "link", progress: bool = True) -> int:
    """Place every image of ``src`` under ``out/<class>/``; returns how many were placed now."""
    if not os.path.isdir(src):
        raise UserError(f"val folder {src} does not exist: give the folder of ILSVRC2012_val_*.JPEG files")
    src_real, out_real = os.path.realpath(src), os.path.realpath(out)
    if out_real == src_real or out_real.startswith(src_real + os.sep):
        raise UserError(f"--out {out} is inside --src {src}: choose a separate folder (the flat one is left as is)")
    files = sorted(e.name for e in os.scandir(src) if e.is_file() and is_image_file(e.name))
    if not files:
        raise UserError(f"{src} holds no image files: give the flat folder of ILSVRC2012_val_*.JPEG files")
    assignment = read_mapping(mapping, files=files)
    placed = 0
    for name in tqdm(files, desc="sorting val", unit="img", disable=not progress, file=sys.stderr):
        folder = os.path.join(out, assignment[name])
        os.makedirs(folder, exist_ok=True)
        placed += _place(os.path.join(src, name), os.path.join(folder, name), mode=mode)
    return placed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.imagenet_val", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="flat folder of validation images")
    parser.add_argument("--mapping", required=True, help="file with 'IMAGE CLASS' per line")
    parser.add_argument("--out", required=True, help="where to create one folder per class (e.g. DIR/val)")
    parser.add_argument("--mode", choices=["link", "copy"], default="link", help="hard-link (default) or copy")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        placed = sort_val_folder(os.path.expanduser(args.src), os.path.expanduser(args.mapping),
                                 os.path.expanduser(args.out), mode=args.mode, progress=not args.quiet)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {placed} images placed into class folders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
