"""Random valid schedules (hypothesis) and plain reference checks for the schedule tests."""

import random
from collections import defaultdict

from hypothesis import strategies as st

from jaxpp.schedules import Action, Costs, Kind, Schedule

K = Kind


def reference_needs(schedule: Schedule) -> dict[Action, list[Action]]:
    """The dependency rules written out plainly, independent of jaxpp.schedules._deps."""
    present = {a for row in schedule.actions for a in row}
    return _needs(schedule.num_stages, present)


def _needs(num_stages: int, present: set[Action]) -> dict[Action, list[Action]]:
    needs: dict[Action, list[Action]] = {}
    for a in present:
        if a.kind is K.FORWARD:
            needs[a] = [Action(a.stage - 1, K.FORWARD, a.mb)] if a.stage > 0 else []
        elif a.kind is K.WEIGHT_GRAD:
            needs[a] = [Action(a.stage, K.INPUT_GRAD, a.mb)]
        else:
            needs[a] = [Action(a.stage, K.FORWARD, a.mb)]
            if a.stage + 1 < num_stages:
                full = Action(a.stage + 1, K.BACKWARD, a.mb)
                needs[a].append(
                    full if full in present else Action(a.stage + 1, K.INPUT_GRAD, a.mb)
                )
    return needs


def reference_start_times(schedule: Schedule, costs: Costs) -> dict[Action, float] | None:
    """Start times by Kahn's algorithm over deps + rank order; None if there is a cycle."""
    needs = reference_needs(schedule)
    edges: dict[Action, list[tuple[Action, float]]] = defaultdict(list)  # before -> (after, lag)
    indegree = {a: 0 for a in needs}
    for a, deps in needs.items():
        for d in deps:
            lag = (
                costs.transfer if schedule.placement[d.stage] != schedule.placement[a.stage] else 0
            )
            edges[d].append((a, lag))
            indegree[a] += 1
    for row in schedule.actions:
        for before, after in zip(row, row[1:], strict=False):
            edges[before].append((after, 0.0))
            indegree[after] += 1
    start = {a: 0.0 for a in needs}
    queue = [a for a, n in indegree.items() if n == 0]
    done = 0
    while queue:
        a = queue.pop()
        done += 1
        end = start[a] + costs.duration(a)
        for b, lag in edges[a]:
            start[b] = max(start[b], end + lag)
            indegree[b] -= 1
            if indegree[b] == 0:
                queue.append(b)
    return start if done == len(needs) else None


def critical_path(schedule: Schedule, costs: Costs) -> float:
    """Longest dependency chain (durations + transfers), ignoring rank order."""
    needs = reference_needs(schedule)
    memo: dict[Action, float] = {}

    def finish(a: Action) -> float:
        if a not in memo:
            ready = 0.0
            for d in needs[a]:
                lag = (
                    costs.transfer
                    if schedule.placement[d.stage] != schedule.placement[a.stage]
                    else 0
                )
                ready = max(ready, finish(d) + lag)
            memo[a] = ready + costs.duration(a)
        return memo[a]

    return max((finish(a) for a in needs), default=0.0)


def random_valid_schedule(rng: random.Random) -> Schedule:
    """A complete schedule whose per-rank orders come from one random topological order."""
    num_stages = rng.randint(1, 5)
    num_ranks = rng.randint(1, num_stages)
    placement = [s % num_ranks for s in range(num_stages)]
    rng.shuffle(placement)
    m = rng.randint(1, 4)
    split = {(s, mb): rng.random() < 0.5 for s in range(num_stages) for mb in range(m)}
    actions = []
    for (s, mb), is_split in split.items():
        actions.append(Action(s, K.FORWARD, mb))
        if is_split:
            actions += [Action(s, K.INPUT_GRAD, mb), Action(s, K.WEIGHT_GRAD, mb)]
        else:
            actions.append(Action(s, K.BACKWARD, mb))
    rows: list[list[Action]] = [[] for _ in range(num_ranks)]
    needs = _needs(num_stages, set(actions))
    done: set[Action] = set()
    pending = set(actions)
    while pending:
        ready = sorted(a for a in pending if all(d in done for d in needs[a]))
        pick = rng.choice(ready)
        pending.remove(pick)
        done.add(pick)
        rows[placement[pick.stage]].append(pick)
    return Schedule(num_stages, m, tuple(placement), tuple(tuple(r) for r in rows))


valid_schedules = st.randoms(use_true_random=False).map(random_valid_schedule)
random_costs = st.builds(
    Costs,
    forward=st.floats(0.1, 3.0),
    backward=st.floats(0.1, 3.0),
    input_grad=st.floats(0.1, 3.0),
    weight_grad=st.floats(0.1, 3.0),
    transfer=st.floats(0.0, 1.0),
)
