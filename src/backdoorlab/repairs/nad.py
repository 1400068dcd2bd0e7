"""Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li and Ma, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021).

Two copies of the backdoored model are tuned on the defender's clean data:

1. the **teacher** is plainly fine-tuned (cross-entropy) for ``teacher_epochs``;
2. the **student** is tuned for ``epochs`` with cross-entropy plus, at each distillation layer l,
   ``beta_l * mean((a_T - a_S)^2)``, where a is the layer's *attention map*: for an activation
   A of shape (C, H, W), the channel mean of |A|^p (p = 2), flattened to H*W values and scaled to
   unit L2 norm (`attention_map`). The teacher is frozen and runs in eval mode on the same
   augmented batch as the student. The student is the repaired model.

Numbers: the paper writes the per-layer loss as the L2 distance between the two normalised maps;
its released code, whose betas are the defaults here, takes the *mean squared* difference over
the H*W entries (and the batch). beta is calibrated to that form, so that is the form used here
(`attention_loss`). The channel mean and the channel sum give the same map after normalising.

Layers: the paper distils at the outputs of the residual groups of a WRN-16-1 (three groups). Here
``layers`` names them (``conv_4,conv_6``, or with a weight each, ``conv_4=1000,conv_6=5000``);
by default `find_layers` takes, among the network's conv stages (the stages of a `StagedNet` that
hold a convolution, the Conv2D layers of a Keras graph, else every ``nn.Conv2d``), the last one
before each change of spatial size, i.e. the output of each resolution group, and keeps the last
``num_layers`` (3) of those: layer2-layer4 of preact_resnet18, conv_2/conv_4/conv_6 of gtsrb_cnn,
conv_1-conv_3 of DeepID, conv_1/conv_2 of small_cnn.

Epoch choice: a seeded share (``select_fraction``) of the clean data is held back; the teacher
keeps its epoch of best held-back accuracy (as `backdoorlab.train.train` does), and so does the
student. Test and poisoned data are never looked at: the held-back accuracy is the only figure a
defender has, so the student's epoch is picked on accuracy alone.

Schedule, the paper's (Section 4.1, Appendix J and the released code) next to our defaults:

============================  ===========================================  ==================
setting                       paper                                        default here
============================  ===========================================  ==================
clean data                    5 % of the training set                      all of ``--valid``,
                                                                           less 20 % held back
teacher                       backdoored model fine-tuned 10 epochs        5 epochs, SGD lr
                              (the authors' notes: 5-10), SGD lr 0.01,     0.01
                              with augmentation
student epochs                10 (paper), 20 (Appendix J, released code)   10
student optimiser             SGD, momentum 0.9, weight decay 1e-4,        same (Nesterov,
                              batch 64                                     as the code)
student learning rate         0.1, then 0.01 from epoch 3 (code: a fixed    0.01 throughout
                              0.01 whatever the first; BackdoorBench,       (``lr``, ``lr_after``)
                              starting at 0.01: 0.01 throughout)
beta                          500 / 1000 / 1000 on the low / middle / high  the same (500 on the
                              group outputs (code; an earlier version of    lowest distilled
                              it: 5000 on the high one only)                layer, 1000 on the
                                                                           others)
p                             2                                            2
augmentation                  random crop (padding 4 on 32x32), flip,      crop padding =
                              Cutout (code)                                side / 8; no flip;
                                                                           no Cutout
============================  ===========================================  ==================

Epochs: the defaults are the shortest the paper and its authors use, so that a repair of a
gtsrb_cnn with 2,000 clean 32x32 images stays near 4 minutes on 2 CPU cores (a teacher epoch there
costs ~12 s, a student epoch ~19 s: the teacher runs forward on every student batch); the paper's
10 + 20 epochs would take ~8 minutes. The crop padding scales with the image (4 px is 1/8 of
CIFAR's 32 px side). Horizontal flips are off by default (``--flip`` turns them on) because
traffic signs and digits are not mirror-symmetric classes, unlike CIFAR-10's; Cutout is left out.
``beta = 0`` makes the student plain fine-tuning with the student's schedule: the same steps as
`backdoorlab.train.train` with the same seed, optimiser, learning rates and augmentation.

The paper's student learning rate (0.1) was set for a WRN trained with SGD at that rate; the
default here is BackdoorBench's 0.01 (its NAD configuration, Wu et al., NeurIPS 2022 D&B). On
networks trained with Adam at 1e-3, 0.1 wrecks the model in the first epoch, with or without
distillation (measured: the digits small_cnn and a GTSRB gtsrb_cnn BadNet both fall to chance
accuracy; ``--lr 0.1`` gives the paper's setting). At 0.01, on that GTSRB BadNet with 1,960 clean
images (revision of 2026-12-06: beta 5000 on each layer, lr 0.001 after epoch 2): ASR 96.5 % ->
0.0 %, accuracy 98.2 % -> 92.2 %, where plain fine-tuning with the same schedule (``--beta 0``)
left 50.6 % ASR. Until 2026-12-07 the student's rate was divided by 10 after ``lr_drop_epoch``
(0.001 here; the code sets 0.01) and every layer had beta 5000 (5-10 times the code's): the
student collapsed in its first epoch (held-back accuracy 44-70 % on the GTSRB grid's models) and
was still recovering when its 10 epochs at 0.001 ended (kept epoch 9 or 10): 6-16 points of clean
accuracy lost (docs/repairs-gtsrb.md). A note is added when the student ends more than 10
points of held-back accuracy below the teacher.

Details: the layers with their beta and output shape, the crop padding, the tuning and held-back
image counts; for the teacher its best epoch and held-back accuracy and per-epoch loss; for the
student its best epoch, held-back accuracy and per epoch ``loss`` = ``ce`` + ``attention`` (the
sum of beta * attention loss, also ``attention_per_layer``), training and held-back accuracy and
learning rate, averaged over the tuning images.
"""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired, tuning_split
from backdoorlab.repairs._options import TuneOptions

