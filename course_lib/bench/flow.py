"""`python -m course_lib bench flow [--quick] [--json PATH]` (lesson 9): diffusion, flow matching, reflow and a one-step
generator on the same data, network and training loop, sampled with the same solvers at equal NFE; the exact
probability-flow ODE likelihood beside the variational bound and the true NLL; path straightness.

Like with like: the diffusion and flow models have the same network, data, batch, steps and learning rate (their
presets differ only in `family`), and their noise levels were tuned by the same command (`tune`, on noise seed 2026,
which this benchmark never uses). Reflow is sampled both uniformly in t, its natural spacing, and on its Euler levels
tuned the same way (the default call); the one-step model uniformly in t.
"""
from __future__ import annotations

import math
import time

import torch

from . import refuse_to_overwrite

MODELS = {"ring8": {"diffusion": "ring8", "flow": "ring8_flow", "reflow": "ring8_reflow", "distilled": "ring8_distilled"},
          "grid25": {"diffusion": "grid25", "flow": "grid25_flow"},
          "digits": {"diffusion": "digits", "flow": "digits_flow"}}
SAMPLERS = ("euler", "heun", "dpmpp_2m")
NFE = {"ring8": (1, 2, 3, 5, 10, 20, 50), "grid25": (1, 2, 3, 5, 10, 20, 50), "digits": (5, 10, 20)}
NFE_QUICK = (2, 10)
SEEDS = (0, 1, 2)            # noise seeds; tuning used 2026 (step_schedules.TUNE_SEED)
NLL_SEED, NLL_POINTS = 777, 500
MODES = {"ring8": 8, "grid25": 25}  # a 2D result counts only with every mode covered: one step of a flow from t = 1
# lands every sample on the data mean, which on grid25 is the centre mode (hq 0.999, one mode of 25)
REFERENCE = {"diffusion": ("ddpm", "uniform", 1000), "flow": ("euler", "uniform", 1000)}


REFLOW_TUNED = ("euler",)  # reflow's card has tuned levels for Euler only (data/README.md): its "auto" elsewhere
# would fall back to uniform in t and repeat the uniform rows


def _spacings(family: str, sampler: str) -> tuple[str, ...]:
    """'auto' is each model's tuned noise levels (its card), 'uniform' uniform timesteps (diffusion) or uniform t (flow).
    The one-step model is sampled uniformly in t only: it was trained at t = 1 alone."""
    if family == "distilled" or (family == "reflow" and sampler not in REFLOW_TUNED):
        return ("uniform",)
    return ("auto", "uniform")


def plan(quick: bool = False, datasets=None) -> list[dict]:
    """Every sampling run: dataset, family, model, sampler, spacing, NFE budget, seed (references first)."""
    runs = []
    for dataset in datasets or (("ring8",) if quick else tuple(MODELS)):
        families = {k: v for k, v in MODELS[dataset].items() if not quick or k in ("diffusion", "flow", "reflow")}
        for seed in SEEDS[:1] if quick else SEEDS:
            for family, name in families.items():
                if family in REFERENCE and dataset != "digits":
                    sampler, spacing, steps = REFERENCE[family]
                    runs.append(dict(dataset=dataset, family=family, model=name, sampler=sampler, spacing=spacing,
                                     budget=100 if quick else steps, seed=seed, reference=True))
                for budget in NFE_QUICK if quick else NFE[dataset]:
                    for sampler in SAMPLERS[::2] if quick else SAMPLERS:
                        if sampler == "heun" and budget == 2:
                            continue  # Heun's one step costs 1 evaluation (Euler to 0), two steps cost 3
                        for spacing in _spacings(family, sampler):
                            runs.append(dict(dataset=dataset, family=family, model=name, sampler=sampler,
                                             spacing=spacing, budget=budget, seed=seed, reference=False))
    return runs


