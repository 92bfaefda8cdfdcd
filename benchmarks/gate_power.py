"""The CI gate's power: inject realistic one-line regressions into copies of the code and see whether the gate fails.

    uv run python benchmarks/gate_power.py                   # every regression, one after another
    uv run python benchmarks/gate_power.py kl_dropped --jobs 2

Each regression is a one-line mistake a contributor could make in the study's models or training loop. For
each, a clone of the committed repository gets the mistake, reproduces the smoke pipeline's study
configurations up to their evaluation (sharing this repository's DVC cache, so the data and the classifier
are restored, not rerun) and runs the gate's comparison against pipelines/smoke/baseline.json for them.
Prints a table: regression, the checks that failed and the metrics
that moved most, caught or not. Exits 1 when a regression went uncaught. Needs the smoke pipeline's
outputs in the DVC cache (run `uv run dvc repro pipelines/smoke/dvc.yaml` once first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SMOKE = "pipelines/smoke"
sys.path.insert(0, str(REPO / "src"))

import yaml  # noqa: E402

from digitgen.compare import load_evaluations, summarize  # noqa: E402
from digitgen.params import config_name  # noqa: E402
from digitgen.regression import compare, load_thresholds  # noqa: E402


@dataclass(frozen=True)
class Regression:
    name: str
    what: str
    file: str
    old: str  # must occur exactly once in `file`
    new: str


# Not here: the digit head detached from the layers it shares (`self.digit_head(h.detach())`). Measured
# 2026-12-03, it moved no metric past its tolerance: the latent carries the digit anyway,
# and a head on features trained without it classifies about as well. No metric gate can see it.
REGRESSIONS = [
    Regression(
        "kl_dropped",
        "the CVAE's KL term left out of the loss",
        "src/digitgen/models.py",
        "return Losses(bce + nll + kl, bce, nll, kl)",
        "return Losses(bce + nll, bce, nll, kl)",
    ),
    Regression(
        "kl_doubled",
        "the KL term counted twice",
        "src/digitgen/models.py",
        "return Losses(bce + nll + kl, bce, nll, kl)",
        "return Losses(bce + nll + 2 * kl, bce, nll, kl)",
    ),
    Regression(
        "image_mode_untrained",
        "the image-only input mode fed the digit too (never trained alone)",
        "src/digitgen/models.py",
        'out = self(images if input_mode != "digit" else None, digits if input_mode != "image" else None)',
        'out = self(images if input_mode != "digit" else None, digits)',
    ),
    Regression(
        "lr_tenth", "the learning rate ten times lower", "src/digitgen/train.py", "lr=params.lr", "lr=params.lr / 10"
    ),
    Regression(
        "output_tanh",
        "generated images through tanh instead of the sigmoid",
        "src/digitgen/models.py",
        "return self.decoder(z)[0].sigmoid()",
        "return self.decoder(z)[0].tanh()",
    ),
]


def _run(command: list[str], cwd: Path, env: dict, log) -> None:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    done = subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"`{' '.join(command)}` failed in {cwd} (exit {done.returncode}); see {log.name}")


def inject(regression: Regression, root: Path) -> None:
    path = root / regression.file
    text = path.read_text()
    if text.count(regression.old) != 1:
        raise SystemExit(
            f"{regression.name}: `{regression.old}` occurs {text.count(regression.old)} times in "
            f"{regression.file}, not once; update REGRESSIONS in {Path(__file__).name} to the code"
        )
    path.write_text(text.replace(regression.old, regression.new))


def study_configurations() -> list[str]:
    """The smoke pipeline's study configurations (cae-16, cvae-16): what the injected mistakes are judged on."""
    study = yaml.safe_load((REPO / SMOKE / "params.yaml").read_text())["study"]
    return [config_name(kind, d) for d in study["latent_dims"] for kind in study["models"]]


def reproduce(regression: Regression, workdir: Path, threads: int) -> dict:
    """Clone the committed code, inject, `dvc repro` the smoke study's evaluations; their summary and the wall time."""
    root = workdir / regression.name
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ["PATH"],
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": str(root / "src"),  # the clone's (injected) code, not the environment's editable install
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
    }
    started = time.perf_counter()
    with open(workdir / f"{regression.name}.log", "w") as log:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()  # this checkout's commit (a worktree's too)
        _run(["git", "clone", "-q", "--shared", "--no-checkout", str(REPO), str(root)], workdir, env, log)
        _run(["git", "checkout", "-q", commit], root, env, log)
        inject(regression, root)
        dvc = [sys.executable, "-m", "dvc"]
        _run([*dvc, "cache", "dir", "--local", str(REPO / ".dvc" / "cache")], root, env, log)
        _run([*dvc, "checkout", "-q", f"{SMOKE}/dvc.yaml"], root, env, log)
        configs = study_configurations()
        _run([*dvc, "repro", *(f"{SMOKE}/dvc.yaml:evaluate@{c}" for c in configs)], root, env, log)
    return {
        "summary": summarize(load_evaluations(root / SMOKE / "results" / "evaluation", configs)),
        "seconds": time.perf_counter() - started,
    }


def describe(regression: Regression, summary: dict) -> dict:
    baseline = {c: m for c, m in json.loads((REPO / SMOKE / "baseline.json").read_text()).items() if c in summary}
    verdicts = compare(baseline, summary, load_thresholds(REPO / SMOKE / "thresholds.yaml"))
    failed = [v for v in verdicts if v.failed]
    # the largest moves, in units of each check's tolerance
    moved = sorted(
        failed,
        key=lambda v: -abs((v.new if v.new is not None else 0) - v.baseline) / max(abs(v.baseline - v.allowed), 1e-12),
    )
    return {
        "regression": regression.name,
        "what": regression.what,
        "checks failed": f"{len(failed)}/{len(verdicts)}",
        "metrics that moved most": "; ".join(
            f"{v.configuration} {v.metric} {v.baseline:.3g}->{'-' if v.new is None else f'{v.new:.3g}'}"
            for v in moved[:3]
        ),
        "caught": "yes" if failed else "NO",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "names", nargs="*", help="regressions to inject (default: all): " + ", ".join(r.name for r in REGRESSIONS)
    )
    parser.add_argument("--jobs", type=int, default=1, help="regressions reproduced at once (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the clones go (default: a temporary folder)")
    args = parser.parse_args()
    chosen = [r for r in REGRESSIONS if not args.names or r.name in args.names]
    unknown = set(args.names) - {r.name for r in REGRESSIONS}
    if unknown:
        raise SystemExit(f"unknown regression(s): {', '.join(sorted(unknown))}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gate-power-"))
    workdir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{len(chosen)} regressions, {args.jobs} at a time ({threads} threads each), in {workdir}", flush=True)

    def one(regression: Regression) -> dict:
        try:
            result = reproduce(regression, workdir, threads)
        except (RuntimeError, SystemExit) as err:  # one regression that cannot run does not lose the others
            print(f"{regression.name}: {err}", flush=True)
            return {"regression": regression.name, "what": regression.what, "caught": f"not run: {err}"}
        row = {**describe(regression, result["summary"]), "minutes": f"{result['seconds'] / 60:.1f}"}
        print(f"{row['regression']}: caught {row['caught']} ({row['checks failed']} checks failed)", flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, chosen))
    print()
    print(pd.DataFrame(rows).to_markdown(index=False))
    missed = [r["regression"] for r in rows if r["caught"] != "yes"]
    print(
        f"\n{len(rows) - len(missed)} of {len(rows)} regressions caught"
        + (f"; missed: {', '.join(missed)}" if missed else "")
    )
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
