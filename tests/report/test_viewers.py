"""Outputs opened by their real clients: the chemiscope file in the viewer the chemiscope package
ships (headless Chromium, served on 127.0.0.1), the extxyz by ASE, the Excel by openpyxl."""

from __future__ import annotations

import functools
import gzip
import http.server
import shutil
import subprocess
import threading
from pathlib import Path

import ase.io
import numpy as np
import pytest

from mace_ood.report.chemiscope import write_chemiscope
from mace_ood.score.compute import compute_scores
from mace_ood.score.evaluation import write_scores_netcdf
from mace_ood.score.latents import open_latents
from mace_ood.score.tables import evaluation_table, rank_table
from mace_ood.testing import random_structures
from tests.synthetic import free_port, synthetic_latent_files

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGE = """<html><head><meta charset="utf-8"><script src="chemiscope.min.js"></script></head>
<body><div id="meta"></div><div id="map" style="width:600px;height:500px"></div>
<div id="structure" style="width:500px;height:500px"></div><div id="info"></div><pre id="status">loading</pre>
<script>
const status = (t) => { document.getElementById('status').textContent = t; };
window.addEventListener('error', e => status('ERROR: ' + e.message));
window.addEventListener('unhandledrejection', e => status('ERROR: ' + e.reason));
const drawn = (root) => {  // svg and canvas elements below root, shadow roots included
  let n = 0;
  for (const el of root.querySelectorAll('*')) {
    if (el.tagName === 'svg' || el.tagName === 'CANVAS') n += 1;
    if (el.shadowRoot) n += drawn(el.shadowRoot);
  }
  return n;
};
const warnings = new Chemiscope.Warnings();
const messages = [];
warnings.addHandler((m) => messages.push(String(m)));
fetch('dataset.json').then(r => r.text()).then(async text => {
  const dataset = JSON.parse(text.replace(/\\bNaN\\b/g, 'null'));
  try {
    await Chemiscope.DefaultVisualizer.load({map: 'map', info: 'info', meta: 'meta', structure: 'structure'}, dataset, warnings);
    await new Promise(r => setTimeout(r, 3000));
    const map = drawn(document.getElementById('map'));
    const structure = drawn(document.getElementById('structure'));
    status(`LOADED map=${map} structure=${structure} warnings=${JSON.stringify(messages)}`);
  } catch (e) { status('ERROR: ' + e); }
});
</script></body></html>"""


def chemiscope_file(tmp_path: Path) -> Path:
    structures = random_structures(4, seed=3, sizes=(1, 2))
    source = tmp_path / "md_CuAl.xyz"
    ase.io.write(source, structures)
    sizes = tuple(len(a) for a in structures)
    paths, _, _ = synthetic_latent_files(tmp_path / "lat", sizes=sizes)
    with open_latents(paths) as latents:
        scores = compute_scores(latents, None)
        scores["source_file"] = ("structure", np.array([str(source)] * len(sizes)))
        scores["frame_index"] = ("structure", np.arange(len(sizes)))
        scores_path = write_scores_netcdf(scores, tmp_path / "scores.nc")
    table = rank_table(evaluation_table(scores_path, "F", "D", False, None), "latent_variance")
    return write_chemiscope(table, scores_path, paths[0], tmp_path / "view.json.gz", "latent_variance")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_chemiscope_file_opens_in_the_viewer_chemiscope_ships(tmp_path):
    import chemiscope

    path = chemiscope_file(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(Path(chemiscope.__file__).parent / "sphinx" / "static" / "chemiscope.min.js", site)
    (site / "dataset.json").write_bytes(gzip.open(path).read())
    (site / "index.html").write_text(PAGE)
    port = free_port()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
             "--dump-dom", f"http://127.0.0.1:{port}/index.html"],
            capture_output=True, text=True, timeout=120,
        ).stdout
    finally:
        server.shutdown()
    status = dom.split('id="status">', 1)[1].split("<", 1)[0]
    assert status.startswith("LOADED"), status  # today's file failed: "invalid value 'latent PC1' for axis"
    counts = dict(part.split("=", 1) for part in status.split()[1:3])
    assert int(counts["map"]) > 0, status  # the map pane is drawn (plotly svg/canvas)
    assert int(counts["structure"]) > 0, status  # the 3D structure pane is drawn


def test_extxyz_and_cif_read_back_with_their_per_atom_arrays_and_tags(tmp_path):
    from mace_ood.report.structures import write_selected
    from mace_ood.select.top import select_top

    structures = random_structures(3, seed=4, sizes=(1, 2))
    source = tmp_path / "bulk.xyz"
    ase.io.write(source, structures)
    paths, _, _ = synthetic_latent_files(tmp_path / "lat", sizes=tuple(len(a) for a in structures))
    with open_latents(paths) as latents:
        scores = compute_scores(latents, None)
        scores["source_file"] = ("structure", np.array([str(source)] * 3))
        scores["frame_index"] = ("structure", np.arange(3))
        scores_path = write_scores_netcdf(scores, tmp_path / "scores.nc")
    table = rank_table(evaluation_table(scores_path, "F", "D", False, None), "latent_variance")
    picks = select_top(table, 2).assign(selected=[1, 2], group_size=[4, 1], nearest_training_id=["t1", "t2"],
                                        nearest_training_distance=[0.5, 0.25])
    written = write_selected(picks, scores_path, tmp_path / "top", "latent_variance")
    for row in written.itertuples():
        xyz = ase.io.read(row.extxyz)
        assert len(xyz.arrays["MACE_OOD_latent_variance"]) == row.n_atoms
        assert xyz.info["MACE_OOD_group_size"] == row.group_size
        cif = ase.io.read(row.cif, store_tags=True)
        assert cif.info["_mace_ood_selected"] == row.selected
        assert cif.info["_mace_ood_nearest_training_id"] == row.nearest_training_id
        assert Path(row.cif).name.startswith(f"{row.selected:02d}_")
