"""Reading a Surface Defects-4i-layout source folder: which files ingest uses and which it does not.

Layout (``docs/architecture.md``)::

    <source>/<Class>/Images/<stem>.(jpg|png|...)   defect image
    <source>/<Class>/GT/<stem>.png                 its mask (same stem)
    <source>/<Class>/Nd/<stem>.(jpg|png|...)       optional defect-free ("normal") images

Every entry of the source that is not one of those files is *skipped* and named
(:class:`Skipped`: path, reason, what to do) -- a non-image file, a sub-folder, a hidden file,
an unknown folder, a file at the root, an empty class, a mask in a wrong format. A mask without
its image is skipped *and* fails validation (rule ``mask_has_image``): it is an annotation lost.
What cannot be read unambiguously or safely is rejected with :class:`IngestError`: a missing
source, no class folders, a class folder without ``Images/``, two images of a class with the same
stem, a broken symbolic link, or a link that leads outside the source root (links are followed
only inside the root; in a view folder of ``pipeline.classes.source_view``, each class link into
the root its marker file records). ``docs/reliability.md`` lists every case.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.images import IMAGE_SUFFIXES, RAW_DIR, VIEW_MARKER

log = logging.getLogger("pipeline.ingest")


class IngestError(RuntimeError):
    """The source folder cannot be ingested; the message names the path and what to do."""


@dataclass(frozen=True)
class Item:
    """One image ingest uses: source paths and its paths under the data folder (``raw/<Class>/...``)."""

    class_name: str
    kind: str  # "defect" | "normal"
    src_image: Path
    src_mask: Path | None
    rel_image: str  # relative to the data folder, e.g. raw/MT_Crack/Images/a.jpg
    rel_mask: str | None


#: rule name of a skipped file that fails validation (the rest are warnings)
ORPHAN_MASK = "mask_has_image"


@dataclass(frozen=True)
class Skipped:
    """A file or folder of the source that ingest does not use.

    ``path`` is relative to the source root (``<Class>/Images/notes.txt``; a folder ends in ``/``),
    ``reason`` says why it is not used, ``action`` what to do. ``rule`` is ``None`` for a warning,
    else the validation rule that fails on it (:data:`ORPHAN_MASK`: a mask without its image is an
    annotation lost, so validation refuses the data version).
    """

    path: str
    reason: str
    action: str
    rule: str | None = None


@dataclass
class SourceScan:
    """What :func:`survey_source` found: the images ingest uses and every entry it does not."""

    items: list[Item]
    skipped: list[Skipped]


def _view_links(source: Path) -> tuple[dict[str, tuple[Path, Path]], list[Path]]:
    """A view folder's marker (``pipeline.classes.source_view``): ``({class: (target, root)}, roots)``;
    ``roots`` are the configured source roots whose other top-level entries are to be named. ``({}, [])``
    for a plain folder."""
    marker = source / VIEW_MARKER
    if not marker.is_file():
        return {}, []
    try:
        body = json.loads(marker.read_text())
        links = {str(c): (Path(v["target"]), Path(v["root"])) for c, v in body["classes"].items()}
        return links, [Path(r) for r in body.get("report_roots", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IngestError(f"{marker}: unreadable view marker ({exc}); delete the folder {source} and re-run") from None


class _Walk:
    """One scan of a source folder; collects items, skipped entries and fatal problems."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.skipped: list[Skipped] = []
        self.problems: list[str] = []

    def skip(self, rel: str, reason: str, action: str, rule: str | None = None) -> None:
        self.skipped.append(Skipped(rel, reason, action, rule))

    def link_ok(self, path: Path, rel: str, root: Path) -> bool:
        """True if ``path`` (to be read) resolves inside ``root``; else a problem is recorded (broken link,
        or a link that leads out of the source)."""
        real = Path(os.path.realpath(path))
        if real.is_relative_to(root) and real.exists():
            return True
        if not real.exists():
            self.problems.append(f"{rel} -> {os.readlink(path) if path.is_symlink() else real}: broken symbolic link "
                              "(its target does not exist): restore the target or delete the link")
        else:
            self.problems.append(f"{rel} -> {real}: symbolic link leads outside the source root {root} (ingest never "
                              "follows links out of the source): copy the file or folder into the source "
                              "(`cp -rL`), or pass the folder that holds it as --source")
        return False

    def skip_tree(self, p: Path, rel: str, reason: str, action: str) -> None:
        """Name ``p`` and, for a real folder, every file under it; links are named, never followed."""
        if p.is_symlink():
            self.skip(rel, reason + " (symbolic link, not followed)", action)
            return
        if not p.is_dir() or p.name.startswith("."):
            self.skip(rel + ("/" if p.is_dir() else ""), reason, action)
            return
        found = False
        for dirpath, dirs, files in os.walk(p, followlinks=False):
            dirs.sort()
            base = Path(dirpath)
            for name in sorted(files) + sorted(d for d in dirs if (base / d).is_symlink()):
                q = base / name
                self.skip(f"{rel}/{q.relative_to(p).as_posix()}",
                          reason + (" (symbolic link, not followed)" if q.is_symlink() else ""), action)
                found = True
        if not found:
            self.skip(rel + "/", reason + " (empty folder)", action)

    def listing(self, folder: Path, rel: str, root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
        """Files of one layout folder that ingest reads; everything else is skipped and named."""
        out = []
        for p in sorted(folder.iterdir()):
            r = f"{rel}/{p.name}"
            if p.name.startswith("."):
                self.skip_tree(p, r, "hidden entry: ingest never reads hidden files", "delete it")
            elif p.is_dir() and not p.is_symlink():
                self.skip_tree(p, r, f"sub-folder of {rel}/: ingest reads only the files directly in it",
                               f"move the files up into {rel}/ or out of the source")
            elif suffixes is not None and p.suffix.lower() not in suffixes:
                self.skip_tree(p, r, f"not an image file ingest reads (suffixes {', '.join(IMAGE_SUFFIXES)})",
                               "convert it to PNG or move it out of the source")
            elif self.link_ok(p, r, root):
                if p.is_dir():
                    self.skip_tree(p, r, f"sub-folder of {rel}/: ingest reads only the files directly in it",
                                   f"move the files up into {rel}/ or out of the source")
                else:
                    out.append(p)
        return out

    def scan_class(self, cdir: Path, c: str, root: Path) -> None:
        usable = set()
        for p in sorted(cdir.iterdir()):
            if p.name not in ("Images", "GT", "Nd") or not p.is_dir():
                self.skip_tree(p, f"{c}/{p.name}", "not part of the class layout (Images/, GT/, Nd/)",
                               "move images to Images/, masks to GT/, defect-free images to Nd/, or remove it")
            elif self.link_ok(p, f"{c}/{p.name}", root):
                usable.add(p.name)
        if "Images" not in usable:
            return
        images = self.listing(cdir / "Images", f"{c}/Images", root, IMAGE_SUFFIXES)
        by_stem: dict[str, list[Path]] = {}
        for p in images:
            by_stem.setdefault(p.stem, []).append(p)
        for stem, ps in by_stem.items():
            if len(ps) > 1:
                self.problems.append(f"{c}/Images: {', '.join(p.name for p in ps)} share the stem {stem!r}, so "
                                     f"GT/{stem}.png cannot say which one it annotates: rename or remove one")
        gt, nd = cdir / "GT", cdir / "Nd"
        normals = self.listing(nd, f"{c}/Nd", root, IMAGE_SUFFIXES) if "Nd" in usable else []
        nd_stems = {p.stem for p in normals}
        masks: dict[str, Path] = {}
        for p in self.listing(gt, f"{c}/GT", root, None) if "GT" in usable else []:
            r = f"{c}/GT/{p.name}"
            if p.name == f"{p.stem}.png" and p.stem in by_stem:
                masks[p.stem] = p
            elif p.stem in by_stem:
                self.skip(r, f"the mask of Images/{by_stem[p.stem][0].name} must be GT/{p.stem}.png (PNG, "
                          "lower-case suffix)", f"convert or rename it to GT/{p.stem}.png")
            elif p.stem in nd_stems:
                self.skip(r, f"mask of the defect-free image Nd/{p.stem}.*: Nd images have no mask",
                          f"move the image to Images/ if it shows a defect, else delete the mask", ORPHAN_MASK)
            else:
                self.skip(r, f"mask without an image: no Images/{p.stem}.* (the annotation would be lost)",
                          f"add the image as {c}/Images/{p.stem}.png|jpg, or delete the mask", ORPHAN_MASK)
        if not images:
            self.skip(f"{c}/Images/", "class folder has no image in Images/: the class is not ingested",
                      "add the defect images (and GT masks) or remove the class folder")
        for p in images:
            m = masks.get(p.stem)
            self.items.append(Item(c, "defect", p, m, f"{RAW_DIR}/{c}/Images/{p.name}",
                                    f"{RAW_DIR}/{c}/GT/{m.name}" if m else None))
        for p in normals:
            self.items.append(Item(c, "normal", p, None, f"{RAW_DIR}/{c}/Nd/{p.name}", None))


def check_source(source: Path) -> None:
    """Raise :class:`IngestError` naming ``source`` and the fix if it is not an existing folder."""
    if not source.exists():
        raise IngestError(
            f"source folder {source} does not exist: pass --source DIR, set LERENET_SOURCE, "
            "or fix data.source in params.yaml")
    if not source.is_dir():
        raise IngestError(f"source {source} is not a folder (expected <source>/<Class>/Images, GT, Nd)")


def survey_source(source: Path) -> SourceScan:
    """List the images of a Surface Defects-4i-layout folder and every entry it does not use (no pixels read).

    Symbolic links are followed only inside the source root (``source`` resolved); in a view folder
    built by ``pipeline.classes.source_view`` each class link may lead into the root recorded for it
    in the view's marker file, and the files under it must stay there.

    Returns:
        :class:`SourceScan`: ``items`` sorted by class, then Images before Nd, then file name;
        ``skipped``: every file (or empty/hidden folder) not used, with reason and what to do.

    Raises:
        IngestError: ``source`` missing or not a folder; it holds no class folder; a class folder has
            no ``Images/``; a link is broken or leads outside its root; two images of a class share a
            stem. The message lists every such problem.
    """
    check_source(source)
    root = source.resolve()
    views, view_roots = _view_links(source)
    walk = _Walk()
    class_dirs = []
    for p in sorted(source.iterdir()):
        if p.name == VIEW_MARKER and views:
            continue
        if p.name.startswith("."):
            walk.skip_tree(p, p.name, "hidden entry: ingest never reads hidden files", "delete it")
            continue
        croot = root
        if p.is_symlink() and p.name in views:
            target, croot = views[p.name]
            if Path(os.path.realpath(p)) != target:
                walk.problems.append(f"{p.name}: link does not lead to {target} recorded in {VIEW_MARKER}")
                continue
        if not p.is_dir():
            walk.skip_tree(p, p.name, "file at the source root: not part of the layout <Class>/Images|GT|Nd",
                           "move it out of the source folder, or into <Class>/Images")
        elif walk.link_ok(p, p.name, croot):
            class_dirs.append((p, croot))
    used = {target for target, _ in views.values()}
    for vroot in view_roots:  # what the view leaves out of a configured source root is named too
        for p in sorted(vroot.iterdir()) if vroot.is_dir() else []:
            if Path(os.path.realpath(p)) in used:
                continue
            if p.name.startswith("."):
                walk.skip(f"{p}" + ("/" if p.is_dir() else ""), "hidden entry: ingest never reads hidden files",
                          "delete it")
            elif p.is_dir():
                walk.skip(f"{p}/", "class folder not in the fold table (params.yaml folds:): not ingested",
                          "`lerenet flow retrain` adds a new class, or add it under folds: yourself")
            else:
                walk.skip(str(p), "file at the source root: not part of the layout <Class>/Images|GT|Nd",
                          "move it out of the source folder, or into <Class>/Images")
    if not class_dirs and not walk.problems:
        raise IngestError(f"source folder {source} holds no class folders (expected <source>/<Class>/Images/...)")
    for cdir, croot in class_dirs:
        if not (cdir / "Images").is_dir():
            raise IngestError(
                f"class folder {cdir} has no Images/ subfolder (layout: <Class>/Images, <Class>/GT, "
                "optional <Class>/Nd); remove the folder or add its images")
        walk.scan_class(cdir, cdir.name, croot)
    if walk.problems:
        raise IngestError(f"source folder {source} cannot be ingested ({len(walk.problems)} problems):\n"
                          + "\n".join(f"  {m}" for m in walk.problems))
    return SourceScan(walk.items, walk.skipped)


def warn_skipped(skipped: list[Skipped], limit: int = 20) -> None:
    """Log one warning per reason naming the skipped entries (at most ``limit`` per reason; the ingest
    report has all)."""
    groups: dict[tuple[str, str, str | None], list[str]] = {}
    for s in skipped:
        groups.setdefault((s.reason, s.action, s.rule), []).append(s.path)
    for (reason, action, rule), paths in groups.items():
        shown = ", ".join(paths[:limit]) + (f" ... and {len(paths) - limit} more" if len(paths) > limit else "")
        what = "validation will fail on" if rule else "ingest does not use"
        log.warning("warning: %s %d entr%s (%s): %s -> %s", what, len(paths), "y" if len(paths) == 1 else "ies",
                    reason, shown, action)


def scan_source(source: Path) -> list[Item]:
    """The images of a Surface Defects-4i-layout folder (:func:`survey_source`); skipped files are logged.

    Raises:
        IngestError: as :func:`survey_source`.
    """
    scan = survey_source(source)
    warn_skipped(scan.skipped)
    return scan.items
