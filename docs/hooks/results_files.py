"""MkDocs hook: the figures the pipeline writes (results/*.png, results/figures, results/label_cvae, the
evaluation sample grids) become files of the site at the same paths, so a page links `results/figures/x.png` and
`mkdocs build --strict` checks that the picture exists. Nothing is copied by hand or kept in docs/."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

FOLDERS = ("results", "results/figures", "results/label_cvae", "results/evaluation")  # results: its own PNGs only


def on_files(files: Files, config) -> Files:
    root = Path(config["config_file_path"]).parent
    for folder in FOLDERS:
        for png in sorted((root / folder).glob("*.png")):
            path = png.relative_to(root).as_posix()
            if files.get_file_from_path(path) is None:
                files.append(File(path, src_dir=str(root), dest_dir=config["site_dir"], use_directory_urls=False))
    return files
