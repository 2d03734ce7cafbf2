"""The cluster what-if inputs: links, clusters, collective times, and measured costs (JSON).

The predictions built on these live in `_cluster_model.py`. Units inside are bytes and
seconds; the CLI string `nodes=64,gpus_per_node=8,ib=400Gbps` is parsed by `parse_cluster`.

Measured costs (`jaxpp-cluster-costs/1`, read by `load_costs`; every field in
`costs_from_dict`) come from single-GPU or small runs: one layer's forward, backward and
(optionally) weight-grad time at a reference microbatch size and sequence length, the bytes
a layer stores for its backward, the bytes of the activation at a stage boundary, the bytes
of a layer's parameters, the layer count, the global batch, usable GPU memory, and
optionally measured collectives (op, bytes, GPUs, seconds) that calibrate the ring model.

Use: `jaxpp schedule simulate NAME|FILE --costs measured.json --cluster nodes=..,...` or
`python benchmarks/cluster_whatif.py measured.json --cluster ...`.
"""

import dataclasses
import json
import math
import pathlib
import re
import statistics
from collections.abc import Mapping
from typing import Any

# Case matters: a lower-case b is bits, an upper-case B is bytes (Gbps vs GBps).
_BANDWIDTH = {
    "Mbps": 1e6 / 8,
    "Gbps": 1e9 / 8,
    "Tbps": 1e12 / 8,
    "MBps": 1e6,
    "GBps": 1e9,
    "TBps": 1e12,
    "B/s": 1.0,
}
_LATENCY = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]+)\s*$")
_CLUSTER_KEYS = (
    "nodes",
    "gpus_per_node",
    "nvlink",
    "nvlink_latency",
    "ib",
    "eth",
    "ib_latency",
    "eth_latency",
)


class ClusterSpecError(ValueError):
    """A cluster string, a link or a measured-costs file that cannot be read."""


@dataclasses.dataclass(frozen=True, slots=True)
class Link:
    """One kind of link: bandwidth per GPU per direction (bytes/s) and latency (s).

    Example:
        >>> Link(parse_bandwidth("400Gbps"), parse_latency("5us")).time(50e6)
        0.001005
    """

    bandwidth: float
    latency: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.bandwidth, int | float) and self.bandwidth > 0):
            raise ClusterSpecError(
                f"Link bandwidth={self.bandwidth!r} must be a number > 0 (bytes/s); "
                f"Fix: write e.g. 400Gbps or 450GBps."
            )
        if not (
            isinstance(self.latency, int | float)
            and math.isfinite(self.latency)
            and self.latency >= 0
        ):
            raise ClusterSpecError(
                f"Link latency={self.latency!r} must be a finite number >= 0 (seconds); "
                f"Fix: write e.g. 5us."
            )

    def time(self, num_bytes: float) -> float:
        """Seconds to send `num_bytes` point to point: latency + bytes / bandwidth."""
        return self.latency + num_bytes / self.bandwidth


# NVLink 4 (H100/H200): 900 GB/s both directions together, 450 GB/s each way.
DEFAULT_NVLINK = Link(450e9, 3e-6)
DEFAULT_IB_LATENCY = 5e-6


