"""The models bundled with the package (``v2drop.load("proxy")``): names and where they live."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
# "proxy-layer0-trained": the previous proxy (every decoder layer trained, `ident` at its prior), kept to check
# that a conclusion about the methods does not hinge on the shipped proxy's frozen layer 0 (docs/proxy.md)
LOCAL_MODELS = {"proxy": ASSETS / "proxy", "proxy-layer0-trained": ASSETS / "proxy-layer0-trained"}
