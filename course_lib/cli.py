"""Command line: `python -m course_lib <command>` (also installed as `course`)."""
from __future__ import annotations

import argparse
import sys

from . import SHIPPED_ADAPTERS
from . import SHIPPED_MODELS as SHIPPED
from .shapes_presets import PRESETS as SHAPES_PRESETS


def _doctor(args) -> int:
    from . import doctor

    return doctor.main()


def _release(args) -> int:
    from .grading.release import release

    reports = release(args.src_dir, args.out_dir, force=args.force)
    for r in reports:
        print(r)
    print(f"Wrote {len(reports)} student notebook(s) to {args.out_dir}")
    return 0


def _colab(args) -> int:
    from pathlib import Path

    from . import colab

    root = Path(args.root)
    if not (root / "notebooks").is_dir() or not (root / "README.md").is_file():
        raise ValueError(f"{root} is not the course repository (no notebooks/ and README.md)")
    url = args.url or colab.REPO_URL
    colab.repo_slug(url)  # a clear error for a URL that is not a GitHub repository
    changed = colab.sync(root, url, write=not args.check)
    if args.check:
        for path in changed:
            print(f"{path}: its Colab links or install cell do not match {url}")
        answers, why = colab.url_answers(url)
        if not answers:
            print(f"{url} does not answer as a git repository ({why}): the install cell would fail to clone it")
        print("in step, and the repository answers" if not changed and answers else
              "run `python -m course_lib colab` to fix them, then `release`" if changed else
              "in step, but the repository cannot be reached from here")
        return 1 if changed or not answers else 0
    for path in changed:
        print(f"updated {path}")
    print(f"Colab links, install cells and homepage point at {url}"
          + ("; now refresh the student copies: python -m course_lib release notebooks notebooks/student --force"
             if changed else " (nothing to change)"))
    return 0


def _grade(args) -> int:
    from .grading import main_grade

    return main_grade(args)


def _train_command(args, out) -> str:
    """The exact command that reproduces this run (paths quoted for a POSIX shell)."""
    import shlex

    words = ["python", "-m", "course_lib", "train", "--preset", args.preset, "--out", str(out), "--force"]
    for flag, value in (("--steps", args.steps), ("--state", args.state), ("--eval-samples", args.eval_samples),
                        ("--save-every", args.save_every if args.save_every != 1000 else None)):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words + (["--no-eval"] if args.no_eval else []) + (["--half"] if args.half else []))


def _check_state(state, config) -> None:
    """Refuse to resume a training state started with another preset or budget (the card would describe the wrong
    run); the checkpoint is read, not unpickled."""
    from .checkpoints import load_checkpoint

    saved = load_checkpoint(state)
    if saved["kind"] != "train_state":
        raise ValueError(f"--state {state} holds exported weights only (no optimizer state): it cannot be resumed")
    mine = config.to_dict()
    differ = sorted(k for k in set(saved["config"]) | set(mine) if saved["config"].get(k) != mine.get(k))
    if differ:
        detail = ", ".join(f"{k} {saved['config'].get(k)!r} there, {mine.get(k)!r} here" for k in differ)
        raise ValueError(f"--state {state} was started with other settings ({detail}): resume it with the --preset "
                         "and --steps it was started with, or give a new --state")