@dataclasses.dataclass(frozen=True, slots=True)
class Cluster:
    """`nodes` x `gpus_per_node` GPUs; `intra` links GPUs of one node, `inter` the nodes.

    `inter.bandwidth` is per GPU (one NIC per GPU, as on DGX nodes). GPU `g` sits in node
    `g // gpus_per_node`.

    Example:
        >>> c = parse_cluster("nodes=2,gpus_per_node=4,ib=200Gbps")
        >>> c.num_gpus, c.link(0, 3) == c.intra, c.link(3, 4) == c.inter
        (8, True, True)
    """

    nodes: int
    gpus_per_node: int
    intra: Link = DEFAULT_NVLINK
    inter: Link = Link(400e9 / 8, DEFAULT_IB_LATENCY)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ClusterSpecError(f"Cluster {name}={value!r} must be an int >= 1.")

    @property
    def num_gpus(self) -> int:
        """All GPUs of the cluster."""
        return self.nodes * self.gpus_per_node

    def link(self, gpu_a: int, gpu_b: int) -> Link:
        """The link between two GPUs: `intra` inside a node, else `inter`."""
        same = gpu_a // self.gpus_per_node == gpu_b // self.gpus_per_node
        return self.intra if same else self.inter

    def group_link(self, gpus: tuple[int, ...]) -> Link:
        """The slowest link a ring over `gpus` crosses: `inter` if they span nodes."""
        return self.intra if len({g // self.gpus_per_node for g in gpus}) <= 1 else self.inter

    def with_bandwidth(self, *, intra: float | None = None, inter: float | None = None):
        """A copy with other bandwidths (bytes/s); latencies kept."""
        return dataclasses.replace(
            self,
            intra=self.intra if intra is None else Link(intra, self.intra.latency),
            inter=self.inter if inter is None else Link(inter, self.inter.latency),
        )

    def describe(self) -> str:
        """One line: sizes, bandwidths in GB/s, latencies in us."""
        return (
            f"{self.nodes} nodes x {self.gpus_per_node} GPUs; intra-node "
            f"{self.intra.bandwidth / 1e9:g} GB/s + {self.intra.latency * 1e6:g} us, inter-node "
            f"{self.inter.bandwidth / 1e9:g} GB/s per GPU + {self.inter.latency * 1e6:g} us"
        )


def parse_bandwidth(text: str) -> float:
    """Bytes/s from `400Gbps` (bits) or `450GBps` (bytes); units Mbps Gbps Tbps MBps GBps TBps.

    Raises:
        ClusterSpecError: unknown unit or no number; lists the valid units.

    Example:
        >>> parse_bandwidth("400Gbps"), parse_bandwidth("0.9TBps")
        (50000000000.0, 900000000000.0)
    """
    return _quantity(text, _BANDWIDTH, "bandwidth", "400Gbps")


def parse_latency(text: str) -> float:
    """Seconds from `5us`; units ns us ms s.

    Raises:
        ClusterSpecError: unknown unit or no number; lists the valid units.

    Example:
        >>> parse_latency("5us")
        5e-06
    """
    return _quantity(text, _LATENCY, "latency", "5us")


def _quantity(text: str, units: Mapping[str, float], what: str, example: str) -> float:
    match = _QUANTITY.match(text)
    if match is None or match.group(2) not in units:
        raise ClusterSpecError(
            f"cannot read {what} {text!r}: write a number and one of the units "
            f"{', '.join(units)} (case matters: b = bits, B = bytes). Fix: e.g. {example}."
        )
    factor = units[match.group(2)]
    value = float(match.group(1))
    # Divide by whole powers of ten for small units: 5 / 1e6 is exactly 5e-06, 5 * 1e-6 not.
    return value * factor if factor >= 1 else value / round(1 / factor)


def parse_cluster(text: str) -> Cluster:
    """Reads `nodes=64,gpus_per_node=8,ib=400Gbps[,nvlink=900GBps,ib_latency=5us,...]`.

    Keys: nodes, gpus_per_node (default 8), nvlink, nvlink_latency (default 450GBps per
    direction, 3us), ib or eth (inter-node bandwidth per GPU, default 400Gbps), ib_latency /
    eth_latency (default 5us).

    Raises:
        ClusterSpecError: unknown key, missing nodes, bad number or unit.

    Example:
        >>> parse_cluster("nodes=64,gpus_per_node=8,ib=400Gbps").inter
        Link(bandwidth=50000000000.0, latency=5e-06)
    """
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in _CLUSTER_KEYS or not value.strip():
            raise ClusterSpecError(
                f"cannot read cluster item {item!r}; write key=value with keys "
                f"{', '.join(_CLUSTER_KEYS)}. Fix: e.g. nodes=64,gpus_per_node=8,ib=400Gbps."
            )
        values[key] = value.strip()
    if "nodes" not in values:
        raise ClusterSpecError(
            f"cluster {text!r} has no nodes=N. Fix: e.g. nodes=64,gpus_per_node=8,ib=400Gbps."
        )
    if "ib" in values and "eth" in values:
        raise ClusterSpecError(
            f"cluster {text!r} sets both ib and eth; they name the same inter-node link. "
            "Fix: keep one."
        )
    counts = {}
    for key, default in (("nodes", None), ("gpus_per_node", "8")):
        raw = values.get(key, default)
        try:
            counts[key] = int(raw)
        except ValueError:
            raise ClusterSpecError(
                f"cluster {key}={raw!r} is not an integer. Fix: e.g. {key}=8."
            ) from None
    intra = Link(
        parse_bandwidth(values["nvlink"]) if "nvlink" in values else DEFAULT_NVLINK.bandwidth,
        parse_latency(values["nvlink_latency"])
        if "nvlink_latency" in values
        else DEFAULT_NVLINK.latency,
    )
    inter_bw = values.get("ib", values.get("eth", "400Gbps"))
    inter_lat = values.get("ib_latency", values.get("eth_latency"))
    inter = Link(
        parse_bandwidth(inter_bw),
        DEFAULT_IB_LATENCY if inter_lat is None else parse_latency(inter_lat),
    )
    return Cluster(counts["nodes"], counts["gpus_per_node"], intra, inter)


def all_reduce_time(num_bytes: float, num_gpus: int, link: Link) -> float:
    """Ring all-reduce: `2 (n-1)/n * bytes / bw + 2 (n-1) * latency`; 0 on one GPU.

    Example:
        >>> all_reduce_time(8e9, 4, Link(100e9, 1e-5))
        0.12006
    """
    if num_gpus <= 1:
        return 0.0
    n = num_gpus
    return 2 * (n - 1) / n * num_bytes / link.bandwidth + 2 * (n - 1) * link.latency


def all_gather_time(num_bytes: float, num_gpus: int, link: Link) -> float:
    """Ring all-gather (or reduce-scatter) of `num_bytes` in total: half an all-reduce.

    Example:
        >>> all_gather_time(8e9, 4, Link(100e9, 1e-5))
        0.06003
    """
    return all_reduce_time(num_bytes, num_gpus, link) / 2


_COLLECTIVES = {"all_reduce": all_reduce_time, "all_gather": all_gather_time}
_COLLECTIVES["reduce_scatter"] = all_gather_time

_SCHEMA = "jaxpp-cluster-costs/1"
_SCHEMA_DOC = (
    "help(jaxpp.schedules.costs_from_dict); example: benchmarks/results/cluster_costs_example.json"
)
# (path, meaning) of every required field; optional ones follow.
_REQUIRED = (
    ("num_layers", "number of transformer layers"),
    ("global_batch", "sequences per optimizer step"),
    ("microbatch_size", "sequences per microbatch at which the times were measured"),
    ("seq_len", "tokens per sequence"),
    ("layer.forward_s", "one layer's forward time in seconds, on one GPU, per microbatch"),
    ("layer.backward_s", "one layer's full backward (input + weight grad) in seconds"),
    ("layer.param_bytes", "one layer's parameter bytes (in the compute dtype)"),
    ("layer.activation_bytes", "bytes one layer keeps per microbatch for its backward"),
    ("boundary_activation_bytes", "bytes of the activation sent between stages per mb"),
    ("memory.gpu_bytes", "usable memory per GPU in bytes"),
)


@dataclasses.dataclass(frozen=True, slots=True)
class Collective:
    """One measured collective: `op` over `gpus` GPUs of `bytes` took `seconds`."""

    op: str
    num_bytes: float
    gpus: int
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class MeasuredCosts:
    """Measured per-layer costs of one model; read from JSON by `load_costs`.

    Times are per layer, on one GPU (no tensor parallelism), for one microbatch of
    `microbatch_size` sequences of `seq_len` tokens. `weight_grad_s` (optional) is the
    weight-gradient part of `backward_s` (zero-bubble schedules split it off).
    `optimizer_s_per_param_byte` (optional, default 0) is the measured time of the step's
    work outside the microbatch loop (the optimizer update) per parameter byte a GPU holds.
    `head_forward_s` / `head_backward_s` (optional, default 0) are the LM head's and loss's
    time per microbatch on one GPU beyond the layers: a pipeline runs them on its last
    stage only, SPMD layouts spread them over the devices like the layers.

    Example:
        >>> m = example_costs()
        >>> m.num_layers, m.tokens_per_step
        (4, 32768)
    """

    num_layers: int
    global_batch: int
    microbatch_size: int
    seq_len: int
    forward_s: float
    backward_s: float
    param_bytes: float
    activation_bytes: float
    boundary_activation_bytes: float
    gpu_bytes: float
    weight_grad_s: float | None = None
    embedding_param_bytes: float = 0.0
    state_bytes_per_param_byte: float = 8.0
    optimizer_s_per_param_byte: float = 0.0
    head_forward_s: float = 0.0
    head_backward_s: float = 0.0
    collectives: tuple[Collective, ...] = ()
    measured: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "global_batch", "microbatch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ClusterSpecError(f"costs {name}={value!r} must be an int >= 1.")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type is float and not (
                isinstance(value, int | float) and math.isfinite(value) and value >= 0
            ):
                raise ClusterSpecError(
                    f"costs {field.name}={value!r} must be a finite number >= 0."
                )
        if self.weight_grad_s is not None and not 0 <= self.weight_grad_s <= self.backward_s:
            raise ClusterSpecError(
                f"costs layer.weight_grad_s={self.weight_grad_s!r} must lie in "
                f"[0, backward_s={self.backward_s!r}]: it is the weight-grad part of the backward."
            )

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step: `global_batch * seq_len`."""
        return self.global_batch * self.seq_len

    @property
    def total_param_bytes(self) -> float:
        """All parameter bytes: layers plus embeddings."""
        return self.num_layers * self.param_bytes + self.embedding_param_bytes


def costs_from_dict(data: Mapping[str, Any]) -> MeasuredCosts:
    """Builds `MeasuredCosts` from the JSON schema `jaxpp-cluster-costs/1`.

    Schema (bytes and seconds)::

        {"format": "jaxpp-cluster-costs/1", "measured": true, "note": "...",
         "num_layers": 32, "global_batch": 256, "microbatch_size": 1, "seq_len": 4096,
         "layer": {"forward_s": .., "backward_s": .., "weight_grad_s": .. (optional),
                   "param_bytes": .., "activation_bytes": ..},
         "boundary_activation_bytes": .., "embedding_param_bytes": 0 (optional),
         "memory": {"gpu_bytes": .., "state_bytes_per_param_byte": 8 (optional)},
         "optimizer_s_per_param_byte": 0 (optional),
         "head": {"forward_s": .., "backward_s": ..} (optional, default 0),
         "collectives": [{"op": "all_reduce", "bytes": .., "gpus": 2, "seconds": ..}]}

    `state_bytes_per_param_byte` is everything a GPU keeps per parameter byte when it
    holds the parameter: 8 for bf16 params + bf16 grads + fp32 master + fp32 Adam m, v.

    Raises:
        ClusterSpecError: a missing field (named, with its meaning), a wrong format tag,
            or a bad value.

    Example:
        >>> costs_from_dict(example_costs_dict()).forward_s
        0.001
    """
    fmt = data.get("format")
    if fmt != _SCHEMA:
        raise ClusterSpecError(
            f"costs JSON format={fmt!r}; this reader knows {_SCHEMA!r}. "
            f'Fix: add "format": "{_SCHEMA}" and the fields of {_SCHEMA_DOC}.'
        )
    for path, meaning in _REQUIRED:
        if _get(data, path) is None:
            raise ClusterSpecError(
                f"costs JSON is missing {path!r} ({meaning}). Fix: add it; the schema is in "
                f"{_SCHEMA_DOC}."
            )
    layer, memory = data["layer"], data["memory"]
    collectives = []
    for i, item in enumerate(data.get("collectives", ())):
        try:
            op, num_bytes, gpus, seconds = (item[k] for k in ("op", "bytes", "gpus", "seconds"))
        except (KeyError, TypeError):
            raise ClusterSpecError(
                f"costs collectives[{i}]={item!r} needs op, bytes, gpus, seconds."
            ) from None
        if op not in _COLLECTIVES:
            raise ClusterSpecError(
                f"costs collectives[{i}] op={op!r}; Fix: use one of {', '.join(_COLLECTIVES)}."
            )
        if not (isinstance(gpus, int) and gpus >= 2 and seconds > 0 and num_bytes > 0):
            raise ClusterSpecError(
                f"costs collectives[{i}]={item!r}: gpus must be >= 2, bytes and seconds > 0."
            )
        collectives.append(Collective(op, float(num_bytes), gpus, float(seconds)))
    return MeasuredCosts(
        num_layers=data["num_layers"],
        global_batch=data["global_batch"],
        microbatch_size=data["microbatch_size"],
        seq_len=data["seq_len"],
        forward_s=layer["forward_s"],
        backward_s=layer["backward_s"],
        weight_grad_s=layer.get("weight_grad_s"),
        param_bytes=layer["param_bytes"],
        activation_bytes=layer["activation_bytes"],
        boundary_activation_bytes=data["boundary_activation_bytes"],
        embedding_param_bytes=data.get("embedding_param_bytes", 0.0),
        gpu_bytes=memory["gpu_bytes"],
        state_bytes_per_param_byte=memory.get("state_bytes_per_param_byte", 8.0),
        optimizer_s_per_param_byte=data.get("optimizer_s_per_param_byte", 0.0),
        head_forward_s=data.get("head", {}).get("forward_s", 0.0),
        head_backward_s=data.get("head", {}).get("backward_s", 0.0),
        collectives=tuple(collectives),
        measured=bool(data.get("measured", True)),
        note=str(data.get("note", "")),
    )


def load_costs(path: str | pathlib.Path) -> MeasuredCosts:
    """Reads a `jaxpp-cluster-costs/1` JSON file (see `costs_from_dict`).

    Raises:
        ClusterSpecError: not JSON, or a schema problem (named).
        OSError: the file cannot be read.

    Example:
        >>> import json, tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        ...     json.dump(example_costs_dict(), f)
        >>> load_costs(f.name).num_layers
        4
    """
    text = pathlib.Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ClusterSpecError(f"{path}: not JSON ({error}).") from None
    if not isinstance(data, dict):
        raise ClusterSpecError(f"{path}: the top level must be a JSON object.")
    return costs_from_dict(data)


def collective_scales(costs: MeasuredCosts, cluster: Cluster) -> tuple[float, float]:
    """`(intra, inter)` factors measured / modelled time from `costs.collectives` (1 if none).

    Each measured collective is compared with the ring model on the link its GPUs would
    use (inside one node if `gpus <= gpus_per_node`); the factor of a link class is the
    geometric mean of its ratios. Predicted collective times are multiplied by it.

    Example:
        >>> c = dataclasses.replace(example_costs(), collectives=(
        ...     Collective("all_reduce", 1e9, 2, 2 * all_reduce_time(1e9, 2, DEFAULT_NVLINK)),))
        >>> collective_scales(c, Cluster(1, 8))
        (2.0, 1.0)
    """
    ratios: dict[bool, list[float]] = {True: [], False: []}
    for item in costs.collectives:
        intra = item.gpus <= cluster.gpus_per_node
        link = cluster.intra if intra else cluster.inter
        model = _COLLECTIVES[item.op](item.num_bytes, item.gpus, link)
        ratios[intra].append(item.seconds / model)
    return tuple(statistics.geometric_mean(r) if r else 1.0 for r in (ratios[True], ratios[False]))


def example_costs_dict() -> dict[str, Any]:
    """A tiny illustrative (NOT measured) costs dict: 4 layers, for examples and tests.

    Example:
        >>> example_costs_dict()["measured"]
        False
    """
    return {
        "format": _SCHEMA,
        "measured": False,
        "note": "illustrative numbers, not a measurement",
        "num_layers": 4,
        "global_batch": 16,
        "microbatch_size": 1,
        "seq_len": 2048,
        "layer": {
            "forward_s": 0.001,
            "backward_s": 0.002,
            "weight_grad_s": 0.001,
            "param_bytes": 50e6,
            "activation_bytes": 100e6,
        },
        "boundary_activation_bytes": 8e6,
        "memory": {"gpu_bytes": 80e9},
    }


def example_costs() -> MeasuredCosts:
    """`costs_from_dict(example_costs_dict())`.

    Example:
        >>> example_costs().measured
        False
    """
    return costs_from_dict(example_costs_dict())


def _get(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
