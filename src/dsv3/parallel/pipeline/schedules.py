"""Pipeline schedules as plain data: for every rank, the ordered compute operations of one step.

An ``Op`` names a chunk (global chunk index g, see partition.py) and a micro-batch m:

* ``F``  forward of chunk g on micro-batch m
* ``B``  backward of chunk g; ``split=True`` computes only the input gradient (the weights' part is a
         later ``W`` of the same (g, m)), ``split=False`` is the full backward
* ``W``  the deferred weight gradient of (g, m)

Overlapped forward/backward pairs (DualPipe's F&B) are an ``F`` immediately followed by a ``B`` with
``pair=True`` on the B: a runtime may run the two on separate streams, the simulator charges them the
F&B cost. Communication is implied by the ops: F(g, m) needs chunk g-1's output for m (a recv when
another rank ran it), B(g, m) needs chunk g+1's input gradient for m. Everything here is pure Python, so
tests can check the dependency order and the bubble without torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsv3.errors import UserError
from dsv3.parallel.pipeline.partition import check_schedule, chunk_owner, num_chunks


@dataclass(frozen=True)
class Op:
    kind: str          # "F", "B" or "W"
    chunk: int
    mb: int
    split: bool = False   # B only: input gradient now, weights in a later W
    pair: bool = False    # B only: overlapped with the F just before it (F&B)

    def __str__(self) -> str:
        extra = ("i" if self.split else "") + ("&" if self.pair else "")
        return f"{self.kind}{extra}{self.chunk}.{self.mb}"


def min_micro_batches(schedule: str, pp: int) -> int:
    """1F1B runs any M >= 1 (M >= pp to fill the pipe); DualPipeV needs M >= 2*pp (DeepSeek's DualPipeV
    asserts num_chunks >= 2 * num_ranks: its steady phase must run at least once on rank 0)."""
    return 1 if check_schedule(schedule) == "1f1b" else 2 * pp


def check_micro_batches(schedule: str, pp: int, m: int) -> None:
    need = min_micro_batches(schedule, pp)
    if m < need:
        raise UserError(f"{schedule} on pp = {pp} needs at least {need} micro-batches per step, got {m}: "
                        f"raise the batch size or lower the micro-batch size (or pp)")


def build_schedule(schedule: str, pp: int, m: int) -> list[list[Op]]:
    """Per-rank op lists for one step of ``m`` micro-batches."""
    s = check_schedule(schedule)
    check_micro_batches(s, pp, m)
    return [one_f_one_b(r, pp, m) for r in range(pp)] if s == "1f1b" else [dualpipev(r, pp, m) for r in range(pp)]


def one_f_one_b(rank: int, pp: int, m: int) -> list[Op]:
    """1F1B: pp-1-rank warm-up forwards, then alternate one forward / one full backward, then drain."""
    warm = min(pp - 1 - rank, m)
    ops = [Op("F", rank, i) for i in range(warm)]
    f = b = 0
    for f in range(warm, m):
        ops.append(Op("F", rank, f))
        ops.append(Op("B", rank, b))
        b += 1
    ops += [Op("B", rank, i) for i in range(b, m)]
    return ops


class _VRank:
    """Builds one rank's DualPipeV op list; phase 0 = chunk r (down), phase 1 = chunk 2pp-1-r (up)."""

    def __init__(self, rank: int, pp: int):
        self.chunk = (rank, 2 * pp - 1 - rank)
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        self.deferred: list[tuple[int, int]] = []   # FIFO of (chunk, mb) whose W is pending
        self.ops: list[Op] = []

    def F(self, phase: int) -> None:
        self.ops.append(Op("F", self.chunk[phase], self.next_f[phase]))
        self.next_f[phase] += 1

    def B(self, phase: int, split: bool = False, pair: bool = False) -> None:
        g, mb = self.chunk[phase], self.next_b[phase]
        self.next_b[phase] += 1
        self.ops.append(Op("B", g, mb, split=split, pair=pair))
        if split:
            self.deferred.append((g, mb))

    def W(self) -> None:
        g, mb = self.deferred.pop(0)
        self.ops.append(Op("W", g, mb))

    def FB(self, f_phase: int, b_phase: int) -> None:
        self.F(f_phase)
        self.B(b_phase, pair=True)


