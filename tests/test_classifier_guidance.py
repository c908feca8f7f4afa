"""Classifier guidance on tiny models: the guidance math against hand computations, the gradient of a hand-made
classifier under inference mode, prompt labels, sampling (scale 0, every sampler family, with and without CFG),
errors, save/load with classifier/, and stage classifier training into the pipeline and resuming exactly."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from t2i import Text2ImagePipeline
from t2i.cli import main
from t2i.config import load_config
from t2i.data.labels import SHAPES_LABELS, scene_labels
from t2i.data.shapes import ShapesDataset
from t2i.diffusion.guidance import classifier_guidance
from t2i.diffusion.parameterization import x0_from_prediction
from t2i.diffusion.schedules import scheduler_alphas_cumprod, scheduler_config
from t2i.errors import T2IError
from t2i.models.classifier import IGNORE_LABEL, build_classifier
from t2i.pipeline.denoiser import unet_denoiser
from t2i.pipeline.classifier_guidance import (
    MIN_GUIDED_ALPHA_BAR,
    classifier_guide,
    log_prob_gradient,
    prompt_labels,
)
from t2i.training.checkpoint import latest_checkpoint
from t2i.training.run import run_training
from t2i.training.stages.classifier import ClassifierStage, _head_loss

from conftest import TINY_CONFIG, build_tiny_pipeline, copy_base_stages, killed_at_loss_call, tiny_config

PROMPTS = ["a large red circle", "a small blue square on the left"]


def tiny_classifier(seed: int = 0):
    torch.manual_seed(seed)
    return build_classifier(load_config(TINY_CONFIG).classifier, SHAPES_LABELS, latent_channels=4, latent_size=16)


@pytest.fixture(scope="module")
def guided() -> Text2ImagePipeline:
    pipe = build_tiny_pipeline()
    pipe.classifier = tiny_classifier()
    return pipe


class LinearClassifier(torch.nn.Module):
    """logits_head = flatten(x) @ W_head, whatever t: log p(y | x) = x·W_y − logsumexp_k x·W_k, by hand."""

    def __init__(self, features: int, labels: dict[str, list[str]] = SHAPES_LABELS):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weights = {name: torch.randn(features, len(words), generator=generator) for name, words in labels.items()}
        self.label_names = list(labels)

    def forward(self, x, timestep):
        return {name: x.flatten(1) @ w for name, w in self.weights.items()}


def _pixels(images) -> list[bytes]:
    return [image.tobytes() for image in images]


# ----------------------------------------------------------------- math


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_guidance_shifts_eps_by_the_scaled_gradient_and_x0_towards_it(prediction):
    torch.manual_seed(0)
    xt, output, gradient = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    alpha_bar, scale = torch.tensor([0.9, 0.5, 0.1]), 2.5
    guided = classifier_guidance(prediction, xt, output, gradient, alpha_bar, scale)
    a = alpha_bar.reshape(-1, 1, 1, 1)
    if prediction == "epsilon":  # Algorithm 2, as written
        assert torch.allclose(guided, output - (1 - a).sqrt() * scale * gradient)
    # Whatever the network predicts, x̂_0 moves by s (1 − ᾱ) / √ᾱ · ∇ log p: along the gradient, towards the class.
    shift = x0_from_prediction(prediction, xt, guided, alpha_bar) - x0_from_prediction(prediction, xt, output,
                                                                                        alpha_bar)
    assert torch.allclose(shift, scale * (1 - a) / a.sqrt() * gradient, atol=1e-5)
    assert torch.allclose(classifier_guidance(prediction, xt, output, gradient, alpha_bar, 0.0), output, atol=1e-6)


def test_the_gradient_of_a_linear_classifier_is_computed_under_inference_mode():
    classifier = LinearClassifier(features=8)
    labels = torch.tensor([[0, 2], [IGNORE_LABEL, 1]])  # item 1 says nothing about its colour
    with torch.inference_mode():
        xt = torch.randn(2, 2, 2, 2)
        gradient = log_prob_gradient(classifier, xt, torch.tensor([10, 10]), labels)
    x = xt.clone().flatten(1)
    expected = torch.zeros_like(x)
    for head, name in enumerate(classifier.label_names):
        w = classifier.weights[name]
        p = (x @ w).softmax(dim=-1)
        for i in range(2):
            if labels[i, head] != IGNORE_LABEL:  # ∇ log p_y = W_y − Σ_k p_k W_k
                expected[i] += w[:, labels[i, head]] - w @ p[i]
    assert torch.allclose(gradient.flatten(1), expected, atol=1e-5)


def test_the_guide_moves_x0_towards_the_class_of_a_binary_linear_classifier():
    """Two classes with logits x·w_0, x·w_1: log p(1 | x) = −softplus(−m(x)), m = x·(w_1 − w_0), so its gradient is
    σ(−m)(w_1 − w_0), and x̂_0 must move by s (1 − ᾱ)/√ᾱ σ(−m(x_t)) (w_1 − w_0), raising the margin."""
    classifier = LinearClassifier(features=16, labels={"side": ["left", "right"]})
    config = scheduler_config("cosine", 1000, "v_prediction")
    labels = torch.tensor([[1], [1]])
    guide = classifier_guide(classifier, labels, scale=3.0, scheduler_config=config)
    torch.manual_seed(0)
    xt, output, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), 500
    with torch.inference_mode():
        guided = guide(xt, torch.tensor(t), output, None)
    alpha_bar = scheduler_alphas_cumprod(config)[t].float()
    direction = classifier.weights["side"][:, 1] - classifier.weights["side"][:, 0]  # (16,)
    margin = xt.flatten(1) @ direction  # (2,)
    before = x0_from_prediction("v_prediction", xt, output, alpha_bar)
    after = x0_from_prediction("v_prediction", xt, guided, alpha_bar)
    expected = 3.0 * (1 - alpha_bar) / alpha_bar.sqrt() * torch.sigmoid(-margin)[:, None] * direction
    assert torch.allclose((after - before).flatten(1), expected, atol=1e-5)
    assert ((after.flatten(1) @ direction) > (before.flatten(1) @ direction)).all()


def test_the_guide_leaves_the_steps_whose_x_t_holds_no_signal_alone():
    """At t = 999 of the cosine schedule (ᾱ = 2.4e-9) Algorithm 2 would scale the gradient by 2e4 into x̂_0."""
    config = scheduler_config("cosine", 1000, "v_prediction")
    guide = classifier_guide(LinearClassifier(features=16), torch.tensor([[1, 0]]), 3.0, config)
    xt, output = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert scheduler_alphas_cumprod(config)[999] < MIN_GUIDED_ALPHA_BAR
    assert torch.equal(guide(xt, torch.tensor(999), output, None), output)
    assert not torch.equal(guide(xt, torch.tensor(966), output, None), output)


def test_prompt_labels_read_the_vocabulary_and_leave_ambiguous_heads_out():
    labels = prompt_labels(["a large red circle", "A Tiny BLUE square on the left",
                            "a red circle to the left of a blue circle", "a triangle"], SHAPES_LABELS)
    colours, shapes = SHAPES_LABELS["colour"], SHAPES_LABELS["shape"]
    assert labels.tolist() == [[colours.index("red"), shapes.index("circle")],
                               [colours.index("blue"), shapes.index("square")],
                               [IGNORE_LABEL, shapes.index("circle")],
                               [IGNORE_LABEL, shapes.index("triangle")]]
    with pytest.raises(T2IError, match="names no label the classifier knows"):
        prompt_labels(["a large red circle", "a photo of a cat"], SHAPES_LABELS)


# ----------------------------------------------------------------- sampling


def test_scale_zero_is_no_classifier_and_a_scale_changes_the_images(guided):
    plain = build_tiny_pipeline()
    assert _pixels(guided(PROMPTS, seed=3, classifier_guidance=0.0)) == _pixels(plain(PROMPTS, seed=3))
    for cfg in (1.0, 3.0):
        unguided = guided(PROMPTS, seed=3, guidance_scale=cfg)
        assert _pixels(guided(PROMPTS, seed=3, guidance_scale=cfg, classifier_guidance=200.0)) != _pixels(unguided)


def test_the_score_samplers_denoiser_applies_the_guide(guided):
    """t2i's own samplers see the U-Net through unet_denoiser: its x̂_0 moves as the guide moves the output."""
    labels = prompt_labels(PROMPTS, guided.classifier.config.labels)
    guide = guided.classifier_guide(labels, 50.0)
    context = guided.encode_prompts(PROMPTS)
    x, sigma = torch.randn(2, 4, 16, 16) * 3, torch.tensor([3.0, 3.0])
    with torch.inference_mode():
        plain = unet_denoiser(guided.unet, context, 1.0, guided.scheduler_config)(x, sigma)
        steered = unet_denoiser(guided.unet, context, 1.0, guided.scheduler_config, guide=guide)(x, sigma)
    assert not torch.allclose(plain, steered)


