"""Exports the sd1 fixture UNet (or, with `--unet DIR`, any diffusers UNet folder) to ONNX for the
browser benchmark against ONNX Runtime Web.

    python3 tests/export_onnx.py                    # writes tests/fixtures/sd1/unet/model.onnx
    python3 tests/export_onnx.py --unet DIR         # writes DIR/model.onnx (DIR: a diffusers unet/ folder)

The same network and the same weights as the fixture tgate's tests load: the graph is exported
with torch's ONNX exporter from diffusers' `UNet2DConditionModel`, and every initializer that is a
parameter of `diffusion_pytorch_model.safetensors`, byte for byte, is stored as ONNX *external
data* pointing into that file (offset and length of the tensor inside the safetensors file), so
the committed graph stays small and both engines read one copy of the weights. `model.onnx` sits
in `unet/` as in diffusers' ONNX pipelines. Inputs: `sample` [b, 4, h, w], `timestep` [1] f32,
`encoder_hidden_states` [b, 77, d]; batch and size are dynamic.

Checks, after writing: ONNX Runtime (CPU) on the written file agrees with torch at batch 2 and 1
(batch 2 and 1 at an 8x8 latent, batch 2 at 16x16); the script fails if it does not.
Needs the packages in tests/requirements.txt plus `onnx`, `onnxscript` and `onnxruntime`.
"""
import argparse
import json
import os
import struct
import sys
import tempfile

import numpy as np
import onnx
import torch
from diffusers import UNet2DConditionModel
from onnx import numpy_helper

ROOT = os.path.dirname(os.path.abspath(__file__))
UNET = os.path.join(ROOT, "fixtures", "sd1", "unet")
WEIGHTS = "diffusion_pytorch_model.safetensors"


class Forward(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep[0], encoder_hidden_states, return_dict=False)[0]


def safetensors_index(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    base = 8 + n
    return header, base, data


def inputs(unet, batch, side, seed):
    g = torch.Generator().manual_seed(seed)
    d = unet.config.cross_attention_dim
    return (
        torch.randn(batch, unet.config.in_channels, side, side, generator=g),
        torch.tensor([500.0]),
        torch.randn(batch, 77, d, generator=g),
    )


def export(unet_dir=UNET):
    """Writes `unet_dir`/model.onnx for the UNet in `unet_dir` and checks it against torch."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    model = Forward(unet).eval()
    example = inputs(unet, 2, 16, 0)
    batch, h, w = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("h", max=256), torch.export.Dim("w", max=256)
    tmp = tempfile.mkdtemp()
    raw = os.path.join(tmp, "unet.onnx")
    torch.onnx.export(
        model,
        example,
        raw,
        input_names=["sample", "timestep", "encoder_hidden_states"],
        output_names=["noise_pred"],
        dynamic_shapes={"sample": {0: batch, 2: 8 * h, 3: 8 * w}, "timestep": None, "encoder_hidden_states": {0: batch}},
        dynamo=True,
        external_data=False,
        # Unoptimised: transposed weights stay Transpose nodes over the parameters (ONNX Runtime
        # folds them when it loads the session), so every parameter can live in the safetensors.
        optimize=False,
    )
    graph = onnx.load(raw, load_external_data=True)
    # Only the computation: no per-node stack traces, doc strings or intermediate shapes.
    for node in graph.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del graph.graph.value_info[:]
    header, base, data = safetensors_index(os.path.join(unet_dir, WEIGHTS))
    # Initializers by content: the exporter may rename parameters, never change their bytes.
    by_bytes = {}
    for key, meta in header.items():
        if key == "__metadata__" or meta["dtype"] != "F32":
            continue
        start, end = meta["data_offsets"]
        by_bytes.setdefault(data[start:end], (key, base + start, end - start))
    moved = kept = kept_bytes = 0
    for init in graph.graph.initializer:
        array = numpy_helper.to_array(init)
        found = by_bytes.get(array.astype(array.dtype.newbyteorder("<")).tobytes()) if array.dtype == np.float32 else None
        if found is None or array.size == 0:
            kept += 1
            kept_bytes += array.nbytes
            continue
        _, offset, length = found
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        for k, v in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
            entry = init.external_data.add()
            entry.key, entry.value = k, v
        moved += 1
    out = os.path.join(unet_dir, "model.onnx")
    onnx.save(graph, out)
    onnx.checker.check_model(out)
    print(f"{out}: {os.path.getsize(out)} bytes; {moved} initializers read from {WEIGHTS}, {kept} inline ({kept_bytes} bytes)")

    import onnxruntime as ort

    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    worst = 0.0
    for b, side in ((2, 8), (1, 8), (2, 16)):
        x = inputs(unet, b, side, 1 + b)
        with torch.no_grad():
            want = model(*x).numpy()
        got = session.run(None, {n: t.numpy() for n, t in zip(("sample", "timestep", "encoder_hidden_states"), x)})[0]
        err = float(np.abs(got - want).max())
        worst = max(worst, err / max(1e-12, float(np.abs(want).max())))
        print(f"  batch {b} latent {side}x{side}: max abs err {err:.3e} (scale {np.abs(want).max():.3f})")
    if worst > 1e-4:
        sys.exit(f"ONNX Runtime disagrees with torch: relative error {worst:.3e}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Exports a diffusers UNet folder to ONNX (weights as external data).")
    parser.add_argument("--unet", default=UNET, help="a diffusers unet/ folder (default: the sd1 fixture's)")
    export(os.path.abspath(parser.parse_args(argv).unet))


if __name__ == "__main__":
    main()
