"""Import of official DiT/SiT state dicts, and DiT -> GSPN conversion.

The official layouts are made here from our DiT backbone (whose outputs equal the official DiT code's
to the last bit, with the same keys except attn -> mixer), with every weight randomised.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from gspn_gen import sample_cli
from gspn_gen.checkpoints import convert, read_checkpoint
from gspn_gen.checkpoints.build import load_module
from gspn_gen.diffusion import FlowMatching
from gspn_gen.distill import convert_to_gspn, shared_keys
from gspn_gen.models.zoo import build_model


def randomised(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A preset with every weight random (also the zero-initialised ones), in eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    return model.eval()


def official_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our DiT's state dict in facebookresearch/DiT's (and willisma/SiT's) key layout."""
    return {k.replace(".mixer.", ".attn."): v.clone() for k, v in model.state_dict().items()}


def run_import(command: str, src: Path, out: Path, vae: str = "stabilityai/sd-vae-ft-ema") -> None:  # recorded only
    convert.main([command, str(src), "--out", str(out), "--vae", vae])


@pytest.fixture(scope="module")
def dit_s2(tmp_path_factory, tiny_vae):
    """DiT-S/2 cut to 2 blocks (8x8 latents, 1000 classes) in the official layout, and its import."""
    tmp = tmp_path_factory.mktemp("dit")
    teacher = randomised("DiT-S/2", input_size=8, depth=2)
    torch.save(official_layout(teacher), tmp / "DiT-S-2-64x64.pt")
    run_import("import-dit", tmp / "DiT-S-2-64x64.pt", tmp / "dit-s2.ckpt", vae=tiny_vae)
    return teacher, tmp / "dit-s2.ckpt"


def test_import_dit_reproduces_the_teacher_exactly(dit_s2, tiny_vae):
    teacher, ckpt = dit_s2
    hp = read_checkpoint(str(ckpt))["hyper_parameters"]
    overrides = {k: v for k, v in hp["model_args"].items() if v is not None}
    assert (hp["model"], overrides, hp["num_classes"], hp["in_channels"], hp["input_size"]) == \
        ("DiT-S/2", {"depth": 2}, 1000, 4, 8)
    assert hp["diffusion"]["class_path"].endswith("GaussianDiffusion")
    assert hp["diffusion"]["init_args"]["learn_sigma"] is True
    assert hp["codec"] == {"name": "sd-vae", "path": tiny_vae, "scale": 0.18215}
    module = load_module(str(ckpt))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 417.0, 999.0]), torch.tensor([5, 999, 1000])
    with torch.no_grad():
        assert torch.equal(module.ema(x, t, y), teacher(x, t, y))
        assert torch.equal(module.model(x, t, y), teacher(x, t, y))


def test_imported_dit_samples_through_sample_py(dit_s2, tmp_path):
    _, ckpt = dit_s2
    common = ["--ckpt", str(ckpt), "--num-samples", "3", "--steps", "2", "--sampler", "ddim", "--cfg-scale", "4"]
    sample_cli.main([*common, "--out", str(tmp_path / "all.npz")])
    sample_cli.main([*common, "--guide-channels", "3", "--out", str(tmp_path / "three.npz")])
    import numpy as np

    everything, three = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in ("all", "three"))
    assert everything.shape == (3, 16, 16, 3)  # 8x8 latents through the tiny VAE (downsample 2)
    assert not np.array_equal(everything, three)


@pytest.mark.parametrize("edit, key", [
    (lambda sd: sd.update({"blocks.1.attn.q_norm.weight": torch.ones(1)}), "blocks.1.attn.q_norm.weight"),
    (lambda sd: [sd.update({f"module.{k}": sd.pop(k)}) for k in list(sd)], "module.pos_embed"),
    (lambda sd: sd.pop("blocks.0.mlp.fc2.bias"), "blocks.0.mlp.fc2.bias"),
])
def test_unknown_layout_is_refused_in_one_line(tmp_path, capsys, edit, key):
    state = official_layout(randomised("DiT-T/2", input_size=8, depth=2))
    edit(state)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(SystemExit) as exc:
        run_import("import-dit", tmp_path / "odd.pt", tmp_path / "out.ckpt")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and repr(key) in err
    assert not list(tmp_path.glob("*out.ckpt*")), "something was written"


def test_import_sit_matches_a_sit_convention_sampler(tmp_path):
    """SiT: x_s = s data + (1 - s) noise, v_SiT = data - noise, the sigma half dropped. Our Euler steps
    from t = 1 with the imported model must equal SiT-convention Euler steps from s = 0."""
    sit = randomised("DiT-T/2", input_size=8, depth=2, in_channels=4, num_classes=1000, learn_sigma=True)
    torch.save(official_layout(sit), tmp_path / "SiT.pt")
    run_import("import-sit", tmp_path / "SiT.pt", tmp_path / "sit.ckpt")
    module = load_module(str(tmp_path / "sit.ckpt"))
    assert isinstance(module.diffusion, FlowMatching) and module.ema.out_channels == 4

    def sit_velocity(x, s, y):  # SiT's forward: the network, then the first half of the channels
        return sit(x, torch.full((x.shape[0],), s), y).chunk(2, dim=1)[0]

    noise, y, steps = torch.randn(2, 4, 8, 8), torch.tensor([3, 1000]), 4
    x = noise.clone()
    with torch.no_grad():
        for k in range(steps):
            x = x + (1 / steps) * sit_velocity(x, k / steps, y)
        ours = module.diffusion.sample(module.ema, noise, y, sampler="euler", steps=steps)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert (x - noise).abs().mean() > 0.1  # the model moved the samples


