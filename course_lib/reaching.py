"""Lesson 15's control task, Diffusion Policy in miniature (Chi et al. 2023): a point in the plane must reach a goal
around a round obstacle, and a scripted expert goes round it on the left or on the right, equally often. Two equally
good solutions are what a policy that regresses the mean action cannot represent. Here: the task's geometry, the
expert's demonstrations cut into action chunks, and a vectorised receding-horizon rollout that scores any policy."""
from __future__ import annotations

import torch

START = (0.0, -1.0)      # where every episode starts (plus START_NOISE)
GOAL = (0.0, 1.0)
OBSTACLE = (0.0, 0.0)    # the obstacle's centre ...
RADIUS = 0.35            # ... and radius: touching it ends the episode as a failure
GOAL_RADIUS = 0.1        # success: within this distance of the goal
MAX_STEP = 0.08          # the longest move one action may make (longer actions are shortened to it)
MAX_STEPS = 60           # moves per episode
START_NOISE = 0.01       # the start's standard deviation (each coordinate): about a quarter of the expert's first sideways move
WAYPOINT_X = 0.6         # the expert passes the obstacle at (+-WAYPOINT_X, 0)
EXPERT_NOISE = 0.01      # the expert's own jitter per move (each coordinate)
CHUNK = 8                # actions per chunk the policy predicts (H in Chi et al.) ...
EXECUTE = 4              # ... of which a receding-horizon rollout executes this many before predicting again


def clip_actions(actions: torch.Tensor) -> torch.Tensor:
    """Each move (last dimension 2) shortened to at most MAX_STEP, its direction kept."""
    norm = actions.norm(dim=-1, keepdim=True)
    return actions * (MAX_STEP / norm.clamp_min(MAX_STEP))


