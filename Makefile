# calibjob: install, run and test. Works on Linux x86_64 (CPU or NVIDIA) and macOS arm64.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
UNAME  := $(shell uname -s)
MODEL  ?= tiny
OUT    ?= out

# MLX backend: mlx[cpu] on Linux (default) or mlx[cuda13] with `make install MLX=cuda`;
# plain mlx (Metal) on macOS.
ifeq ($(UNAME),Darwin)
  MLX   ?=
else
  MLX   ?= cpu
endif
comma  := ,
EXTRAS := s3$(if $(MLX),$(comma)$(MLX))

.PHONY: install install-test dry-run test test-fast lint bench clean

# a user's runtime: calibjob, MLX, DiffusionKit and what its MLX code imports (no torch,
# coremltools or argmaxtools), obstore for S3 stores
install: $(VENV)/.installed
# the runtime plus what the tests and the linter need (the `test` extra)
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml Makefile
	@if [ "$(UNAME)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas.so.0; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing OpenBLAS (MLX CPU runs ~30x faster with it)"; \
	    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null; \
	  else echo "note: no OpenBLAS and no root: MLX CPU will use the slow reference BLAS"; fi; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@# transformers (DiffusionKit's T5 config and tokenizer) ships 560 model families, whose
	@# bytecode pip compiles up front: 69 MB of a 513 MB .venv. It is dropped for the families
	@# calibjob never imports (Python compiles a module again should one ever be imported).
	$(BIN)/python -c 'import pathlib, shutil, transformers; \
	  used = {"t5", "auto", "encoder_decoder"}; \
	  [shutil.rmtree(p) for p in (pathlib.Path(transformers.__file__).parent / "models").glob("*/__pycache__") if p.parent.name not in used]' 2>/dev/null
	@# DiffusionKit pins mlx==0.17.3 (macOS-only, no CUDA) and requires torch and argmaxtools
	@# for its PyTorch code: install it without its requirements; pyproject.toml lists what its
	@# MLX code imports, and calibjob/diffusionkit_imports.py stands in for the rest.
	$(BIN)/pip install -q --no-deps diffusionkit==0.5.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[$(EXTRAS),test]"
	touch $@

# the dry run's outputs, named by model: `make dry-run MODEL=sd3-medium` keeps the tiny ones
DRY    := $(OUT)/dry-run$(if $(filter tiny,$(MODEL)),,-$(MODEL))
DRYNPZ := $(OUT)/dry_run$(if $(filter tiny,$(MODEL)),,_$(MODEL))_cali.npz

# FLUX.1 models (tiny-flux, tiny-flux-dev, flux-schnell, flux-dev) take FLUX.1's dry-run protocol
DRYJOB := $(if $(findstring flux,$(MODEL)),dry-run-flux,dry-run)

dry-run: install
	rm -rf $(DRY).zarr $(DRYNPZ) $(DRY)-profile*
	mkdir -p $(OUT)
	$(BIN)/calibjob run --job $(DRYJOB) --model-version $(MODEL) --store $(DRY).zarr --shard 0/2
	$(BIN)/calibjob run --job $(DRYJOB) --model-version $(MODEL) --store $(DRY).zarr --shard 1/2
	$(BIN)/calibjob status $(DRY).zarr
	$(BIN)/calibjob merge $(DRY).zarr -o $(DRYNPZ)
	$(BIN)/calibjob profile $(DRYNPZ) --store $(DRY)-profile.zarr
	$(BIN)/calibjob profile-report $(DRY)-profile.zarr -o $(DRY)-profile --export $(DRY)-profile/stats.npz

# every tier: the job core, the tiny model in-process, the CLI end to end, Slurm and S3
test: install-test
	$(BIN)/pytest -q --durations=5

# the inner loop (a few minutes): the job core against a fake job and the tiny model in-process
test-fast: install-test
	$(BIN)/pytest -q -m "core or model"

lint: install-test
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/cpu.py

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
