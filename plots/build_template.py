"""python plots/build_template.py   (needs npm; writes plots/offline_template.html)

DVC's own page for `dvc plots show` loads vega, vega-lite and vega-embed from a CDN, so it is blank
on a machine without internet access. This writes an HTML template (`.dvc/config`:
plots.html_template) with the same three libraries inlined, at the versions DVC's page asks for,
taken from the npm registry, so the page draws its charts offline. The output is committed; run
this only to change the versions.
"""
from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

# The versions dvc-render's page loads (dvc_render/vega.py): the specs DVC writes are made for them.
PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
OUT = Path(__file__).resolve().parent / "offline_template.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plots (offline)</title>
    <!-- {versions}, inlined from the npm registry by plots/build_template.py (BSD-3-Clause) -->
{scripts}
    <script>
        // SVG rather than vega-embed's default canvas: sharp at any zoom, and the drawn marks are
        // part of the page (tests/test_plots_offline.py reads them to check that charts drew).
        (function () {{
            var embed = window.vegaEmbed;
            window.vegaEmbed = function (el, spec, opt) {{
                return embed(el, spec, Object.assign({{renderer: "svg"}}, opt || {{}}));
            }};
        }})();
    </script>
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def main() -> None:
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, version in PACKAGES.items():
            tgz = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            with tarfile.open(Path(tmp) / tgz) as archive:
                js = archive.extractfile(f"package/build/{name}.min.js").read().decode("utf-8")
            if "</script" in js:
                raise SystemExit(f"{name}@{version}: contains '</script', cannot be inlined")
            scripts.append(f"    <script>/* {name}@{version} */\n{js}\n    </script>")
    versions = ", ".join(f"{n}@{v}" for n, v in PACKAGES.items())
    OUT.write_text(PAGE.format(versions=versions, scripts="\n".join(scripts)), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB: {versions})")


if __name__ == "__main__":
    main()
