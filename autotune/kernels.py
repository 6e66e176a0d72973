"""The tunable kernels: for each (op, backend) its configuration type, search space, shape bucket
and analytic cost. Adding a kernel is one ``Tunable`` entry here.

Shapes are the bench cases' shape dicts (B, T, H, K, V, gate, gated, num_householder, Dm, N,
D, cell); ``*_shape`` build them from a call's tensors (for dispatch and kernel look-ups).
Buckets group shapes that want the same configuration: exact head dims, dtype and variant, and
powers of two of the sizes that set the grid.

The cost model ranks legal configurations before any is measured: the op's roofline floor
(bytes and flops, rnnops.bench.roofline) times a wave-quantisation factor (programs over
resident slots, rounded up; slots by threads, blocks and, where the kernel states them,
registers) and a penalty for tiles that waste lanes or registers. It only has
to put the winner among the few configurations the tuner measures. The CUDA cells are the
exception (``step_cycles``): one persistent launch walks the sequence, each step waiting for the
one before, so their time is T times a step's latency (:func:`_cells_step_cycles`).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .hardware import Hardware, dtype_name
from .space import Space, next_power_of_two


def _qk_heads(q: torch.Tensor, heads: int) -> dict:
    """{"Hk": q's heads} for grouped q / k heads (fewer than v's ``heads``), else nothing."""
    return {"Hk": q.shape[-2]} if q.shape[-2] != heads else {}


def linear_attn_shape(q: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None) -> dict:
    """The shape of a linear_attn call: q (B, T, Hk, K), v (B, T, H, V), g None, (B, T, H) or
    (B, T, H, K). H is v's heads, which the kernels' grids count; Hk only where it differs."""
    gate = "none" if g is None else ("scalar" if g.dim() == 3 else "per-key")
    return dict(zip("BTH", v.shape), K=q.shape[-1], V=v.shape[-1], gate=gate, **_qk_heads(q, v.shape[2]))


def delta_rule_shape(q: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, num_householder: int) -> dict:
    """The shape of a delta_rule / delta_product call (q (B, T, Hk, K), v (..., H, V)); H is v's
    heads, which the kernels' grids count; Hk only where it differs."""
    return dict(zip("BT", q.shape), H=v.shape[-2], K=q.shape[-1], V=v.shape[-1], gated=g is not None,
                num_householder=num_householder, **_qk_heads(q, v.shape[-2]))


def selective_scan_shape(u: torch.Tensor, A: torch.Tensor) -> dict:
    """The shape of a selective_scan call: u (B, T, Dm), A (Dm, N)."""
    return dict(zip(("B", "T", "Dm"), u.shape), N=A.shape[1])


def rnn_shape(x_gates: torch.Tensor, cell: str) -> dict:
    """The shape of an rnn call: x_gates (B, T, G, H, D)."""
    batch, time, _, heads, dim = x_gates.shape
    return dict(B=batch, T=time, H=heads, D=dim, cell=cell)


# the names a shape must give per op family (autotune --shapes "B=8,T=4096,..."); others may
# follow (gate, gated, num_householder, and Hk, q and k's heads where grouped, for the linear family)
SHAPE_NAMES = {
    "linear_attn": ("B", "T", "H", "K", "V"),
    "delta_rule": ("B", "T", "H", "K", "V"),
    "delta_product": ("B", "T", "H", "K", "V"),
    "selective_scan": ("B", "T", "Dm", "N"),
    "rnn": ("cell", "B", "T", "H", "D"),
}


def check_shape(op: str, shape: dict) -> None:
    """ValueError unless ``shape`` names every size ``op`` needs (SHAPE_NAMES), integers but the
    rnn's cell."""
    if op not in SHAPE_NAMES:
        raise ValueError(f"no shapes for op {op!r}; ops: {', '.join(SHAPE_NAMES)}")
    missing = [name for name in SHAPE_NAMES[op] if name not in shape]
    if missing:
        raise ValueError(f"shape {shape} lacks {', '.join(missing)} for op {op!r} "
                         f"({op} shapes name {', '.join(SHAPE_NAMES[op])})")
    for name in SHAPE_NAMES[op]:
        if name != "cell" and (not isinstance(shape[name], int) or shape[name] < 1):
            raise ValueError(f"shape {shape}: {name} must be a positive integer, got {shape[name]!r}")


