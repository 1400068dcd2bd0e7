"""Defenses: one module per method, each a function or small class returning a typed result.

- `pruning`: the fast channel-pruning sweep of Fine-Pruning (Liu et al., RAID 2018);
- `masking`: channel masks applied to weights (pruned models are ordinary models);
- `goodnet`: the BadNet + repaired-network vote with an extra "backdoored" class (CSAW-HackML).
"""

from backdoorlab.defenses.goodnet import GoodNet, GoodNetMetrics, goodnet_metrics, make_goodnet
from backdoorlab.defenses.masking import apply_channel_mask, mask_from_channels, resolve_target
from backdoorlab.defenses.pruning import PruneSweepResult, Threshold, find_thresholds, prune_sweep

__all__ = [
    "GoodNet", "GoodNetMetrics", "PruneSweepResult", "Threshold", "apply_channel_mask",
    "find_thresholds", "goodnet_metrics", "make_goodnet", "mask_from_channels", "prune_sweep",
    "resolve_target",
]
