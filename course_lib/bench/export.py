"""Does an exported diffusers pipeline sample as well as the course? FD of the shipped digits UNet exported with
`export_pipeline` and sampled by `DDPMPipeline.__call__`, with and without clipping, against the course's default
call at the same NFE, same noise seed (`python -m course_lib bench export`); and diffusers' Karras-sigmas crash."""
from __future__ import annotations

import tempfile
import time

import torch


def pipeline_records(n: int = 1000, nfes=(10, 20), seed: int = 0) -> list[dict]:
    """One record per (what, NFE): FD to the training digits at n samples, and seconds."""
    import diffusers

    from .. import samplers as S
    from ..checkpoints import load_pretrained
    from ..diffusers_bridge import export_pipeline
    from .samplers import Judge

    diffusers.utils.logging.disable_progress_bar()  # no "Loading pipeline components" bars
    pre, judge, records = load_pretrained("digits"), Judge("digits", n), []
    for clip in (True, False):
        folder = tempfile.mkdtemp(prefix="course-export-") + "/digits"
        export_pipeline(pre.model, pre.schedule, folder, image_size=8, clip=clip)
        pipe = diffusers.DDPMPipeline.from_pretrained(folder, low_cpu_mem_usage=False)
        pipe.set_progress_bar_config(disable=True)
        for nfe in nfes:
            start = time.perf_counter()
            images = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=nfe,
                          output_type="np").images
            x = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
            records.append({"what": f"exported pipeline, {'clipped' if clip else 'not clipped'}", "nfe": nfe,
                            "fd": judge(x)["fd"], "seconds": round(time.perf_counter() - start, 2), "samples": n})
    for nfe in nfes:
        start = time.perf_counter()
        z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            out = S.sample(pre.model, z, pre.schedule, steps=nfe, clip=1.0, generator=torch.Generator().manual_seed(1))
        records.append({"what": "course default call", "nfe": out.nfe, "fd": judge(out.x)["fd"],
                        "seconds": round(time.perf_counter() - start, 2), "samples": n})
    return records


SPACINGS = {"linspace": {}, "leading": {"timestep_spacing": "leading"}, "trailing": {"timestep_spacing": "trailing"},
            "karras": {"use_karras_sigmas": True}, "lu lambdas": {"use_lu_lambdas": True},
            "exponential": {"use_exponential_sigmas": True}}


def spacing_records(n: int = 1000, nfe: int = 10, seed: int = 0) -> list[dict]:
    """The exported scheduler (DPM-Solver++(2M), clipped) with each of diffusers' spacings, through diffusers' own step
    loop (with set_begin_index(0), so that Karras runs): FD at n samples. Why the export uses "leading"."""
    from ..checkpoints import load_pretrained
    from ..diffusers_bridge import to_diffusers_scheduler
    from .samplers import Judge

    pre, judge, records = load_pretrained("digits"), Judge("digits", n), []
    for name, options in SPACINGS.items():
        sched = to_diffusers_scheduler(pre.schedule, clip=True, **options)
        sched.set_timesteps(nfe)
        sched.set_begin_index(0)
        x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(pre.model(x, t.expand(n).long()), t, x).prev_sample
        records.append({"spacing": name, "nfe": nfe, "fd": judge(x.clamp(-1, 1))["fd"], "samples": n})
    return records


def karras_crash(nfe: int = 10) -> dict:
    """diffusers' DPMSolverMultistepScheduler with use_karras_sigmas on the shipped digits schedule (cosine): Karras
    sigmas up to the schedule's largest map to repeated integer timesteps (999, 999, ...); the scheduler then looks up
    its step index by timestep, takes the second match, and steps past its last sigma. What happens with and without
    `set_begin_index(0)` (which makes it count steps instead)."""
    import diffusers

    from ..checkpoints import load_pretrained
    from ..diffusers_bridge import to_diffusers_scheduler

    pre = load_pretrained("digits")
    out = {"diffusers": diffusers.__version__, "nfe": nfe}
    for fix in (False, True):
        sched = to_diffusers_scheduler(pre.schedule, clip=True, use_karras_sigmas=True)
        sched.set_timesteps(nfe)
        out["timesteps"] = [int(t) for t in sched.timesteps]
        if fix:
            sched.set_begin_index(0)
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
        try:
            with torch.no_grad():
                for t in sched.timesteps:
                    x = sched.step(pre.model(x, t.expand(4).long()), t, x).prev_sample
            out["with set_begin_index(0)" if fix else "as a pipeline runs it"] = "ran"
        except IndexError as e:
            out["with set_begin_index(0)" if fix else "as a pipeline runs it"] = f"IndexError: {e}"
    return out


def main_export(quick: bool, json_path, force: bool) -> int:
    from ..checkpoints import write_json_atomic
    from . import refuse_to_overwrite

    refuse_to_overwrite(json_path, force)
    records = pipeline_records(n=200 if quick else 1000)
    for r in records:
        print(f"{r['what']:<34} {r['nfe']:>3} NFE: FD {r['fd']:8.2f} ({r['samples']} samples, {r['seconds']:.1f} s)")
    spacings = spacing_records(n=200 if quick else 1000)
    print("the exported scheduler's spacings at 10 NFE: "
          + ", ".join(f"{r['spacing']} FD {r['fd']:.2f}" for r in spacings))
    crash = karras_crash()
    print(f"diffusers {crash['diffusers']}, Karras sigmas at {crash['nfe']} steps (timesteps {crash['timesteps']}): "
          f"as a pipeline runs it: {crash['as a pipeline runs it']}; with set_begin_index(0): "
          f"{crash['with set_begin_index(0)']}")
    if json_path:
        write_json_atomic({"records": records, "spacings": spacings, "karras": crash,
                           "command": "python -m course_lib bench export" + (" --quick" if quick else "")},
                          json_path, replace=force)
        print(f"Wrote {json_path}")
    return 0
