"""Sparse deltas: DARE's drop-and-rescale of a task vector, DAREx-q's rescaling, and the delta saved compactly.

**DARE** (Yu et al. 2023, arXiv 2311.03099): for the delta tau = finetuned - base, keep each entry independently
with probability 1 - p (a Bernoulli mask) and scale the survivors by 1 / (1 - p), so E[dare(tau)] = tau.

**DAREx-q** (Deng et al., "DARE the Extreme", arXiv 2410.09344): at extreme p the factor 1 / (1 - p) blows up the
variance of the outputs, so scale the same survivors by 1 / q instead, with q chosen on data (q between 1 - p and
1 trades bias for variance). Implemented here is the paper's training-free variant: one global q, picked on a grid
by the unlabelled proxy the paper proposes, the mean absolute change of the model's last-layer outputs (logits)
between the fine-tuned model and base + dropped delta / q on a batch of inputs (:func:`choose_q`), or a q you
give. Not implemented: the per-layer q search and DAREx-L2 (AdamR, an L2 penalty on the delta during fine-tuning:
a training-time change, not a post-hoc one).

A delta folder holds ``delta.sparse.safetensors`` in the compact sparse format of :mod:`secateurs.format.sparse`
(each ``*.weight`` delta as a 1-bit mask plus its non-zero values when that is smaller; 1-D weights as one row;
other tensors dense), ``delta.json`` (which tensors, their shapes, the base's fingerprint, the recipe) and
``report.json``. Loading it gives the stored delta bit for bit; applying it is base + delta.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from secateurs.errors import SecateursError
from secateurs.format.bits import packed_bytes, stored_count
from secateurs.format.folder import REPORT_NAME, AtomicFolder
from secateurs.format.sparse import PACKABLE_DTYPES, PackedTensor, dtype_name, read_header, read_tensors, write_sparse
from secateurs.merge.functional import Forward, forward
from secateurs.merge.tensors import Tensors, add, check_match

DELTA_WEIGHTS = "delta.sparse.safetensors"
DELTA_RECORD = "delta.json"
DELTA_FORMAT = "secateurs-delta"
DELTA_VERSION = 1
RESCALES = ("dare", "darex")


@dataclass
class DARE:
    """Drop a fraction ``drop`` (p) of a delta's entries at random and rescale the rest.

    ``rescale``: ``"dare"`` multiplies the survivors by 1 / (1 - p); ``"darex"`` (DAREx-q) by 1 / q, with ``q``
    given here or chosen on data (:func:`choose_q`). ``seed``: the masks (each tensor's from the seed and its name).
    """

    drop: float = 0.9
    rescale: str = "dare"
    q: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.drop, (int, float)) or isinstance(self.drop, bool) or not 0.0 <= self.drop < 1.0:
            raise SecateursError(f"drop rate must be in [0, 1), got {self.drop!r}")
        if self.rescale not in RESCALES:
            raise SecateursError(f"unknown rescale {self.rescale!r}: use {' or '.join(RESCALES)}")
        if self.q is not None and not 0.0 < self.q <= 1.0:
            raise SecateursError(f"q must be in (0, 1], got {self.q!r}")
        if self.q is not None and self.rescale != "darex":
            raise SecateursError("q is DAREx-q's setting: use rescale='darex' with it")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- the maths
def tensor_seed(seed: int, name: str, task: int = 0) -> int:
    """The seed of one tensor's mask: from the run's seed, the task's index and the tensor's name, so a mask does
    not depend on which other tensors (or in which order) are dropped."""
    digest = hashlib.sha256(f"{seed}:{task}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def keep_mask(shape: Sequence[int], p: float, seed: int) -> torch.Tensor:
    """Bool mask of ``shape``: each entry True (kept) with probability 1 - p, independently (CPU generator)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=generator) >= p


def drop(vector: Mapping[str, torch.Tensor], p: float, seed: int = 0, task: int = 0) -> Tensors:
    """The delta with each entry zeroed with probability p (float32, not rescaled)."""
    out = {}
    for name, v in vector.items():
        keep = keep_mask(v.shape, p, tensor_seed(seed, name, task)).to(v.device)
        out[name] = torch.where(keep, v.float(), torch.zeros((), dtype=torch.float32, device=v.device))
    return out


def rescale(dropped: Mapping[str, torch.Tensor], q: float) -> Tensors:
    """Every entry divided by q (DARE: q = 1 - p)."""
    return {name: v / q for name, v in dropped.items()}


