"""`safediff` command line: run, train, eval, eval-compare, attack, compare, fid-reference, config, build-tiny.

Examples (each command's --help has its own):
    safediff run --config world                                      # Ray actors + DeepSpeed learner
    safediff train --config cpu_demo run.steps=5                     # the same method in one process
    safediff eval --config my.yaml --prompts i2p --adapter runs/my/adapter   # generate, score, report
    safediff eval-compare runs/eval/i2p-base runs/eval/i2p-my-adapter          # two evaluations side by side
    safediff attack --config world --attack ring-a-bell --run world      # adversarial prompts, ASR before/after
    safediff compare runs/a runs/b                                   # training runs' metrics drawn together
    safediff fid-reference coco/val2014 runs/coco3k-ref.npz --inception inception-2015-12-05.pt --set coco
    safediff config --config my.yaml            # print the validated config (every default filled in)
    safediff build-tiny runs/tiny               # random SD-architecture model + tiny open_clip for tests/demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import version
from pathlib import Path

from safediff.common.assets import builtin_configs
from safediff.common.config import Config, ConfigError, describe_fields, dump_config, load_config
from safediff.common.errors import LearnerFailed, UserInputError
from safediff.runtime.run_store import Interrupted

EXAMPLES = {
    "run": ["safediff run --config world", "safediff run --config my.yaml run.steps=100 cluster.rollout_actors=4",
            "safediff run --config my.yaml --fresh          # start the run over",
            "ray job submit --address http://127.0.0.1:8265 -- python -m safediff.cli run --config gpu8"],
    "train": ["safediff train --config cpu_demo run.steps=5", "safediff train --config world --quiet"],
    "config": ["safediff config --config my.yaml", "safediff config --describe | less",
               "safediff config --schema > safediff.schema.json    # for editors' YAML validation",
               "safediff config --config world 'prompts.sources.0.weight=2'"],
    "eval": ["safediff eval --config my.yaml --protocol i2p-sld --run my-run",
             "safediff eval --config world --prompts world_glyph --run world"],
    "eval-compare": ["safediff eval-compare runs/eval/i2p-base runs/eval/i2p-my-run-adapter"],
    "attack": ["safediff attack --config world --attack ring-a-bell --run world",
               "safediff attack --config my.yaml --attack prompts evaluation.attack.targets.path=mma.csv --run r"],
    "compare": ["safediff compare runs/world runs/world-lr2 --out runs/compare",
                "safediff compare runs/a runs/b --metrics reward_mean eval_unsafe_rate"],
    "fid-reference": ["safediff fid-reference coco/val2014 runs/coco-ref.npz --inception inception-2015-12-05.pt "
                      "--set coco"],
    "build-tiny": ["safediff build-tiny runs/tiny"],
}


def _load(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def _computing(cfg: Config) -> Config:
    """`cfg`, once this process's host memory is set up for a command that computes in it (the single-process loop,
    the world table after a run, evaluations, attacks): run.keep_freed_memory, as in the actors."""
    from safediff.common.process import configure_memory

    configure_memory(cfg)
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from safediff.runtime.local import train

    cfg = _computing(_load(args))
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    last = result.metrics[-1]
    print(f"run dir: {result.run_dir}")
    print(f"steps: {len(result.metrics)}  final reward_mean: {last['reward_mean']}  adapter sha256: {result.checksum}")
    return _evaluate(cfg, result.run_dir)


def cmd_run(args: argparse.Namespace) -> int:
    from safediff.runtime.controller import run

    cfg = _computing(_load(args))
    result = run(cfg, address=args.address, resume=args.resume, make_probe=_probe(cfg), progress=not args.quiet)
    last = result.metrics[-1]
    print(f"run dir: {result.run_dir}")
    print(f"steps: {len(result.metrics)}  final reward_mean: {last['reward_mean']}  "
          f"policy version: {result.final_version}  adapter sha256: {result.checksum}")
    return _evaluate(cfg, result.run_dir)


def _probe(cfg):
    """What the evaluation actor runs with evaluation.every: the world's judges, or the suite's scorers."""
    if not cfg.evaluation.every:
        return None
    if cfg.evaluation.world:
        from safediff.world.report import WorldProbe

        return WorldProbe
    from safediff.evaluation.live import SuiteProbe

    return SuiteProbe


def _evaluate(cfg, run_dir: Path) -> int:
    """The evaluation the config asks for after training (`evaluation` section)."""
    if cfg.evaluation.world:
        from safediff.world.report import before_after

        table = before_after(cfg, run_dir, cfg.evaluation.images_per_prompt)
        print(f"\nminiature world, held-out prompts (written to {run_dir / 'eval'}):\n{table}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(Config.model_json_schema(), indent=1))
        return 0
    if args.describe:
        for field, default, description in describe_fields():
            print(f"{field} = {default}\n    {description}")
        return 0
    sys.stdout.write(dump_config(_load(args)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from safediff.evaluation import protocols
    from safediff.evaluation.run import evaluate

    # the protocol's settings first, then --prompts, then the user's overrides: any field may still be changed
    overrides = protocols.overrides(args.protocol) if args.protocol else []
    if args.prompts:
        key = "path" if Path(args.prompts).suffix in (".csv", ".jsonl", ".txt") else "name"
        overrides += [f"evaluation.suite.prompts.{key}={args.prompts}",
                      f"evaluation.suite.prompts.{'name' if key == 'path' else 'path'}=null"]
    overrides += list(args.overrides)
    if args.allow_missing_scorers:
        overrides.append("evaluation.suite.allow_missing_scorers=true")
    cfg = _computing(load_config(args.config, overrides))
    if args.describe:
        if not args.protocol:
            raise UserInputError("--describe needs --protocol NAME")
        print(json.dumps(protocols.describe(cfg, args.protocol), indent=1))
        return 0
    adapter = args.adapter
    if args.run is not None:
        adapter = cfg.run.output_dir / args.run / "adapter"
    out = evaluate(cfg, adapter, args.out, address=args.address, protocol=args.protocol)
    print((out / "report.md").read_text())
    print(f"written to {out}")
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from safediff.evaluation.lpips_score import LpipsDistance
    from safediff.evaluation.report import compare

    out = args.out or Path(args.second) / f"vs-{Path(args.first).name}"
    lpips = (LpipsDistance(args.lpips_backbone, args.lpips_net, args.lpips_linear, args.lpips_resize)
             if args.lpips_backbone else None)
    print(compare(args.first, args.second, out, lpips=lpips))
    print(f"written to {out}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from safediff.evaluation.attacks.run import run_attack

    cfg = _computing(load_config(args.config, list(args.overrides)))
    adapter = cfg.run.output_dir / args.run / "adapter" if args.run is not None else args.adapter
    out = run_attack(cfg, args.attack, adapter, args.out)
    print((out / "report.md").read_text())
    print(f"written to {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from safediff.common.metrics import compare_runs

    out = args.out or Path(args.runs[-1]) / "compare"
    print(compare_runs(args.runs, out, tuple(args.metrics)))
    print(f"written to {out / 'compare.md'} and {out / 'compare.png'}")
    return 0


def cmd_fid_reference(args: argparse.Namespace) -> int:
    from safediff.evaluation import fid, provenance

    files = fid.coco_images(args.images, args.set) if args.set else fid.image_files(args.images)
    net = fid.inception(args.inception, field="--inception")
    feats = fid.write_reference(files, net, provenance.sha256(args.inception), args.out)
    print(f"{len(feats)} images' clean-fid features written to {args.out}; use it as evaluation.suite.fid.reference")
    return 0


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from safediff.common.models import build_tiny_bundle
    from safediff.reward_server.clip_model import build_tiny_clip

    out = Path(args.out)
    build_tiny_bundle(out / "sd", seed=args.seed)
    build_tiny_clip(out / "clip", seed=args.seed)
    print(f"tiny diffusion model: {out / 'sd'}\ntiny open_clip model: local-dir:{out / 'clip'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safediff", description=__doc__.split("\n\n", 1)[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('safediff')}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors: no progress bar or "
                        "progress lines, no info messages")
    subparsers = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, **kwargs) -> argparse.ArgumentParser:
        examples = "\n".join(f"  {line}" for line in EXAMPLES[name])
        return subparsers.add_parser(name, parents=[common], epilog=f"examples:\n{examples}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    for name, func, helptext in (("run", cmd_run, "distributed GRPO training on Ray (the service)"),
                                 ("train", cmd_train, "single-process GRPO training (reference loop)"),
                                 ("config", cmd_config, "print the validated config")):
        p = add_command(name, help=helptext)
        p.add_argument("--config", type=Path, default=None, help="YAML config file, or a built-in config by name "
                       f"({', '.join(builtin_configs())}); defaults when omitted")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the file")
        p.set_defaults(func=func)
        if name == "config":
            p.add_argument("--describe", action="store_true", help="print every field with its default and "
                           "description instead (the configuration reference)")
            p.add_argument("--schema", action="store_true", help="print the config's JSON Schema instead (for "
                           "editors that validate YAML)")
        else:
            when = p.add_mutually_exclusive_group()
            when.add_argument("--resume", dest="resume", action="store_const", const=True, default=None,
                              help="continue this run (run.name) from its newest complete checkpoint (the default "
                              "when the previous job on this run id did not finish)")
            when.add_argument("--fresh", dest="resume", action="store_const", const=False,
                              help="start this run over from step 0, even if its previous job did not finish")
        if name == "run":
            p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a "
                           "local Ray started on 127.0.0.1)")
    p = add_command("eval", help="generate images for a prompt set (base model or an adapter), score, report")
    p.add_argument("--config", type=Path, default=None, help="YAML config: model, sampler, cluster and "
                   "evaluation.suite (scorers, weight paths)")
    p.add_argument("--prompts", default=None, help="a built-in set name (i2p, i2p_nudity, geneval, coco, ...) or "
                   "a .csv/.jsonl/.txt file (sets evaluation.suite.prompts)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", type=Path, default=None, help="trained weights: a run's adapter/ or "
                       "checkpoints/step_N/ folder (default: the base model)")
    which.add_argument("--run", default=None, help="a run name: its <run.output_dir>/<name>/adapter")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run.output_dir>/eval/"
                   "<set>-<base|run-adapter>); an existing one is resumed")
    p.add_argument("--address", default=None, help="render on the Ray rollout actors of this cluster (default: "
                   "RAY_ADDRESS if set, else locally in this process)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the file")
    p.add_argument("--protocol", default=None, help="a published protocol's settings (i2p-sld, i2p-q16, "
                   "nudity-nudenet, geneval, coco-fid-clip), applied before the overrides; the report lists "
                   "the fields you changed")
    p.add_argument("--describe", action="store_true", help="with --protocol: print the resolved settings as JSON "
                   "and exit, loading no model")
    p.add_argument("--allow-missing-scorers", action="store_true", help="run without a scorer whose weights or "
                   "inputs are missing (the report marks it disabled); default: such a scorer is an error before "
                   "any image is generated")
    p.set_defaults(func=cmd_eval)
    p = add_command("eval-compare", help="two evaluations of one prompt set side by side, with deltas")
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: <second>/vs-<first's name>")
    p.add_argument("--lpips-backbone", type=Path, default=None, help="also LPIPS between the two evaluations' "
                   "images: the backbone's torchvision weights file, e.g. alexnet-owt-7be5be79.pth "
                   "or a .safetensors copy (nothing is downloaded)")
    p.add_argument("--lpips-net", choices=["alex", "vgg", "squeeze"], default="alex", help="LPIPS backbone")
    p.add_argument("--lpips-linear", type=Path, default=None, help="LPIPS linear layers (default: the calibrated "
                   "v0.1 ones shipped in the lpips package)")
    p.add_argument("--lpips-resize", choices=["rece", "esd", "none"], default="rece", help="how images are made 64 "
                   "pixels: rece = cv2 bilinear to 64 x 64 (RECE's lpips_score.py, the SafeDiffusion-R1 reference's "
                   "scripts), esd = shorter side 64, antialiased (ESD's lpips_eval.py), none = native size")
    p.set_defaults(func=cmd_eval_compare)
    p = add_command("attack", help="adversarial prompts for a concept (evaluation.attack), generated and judged "
                       "on the base model and an adapter: attack success rates")
    p.add_argument("--config", type=Path, default=None, help="YAML config (evaluation.attack, evaluation.suite), or "
                   "a built-in config by name")
    p.add_argument("--attack", required=True, help="prompts (a transferred attack set), ring-a-bell, inversion or "
                   "unlearndiff")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", type=Path, default=None, help="also judge these trained weights")
    which.add_argument("--run", default=None, help="also judge <run.output_dir>/<name>/adapter")
    p.add_argument("--out", type=Path, default=None, help="default: <run.output_dir>/attacks/<attack>-<concept>")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the file")
    p.set_defaults(func=cmd_attack)
    p = add_command("compare", help="training runs' metrics drawn together (PNG) and tabulated (markdown)")
    p.add_argument("runs", type=Path, nargs="+", help="run directories (<run.output_dir>/<name>)")
    p.add_argument("--metrics", nargs="*", default=[], help="step-record fields to compare (default: reward, KL, "
                   "clip fraction, the hacking signals and the live evaluation, where logged)")
    p.add_argument("--out", type=Path, default=None, help="default: <the last run>/compare")
    p.set_defaults(func=cmd_compare)
    p = add_command("fid-reference", help="compute the real images' clean-fid features once, for "
                       "evaluation.suite.fid.reference")
    p.add_argument("images", type=Path, help="folder of real images")
    p.add_argument("out", type=Path, help="the .npz to write")
    p.add_argument("--inception", type=Path, required=True, help="clean-fid's inception-2015-12-05.pt")
    p.add_argument("--set", default=None, help="only the images of a built-in set's coco_id column (coco: the "
                   "3,000 COCO val2014 images of the coco prompts)")
    p.set_defaults(func=cmd_fid_reference)
    p = add_command("build-tiny", help="write tiny random models (diffusers + open_clip) for tests and demos")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("safediff").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    if args.quiet:
        logging.getLogger("safediff").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except LearnerFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.filename is None:  # not a path the user gave: a real fault, keep its traceback
            raise
        print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
