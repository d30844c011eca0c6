"""Backbone, mixers and presets: shapes, adaLN-Zero init, class dropout, structure, parameter counts."""

import dataclasses
import inspect
import typing

import pytest
import torch

from gspn_gen.models import DiffusionBackbone, GSPNMixer, build_model, list_models
from gspn_gen.models.mixer import AttentionConfig, GSPNConfig
from gspn_gen.models.zoo import DATA_FIELDS, MODELS, ModelArgs, count_flops, count_params

# Presets small enough (or cut down enough) to run forward and backward on CPU in seconds.
DIGITS = {"input_size": 16, "in_channels": 1, "num_classes": 10}  # the data shape comes from the data, not a preset
SMALL = {
    "GSPN-T/1": DIGITS,
    "GSPN-T/2": DIGITS,
    "DiT-T/1": DIGITS,
    "DiT-T/2": DIGITS,
    "GSPN-XL/2": {"depth": 2, "input_size": 16},
    "DiT-XL/4": {"depth": 1, "input_size": 16},
    "GSPN-paper-B/2": {"depth": 5, "input_size": 16, "hidden_size": 96},
}


def build_small(name: str, **overrides) -> DiffusionBackbone:
    torch.manual_seed(0)
    return build_model(name, **{**SMALL[name], **overrides})


def inputs(model: DiffusionBackbone, n: int = 2, size: tuple[int, int] | None = None):
    side = model.grid[0] * model.patch_size                             # the preset's input_size
    h, w = size or (side, side)
    x = torch.randn(n, model.in_channels, h, w)
    t = torch.randint(0, 1000, (n,)).float()
    y = torch.randint(0, model.num_classes, (n,))
    return x, t, y


