"""The `bench` command line: one subcommand per benchmark (lessons 3-10), its options, and the dispatch to the
benchmark's main function. Imported by course_lib.cli; imports nothing heavy until a benchmark runs."""
from __future__ import annotations

import argparse


def _datasets(args, allowed) -> list[str]:
    """--datasets checked against a benchmark's datasets (default: all of them), and --samples of at least 10."""
    datasets = args.datasets or list(allowed)
    for d in datasets:
        if d not in allowed:
            raise ValueError(f"unknown dataset {d!r}; choose from {list(allowed)}")
    if args.samples is not None and not 10 <= args.samples <= 1_000_000:
        raise ValueError(f"--samples must be between 10 and 1,000,000, got {args.samples}")
    return datasets


def _check_seeds(seeds) -> None:
    if seeds is not None and (len(set(seeds)) != len(seeds) or min(seeds) < 0):
        raise ValueError(f"--seeds must be distinct non-negative ints, got {seeds}")


def _bench(args) -> int:
    if args.bench == "guidance":
        return _bench_guidance(args)
    if args.bench == "compare":
        return _bench_compare(args)
    if args.bench == "kernels":
        return _bench_kernels(args)
    if args.bench == "lessons":
        from .lessons import main_lessons

        return main_lessons(args.quick, args.json, args.force, args.lessons)
    if args.bench == "export":
        from .export import main_export

        return main_export(args.quick, args.json, args.force)
    if args.bench == "exercises":
        from .exercises import main_exercises

        if args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        return main_exercises(args.quick, args.json, args.force, args.jobs, args.only)
    if args.bench == "capstone":
        from .exercises import main_exercises

        if args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        return main_exercises(args.quick, args.json, args.force, args.jobs, capstone=True)
    if args.bench == "bf16":
        from .precision import main_bf16

        if args.samples is not None and args.samples < 50:
            raise ValueError(f"--samples must be at least 50, got {args.samples}")
        return main_bf16(args.quick, args.json, args.samples, args.force)
    if args.bench == "threads":
        from .threads import main_threads

        return main_threads(args.quick, args.json, args.force)
    if args.bench == "grader":
        from .grader import main_grader

        main_grader(args.quick, args.json, args.force, args.jobs)
        return 0
    if args.bench in ("arch", "t2i", "flow", "text", "recipe", "resolution", "terminal", "fewstep", "adapt",
                      "evaluation", "beyond"):  # lessons 7-15: main_<name>(quick, json, samples, force)
        from importlib import import_module

        least = {"arch": 50, "t2i": 10, "flow": 50, "text": 50, "recipe": 50, "resolution": 50, "terminal": 10, "fewstep": 50,
                 "adapt": 8, "evaluation": 8, "beyond": 20}[args.bench]  # FD needs samples; adherence prompts
        if args.samples is not None and args.samples < least:
            raise ValueError(f"--samples must be at least {least}, got {args.samples}")
        main = getattr(import_module(f"course_lib.bench.{args.bench}"), f"main_{args.bench}")
        extra = {"jobs": args.jobs} if args.bench in ("arch", "recipe", "resolution", "terminal", "fewstep", "adapt",
                                                      "evaluation", "beyond") else {}
        if args.bench in ("recipe", "fewstep", "beyond") and args.export_dir:
            extra["export_dir"] = args.export_dir
        if args.bench in ("fewstep", "adapt", "evaluation", "beyond"):
            _check_seeds(args.seeds)
            extra.update(seeds=args.seeds, resume=args.resume)
        if args.bench == "flow" and args.datasets:
            from .flow import MODELS

            extra["datasets"] = _datasets(args, MODELS)
        main(args.quick, args.json, args.samples, args.force, **extra)
        return 0
    from .samplers import BENCH_DATASETS, main_samplers

    _check_seeds(args.seeds)
    datasets = _datasets(args, BENCH_DATASETS)
    return main_samplers(args.quick, args.json, datasets, args.samples, args.device, args.force, args.seeds,
                         args.resume)


def _bench_compare(args) -> int:
    from .compare import COMPARE_DATASETS, main_compare

    datasets = _datasets(args, COMPARE_DATASETS)
    _check_seeds(args.seeds)
    return main_compare(args.quick, args.json, datasets, args.seeds, args.samples, args.device, args.force,
                        args.export)


