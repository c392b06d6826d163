"""TPU chips and slices: peak bf16 FLOP/s and HBM per chip (Google Cloud's published figures), and a slice's
devices from its topology name without the hardware (libtpu's topology descriptions)."""

from __future__ import annotations

import dataclasses
import math

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # per chip, dense
    hbm_bytes: int  # per chip
    megacore: bool = False  # two TensorCores that JAX drives as one device (v4, v5p)


# Cloud TPU system architecture pages (v4, v5e, v5p, v6e). "GB" there is taken as 10^9 bytes where the page does
# not say GiB, so that "fits" errs on the safe side.
CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, megacore=True),
    "v5e": Chip("v5e", 197e12, 16 * 10**9),
    "v5p": Chip("v5p", 459e12, 95 * 10**9, megacore=True),
    "v6e": Chip("v6e", 918e12, 32 * 10**9),
}


def chip_of(topology: str) -> Chip:
    """The chip of a topology name such as "v5e:2x2" or "v4:2x2x4"."""
    kind, _, shape = topology.partition(":")
    if kind not in CHIPS or not shape:
        raise ValueError(f"topology {topology!r}: expected <chip>:<shape> with a chip among {sorted(CHIPS)}, "
                         "e.g. v5e:2x2, v4:2x2x4, v5p:2x2x4, v6e:4x4")
    try:
        dims = [int(d) for d in shape.split("x")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise ValueError(f"topology {topology!r}: the shape {shape!r} is not like 2x2 or 2x2x4")
    return CHIPS[kind]


def _dims(topology: str) -> tuple[int, ...]:
    chip_of(topology)
    return tuple(int(d) for d in topology.partition(":")[2].split("x"))


def chip_count(topology: str) -> int:
    return math.prod(_dims(topology))


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice (one per chip), usable in a Mesh to compile for that slice on any host; needs
    libtpu (`pip install "jax[tpu]"`), not a TPU."""
    chip = chip_of(topology)
    import os

    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu's lock file

    dims = (*_dims(topology), 1, 1)[:3]
    host = tuple(min(h, d) for h, d in zip((2, 2, 1), dims, strict=True))  # chips per host: 2x2 boards
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=1,
                                            chip_config_name="megacore" if chip.megacore else "default",
                                            chips_per_host_bounds=host)
    except Exception as e:  # libtpu missing, or a shape the chip does not come in
        raise ValueError(f"topology {topology!r}: libtpu cannot describe it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from e
    return list(desc.devices)