def perturb_zero_init(model: torch.nn.Module) -> None:
    """Move the zero-initialised parameters a small random step away from zero."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(std=0.02)


@pytest.mark.parametrize("name", list(SMALL))
def test_output_shape_and_adaln_zero_init(name):
    model = build_small(name)                                           # learn_sigma: 2C channels out
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == (2, 2 * x.shape[1], *x.shape[2:])
    assert torch.equal(out, torch.zeros_like(out))                      # adaLN-Zero: exactly zero


@pytest.mark.parametrize("name", ["GSPN-T/2", "DiT-T/2"])
def test_output_shape_without_learned_sigma(name):
    model = build_small(name, learn_sigma=False, in_channels=3).eval()
    x, t, y = inputs(model)
    assert model(x, t, y).shape == x.shape


@pytest.mark.parametrize("name", ["GSPN-T/2", "DiT-T/2"])
def test_other_resolution_and_aspect(name):
    # GSPN needs no position embedding; attention gets the sin-cos one of the new grid.
    model = build_small(name).eval()
    perturb_zero_init(model)
    x, t, y = inputs(model, size=(8, 12))
    out = model(x, t, y)
    assert out.shape == (2, 2, 8, 12) and torch.isfinite(out).all()


def test_class_dropout_only_in_training_and_null_id_accepted():
    model = build_small("GSPN-T/2", class_dropout_prob=0.5)
    table = model.y_embedder.embedding_table.weight
    null = model.num_classes
    y = torch.arange(null).repeat(20)                                   # 200 labels, never null

    model.train()
    emb = model.y_embedder(y)
    dropped = (emb == table[null]).all(dim=1)
    assert 0 < dropped.sum() < len(y)                                   # some dropped, some kept
    assert torch.equal(emb[~dropped], table[y[~dropped]])               # kept ones untouched

    model.eval()
    assert torch.equal(model.y_embedder(y), table[y])                   # no dropout in eval mode

    x, t, _ = inputs(model)
    out = model(x, t, torch.full((2,), null))                           # the null id is a valid label
    assert out.shape == (2, 2, 16, 16)


def test_class_dropout_zero_keeps_labels_in_training():
    model = build_small("DiT-T/2", class_dropout_prob=0.0).train()
    y = torch.arange(10)
    assert torch.equal(model.y_embedder(y), model.y_embedder.embedding_table.weight[y])


def test_timestep_embedding_separates_ddpm_and_flow_times():
    emb = build_small("GSPN-T/2").t_embedder
    for t in (torch.tensor([10.0, 11.0, 999.0]), torch.tensor([0.0, 0.01, 1.0])):
        f = emb.frequencies(t)
        assert torch.isfinite(f).all()
        assert torch.cdist(f, f).fill_diagonal_(1.0).min() > 1e-3       # distinct times, distinct features


def test_gspn_and_dit_presets_differ_only_in_the_mixer():
    with torch.device("meta"):
        gspn, dit = build_model("GSPN-XL/2"), build_model("DiT-XL/2")
    outside = {
        name: p.shape for name, p in gspn.named_parameters() if ".mixer." not in name
    }
    outside_dit = {
        name: p.shape for name, p in dit.named_parameters() if ".mixer." not in name and name != "pos_embed"
    }
    assert outside == outside_dit
    assert isinstance(gspn.blocks[0].mixer, GSPNMixer) and not isinstance(dit.blocks[0].mixer, GSPNMixer)
    assert gspn.pos_embed is None and not dit.pos_embed.requires_grad


@pytest.mark.parametrize("chunk", [1, None])
def test_gspn_mixer_reach_follows_grid_and_chunk(chunk):
    # chunk=1 stops every scan at each line: a token then reaches only the 3x3 depthwise-conv
    # neighbourhood, in the row-major (H, W) frame; a global scan carries it beyond.
    torch.manual_seed(0)
    mixer = GSPNMixer(8, GSPNConfig(chunk=chunk)).double()
    grid, (i, j) = (5, 7), (2, 3)
    x = torch.randn(1, 35, 8, dtype=torch.float64)
    moved = x.clone()
    moved[0, i * grid[1] + j] += 1.0
    changed = (mixer(moved, grid) - mixer(x, grid)).abs().amax(-1).reshape(grid) > 1e-12
    near = torch.zeros(grid, dtype=torch.bool)
    near[i - 1:i + 2, j - 1:j + 2] = True
    assert changed[i, j]
    assert changed[~near].any() == (chunk is None)


def test_gspn_local_and_global_layers():
    model = build_small("GSPN-T/2", chunk=3, global_layers=2)
    assert [b.mixer.chunk for b in model.blocks] == [3, 3, 3, 3, None, None]
    model = build_small("GSPN-T/2", chunk=None, global_layers=0)
    assert all(b.mixer.chunk is None for b in model.blocks)


def test_model_args_list_the_backbone_and_mixer_settings_with_their_types():
    # ModelArgs is written out field by field: each backbone argument the data does not decide and each
    # mixer setting, typed as where it acts and optional (null keeps the preset's value).
    acting = typing.get_type_hints(DiffusionBackbone.__init__)
    acting = {n: acting[n] for n in inspect.signature(DiffusionBackbone).parameters if n not in DATA_FIELDS}
    acting["mixer"] = typing.Literal["gspn", "attention"]
    acting.update(typing.get_type_hints(AttentionConfig))
    acting.update({"gspn_backend" if n == "backend" else n: t for n, t in typing.get_type_hints(GSPNConfig).items()})
    declared = typing.get_type_hints(ModelArgs)
    assert declared.keys() == acting.keys()
    assert all(declared[n] == t | None for n, t in acting.items()), declared
    assert all(set(settings) <= set(declared) for settings in MODELS.values())


# model_args as a checkpoint holds them: flat, one entry per ModelArgs field. Renaming or nesting a field
# needs an upgrade in gspn_gen.checkpoints.upgrade_hparams; this pins the stored form.
STORED_MODEL_ARGS = {
    "patch_size": None, "hidden_size": 32, "depth": 3, "num_heads": 2, "mlp_ratio": None,
    "class_dropout_prob": None, "mixer": None, "paper_layout": None, "chunk": 3, "global_layers": 1,
    "proxy_dim": 4, "channels_per_gate": 2, "conv_kernel": 5, "direct_term": True, "conv_out": True,
    "scan_dim": 16, "recompute": True, "gspn_backend": "torch", "fixed_pos_embed": True,
}


def test_stored_model_args_rebuild_the_model_they_describe():
    from gspn_gen.checkpoints.build import build_module
    from gspn_gen.lit import GenerationModule

    module = GenerationModule(model="GSPN-T/2", model_args=STORED_MODEL_ARGS, num_classes=10, in_channels=1,
                              input_size=8)
    assert module.hparams["model_args"] == STORED_MODEL_ARGS
    model = build_module("stored", dict(module.hparams)).model
    assert [b.mixer.chunk for b in model.blocks] == [3, 3, None] and model.pos_embed is not None
    mixer = model.blocks[0].mixer
    assert (mixer.backend, mixer.recompute, mixer.dim, mixer.gate_channels) == ("torch", True, 16, 8)
    assert mixer.proxy.out_channels == 4 and mixer.conv.kernel_size == (5, 5)
    assert mixer.direct_proj is not None and mixer.conv_out is not None
    assert build_model("DiT-T/2", num_heads=2, depth=1).blocks[0].mixer.num_heads == 2
    assert dataclasses.asdict(ModelArgs()).keys() == STORED_MODEL_ARGS.keys()


def test_paper_layout_structure():
    model = build_small("GSPN-paper-B/2")                               # depth 5
    assert [b.skip_linear is not None for b in model.blocks] == [False, False, False, True, True]
    assert all(b.adaLN_modulation is None and b.mlp is None for b in model.blocks)
    assert [b.mixer.chunk for b in model.blocks] == [2, 2, 2, None, None]


def test_dit_xl2_matches_dit_parameter_count_and_flops():
    with torch.device("meta"):
        model = build_model("DiT-XL/2")
    assert count_params(model) == 675_129_632                           # DiT's models.py count
    assert count_flops(model, 32) / 2e9 == pytest.approx(118.6, rel=0.01)  # DiT paper, fvcore units


def test_gspn_flops_count_on_meta_and_stay_below_dit_at_the_same_width():
    # `python -m gspn_gen.models.zoo` counts on the meta device: the GSPN mixer's norm must run there too
    with torch.device("meta"):
        gspn, dit = build_model("GSPN-XL/2"), build_model("DiT-XL/2")
    assert 0 < count_flops(gspn, 32) < count_flops(dit, 32)


@pytest.mark.parametrize("name, official", [
    ("GSPN-paper-B/2", 144.0e6), ("GSPN-paper-L/2", 465.2e6), ("GSPN-paper-XL/2", 723.5e6),
])
def test_paper_presets_match_official_parameter_counts(name, official):
    with torch.device("meta"):
        model = build_model(name)
    assert count_params(model) == pytest.approx(official, rel=0.03)


@pytest.mark.parametrize("name", ["GSPN-T/2", "GSPN-paper-B/2"])
def test_gradients_reach_every_parameter(name):
    model = build_small(name, channels_per_gate=2).train()
    perturb_zero_init(model)
    out = model(*inputs(model))
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname


def test_registry_and_errors():
    names = list_models()
    assert names == list(MODELS)
    for size in ("S", "B", "L", "XL"):
        assert {f"DiT-{size}/2", f"DiT-{size}/4", f"DiT-{size}/8", f"GSPN-{size}/2", f"GSPN-{size}/4"} <= set(names)
    assert {"GSPN-paper-B/2", "GSPN-paper-XL/4", "GSPN-T/1", "DiT-T/2"} <= set(names)
    with pytest.raises(ValueError, match="DiT-XL/2"):
        build_model("DiT-XXL/2")
    with pytest.raises(ValueError, match="hidden"):
        build_model("GSPN-T/2", hiden_size=64)
    with pytest.raises(ValueError, match="mixer"):
        build_model("GSPN-T/2", mixer="conv")
    with pytest.raises(ValueError, match="channels_per_gate"):
        build_model("GSPN-T/2", channels_per_gate=3)
    model = build_small("GSPN-T/2")
    with pytest.raises(ValueError, match="x must be"):
        model(torch.zeros(2, 3, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name", ["GSPN-T/2", "GSPN-paper-B/2"])
def test_recompute_changes_memory_not_results(name):
    # The recomputing mixer runs the same ops again in backward: same outputs and gradients.
    results = []
    for recompute in (False, True):
        model = build_small(name, recompute=recompute, depth=3).train()    # a chunked and a global layer
        perturb_zero_init(model)
        torch.manual_seed(1)                                            # same class-dropout draws
        out = model(*inputs(model))
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out0, grads0), (out1, grads1) = results
    assert torch.equal(out0, out1)
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-7, msg=n)


def test_gpu_presets_recompute_and_tiny_ones_do_not():
    with torch.device("meta"):
        assert all(b.mixer.recompute for b in build_model("GSPN-XL/2", depth=2).blocks)
        assert all(b.mixer.recompute for b in build_model("GSPN-paper-B/2", depth=3).blocks)
    assert not any(b.mixer.recompute for b in build_small("GSPN-T/2").blocks)


def test_compact_propagation_width():
    # scan_dim: in_proj projects down, the scan runs in scan_dim channels, out_proj lifts back.
    model = build_small("GSPN-T/2", scan_dim=32, channels_per_gate=4).train()
    mixer = model.blocks[0].mixer
    assert mixer.in_proj.weight.shape == (32, 128) and mixer.out_proj.weight.shape == (128, 32)
    assert mixer.lam_proj.out_channels == 4 * 32 and mixer.gate_proj.out_channels == 4 * 3 * 8
    perturb_zero_init(model)
    out = model(*inputs(model))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="channels_per_gate"):
        build_model("GSPN-T/2", scan_dim=30, channels_per_gate=4)
