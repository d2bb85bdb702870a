"""Every picture of the pipeline: data overview, mask overlays, split, training curves, validation
F2, threshold tuning, error reports (and the readers of the training logs they plot).

Every ``plot_*`` function returns a ``matplotlib.figure.Figure`` built without pyplot, so nothing
depends on the active backend or leaks open figures: a notebook cell that ends with the call
displays it (``%matplotlib inline`` registers the formatter), a script saves it with
:func:`save_figure` (atomically). :func:`draw_outlines` draws onto an image array (TensorBoard,
quicklooks).

Overlays, one convention everywhere: **predicted masks filled red, true masks outlined green**
(:func:`overlay_masks`). Masks are ``(N, H, W)`` bool in image pixel order (row, column): from the
dataset dicts' COCO RLE (``module_rle.coco_to_masks``) or Kaggle RLE (``module_rle.rle_decode``).

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from module_config import STAGE_FOLDER
from module_files import atomic_path, read_image, read_segmentation_csv
from module_metric import f2_image
from module_rle import coco_area, coco_to_masks, rle_decode

FILL_COLOUR = np.array([1.0, 0.15, 0.1])  # fill of predicted masks (and of the ground truth shown alone)
OUTLINE_COLOUR = np.array([0.1, 1.0, 0.1])  # outline of true masks


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Write ``fig`` to ``path`` (the format from its suffix), atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return path


def get_ship_table(dicts: Sequence[dict]) -> pd.DataFrame:
    """One row per ship: ``image_id``, ``area`` (px, from the COCO RLE), ``n_ships`` of its image.

    Ship-free images contribute no row; use :func:`get_image_table` for per-image counts.
    """
    rows = []
    for record in dicts:
        anns = record["annotations"]
        areas = coco_area([a["segmentation"] for a in anns]).tolist()
        rows += [{"image_id": record["image_id"], "area": float(area), "n_ships": len(anns)} for area in areas]
    return pd.DataFrame(rows, columns=["image_id", "area", "n_ships"])


def get_image_table(dicts: Sequence[dict]) -> pd.DataFrame:
    """One row per image: ``image_id``, ``n_ships``, ``height``, ``width``."""
    return pd.DataFrame(
        [{"image_id": r["image_id"], "n_ships": len(r["annotations"]), "height": r["height"], "width": r["width"]}
         for r in dicts],
        columns=["image_id", "n_ships", "height", "width"],
    )


def summarize_dataset(dicts: Sequence[dict]) -> pd.DataFrame:
    """A one-column table of counts: images, ship-free share, ships, ships per image, mask areas."""
    images, ships = get_image_table(dicts), get_ship_table(dicts)
    empty = int((images["n_ships"] == 0).sum())
    stats = {
        "images": len(images),
        "ship-free images": empty,
        "ship-free fraction": round(empty / max(len(images), 1), 3),
        "ships": len(ships),
        "max ships in one image": int(images["n_ships"].max()) if len(images) else 0,
        "median ship area (px)": float(ships["area"].median()) if len(ships) else float("nan"),
        "smallest ship (px)": float(ships["area"].min()) if len(ships) else float("nan"),
        "largest ship (px)": float(ships["area"].max()) if len(ships) else float("nan"),
        "image size (px)": ", ".join(sorted({f"{h}x{w}" for h, w in zip(images["height"], images["width"])})),
    }
    return pd.Series(stats, name="value").to_frame()


def plot_data_overview(dicts: Sequence[dict], title: str = "training data") -> Figure:
    """Ships per image (the ship-free bar annotated with its share) and the ship-size histogram."""
    images, ships = get_image_table(dicts), get_ship_table(dicts)
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    count_ax, size_ax = fig.subplots(1, 2)
    counts = images["n_ships"].value_counts().sort_index()
    bars = count_ax.bar(counts.index, counts.values, color=["tab:gray"] + ["tab:blue"] * (len(counts) - 1)
                        if len(counts) and counts.index[0] == 0 else "tab:blue")
    if 0 in counts.index:
        share = counts[0] / len(images)
        count_ax.annotate(f"ship-free: {share:.0%}", (0, counts[0]), ha="left", va="bottom",
                          xytext=(6, 2), textcoords="offset points")
    count_ax.set(xlabel="ships in the image", ylabel="images", title=f"{title}: {len(images)} images")
    count_ax.bar_label(bars, fontsize=7)
    if len(ships):
        areas = ships["area"].to_numpy()
        edges = np.logspace(np.log10(max(areas.min(), 1)), np.log10(areas.max() + 1), 30)
        size_ax.hist(areas, bins=edges, color="tab:blue")
        size_ax.set_xscale("log")
        size_ax.axvline(float(np.median(areas)), color="tab:red", linestyle="--",
                        label=f"median {np.median(areas):.0f} px")
        size_ax.legend()
    size_ax.set(xlabel="ship area (px, log scale)", ylabel="ships", title=f"ship sizes: {len(ships)} ships")
    return fig


def overlay_masks(image: np.ndarray, fill: Sequence[np.ndarray] = (), outline: Sequence[np.ndarray] = (),
                  alpha: float = 0.45) -> np.ndarray:
    """``image`` ``(H, W, 3)`` uint8 with the ``fill`` masks filled red and the ``outline`` masks
    outlined green (each an ``(H, W)`` 0/1 array; predictions and truth). Returns ``(H, W, 3)``
    float32 in [0, 1]."""
    from skimage.segmentation import find_boundaries

    canvas = image.astype(np.float32) / 255.0
    for masks, draw in ((fill, "fill"), (outline, "outline")):
        for mask in masks:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != canvas.shape[:2]:
                raise ValueError(f"mask shape {mask.shape} does not match the image {canvas.shape[:2]}")
            if draw == "fill":
                canvas[mask] = (1 - alpha) * canvas[mask] + alpha * FILL_COLOUR
            else:
                # outside the mask: the red fill of a thin prediction on it stays visible
                canvas[find_boundaries(mask, mode="outer")] = OUTLINE_COLOUR
    return canvas


def draw_outlines(image: np.ndarray, true_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray],
                  thickness: int = 1) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB copy of ``image`` with true mask outlines in green and predicted ones
    in red, drawn by OpenCV (cheap: TensorBoard images, quicklooks)."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    for masks, colour in ((true_masks, (0, 255, 0)), (pred_masks, (255, 0, 0))):
        for mask in masks:
            contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def _image_grid(n_images: int, columns: int, cell_height: float) -> tuple[Figure, np.ndarray]:
    """A figure of ``n_images`` image cells, ``columns`` wide (fewer if fewer images), axes off."""
    columns = max(1, min(columns, n_images))
    rows = max(1, math.ceil(n_images / columns))
    fig = Figure(figsize=(3.2 * columns, cell_height * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    return fig, axes


def plot_ground_truth(dicts: Sequence[dict], count: int = 8, seed: int = 0, columns: int = 4) -> Figure:
    """Ground-truth overlays of ``count`` images, ships-first (up to one in four ship-free), seeded."""
    rng = np.random.default_rng(seed)
    ship = [r for r in dicts if r["annotations"]]
    free = [r for r in dicts if not r["annotations"]]
    n_free = min(len(free), count // 4 if ship else count)
    n_ship = min(len(ship), count - n_free)
    chosen = [ship[k] for k in sorted(rng.choice(len(ship), n_ship, replace=False))] if n_ship else []
    chosen += [free[k] for k in sorted(rng.choice(len(free), n_free, replace=False))] if n_free else []
    fig, axes = _image_grid(len(chosen), columns, cell_height=3.4)
    for ax, record in zip(axes, chosen):
        masks = coco_to_masks([a["segmentation"] for a in record["annotations"]], (record["height"], record["width"]))
        ax.imshow(overlay_masks(read_image(record["file_name"]), fill=masks, outline=masks))
        ax.set_title(f"{record['image_id']}: {len(masks)} ships", fontsize=9)
    fig.suptitle("ground truth (red fill, green outline)")
    return fig


def plot_split(train_dicts: Sequence[dict], val_dicts: Sequence[dict]) -> Figure:
    """Ships-per-image distribution of the two splits side by side (the split is stratified on it)."""
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    ax = fig.subplots()
    train = get_image_table(train_dicts)["n_ships"].value_counts(normalize=True).sort_index()
    val = get_image_table(val_dicts)["n_ships"].value_counts(normalize=True).sort_index()
    index = sorted(set(train.index) | set(val.index))
    x = np.arange(len(index))
    ax.bar(x - 0.2, train.reindex(index, fill_value=0), 0.4, label=f"train ({len(train_dicts)} images)")
    ax.bar(x + 0.2, val.reindex(index, fill_value=0), 0.4, label=f"validation ({len(val_dicts)} images)")
    ax.set_xticks(x, [str(i) for i in index])
    ax.set(xlabel="ships in the image", ylabel="share of images", title="train / validation split")
    ax.legend()
    return fig


def plot_history(history: pd.DataFrame, x: str = "epoch", title: str = "training") -> Figure:
    """Line plots of every numeric column of ``history`` against ``x``: losses left, metrics right."""
    numeric = [c for c in history.columns if c != x and pd.api.types.is_numeric_dtype(history[c])]
    losses = [c for c in numeric if "loss" in c]
    metrics = [c for c in numeric if c not in losses]
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    for column in losses:
        loss_ax.plot(history[x], history[column], marker="o", label=column)
    for column in metrics:
        metric_ax.plot(history[x], history[column], marker="o", label=column)
    loss_ax.set(xlabel=x, ylabel="loss", title=f"{title}: losses")
    metric_ax.set(xlabel=x, title=f"{title}: validation metrics")
    for ax in (loss_ax, metric_ax):
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def plot_gate_report(table: pd.DataFrame, auc: float, n_images: int) -> Figure:
    """The classifier gate on the validation split: precision, recall and the share of images kept
    against the threshold (left), and the precision-recall curve (right). ``table``:
    ``module_classifier.get_threshold_table``."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_t, ax_pr = fig.subplots(1, 2)
    for column in ("precision", "recall", "kept_fraction"):
        ax_t.plot(table["threshold"], table[column], marker=".", label=column)
    ax_t.set(xlabel="threshold on p_ship", ylim=(-0.02, 1.02), title="ship gate on the validation split")
    ax_t.legend()
    ax_t.grid(alpha=0.3)
    ax_pr.plot(table["recall"], table["precision"], marker=".")
    ax_pr.set(xlabel="recall (ship images kept)", ylabel="precision", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
              title=f"precision-recall, ROC AUC {auc:.3f} ({n_images} images)")
    ax_pr.grid(alpha=0.3)
    return fig