WEIGHT_DECAY = 1e-4  # the paper's
CODE_BETAS = (500.0, 1000.0, 1000.0)  # the released code's low, middle and high layer weights


@dataclass
class Options(TuneOptions):
    epochs: int = opt(10, "student (distillation) epochs; the best on held-back data is kept "
                      "(paper: 10; Appendix J and the released code: 20)", low=1, high=100_000)
    lr: float = opt(0.01, "student learning rate for the first lr_drop_epoch epochs (paper: 0.1 for "
                    "a WRN trained at 0.1; BackdoorBench: 0.01)", low=0, high=10, low_open=True)
    lr_after: float = opt(0.01, "student learning rate from lr_drop_epoch on (released code: 0.01, "
                          "whatever the first)", low=0, high=10, low_open=True)
    optimizer: str = opt("sgd", "optimizer of teacher and student (paper: SGD, momentum 0.9, "
                         "weight decay 1e-4)", choices=("sgd", "adam"))
    lr_drop_epoch: int = opt(2, "epochs before the student learning rate becomes lr_after "
                             "(released code: 2)", low=1, high=100_000)
    teacher_epochs: int = opt(5, "teacher fine-tuning epochs (paper: 10; the authors' notes: "
                              "5-10)", low=1, high=100_000)
    teacher_lr: float = opt(0.01, "teacher learning rate (paper: 0.01)", low=0, high=10,
                            low_open=True)
    beta: float | None = opt(None, "weight of each layer's attention loss (default: the released "
                             "code's 500 on the lowest distilled layer, 1000 on the others); 0 = "
                             "plain fine-tuning", low=0, high=1e9)
    p: float = opt(2.0, "power of |activation| in the attention map (paper: 2)", low=0,
                   high=16, low_open=True)
    layers: str | None = opt(None, "distillation layers, comma-separated, each optionally "
                             "NAME=BETA (default: the last num_layers resolution-group outputs)")
    num_layers: int = opt(3, "how many group outputs to distil at when layers is not given "
                          "(paper: 3 residual groups)", low=1, high=1000)
    crop_padding: int | None = opt(None, "random-crop padding in pixels (default: 1/8 of the "
                                   "shorter image side; paper: 4 on 32x32)", low=0, high=4096)
    flip: bool = opt(False, "random horizontal flips (paper: on, for CIFAR-10)")


# -- attention maps --------------------------------------------------------------------------------

def attention_map(a, p: float = 2.0, eps: float = 1e-12):
    """NAD's attention map of activations ``a`` (N, C, H, W): the channel mean of ``|a|^p``,
    flattened to (N, H*W) and divided by its L2 norm (a map of zeros stays zero)."""
    m = a.abs().pow(p).mean(dim=1).flatten(1)
    return m / m.norm(dim=1, keepdim=True).clamp_min(eps)