def dualpipev(rank: int, pp: int, m: int) -> list[Op]:
    """DualPipeV's eight phases for one rank (the structure of DeepSeek's reference schedule):

    1. 2(pp-r-1) forwards of chunk r (fill the way down)
    2. r+1 times: F chunk r, F chunk 2pp-1-r
    3. pp-r-1 times: B (input part) and W of the up chunk, then its next F (zero-bubble fill)
    4. m-2pp+r+1 times: F&B(down F, up B), F&B(up F, down B)    -- the steady state
    5. pp-r-1 times: B up, F&B(up F, down B)
    6. r+1 times: B up, B down; from the middle on the B's are split and their W deferred
    7. pp-r-1 times: W, split B down
    8. r+1 times: W (drain the deferred weight gradients)
    """
    v = _VRank(rank, pp)
    for _ in range(2 * (pp - rank - 1)):
        v.F(0)
    for _ in range(rank + 1):
        v.F(0)
        v.F(1)
    for _ in range(pp - rank - 1):
        v.B(1, split=True)
        v.W()
        v.F(1)
    for i in range(m - 2 * pp + rank + 1):
        if i == 0 and rank == pp - 1:
            v.F(0)               # not overlapped: chunk pp's B needs chunk pp-1's F just before it
            v.B(1)
        else:
            v.FB(0, 1)
        v.FB(1, 0)
    for _ in range(pp - rank - 1):
        v.B(1)
        v.FB(1, 0)
    steps = rank + 1
    split = False
    for i in range(steps):
        if i == steps // 2 and rank % 2 == 1:
            split = True
        v.B(1, split=split)
        if i == steps // 2 and rank % 2 == 0:
            split = True
        v.B(0, split=split)
    for _ in range(pp - rank - 1):
        v.W()
        v.B(0, split=True)
    while v.deferred:
        v.W()
    return v.ops


# --------------------------------------------------------------------------------- validation

def validate(schedule: str, pp: int, m: int, ops: list[list[Op]]) -> None:
    """Assert the op lists form one complete, dependency-respecting step (raises AssertionError).

    Every (chunk, mb) gets exactly one F and one B on the chunk's owner, a W after each split B; and a
    list-scheduling run (each rank in its own order, an op waits for its inputs) finishes, i.e. no
    rank waits forever on an op another rank never gets to (a send that precedes its matching recv).
    """
    C = num_chunks(schedule, pp)
    seen: dict[tuple, int] = {}
    for r, rops in enumerate(ops):
        for op in rops:
            assert chunk_owner(op.chunk, schedule, pp) == r, f"{op} on rank {r} but its chunk lives elsewhere"
            key = (op.kind, op.chunk, op.mb)
            assert key not in seen, f"{op} appears twice"
            seen[key] = r
    for g in range(C):
        for mb in range(m):
            assert ("F", g, mb) in seen and ("B", g, mb) in seen, f"chunk {g} micro-batch {mb} missing F or B"
    simulate(schedule, pp, m, ops)   # raises on a deadlock / order violation


def deps(op: Op, C: int) -> list[tuple[str, int, int]]:
    """The (kind, chunk, mb) an op waits for."""
    if op.kind == "F":
        return [("F", op.chunk - 1, op.mb)] if op.chunk > 0 else []
    if op.kind == "B":
        d = [("F", op.chunk, op.mb)]
        if op.chunk < C - 1:
            d.append(("B", op.chunk + 1, op.mb))
        return d
    return [("B", op.chunk, op.mb)]


