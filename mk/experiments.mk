# Experiments (docs/results.md): include from the main Makefile with
#   include mk/experiments.mk
# experiments   the cut sweep on Fashion-MNIST: exact split at c = 0 (centralized) .. 1 (local-only),
#               FedAvg at the same steps and at the same training FLOPs, renoise at the inner c;
#               resumable point by point, stops between points after EXP_HOURS (run it again to
#               continue). About 60-70 min on 2 shared CPU cores with docs/results/sweep_config.json.
# experiments-summary  rebuild the tables and plots from the finished points only
# advise        recommend a cut from the sweep (EXP_MAX_REID, EXP_MAX_SHARE)

EXP_PYTHON ?= .venv/bin/python
EXP_OUT ?= runs/experiments
EXP_CONFIG ?= docs/results/sweep_config.json
EXP_HOURS ?= 2
EXP_MAX_REID ?= 0.2
EXP_MAX_SHARE ?= 0.9

.PHONY: experiments experiments-summary advise

experiments:
	$(EXP_PYTHON) -m collafuse.experiments sweep --out $(EXP_OUT) --config $(EXP_CONFIG) \
		--fractions 0,0.2,0.4,0.6,0.8,1.0 --modes exact,renoise --fedavg --round-steps 30 \
		--max-hours $(EXP_HOURS)

experiments-summary:
	$(EXP_PYTHON) -m collafuse.experiments sweep --out $(EXP_OUT) --summarize

advise:
	$(EXP_PYTHON) -m collafuse.experiments advise --sweep $(EXP_OUT) \
		--max-reid $(EXP_MAX_REID) --max-site-share $(EXP_MAX_SHARE)

# experiments-publish  copy the sweep's tables, JSON, plots and per-point reports into docs/results/
.PHONY: experiments-publish
experiments-publish:
	mkdir -p docs/results/plots docs/results/points
	cp $(EXP_OUT)/summary.json $(EXP_OUT)/summary.md $(EXP_OUT)/sweep.json docs/results/
	cp $(EXP_OUT)/plots/*.png docs/results/plots/
	for d in $(EXP_OUT)/points/*/; do n=$$(basename $$d); case $$n in *.partial) continue;; esac; \
		mkdir -p docs/results/points/$$n; cp $$d/report.json docs/results/points/$$n/; done
