"""The demo's report: a grid image and a self-contained HTML page with prompts, images, judged accuracy and
loss curves."""
from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from t2i.eval.evaluate import Evaluation, Fidelity
from t2i.eval.grid import make_grid

IMAGE_SCALE = 3  # enlarge 32-px samples so a reader can see them


@dataclass(frozen=True)
class Check:
    """A figure and its target, as the demo prints it and report.html shows it."""

    name: str
    value: float
    target: float | None  # None: shown, not judged (a time of a resumed run, a figure without a target)
    higher_is_better: bool

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def target_text(self) -> str:
        # Targets derived from a measured value (the base's fraction - 0.05) to the two places values are shown at.
        return f"{'≥' if self.higher_is_better else '≤'} {round(self.target, 2):g}" if self.target is not None else ""


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curves(run_dir: Path, stages: list[str]) -> Image.Image | None:
    """One panel per stage: its training loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Stages also log records of their own (an SR stage's PSNR, a held-out loss) between the training losses.
    curves = {stage: [r for r in read_metrics(run_dir / stage / "metrics.jsonl") if r.get("loss") is not None]
              for stage in stages}
    curves = {stage: records for stage, records in curves.items() if records}
    if not curves:
        return None
    figure, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
    for axis, (stage, records) in zip(axes[0], curves.items()):
        # A short stage may log a point or two, which a bare line would not show.
        axis.plot([r["step"] for r in records], [r["loss"] for r in records], marker="o" if len(records) < 3 else None)
        axis.set_title(f"{stage} loss")
        axis.set_xlabel("step")
        axis.set_yscale("log")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _marks(verdict) -> str:
    return " ".join(f"{name}:{'✓' if ok else '✗'}" for name, ok in verdict.attributes.items())


def _image_cell(image: Image.Image) -> str:
    big = image.resize((image.width * IMAGE_SCALE, image.height * IMAGE_SCALE), Image.NEAREST)
    return f"<td><img src='{_png_data_uri(big)}'></td>"


def _summary_rows(evaluation: Evaluation) -> list[str]:
    rows = []
    for category, scores in evaluation.summary.items():
        cells = "".join(f"<td>{name}: {value:.2f}</td>" for name, value in scores.items())
        rows.append(f"<tr><th>{category}</th>{cells}</tr>")
    return rows


def _cascade_html(upscaled: Evaluation, fidelity: Fidelity | None) -> str:
    """The SR stage's section: judged accuracy of the upscaled images and held-out PSNR / SSIM."""
    size = upscaled.images[0].width
    section = f"<h2>Judged accuracy after the SR stage, at {size} px</h2><table>{''.join(_summary_rows(upscaled))}</table>"
    if fidelity is not None:
        section += (f"<p>Held-out images ({fidelity.images}), against the truth: SR PSNR {fidelity.psnr:.2f} dB, SSIM "
                    f"{fidelity.ssim:.4f}; bicubic PSNR {fidelity.psnr_bicubic:.2f} dB, SSIM "
                    f"{fidelity.ssim_bicubic:.4f}.</p>")
    return section


def _check_rows(checks: list[Check]) -> str:
    verdict = {True: "met", False: "NOT met", None: "not judged"}
    return "".join(f"<tr class='{'bad' if check.met is False else 'ok' if check.met else ''}'>"
                   f"<td>{html.escape(check.name)}</td><td>{check.value:.2f}</td><td>{check.target_text()}</td>"
                   f"<td>{verdict[check.met]}</td></tr>" for check in checks)


def _stage_step_rows(run_dir: Path, stages: list[str]) -> str:
    """Per stage: its training steps and the seconds they took (metrics.jsonl's last elapsed_s, over every resumed
    part), to show where the training time went; the rest of a stage's time is set-up, caching and saving."""
    rows = []
    for stage in stages:
        timed = [r for r in read_metrics(run_dir / stage / "metrics.jsonl") if "elapsed_s" in r and "step" in r]
        if timed:
            last = timed[-1]
            rows.append(f"<tr><td>{html.escape(stage)}</td><td>{last['step']} steps</td>"
                        f"<td>{last['elapsed_s']:.1f} s</td><td>{1000 * last['elapsed_s'] / last['step']:.0f} ms a "
                        "step</td></tr>")
    return "".join(rows)