def hits_obstacle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether the segment from a to b (each (..., 2)) comes within RADIUS of the obstacle's centre: the distance from
    the centre to the nearest point of the segment, by projection clamped to the segment."""
    c = torch.tensor(OBSTACLE, dtype=a.dtype)
    d = b - a
    t = (((c - a) * d).sum(-1) / (d * d).sum(-1).clamp_min(1e-12)).clamp(0, 1)
    return (a + t[..., None] * d - c).norm(dim=-1) < RADIUS


def expert_episode(start: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """The expert's moves (MAX_STEPS, 2) from `start`: straight to the waypoint on its side (-1 left, +1 right), then
    straight to the goal, at full speed with a little jitter; zero moves once at the goal."""
    if side not in (-1, 1):
        raise ValueError(f"side must be -1 (left) or +1 (right), got {side!r}")
    pos, goal = start.clone().double(), torch.tensor(GOAL, dtype=torch.float64)
    waypoint = torch.tensor((side * WAYPOINT_X, OBSTACLE[1]), dtype=torch.float64)
    moves, passed = [], False
    for _ in range(MAX_STEPS):
        passed = passed or (pos - waypoint).norm() < MAX_STEP or pos[1] > waypoint[1]
        target = goal if passed else waypoint
        gap = target - pos
        if passed and gap.norm() < GOAL_RADIUS / 2:
            move = torch.zeros(2, dtype=torch.float64)
        else:
            move = gap / gap.norm() * min(MAX_STEP, float(gap.norm()))
            move = clip_actions(move + EXPERT_NOISE * torch.randn(2, generator=generator, dtype=torch.float64))
        moves.append(move)
        pos = pos + move
    return torch.stack(moves).float()


def normalise_chunks(chunks: torch.Tensor) -> torch.Tensor:
    """Chunks of moves (N, CHUNK, 2) as a network sees them: flat (N, 2 * CHUNK), each coordinate in [-1, 1] (divided
    by MAX_STEP, as Chi et al. scale actions to [-1, 1])."""
    if chunks.ndim != 3 or chunks.shape[2] != 2:
        raise ValueError(f"chunks must have shape (N, k, 2), got {tuple(chunks.shape)}")
    return (chunks / MAX_STEP).flatten(1)


def chunks_from(flat: torch.Tensor) -> torch.Tensor:
    """The inverse of normalise_chunks: a network's flat output (N, 2k) as moves (N, k, 2) in the task's units."""
    if flat.ndim != 2 or flat.shape[1] % 2:
        raise ValueError(f"a flat chunk must have shape (N, 2k), got {tuple(flat.shape)}")
    return flat.reshape(len(flat), -1, 2) * MAX_STEP


def starts(n: int, generator: torch.Generator, noise: float | None = None) -> torch.Tensor:
    """n start positions (n, 2): START plus Gaussian noise of standard deviation `noise` (default START_NOISE)."""
    noise = START_NOISE if noise is None else noise
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < 1:
        raise ValueError(f"the start's noise must be a number in [0, 1), got {noise!r}")
    return torch.tensor(START) + noise * torch.randn(n, 2, generator=generator)


def demonstrations(episodes: int = 200, seed: int = 0) -> dict:
    """The expert's episodes, half round each side (shuffled): `observations` (N, 2), the position before each move;
    `chunks` (N, CHUNK, 2), the expert's next CHUNK moves from there (zero moves past the episode's end); `side` per
    row; `paths` (episodes, MAX_STEPS + 1, 2) and `sides` per episode."""
    if not isinstance(episodes, int) or episodes < 2:
        raise ValueError(f"episodes must be an int >= 2 (both sides), got {episodes!r}")
    g = torch.Generator().manual_seed(seed)
    sides = torch.tensor([-1, 1] * (episodes // 2) + [1] * (episodes % 2))[torch.randperm(episodes, generator=g)]
    obs, chunks, row_side, paths = [], [], [], []
    for start, side in zip(starts(episodes, g), sides.tolist()):
        moves = expert_episode(start, side, g)
        path = torch.cat([start[None], start[None] + moves.cumsum(0)])
        padded = torch.cat([moves, torch.zeros(CHUNK, 2)])
        obs.append(path[:-1])
        chunks.append(torch.stack([padded[i:i + CHUNK] for i in range(MAX_STEPS)]))
        row_side.append(torch.full((MAX_STEPS,), side))
        paths.append(path)
    return {"observations": torch.cat(obs), "chunks": torch.cat(chunks), "side": torch.cat(row_side),
            "paths": torch.stack(paths), "sides": sides}


def rollout(policy, episodes: int = 200, seed: int = 0, execute: int = EXECUTE, start_noise: float | None = None) -> dict:
    """Run `policy` on `episodes` episodes at once, receding horizon: at each decision it gets the positions (B, 2)
    and returns action chunks (B, k, 2) with k >= `execute`; the first `execute` moves are made (each clipped to
    MAX_STEP), then it is asked again. An episode ends at the goal (success), on the obstacle (failure) or after
    MAX_STEPS moves (failure). Starts: START plus noise of std `start_noise` (default START_NOISE; 0: every episode
    from START exactly). Returns `success` and `collided` per episode, `steps` taken and the `paths`."""
    if not isinstance(execute, int) or not 1 <= execute <= MAX_STEPS:
        raise ValueError(f"execute must be an int in [1, {MAX_STEPS}], got {execute!r}")
    g = torch.Generator().manual_seed(seed)
    pos = starts(episodes, g, start_noise)
    goal = torch.tensor(GOAL)
    done = torch.zeros(episodes, dtype=torch.bool)
    success, collided = done.clone(), done.clone()
    steps = torch.full((episodes,), MAX_STEPS)
    paths = [pos.clone()]
    t = 0
    while t < MAX_STEPS and not bool(done.all()):
        with torch.no_grad():
            chunk = torch.as_tensor(policy(pos.clone())).float()
        if chunk.ndim != 3 or chunk.shape[0] != episodes or chunk.shape[2] != 2 or chunk.shape[1] < execute:
            raise ValueError(f"the policy must return chunks of shape ({episodes}, k >= {execute}, 2), "
                             f"got {tuple(chunk.shape)}")
        if not torch.isfinite(chunk).all():
            raise ValueError("the policy returned a non-finite action")
        for i in range(min(execute, MAX_STEPS - t)):
            move = torch.where(done[:, None], torch.zeros(2), clip_actions(chunk[:, i]))
            new = pos + move
            hit = ~done & hits_obstacle(pos, new)
            arrived = ~done & ~hit & ((new - goal).norm(dim=-1) < GOAL_RADIUS)
            collided |= hit
            success |= arrived
            steps = torch.where((hit | arrived) & ~done, torch.tensor(t + i + 1), steps)
            done |= hit | arrived
            pos = torch.where(hit[:, None], pos, new)  # a collision stops the point where it was
            paths.append(pos.clone())
        t += execute
    return {"success": success, "collided": collided, "steps": steps, "paths": torch.stack(paths, 1)}


def expert_policy(side: int | None = None, generator: torch.Generator | None = None):
    """A policy from the expert's rule, for testing the rollout: round `side` (or the side the point is already on,
    right at x = 0), CHUNK moves of the expert's plan from the current position."""
    g = generator or torch.Generator().manual_seed(0)

    def policy(pos):
        out = []
        for p in pos:
            s = side if side is not None else (1 if float(p[0]) >= 0 else -1)
            plan = expert_episode(p, s, g)[:CHUNK]
            out.append(plan)
        return torch.stack(out)
    return policy


def success_rate(result: dict) -> float:
    """The share of episodes that reached the goal."""
    return float(result["success"].double().mean())


def side_taken(paths: torch.Tensor) -> torch.Tensor:
    """Per path (B, T, 2): -1 when it passed the obstacle's height on the left, +1 on the right, 0 when it never did."""
    below = paths[..., 1] < OBSTACLE[1]
    crossed = ~below[:, 1:] & below[:, :-1]
    first = torch.where(crossed.any(1), crossed.double().argmax(1), torch.tensor(-1))
    x = paths[torch.arange(len(paths)), (first + 1).clamp_min(0), 0]
    return torch.where(first >= 0, torch.sign(x), torch.zeros_like(x)).long()


__all__ = ["CHUNK", "EXECUTE", "chunks_from", "normalise_chunks", "GOAL", "MAX_STEP", "MAX_STEPS", "OBSTACLE", "RADIUS", "clip_actions", "demonstrations",
           "expert_episode", "expert_policy", "hits_obstacle", "rollout", "side_taken", "starts", "success_rate"]