def _bench_guidance(args) -> int:
    from .guidance import main_guidance

    _check_seeds(args.seeds)
    if args.samples is not None and args.samples < 20:
        raise ValueError(f"--samples must be at least 20 (two per class), got {args.samples}")
    return main_guidance(args.quick, args.json, args.samples, args.force, args.seeds)


def _bench_kernels(args) -> int:
    from .kernels import main_kernels, summary_lines

    records = main_kernels(args.json, args.force, args.quick, args.device)
    print("\n".join(summary_lines(records)))
    if args.json:
        print(f"Wrote {len(records)} records to {args.json}")
    return 0


def _seeds_and_resume(p) -> None:
    """--seeds and --resume, for the benchmarks that train on several seeds and save each finished run."""
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="training seeds (default: 0 1 2; quick: 0)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in JSON.partial (same --json)")


def _seeded_bench(bench, name: str, help: str, description: str, samples_help: str):
    """A training benchmark's parser: --quick, --json, --force, --samples, --jobs (runs), --seeds and --resume."""
    p = bench.add_parser(name, help=help, description=description)
    _bench_arguments(p, "a small run for checking", datasets=False, devices=None, samples_help=samples_help)
    _jobs_argument(p, 1, "runs")
    _seeds_and_resume(p)
    return p


def _jobs_argument(p, default: int, what: str) -> None:
    """--jobs N: how many of the benchmark's runs (or checks) go in parallel, one CPU thread each."""
    p.add_argument("--jobs", type=int, default=default, metavar="N", help=f"{what} in parallel, one CPU thread each")


