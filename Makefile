# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install brainmclip with the exact versions of
# constraints.txt; when .venv is up to date (stamp newer than pyproject.toml and
# constraints.txt) they skip the install and start at once.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.brainmclip-installed
DEMO_OUT ?= runs/demo
PIP_FLAGS ?= --quiet --progress-bar off

MINI_OUT ?= runs/miniature
MINI_WEIGHTS := src/brainmclip/miniature/weights

PAPER_OUT ?= $(DEMO_OUT)/paper
PAPER_SUBJECT ?= subj01
PAPER_DATA := $(DEMO_OUT)/prepared/$(PAPER_SUBJECT)
PAPER_FEATURES := $(DEMO_OUT)/features/mini
MINI_EVAL := --generator mini --clip mini --allow-random-metric-nets

.PHONY: demo test install lock clean miniature paper

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing brainmclip and its pinned dependencies into $(VENV) (first time: a few minutes)"
	$(BIN)/python -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/brainmclip demo --out $(DEMO_OUT)

# Tests run in TEST_WORKERS processes of one thread each: the models under test are small, and one thread per
# process is faster than two threads sharing a core pair (and does not stall when the machine is busy).
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# Train the three miniature models from scratch (about an hour on 2 CPU cores; each step resumes) and ship them:
# the package's weights are exactly what these commands write to $(MINI_OUT)/*/model.
miniature: $(STAMP)
	$(BIN)/brainmclip miniature train clip --out $(MINI_OUT)/clip --cache $(MINI_OUT)/cache
	$(BIN)/brainmclip miniature train vd --clip $(MINI_OUT)/clip/model --out $(MINI_OUT)/vd --cache $(MINI_OUT)/cache
	$(BIN)/brainmclip miniature train sd --clip $(MINI_OUT)/clip/model --vae $(MINI_OUT)/vd/model --out $(MINI_OUT)/sd \
	    --cache $(MINI_OUT)/cache
	rm -rf $(MINI_WEIGHTS) && mkdir -p $(MINI_WEIGHTS)
	for m in clip vd sd; do cp -r $(MINI_OUT)/$$m/model $(MINI_WEIGHTS)/$$m; done

# The BrainMCLIP paper's ablation tables and analyses on the demo's data (one subject, miniature world; every
# step resumes), then the demo report again with them as sections. Runs the demo first if it has not run.
paper: $(STAMP)
	@test -f $(DEMO_OUT)/evaluation/metrics.json || $(BIN)/brainmclip demo --out $(DEMO_OUT)
	$(BIN)/brainmclip ablate --table 3 --data $(PAPER_DATA) --features $(PAPER_FEATURES) --out $(PAPER_OUT)/ablations \
	    --config brain_mclip_tiny $(MINI_EVAL)
	$(BIN)/brainmclip ablate --table 4 --data $(PAPER_DATA) --features $(PAPER_FEATURES) --out $(PAPER_OUT)/ablations \
	    --config brain_mclip_tiny $(MINI_EVAL)
	$(BIN)/brainmclip analyze rsa --data $(PAPER_DATA) --clip mini --out $(PAPER_OUT)/analyses/rsa
	$(BIN)/brainmclip analyze layer-cka --data $(PAPER_DATA) --clip mini --out $(PAPER_OUT)/analyses/layer_cka
	$(BIN)/brainmclip analyze layer-sweep --data $(PAPER_DATA) --clip mini --generator mini \
	    --out $(PAPER_OUT)/analyses/layer_sweep
	$(BIN)/brainmclip analyze gt-layers --data $(PAPER_DATA) --clip mini --generator mini \
	    --out $(PAPER_OUT)/analyses/gt_layers
	$(BIN)/brainmclip analyze backproject --data $(PAPER_DATA) --features $(PAPER_FEATURES) \
	    --predictions $(DEMO_OUT)/runs/$(PAPER_SUBJECT)/brain_mclip/predictions_test --out $(PAPER_OUT)/analyses/backproject
	$(BIN)/brainmclip report --eval $(DEMO_OUT)/evaluation --out $(DEMO_OUT)/report \
	    --analyses $(PAPER_OUT)/ablations $(PAPER_OUT)/analyses

# Re-resolve the pinned stack in a scratch venv and rewrite constraints.txt.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install $(PIP_FLAGS) -r requirements-lock.in
	{ echo "# Exact versions of every package brainmclip installs (make demo / make test use them as pip constraints)."; \
	  echo "# Regenerate with: make lock (resolves requirements-lock.in in a scratch venv, then pip freeze)."; \
	  .lock-venv/bin/pip freeze --all | grep -v -E '^(pip|brainmclip)[=@ ]'; } > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) runs .pytest_cache
