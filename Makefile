# gspn-gen: `make demo` (train -> sample -> score on the embedded digits) and `make test` on a fresh machine.
# Override TORCH to pick another torch build, e.g. make demo TORCH="torch torchvision".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,vae,cuda13
DEMO_DIR ?= runs/demo
# samples.npz is drawn at the guidance scale that the sweep (`python -m gspn_gen.sweep`) found best for FID on the demo
# checkpoint (README: "What the demo gives"); the grid at 4, where digits look sharpest.
DEMO_CFG ?= 1.5

.PHONY: install demo test lint clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# Training continues the run in $(DEMO_DIR) if there is one (a finished run trains nothing more); the
# outputs are drawn again from its checkpoint and replace the previous ones.
demo: install
	$(PY) train_gen.py fit --config configs/experiments/demo_digits.yaml --ckpt_path last
	$(PY) sample.py --ckpt $(DEMO_DIR)/checkpoints/last.ckpt --classes 0 1 2 3 4 5 6 7 8 9 --per-class 10 --steps 25 \
		--cfg-scale 4 --out $(DEMO_DIR)/grid.png --overwrite
	$(PY) sample.py --ckpt $(DEMO_DIR)/checkpoints/last.ckpt --num-samples 1000 --cfg-scale $(DEMO_CFG) --steps 25 \
		--out $(DEMO_DIR)/samples.npz --overwrite
	$(PY) -m fid_eval --samples $(DEMO_DIR)/samples.npz --ref digits:val --extractor digits --device cpu \
		--out $(DEMO_DIR)/metrics.json --overwrite
	@echo "demo outputs: $(DEMO_DIR)/checkpoints/last.ckpt $(DEMO_DIR)/grid.png $(DEMO_DIR)/samples.npz $(DEMO_DIR)/metrics.json"

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf $(DEMO_DIR)