def bucket(op: str, shape: dict, dtype: torch.dtype) -> str:
    """The shape bucket of a call (a string key for the cache)."""
    check_shape(op, shape)
    d = dtype_name(dtype)
    if op in ("linear_attn", "delta_rule", "delta_product"):
        variant = shape.get("gate", "gated" if shape.get("gated") else "plain")
        # grouped q / k heads compile differently (their rows addressed per group: more registers)
        grouped = ":grouped" if shape.get("Hk", shape["H"]) != shape["H"] else ""
        tokens = shape["B"] * shape["T"] * shape["H"] * shape.get("num_householder", 1)
        return f"{d}:K{shape['K']}:V{shape['V']}:{variant}{grouped}:tokens~{next_power_of_two(tokens)}"
    if op == "selective_scan":  # the batch sets the grid (the length only how long each program walks)
        return f"{d}:N{shape['N']}:Dm~{next_power_of_two(shape['Dm'])}:B~{next_power_of_two(shape['B'])}"
    # rnn, the one op left (check_shape admits no other)
    return f"{d}:{shape['cell']}:H{shape['H']}:D{shape['D']}:B~{next_power_of_two(shape['B'])}"


@dataclass(frozen=True)
class Tunable:
    op: str
    backend: str
    module: str  # the backend module holding DEFAULT_CONFIG and space()
    make_space: Callable[[object, dict, torch.dtype, Hardware], Space]  # (module, shape, dtype, hw)
    programs: Callable[[dict, dict], int]  # (config, shape) -> programs / blocks launched
    threads: Callable[[dict], int]  # config -> threads per program
    penalty: Callable[[dict, dict], float] = lambda config, shape: 1.0  # tile inefficiency and recomputation
    # variables the offline compile screen tries at their default before other values: the cost
    # model cannot rank them and they shape only kernels that rarely spill, so free they would fill
    # the screened few with copies of one tile shape (measuring on a GPU still varies them)
    screen_at_default: tuple[str, ...] = ()
    # registers per thread where known to bound the programs an SM holds (ptxas' count through
    # compile_check), else 0: the model then counts threads and blocks only
    registers: int = 0
    # for kernels whose time is a sequential step's latency times T rather than work over
    # throughput: (config, shape, hardware, element bytes) -> cycles of one forward + backward step,
    # launches included; the cost is then T times that
    step_cycles: Callable[[dict, dict, Hardware, int], float] | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}.{self.op}"

    def load(self):
        return importlib.import_module(self.module)

    def default(self) -> dict:
        return dataclasses.asdict(self.load().DEFAULT_CONFIG)

    def config(self, values: dict):
        return type(self.load().DEFAULT_CONFIG)(**values)

    def space(self, shape: dict, dtype: torch.dtype, hardware: Hardware) -> Space:
        return self.make_space(self.load(), shape, dtype, hardware)

    def floor(self, shape: dict, dtype: torch.dtype, hardware: Hardware) -> float:
        """The op's roofline floor of forward + backward at ``shape``, seconds (rnnops.bench.roofline)."""
        from rnnops.bench import roofline

        if self.op == "linear_attn":
            work = roofline.linear_attn(shape["B"], shape["T"], shape["H"], shape["K"], shape["V"], shape["gate"], dtype)
        elif self.op in ("delta_rule", "delta_product"):
            work = roofline.delta_rule(shape["B"], shape["T"], shape["H"], shape["K"], shape["V"], shape["gated"], dtype,
                                       num_householder=shape.get("num_householder", 1))
        elif self.op == "selective_scan":
            work = roofline.selective_scan(shape["B"], shape["T"], shape["Dm"], shape["N"], dtype)
        else:
            work = roofline.rnn(shape["B"], shape["T"], shape["H"], shape["D"], _gates(shape), dtype)
        return work.floor_seconds(hardware, "fwd_bwd") or 1.0

    def cost(self, config: dict, shape: dict, dtype: torch.dtype, hardware: Hardware,
             floor: float | None = None) -> float:
        """Estimated seconds of forward + backward (``floor``: :meth:`floor`, where already known)."""
        if self.step_cycles is not None:
            return shape["T"] * self.step_cycles(config, shape, hardware, dtype.itemsize) / hardware.clock_hz
        floor = self.floor(shape, dtype, hardware) if floor is None else floor
        threads = self.threads(config)
        per_sm = max(1, hardware.programs_per_sm(threads, self.registers, 0)[0])
        programs = self.programs(config, shape)
        waves = math.ceil(programs / (hardware.sm_count * per_sm))
        utilisation = programs / (waves * hardware.sm_count * per_sm)
        thread_penalty = 1.0 + 0.1 * math.log2(max(threads, 32) / 128) ** 2
        return floor / max(utilisation, 1e-3) * thread_penalty * self.penalty(config, shape)

    def ranked(self, configs: list[dict], shape: dict, dtype: torch.dtype, hardware: Hardware) -> list[dict]:
        """``configs`` by estimated cost, cheapest first, ties broken towards the kernel's default
        configuration (the floor and the default computed once: per configuration they took 30 s
        of a 13 s --dry-run's profile, linear attention's 21516 configurations per bucket)."""
        default, floor = self.default(), self.floor(shape, dtype, hardware)

        def key(config: dict):
            return (self.cost(config, shape, dtype, hardware, floor),
                    sum(config.get(k) != v for k, v in default.items()))

        return sorted(configs, key=key)


