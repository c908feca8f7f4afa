"""The demo's HTML report."""
from PIL import Image

from t2i.eval.evaluate import Evaluation
from t2i.eval.judge import judge, summarize
from t2i.eval.report import write_report


def small_evaluation() -> Evaluation:
    prompt = "a large red circle"
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    judgements = [judge(image, prompt)]
    return Evaluation([prompt], ["seen"], [image], judgements, summarize(judgements, ["seen"]), 1.0)


def test_the_report_of_a_resumed_run_says_its_times_cover_only_what_was_left(tmp_path):
    timings = {"training (data, vae, clip, unet)": 1.6, "sampling + judging": 8.1, "total": 10.1}
    settings = {"steps": 30}
    _, whole = write_report(tmp_path / "whole", small_evaluation(), tmp_path, [], timings, settings)
    _, resumed = write_report(tmp_path / "resumed", small_evaluation(), tmp_path, [], timings, settings,
                              resumed=True)
    assert "resumed one begun earlier" not in whole.read_text()
    assert "resumed one begun earlier" in resumed.read_text()


def test_the_loss_curves_shrink_to_the_page_instead_of_running_off_it(tmp_path):
    """Four stages' panels make a 1,280-px-wide image: wider than a laptop's window, the last cut off."""
    for stage in ("vae", "clip", "unet", "sr"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    _, report = write_report(tmp_path / "out", small_evaluation(), tmp_path, ["vae", "clip", "unet", "sr"],
                             {"total": 1.0}, {"steps": 30})
    page = report.read_text()
    assert "img.curves{max-width:100%;height:auto" in page
    assert "<img class='curves' src='data:image/png;base64," in page


def test_a_stage_that_logged_one_loss_shows_it_as_a_point(tmp_path):
    import numpy as np

    from t2i.eval.report import loss_curves

    (tmp_path / "sr").mkdir()
    (tmp_path / "sr" / "metrics.jsonl").write_text('{"step": 10, "loss": 1.08}\n')
    pixels = np.asarray(loss_curves(tmp_path, ["sr"])).astype(int)
    line_colour = np.abs(pixels - np.array([31, 119, 180])).sum(axis=-1) < 60  # matplotlib's first colour
    assert line_colour.sum() > 10


def test_the_sampling_settings_read_as_words_not_a_json_dump(tmp_path):
    settings = {"steps": 30, "guidance_scale": 5.0, "sampler": "euler_a", "sr": {"noise_level": 50}}
    _, report = write_report(tmp_path, small_evaluation(), tmp_path, [], {"total": 1.0}, settings)
    assert "<p>Sampling: steps 30, guidance_scale 5.0, sampler euler_a; sr: noise_level 50</p>" in report.read_text()


def test_the_report_shows_each_target_met_or_not_and_where_the_training_steps_went(tmp_path):
    from t2i.eval.report import Check

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "metrics.jsonl").write_text('{"step": 20, "loss": 1.0, "elapsed_s": 1.2}\n'
                                                    '{"step": 600, "loss": 0.5, "elapsed_s": 34.8}\n')
    seen = []

    def checks(timings: dict) -> list[Check]:
        seen.append(dict(timings))
        return [Check("seen fully correct", 0.9, 0.6, True), Check("wall time, s", timings["total"], 0.0, False),
                Check("SR extra time, s", 3.0, None, False)]

    _, report = write_report(tmp_path / "out", small_evaluation(), tmp_path, ["vae", "unet"], {"total": 1.0},
                             {"steps": 30}, started=0.0, checks=checks)
    page = report.read_text()
    assert seen[0]["total"] > 1.0  # the checks see the total the page shows, set when the page was written
    assert "<tr class='ok'><td>seen fully correct</td><td>0.90</td><td>≥ 0.6</td><td>met</td></tr>" in page
    assert "<td>wall time, s</td>" in page and "<td>≤ 0</td><td>NOT met</td></tr>" in page
    assert "<td>SR extra time, s</td><td>3.00</td><td></td><td>not judged</td>" in page
    assert "<tr><td>vae</td><td>600 steps</td><td>34.8 s</td><td>58 ms a step</td></tr>" in page
    assert "<td>unet</td>" not in page  # a stage without metrics has no row
