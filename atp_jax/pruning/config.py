"""Every knob of visual-token pruning in one frozen config: the ATP method and the baselines."""

from __future__ import annotations

import dataclasses

METHODS = ("atp", "fastv", "pdrop", "random", "spatial", "none")


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    method: str = "atp"
    # ATP (docs/method.md, section 2)
    atp_layers: tuple[int, ...] = (4, 14, 24)  # a module after each of these decoder layers (0-indexed, of 32)
    temperature: float = 10.0  # T in sigmoid(T * (score - threshold))
    lambda_atp: float = 0.05
    lambda_target: float = 1.0
    target_ratio: float = 0.25  # rho: the average visual-token budget as a fraction of all visual tokens
    # Which average L_target binds: "batch" (|mean_i(N_i / N_img) - rho|, each instance free to keep more or
    # fewer) or "instance" (mean_i |N_i / N_img - rho|, every instance pulled to rho).
    target_scope: str = "batch"
    sap_lambda: float = 3.0
    mlp_width: int = 256
    sorted_len: int = 64  # each sorted score vector is resampled to this many values for the threshold MLP
    position_mode: str = "original"  # kept tokens keep their RoPE positions, or "contiguous"
    log_eps: float = 1e-6  # soft masks enter attention as log(D + eps)
    # Baselines
    fastv_layer: int = 2  # K: prune after layer K-1 by its last token's attention, i.e. before layer K
    fastv_ratio: float = 0.5  # R: fraction of visual tokens removed
    pdrop_layers: tuple[int, ...] = (8, 16, 24)
    pdrop_keep: float = 0.5  # fraction kept at each PyramidDrop stage
    seed: int = 0  # random baseline
    random_schedule: tuple[float, ...] = (0.5, 0.25, 0.125)  # fraction of visual tokens kept after each module
    # compact mode: the sequence's capacity after a module is rounded up to one of these fractions of the
    # prompt length, so few programs compile per prompt length. Steps of 1/16 keep the padding small where it
    # matters most: after an aggressive module, 88 real tokens of 640 run as 120, not 160.
    bucket_fractions: tuple[float, ...] = tuple(i / 16 for i in range(1, 17))

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {METHODS}")
        if self.position_mode not in ("original", "contiguous"):
            raise ValueError(f"position_mode {self.position_mode!r}: expected 'original' or 'contiguous'")
        if list(self.atp_layers) != sorted(set(self.atp_layers)):
            raise ValueError(f"atp_layers {self.atp_layers} must be increasing")
        if self.method == "random" and len(self.random_schedule) != len(self.atp_layers):
            raise ValueError(f"random_schedule {self.random_schedule} needs one fraction per module {self.atp_layers}")
        if self.target_scope not in ("batch", "instance"):
            raise ValueError(f"target_scope {self.target_scope!r}: expected 'batch' or 'instance'")
        if not 0 < self.target_ratio <= 1:
            raise ValueError(f"target_ratio {self.target_ratio} must lie in (0, 1]")

    def scaled_to(self, num_layers: int) -> PruningConfig:
        """The same relative placement on a decoder of `num_layers` (4/14/24 of 32 -> 1/3/6 of 8), rounded down,
        kept distinct and before the last layer."""

        def scale(layer: int) -> int:
            return min(num_layers - 2, layer * num_layers // 32)

        return dataclasses.replace(self, atp_layers=tuple(sorted({scale(x) for x in self.atp_layers})),
                                   pdrop_layers=tuple(sorted({max(1, scale(x)) for x in self.pdrop_layers})),
                                   fastv_layer=max(1, scale(self.fastv_layer)))


def fit_to_depth(fields: dict, num_layers: int) -> PruningConfig:
    """The config that `fields` (a run config's pruning section: any PruningConfig fields) give on a decoder of
    `num_layers`: the placements it does not name take the paper's, scaled to that depth (`scaled_to`: ATP's
    modules, FastV's layer, PyramidDrop's stages), and the random baseline halves the visual tokens at each ATP
    module. Every method then runs on the model this config is saved with.

    Example: {"atp_layers": (0, 1, 2)} on 4 layers -> fastv_layer 1, pdrop_layers (1, 2), random_schedule
    (0.5, 0.25, 0.125).
    """
    scaled = PruningConfig().scaled_to(num_layers)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    atp_layers = fields.get("atp_layers", scaled.atp_layers)
    placed = dict(atp_layers=atp_layers, fastv_layer=scaled.fastv_layer, pdrop_layers=scaled.pdrop_layers,
                  random_schedule=tuple(0.5 ** (i + 1) for i in range(len(atp_layers))))
    return PruningConfig(**(placed | fields))