def dare(vector: Mapping[str, torch.Tensor], p: float, seed: int = 0, q: float | None = None, task: int = 0) -> Tensors:
    """DARE: drop each entry with probability p, divide the survivors by q (default 1 - p, DARE's own)."""
    return rescale(drop(vector, p, seed, task), 1.0 - p if q is None else q)


def config_q(config: DARE, q: float | None = None) -> float:
    """The divisor a DARE config uses: 1 - p for DARE; for DAREx-q the ``q`` given here, else the config's."""
    if config.rescale == "dare":
        return 1.0 - config.drop
    q = q if q is not None else config.q
    if q is None:
        raise SecateursError("DAREx-q needs q: give one, or choose it on data (choose_q)")
    return q


def q_grid(p: float, points: int = 21) -> list[float]:
    """Candidate q for DAREx-q: geometric from 1 - p (DARE's factor) to 1 (no rescaling)."""
    if points < 2 or p == 0.0:
        return [1.0 - p]
    return [(1.0 - p) ** (1.0 - i / (points - 1)) for i in range(points)]


def output_change(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    dropped: Mapping[str, torch.Tensor],
    inputs: Sequence[torch.Tensor],
    call: Forward = forward,
) -> Callable[[float], float]:
    """q -> mean |outputs of the fine-tuned model - outputs with base + dropped / q| over ``inputs`` (batches):
    DAREx-q's unlabelled proxy for the best q. ``model`` gives the architecture (its own tensors are not used
    where these name one)."""
    with torch.no_grad():
        reference = [call(model, finetuned, x) for x in inputs]

    def change(q: float) -> float:
        with torch.no_grad():
            tensors = add(base, dropped, 1.0 / q)
            pairs = zip(inputs, reference, strict=True)
            total = sum(float((call(model, tensors, x) - ref).abs().mean()) for x, ref in pairs)
        return total / len(inputs)

    return change


def choose_q(change: Callable[[float], float], grid: Sequence[float]) -> tuple[float, list[dict]]:
    """(q with the smallest ``change(q)`` on ``grid``, the table [{q, change}]); the first of equals wins."""
    table = [{"q": float(q), "change": float(change(q))} for q in grid]
    best = min(table, key=lambda row: row["change"])
    return best["q"], table


# ---------------------------------------------------------------------------------------------- delta folder
def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of ``tensors`` (in order): which base a delta belongs to."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(f"{name}|{dtype_name(t.dtype)}|{list(t.shape)}\n".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass
class SparseDelta:
    """A delta to add to one base model: dense tensors (zeros where dropped), the base's fingerprint and the
    recipe that made it (``DARE`` settings, the q used, what the search measured)."""

    tensors: Tensors
    base_sha256: str
    recipe: dict = field(default_factory=dict)
    architecture: str | None = None

    def apply(self, base: Mapping[str, torch.Tensor], check: bool = True) -> Tensors:
        """base + delta (float32 sum, each tensor back in the base's dtype); ``check`` refuses another base."""
        check_match(base, self.tensors, "the delta")
        if check and fingerprint(base) != self.base_sha256:
            raise SecateursError("the delta was made from another base model (its fingerprint differs)")
        return add(base, self.tensors)

    def nnz(self) -> int:
        return sum(stored_count(t) for t in self.tensors.values())

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def stored_dtype(dtype: torch.dtype) -> torch.dtype:
    """A delta is stored in the base's dtype where the sparse format packs it (float32, bfloat16), else float32."""
    return dtype if dtype_name(dtype) in PACKABLE_DTYPES else torch.float32


def make_delta(
    base: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], config: DARE, q: float | None = None
) -> SparseDelta:
    """The DARE'd ``vector`` (a task vector of ``base``) as a :class:`SparseDelta`. DARE divides by 1 - p; DAREx-q
    by ``q`` (chosen on data by :func:`choose_q`) or else the config's own."""
    q = config_q(config, q)
    tensors = dare(vector, config.drop, config.seed, q)
    tensors = {name: t.to(stored_dtype(base[name].dtype)) for name, t in tensors.items()}
    recipe = {**config.to_dict(), "q": q, "factor": 1.0 / q}
    return SparseDelta(tensors, fingerprint(base), recipe)