def _loaded(name: str, cache: dict):
    from ..checkpoints import load_pretrained

    if name not in cache:
        cache[name] = load_pretrained(name)
    return cache[name]


def run_sampling(run: dict, judge, n: int, cache: dict) -> dict:
    """One sampling run, scored by the benchmark's judge (bench.samplers.Judge)."""
    from ..samplers import sample, steps_for_nfe

    p = _loaded(run["model"], cache)
    shape = (n, 1, 8, 8) if run["dataset"] == "digits" else (n, 2)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(run["seed"]))
    steps = run["budget"] if run["reference"] else steps_for_nfe(run["sampler"], run["budget"])
    res = sample(p.model, noise, p.schedule, run["sampler"], steps=steps, spacing=run["spacing"],
                 clip=1.0 if run["dataset"] == "digits" else None,
                 generator=torch.Generator().manual_seed(run["seed"] + 1))
    return {**run, "kind": "sample", "nfe": res.nfe, "samples": n, "seconds": round(res.seconds, 3),
            "spacing_used": res.spacing, **judge(res.x)}


def likelihood_records(dataset: str, quick: bool = False) -> list[dict]:
    """The true NLL (2D), each model's exact ODE NLL on the same points, and diffusion's variational bound: nats per
    point for 2D; for digits, bits per dimension of the discrete data (ODE: on uniformly dequantised test images)."""
    from ..likelihood import bits_per_dim, dequantise, ode_log_likelihood
    from ..losses import variational_bound

    cache, out = {}, []
    families = {k: v for k, v in MODELS[dataset].items() if k != "distilled" and (not quick or k != "reflow")}
    g = torch.Generator().manual_seed(NLL_SEED)
    if dataset == "digits":
        from ..data import DIGITS_LEVELS, digits_split

        x = digits_split("test")[0][: 8 if quick else None].double()
        x_in, unit = dequantise(x, DIGITS_LEVELS, g), "bits/dim"
        truth = None
    else:
        from ..data import MIXTURES

        mixture = MIXTURES[dataset]()
        x = mixture.sample(30 if quick else NLL_POINTS, g).double()
        x_in, unit = x, "nats per point"
        truth = -mixture.log_prob(x)
        out.append({"kind": "nll", "dataset": dataset, "family": "data", "model": "-", "method": "true density",
                    "nll": round(float(truth.mean()), 4), "nll_stderr": round(float(truth.std() / math.sqrt(len(x))), 4),
                    "unit": unit, "points": len(x)})
    for family, name in families.items():
        p = _loaded(name, cache)
        start = time.perf_counter()
        tol = 1e-4 if dataset == "digits" else 1e-5  # digits: Hutchinson's noise is far above the solver's error
        r = ode_log_likelihood(p.model, x_in, p.schedule, rtol=tol, atol=tol)
        nll = bits_per_dim(r["nll"], 64, DIGITS_LEVELS) if dataset == "digits" else r["nll"]
        rec = {"kind": "nll", "dataset": dataset, "family": family, "model": name, "method": "ode",
               "nll": round(float(nll.mean()), 4), "nll_stderr": round(float(nll.std() / math.sqrt(len(x))), 4),
               "unit": unit, "points": len(x), "nfe": r["nfe"], "seconds": round(time.perf_counter() - start, 1)}
        if truth is not None:  # paired: the same points, so the gap's error is far smaller than either NLL's
            gap = nll - truth
            rec.update(gap_to_true=round(float(gap.mean()), 4), gap_stderr=round(float(gap.std() / math.sqrt(len(x))), 4))
        out.append(rec)
        if family == "diffusion":
            levels = DIGITS_LEVELS if dataset == "digits" else None
            vb = variational_bound(p.model, x.float() if dataset == "digits" else x, p.schedule, levels=levels,
                                   n_t=100 if dataset == "digits" else None, generator=torch.Generator().manual_seed(1))
            vals = vb["bits_per_dim"] if dataset == "digits" else vb["total"]
            out.append({"kind": "nll", "dataset": dataset, "family": family, "model": name,
                        "method": "variational bound", "nll": round(float(vals.mean()), 4),
                        "nll_stderr": round(float(vals.std() / math.sqrt(len(x))), 4), "unit": unit, "points": len(x)})
            if dataset == "digits":  # the reverse model the samplers run: x0 clipped to [-1, 1] (lesson 4, section 7)
                vb = variational_bound(p.model, x.float(), p.schedule, levels=levels, n_t=100, clip=1.0,
                                       generator=torch.Generator().manual_seed(1))
                vals = vb["bits_per_dim"]
                out.append({"kind": "nll", "dataset": dataset, "family": family, "model": name,
                            "method": "variational bound, x0 clipped", "nll": round(float(vals.mean()), 4),
                            "nll_stderr": round(float(vals.std() / math.sqrt(len(x))), 4), "unit": unit,
                            "points": len(x)})
    return out


