"""The `gradmetanet` command line: `gradmetanet run EXPERIMENT --preset tiny|quick|cpu|paper`, `gradmetanet demo`
(what `make demo` runs), `gradmetanet capture-demo` and `gradmetanet zoo list|verify` (the zoo cache)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

#: experiment name -> (module under gradmetanet.experiments, what it reproduces)
EXPERIMENTS = {
    "curvature": ("curvature", "Fisher diagonal of SIRENs from 128 gradients (GradMetaNet paper 7.1)"),
    "fisher-trace": ("fisher_trace", "trace of the Fisher of larger MLPs (paper G.1)"),
    "lopt": ("lopt", "learned optimizers meta-trained with PES, raced against tuned Adam (paper 7.2)"),
    "lora": ("lora", "properties of LoRA fine-tunes predicted from their adapters (LoL)"),
    "inr-edit": ("inr_edit", "dilate images by editing their INRs' weights in one pass (paper 7.3)"),
    "amortize": ("amortize", "fine-tune every network of a zoo in one pass, against SGD (ScaleGMN)"),
    "ws-bench": ("ws_bench", "INR classification by every backbone, and under function-preserving changes"),
    "generalisation": ("generalisation", "predict each classifier's test accuracy from its weights (Kendall tau)"),
}
DEMO = ("curvature", "quick")
#: experiments trained by fit_regression alone: data-parallel under torchrun (rank 0 writes the run folder)
DATA_PARALLEL = {"curvature", "inr-edit", "ws-bench", "generalisation", "fisher-trace", "lora", "amortize"}


def _parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with a Python literal value (``epochs=5``, ``train_sizes=[10,100]``, ``device='cuda'``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override {text!r} is not key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def _experiment_help() -> str:
    """Each experiment with its presets and settings (what ``--preset`` and ``--set`` accept)."""
    lines = ["experiments, their presets (tiny: seconds; quick: minutes; cpu: the claim on a 2-core machine, "
             "resumable; paper: the paper's set-up, for a GPU) and --set keys:"]
    for name, (module_name, what) in EXPERIMENTS.items():
        module = importlib.import_module(f"gradmetanet.experiments.{module_name}")
        fields = [f.name for f in dataclasses.fields(next(iter(module.PRESETS.values())))]
        lines += [f"  {name}: {what}", f"    presets: {', '.join(module.PRESETS)}",
                  f"    settings: {', '.join(fields)}"]
    return "\n".join(lines)


def build_parser(with_experiments: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradmetanet", description="Learning on the gradients of neural networks.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run an experiment and write results.json, table.md and plots",
        description="Run an experiment into a run folder (results.json with provenance, table.md, PNGs, resumable "
                    "cells). The configuration and the folder are checked before any compute.",
        epilog=_experiment_help() if with_experiments else None, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("experiment", choices=list(EXPERIMENTS), help="which experiment (see the list below)")
    run.add_argument("--preset", default="quick", help="a preset of the experiment (default quick; see below)")
    run.add_argument("--out", default=None, help="run folder (default runs/EXPERIMENT-PRESET)")
    run.add_argument("--overwrite", action="store_true",
                     help="write into a folder that holds another experiment's or configuration's results (its "
                          "finished cells are kept beside the new ones)")
    run.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the preset)")
    run.add_argument("--device", default=None, help="cpu or cuda (overrides the preset)")
    run.add_argument("--meta-only", action="store_true",
                     help="lopt: only meta-train (resumable; e.g. one process per optimizer with --set optimizers=...)")
    run.add_argument("--threads", type=int, default=None,
                     help="PyTorch CPU threads (default: PyTorch's, which follows OMP_NUM_THREADS); 1 is fastest "
                          "for these small kernels when another process shares the cores")
    run.add_argument("--release-memory", action="store_true",
                     help="return freed CPU memory to the system (default: keep it for reuse, "
                          "gradmetanet.performance.retain_freed_memory, up to 2.4x faster metanetwork steps)")
    run.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override, metavar="KEY=VALUE",
                     help="override a setting, e.g. --set epochs=20 --set 'train_sizes=[10,100]'")
    commands.add_parser("demo", help=f"what `make demo` runs: `run {DEMO[0]} --preset {DEMO[1]}` into "
                                     f"runs/{DEMO[0]}-{DEMO[1]}")
    zoo = commands.add_parser("zoo", help="zoos on disk: make a sharded zoo, describe it, list the cache, verify")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True)
    listing = zoo_commands.add_parser("list", help="every cached zoo with its size, version and checksum status")
    listing.add_argument("--cache-dir", default=None, help="default $GRADMETANET_CACHE or ~/.cache/gradmetanet")
    verify = zoo_commands.add_parser("verify", help="check zoo folders (cached or sharded) against their checksums "
                                                    "(exit 1 if any fails)")
    verify.add_argument("folders", nargs="+")
    make = zoo_commands.add_parser("make", help="make (or finish) a sharded zoo: a classifier zoo trained here, "
                                                "the public Small CNN Zoo files or the public INRs of --from; under "
                                                "torchrun each process makes its share of the shards")
    make.add_argument("kind", choices=["classifier", "inr", "siren", "lora", "lora-lm", "small-cnn", "public-inrs"])
    make.add_argument("--from", dest="source", default=None,
                      help="small-cnn: the folder of weights.npy, metrics.csv.gz and layout.csv; public-inrs: the "
                           "unpacked INR archive (<dataset>_png_<split>_<label>_<index>/checkpoints/*.pth)")
    make.add_argument("--out", required=True, help="the zoo folder (an unfinished one resumes)")
    make.add_argument("--shard-size", type=int, default=250, help="networks per shard (default 250)")
    make.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override,
                      metavar="KEY=VALUE", help="a ClassifierZooConfig field, e.g. --set networks=100000 "
                                                "--set architecture=mlp (inr: an InrZooConfig field, e.g. n_images, "
                                                "data_dir; siren, lora, lora-lm: a SirenZooConfig, LoraZooConfig, "
                                                "LmLoraZooConfig field; small-cnn: activation, step; public-inrs: val_size, seed, "
                                                "limit)")
    info = zoo_commands.add_parser("info", help="a sharded zoo folder: its config, size and shards made")
    info.add_argument("folder")
    capture = commands.add_parser("capture-demo",
                                  help="capture the decomposed gradients of a digits MLP and report the cost")
    capture.add_argument("--batch-size", type=int, default=128)
    capture.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_help = bool(argv) and argv[0] == "run" and any(a in ("-h", "--help") for a in argv)
    args = build_parser(with_experiments=wants_help).parse_args(argv)
    if getattr(args, "threads", None) is not None:
        import torch
        torch.set_num_threads(args.threads)
    if args.command == "capture-demo":
        from .demo import run_capture_demo
        run_capture_demo(batch_size=args.batch_size, seed=args.seed)
        return 0
    if args.command == "zoo":
        return _zoo(args)
    if args.command == "demo":
        return main(["run", DEMO[0], "--preset", DEMO[1]])
    try:
        return _run(args)
    except (ValueError, FloatingPointError) as err:       # RunFolderError, bad settings, a non-finite metric
        raise SystemExit(f"gradmetanet: {err}") from None


def _zoo(args: argparse.Namespace) -> int:
    from .zoos import ShardedZoo, ZooDamaged, default_cache_dir, list_zoos, verify_zoo_folder
    if args.zoo_command == "make":
        return _zoo_make(args)
    if args.zoo_command == "info":
        try:
            zoo = ShardedZoo(args.folder)
        except ZooDamaged as err:
            raise SystemExit(f"gradmetanet: {err}") from None
        m = zoo.manifest
        print(f"{args.folder}: {m['zoo']}, {m['networks']} networks in {m['shards']} shards of {m['shard_size']} "
              f"({m['shards'] - len(zoo.missing())} made), written by gradmetanet {m.get('package_version', '?')}")
        print(json.dumps(m["config"]))
        return 0
    if args.zoo_command == "list":
        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        rows = list_zoos(cache)
        print(f"{len(rows)} zoo(s) in {cache}\n\n| folder | zoo | MiB | written by | summary | status |\n|---|---|---:|---|---|---|")
        for r in rows:
            summary = ", ".join(f"{k} {v}" for k, v in r["summary"].items() if not isinstance(v, (dict, list)))
            print(f"| {Path(r['folder']).name} | {r['zoo']} | {r['bytes'] / 2 ** 20:.1f} | {r['package_version']} | "
                  f"{summary} | {'ok' if r['problem'] is None else r['problem']} |")
        return 0
    failed = 0
    for folder in args.folders:
        if (Path(folder) / "common.json").exists():                 # a sharded zoo
            problems = ShardedZoo(folder).verify()
            problem = "; ".join(problems) if problems else None
        else:
            problem = verify_zoo_folder(folder)
        print(f"{folder}: {'ok' if problem is None else problem}")
        failed += problem is not None
    return 1 if failed else 0


def _zoo_make(args: argparse.Namespace) -> int:
    from .zoos.classifier import (ClassifierZooConfig, SmallCnnZooSource, make_sharded_classifier_zoo,
                                  small_cnn_zoo_to_shards)
    from .zoos.inr import InrZooConfig, make_sharded_inr_zoo
    from .zoos.siren import SirenZooConfig, make_sharded_siren_zoo
    from .zoos.lora import LoraZooConfig, make_sharded_lora_zoo
    from .zoos.lora_lm import LmLoraZooConfig, make_sharded_lm_lora_zoo
    from .zoos.public_inrs import PublicInrSource, public_inrs_to_shards
    from .experiments import apply_preset
    makers = {"classifier": (ClassifierZooConfig, make_sharded_classifier_zoo), "inr": (InrZooConfig, make_sharded_inr_zoo),
              "siren": (SirenZooConfig, make_sharded_siren_zoo), "lora": (LoraZooConfig, make_sharded_lora_zoo),
              "lora-lm": (LmLoraZooConfig, make_sharded_lm_lora_zoo),
              "small-cnn": (SmallCnnZooSource, small_cnn_zoo_to_shards), "public-inrs": (PublicInrSource, public_inrs_to_shards)}
    kind, make = makers[args.kind]
    try:
        if args.kind in ("small-cnn", "public-inrs"):
            if args.source is None:
                raise ValueError(f"zoo make {args.kind} needs --from FOLDER (the unpacked public files)")
            default = kind(args.source)
        else:
            default = kind()
        made = make(apply_preset({"default": default}, "default", dict(args.overrides)), args.out, args.shard_size)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"gradmetanet: {err}") from None
    print(f"{args.out}: made {len(made)} shard(s) in this process")
    return 0


def _run(args: argparse.Namespace) -> int:
    overrides = dict(args.overrides)
    if args.seeds is not None:
        overrides["eval_seeds" if args.experiment == "lopt" else "seeds"] = args.seeds
    if args.device is not None:
        overrides["device"] = args.device
    module = importlib.import_module(f"gradmetanet.experiments.{EXPERIMENTS[args.experiment][0]}")
    config = module.config_from_preset(args.preset, **overrides)
    out = Path(args.out or f"runs/{args.experiment}-{args.preset}")
    if not args.release_memory:
        from .performance import retain_freed_memory
        retain_freed_memory()
    start = time.perf_counter()
    from .distributed import init_from_environment, is_main_process, shut_down
    distributed = init_from_environment(getattr(config, "device", "cpu"))
    if distributed and args.experiment not in DATA_PARALLEL and not (args.experiment == "lopt" and args.meta_only):
        shut_down()
        raise SystemExit(f"gradmetanet: `run {args.experiment}` does not run under torchrun (its training loop is "
                         f"not data-parallel); these do: {', '.join(sorted(DATA_PARALLEL))}, and `run lopt "
                         "--meta-only` (PES particles sharded across processes)")
    if args.meta_only:
        if args.experiment != "lopt":
            raise SystemExit("gradmetanet: --meta-only applies to the lopt experiment only")
        module.meta_train(config, out, progress=is_main_process())
        if is_main_process():
            print(f"meta-trained {list(config.optimizers)} into {out / 'meta'} in {time.perf_counter() - start:.0f} s")
        shut_down()
        return 0
    main_process = is_main_process()
    module.run(config, out, progress=main_process, overwrite=args.overwrite)
    shut_down()                                           # every process is done; rank 0 has written the folder
    if main_process:
        print((out / "table.md").read_text())
        print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
