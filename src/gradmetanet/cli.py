"""The `gradmetanet` command line: `gradmetanet run EXPERIMENT --preset quick|paper`, `gradmetanet demo`."""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path


def _parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with a Python literal value (``epochs=5``, ``train_sizes=[10,100]``, ``device='cuda'``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"override {text!r} is not key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradmetanet", description="Learning on the gradients of neural networks.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a paper experiment and write results.json, table.md and plots")
    run.add_argument("experiment", choices=["curvature", "fisher-trace", "lopt", "lora", "inr-edit", "amortize"],
                     help="curvature: Fisher diagonal of SIRENs (paper 7.1); fisher-trace: trace of larger MLPs "
                          "(G.1); lopt: learned optimizers meta-trained with PES against tuned Adam (7.2); lora: "
                          "properties of LoRA fine-tunes predicted from their adapters (LoL); inr-edit: dilate images by "
                          "editing their INRs' weights in one pass (7.3)")
    run.add_argument("--preset", default="quick",
                     help="tiny (seconds), quick (minutes on 2 CPU cores), cpu (the claim on this machine, resumable), "
                          "paper (the paper's set-up); lopt also has digits and fair (the shipped optimizer's) and "
                          "lm-tiny|lm-quick|lm-cpu|lm-paper (the language-model task); lora also has "
                          "lm-tiny|lm-quick|lm-cpu (LoRAs of a language model)")
    run.add_argument("--out", default=None, help="run directory (default runs/EXPERIMENT-PRESET)")
    run.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the preset)")
    run.add_argument("--device", default=None, help="cpu or cuda (overrides the preset)")
    run.add_argument("--meta-only", action="store_true",
                     help="lopt: only meta-train (resumable; e.g. one process per optimizer with --set optimizers=...)")
    run.add_argument("--threads", type=int, default=None,
                     help="PyTorch CPU threads (default: PyTorch's, which follows OMP_NUM_THREADS); 1 is fastest "
                          "for these small kernels when another process shares the cores")
    run.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override, metavar="KEY=VALUE",
                     help="override a config field, e.g. --set epochs=20 --set 'train_sizes=[10,100]'")

    demo = commands.add_parser("demo", help="capture the decomposed gradients of a digits MLP and report the cost")
    demo.add_argument("--batch-size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None:
        import torch
        torch.set_num_threads(args.threads)
    if args.command == "demo":
        from .demo import run_capture_demo
        run_capture_demo(batch_size=args.batch_size, seed=args.seed)
        return 0
    overrides = dict(args.overrides)
    if args.seeds is not None:
        overrides["eval_seeds" if args.experiment == "lopt" else "seeds"] = args.seeds
    if args.device is not None:
        overrides["device"] = args.device
    from .experiments import amortize, curvature, fisher_trace, inr_edit, lopt, lora
    module = {"curvature": curvature, "fisher-trace": fisher_trace, "lopt": lopt, "lora": lora,
              "inr-edit": inr_edit, "amortize": amortize}[args.experiment]
    try:
        config = module.config_from_preset(args.preset, **overrides)
    except TypeError as err:
        fields = list(type(module.PRESETS["quick"]).__dataclass_fields__)
        raise SystemExit(f"gradmetanet: bad override ({err}); fields: {fields}")
    except ValueError as err:
        raise SystemExit(f"gradmetanet: {err}")
    out = Path(args.out or f"runs/{args.experiment}-{args.preset}")
    start = time.perf_counter()
    from .lopt.distributed import init_from_environment, is_main_process, shut_down
    distributed = init_from_environment(getattr(config, "device", "cpu"))
    if distributed and not (args.experiment == "lopt" and args.meta_only):
        raise SystemExit("gradmetanet: under torchrun only `run lopt --meta-only` is distributed (PES particles "
                         "are sharded across processes); run the race in one process afterwards")
    if args.meta_only:
        if args.experiment != "lopt":
            raise SystemExit("gradmetanet: --meta-only applies to the lopt experiment only")
        module.meta_train(config, out, progress=is_main_process())
        if is_main_process():
            print(f"meta-trained {list(config.optimizers)} into {out / 'meta'} in {time.perf_counter() - start:.0f} s")
        shut_down()
        return 0
    module.run(config, out)
    print((out / "table.md").read_text())
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