def straightness_records(dataset: str, quick: bool = False) -> list[dict]:
    """Liu et al.'s straightness of each model's ODE paths, every model seen as a velocity field on one time axis."""
    from ..flow import denoiser_velocity, straightness, t_of_sigma
    from ..samplers import as_denoiser

    cache, out = {}, []
    shape = (64 if quick else 500, 1, 8, 8) if dataset == "digits" else (64 if quick else 500, 2)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    models = {f: n for f, n in MODELS[dataset].items() if f != "distilled" and (not quick or f in ("diffusion", "flow"))}
    dens = {f: as_denoiser(_loaded(n, cache).model, _loaded(n, cache).schedule) for f, n in models.items()}
    # the top that every model knows, at most sigma = 80 (EDM's): near t = 1 a VP model's x0 estimate divides its eps
    # error by sqrt(alpha-bar) (2e-5 at the top of the digits' cosine schedule) and the velocity explodes
    t_max = t_of_sigma(min(80.0, *(d.sigma_max for d in dens.values())))
    for family, den in dens.items():
        s = straightness(denoiser_velocity(den), noise, steps=20 if quick else 100, t_max=t_max)
        out.append({"kind": "straightness", "dataset": dataset, "family": family, "model": models[family],
                    "t_max": round(t_max, 5), "straightness": float(f"{s['straightness']:.4g}"),
                    "relative": float(f"{s['relative']:.4g}")})  # 4 significant digits: reflow's is ~1e-5
    return out


def bench_flow(quick: bool = False, samples: int | None = None, progress: bool = True, datasets=None) -> list[dict]:
    """Every record: sampling runs, likelihoods, straightness."""
    from .samplers import Judge

    runs = plan(quick, datasets)
    cache, judges, records = {}, {}, []
    it = runs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(runs, desc="bench flow")
    for run in it:
        n = samples or (500 if quick else (1000 if run["dataset"] == "digits" else 2000))
        if run["dataset"] not in judges:
            judges[run["dataset"]] = Judge(run["dataset"], n)
        records.append(run_sampling(run, judges[run["dataset"]], n, cache))
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        records += straightness_records(dataset, quick)
        records += likelihood_records(dataset, quick)
    return records


def summarize(records: list[dict], key: str = "hq_fraction") -> list[dict]:
    """Mean and std over seeds of `key` per (dataset, family, sampler, spacing, budget)."""
    from .compare import mean_std

    groups: dict = {}
    for r in records:
        if r.get("kind") == "sample" and key in r:
            groups.setdefault((r["dataset"], r["family"], r["sampler"], r["spacing"], r["budget"]), []).append(r)
    out = []
    for (dataset, family, sampler, spacing, budget), rs in groups.items():
        ms = mean_std(rs, (key,))
        m, s = ms[key], ms[f"{key}_std"]
        out.append(dict(dataset=dataset, family=family, sampler=sampler, spacing=spacing, budget=budget, mean=m,
                        std=s, seeds=len(rs), nfe=rs[0]["nfe"], modes_min=min(r.get("modes_covered", 0) for r in rs),
                        all_modes=all(r.get("modes_covered", 0) == MODES.get(dataset, 0) for r in rs)))
    return out


