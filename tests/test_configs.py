"""Every shipped config parses with the real CLI, `extends` composes overlays, the figures in the config
headers and README match the configs and the presets, and the paper presets have the official sizes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from gspn_gen import train_cli
from gspn_gen.models.zoo import build_model, count_params

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted((CONFIGS / "experiments").glob("*.yaml"))


def print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["fit", *args, "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def params_m(preset: str, latent: int = 32) -> float:
    """Parameters in millions at `latent`x`latent`x4 latents and 1000 classes (ImageNet through the SD VAE)."""
    with torch.device("meta"):
        return count_params(build_model(preset, input_size=latent, in_channels=4, num_classes=1000)) / 1e6


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_config_parses(config, capsys):
    printed = print_config(capsys, "--config", str(config))
    assert printed["model"]["model"] in (config.read_text() + (CONFIGS / "experiments" / "demo_digits.yaml").read_text())
    assert printed["trainer"]["max_steps"] > 0
    assert printed["model"]["diffusion"]["class_path"].startswith("gspn_gen.diffusion.")


@pytest.mark.parametrize("overlay", sorted((CONFIGS / "trainer").glob("*.yaml")) + sorted((CONFIGS / "data").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_overlays_compose_with_an_experiment(overlay, capsys):
    printed = print_config(capsys, "--config", str(CONFIGS / "experiments" / "gspn-xl2_in256.yaml"),
                           "--config", str(overlay))
    for section, values in yaml.safe_load(overlay.read_text()).items():
        if section == "trainer":
            assert all(printed["trainer"][k] == v for k, v in values.items() if not isinstance(v, (dict, list)))
        else:
            assert printed[section]["class_path"] == values["class_path"]


def test_extends_reads_the_bases_first_and_refuses_cycles_and_missing_files(tmp_path, capsys):
    flow = print_config(capsys, "--config", str(CONFIGS / "experiments" / "demo_digits_flow.yaml"))
    demo = print_config(capsys, "--config", str(CONFIGS / "experiments" / "demo_digits.yaml"))
    assert flow["model"]["diffusion"]["class_path"] == "gspn_gen.diffusion.FlowMatching"
    assert flow["trainer"]["default_root_dir"] == "runs/demo-flow"
    assert {k: v for k, v in flow["trainer"].items() if k != "default_root_dir"} == \
        {k: v for k, v in demo["trainer"].items() if k != "default_root_dir"}
    assert flow["data"] == demo["data"] and flow["model"]["optim"] == demo["model"]["optim"]
    flow_path = str(CONFIGS / "experiments" / "demo_digits_flow.yaml")
    assert train_cli.expand_configs(["-c", flow_path]) == train_cli.expand_configs(["--config", flow_path]) \
        == train_cli.expand_configs([f"-c{flow_path}"])

    (tmp_path / "a.yaml").write_text("extends: b.yaml\nmodel: {optim: {lr: 0.01}}\n")
    (tmp_path / "b.yaml").write_text("extends: [a.yaml]\n")
    (tmp_path / "c.yaml").write_text("extends: [missing.yaml]\n")
    for name, reason in (("a.yaml", "forms a cycle"), ("c.yaml", "'missing.yaml': no such file")):
        with pytest.raises(SystemExit) as exc:
            train_cli.main(["fit", "--config", str(tmp_path / name), "--print_config"])
        assert exc.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and reason in errors[0]


# "... 1 node(s) x 8 GPUs, 32 per GPU = global batch 256; AdamW lr 1.0e-4, constant schedule,
#  EMA 0.9999, 400,000 steps, ... 12.1 GiB of model state (650.3M params x 20 bytes ..."
HEADER = re.compile(
    r"(?P<nodes>\d+) node\(s\) x (?P<gpus>\d+) GPUs, (?P<batch>\d+) per GPU = global batch (?P<global>\d+); "
    r"AdamW lr (?P<lr>[\d.e-]+), (?P<schedule>\w+) schedule,\s*#\s*EMA (?P<ema>[\d.]+), (?P<steps>[\d,]+) steps.*?"
    r"(?P<gib>[\d.]+) GiB of model state \((?P<params>[\d.]+)M params x 20 bytes", re.DOTALL)


@pytest.mark.parametrize("config", [c for c in EXPERIMENTS if "GiB of model state" in c.read_text()],
                         ids=lambda p: p.name)
def test_config_header_figures_match_the_config_and_the_preset(config, capsys):
    figures = HEADER.search(config.read_text())
    assert figures, f"{config.name}: header not in the checked form"
    cfg = print_config(capsys, "--config", str(config))
    trainer, model, data = cfg["trainer"], cfg["model"], cfg["data"]["init_args"]
    assert (int(figures["nodes"]), int(figures["gpus"]), int(figures["batch"])) == \
        (trainer["num_nodes"], trainer["devices"], data["batch_size"])
    assert int(figures["global"]) == trainer["num_nodes"] * trainer["devices"] * data["batch_size"]
    assert (float(figures["lr"]), figures["schedule"], float(figures["ema"])) == \
        (model["optim"]["lr"], model["optim"]["lr_schedule"], model["ema_args"]["decay"])
    assert int(figures["steps"].replace(",", "")) == trainer["max_steps"]
    latent = int(re.search(r"_in(\d+)", config.name).group(1)) // 8
    params = params_m(model["model"], latent)
    assert float(figures["params"]) == round(params, 1)
    assert float(figures["gib"]) == round(params * 1e6 * 20 / 2**30, 1)


def test_paper_presets_have_the_sizes_readme_and_configs_state():
    """README: "GSPN-paper-B/L/XL/2: 144.8M / 467.1M / 725.9M, within 0.6% of the official code's 144.0M /
    465.2M / 723.5M"; each paper config's header names its preset's count and the official one."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    found = re.search(r"GSPN-paper-B/L/XL/2: ([\d.]+)M / ([\d.]+)M / ([\d.]+)M, within ([\d.]+)% of the official "
                      r"code's ([\d.]+)M / ([\d.]+)M / ([\d.]+)M", readme)
    assert found, "README no longer states the paper preset sizes in the checked form"
    ours, tolerance, official = [float(v) for v in found.groups()[:3]], float(found[4]), \
        [float(v) for v in found.groups()[4:]]
    for size, stated, theirs in zip(("B", "L", "XL"), ours, official):
        counted = params_m(f"GSPN-paper-{size}/2")
        assert round(counted, 1) == stated
        assert abs(counted - theirs) / theirs * 100 <= tolerance
        header = (CONFIGS / "experiments" / f"gspn-paper-{size.lower()}2_in256.yaml").read_text()
        assert f"({stated}M params; the official code builds {theirs}M)" in header