def _linear_space(module, shape, dtype, hw):
    return module.space(shape["K"], shape["V"], 64, dtype.itemsize, hw)


def _group(shape) -> int:
    """Value heads a q / k head (1 ungrouped)."""
    return shape["H"] // shape.get("Hk", shape["H"])


def _linear_programs(config, shape):
    return shape["B"] * shape["H"] * math.ceil(shape["T"] / 64) * math.ceil(shape["V"] / config["block_v"])


def _tile(block: int) -> float:
    """Relative cost of a tl.dot operand tile of this width (small tiles waste the tensor cores)."""
    return (1.0 + 32.0 / block) / 1.5


def _linear_penalty(config, shape):
    """Small tiles, and the intra-chunk scores recomputed once per V tile."""
    v_tiles = math.ceil(shape["V"] / config["block_v"])
    recompute = 1.0 + (v_tiles - 1) * 64 * shape["K"] / (64 * (shape["K"] + shape["V"]) + 2 * shape["K"] * shape["V"])
    return _tile(config["block_k"]) * _tile(config["block_v"]) * recompute


# the dq/dk kernel's share of linear attention's forward + backward, and the programs that fill an
# H100 four deep (132 SMs): below them its time grows as its programs shrink
_DQK_SHARE, _DQK_FILL = 0.25, 528
# per-value-head partial gradients of q and k (written, then read by the group sum), relative to the
# floor's bytes: the SSD at B8 T2048 H80 (one q / k group) spent about 0.7 of its 4.71 ms
# forward + backward on them (H200, 2026-11-27), 0.05 x their 3.9x the floor's bytes
_PARTIAL_WEIGHT = 0.05


def _linear_attn_penalty(config, shape):
    """_linear_penalty, and for grouped heads what group_heads trades: the partial gradients of q and
    k a q / k head (GROUP / group_heads of them, unless that is one) against the dq/dk kernel's
    programs (GROUP / group_heads a chunk and K tile of each q / k head)."""
    from rnnops.bench import roofline

    heads, qk_heads = shape["H"], shape.get("Hk", shape["H"])
    parts = heads // config["group_heads"]
    # a token's bytes in the floor and in the partials (any one element size: the ratio counts)
    element = torch.bfloat16
    floor_bytes = roofline.linear_attn(1, 1, heads, shape["K"], shape["V"], shape["gate"], element,
                                       qk_heads=qk_heads).bytes
    partial_bytes = 4 * parts * shape["K"] * element.itemsize if parts > qk_heads else 0  # dq, dk: written, read
    programs = shape["B"] * math.ceil(shape["T"] / 64) * math.ceil(shape["K"] / config["block_k"]) * parts
    underfill = max(1.0, _DQK_FILL / programs) - 1.0
    return (_linear_penalty(config, shape) * (1.0 + _PARTIAL_WEIGHT * partial_bytes / floor_bytes)
            * (1.0 + _DQK_SHARE * underfill))


def _scan_penalty(config, shape):
    """The Triton scan: states stored per chunk; lanes per channel (a narrower block splits a
    channel's state elements over lanes: more instructions per element) in the backward, which
    issues about four fifths of the instructions, and in the forward, whose one-warp programs
    leave an H100's 528 schedulers idle below about two each (the model's programs and threads
    are the backward's); segments multiply both directions' programs for 1.6x the forward's
    instructions and 1.1x the backward's."""
    segments = _scan_segments(config["segments"], config["chunk"], shape)
    forward_programs = shape["B"] * math.ceil(shape["Dm"] / config["forward_block_d"]) * segments
    forward = (1.0 + 8.0 / config["forward_block_d"]) * max(1.0, 1024 / forward_programs) * (1.6 if segments > 1 else 1)
    backward = (1.0 + 8.0 / config["block_d"]) * (1.1 if segments > 1 else 1)
    return (1.0 + 8.0 / config["chunk"]) * (0.8 * backward + 0.2 * forward)