def _settings_text(settings: dict) -> str:
    """'steps 30, guidance_scale 5.0, ...; sr: num_inference_steps 20, ...' for the sampling settings."""
    flat = ", ".join(f"{key} {value}" for key, value in settings.items() if not isinstance(value, dict))
    nested = "".join(f"; {key}: {_settings_text(value)}" for key, value in settings.items() if isinstance(value, dict))
    return flat + nested


def write_report(out_dir: Path, evaluation: Evaluation, run_dir: Path, stages: list[str], timings: dict,
                 settings: dict, upscaled: Evaluation | None = None,
                 fidelity: Fidelity | None = None, resumed: bool = False,
                 started: float | None = None, checks: Callable[[dict], list[Check]] | None = None
                 ) -> tuple[Path, Path]:
    """Write `grid.png` (each image captioned with its prompt) and `report.html` into `out_dir` (and
    `grid_upscaled.png`, with `upscaled`: the same images through the SR stage, shown beside the base ones); return
    the paths of the first two. `resumed`: the run resumed one begun earlier, so its times cover only what was left,
    and the page says so. `started` (a `time.perf_counter()` reading): `timings["total"]` is set here, once all but
    the page's text is done, so that the page and the caller's printed summary give the same total. `checks` gives
    the figures judged against targets from the timings with that total, for a table at the top."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_path = out_dir / "grid.png"
    make_grid(evaluation.images, rows=max(1, len(evaluation.images) // 12), scale=IMAGE_SCALE,
              labels=evaluation.prompts).save(grid_path)
    if upscaled is not None:
        make_grid(upscaled.images, rows=max(1, len(upscaled.images) // 12), scale=IMAGE_SCALE,
                  labels=upscaled.prompts).save(out_dir / "grid_upscaled.png")

    rows = []
    for i, (prompt, category, image, verdict) in enumerate(zip(evaluation.prompts, evaluation.categories,
                                                               evaluation.images, evaluation.judgements)):
        cells = (f"{_image_cell(image)}<td>{html.escape(prompt)}</td><td>{category}</td><td>{_marks(verdict)}</td>"
                 f"<td>{html.escape(verdict.found)}</td>")
        if upscaled is not None:
            high = upscaled.judgements[i]
            cells += f"{_image_cell(upscaled.images[i])}<td>{_marks(high)}</td><td>{html.escape(high.found)}</td>"
        rows.append(f"<tr class='{'ok' if verdict.correct else 'bad'}'>{cells}</tr>")
    summary_rows = _summary_rows(evaluation)
    header = "<tr><th>image</th><th>prompt</th><th>category</th><th>judged</th><th>found</th>"
    if upscaled is not None:
        header += "<th>upscaled</th><th>judged</th><th>found</th>"
    cascade = _cascade_html(upscaled, fidelity) if upscaled is not None else ""
    curves = loss_curves(run_dir, stages)
    curves_html = (f"<img class='curves' src='{_png_data_uri(curves)}' alt='training loss against step, per stage'>"
                   if curves else "<p>no metrics recorded</p>")
    if started is not None:
        timings["total"] = time.perf_counter() - started
    timing_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
    step_rows = _stage_step_rows(run_dir, stages)
    steps_html = f"<h3>Training steps per stage</h3><table>{step_rows}</table>" if step_rows else ""
    checks_html = (f"<h2>Targets</h2><table><tr><th>figure</th><th>value</th><th>target</th><th></th></tr>"
                   f"{_check_rows(checks(timings))}</table>" if checks is not None else "")
    timing_note = ("<p>This run resumed one begun earlier: the times cover only what was left to do, not the whole "
                   "run.</p>" if resumed else "")
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>t2i demo report</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 8px;text-align:left}}
tr.ok td{{background:#eaf7ea}} tr.bad td{{background:#fbeaea}} img{{image-rendering:pixelated}}
img.curves{{max-width:100%;height:auto;image-rendering:auto}}</style></head>
<body><h1>t2i demo report</h1>
<p>Sampling: {html.escape(_settings_text(settings))}</p>
{checks_html}<h2>Judged accuracy (fraction of images)</h2><table>{''.join(summary_rows)}</table>
{cascade}<h2>Time</h2>{timing_note}<table>{timing_rows}</table>{steps_html}
<h2>Loss curves</h2>{curves_html}
<h2>Samples</h2><table>{header}</tr>
{''.join(rows)}</table></body></html>"""
    report_path = out_dir / "report.html"
    report_path.write_text(page)
    return grid_path, report_path