def test_classifier_guidance_errors_are_clear(guided, tmp_path, capsys):
    with pytest.raises(T2IError, match="no classifier"):
        build_tiny_pipeline()(PROMPTS, classifier_guidance=1.0)
    with pytest.raises(T2IError, match="names no label"):
        guided(["a cat"], classifier_guidance=1.0)
    build_tiny_pipeline().save_pretrained(tmp_path / "plain")
    assert main(["generate", PROMPTS[0], "--model", str(tmp_path / "plain"), "--classifier-guidance", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "no classifier" in capsys.readouterr().err


def test_a_pipeline_saves_and_loads_its_classifier(guided, tmp_path):
    guided.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "classifier" / "config.json").is_file()
    again = Text2ImagePipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    assert again.classifier.config.labels == SHAPES_LABELS
    assert _pixels(again(PROMPTS, seed=1, classifier_guidance=50.0)) == \
        _pixels(guided(PROMPTS, seed=1, classifier_guidance=50.0))
    assert main(["generate", PROMPTS[0], "--model", str(tmp_path / "pipe"), "--classifier-guidance", "50",
                 "--out", str(tmp_path / "cg.png")]) == 0
    assert (tmp_path / "cg.png").is_file()
    assert Text2ImagePipeline.from_pretrained(tmp_path / "pipe", device="cpu").to("cpu", torch.bfloat16) \
        .classifier.dtype == torch.float32  # guidance stays fp32 whatever the networks run in


# ----------------------------------------------------------------- stage classifier


def test_scenes_are_labelled_by_their_single_object_and_unlabelled_items_add_nothing():
    data = ShapesDataset(40, two_object_fraction=0.5)
    labels = scene_labels(data.scenes)
    for scene, row in zip(data.scenes, labels.tolist()):
        if len(scene.spec.objects) == 1:
            obj = scene.spec.objects[0]
            assert row == [SHAPES_LABELS["colour"].index(obj.colour), SHAPES_LABELS["shape"].index(obj.shape)]
        else:
            assert row == [IGNORE_LABEL, IGNORE_LABEL]
    loss, accuracy = _head_loss(torch.randn(3, 6, requires_grad=True), torch.full((3,), IGNORE_LABEL))
    assert loss.item() == 0.0 and np.isnan(accuracy)


def test_the_classifier_stage_trains_into_the_pipeline_and_resumes_exactly(trained_run, tmp_path):
    """Stop stage classifier inside step 3, after its step-2 checkpoint; resume; compare with an uninterrupted run."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    stages = "stages=[vae,clip,unet,classifier]"
    for run_dir in (full, resumed):
        copy_base_stages(trained_run, run_dir)
    run_training(tiny_config(full, stages), resume=True)
    pipe = Text2ImagePipeline.from_pretrained(full / "pipeline", device="cpu")
    assert pipe.classifier is not None and pipe.classifier.config.labels == SHAPES_LABELS
    metrics = (full / "classifier" / "metrics.jsonl").read_text()
    assert "colour_accuracy" in metrics and "shape_accuracy_t" in metrics
    pipe(PROMPTS, classifier_guidance=5.0, seed=0)

    with killed_at_loss_call(ClassifierStage, 3):
        run_training(tiny_config(resumed, stages), resume=True)
    assert latest_checkpoint(resumed / "classifier").name == "step_0000002"
    run_training(tiny_config(resumed, stages), resume=True)
    for name in ("final/diffusion_pytorch_model.safetensors", "checkpoints/step_0000004/ema.safetensors"):
        ours, theirs = load_file(resumed / "classifier" / name), load_file(full / "classifier" / name)
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name


def test_the_classifier_stage_needs_labelled_data_and_valid_sizes(tmp_path):
    with pytest.raises(ValueError, match="stage 'classifier' needs labelled images: data.dataset 'shapes'"):
        load_config(TINY_CONFIG, ["stages=[vae,clip,unet,classifier]", "data.dataset=imagefolder",
                                  f"data.path={tmp_path}"])
    with pytest.raises(ValueError, match="classifier.norm_num_groups must divide"):
        load_config(TINY_CONFIG, ["classifier.norm_num_groups=3"])