def _scan_segments(segments: int, chunk: int, shape) -> int:
    """A scan's segments per sequence at ``shape`` (no more than its chunks of ``chunk`` steps)."""
    return min(segments, math.ceil(shape["T"] / chunk))


def _cuda_scan_segments(config, shape) -> int:
    return _scan_segments(config["segments"], config["warps"] * config["items"], shape)


def _cuda_scan_penalty(config, shape):
    """The CUDA scan, per (step, channel, state element), SASS sm_90a at 4 x 8: about 7 / 37
    instructions forward / backward with B and C staged in shared memory, 23 / 120 reading them
    from global memory (3.2x); segments multiply the blocks for about 1.35x the forward's work
    and 1.1x the backward's (four fifths of the instructions)."""
    split = 0.8 * 1.1 + 0.2 * 1.35 if _cuda_scan_segments(config, shape) > 1 else 1.0
    return (1.0 + 4.0 / config["items"]) * (1.0 if config["stage_rows"] else 3.2) * split


# A CUDA cells step's latency in cycles, per direction (module docstring; _cells_step_cycles). The
# constants come from the H100's forward timings at commit 2c039d7 (a 64-wide head in four 16-unit
# blocks, 4.0 us a step: about 8000 cycles, nearly all of it the split's) and are guesses beyond:
_STEP_FIXED = 1500  # the block barriers, the loads in flight, storing h or the gate gradients
_STEP_SPLIT = 6000  # a head over several blocks: a grid barrier and the other blocks' h / gradients through L2
_STEP_UNSTAGED = 1000  # pointwise inputs read from global memory during the step instead of before it
_STEP_ROUND = 1000  # each round of gate-gradient chunks past the first (backward): a memory latency
_WMMA = 32  # one 16 x 16 x 16 tensor-core product in a warp's dependent chain
_POINTWISE = 20  # one gate element's pointwise update in a thread
# the fragment kernels' fixed part (untimed guess): one block barrier a step where the sliced ones
# have two, and their products reach the pointwise phase in registers, not through shared memory
_STEP_FRAGMENTS = _STEP_FIXED // 2


# The Triton cells at one stage: each step of their time loops waits a memory latency for its
# inputs (x_t forward, the saved values backward), which two stages copy a step ahead (cp.async);
# the H200's A/B at H12 D64 (2026-11-28): one stage 1.24x the time of two
_CELLS_UNPIPELINED = 1.24


def _cells_blocks(config: dict, shape: dict) -> int:
    """The CUDA cells' blocks: each (head, batch tile) group's head in slices of ``units``."""
    from rnnops.cuda_backend.rnn import ROWS

    return shape["H"] * math.ceil(shape["B"] / ROWS) * math.ceil(shape["D"] / config["units"])


