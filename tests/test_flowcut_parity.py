"""FlowCut against the official package (PyPI ``flowcut``, the code of ``TungChintao/FlowCut``) on the same tiny tower.

The official code patches transformers 4.x's CLIP classes, so it runs in a separate virtual environment that this
test builds: transformers 4.37.2 (the version LLaVA-1.5 pins) and ``flowcut`` from the package index, everything else
(torch) from this environment. Skipped, with the reason, when pip cannot install them.
"""

import json
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from transformers import CLIPVisionConfig

from v2drop import Method, Schedule
from v2drop.engine.encoder import run_encoder_stages
from v2drop.engine.loop import SampleTrace, sample_keys
from v2drop.testing import image, random_llava

pytestmark = [pytest.mark.slow, pytest.mark.integration]

OFFICIAL = ["transformers==4.37.2", "tokenizers==0.15.2", "huggingface-hub==0.20.3", "flowcut==1.0.2"]
TARGET = 16  # patches kept of 144
LAYERS = 8  # read at layer -2: the official code prunes after encoder layers 1, 3 and 5 (0-based), our vision:6

# Runs in the separate environment: the official patched CLIP forwards on the saved tower, one image at a time (as
# the official evaluation), recording the kept patch indices after every encoder layer.
REFERENCE = textwrap.dedent(
    """
    import importlib.util, json, sys, types
    import torch
    spec = importlib.util.find_spec("flowcut")  # its submodules only: its __init__ imports LLaVA
    package = types.ModuleType("flowcut")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["flowcut"] = package
    from flowcut import modeling_clip_flowcut as fc
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip import modeling_clip as mc

    data = torch.load(sys.argv[1])
    model = CLIPVisionModel(CLIPVisionConfig(**data["config"])).eval()
    model.load_state_dict({"vision_model." + k: v for k, v in data["state"].items()})
    kept = []

    def layer_forward(self, *args, **kwargs):
        out, scores, keep = fc.CLIPEncoderLayer_forward(self, *args, **kwargs)
        kept.append(keep[0].tolist())
        return out, scores, keep

    mc.CLIPAttention.forward = fc.CLIPAttention_forward
    mc.CLIPEncoderLayer.forward = layer_forward
    mc.CLIPEncoder.forward = fc.CLIPEncoder_forward
    mc.CLIPVisionTransformer.forward = fc.CLIPVisionTransformer_forward
    fc.apply_flowcut_config(model, target_tokens=data["target"] + 1)  # select_feature 'patch': + 1 for the [CLS]
    out = []
    for pixels in data["pixels"]:
        kept.clear()
        with torch.no_grad():
            _, final = model(pixels[None], output_hidden_states=True, output_attentions=True)
        out.append({"per_layer": list(kept), "final": final[0].tolist()})
    json.dump(out, open(sys.argv[2], "w"))
    """
)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A Python that imports transformers 4.37.2 and the official ``flowcut`` (this environment's other packages)."""
    root = tmp_path_factory.mktemp("flowcut-official")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, *OFFICIAL],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        pytest.skip(f"pip could not install {' '.join(OFFICIAL)}: {install.stderr.strip().splitlines()[-1:]}")
    with open(f"{site}/this-environment.pth", "w") as f:  # torch and the rest, after the pinned packages
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_kept_patches_equal_the_official_code_layer_by_layer(official, tmp_path):
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        image_size=48,
        patch_size=4,
        initializer_factor=10.0,
    )  # fmt: skip  (peaked attention: FlowCut's adaptive count drops patches before the last stage)
    lvlm = random_llava(hidden=64, layers=2, image_size=48, patch=4, vision=vision)
    n = 3
    inputs = lvlm.prepare([lvlm.format_prompt("w1" + " w2" * i) for i in range(n)], [image(i, 48) for i in range(n)])
    method = Method(
        "flowcut", schedule=Schedule.one_shot(f"vision:{LAYERS - 2}", TARGET, "absolute"), position_policy="renumber"
    )
    ours: list[list] = [[] for _ in range(n)]
    select = method.scorer.select
    calls = iter(range(10**6))

    def recording(state, scores, counts):
        selection = select(state, scores, counts)
        image_idx = next(calls) % n  # images are scored in order at every layer
        ours[image_idx].append((state.orig_idx[0, 1 + selection.keep[0]] - 1).tolist())
        return selection

    method.scorer.select = recording
    traces = [SampleTrace() for _ in range(n)]
    with torch.no_grad():
        run_encoder_stages(
            lvlm.adapter, inputs, method, sample_keys(inputs["input_ids"], inputs["attention_mask"]), traces
        )
    tower = lvlm.model.model.vision_tower
    saved = tmp_path / "tower.pt"
    torch.save(
        {
            "config": vision.to_dict(),
            "state": tower.state_dict(),
            "pixels": list(inputs["pixel_values"].float()),
            "target": TARGET,
        },
        saved,
    )
    result = subprocess.run(
        [str(official), "-c", REFERENCE, str(saved), str(tmp_path / "out.json")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reference = json.loads((tmp_path / "out.json").read_text())
    for mine, theirs in zip(ours, reference):
        assert len(mine) == LAYERS - 2  # scored before encoder layers 1 .. 6
        # the official indices are the tower's (with the [CLS]) until the first drop, then patch indices
        per_layer = [list(range(len(k) - 1)) if len(k) == 145 else k for k in theirs["per_layer"]]
        assert mine == per_layer[: LAYERS - 2]  # the kept patches after every encoder layer
        assert mine[-1] == theirs["final"] and len(mine[-1]) == TARGET
    assert any(TARGET < len(k) < 144 for mine in ours for k in mine)  # an adaptive drop before the last stage
