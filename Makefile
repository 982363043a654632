# vaebuild developer commands: `make demo` (the main job) and `make test`; both install on first use.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
# On the project's CPU-only machines pip's find-links hold the CPU build of this torch release,
# so this pin never pulls the multi-GB CUDA stack there. On a GPU host, install your own torch first.
TORCH_SPEC ?= torch==2.13.0
INSTALLED := $(VENV)/.installed
DEMO ?= build/demo

.PHONY: install test demo clean

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet -e ".[rtx,test]"
	touch $@

install: $(INSTALLED)

test: $(INSTALLED)
	$(PYTHON) -m pytest -q

# Main job on the embedded default: export the full-size Qwen-Image VAE architecture with seeded random
# weights and build the five T2I static engine pairs and the nine-profile I2I pair with TensorRT-RTX
# (its builder runs without a GPU).
demo: $(INSTALLED)
	$(VENV)/bin/vaebuild static --random-init --backend tensorrt_rtx --out $(DEMO)/static
	$(VENV)/bin/vaebuild multiprofile --onnx $(DEMO)/static/onnx --backend tensorrt_rtx --out $(DEMO)/multiprofile

clean:
	rm -rf build