def _train(args) -> int:
    import json
    import os
    import platform
    from pathlib import Path

    from .checkpoints import write_json_atomic
    from .outputs import Plan, write_then_publish
    from .runtime import device_info

    if args.preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {list(PRESET_NAMES)}")
    if args.preset in SHIPPED_ADAPTERS:  # lesson 13's adapters: folders (course_lib.adapters)
        from .adapters import main_train

        return main_train(args, _train_command)
    for flag, value, most in (("--steps", args.steps, 10**8), ("--eval-samples", args.eval_samples, 100_000),
                              ("--save-every", args.save_every, 10**8)):
        if value is not None and not 1 <= value <= most:
            raise ValueError(f"{flag} must be between 1 and {most:,}, got {value}")
    trainer_preset = args.preset != "digits_classifier" and args.preset not in SHAPES_PRESETS
    if args.state and not trainer_preset:
        raise ValueError(f"--state is for the presets the Trainer trains; {args.preset} trains in one go")
    plan = Plan(force=args.force)
    out = plan.output(args.out or f"{args.preset}.pt", "checkpoint")
    plan.output(out.with_suffix(".json"), "card (the checkpoint's name with .json)")
    state = Path(args.state) if args.state else None
    if state is not None:
        plan.output(state, "training state (--state)", may_exist=True)
    config = None
    if trainer_preset:
        from .train import preset

        config = preset(args.preset, **({"steps": args.steps} if args.steps else {}))
        if state is not None and state.exists():
            _check_state(state, config)
    info = device_info(args.device)
    machine = f"{info.name}; {platform.machine()}; torch {__import__('torch').__version__}"
    command = _train_command(args, out)
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes, so only it holds the locks
    with (plan if rank0 else Plan()):
        card, write = _train_run(args, config, state, info, machine, command)
        write_then_publish(lambda tmp: write(tmp, card), out, replace=args.force)
        write_json_atomic(card, out.with_suffix(".json"), replace=args.force)
        print(json.dumps(card, indent=2, sort_keys=True))
        print(f"Wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {out.with_suffix('.json')}")
    if config is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import leave
        leave(0)
    return 0


def _train_run(args, config, state, info, machine, command):
    """Train (resuming --state), measure, and return (card, write(path, card)); other torchrun ranks end here."""
    if args.preset == "digits_classifier":
        from .classifier import export_classifier, train_classifier

        clf, card = train_classifier(steps=args.steps or 2_000)
        card.update(preset=args.preset, machine=machine, command=command)
        return card, lambda path, c: export_classifier(clf, path, c)
    if args.preset in SHAPES_PRESETS:  # lesson 7's models: their own loops (course_lib.shapes_presets)
        from .shapes_presets import train_preset

        _, card, export = train_preset(args.preset, args.steps)
        card.update(preset=args.preset, machine=machine, command=command)
        return card, export
    from .evaluate import held_out_likelihood, sample_quality
    from .nets import count_parameters
    from .train import Trainer

    if state is not None and state.exists():
        trainer = Trainer.resume(state, info.device)
        print(f"Resumed {state} at step {trainer.step}")
    else:
        trainer = Trainer(config, info.device)
    save = (lambda tr: tr.save(state)) if state is not None else None
    trainer.train(callback=save, every=args.save_every)
    if state is not None:
        trainer.save(state)
    if trainer.world > 1:  # under torchrun every rank holds the same model: rank 0 measures and writes it
        from .distributed import finish, leave
        finish()
        if trainer.rank != 0:
            leave(0)
    card = {"preset": args.preset, "steps": trainer.step, "train_seconds": round(trainer.elapsed, 1),
            "machine": machine, "command": command, "parameters": count_parameters(trainer.model),
            "final_loss": round(sum(trainer.losses[-200:]) / len(trainer.losses[-200:]), 5)}
    if not args.no_eval and trainer.family in ("masked_diffusion", "autoregressive"):
        from .checkpoints import Loaded
        from .text_models import evaluate_text

        print("Measuring the captions it writes and its bits per token ...")
        card["quality"] = evaluate_text(Loaded(trainer.ema, trainer.config.to_dict(), {}))
    elif not args.no_eval and trainer.family == "latent_consistency":  # lesson 12: prompt adherence per budget
        from .lcm import adherence_by_budget, from_trainer

        student = from_trainer(trainer)
        card.update(student.card, quality=adherence_by_budget(student, n=args.eval_samples or 500))
    elif not args.no_eval and trainer.family == "classifier":
        from .evaluate import noisy_accuracy

        card["quality"] = noisy_accuracy(trainer.ema, trainer.schedule)
    elif not args.no_eval:
        print("Measuring sample quality and the likelihood bound ...")
        ema, cfg = trainer.ema, trainer.config.to_dict()
        n = args.eval_samples or (1000 if trainer.config.data == "digits" else 2000)
        card["quality"] = sample_quality(ema, trainer.schedule, cfg, n=n, progress=True)
        if trainer.family == "diffusion":  # the variational bound needs a noise schedule (flow: lesson 9's ODE)
            n_t = 100 if trainer.config.data == "digits" else None
            card["likelihood"] = held_out_likelihood(ema, trainer.schedule, cfg, n_t=n_t)
    return card, lambda path, c: trainer.export(path, c, half=args.half)