def plot_tune_grid(grid: pd.DataFrame, classifier: float, score: float, min_area: int) -> Figure:
    """F2 against each threshold (the best F2 over the other two), the chosen values marked.
    ``grid``: one row per setting, columns classifier_threshold, score_threshold, min_area, f2."""
    panels = [("classifier_threshold", classifier, "classifier threshold (p_ship)"),
              ("score_threshold", score, "detection score threshold"),
              ("min_area", min_area, "minimum mask area (px)")]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (column, value, label) in zip(axes, panels):
        profile = grid.groupby(column)["f2"].max()
        ax.plot(profile.index, profile.values, marker="o")
        ax.axvline(value, color="tab:red", linestyle="--", label=f"chosen {value:g}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower center")
    axes[0].set_ylabel("validation F2 (best over the others)")
    fig.suptitle(f"Threshold tuning: best F2 {grid['f2'].max():.4f}")
    return fig


def read_detectron2_metrics(path: str | os.PathLike) -> pd.DataFrame:
    """detectron2's ``metrics.json`` (one JSON object per line) as a DataFrame sorted by iteration."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    frame = pd.DataFrame(rows)
    return frame.sort_values("iteration").reset_index(drop=True) if len(frame) else frame


def plot_detector_curves(stage_metrics: dict[str, pd.DataFrame], loss: str = "total_loss",
                         metric: str | None = None) -> Figure:
    """Training loss (left) and a validation metric (right) over the stages, laid end to end.

    ``stage_metrics`` maps a stage name to its detectron2 metrics frame (``iteration`` plus
    scalar columns); ``metric`` defaults to the first column whose name contains ``F2``.
    """
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    offset = 0
    for name, frame in stage_metrics.items():
        if not len(frame):
            continue
        if metric is None:
            metric = next((c for c in frame.columns if "f2" in c.lower()), None)
        iterations = frame["iteration"] + offset
        if loss in frame:
            rows = frame[loss].notna()
            loss_ax.plot(iterations[rows], frame.loc[rows, loss], label=name)
        if metric and metric in frame:
            rows = frame[metric].notna()
            metric_ax.plot(iterations[rows], frame.loc[rows, metric], marker="o", label=name)
        offset = int(iterations.max()) + 1
        for ax in (loss_ax, metric_ax):
            ax.axvline(offset, color="gray", linewidth=0.6, linestyle=":")
    loss_ax.set(xlabel="iteration (stages end to end)", ylabel=loss, title="detector: training loss")
    metric_ax.set(xlabel="iteration (stages end to end)", ylabel=metric or "validation metric",
                  title=f"detector: validation {metric or '(none logged)'}")
    for ax in (loss_ax, metric_ax):
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def show_image(path: str | os.PathLike):
    """A PNG written by the pipeline, as an object a notebook cell displays."""
    from IPython.display import Image

    return Image(filename=str(path))


def read_stage_metrics(detector_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Each stage's ``metrics.json`` under ``detector_dir``, by stage name, in stage order.

    Folders an earlier run was moved to (``stage1_256.old-<time>``) and stages without a
    ``metrics.json`` yet are left out.
    """
    stages = []
    for folder in Path(detector_dir).glob("stage*"):
        match = STAGE_FOLDER.match(folder.name)
        if match and folder.is_dir() and (folder / "metrics.json").is_file():
            stages.append((int(match.group(1)), folder))
    return {folder.name: read_detectron2_metrics(folder / "metrics.json") for _, folder in sorted(stages)}