@dataclass
class SimResult:
    makespan: float
    busy: list[float]            # per rank
    finish: dict                 # (kind, chunk, mb) -> end time
    start: dict                  # (kind, chunk, mb) -> start time

    @property
    def bubbles(self) -> list[float]:
        """Idle time of each rank between the step's start and the last rank's finish."""
        return [self.makespan - b for b in self.busy]


def simulate(schedule: str, pp: int, m: int, ops: list[list[Op]], F: float = 1.0, B: float = 2.0,
             W: float = 1.0, FB: float | None = None, comm: float = 0.0) -> SimResult:
    """Run the op lists against a clock: each rank executes its ops in order, an op starts when its rank is
    free and its inputs have arrived (``comm`` added when they come from another rank).

    Costs per chunk: F forward, B full backward, W its weight part (a split B costs B - W), FB a forward
    and a backward overlapped (an F followed by a ``pair`` B; default F + B, i.e. no overlap gain).
    Raises AssertionError on a deadlock.
    """
    C = num_chunks(schedule, pp)
    FB = F + B if FB is None else FB
    finish: dict = {}
    start: dict = {}
    clock = [0.0] * pp
    busy = [0.0] * pp
    pos = [0] * pp
    owner = {g: chunk_owner(g, schedule, pp) for g in range(C)}

    def ready_at(op: Op, r: int) -> float | None:
        t = 0.0
        for d in deps(op, C):
            if d not in finish:
                return None
            t = max(t, finish[d] + (comm if owner[d[1]] != r and d[0] != "W" else 0.0))
        return t

    total = sum(len(x) for x in ops)
    done = 0
    while done < total:
        progressed = False
        for r in range(pp):
            while pos[r] < len(ops[r]):
                op = ops[r][pos[r]]
                nxt = ops[r][pos[r] + 1] if pos[r] + 1 < len(ops[r]) else None
                if op.kind == "F" and nxt is not None and nxt.kind == "B" and nxt.pair:
                    # an F&B pair starts when both halves can
                    a, b = ready_at(op, r), ready_at(nxt, r)
                    if a is None or b is None:
                        # the B half may depend on the F half only through a different mb; never this F
                        break
                    t0 = max(clock[r], a, b)
                    t1 = t0 + FB
                    for o in (op, nxt):
                        start[(o.kind, o.chunk, o.mb)] = t0
                        finish[(o.kind, o.chunk, o.mb)] = t1
                    clock[r], busy[r] = t1, busy[r] + FB
                    pos[r] += 2
                    done += 2
                    progressed = True
                    continue
                a = ready_at(op, r)
                if a is None:
                    break
                cost = F if op.kind == "F" else W if op.kind == "W" else (B - W if op.split else B)
                t0 = max(clock[r], a)
                start[(op.kind, op.chunk, op.mb)] = t0
                finish[(op.kind, op.chunk, op.mb)] = t0 + cost
                clock[r], busy[r] = t0 + cost, busy[r] + cost
                pos[r] += 1
                done += 1
                progressed = True
        if not progressed:
            stuck = {r: str(ops[r][pos[r]]) for r in range(pp) if pos[r] < len(ops[r])}
            raise AssertionError(f"schedule deadlocks: ranks wait at {stuck}")
    return SimResult(max(clock), busy, finish, start)


def table2_bubble(schedule: str, pp: int, F: float, B: float, W: float, FB: float) -> float:
    """The V3 report's Table 2 bubble, with PP = the number of pipeline *stages*: pp ranks for 1F1B,
    2*pp chunks for DualPipeV (DeepSeek's DualPipe README gives DualPipeV the same formula as DualPipe
    on the same number of stages)."""
    if check_schedule(schedule) == "1f1b":
        return (pp - 1) * (F + B)
    stages = 2 * pp
    return (stages / 2 - 1) * (FB + B - 3 * W)
