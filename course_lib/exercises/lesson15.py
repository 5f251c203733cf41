"""Lesson 15: the action-chunk denoising loss of a diffusion policy (graded on values, on a fixed toy noise predictor)
and receding-horizon execution (graded on behaviour: the judge holds the trained policy and the task, watches every
request and move the learner's loop makes, and measures where the points end)."""
from __future__ import annotations

import torch

from ..grading import tasks as _T
from ..grading.oracles import Oracle, OracleRef, as_points
from ..grading.toys import ToyChunkNetwork
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .common import DIFFUSION_LIBRARIES, DIFFUSION_RULE
from .lesson01 import ref_q_sample

# ---- 15.1 the action-chunk denoising loss ---------------------------------------------------------------------------


def ref_chunk_loss(model, chunks, observations, t, noise, alpha_bar, scale):
    """Chi et al. 2023, eq. 5: the simple loss (Ho et al. 2020, eq. 14) on action chunks given the observation. A chunk
    (B, H, 2) of moves becomes one flat sample (B, 2H) in [-1, 1] (divided by `scale`); it is noised to x_t with the
    closed form, and the network, told the observation (y=observations), predicts the noise: the mean squared error."""
    x0 = (chunks / scale).flatten(1)
    return ((noise - model(ref_q_sample(x0, t, alpha_bar, noise), t, y=observations)) ** 2).mean()


def _inputs_chunk_loss(gen):
    b, h = _T._randint(gen, 3, 7), _T._randint(gen, 3, 8)
    T = _T._randint(gen, 20, 200)
    betas = torch.linspace(1e-4, 0.05, T, dtype=torch.float64) * (0.5 + torch.rand(1, generator=gen).double())
    from ..schedules import alpha_bar_from_betas

    scale = round(_T._uniform(gen, 0.05, 0.2), 3)
    return {"model": ToyChunkNetwork(_T._uniform(gen, 0.5, 1.5), T, torch.randn(2, 2 * h, generator=gen)),
            "chunks": (torch.rand(b, h, 2, generator=gen) * 2 - 1) * scale,
            "observations": torch.randn(b, 2, generator=gen), "t": torch.randint(0, T, (b,), generator=gen),
            "noise": torch.randn(b, 2 * h, generator=gen), "alpha_bar": alpha_bar_from_betas(betas).float(),
            "scale": scale}


def _chunk_loss_with(mistake: str):
    def fn(model, chunks, observations, t, noise, alpha_bar, scale):
        c = chunks if mistake == "no scale" else chunks / scale
        x0 = c.transpose(1, 2).flatten(1) if mistake == "coordinates first" else c.flatten(1)
        xt = ref_q_sample(x0, t, alpha_bar, noise)
        y = None if mistake == "no observation" else observations
        pred = model(x0 if mistake == "clean input" else xt, t, y=y)
        target = x0 if mistake == "x0 target" else noise
        return ((target - pred) ** 2).sum() if mistake == "sum" else ((target - pred) ** 2).mean()
    return fn


register(Exercise(
    "chunk_loss", 15, ref_chunk_loss, _inputs_chunk_loss,
    "x0 = (chunks / scale).flatten(1): each chunk of H moves becomes one sample of 2H numbers in [-1, 1], the moves "
    "in order (x, y of the first move, then of the second, ...). Noise it to x_t with q_sample, then return the mean "
    "of (noise - model(x_t, t, y=observations))^2: a scalar.",
    mistakes=((_chunk_loss_with("no scale"), "Divide the chunks by `scale` first"),
              (_chunk_loss_with("coordinates first"), "the moves in order"),
              (_chunk_loss_with("no observation"), "y=observations"),
              (_chunk_loss_with("clean input"), "The network sees the noised x_t"),
              (_chunk_loss_with("x0 target"), "compare with `noise`"),
              (_chunk_loss_with("sum"), "Average over all elements")),
    refused=DIFFUSION_LIBRARIES + ("course_lib.losses", "course_lib.families"), rule=DIFFUSION_RULE))

# ---- 15.2 receding-horizon execution, graded on behaviour ----------------------------------------------------------

SUCCESS_FLOOR = 0.6  # the share of episodes a right loop must bring to the goal with the shipped policy, which reaches
# it in 93-97% of 400 episodes (data/bench_beyond.json): a right loop on 48-96 episodes falls below 0.6 with a
# probability under 1e-12 (binomial); every mistake below is caught by what it asks and does before this is read
_POLICIES: dict = {}


def _policy_network():
    """The shipped diffusion policy's network and schedule, loaded once per process."""
    if "net" not in _POLICIES:
        from ..checkpoints import load_pretrained

        p = load_pretrained("reaching_diffusion")
        _POLICIES["net"] = (p.model, p.schedule)
    return _POLICIES["net"]


