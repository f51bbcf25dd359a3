"""Export to torch.export (.pt2) and ONNX, checked against the model; the ops that cannot be exported named."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch
from torch import nn

import mixlab
from mixlab import create_model, model_info
from mixlab.cli import main
from mixlab.export import ExportError, export_model

# one small instance of each family's network (the export traces the architecture, not its width)
SMALL = {
    "convmixer_256_8": dict(dim=16, depth=1),
    "convmlp_s": dict(blocks=(1, 1, 1), dims=(16, 24, 32), channels=8, n_conv_blocks=1),
    "asmlp_t_cifar": dict(embed_dim=16, depths=(1, 1, 1, 1)),
    "conv2former_n_cifar": dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)),
    "swin_mlp_tiny_cifar": dict(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
    "unext_s": dict(dims=(8, 16, 32, 40, 48)),
    "resnet18_cifar": dict(),
    "mobilenetv2_cifar": dict(),
    "vit_tiny_cifar": dict(depth=1),
    "swin_tiny_cifar": dict(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
    "mixer_s16_cifar": dict(num_blocks=1, embed_dim=32),
    "resmlp_12_cifar": dict(num_blocks=1, embed_dim=32),
}


def _small(name):
    torch.manual_seed(0)
    model = create_model(name, **SMALL[name])
    head = model.get_classifier()
    if isinstance(head, nn.Linear):  # timm's Mixer/ResMLP start with a zero head: outputs would all be 0
        nn.init.normal_(head.weight, std=0.1)
    size = model_info(name).input_size
    return model, (size[0], 64, 64) if name == "unext_s" else size


# ONNX conversion (with torch's graph optimisation) of UNeXt and MobileNetV2 takes 15-35 s here; their
# ops are covered by the other families' ONNX exports and their own pt2 ones
CASES = [(n, "pt2") for n in sorted(SMALL)] + [(n, "onnx") for n in sorted(SMALL)
                                                if n not in ("unext_s", "mobilenetv2_cifar")]


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt", CASES)
def test_families_export_and_reproduce_the_model(name, fmt, tmp_path):
    model, size = _small(name)
    out = tmp_path / f"m.{fmt}"
    r = export_model(model, out, fmt, size, name=name, metadata=dict(mean=[0.5] * 3), say=None)
    assert out.is_file() and r.max_abs_diff <= r.atol and r.note == ""
    x = torch.randn(5, *size)  # a batch size neither traced nor checked: the batch dimension is dynamic
    with torch.no_grad():
        want = model.eval()(x)
    if fmt == "pt2":
        got = torch.export.load(str(out)).module()(x)
        with zipfile.ZipFile(out) as z:
            meta = json.loads(next(z.read(n) for n in z.namelist() if n.endswith("mixlab.json")))
    else:
        import onnx
        import onnxruntime as ort

        s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
        meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["mixlab"])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert meta["model"] == name and meta["input_size"] == list(size) and meta["mean"] == [0.5] * 3


@pytest.mark.slow
@pytest.mark.parametrize("name", mixlab.list_models())
def test_every_registered_model_traces_with_torch_export(name):
    # on the meta device: the whole graph is traced (every op and shape), nothing is computed
    with torch.device("meta"):
        model = create_model(name).eval()
        x = torch.randn(2, *model_info(name).input_size)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
    assert len(program.graph.nodes) > 3


@torch.library.custom_op("mixlabtest::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class _CustomOp(nn.Module):
    def forward(self, x):
        return _mystery(x).mean((2, 3))


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x.mean((2, 3))
        return x.amax((2, 3))


def test_an_op_onnx_lacks_is_named_and_the_old_file_kept(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match=r"cannot export custom to onnx \(torch\.onnx\): the op mixlabtest\.mystery "
                                          r"has no ONNX translation.*--format pt2"):
        export_model(_CustomOp(), out, "onnx", (3, 8, 8), name="custom", say=None)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind
    # the same model keeps its op in a torch.export program
    r = export_model(_CustomOp(), tmp_path / "m.pt2", "pt2", (3, 8, 8), name="custom", say=None)
    assert r.max_abs_diff == 0.0


def test_model_code_that_cannot_be_traced_is_named(tmp_path):
    with pytest.raises(ExportError, match=r"cannot export branchy to pt2 \(torch\.export\): at test_export\.py:\d+ "
                                          r"in forward: `if x\.sum\(\) > 0:`"):
        export_model(_DataDependent(), tmp_path / "m.pt2", "pt2", (3, 8, 8), name="branchy", say=None)
    assert not (tmp_path / "m.pt2").exists()


def test_a_wrong_export_is_refused(tmp_path, monkeypatch):
    import mixlab.export as ex

    real = ex._run_onnx
    monkeypatch.setattr(ex, "_run_onnx", lambda path, x, name: real(path, x, name) + 0.01)
    with pytest.raises(ExportError, match="does not reproduce the model: max \\|difference\\| 0.01"):
        export_model(nn.Conv2d(3, 4, 3), tmp_path / "c.onnx", "onnx", (3, 8, 8), say=None)
    assert not (tmp_path / "c.onnx").exists()


def test_cli_export_a_model(tmp_path, capsys):
    out = tmp_path / "r.pt2"
    assert main(["export", "--model", "mobilenetv1_cifar", "--format", "pt2", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["path"] == str(out) and r["format"] == "pt2" and r["input_shape"] == [2, 3, 32, 32]
    assert r["max_abs_diff"] <= 1e-4 and out.is_file() and r["note"] == ""
    with pytest.raises(SystemExit):
        main(["export", "--model", "mobilenetv1_cifar", "--format", "tflite", "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["export", "--format", "pt2", "--out", str(out)])  # neither --checkpoint nor --model
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path), "--format", "pt2", "--out", str(out)]) == 2
    assert "not a mixlab run directory" in capsys.readouterr().err


def test_a_constant_output_is_said(tmp_path):
    model = create_model("mixer_s16_cifar", num_blocks=1, embed_dim=32)  # timm zero-initialises the head
    r = export_model(model, tmp_path / "m.pt2", "pt2", (3, 32, 32), say=None)
    assert "same output for every input" in r.note
