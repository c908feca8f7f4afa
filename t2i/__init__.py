"""t2i: latent text-to-image diffusion.

    from t2i import Text2ImagePipeline
    pipe = Text2ImagePipeline.from_pretrained("t2i-demo/pipeline")  # where `t2i demo` saves it
    images = pipe("a large red circle", seed=0)
"""

__all__ = ["Text2ImagePipeline"]


def __getattr__(name: str):
    # Imported on first use, so that `t2i --help` and the config tools start without loading diffusers.
    if name == "Text2ImagePipeline":
        from t2i.pipeline import Text2ImagePipeline

        return Text2ImagePipeline
    raise AttributeError(f"module 't2i' has no attribute {name!r}")