def best_at(records: list[dict], dataset: str, family: str, budget: int) -> dict | None:
    """The family's best sampler and spacing at a budget (mean over seeds; FD for digits, lower is better; in 2D
    among the configurations that covered every mode on every seed, when there are any)."""
    key = "fd" if dataset == "digits" else "hq_fraction"
    rows = [r for r in summarize(records, key) if r["dataset"] == dataset and r["family"] == family
            and r["budget"] == budget]
    if key == "hq_fraction" and any(r["all_modes"] for r in rows):
        rows = [r for r in rows if r["all_modes"]]
    if not rows:
        return None
    return (min if key == "fd" else max)(rows, key=lambda r: r["mean"])


def verdict(records: list[dict]) -> list[str]:
    """What lesson 9 concludes from the benchmark, one sentence per line with the measured numbers: flow against
    diffusion at 10 NFE, reflow and the distilled model at one and two steps, and the likelihoods."""
    lines = []
    for dataset in ("ring8", "grid25"):
        d, f = best_at(records, dataset, "diffusion", 10), best_at(records, dataset, "flow", 10)
        if d and f:
            gap = 100 * (f["mean"] - d["mean"])
            lines.append(f"{dataset} at 10 NFE, best of each: diffusion {d['mean']:.3f} ({d['sampler']}, {d['spacing']}) "
                         f"vs flow {f['mean']:.3f} ({f['sampler']}, {f['spacing']}): {gap:+.1f} points "
                         f"({'within' if abs(gap) <= 3 else 'outside'} 3); modes {d['modes_min']} / {f['modes_min']}")
    rows = {(r["family"], r["spacing"], r["budget"]): r for r in summarize(records) if r["dataset"] == "ring8"
            and r["sampler"] == "euler"}
    for family, budgets in (("reflow", (1, 2)), ("distilled", (1,))):  # the distilled model is trained for 1 step
        for budget in budgets:
            uniform, tuned = rows.get((family, "uniform", budget)), rows.get((family, "auto", budget))
            if uniform is None:
                continue
            text = (f"ring8 {family}, Euler {budget} NFE: hq {uniform['mean']:.3f} +- {uniform['std']:.3f} uniform in t, "
                    f"modes >= {uniform['modes_min']}")
            if family == "reflow" and tuned:
                text += (f"; on its tuned levels (the default call) {tuned['mean']:.3f} +- {tuned['std']:.3f}, "
                         f"modes >= {tuned['modes_min']}")
            lines.append(text)
    shared = [b for b in sorted({r["budget"] for r in summarize(records) if r["dataset"] == "ring8"}, reverse=True)
              if all(best_at(records, "ring8", f, b) for f in ("diffusion", "flow", "reflow"))]
    if shared:  # the largest budget all three were sampled at (the 1,000-step reference is diffusion's alone)
        top = shared[0]
        best = {f: best_at(records, "ring8", f, top) for f in ("diffusion", "flow", "reflow")}
        if all(best.values()):
            lines.append(f"ring8 at {top} NFE, best of each: diffusion {best['diffusion']['mean']:.3f}, flow "
                         f"{best['flow']['mean']:.3f}, reflow {best['reflow']['mean']:.3f}: reflow "
                         + ("tops out below both" if best["reflow"]["mean"] < min(best["diffusion"]["mean"],
                                                                                   best["flow"]["mean"])
                            else "keeps up with them") + " when steps are plentiful")
    for dataset in ("ring8", "grid25", "digits"):
        nll = {(r["family"], r["method"]): r for r in records if r.get("kind") == "nll" and r["dataset"] == dataset}
        for family in ("diffusion", "flow", "reflow"):
            ode = nll.get((family, "ode"))
            if ode is None:
                continue
            text = f"{dataset} {family}: ODE NLL {ode['nll']:.3f} {ode['unit']}"
            if "gap_to_true" in ode:
                text += f", true {nll[('data', 'true density')]['nll']:.3f} (gap {ode['gap_to_true']:+.3f} +- {ode['gap_stderr']:.3f})"
            bound = nll.get(("diffusion", "variational bound"))
            clipped = nll.get(("diffusion", "variational bound, x0 clipped"))
            if bound:
                text += f", diffusion's variational bound {bound['nll']:.3f}"
            if clipped:
                text += f" ({clipped['nll']:.3f} with its x0 estimate clipped to the data range)"
            lines.append(text)
    return lines


