"""Attacks: poisoning plans (all-to-one, all-to-all, clean-label, multi-trigger multi-target).

``poison_training_set(data, make_trigger("patch", data.shape), target=0, rate=0.1)`` returns the
poisoned training set and a `PoisonInfo`; `make_poisoned_test_set` builds the evaluation set with
true labels and per-image attack targets, scored by `attack_success`.
"""

from __future__ import annotations

from backdoorlab.attacks.poison import (
    MODES,
    MultiPoisonInfo,
    PoisonInfo,
    all2all_targets,
    attack_success,
    make_poisoned_test_set,
    poison_training_set,
    poison_training_set_multi,
)

__all__ = ["MODES", "MultiPoisonInfo", "PoisonInfo", "all2all_targets", "attack_success",
           "make_poisoned_test_set", "poison_training_set", "poison_training_set_multi"]