def _bench_arguments(p: argparse.ArgumentParser, quick_help: str, datasets: bool = True,
                     devices=("cuda", "mps", "cpu"), device_default: str = "cpu", samples_help: str = "") -> None:
    """The options every benchmark shares (--datasets and --samples for those that sample the datasets; --samples
    alone with `samples_help`; no --device when `devices` is None)."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--json", metavar="PATH", help="also write the records to this JSON file")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    if datasets:
        p.add_argument("--datasets", nargs="+", metavar="NAME", help="a subset of ring8 grid25 digits")
        p.add_argument("--samples", type=int, metavar="N", help="samples per configuration (default: 5,000 "
                                                                "points or 1,000 digits; quick: 1,000 / 200)")
    elif samples_help:
        p.add_argument("--samples", type=int, metavar="N", help=samples_help)
    if devices:
        p.add_argument("--device", choices=devices, help=f"default: {device_default}")
    p.set_defaults(func=_bench)


def add_bench_parser(sub) -> None:
    """Add `bench` and its subcommands to the CLI's subparsers."""
    p = sub.add_parser("bench", help="measure speed and quality (bench samplers | compare | guidance | kernels | threads | bf16 | exercises | capstone | export | lessons | t2i | arch | flow | text | recipe | resolution | terminal | fewstep | adapt | evaluation | beyond | grader)",
                       description="Benchmarks that print a table and, with --json, save flat records.")
    bench = p.add_subparsers(dest="bench", metavar="BENCHMARK")
    bench.required = True
    p = bench.add_parser("samplers", help="every sampler x spacing x NFE on the shipped checkpoints, and diffusers",
                         description="For each shipped checkpoint (ring8, grid25, digits): DDPM at 1,000 steps (the "
                                     "reference), then every sampler on every spacing (uniform, trailing, Karras over "
                                     "the whole range, and 'auto', the tuned default) and diffusers' schedulers at NFE "
                                     "50, 20, 10, 5 (digits: 20, 10, 5), for noise seeds 0 1 2 (the extra "
                                     "seeds rerun the reference and, at 10 NFE, the tuned levels and diffusers): quality against the true data "
                                     "and seconds per 1,000 samples (about two hours on 2 CPU cores, most of it the digits reference). --quick: DDPM "
                                     "at 100 steps, NFE 20 and 10, one seed, fewer samples (about 2 minutes).")
    _bench_arguments(p, "a small run for checking (about 2 minutes on 2 cores)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="noise seeds (default: 0 1 2; quick: 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue a run that stopped, from the records it saved in JSON.partial (needs --json)")
    p = bench.add_parser("compare", help="diffusion vs GAN vs VAE: same data, same budget, several seeds",
                         description="Trains diffusion, GAN and VAE on ring8, grid25 and digits with the same "
                                     "steps and batch for each of 3 seeds, then measures quality, sampling cost, "
                                     "likelihood and sharpness (about 35 minutes on 2 CPU cores). --quick: tiny "
                                     "budgets and 2 seeds (under 3 minutes).")
    _bench_arguments(p, "a small run for checking (under 3 minutes on 2 cores)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="default: 0 1 2 (quick: 0 1)")
    p.add_argument("--export", metavar="DIR", help="also export each first-seed model to DIR/<data>_<family>.pt")
    p = bench.add_parser("guidance", help="classifier-free and classifier guidance on digits, per method and scale",
                         description="Samples the shipped digits models guided towards labels 0..9: classifier-free "
                                     "guidance on digits_cond (plain, on a noise interval, with rescale) and classifier "
                                     "guidance of the unconditional model by the noise-aware classifier, at several "
                                     "scales, 20 NFE, 1,000 samples, seeds 0 1 2; records label accuracy, FD, "
                                     "precision, recall and per-class diversity. --quick: fewer scales, 200 samples, "
                                     "10 NFE, one seed.")
    _bench_arguments(p, "a small run for checking", datasets=False, devices=None,
                     samples_help="samples per configuration (default 1,000; quick 200)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="noise seeds (default: 0 1 2; quick: 0)")
    p = bench.add_parser("kernels", help="fused Triton kernels vs eager vs torch.compile; CUDA-graph sampling",
                         description="Checks every Triton kernel against its torch reference (in Triton's "
                                     "interpreter on a CPU), then times each op at several sizes for the eager "
                                     "reference, torch.compile and Triton (CUDA only) as ms, GB/s and the fraction "
                                     "of the copy bandwidth measured in the same run; then the digits UNet's "
                                     "sampling loop eager, compiled and as a CUDA graph (CUDA only). --quick: one "
                                     "size, eager (and Triton) only.")
    _bench_arguments(p, "one size and no torch.compile (under a minute on 2 cores)", datasets=False,
                     devices=("cuda", "cpu"), device_default="cuda when available")
    p = bench.add_parser("lessons", help="time every lesson in full mode (the README's column)",
                         description="Executes every source lesson start to finish in a fresh kernel, one after the "
                                     "other, in full mode (--quick: quick mode), and prints each one's time and the "
                                     "README's column. The notebooks are not written. Full mode: about 27 minutes "
                                     "on 2 quiet CPU cores.")
    _bench_arguments(p, "time quick mode instead", datasets=False, devices=None)
    p.add_argument("--lessons", nargs="+", type=int, metavar="N", help="only these lesson numbers")
    p = bench.add_parser("export", help="an exported diffusers pipeline's FD against the course's default call",
                         description="Exports the shipped digits UNet with export_pipeline (clipped and not), samples "
                                     "1,000 digits with DDPMPipeline at 10 and 20 steps, and compares FD with the "
                                     "course's default call at the same NFE and noise seed; then runs diffusers' "
                                     "Karras sigmas on the same schedule as a pipeline does and with "
                                     "set_begin_index(0). About a minute on 2 cores; --quick: 200 samples.")
    _bench_arguments(p, "200 samples", datasets=False, devices=None)
    p = bench.add_parser("threads", help="CPU threading settings timed on a quiet machine and beside other processes",
                         description="Times one training step of the digits UNet and the ring8 MLP in a fresh process "
                                     "per setting (torch's default, passive OpenMP waiting, cores - 1, both, one "
                                     "thread), on a quiet machine, beside a busy loop and beside a second training "
                                     "process, in 3 interleaved rounds, and names the best static setting: the "
                                     "smallest slowdown beside another process among the settings within 10% of the "
                                     "best on a quiet machine. About 8 minutes on 2 cores; --quick: ring8 only, one "
                                     "round.")
    _bench_arguments(p, "ring8 only, one round (about a minute)", datasets=False, devices=None)
    p = bench.add_parser("bf16", help="bf16 autocast against fp32 for CPU training: sample quality and speed",
                         description="Trains the digits and ring8 presets in fp32 and under bf16 autocast from the "
                                     "same seed, steps and data, for seeds 0 1 2, samples each from the same noise "
                                     "(DPM-Solver++(2M), 20 NFE) and compares FD (digits) and sliced Wasserstein "
                                     "distance (ring8) with fp32's seed spread, and the training time (about 40 "
                                     "minutes on 2 CPU cores). --quick: 30 and 150 steps, one seed, 200 samples.")
    _bench_arguments(p, "a small run for checking (about a minute)", datasets=False, devices=None,
                     samples_help="samples scored per run (default 1,000; quick 200)")
    p = bench.add_parser("exercises", help="calibrate the exercises graded on a training run: pass rates and times",
                         description="Runs the exercises graded on a training run or a loop (the RePaint loop; the "
                                     "conditional (label dropout), autoencoder, flow-matching, masked-diffusion and "
                                     "EDM steps; the contrastive loss): each reference on 20 "
                                     "fresh tasks, honest variants in other styles on 10, each known mistake on 5 "
                                     "and each shortcut on 3, one CPU thread per check; records every verdict, "
                                     "whether the mistake's own hint was shown, the seconds, and what the judge "
                                     "measured (about 10 minutes with --jobs 2). --quick: one or two tasks each.")
    _bench_arguments(p, "one or two tasks each (about a minute)", datasets=False, devices=None)
    _jobs_argument(p, 2, "checks")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these exercises only (default: all it calibrates)")
    p = bench.add_parser("capstone", help="calibrate the capstone's check: adherence of the reference and the mistakes",
                         description="Runs the capstone's check (train a small text-to-shapes network with the parts, "
                                     "sample fresh prompts, judge colour and shape) for the reference parts on 20 "
                                     "tasks, other honest parts on 5, each known mistake on 3 and each shortcut on 2, "
                                     "one CPU thread per check (about a minute each: 20 minutes with --jobs 2). "
                                     "--quick: one or two tasks each.")
    _bench_arguments(p, "one or two tasks each (a few minutes)", datasets=False, devices=None)
    _jobs_argument(p, 2, "checks")
    p = bench.add_parser("t2i", help="text-to-image: latent vs pixel, per guidance scale, NFE and sampler",
                         description="Generates images for shapes test prompts (one object, two objects, held-out "
                                     "colour-shape pairs) with the shipped latent (shapes_ldm) and pixel "
                                     "(shapes_pixel) models, per guidance scale, NFE and sampler; records prompt "
                                     "adherence per attribute (the shipped attribute classifier), binding, FD and "
                                     "seconds, and each model's training cost per step (about 15 minutes on 2 CPU "
                                     "cores). --quick: two scales at 10 NFE, 100 prompts (about 2 minutes).")
    _bench_arguments(p, "a small run for checking", datasets=False, devices=None,
                     samples_help="prompts per configuration (default 500; quick 100)")
    p = bench.add_parser("arch", help="lesson 8: DiT vs UNet on digits at matched parameters; a DiT scaling sweep",
                         description="Tunes the learning rate of lesson 4's digits UNet and of a DiT of its size "
                                     "alike, then trains both (three seeds, equal steps; the DiT also for the UNet's "
                                     "wall time) and a DiT sweep (three sizes at patch 2, patch 1) with lesson 4's "
                                     "budget; records FD, precision, recall, parameters, FLOPs and seconds (about "
                                     "30 minutes on 2 CPU cores with --jobs 2). --quick: 30 steps, one seed.")
    _bench_arguments(p, "a small run for checking", datasets=False, devices=None,
                     samples_help="samples scored per run (default 1000; quick 200)")
    _jobs_argument(p, 1, "runs")
    p = bench.add_parser("recipe", help="lesson 11: lesson 2's recipe to EDM's, one change at a time, on digits",
                         description="Trains lesson 2's digits UNet with lesson 2's budget under each recipe (lesson 2; "
                                     "+ EDM preconditioning; + EDM loss weighting; + log-normal noise = EDM; EDM with "
                                     "EDM2's learned weighting; lesson 2 with v-prediction), each chained recipe's "
                                     "learning rate tuned alike on a seed the comparison does not use, three seeds "
                                     "each, EDM also at half the steps; FD at 10 and 35 NFE, from sigma 80 and (eps "
                                     "and v models) from the schedule's top; post-hoc EMA lengths (about 90 minutes "
                                     "on 2 CPU cores with --jobs 2). --quick: 30 steps, one seed.")
    _bench_arguments(p, "a small run for checking", datasets=False, devices=None,
                     samples_help="samples scored per model and setting (default 1000; quick 200)")
    _jobs_argument(p, 1, "runs")
    p.add_argument("--export-dir", metavar="DIR", help="also write the first seed's EDM and v models there (as data/ "
                                                        "ships them: digits_edm.pt, digits_v.pt)")
    p = bench.add_parser("resolution", help="lesson 11: the resolution shift, trained on shapes at 16x16 and 32x32",
                         description="Trains one UNet with EDM's recipe on the shapes images at 32x32 and at 16x16 "
                                     "(2x2 averages), each with EDM's training sigmas and with them doubled (the "
                                     "resolution shift), three seeds each, the same network, batch, steps and rate "
                                     "everywhere; FD on the attribute classifier's features at 10 and 35 NFE (about "
                                     "45 minutes on 2 CPU cores with --jobs 2). --quick: 30 steps, one seed.")
    _bench_arguments(p, "a small run for checking", datasets=False, devices=None,
                     samples_help="samples scored per model and setting (default 1000; quick 100)")
    _jobs_argument(p, 1, "runs")
    p = bench.add_parser("fewstep", help="lesson 12: few-step students of the digits EDM teacher and of the "
                                         "text-to-shapes model at 1, 2, 4 NFE",
                         description="Trains lesson 12's students of the shipped digits EDM teacher (consistency "
                                     "distillation, consistency training from its weights, progressive distillation "
                                     "32 -> 1 steps, distillation with a discriminator) on seeds 0 1 2 through the "
                                     "training loop; FD, precision and recall on the digits classifier's features at 1, "
                                     "2 and 4 NFE against the teacher at 20 NFE with its card's sampler, on the same "
                                     "noise; then the latent consistency model of lesson 7's shapes_ldm (guidance w = 3 "
                                     "folded in) at 1, 2 and 4 calls against the guided teacher at 1, 2, 4 and 20 NFE: "
                                     "prompt adherence and binding from the attribute classifier; training cost in "
                                     "teacher evaluations and minutes (about two hours on 2 CPU cores with --jobs 2). "
                                     "--quick: 10 steps (per round), one seed.")
    _bench_arguments(p, "a small run for checking", datasets=False, devices=None,
                     samples_help="digits samples scored per model and budget (default 1000; quick 100); "
                                  "text-to-shapes prompts of each kind (default 500; quick 100)")
    _jobs_argument(p, 1, "runs")
    p.add_argument("--export-dir", metavar="DIR", help="also write seed 0's students there (as data/ ships "
                                                        "them: digits_cd.pt, digits_ct.pt, digits_pd.pt, digits_add.pt, "
                                                        "shapes_lcm.pt)")
    _seeds_and_resume(p)
    _seeded_bench(bench, "adapt", help="lesson 13: LoRA, five images, textual inversion, ControlNet, inversion",
                  description="Adapts lesson 7's shapes_ldm on seeds 0 1 2: LoRA of rank 1, 4, 8 on 200 images of "
                              "a new shape (a star) measured along 800 steps; the star from five images four "
                              "ways at 400 steps (LoRA, LoRA with DreamBooth's prior loss, textual inversion, "
                              "every UNet weight with the prior); fidelity read by the shipped star judge and "
                              "lesson 7's adherence on its own prompts against the model before; a ControlNet "
                              "on layout maps (IoU of the object with the map against the plain model); DDIM "
                              "inversion of held-out images (PSNR at 10-100 steps, with and without guidance) "
                              "and colour edits. --quick: a few steps of each, one seed.",
                  samples_help="test prompts of each kind and held-out images (default 200; quick 16)")
    p = _seeded_bench(bench, "beyond", help="lesson 15: a diffusion policy against regression; notes from noise",
                      description="Trains lesson 15's diffusion policy (DDPM on the expert's action chunks given the "
                                  "position) and the regression policy (the same network, data and budget) on seeds 0 "
                                  "1 2 through the training loop, and rolls each out on the reaching task: success "
                                  "from the task's starts and from START exactly, against the executed horizon, and "
                                  "for the diffusion policy against its sampler's steps, levels and clipping; then the "
                                  "notes preset (a 1D UNet on synthetic notes) judged by pitch and purity against a "
                                  "Gaussian with the notes' mean and covariance. --quick: 30 steps, 20 episodes, 40 "
                                  "notes, one seed.",
                      samples_help="episodes per policy and setting (default 400; quick 20)")
    p.add_argument("--export-dir", metavar="DIR", help="also write seed 0's diffusion policy there (as data/ ships "
                                                        "it: reaching_diffusion.pt)")
    _seeded_bench(bench, "evaluation", help="lesson 14: metrics' bias and blind spots, CLIPScore, memorisation, erasure",
                  description="How FD, KID, precision / recall and density / coverage behave on real digits (against n, "
                              "under blur, noise and dropped classes, in three feature spaces, 3 resamplings); "
                              "CLIPScore against the attribute judge across guidance scales; the digits preset "
                              "trained on a set with digits repeated 10 and 100 times, its copies after 1,000-4,000 "
                              "steps (seeds 0 1 2), and the shipped digits models' copies; ESD erasing 'red' from "
                              "lesson 7's model, as published and with preservation. --quick: a few steps of each.",
                  samples_help="test prompts of each kind (default 200; quick 12)")
    p = bench.add_parser("terminal", help="lesson 11: lesson 7's latent model from pure noise, eps against v",
                         description="Trains lesson 7's latent text-to-shapes model with the shipped model's budget "
                                     "predicting eps and predicting v (three seeds each) and generates lesson 7's "
                                     "one-object test prompts (scale 3, DPM-Solver++(2M), 20 NFE) from sigma 20 and "
                                     "from the top of the schedule (sigma 20,291), latents unclipped; adherence and FD "
                                     "from the attribute classifier (about 25 minutes on 2 CPU cores with --jobs 2). "
                                     "--quick: 20 steps on 400 images, one seed.")
    _bench_arguments(p, "a small run for checking", datasets=False, devices=None,
                     samples_help="prompts per model and start (default 500; quick 50)")
    _jobs_argument(p, 1, "runs")
    p = bench.add_parser("flow", help="lesson 9: diffusion vs flow matching vs reflow at equal NFE; ODE likelihoods",
                         description="Samples the shipped diffusion, flow-matching, reflow and one-step models of "
                                     "ring8 and grid25 (and digits: diffusion vs flow) with Euler, Heun and "
                                     "DPM-Solver++(2M) at NFE 1 to 50, each family on its own tuned noise levels and "
                                     "on uniform spacing, for noise seeds 0 1 2; records quality (hq and modes; FD for "
                                     "digits), path straightness, and the exact ODE negative log-likelihood beside the "
                                     "variational bound and the true NLL (about 25 minutes on 2 CPU cores). --quick: "
                                     "ring8, 500 samples, one seed (well under a minute).")
    _bench_arguments(p, "a small run for checking", datasets=False, devices=None,
                     samples_help="samples per configuration (default 2,000 points or 1,000 digits; quick 500)")
    p.add_argument("--datasets", nargs="+", metavar="NAME",
                   help="run only these (ring8 grid25 digits); with --json and --force an existing file keeps the "
                        "other datasets' records (to rerun one dataset after retraining its models)")
    p = bench.add_parser("grader", help="the grader: what it adds to a graded call; submissions per minute per core",
                         description="Times ordinary torch functions called directly and called as the grader's worker "
                                     "calls a learner's function (its alarm, copies, audit hook), in a fresh process; "
                                     "then grades the source lessons as one batch with --jobs N and reports submissions "
                                     "per minute per core (about 4 minutes on 2 CPU cores). --quick: fewer repeats, "
                                     "lessons 0, 1 and 3.")
    _bench_arguments(p, "a small run for checking (about a minute)", datasets=False, devices=None)
    p.add_argument("--jobs", type=int, metavar="N", help="submissions graded at once (default: every core)")
    p = bench.add_parser("text", help="lesson 10: masked diffusion vs autoregressive captions; bits per token",
                         description="Samples the shipped masked-diffusion (captions_mdlm) and autoregressive "
                                     "(captions_ar) caption models, and the exact denoiser of the training corpus: "
                                     "validity, distinct and unseen captions per unmasking order (random, confidence, "
                                     "ancestral) and step count 1 to 50 with wall time, for seeds 0 1 2; bits per "
                                     "token on test captions (the diffusion bound, the AR model's exact NLL); "
                                     "infilling the middle of test captions (about 2 minutes on 2 CPU cores). "
                                     "--quick: 200 samples, 3 step counts, one seed (seconds).")
    _bench_arguments(p, "a small run for checking", datasets=False, devices=None,
                     samples_help="captions per configuration (default 1,000; quick 200)")