def attention_loss(student, teacher, p: float = 2.0):
    """Mean squared difference of the two attention maps (over the batch and the H*W entries)."""
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


# -- layers ----------------------------------------------------------------------------------------

def _candidates(clf) -> list[tuple[str, object]]:
    """(name `clf.layer` accepts, module) of the layers that may be distilled, in model order."""
    from torch import nn

    net = clf.net
    keras = getattr(net, "keys", None)
    if isinstance(keras, dict):  # a KerasGraph: its Conv2D layers, by Keras name
        order = list(getattr(net, "order", keras))
        return [(k, net.module(k)) for k in order if isinstance(net.module(k), nn.Conv2d)]
    stages = getattr(net, "stages", None)
    if isinstance(stages, nn.ModuleDict):  # a StagedNet: the stages that hold a convolution
        return [(k, m) for k, m in stages.items()
                if any(isinstance(x, nn.Conv2d) for x in m.modules())]
    return [(k, m) for k, m in net.named_modules() if k and isinstance(m, nn.Conv2d)]


def _output_shapes(clf, modules: list[tuple[str, object]]) -> list[tuple[str, tuple]]:
    """(name, output shape without batch) of ``modules``, in the order one forward pass runs them
    (a zero image; modules not run or called again keep their first output)."""
    import numpy as np
    import torch

    seen: dict[str, tuple] = {}
    order: list[str] = []

    def hook(name):
        def fn(_m, _i, out):
            if name not in seen and isinstance(out, torch.Tensor):
                seen[name] = tuple(out.shape[1:])
                order.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules]
    try:
        clf.net.eval()
        with torch.no_grad(), clf.autocast():
            clf.net(clf.to_tensor(np.zeros((1, *clf.spec.shape), np.uint8)))
    finally:
        for h in handles:
            h.remove()
    return [(n, seen[n]) for n in order]


def find_layers(clf, k: int = 3) -> list[str]:
    """The default distillation layers: of the conv stages (see the module docstring) with a
    (C, H, W) output, the last one of each run of equal spatial size (the output of each
    resolution group, as the paper's residual groups), the last ``k`` of those."""
    from backdoorlab.errors import BadInput

    shapes = [(n, s) for n, s in _output_shapes(clf, _candidates(clf)) if len(s) == 3]
    groups: list[str] = []
    for i, (name, s) in enumerate(shapes):
        if i + 1 == len(shapes) or shapes[i + 1][1][1:] != s[1:]:
            groups.append(name)
    if not groups:
        raise BadInput(f"nad: no convolutional layer with a (C, H, W) output found in {clf.arch!r}; "
                       "name the layers with --layers")
    return groups[-k:]


def code_beta(i: int, n: int) -> float:
    """The released code's weight of the i-th of n distillation layers (low to high): 500 on the
    lowest, 1000 on the others (its beta1-beta3 for the three groups of a WRN-16-1)."""
    return CODE_BETAS[0] if i == 0 and n > 1 else CODE_BETAS[-1]


