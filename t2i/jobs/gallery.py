"""index.html: a contact sheet of a job's images that works offline (relative links, nothing fetched).

Images load lazily, as they scroll into view: a job of 100,000 images would otherwise fetch every full-size PNG
at once. A small inline script counts the images that failed to load (those in view, then each as it is scrolled
to) and says so at the top of the page; it also sets `data-broken-images` on <body>, which the browser test reads.
"""
from __future__ import annotations

import html
from pathlib import Path

from t2i.jobs import outputs

GALLERY = "index.html"
THUMBNAIL_PX = 128

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>t2i batch: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1em; background: #fafafa; }}
.sheet {{ display: grid; grid-template-columns: repeat(auto-fill, minmax({size}px, 1fr)); gap: 12px; }}
figure {{ margin: 0; background: #fff; padding: 6px; border: 1px solid #ddd; }}
img {{ display: block; width: 100%; aspect-ratio: 1; object-fit: contain; image-rendering: pixelated;
       background: #eee; }}
figcaption {{ font-size: 12px; overflow-wrap: anywhere; }}
.seed {{ color: #666; }}
#broken {{ color: #b00; }}
</style>
</head>
<body data-broken-images="unknown">
<script>
let brokenImages = 0;
function countBroken() {{
  document.body.dataset.brokenImages = String(brokenImages);
  const note = document.getElementById("broken");
  if (note && brokenImages) note.textContent = brokenImages + " failed to load.";
}}
document.addEventListener("error", event => {{
  if (event.target.tagName === "IMG") {{ brokenImages += 1; countBroken(); }}
}}, true);
window.addEventListener("load", countBroken);
</script>
<h1>{title}</h1>
<p>{count} images. <span id="broken"></span></p>
<div class="sheet">
{figures}
</div>
</body>
</html>
"""

FIGURE = """<figure><a href="{file}"><img src="{file}" alt="{prompt}" loading="lazy"></a>
<figcaption>{prompt}<br><span class="seed">{id} #{k} &middot; seed {seed} &middot; {steps} steps {sampler} \
&middot; cfg {guidance}</span></figcaption></figure>"""


def write_gallery(out: Path, records: list[dict]) -> Path:
    figures = "\n".join(FIGURE.format(**{key: html.escape(str(value)) for key, value in record.items()})
                        for record in records)
    page = PAGE.format(title=html.escape(out.resolve().name), size=THUMBNAIL_PX, count=len(records), figures=figures)
    outputs.write_atomically(out / GALLERY, page.encode())
    return out / GALLERY