def read_validation_metrics(detector_dir: str | os.PathLike) -> pd.DataFrame:
    """The validation hook's ``val_metrics.jsonl``: one row per evaluation, of the latest run only.

    The file is appended to across runs; a stage's latest run starts where its iteration goes
    down again, and only those rows are kept. Columns as written by module_train (``stage``,
    ``input_size``, ``iteration``, ``f2``, ``f2_ships``, ``f2_empty``, ``f2_all_empty_baseline``,
    ...), sorted by stage and iteration.
    """
    path = Path(detector_dir) / "val_metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    frame = pd.DataFrame(rows)
    if not len(frame):
        return frame
    keep = []
    for _, part in frame.groupby("stage", sort=True):
        restarts = np.flatnonzero(np.diff(part["iteration"].to_numpy()) <= 0)
        keep.append(part.iloc[restarts[-1] + 1:] if len(restarts) else part)
    return pd.concat(keep).sort_values(["stage", "iteration"]).reset_index(drop=True)


def plot_validation_f2(records: pd.DataFrame) -> Figure:
    """Validation F2 (all images, images with ships, ship-free images) over the stages laid end to
    end, against the all-empty baseline (the score of predicting no ship anywhere)."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax = fig.subplots()
    if not len(records):
        ax.text(0.5, 0.5, "no validation results yet", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
        return fig
    offsets, offset = {}, 0
    for stage, part in records.groupby("stage", sort=True):
        offsets[stage] = offset
        offset += int(part["iteration"].max()) + 1
    x = records["iteration"] + records["stage"].map(offsets)
    for column, label, style in (("f2", "F2, all images", "-o"), ("f2_ships", "F2, images with ships", "-s"),
                                 ("f2_empty", "F2, ship-free images", "-^")):
        if column in records:
            ax.plot(x, records[column], style, label=label, markersize=4)
    if "f2_all_empty_baseline" in records:
        ax.axhline(float(records["f2_all_empty_baseline"].iloc[-1]), color="gray", linestyle="--",
                   label="all-empty baseline")
    for stage, start in offsets.items():
        size = records.loc[records["stage"] == stage, "input_size"].iloc[0]
        ax.axvline(start, color="gray", linewidth=0.6, linestyle=":")
        ax.annotate(f"stage {stage}: {size} px", (start, 1.0), xytext=(3, -12), textcoords="offset points",
                    fontsize=8, color="dimgray")
    ax.set(xlabel="iteration (stages end to end)", ylabel="validation F2", ylim=(-0.02, 1.05),
           title=f"detector on the validation split (score threshold and min area of SUBMIT.*), "
                 f"{int(records['n_images'].iloc[-1]) if 'n_images' in records else '?'} images")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def _rle_rows(table: str | os.PathLike | pd.DataFrame, what: str) -> dict[str, list[str]]:
    """ImageId -> its non-blank Kaggle RLE strings, from an ``ImageId,EncodedPixels`` CSV (read by
    ``module_files.read_segmentation_csv``) or a DataFrame of those columns."""
    frame = table if isinstance(table, pd.DataFrame) else read_segmentation_csv(table, what)
    return {image_id: [r for r in rows if isinstance(r, str) and r.strip()]
            for image_id, rows in frame.groupby("ImageId", sort=True)["EncodedPixels"]}


def pick_overlay_sample(has_ships: Sequence[bool], n_predictions: Sequence[int], count: int = 8) -> list[int]:
    """Indices to show: images with ships first, then ship-free images with the most predictions
    (at least a quarter of ``count`` when there are such images), in input order."""
    ship = [k for k, s in enumerate(has_ships) if s]
    free = sorted((k for k, s in enumerate(has_ships) if not s), key=lambda k: -n_predictions[k])
    first = ship[:max(count - count // 4, count - len(free))]
    return sorted(first + free[:count - len(first)])


def plot_overlays(images: Sequence[np.ndarray], true_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray],
                  titles: Sequence[str], columns: int = 4, title: str = "") -> Figure:
    """A grid of images with predictions filled red and ground truth outlined green.

    ``images``: ``(H, W, 3)`` uint8 RGB; masks: ``(N, H, W)`` bool per image, at its size.
    """
    fig, axes = _image_grid(len(images), columns, cell_height=3.5)
    for ax, image, true, pred, name in zip(axes, images, true_masks, pred_masks, titles):
        ax.imshow(overlay_masks(image, fill=pred, outline=true))
        ax.set_title(name, fontsize=8)
    fig.suptitle(title or "prediction: red fill, ground truth: green outline", fontsize=10)
    return fig


def plot_submission_overlays(submission: str | os.PathLike | pd.DataFrame, image_dir: str | os.PathLike,
                             truth: str | os.PathLike | pd.DataFrame | None = None, count: int = 8,
                             columns: int = 4) -> Figure:
    """Predicted masks of a submission (red fill) over their images, true ships outlined in green.

    Shown (:func:`pick_overlay_sample`): images with true or predicted ships first, then up to a
    quarter ship-free ones with the most predictions. With ``truth`` each title gives the image's
    competition F2. Masks are decoded from the Kaggle RLE at each image's own size. Any
    ``ImageId,EncodedPixels`` CSV works as ``submission``: a ground-truth CSV alone shows the truth.
    """
    predicted = _rle_rows(submission, "submission")
    true = _rle_rows(truth, "truth") if truth is not None else {}
    ids = list(predicted)
    chosen = pick_overlay_sample([bool(predicted[i] or true.get(i)) for i in ids],
                                 [len(predicted[i]) for i in ids], count)
    images, trues, preds, titles = [], [], [], []
    for image_id in (ids[k] for k in chosen):
        image = read_image(Path(image_dir) / image_id)
        shape = image.shape[:2]
        decode = lambda rles: np.stack([rle_decode(r, shape) for r in rles]).astype(bool) if rles \
            else np.zeros((0, *shape), bool)
        images.append(image)
        preds.append(decode(predicted[image_id]))
        trues.append(decode(true.get(image_id, [])))
        name = f"{image_id}: {len(predicted[image_id])} predicted"
        if truth is not None:
            name += (f", {len(true.get(image_id, []))} true\n"
                     f"F2 {f2_image(true.get(image_id, []), predicted[image_id], shape):.2f}")
        titles.append(name)
    return plot_overlays(images, trues, preds, titles, columns,
                         "submission: prediction red fill" + (", ground truth green outline" if truth is not None else ""))


def draw_polygon_outlines(image: np.ndarray, polygons: Sequence[np.ndarray], colour: Sequence[int] = (255, 0, 0),
                          thickness: int = 1) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB copy of ``image`` with each polygon's outline drawn by OpenCV (scene
    quicklooks). ``polygons``: ``(K, 2)`` arrays of ``(x, y)`` = (column, row) vertices in the
    image's pixel coordinates (floats are rounded); closed rings."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    rings = [np.round(np.asarray(p, np.float64)).astype(np.int32).reshape(-1, 1, 2) for p in polygons if len(p)]
    if rings:
        cv2.polylines(out, rings, isClosed=True, color=tuple(int(c) for c in colour), thickness=int(thickness))
    return out


def plot_tune_prevalence(grid: pd.DataFrame, chosen=None, validation_empty: float = float("nan"),
                         target_empty: float = float("nan"), guard: dict | None = None) -> Figure:
    """F2 against each threshold (the best over the other two) at the validation split's share of
    ship-free images and at the target's, each with its all-empty level; the chosen values marked.

    ``grid``: one row per setting, columns classifier_threshold, score_threshold, min_area, f2
    (validation share), f2_target (target share). ``chosen``: a ``module_inference.Thresholds``
    (None: no ship at all was chosen). ``guard``: the guard's verdict, for the title.
    """
    panels = [("classifier_threshold", "classifier", "classifier threshold (p_ship)"),
              ("score_threshold", "score", "detection score threshold"),
              ("min_area", "min_area", "minimum mask area (px)")]
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (column, field, label) in zip(axes, panels):
        for measure, share, colour, text in (("f2", validation_empty, "tab:blue", "validation"),
                                             ("f2_target", target_empty, "tab:orange", "target")):
            profile = grid.groupby(column)[measure].max()
            ax.plot(profile.index, profile.values, marker="o", color=colour,
                    label=f"{text}: {share:.0%} ship-free")
            ax.axhline(share, color=colour, linestyle=":", linewidth=1, label=f"all-empty at {share:.0%}")
        if chosen is not None:
            value = getattr(chosen, field)
            ax.axvline(value, color="tab:red", linestyle="--", label=f"chosen {value:g}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("F2 (best over the other two thresholds)")
    axes[0].legend(fontsize=7, loc="lower left")
    import textwrap

    verdict = ""
    if guard and guard.get("passed") is not None:
        verdict = "; guard passed" if guard["passed"] else f"; guard fell back to {guard.get('fallback')}"
    what = "no ship at all" if chosen is None else ", ".join(f"{k} {v}" for k, v in chosen.as_config().items())
    fig.suptitle(f"Threshold tuning for {target_empty:.0%} ship-free images (validation: {validation_empty:.0%})\n"
                 + textwrap.fill(f"chosen: {what}{verdict}", 150), fontsize=10)
    return fig


def plot_error_report(report, title: str = "") -> Figure:
    """Where the score is lost (a ``module_metric.ErrorReport``): ships and predictions by kind of
    failure, TP/FP/FN at each IoU threshold, F2 by ship size, and the ceilings."""
    fig = Figure(figsize=(13, 8), layout="constrained")
    (kinds_ax, counts_ax), (size_ax, ceiling_ax) = fig.subplots(2, 2)
    failures = report.failures.iloc[::-1]
    y = np.arange(len(failures))
    kinds_ax.barh(y + 0.2, failures["ships"].fillna(0), 0.4, label="ships", color="tab:blue")
    kinds_ax.barh(y - 0.2, failures["predictions"], 0.4, label="predictions", color="tab:red")
    kinds_ax.set_yticks(y, failures["description"], fontsize=8)
    for k, (ships, predictions) in enumerate(zip(failures["ships"], failures["predictions"])):
        kinds_ax.annotate("?" if pd.isna(ships) else f"{ships:.0f}", (0 if pd.isna(ships) else ships, k + 0.2),
                          xytext=(2, 0), textcoords="offset points", va="center", fontsize=7)
        kinds_ax.annotate(f"{predictions:.0f}", (predictions, k - 0.2), xytext=(2, 0), textcoords="offset points",
                          va="center", fontsize=7)
    kinds_ax.set(xlabel="count (at IoU 0.5)", title="ships and predictions by outcome")
    kinds_ax.legend(fontsize=8)
    per_threshold = report.per_threshold
    for column, colour in (("tp", "tab:green"), ("fp", "tab:red"), ("fn", "tab:blue")):
        counts_ax.plot(per_threshold["threshold"], per_threshold[column], marker="o", color=colour,
                       label=column.upper())
    counts_ax.set(xlabel="IoU threshold", ylabel="count (all images)", title="TP / FP / FN by IoU threshold")
    counts_ax.legend(fontsize=8)
    counts_ax.grid(alpha=0.3)
    by_size = report.by_size
    bars = size_ax.bar(np.arange(len(by_size)), by_size["f2"].fillna(0), color="tab:purple")
    size_ax.set_xticks(np.arange(len(by_size)), by_size["size"], fontsize=8)
    size_ax.bar_label(bars, [f"{f:.2f}\n{s} ships, {p} pred" if not pd.isna(f) else "none"
                             for f, s, p in zip(by_size["f2"], by_size["n_ships"], by_size["n_predictions"])],
                      fontsize=7)
    size_ax.set(ylim=(0, 1.25), ylabel="F2 (pooled over images)", title="F2 by ship size (px of a 768 x 768 tile)")
    ceilings = report.ceilings
    x = np.arange(len(ceilings))
    width = 0.4 if "f2_target" in ceilings else 0.8
    bars = ceiling_ax.bar(x - (width / 2 if "f2_target" in ceilings else 0), ceilings["f2"].fillna(0), width,
                          label="as sampled", color="tab:blue")
    ceiling_ax.bar_label(bars, ["n/a" if pd.isna(v) else f"{v:.3f}" for v in ceilings["f2"]], fontsize=7)
    if "f2_target" in ceilings:
        bars = ceiling_ax.bar(x + width / 2, ceilings["f2_target"].fillna(0), width, label="at the target share",
                              color="tab:orange")
        ceiling_ax.bar_label(bars, ["n/a" if pd.isna(v) else f"{v:.3f}" for v in ceilings["f2_target"]], fontsize=7)
        ceiling_ax.legend(fontsize=8, loc="lower right")
    ceiling_ax.set_xticks(x, ceilings["case"], fontsize=8)
    ceiling_ax.set(ylim=(0, 1.15), ylabel="F2", title="F2 now, and with a perfect part")
    fig.suptitle(f"Error report{': ' + title if title else ''} (F2 {report.f2:.4f})", fontsize=11)
    return fig
