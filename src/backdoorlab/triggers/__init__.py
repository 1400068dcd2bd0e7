"""Triggers: vectorised, deterministic functions on uint8 NHWC image batches.

``make_trigger("patch:size=3,pos=tl", (32, 32, 3)).apply(images)`` returns a new poisoned batch;
see `backdoorlab.triggers.registry` for the spec syntax. One trigger per module: `patch`
(BadNets), `image` (picture with alpha mask), `blend` (blended injection), `ftrojan` (frequency
domain); `stack` pairs several triggers with their own targets.
"""

from __future__ import annotations

from backdoorlab.triggers.base import Trigger
from backdoorlab.triggers.blend import BlendTrigger
from backdoorlab.triggers.ftrojan import FTrojanTrigger
from backdoorlab.triggers.image import ImageTrigger
from backdoorlab.triggers.patch import PatchTrigger
from backdoorlab.triggers.registry import TRIGGERS, make_trigger, parse_spec
from backdoorlab.triggers.stack import TriggerStack

__all__ = ["TRIGGERS", "BlendTrigger", "FTrojanTrigger", "ImageTrigger", "PatchTrigger", "Trigger",
           "TriggerStack", "make_trigger", "parse_spec"]