def _generate(args) -> int:
    import math
    import random

    from .grammar import complete_prompt, parse_caption
    from .outputs import Plan

    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out must name a .png file, got {args.out}")
    plan = Plan(force=args.force)
    out = plan.output(args.out, "image (--out)")
    if args.model.endswith(".pt"):
        plan.input(args.model, "model checkpoint (--model)")
    if args.n < 1 or args.n > 64:
        raise ValueError(f"--n must be between 1 and 64, got {args.n}")
    if args.scale is not None and not (math.isfinite(args.scale) and 0 <= args.scale <= 100):
        raise ValueError(f"--scale must be a guidance scale between 0 and 100, got {args.scale}")
    if args.nfe is not None and not 1 <= args.nfe <= 1000:
        raise ValueError(f"--nfe must be between 1 and 1,000, got {args.nfe}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    scenes = [parse_caption(p) for p in args.prompt]  # every prompt checked before torch and the model load
    rng = random.Random(args.seed)
    prompts, notes = [], []
    for text, scene in zip(args.prompt, scenes):
        for _ in range(args.n):
            full, filled = complete_prompt(text, rng)
            prompts.append(full)
        if filled:
            notes.append(f"{text!r} names no {' and no '.join(filled)}: every training caption of one object names "
                         f"them, so each sample draws {'them' if len(filled) > 1 else 'it'} at random")

    from .outputs import write_then_publish
    from .text2image import DEFAULT_NFE, load_text_to_image, save_grid

    with plan:
        model = load_text_to_image(args.model)
        scale = model.card.get("best_scale") if args.scale is None else args.scale
        images = model.generate(prompts, scale=scale, nfe=args.nfe or DEFAULT_NFE, sampler=args.sampler,
                                seed=args.seed)
        write_then_publish(lambda tmp: save_grid(images, tmp, rows=len(args.prompt), labels=list(args.prompt)), out,
                           replace=args.force)
    print(f"Wrote {out}: {args.n} sample(s) per prompt for {len(args.prompt)} prompt(s), one row each, labelled; "
          f"{args.model}, guidance {scale:g}, {args.nfe or DEFAULT_NFE} NFE ({args.sampler}), seed {args.seed}")
    for note in notes:
        print(note)
    if any(s["relation"] is not None for s in scenes):
        from .bench.t2i import two_object_note

        print(two_object_note(args.model))
    return 0


PRESET_NAMES = SHIPPED + SHIPPED_ADAPTERS  # every shipped checkpoint and adapter has a preset that reproduces it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_lib",
                                     description="Tools for the hands-on diffusion course.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("doctor", help="check the installation, device, widgets, Triton and quick mode",
                       description="Print what is installed and which device the course uses; exit 0 when the course can run.")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("start", help="copy the student lessons into your own work folder (never overwrites)",
                       description="Copy every student lesson (exercises blank) into DIR, default my-work/, which git "
                                   "and the tests ignore. A lesson already in DIR is never overwritten; run it again "
                                   "after a course update to get new lessons and to hear which of yours have a newer "
                                   "release (recorded by content hash in DIR/.course-release.json).")
    p.add_argument("dest", nargs="?", default="my-work", metavar="DIR", help="your work folder (default: my-work)")
    p.add_argument("--repo", metavar="PATH", help="the course repository (default: this checkout, or .)")
    p.add_argument("--refresh-untouched", action="store_true",
                   help="replace the lessons you never edited by their newer release (an edited lesson is never "
                        "replaced: its newer release is written beside it as NAME.new.ipynb)")
    p.set_defaults(func=lambda a: __import__("course_lib.workspace", fromlist=["main_start"]).main_start(
        a.dest, a.repo, a.refresh_untouched))

    p = sub.add_parser("release", help="write student copies of the source notebooks",
                       description="Copy every notebook in SRC_DIR to OUT_DIR with solutions replaced by stubs, "
                                   "cells tagged hidden-tests removed and outputs cleared.")
    p.add_argument("src_dir", metavar="SRC_DIR", help="folder of source notebooks (with solutions)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the student notebooks")
    p.add_argument("--force", action="store_true", help="overwrite the student notebooks in a non-empty OUT_DIR")
    p.set_defaults(func=_release)
    p = sub.add_parser("colab", help="point the Colab badges and install cells at the course's repository",
                       description="Rewrite every Colab link, the lessons' install cell and pyproject.toml's homepage "
                                   "from course_lib.colab.REPO_URL (or --url, which also becomes REPO_URL: how a fork "
                                   "makes Colab open its own copy). --check only reports what differs (exit 1).")
    p.add_argument("--url", metavar="URL", help="https://github.com/OWNER/NAME (default: the current REPO_URL)")
    p.add_argument("--root", default=".", metavar="DIR", help="the course repository (default: .)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is out of step")
    p.set_defaults(func=_colab)

    p = sub.add_parser("exercises", help="the graded exercises: how many per lesson, and the central ideas they cover",
                       description="Print the graded functions, points and behaviour-graded exercises of each lesson "
                                   "and the share of its central ideas a learner implements (course_lib.exercises.ideas).")
    p.add_argument("--summary", action="store_true", help="the table (the default); --verbose also names the gaps")
    p.add_argument("--verbose", action="store_true", help="name each central idea that has no exercise yet")
    p.set_defaults(func=lambda a: print(__import__("course_lib.exercises.ideas", fromlist=["summary_text"])
                                        .summary_text(a.verbose)) or 0)
    p = sub.add_parser("grade", help="grade submitted notebooks safely (CSV + JSON)",
                       description="Run each submitted notebook in its own confined process in quick mode, call "
                                   "its exercise functions on secret random inputs and judge the outputs against "
                                   "the reference in this process. One CSV row per submission and exercise. A "
                                   "journal next to --out lets an interrupted batch resume. Exit 0 when every "
                                   "submission was graded, 1 when some could not be (status error).")
    p.add_argument("submissions", nargs="+", metavar="SUBMISSION", help="notebook files or folders of them")
    p.add_argument("--out", required=True, metavar="CSV", help="where to write the grades (one row per exercise)")
    p.add_argument("--json", metavar="PATH", help="also write the rows, notes and totals as JSON")
    p.add_argument("--timeout", type=float, default=600, metavar="SECONDS",
                   help="time limit per submission, every cell and attempt included (default 600)")
    p.add_argument("--cell-timeout", type=float, default=120, metavar="SECONDS",
                   help="time limit per cell (default 120)")
    p.add_argument("--call-timeout", type=float, default=20, metavar="SECONDS",
                   help="time limit per call of a learner's function (default 20)")
    p.add_argument("--memory-mb", type=int, default=6144, metavar="MB",
                   help="address-space limit per submission (default 6144)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="submissions graded at once, one core each "
                                                                      "(default 1; use your number of cores)")
    p.add_argument("--scratch", metavar="DIR", help="where the per-submission scratch folders go (default: "
                                                    "the system temporary folder)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="grade symbolic links that point outside the given folders (refused by default)")
    p.add_argument("--released", metavar="DIR", help="the released student notebooks, whose unchanged cells are the "
                                                     "course's own code (default: notebooks/student of this course)")
    p.add_argument("--shard", metavar="K/N", help="grade only shard K of N of the submissions (a hash of each name "
                                                  "decides), for a cluster; merge the shards with merge-grades")
    p.add_argument("--force", action="store_true", help="start afresh: replace --out/--json and forget the journal")
    p.set_defaults(func=_grade)
    p = sub.add_parser("merge-grades", help="merge the CSVs of every shard of a grading batch into one",
                       description="Check the shards' manifests (written by grade --shard next to each CSV) and merge "
                                   "their rows into one CSV (and JSON). Refuses a missing, repeated or unfinished "
                                   "shard, shards that saw different submissions, and a CSV that disagrees with its "
                                   "manifest.")
    p.add_argument("shards", nargs="+", metavar="SHARD_CSV", help="the --out CSV of every shard")
    p.add_argument("--out", required=True, metavar="CSV", help="the merged CSV")
    p.add_argument("--json", metavar="PATH", help="also merge the shards' JSON (each shard must have been graded "
                                                  "with --json)")
    p.add_argument("--force", action="store_true", help="replace an existing --out/--json")
    p.set_defaults(func=lambda a: __import__("course_lib.grading.shards", fromlist=["main_merge"]).main_merge(a))
    p = sub.add_parser("train", help="train a preset model and write its checkpoint and JSON card",
                       description="Train one of the shipped models from scratch (reproducing data/NAME.pt), "
                                   "measure its sample quality and write NAME.pt plus NAME.json.")
    p.add_argument("--preset", required=True, metavar="NAME", help=f"one of: {', '.join(PRESET_NAMES)}")
    p.add_argument("--out", metavar="PATH", help="where to write the checkpoint (default: ./NAME.pt)")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps (default: the preset's)")
    p.add_argument("--state", metavar="PATH", help="also keep the full training state here (saved every "
                                                   "--save-every steps); if the file exists, training resumes from "
                                                   "it (started with the same --preset and --steps)")
    p.add_argument("--save-every", type=int, default=1000, metavar="N",
                   help="steps between saves of --state (default 1,000)")
    p.add_argument("--device", choices=("cuda", "mps", "cpu"), help="default: the best one found")
    p.add_argument("--eval-samples", type=int, metavar="N",
                   help="samples for the quality numbers (default: 2,000 points or 1,000 digits)")
    p.add_argument("--no-eval", action="store_true", help="skip the quality measurement")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the file)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_train)
    p = sub.add_parser("tune", help="tune a shipped checkpoint's noise levels for few-step sampling (into its card)",
                       description="Choose a Karras spacing (sigma_min, sigma_max, rho) per sampler and budget for a "
                                   "shipped checkpoint by maximising sample quality on tuning noise (seed 2026, never "
                                   "used to evaluate), and store it in the checkpoint's card: samplers.sample uses it "
                                   "by default. Digits: about 5 minutes per sampler and budget on 2 CPU cores.")
    p.add_argument("--preset", required=True, metavar="NAME", help="ring8, grid25, digits, ring8_flow, ...")
    p.add_argument("--samplers", nargs="+", metavar="NAME", help="default: every sampler")
    p.add_argument("--samples", type=int, metavar="N", help="tuning samples (default 1,000 points or 500 digits)")
    p.add_argument("--nfe", type=int, nargs="+", metavar="N", help="budgets to tune (default: 5 10 20 for dpmpp_2m, "
                                                                   "10 for the others)")
    p.add_argument("--recommend-only", action="store_true",
                   help="skip tuning: only choose the default sampler per budget from the levels already tuned")
    p.set_defaults(func=lambda a: __import__("course_lib.bench.samplers", fromlist=["main_tune"]).main_tune(
        a.preset, a.samplers, a.samples, a.nfe, a.recommend_only))
    from .bench.commands import add_bench_parser

    add_bench_parser(sub)
    p = sub.add_parser("generate", help="images from a text prompt with the shipped text-to-image model",
                       description="Render a grid of samples for one or more prompts of the shapes grammar ('a "
                                   "[size] colour shape [at the position]' or 'a colour shape left of|right of|above|"
                                   "below a colour shape'), one row per prompt, with the shipped latent diffusion "
                                   "model (or --model shapes_pixel, or a checkpoint file).")
    p.add_argument("prompt", nargs="+", help='e.g. "a red circle above a blue square"')
    p.add_argument("--out", required=True, metavar="PNG", help="the image file to write")
    p.add_argument("--n", type=int, default=8, metavar="N", help="samples per prompt (default 8)")
    p.add_argument("--scale", type=float, metavar="W", help="guidance scale (default: the model card's best)")
    p.add_argument("--nfe", type=int, metavar="N", help="denoiser evaluations (default 20)")
    p.add_argument("--sampler", default="dpmpp_2m", help="a lesson-3 sampler (default dpmpp_2m)")
    p.add_argument("--model", default="shapes_ldm", metavar="NAME", help="shapes_ldm, shapes_pixel or a .pt file")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:  # OSError: a missing input, a full disk, a file that appeared
        message = f"error: {e}"
        try:
            print(message, file=sys.stderr)
        except UnicodeEncodeError:  # a file name the terminal's encoding cannot show
            print(message.encode("ascii", "backslashreplace").decode("ascii"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
