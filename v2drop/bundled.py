"""The models bundled with the package (``v2drop.load("proxy")``): names and where they live."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
# The earlier proxies, kept to check that a conclusion about the methods does not hinge on one model (docs/proxy.md):
# "proxy-layer0-frozen" (decoder layer 0 left at its initial weights; the shipped proxy's starting point) and
# "proxy-layer0-trained" (every layer trained from the start, `ident` at its prior).
LOCAL_MODELS = {
    "proxy": ASSETS / "proxy",
    "proxy-layer0-frozen": ASSETS / "proxy-layer0-frozen",
    "proxy-layer0-trained": ASSETS / "proxy-layer0-trained",
}
