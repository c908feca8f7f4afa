"""Judge a pipeline on the demo's 96-prompt suite drawn from several seeds, and average.

    python scripts/eval_seeds.py t2i-demo/pipeline --steps 20 --guidance 2 --seeds 0 1000 2000 3000

One draw of 24 held-out prompts moves by ±0.1 or more between seeds; the mean over draws is the figure to
compare recipes by.
"""
import argparse

from t2i.data.shapes import prompt_suite
from t2i.eval.evaluate import evaluate
from t2i.pipeline import Text2ImagePipeline

COLUMNS = (("seen", "correct"), ("held_out", "correct"), ("two_object", "correct"), ("all", "colour"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="a t2i pipeline folder")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the pipeline's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1000, 2000, 3000],
                        help="first seed of each draw of the suite")
    args = parser.parse_args()
    pipe = Text2ImagePipeline.from_pretrained(args.pipeline, device="cpu")
    header = "  ".join(f"{category} {attribute}" for category, attribute in COLUMNS)
    print(f"seed   {header}")
    totals = [0.0] * len(COLUMNS)
    for seed in args.seeds:
        summary = evaluate(pipe, prompt_suite(), args.steps, args.guidance, args.sampler, seed=seed).summary
        row = [summary[category][attribute] for category, attribute in COLUMNS]
        totals = [total + value for total, value in zip(totals, row)]
        print(f"{seed:<6} " + "  ".join(f"{value:.2f}" for value in row), flush=True)
    print("mean   " + "  ".join(f"{total / len(args.seeds):.3f}" for total in totals))


if __name__ == "__main__":
    main()
