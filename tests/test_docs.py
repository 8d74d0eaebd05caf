"""The documentation site builds with no warning (``mkdocs build --strict``): every page in
the navigation, every link and anchor between pages, the API reference from the docstrings."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_documentation_site_builds_strictly_with_its_api_reference(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    reference = (tmp_path / "reference" / "index.html").read_text()
    assert "rhapsody_graph.Session" in reference and "submit" in reference
    assert "Two commands" in (tmp_path / "index.html").read_text()
    for page in ("concepts", "dask", "troubleshooting", "cli", "rhapsody", "ai", "dragon",
                 "performance", "scaling", "api"):
        assert (tmp_path / page / "index.html").exists(), page
