"""Judged accuracy against number of steps for every sampler, on a trained shapes pipeline (the demo's).

    python scripts/sampler_accuracy.py t2i-demo/pipeline --steps 10 20 40 --guidance 4 --prompts 12 \
        --out docs/images/sampler-accuracy

Each point generates the first PROMPTS "seen" prompts of the demo suite (--categories picks others, --repeats draws
each prompt that many times with fresh seeds, as the demo's samples_per_prompt), image i from seed i, and judges them
(t2i.eval.judge). Writes OUT.json (every figure, with model evaluations per image) and OUT.png (colour and
correct against steps, one line per sampler).
"""
import argparse
import json
import time
from pathlib import Path

from t2i.data.shapes import prompt_suite
from t2i.diffusion.sampler_names import SAMPLER_NAMES
from t2i.eval.evaluate import evaluate
from t2i.pipeline import Text2ImagePipeline


def count_unet_calls(pipe: Text2ImagePipeline) -> list[int]:
    """Wrap the U-Net's forward so that each call adds to the returned counter."""
    calls = [0]
    forward = pipe.unet.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    pipe.unet.forward = counted
    return calls


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    samplers = list(dict.fromkeys(r["sampler"] for r in results))
    markers = "os^vD<>Px*hX8"
    for axis, attribute in zip(axes, ("colour", "correct")):
        for index, sampler in enumerate(samplers):  # 13 samplers: 20 colours and a marker each keep lines apart
            points = [(r["steps"], r[attribute]) for r in results if r["sampler"] == sampler]
            axis.plot(*zip(*points), marker=markers[index % len(markers)], color=plt.cm.tab20(index % 20),
                      label=sampler, alpha=0.85)
        axis.set_xlabel("steps")
        axis.set_title(f"judged {attribute}")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of images")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="a t2i pipeline folder trained on shapes")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLER_NAMES), choices=SAMPLER_NAMES)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--prompts", type=int, default=12, help="how many prompts of the demo suite's categories")
    parser.add_argument("--categories", nargs="+", default=["seen"], choices=["seen", "held_out", "two_object"])
    parser.add_argument("--repeats", type=int, default=1, help="images per prompt, each from its own seed")
    parser.add_argument("--out", type=Path, default=Path("sampler-accuracy"), help="writes OUT.json and OUT.png")
    args = parser.parse_args()
    pipe = Text2ImagePipeline.from_pretrained(args.pipeline, device="cpu")
    calls = count_unet_calls(pipe)
    suite = [item for item in prompt_suite() if item[1] in args.categories][:args.prompts] * args.repeats
    results = []
    for sampler in args.samplers:
        for steps in args.steps:
            calls[0] = 0
            started = time.perf_counter()
            summary = evaluate(pipe, suite, steps, args.guidance, sampler, seed=0).summary["all"]
            results.append({"sampler": sampler, "steps": steps, "guidance": args.guidance, "prompts": len(suite),
                            "colour": summary["colour"], "correct": summary["correct"],
                            "unet_calls_per_batch": calls[0], "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