def parse_layers(text: str, beta: float | None) -> list[tuple[str, float | None]]:
    """``a,b=1000`` → [("a", beta), ("b", 1000.0)] (None: the code's weight for its place)."""
    import math

    from backdoorlab.errors import BadInput

    out: list[tuple[str, float | None]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, w = part.rpartition("=") if "=" in part else (part, "", "")
        name = name.strip()
        if sep:
            try:
                weight = float(w)
            except ValueError:
                raise BadInput(f"nad: layer weight {w!r} of {name!r} is not a number") from None
            if not math.isfinite(weight) or weight < 0:
                raise BadInput(f"nad: layer weight of {name!r} must be a finite number >= 0, got {w}")
        else:
            weight = beta
        if not name:
            raise BadInput(f"nad: {part!r} names no layer")
        if any(name == n for n, _ in out):
            raise BadInput(f"nad: layer {name!r} named twice")
        out.append((name, weight))
    if not out:
        raise BadInput("nad: --layers names no layer")
    return out


# -- the two trainings ----------------------------------------------------------------------------

def crop_padding(clf, o: Options) -> int:
    """``o.crop_padding``, or 1/8 of the shorter image side (the paper's 4 px on 32x32)."""
    h, w, _ = clf.spec.shape
    return o.crop_padding if o.crop_padding is not None else max(0, round(min(h, w) / 8))


def fine_tune_teacher(clf, tune, select, o: Options):
    """(teacher, its `TrainLog`): a copy of ``clf`` fine-tuned on ``tune``, its best epoch on
    ``select`` kept; frozen, in eval mode."""
    from backdoorlab.train import TrainConfig, train

    teacher = clf.copy()
    cfg = TrainConfig(epochs=o.teacher_epochs, lr=o.teacher_lr, batch_size=o.batch_size,
                      optimizer=o.optimizer, weight_decay=WEIGHT_DECAY, schedule="none",
                      crop_padding=crop_padding(clf, o), flip=o.flip, seed=o.seed)
    log = train(teacher, tune, select, cfg, desc="nad teacher")
    teacher.net.eval()
    for prm in teacher.net.parameters():
        prm.requires_grad_(False)
    return teacher, log


def distil(student, teacher, tune, select, layers: list[tuple[str, float]], o: Options) -> dict:
    """Train ``student`` in place on ``tune`` with cross-entropy + sum of beta * `attention_loss`
    to ``teacher`` at ``layers`` ((name, beta) pairs; beta 0 adds nothing); keep the epoch of best
    accuracy on ``select``. Returns {"best_epoch", "select_accuracy", "per_epoch", "notes"}."""
    import copy
    import math

    import torch
    from torch import nn

    from backdoorlab.augment import augment
    from backdoorlab.evaluation import accuracy
    from backdoorlab.progress import progress
    from backdoorlab.train import TrainConfig, _optimizer

    active = [(n, b) for n, b in layers if b > 0]
    pad = crop_padding(student, o)
    net, tnet = student.net, teacher.net
    tnet.eval()
    feats: dict[str, dict] = {"s": {}, "t": {}}

    def keep(side: str, name: str):
        def fn(_m, _i, out):
            feats[side][name] = out
        return fn

    handles = [student.layer(n).register_forward_hook(keep("s", n)) for n, _ in active]
    handles += [teacher.layer(n).register_forward_hook(keep("t", n)) for n, _ in active]
    cfg = TrainConfig(epochs=o.epochs, lr=o.lr, batch_size=o.batch_size, optimizer=o.optimizer,
                      weight_decay=WEIGHT_DECAY, seed=o.seed)
    torch.manual_seed(o.seed)  # as `backdoorlab.train.train`: beta 0 gives its very steps
    gen = torch.Generator().manual_seed(o.seed)  # CPU-only, as train's: host permutations and crops
    optim = _optimizer(net.parameters(), cfg)
    ce = nn.CrossEntropyLoss()
    x_all, y_all = torch.from_numpy(tune.images), torch.from_numpy(tune.require_labels())
    n = len(tune)
    epochs: list[dict] = []
    notes: list[str] = []
    best_state, best_acc, best_epoch = None, -1.0, 0
    try:
        for epoch in range(o.epochs):
            lr = o.lr_after if epoch >= o.lr_drop_epoch else o.lr
            for g in optim.param_groups:
                g["lr"] = lr
            net.train()
            perm = torch.randperm(n, generator=gen)
            sums = {"loss": 0.0, "ce": 0.0, "attention": 0.0}
            per_layer = dict.fromkeys((nm for nm, _ in active), 0.0)
            correct, diverged = 0, False
            batches = range(0, n, o.batch_size)
            for i in progress(batches, desc=f"nad student epoch {epoch + 1}/{o.epochs}",
                              total=len(batches), unit="batch"):
                idx = perm[i:i + o.batch_size]
                xb = student.to_tensor(augment(x_all[idx], gen, pad, o.flip))
                yb = y_all[idx].to(student.device, non_blocking=True)
                with student.autocast():
                    out = net(xb)
                loss = ce_loss = ce(out.float(), yb)
                if active:
                    with torch.no_grad(), teacher.autocast():
                        tnet(xb)
                    terms = [b * attention_loss(feats["s"][nm].float(), feats["t"][nm].float(), o.p)
                             for nm, b in active]
                    for (nm, _), term in zip(active, terms, strict=True):
                        per_layer[nm] += term.item() * len(idx)
                    at = torch.stack(terms).sum()
                    loss = ce_loss + at
                    sums["attention"] += at.item() * len(idx)
                if not math.isfinite(loss.item()):
                    diverged = True
                    break
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                sums["loss"] += loss.item() * len(idx)
                sums["ce"] += ce_loss.item() * len(idx)
                correct += int((out.argmax(1) == yb).sum())
            net.eval()
            if diverged:
                notes.append(f"the student's loss became non-finite in epoch {epoch + 1}; "
                             "training stopped there")
                break
            acc = accuracy(student, select)
            epochs.append({"epoch": epoch + 1, **{k: v / n for k, v in sums.items()},
                           "attention_per_layer": {k: v / n for k, v in per_layer.items()},
                           "train_accuracy": correct / n, "select_accuracy": acc, "lr": lr})
            if acc > best_acc:
                best_acc, best_epoch = acc, epoch + 1
                best_state = copy.deepcopy(net.state_dict())
    finally:
        for hd in handles:
            hd.remove()
        feats.clear()
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return {"best_epoch": best_epoch, "select_accuracy": best_acc if best_state is not None else None,
            "per_epoch": epochs, "notes": notes}


def resolve_layers(clf, o: Options) -> tuple[list[tuple[str, float]], dict[str, tuple]]:
    """((name, beta) per distillation layer, name → output shape (C, H, W)); BadInput for an
    unknown layer or one without a (C, H, W) output."""
    from backdoorlab.errors import BadInput

    if o.layers:
        chosen = parse_layers(o.layers, o.beta)
        for name, _ in chosen:
            clf.layer(name)  # BadInput for an unknown name
    else:
        chosen = [(name, o.beta) for name in find_layers(clf, o.num_layers)]
    chosen = [(name, code_beta(i, len(chosen)) if b is None else b)
              for i, (name, b) in enumerate(chosen)]
    shapes = dict(_output_shapes(clf, [(n, clf.layer(n)) for n, _ in chosen]))
    for name, _ in chosen:
        if len(shapes.get(name, ())) != 3:
            raise BadInput(f"nad: layer {name!r} outputs shape {shapes.get(name, 'nothing')}; "
                           "attention maps need a (channels, height, width) feature map")
    return chosen, shapes


# -- the repair ------------------------------------------------------------------------------------

@register("nad", "repair", Options,
          paper="Li et al., Neural Attention Distillation, ICLR 2021",
          summary="fine-tune a teacher on clean data, then distil its attention maps into the model",
          paper_setting="5 % of the training set; teacher 10 epochs SGD lr 0.01; student 10-20 "
                        "epochs SGD lr 0.1 then 0.01 from epoch 3, beta 500/1000/1000 (code), p 2 "
                        "(WRN-16-1, CIFAR-10)")
def run(clf, data: DefenderData, o: Options) -> Repaired:

    tune, select = tuning_split(clf, data, o.select_fraction, o.seed, "nad")
    chosen, shapes = resolve_layers(clf, o)
    teacher, tlog = fine_tune_teacher(clf, tune, select, o)
    student = clf.copy()
    res = distil(student, teacher, tune, select, chosen, o)
    notes = list(res["notes"])
    if res["select_accuracy"] is None:
        notes.append("no student epoch finished: the model is returned as given")
        student = clf.copy()
    elif res["select_accuracy"] < tlog.best_valid_accuracy - 0.1:
        notes.append(f"the student's held-back accuracy ({100 * res['select_accuracy']:.1f} %) is "
                     f"more than 10 points below the teacher's ({100 * tlog.best_valid_accuracy:.1f} %): "
                     "the student's learning rate may be too high for this network (--lr)")
    names = [n for n, _ in chosen]
    details = {
        "layers": [{"name": nm, "beta": b, "shape": list(shapes[nm])} for nm, b in chosen],
        "p": o.p, "crop_padding": crop_padding(clf, o), "flip": o.flip,
        "tune_images": len(tune), "select_images": len(select),
        "teacher": {"epochs": o.teacher_epochs, "best_epoch": tlog.best_epoch,
                    "select_accuracy": tlog.best_valid_accuracy,
                    "per_epoch": [{k: e[k] for k in ("epoch", "loss", "train_accuracy",
                                                     "valid_accuracy") if k in e}
                                  for e in tlog.epochs]},
        "student": {"epochs": o.epochs, "best_epoch": res["best_epoch"],
                    "select_accuracy": res["select_accuracy"], "per_epoch": res["per_epoch"]},
    }
    acc = res["select_accuracy"]
    summary = (f"distilled at {', '.join(names)}; held-back accuracy teacher "
               f"{100 * tlog.best_valid_accuracy:.1f} %, student "
               f"{'n/a' if acc is None else f'{100 * acc:.1f} %'} (epoch {res['best_epoch']}/{o.epochs})")
    return Repaired(student, details, notes, summary)