def horizon_task(gen: torch.Generator) -> _T.Task:
    """receding_horizon(policy, act, start, execute, max_steps) on 48-96 episodes of the reaching task from fresh starts,
    executing 2-6 moves per chunk; `policy` is the shipped diffusion policy sampling with the judge's noise, `act` the
    task itself (the judge holds where every point is)."""
    from .. import reaching
    from ..policy import DiffusionPolicy

    n, execute = _T._randint(gen, 48, 96), _T._randint(gen, 2, 6)
    start = reaching.starts(n, gen)
    model, schedule = _policy_network()
    plan = DiffusionPolicy(model, schedule, generator=torch.Generator().manual_seed(_T._randint(gen, 0, 2**31 - 2)))
    state = {"pos": start.clone(), "done": torch.zeros(n, dtype=torch.bool), "success": torch.zeros(n, dtype=torch.bool),
             "chunk": None, "since": 0, "acts": 0}
    goal = torch.tensor(reaching.GOAL)

    def ask(positions):
        state["chunk"], state["since"] = plan(positions.float()), 0
        return state["chunk"]

    def move(moves):
        pos, done = state["pos"], state["done"]
        step = torch.where(done[:, None], torch.zeros(2), reaching.clip_actions(moves.float()))
        new = pos + step
        hit = ~done & reaching.hits_obstacle(pos, new)
        arrived = ~done & ~hit & ((new - goal).norm(dim=-1) < reaching.GOAL_RADIUS)
        state["success"] |= arrived
        state["done"] = done | hit | arrived
        state["pos"] = torch.where(hit[:, None], pos, new)
        state["since"] += 1
        state["acts"] += 1
        return state["pos"].clone()

    def seen_at(positions):
        return {"gap": float((positions.float() - state["pos"]).abs().max()), "since": state["since"],
                "first": state["chunk"] is None}

    def moved(moves):
        chunk, i = state["chunk"], state["since"]
        gap = float("inf") if chunk is None or i >= chunk.shape[1] else float((moves.float() - chunk[:, i]).abs().max())
        return {"gap": gap, "index": i, "before_policy": chunk is None}

    policy = Oracle("policy", ask, lambda positions: (as_points(positions, n, "positions"),),
                    reaching.MAX_STEPS, budget_text=f"at most {reaching.MAX_STEPS} requests",
                    note=lambda a: seen_at(a[0]))
    act = Oracle("act", move, lambda moves: (as_points(moves, n, "moves"),), reaching.MAX_STEPS,
                 budget_text=f"at most max_steps = {reaching.MAX_STEPS} moves", note=lambda a: moved(a[0]))
    inputs = {"policy": OracleRef("policy"), "act": OracleRef("act"), "start": start.clone(), "execute": execute,
              "max_steps": reaching.MAX_STEPS}
    return _T.Task([_T.Call(inputs, {"policy": policy, "act": act})],
                   {"state": state, "execute": execute, "n": n, "max_steps": reaching.MAX_STEPS})


def _fail(message: str, hint: str) -> CheckResult:
    return CheckResult("receding_horizon", FAILED, message, hint)


