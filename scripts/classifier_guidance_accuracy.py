"""Judged accuracy of a shapes pipeline with a classifier (stage classifier) under classifier-free guidance,
classifier guidance, or both, on the demo's prompt suite as `t2i demo` samples it.

    python scripts/classifier_guidance_accuracy.py RUN/pipeline --settings 2:0 1:3 1:10 2:3 --out cg.json

Each setting is CFG_SCALE:CLASSIFIER_SCALE (1:s is classifier guidance alone, 2:0 the demo's CFG alone). The suite
is `prompt_suite()` repeated `--samples-per-prompt` times, image i from seed i, judged by t2i.eval.judge.
"""
import argparse
import json
import time
from pathlib import Path

from t2i.data.shapes import prompt_suite
from t2i.eval.evaluate import evaluate
from t2i.pipeline import Text2ImagePipeline


def setting(text: str) -> tuple[float, float]:
    cfg, classifier = text.split(":")
    return float(cfg), float(classifier)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="a t2i pipeline folder trained on shapes, with classifier/")
    parser.add_argument("--settings", type=setting, nargs="+", default=[(2.0, 0.0), (1.0, 3.0), (2.0, 3.0)],
                        help="CFG_SCALE:CLASSIFIER_SCALE pairs (default: 2:0 1:3 2:3)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sampler", default="euler_a")
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write every figure to this JSON file")
    args = parser.parse_args()
    pipe = Text2ImagePipeline.from_pretrained(args.pipeline, device="cpu").speed_up()
    suite = prompt_suite() * args.samples_per_prompt
    results = []
    for cfg, classifier in args.settings:
        started = time.perf_counter()
        summary = evaluate(pipe, suite, args.steps, cfg, args.sampler, seed=0, classifier_guidance=classifier).summary
        results.append({"guidance_scale": cfg, "classifier_guidance": classifier, "steps": args.steps,
                        "sampler": args.sampler, "images": len(suite), "summary": summary,
                        "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(results[-1]), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