def table(records: list[dict]) -> str:
    """hq (2D) or FD (digits), mean over seeds, per row (dataset, family, sampler, spacing) and NFE budget."""
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in records if r.get("kind") == "sample"):
        key = "fd" if dataset == "digits" else "hq_fraction"
        rows = [r for r in summarize(records, key) if r["dataset"] == dataset]
        budgets = sorted({r["budget"] for r in rows if r["budget"] <= 50})
        lines.append(f"\n{dataset}: {'FD (lower is better)' if key == 'fd' else 'high-quality share'}, mean over seeds")
        lines.append(f"{'family':<10} {'sampler':<9} {'spacing':<8}" + "".join(f"{b:>7} " for b in budgets))
        by = {}
        for r in rows:
            by.setdefault((r["family"], r["sampler"], r["spacing"]), {})[r["budget"]] = (r["mean"], r["all_modes"])
        if key == "hq_fraction":
            lines[-1] += " (* = some mode missed on some seed)"
        for (family, sampler, spacing), cells_by in by.items():
            cells = "".join(f"{cells_by[b][0]:>7.{1 if key == 'fd' else 3}f}"
                            f"{' ' if key == 'fd' or cells_by[b][1] else '*'}" if b in cells_by else " " * 8
                            for b in budgets)
            vals = {b: v for b, (v, _) in cells_by.items()}
            ref = [f"{v:.{1 if key == 'fd' else 3}f} at {b}" for b, v in vals.items() if b > 50]
            lines.append(f"{family:<10} {sampler:<9} {spacing:<8}{cells}" + (f"   (reference {ref[0]})" if ref else ""))
    return "\n".join(lines)


def main_flow(quick: bool = False, json_path=None, samples: int | None = None, force: bool = False,
              datasets=None) -> list[dict]:
    """Run the benchmark; print the table, straightness and the verdict; with json_path write the records. With
    datasets, only those run, and an existing json_path (replaced only with force) keeps the other datasets' records."""
    import json
    from pathlib import Path

    from ..checkpoints import write_json_atomic

    refuse_to_overwrite(json_path, force)
    if datasets is not None and not set(datasets) <= set(MODELS):
        raise ValueError(f"datasets must be among {list(MODELS)}, got {datasets}")
    kept = []
    if datasets and json_path and Path(json_path).exists():
        kept = [r for r in json.loads(Path(json_path).read_text()) if r.get("dataset") not in datasets]
    order = list(MODELS)  # the full run's order: every sampling run by dataset, then each dataset's other records
    records = sorted(kept + bench_flow(quick, samples, datasets=datasets),
                     key=lambda r: (r.get("kind") != "sample", order.index(r["dataset"]) if r.get("dataset") in order
                                    else len(order)))
    print(table(records))
    for r in records:
        if r["kind"] == "straightness":
            print(f"straightness {r['dataset']} {r['family']}: {r['straightness']:.3g} (relative {r['relative']:.3g})")
    print("\n".join(verdict(records)))
    if json_path:
        write_json_atomic(records, json_path)
        print(f"wrote {json_path}")
    return records
