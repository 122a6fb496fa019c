"""Pangea's own message types: what the roles handle, independent of the wire format.

`pangea.wire.codec` turns these into Cap'n Proto bytes and back; nothing here knows about
capnp or NATS.  Tensors keep their payload as a buffer so decoding stays zero-copy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1
GRADIENT_TENSOR = "grad"  # the name of a gradient chunk's tensor

# dtype name -> (numpy dtype used to hold the raw bytes, itemsize).  numpy has no
# bfloat16: its bytes are carried as uint16 and reinterpreted by torch.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
    "uint32": np.dtype("<u4"),
}
_NUMPY_TO_NAME = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items() if k != "bfloat16"}


@dataclass(frozen=True)
class Tensor:
    """A typed n-d array whose bytes may be a zero-copy view into a received message."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    name: str = ""

    @classmethod
    def from_numpy(cls, array: np.ndarray, name: str = "") -> Tensor:
        """Wrap a numpy array (made C-contiguous and little-endian if it is not already)."""
        key = np.dtype(array.dtype).newbyteorder("=")
        if key not in _NUMPY_TO_NAME:
            raise TypeError(f"unsupported numpy dtype {array.dtype}")
        dtype = _NUMPY_TO_NAME[key]
        array = np.asarray(array, dtype=DTYPES[dtype])  # keeps 0-d arrays 0-d
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        return cls(dtype, tuple(int(s) for s in array.shape), _bytes_view(array), name)

    @classmethod
    def from_torch(cls, tensor, name: str = "") -> Tensor:
        """Wrap a CPU torch tensor (bfloat16 included) without copying when it is contiguous."""
        import torch

        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype == torch.bfloat16:
            raw = tensor.view(torch.int16).numpy()
            return cls("bfloat16", tuple(tensor.shape), _bytes_view(raw), name)
        return cls.from_numpy(tensor.numpy(), name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def numpy(self) -> np.ndarray:
        """A read-only numpy view of the payload (bfloat16 comes back as its raw uint16 bits)."""
        return np.frombuffer(self.data, dtype=DTYPES[self.dtype]).reshape(self.shape)

    def torch(self):
        """A torch view of the payload with the right dtype (bfloat16 included)."""
        import torch

        with warnings.catch_warnings():
            # Received payloads are read-only buffers; torch warns but shares them fine.
            warnings.simplefilter("ignore", UserWarning)
            if self.dtype == "bfloat16":
                flat = torch.from_numpy(self.numpy().reshape(-1).view(np.int16)).view(torch.bfloat16)
                return flat.reshape(self.shape)
            return torch.from_numpy(self.numpy())


def _bytes_view(array: np.ndarray) -> memoryview:
    """The array's bytes as a flat memoryview, without copying (empty shapes included)."""
    return memoryview(array.reshape(-1)).cast("B")


@dataclass(frozen=True)
class Chunk:
    """Slice [offset, offset + n) of a flat vector of `total` elements; chunk `index` of `count`."""

    index: int
    count: int
    offset: int
    total: int


@dataclass(frozen=True)
class Batch:
    """Rows [start, stop) of one global batch for one worker: inputs `x`, targets `y`, and any
    further named tensors (masks, ...) in `extra`."""

    job: str
    sender: str
    round: int
    epoch: int
    step: int
    worker: str
    shard: int
    start: int
    stop: int
    x: Tensor
    y: Tensor
    generation: int = 0
    inner: int = 0  # diloco: which local step of the round
    inner_steps: int = 1  # diloco: local steps in the round
    extra: tuple[Tensor, ...] = ()  # named tensors beyond x and y, keyed by Tensor.name

    def __post_init__(self) -> None:
        # `tensors` keys them by name: a name that is empty or taken would lose a tensor
        # silently.  Checked here, so neither a sender nor a decoded message can hold one.
        seen = {"x", "y"}
        for tensor in self.extra:
            if not tensor.name or tensor.name in seen:
                raise ValueError(f"extra tensor name {tensor.name!r} is empty, 'x', 'y' or repeated")
            seen.add(tensor.name)

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the batch by name: x, y and the extras."""
        return {"x": self.x, "y": self.y, **{t.name: t for t in self.extra}}


@dataclass(frozen=True)
class Gradient:
    job: str
    sender: str
    round: int
    shard: int
    num_samples: int
    loss: float
    params_version: int
    chunk: Chunk
    values: Tensor
    generation: int = 0
    compression: str = "none"
    scale: float = 1.0
    indices: Tensor = field(default_factory=lambda: Tensor("uint32", (0,), memoryview(b"")))
    count: float = -1.0  # counted targets behind `values` (tensor.capnp); -1: none given, refused


@dataclass(frozen=True)
class Params:
    job: str
    sender: str
    version: int
    final: bool
    layout_hash: str
    chunk: Chunk
    values: Tensor
    generation: int = 0


@dataclass(frozen=True)
class Shard:
    worker: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RoundPlan:
    job: str
    sender: str
    round: int
    epoch: int
    step: int
    batch_size: int
    shards: tuple[Shard, ...]
    final: bool = False
    attempt: int = 0
    reissue: tuple[int, ...] = ()
    generation: int = 0
    inner_steps: int = 1  # diloco: global batches (from epoch, step on) the round covers
    ahead: bool = False  # published a round early, for the preprocessor only (see tensor.capnp)


@dataclass(frozen=True)
class Heartbeat:
    job: str
    sender: str
    worker: str
    host: str
    pid: int
    sent_at: float
    shards_done: int = 0
    params_version: int = 0
    bytes_sent: int = 0
    torch_version: str = ""  # the kernels of its gradients (pangea.train.kernels)
    torch_threads: int = 0
    device: str = ""
    cpu: str = ""
    ready: bool = False  # batch consumer created and a parameter version held
    heartbeat_seconds: float = 0.0  # its period (0 from an older writer: the reader's own)


@dataclass(frozen=True)
class JobSpec:
    job: str
    sender: str
    model: str
    hidden: tuple[int, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    num_params: int
    layout_hash: str
    total_rounds: int
    seed: int
    dataset: str
    batch_size: int
    epochs: int
    optimizer: str = "sgd"  # sgd | adam | adamw | module:factory | pickle:<sha256>
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    source_job: str = ""
    compression: str = "none"
    topk_fraction: float = 0.01
    shards: int = 1  # orchestrator shards (0 from an older writer means 1)
    mode: str = "sync"
    local_steps: int = 1
    inner_optimizer: str = "adamw"
    inner_lr: float = 0.001
    staleness: int = 2
    task: str = "classify"
    context: int = 0  # lm: tokens per window
    vocab: int = 0  # lm: vocabulary size (as read from the data)
    val_fraction: float = 0.1
    layers: int = 2  # gpt
    heads: int = 4
    dim: int = 128
    max_steps: int = 0
    lr_schedule: str = "constant"  # what a replay needs to step the same way
    warmup_steps: int = 0
    clip_grad: float = 0.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    eval_every: int = 0
    eval_windows: int = 256
    aggregator: str = "mean"
    byzantine: int = 1
    clip_norm: float = 0.0
    policy: str = "exact"
    step: str = ""  # the step hook, module:function or pickle:<sha256> ("": the task's own)
    micro_batch: int = 0  # rows per piece of a shard's gradient accumulation (0: whole shard)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    param_numel: int = 0  # trainable elements of the flat vector, the rest buffers (0: all)
    transform: str = ""  # the data's own hooks and options (pangea.train.samples), "": none
    collate: str = ""
    val_dataset: str = ""
    columns: str = ""
    image_size: int = 0
    normalize: str = ""
    token_dtype: str = "uint16"


@dataclass(frozen=True)
class RoundDone:
    job: str
    sender: str
    round: int
    total_rounds: int
    epoch: int
    loss: float
    seconds: float
    num_samples: int
    test_accuracy: float = float("nan")
    workers: tuple[str, ...] = field(default_factory=tuple)
    recent_seconds: tuple[float, ...] = field(default_factory=tuple)
    excluded_workers: tuple[str, ...] = field(default_factory=tuple)  # members not planned now
    excluded_reasons: tuple[str, ...] = field(default_factory=tuple)  # why, one per excluded worker
    figure: str = "test_accuracy"  # what test_accuracy holds: the task's headline figure
    targets_per_sample: int = 1  # lm: tokens per window, for tokens/s


Message = Batch | Gradient | Params | RoundPlan | Heartbeat | JobSpec | RoundDone
