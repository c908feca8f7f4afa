"""Where user images come from. Each source lists `Entry`s (image + caption, not yet checked) in a sorted,
deterministic order; `t2i.data.scan` checks them, and `t2i.data.build` picks the source by `data.dataset`."""