def test_conversion_copies_shared_tensors_and_starts_as_the_teacher_without_attention():
    teacher = randomised("DiT-S/2", input_size=8, depth=3)
    student = build_model("GSPN-S/2", input_size=8, depth=3, fixed_pos_embed=True)
    copied = convert_to_gspn(teacher, student)
    theirs, ours = teacher.state_dict(), student.state_dict()
    assert set(copied) == {k for k in theirs if ".mixer." not in k} == set(shared_keys(teacher, student))
    for key in copied:
        assert torch.equal(ours[key], theirs[key]), key
    for block in student.blocks:
        assert not block.mixer.out_proj.weight.any() and not block.mixer.out_proj.bias.any()

    class Removed(nn.Module):
        def forward(self, x, grid):
            return torch.zeros_like(x)

    without_attention = copy.deepcopy(teacher)
    for block in without_attention.blocks:
        block.mixer = Removed()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([7, 1000])
    with torch.no_grad():
        assert torch.equal(student.eval()(x, t, y), without_attention(x, t, y))
        assert not torch.allclose(teacher(x, t, y), without_attention(x, t, y))  # attention mattered


def test_conversion_refuses_a_different_shape():
    teacher = randomised("DiT-S/2", input_size=8, depth=2)
    with pytest.raises(ValueError, match="blocks"):
        convert_to_gspn(teacher, build_model("GSPN-S/2", input_size=8, depth=3, fixed_pos_embed=True))
    with pytest.raises(ValueError, match="shape"):
        convert_to_gspn(teacher, build_model("GSPN-S/4", input_size=8, depth=2, fixed_pos_embed=True))


def test_the_null_class_is_detected_not_assumed(tmp_path, capsys, tiny_vae):
    """A DiT trained without label dropout has no null row: it imports with all its classes and samples
    unguided only. Which it is comes from --num-classes (or the official 1001-row table), never a guess."""
    model = randomised("DiT-T/2", input_size=8, depth=2, num_classes=10)
    state = official_layout(model)
    state["y_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"][:10]  # no null row
    torch.save(state, tmp_path / "nodrop.pt")
    with pytest.raises(SystemExit) as exc:
        run_import("import-dit", tmp_path / "nodrop.pt", tmp_path / "a.ckpt", vae=tiny_vae)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "label table has 10 rows" in err and "--num-classes 9 or --num-classes 10" in err
    convert.main(["import-dit", str(tmp_path / "nodrop.pt"), "--out", str(tmp_path / "a.ckpt"), "--vae",
                      tiny_vae, "--num-classes", "10"])
    assert "no null class" in capsys.readouterr().out
    hp = read_checkpoint(str(tmp_path / "a.ckpt"))["hyper_parameters"]
    assert hp["num_classes"] == 10 and hp["model_args"]["class_dropout_prob"] == 0.0
    module = load_module(str(tmp_path / "a.ckpt"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([0, 9])
    with torch.no_grad():
        assert torch.equal(module.ema(x, t, y), model(x, t, y))  # class 9 is a class, not "unconditional"
    args = ["--ckpt", str(tmp_path / "a.ckpt"), "--classes", "9", "--per-class", "1", "--steps", "1"]
    with pytest.raises(SystemExit) as exc:
        sample_cli.main([*args, "--out", str(tmp_path / "g.png")])  # default --cfg-scale 4
    assert exc.value.code == 2 and "no null class to guide with" in capsys.readouterr().err
    sample_cli.main([*args, "--cfg-scale", "1", "--out", str(tmp_path / "g.png")])
    # 10 rows read as 9 classes and the null class, when that is what the model was
    convert.main(["import-dit", str(tmp_path / "nodrop.pt"), "--out", str(tmp_path / "b.ckpt"), "--vae",
                      tiny_vae, "--num-classes", "9"])
    hp = read_checkpoint(str(tmp_path / "b.ckpt"))["hyper_parameters"]
    assert hp["num_classes"] == 9 and "class_dropout_prob" not in {k for k, v in hp["model_args"].items() if v}
    with pytest.raises(SystemExit):
        convert.main(["import-dit", str(tmp_path / "nodrop.pt"), "--out", str(tmp_path / "c.ckpt"),
                          "--vae", tiny_vae, "--num-classes", "4"])
    assert "expected 5 with a null class or 4 without" in capsys.readouterr().err


@pytest.mark.parametrize("case, expected", [
    ("truncated", "is truncated or corrupt ("),
    ("empty", "is empty (0 bytes"),
    ("exists", "exists; pass --overwrite"),
    ("vae missing", "--vae: VAE directory '/missing/dir' does not exist"),
    ("vae not a vae", "holds no readable config.json"),
])
def test_import_messages_say_what_happened(tmp_path, capsys, case, expected):
    src, out = tmp_path / "DiT.pt", tmp_path / "out.ckpt"
    torch.save(official_layout(randomised("DiT-T/2", input_size=8, depth=2)), src)
    vae = {"vae missing": "/missing/dir", "vae not a vae": str(tmp_path)}.get(case, "stabilityai/sd-vae-ft-ema")
    if case == "truncated":
        src.write_bytes(src.read_bytes()[:5000])
    elif case == "empty":
        src.write_bytes(b"")
    elif case == "exists":
        out.write_bytes(b"mine")
    with pytest.raises(SystemExit) as exc:
        run_import("import-dit", src, out, vae=vae)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    if case == "truncated":
        assert "5000 bytes" in err and "argparse" not in err  # not blamed on pickled train.py arguments
    assert (out.read_bytes() == b"mine") if case == "exists" else not out.exists()
    if case == "exists":
        convert.main(["import-dit", str(src), "--out", str(out), "--overwrite"])
        assert read_checkpoint(str(out))["hyper_parameters"]["num_classes"] == 1000