def assess_receding_horizon(task, outputs: list) -> CheckResult | None:
    """Every request made from where the points were; every move the next unexecuted move of the last chunk; exactly
    `execute` moves between requests; the loop ran max_steps moves; the positions returned are where the points are;
    and the policy brought at least SUCCESS_FLOOR of the episodes to the goal."""
    p = task.private
    state, execute, max_steps = p["state"], p["execute"], p["max_steps"]
    asks, acts = task.calls[0].oracles["policy"].log, task.calls[0].oracles["act"].log
    if not acts:
        return _fail("act was never called: the points never moved.", "Ask the policy for a chunk, then call "
                     "act(chunk[:, i]) for its first `execute` moves, and repeat.")
    if acts[0]["before_policy"]:
        return _fail("the first move was made before the policy was asked for a chunk.",
                     "Every move comes from the policy: chunk = policy(positions), then act(chunk[:, 0]), ...")
    far = [a for a in asks if a["gap"] > 1e-5]
    if far:
        return _fail(f"{len(far)} of your {len(asks)} requests to the policy were made from positions that are not where "
                     f"the points were (off by up to {max(a['gap'] for a in far):.3g}).", "Ask from the current "
                     "positions: the ones act returned after the last move (start only for the first request).")
    wrong = [a for a in acts if a["gap"] > 1e-5]
    if wrong:
        return _fail(f"{len(wrong)} of your {len(acts)} moves were not the next move of the last chunk the policy "
                     "returned.", "Execute the chunk's moves in order: chunk[:, 0], chunk[:, 1], ..., chunk[:, execute "
                     "- 1]; the chunk has shape (episodes, H, 2).")
    between = [a["since"] for a in asks if not a["first"]]
    if any(k != execute for k in between):
        k = next(k for k in between if k != execute)
        return _fail(f"you asked the policy again after {k} move{'s' if k != 1 else ''} of a chunk; this task executes "
                     f"{execute} moves of "
                     "each chunk before asking again.", "Receding horizon: execute exactly `execute` moves of each "
                     "chunk (not all H of it, not one), then ask the policy from where the points are.")
    if len(acts) < max_steps:
        return _fail(f"your loop stopped after {len(acts)} moves ({int((~state['done']).sum())} episodes were still "
                     "running).", f"Keep going until max_steps = {max_steps} moves were made (an episode that has "
                     "ended stays where it is).")
    got = outputs[0]
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(state["pos"].shape) or \
            not torch.allclose(got.float(), state["pos"], atol=1e-5):
        return _fail("the positions you returned are not where the points ended.", "Return the positions act "
                     "returned last.")
    rate = float(state["success"].double().mean())
    if rate < SUCCESS_FLOOR:
        return _fail(f"the policy brought {rate:.0%} of the episodes to the goal through your loop (accepted: "
                     f"{SUCCESS_FLOOR:.0%}).", "Check that each move is the chunk's next one and that you ask again "
                     "from the positions act returned.")
    return None


def ref_receding_horizon(policy, act, start, execute, max_steps):
    """Receding-horizon control (Chi et al. 2023, sec. 3.1): ask the policy for a chunk of moves from the current
    positions, execute its first `execute` moves with act (which returns the new positions; an episode that has ended
    stays put), ask again from there, until max_steps moves were made. Returns the final positions."""
    positions, made = start, 0
    while made < max_steps:
        chunk = policy(positions)
        for i in range(min(execute, max_steps - made)):
            positions = act(chunk[:, i])
            made += 1
    return positions


def _horizon_with(mistake: str):
    def fn(policy, act, start, execute, max_steps):
        positions, made, stride = start, 0, {"whole chunk": 8, "every move": 1, "one extra": execute + 1}.get(
            mistake, execute)
        while made < max_steps:
            chunk = policy(start if mistake == "from the start" else positions)
            for i in range(min(stride, chunk.shape[1], max_steps - made)):
                move = chunk[:, chunk.shape[1] - 1 - i] if mistake == "reversed" else chunk[:, i]
                positions = act(move)
                made += 1
            if mistake == "one chunk":
                return positions
        return positions
    return fn


def _own_moves(policy, act, start, execute, max_steps):
    """A shortcut: never asks the policy; steers straight at the goal round the right of the obstacle itself."""
    from .. import reaching

    positions = start
    for _ in range(max_steps):
        target = torch.tensor([reaching.WAYPOINT_X, 0.0]) if float(positions[:, 1].mean()) < 0 else \
            torch.tensor(reaching.GOAL)
        positions = act(target - positions)
    return positions


def _no_moves(policy, act, start, execute, max_steps):
    """A shortcut: asks once and returns the start."""
    policy(start)
    return start


register(Exercise(
    "receding_horizon", 15, ref_receding_horizon, None,
    "positions = start; repeat: chunk = policy(positions); for i in range(execute): positions = act(chunk[:, i]) "
    "(count the moves); stop after max_steps moves. Return positions.",
    mistakes=((_horizon_with("whole chunk"), "after 8 moves"), (_horizon_with("every move"), "after 1 move of"),
              (_horizon_with("one extra"), "moves of a chunk"), (_horizon_with("from the start"), "from positions"),
              (_horizon_with("reversed"), "next move of the last chunk"), (_horizon_with("one chunk"), "stopped after")),
    shortcuts=((_own_moves, "before the policy"), (_no_moves, "never called")),
    trials=3, task=horizon_task, assess=assess_receding_horizon, seconds=120.0, points=2,
    refused=("course_lib.reaching", "course_lib.policy"),
    rule="Write the loop yourself: course_lib.reaching.rollout, which runs it, is not allowed in this exercise.",
    passed_message="the judge watched your loop: every chunk was asked for from where the points were, its first moves "
                   "executed in order, and the policy brought the episodes to the goal through it."))


LIBRARY_EQUIVALENTS.update({
    "chunk_loss": ("course_lib.losses.diffusion_loss",),
    "receding_horizon": ("course_lib.reaching.rollout",),
})