def _cells_step_cycles(config: dict, shape: dict, hardware: Hardware, element_bytes: int) -> float:
    """Cycles of one forward + backward step of the CUDA cells at ``config``, times the launches a
    batch's blocks need. Per direction: the products (a block's 16-row output tiles times its K
    steps, dealt over its warps; forward and backward equal: the backward's product has G times
    the K steps and a G-th of the tiles), the pointwise phase (G gate elements per unit and row,
    over the threads), a fixed part, and a head split over blocks pays a grid barrier and an
    exchange through L2 every step. A head that fits one block never meets the others: at 64
    units a step's work is a few products a warp, so the split's barrier, not the work, sets the
    time, and more blocks do not make a step shorter. The fragment kernels (``forward_fragments``,
    ``backward_fragments``, where they apply) have a warp's G K-step chains of half-size products
    (16 x 8 x 16) and four elements of each gate a thread."""
    from rnnops.cuda_backend.rnn import ROWS, fragment_k_steps, gradient_chunks_needed, shared_bytes

    gates, D, units, threads = _gates(shape), shape["D"], config["units"], config["threads"]
    warps, splits = threads // hardware.warp_size, math.ceil(D / units)
    products = math.ceil((gates * units // 16) * (D // 16) / warps) * _WMMA
    pointwise = math.ceil(ROWS * units * gates / threads) * _POINTWISE
    step = _STEP_FIXED + products + pointwise + (_STEP_SPLIT if splits > 1 else 0)
    step += 0 if config["stage"] else _STEP_UNSTAGED
    rounds = _gradient_rounds(config, shape)
    fragments = _STEP_FRAGMENTS + gates * math.ceil(D / 16) * _WMMA // 2 + 4 * gates * _POINTWISE
    applies = fragment_k_steps(D, element_bytes) is not None
    forward = fragments if config.get("forward_fragments") and applies else step
    backward = fragments if config.get("backward_fragments") and applies else step + _STEP_ROUND * (rounds - 1)
    cycles = forward + backward
    chunks = min(config["gradient_chunks"], gradient_chunks_needed(D, shape["cell"], element_bytes))
    shared = max(shared_bytes(D, shape["cell"], units, element_bytes, threads, config["stage"], chunks,
                              config["pad_rows"]))
    per_sm = hardware.programs_per_sm(threads, 0, shared)[0]
    return cycles * math.ceil(_cells_blocks(config, shape) / max(1, hardware.sm_count * per_sm))


TUNABLES = [
    Tunable("linear_attn", "triton", "rnnops.triton_backend.linear_attn",
            lambda m, s, dt, hw: m.space(s["K"], s["V"], 64, dt.itemsize, hw, _group(s)), _linear_programs,
            lambda c: 32 * c["num_warps"], _linear_attn_penalty,
            ("state_num_warps", "state_num_stages", "state_block_k", "state_block_v", "fused_forward")),
    Tunable("delta_rule", "triton", "rnnops.triton_backend.delta_rule", _linear_space, _linear_programs,
            lambda c: 32 * c["num_warps"], _linear_penalty, ("state_num_warps", "state_num_stages", "fused_forward")),
    Tunable("delta_product", "triton", "rnnops.triton_backend.delta_rule", _linear_space, _linear_programs,
            lambda c: 32 * c["num_warps"], _linear_penalty, ("state_num_warps", "state_num_stages", "fused_forward")),
    Tunable("selective_scan", "triton", "rnnops.triton_backend.selective_scan",
            lambda m, s, dt, hw: m.space(s["Dm"], s["N"], hw),
            lambda c, s: s["B"] * math.ceil(s["Dm"] / c["block_d"]) * _scan_segments(c["segments"], c["chunk"], s),
            lambda c: 32 * max(1, c["block_d"] // 32), _scan_penalty, ("forward_unroll",),
            registers=255),  # the backward's: N 16, 8-32 channels, Triton 3.6 and 3.9
    Tunable("selective_scan", "cuda", "rnnops.cuda_backend.selective_scan",
            lambda m, s, dt, hw: m.space(s["N"], hw),
            lambda c, s: s["B"] * math.ceil(s["Dm"] / 32) * _cuda_scan_segments(c, s), lambda c: 32 * c["warps"],
            _cuda_scan_penalty),
    Tunable("rnn", "triton", "rnnops.triton_backend.rnn",
            lambda m, s, dt, hw: m.space(s["D"], _gates(s), hw, dt.itemsize),
            lambda c, s: s["H"] * math.ceil(s["B"] / c["block_b"]), lambda c: 32 * c["num_warps"],
            lambda c, s: _tile(c["block_d"]) * _tile(c["block_k"]) * max(1.0, c["block_b"] / max(s["B"], 16))
            * (1.0 if c["num_stages"] > 1 else _CELLS_UNPIPELINED),
            ("backward_num_warps",)),
    Tunable("rnn", "cuda", "rnnops.cuda_backend.rnn",
            lambda m, s, dt, hw: m.space(s["D"], s["cell"], dt.itemsize, hw),
            _cells_blocks, lambda c: c["threads"], step_cycles=_cells_step_cycles),
]

def _gradient_rounds(config: dict, shape: dict) -> int:
    """Rounds of gate-gradient chunks a CUDA cells backward step copies in, one memory latency each
    (half types' chunks; a head that fits one block has one, kept in shared memory)."""
    from rnnops.cuda_backend.rnn import gradient_chunks_needed

    return math.ceil(gradient_chunks_needed(shape["D"], shape["cell"], 2) / config["gradient_chunks"])


def _gates(shape: dict) -> int:
    from rnnops.reference.rnn import CELLS

    return CELLS[shape["cell"]].gates


def tunables(ops=None) -> list[Tunable]:
    return [t for t in TUNABLES if ops is None or "all" in ops or t.op in ops]


def find(op: str, backend: str) -> Tunable:
    for t in TUNABLES:
        if t.op == op and t.backend == backend:
            return t
    raise KeyError(f"no tunable kernel for {backend}.{op}")
