"""Every shipped config parses with the real CLI, and the paper presets have the official sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gspn_gen import distill, train_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("config", sorted((CONFIGS / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_config_parses(config, capsys):
    main = distill.main if config.name.startswith("distill_") else train_cli.main  # python -m gspn_gen.distill
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"] == yaml.safe_load(config.read_text())["model"]["model"]
    assert printed["trainer"]["max_steps"] > 0


@pytest.mark.parametrize("overlay", sorted((CONFIGS / "trainer").glob("*.yaml")) + sorted((CONFIGS / "data").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_overlays_compose_with_an_experiment(overlay, capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["fit", "--config", str(CONFIGS / "experiments" / "gspn-xl2_in256.yaml"),
                        "--config", str(overlay), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    for section, values in yaml.safe_load(overlay.read_text()).items():
        if section == "trainer":
            assert printed["trainer"]["devices"] == values["devices"]
        else:
            assert printed[section]["class_path"] == values["class_path"]