def _file_tensor(name: str, t: torch.Tensor) -> torch.Tensor | PackedTensor:
    """How one delta tensor goes into the file: packed (mask + values) when smaller, else dense. Only ``*.weight``
    tensors may be packed (the format's rule); a 1-D one as a single row."""
    if not name.endswith(".weight") or t.dim() == 0 or dtype_name(t.dtype) not in PACKABLE_DTYPES:
        return t.contiguous()
    matrix = t.reshape(1, -1) if t.dim() == 1 else t
    rows = matrix.shape[0]
    cols = matrix.numel() // max(rows, 1)
    if packed_bytes(rows, cols, stored_count(matrix), t.element_size()) >= t.numel() * t.element_size():
        return t.contiguous()
    return PackedTensor.from_weight(matrix.cpu())


def save_delta(delta: SparseDelta, folder: str | Path, report: dict | None = None, overwrite: bool = False) -> dict:
    """Write ``delta`` as a delta folder (atomically); returns its sizes: the file against the same delta dense."""
    tensors = {name: _file_tensor(name, t.detach().cpu()) for name, t in delta.tensors.items()}
    record = {
        "format": DELTA_FORMAT,
        "version": DELTA_VERSION,
        "base_sha256": delta.base_sha256,
        "architecture": delta.architecture,
        "recipe": delta.recipe,
        "tensors": {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for name, t in delta.tensors.items()},
    }
    dense = sum(t.numel() * t.element_size() for t in delta.tensors.values())
    packed = [name for name, t in tensors.items() if isinstance(t, PackedTensor)]
    numel = delta.numel()
    nnz = delta.nnz()
    dtype = next(iter(delta.tensors.values())).dtype if delta.tensors else torch.float32
    sizes = {
        "tensors": len(tensors),
        "packed_tensors": len(packed),
        "dense_tensors": len(tensors) - len(packed),
        "numel": numel,
        "nnz": nnz,
        "kept_fraction": nnz / max(numel, 1),
        "dense_delta_bytes": dense,
    }
    try:
        with AtomicFolder(folder, overwrite) as tmp:
            write_sparse(tmp / DELTA_WEIGHTS, tensors, {}, dtype)
            (tmp / DELTA_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            sizes["delta_file_bytes"] = (tmp / DELTA_WEIGHTS).stat().st_size
            sizes["delta_ratio"] = sizes["delta_file_bytes"] / max(dense, 1)
            if report is not None:
                (tmp / REPORT_NAME).write_text(json.dumps({**report, "bytes": sizes}, indent=2) + "\n")
    except OSError as exc:
        raise SecateursError(f"cannot save to {folder}: {exc.strerror or exc}") from None
    return sizes


def is_delta_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved delta (``delta.json``)."""
    return (Path(folder).expanduser() / DELTA_RECORD).is_file()


def _record(folder: Path) -> dict:
    path = folder / DELTA_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SecateursError(f"cannot read {path}: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != DELTA_FORMAT:
        raise SecateursError(f"{path} is not a {DELTA_FORMAT} record")
    if record.get("version") != DELTA_VERSION:
        raise SecateursError(f"{path} is {DELTA_FORMAT} version {record.get('version')!r}; this reads {DELTA_VERSION}")
    entries = record.get("tensors")
    if not isinstance(entries, dict) or not isinstance(record.get("base_sha256"), str):
        raise SecateursError(f"{path}: malformed record (tensors, base_sha256)")
    for name, entry in entries.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise SecateursError(f"{path}: malformed shape for {name}: {entry!r}")
    return record


def load_delta(folder: str | Path) -> SparseDelta:
    """A saved delta back, bit for bit (checksums and shapes checked; one clear error otherwise)."""
    folder = Path(folder).expanduser()
    if not is_delta_folder(folder):
        raise SecateursError(f"{folder} is not a delta folder (no {DELTA_RECORD})")
    record = _record(folder)
    shapes = {name: tuple(entry["shape"]) for name, entry in record["tensors"].items()}
    # packed 1-D weights are stored as one row: the file holds [1, n] for them
    expected = {
        name: (1, shape[0]) if len(shape) == 1 and name.endswith(".weight") else shape for name, shape in shapes.items()
    }
    path = folder / DELTA_WEIGHTS
    if not path.is_file():
        raise SecateursError(f"{folder} has {DELTA_RECORD} but no {DELTA_WEIGHTS}")
    header = read_header(path)
    file_shapes = {name: expected[name] if name in header.packed else shapes[name] for name in shapes}
    dense, packed = read_tensors(path, header, file_shapes)
    tensors = {}
    for name, shape in shapes.items():
        t = packed[name].to_held() if name in packed else dense[name]
        tensors[name] = t.reshape(shape)
    return SparseDelta(tensors, record["base_sha256"], record.get("recipe") or {}, record.get("architecture"))
