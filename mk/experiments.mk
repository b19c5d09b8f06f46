# Experiments (docs/results.md): included from the main Makefile.
# experiments          the cut sweep on Fashion-MNIST for one seed (EXP_SEED): the exact split at
#                      c = 0 (centralized) .. 1 (local-only), FedAvg at the same steps and at the
#                      same training FLOPs, renoise at the inner c; resumable point by point, stops
#                      between points after EXP_HOURS (run it again to continue).
#                      docs/results.md gives the wall times measured on 2 CPU cores.
# experiments-budget   the same sweep at EXP_BUDGET_STEPS (4x) steps per model, at the cuts that
#                      carry the story (centralized, mid, default, local-only) and FedAvg: does
#                      the ranking hold with more training? Resumable like experiments.
# experiments-summary  rebuild one seed's tables and plots from its finished points only
# experiments-inception  Inception FID (about 0.5 s per image per core) of EXP_INCEPTION_POINTS
# experiments-seeds    group the seeds' sweeps point by point (mean and range), the budget
#                      sweeps' too (those that exist)
# advise               recommend a cut from the seeds' mean curves (EXP_MAX_REID, EXP_MAX_SHARE)
# experiments-publish  copy tables, JSON, plots and per-point reports of the seeds' and the budget
#                      sweeps (EXP_PUBLISH), and the budget sweep's sample grids, into docs/results/

EXP_PYTHON ?= .venv/bin/python
EXP_SEED ?= 0
EXP_SEEDS ?= 0 1
EXP_OUT_PREFIX ?= runs/experiments/seed-
EXP_OUT ?= $(EXP_OUT_PREFIX)$(EXP_SEED)
EXP_CONFIG ?= docs/results/sweep_config.json
EXP_FRACTIONS ?= 0,0.2,0.4,0.6,0.8,0.9,1.0
EXP_MODES ?= exact,renoise
EXP_HOURS ?= 2
EXP_MAX_REID ?= 0.2
EXP_MAX_SHARE ?= 0.95
EXP_INCEPTION_POINTS ?= exact-c0.00,exact-c0.40,exact-c0.60,exact-c0.90,exact-c1.00,fedavg-compute
EXP_DOCS ?= docs/results
EXP_BUDGET_STEPS ?= 1600
EXP_BUDGET_FRACTIONS ?= 0,0.6,0.9,1.0
EXP_BUDGET_OUT ?= runs/experiments/budget-$(EXP_BUDGET_STEPS)-seed-$(EXP_SEED)
EXP_PUBLISH ?= $(addprefix $(EXP_OUT_PREFIX),$(EXP_SEEDS)) \
	$(foreach s,$(EXP_SEEDS),runs/experiments/budget-$(EXP_BUDGET_STEPS)-seed-$(s))
BUDGET_SWEEPS = $(wildcard $(foreach s,$(EXP_SEEDS),runs/experiments/budget-$(EXP_BUDGET_STEPS)-seed-$(s)))
EXP_PUBLISH_GRIDS ?= runs/experiments/budget-$(EXP_BUDGET_STEPS)-seed-0

.PHONY: experiments experiments-budget experiments-summary experiments-inception experiments-seeds advise \
	experiments-publish

experiments:
	$(EXP_PYTHON) -m collafuse.experiments sweep --out $(EXP_OUT) --config $(EXP_CONFIG) \
		--fractions $(EXP_FRACTIONS) --modes $(EXP_MODES) --fedavg --round-steps 50 \
		--seed $(EXP_SEED) --threads 1 --max-hours $(EXP_HOURS)

experiments-budget:
	$(EXP_PYTHON) -m collafuse.experiments sweep --out $(EXP_BUDGET_OUT) --config $(EXP_CONFIG) \
		--fractions $(EXP_BUDGET_FRACTIONS) --modes exact --fedavg --round-steps 50 \
		--steps $(EXP_BUDGET_STEPS) --seed $(EXP_SEED) --threads 1 --max-hours $(EXP_HOURS)

experiments-summary:
	$(EXP_PYTHON) -m collafuse.experiments sweep --out $(EXP_OUT) --summarize

experiments-inception:
	$(EXP_PYTHON) -m collafuse.experiments inception --sweep $(EXP_OUT) \
		--points $(EXP_INCEPTION_POINTS)

experiments-seeds:
	$(EXP_PYTHON) -m collafuse.experiments seeds $(addprefix $(EXP_OUT_PREFIX),$(EXP_SEEDS)) \
		--out runs/experiments
	$(if $(BUDGET_SWEEPS),$(EXP_PYTHON) -m collafuse.experiments seeds $(BUDGET_SWEEPS) \
		--out runs/experiments/budget-$(EXP_BUDGET_STEPS)-seeds)

advise:
	$(EXP_PYTHON) -m collafuse.experiments advise \
		--sweep $(addprefix $(EXP_OUT_PREFIX),$(EXP_SEEDS)) \
		--max-reid $(EXP_MAX_REID) --max-site-share $(EXP_MAX_SHARE)

experiments-publish:
	for src in $(EXP_PUBLISH); do dst=$(EXP_DOCS)/$$(basename $$src); \
		[ -d $$src ] || continue; mkdir -p $$dst/plots; \
		cp $$src/summary.json $$src/summary.md $$src/sweep.json $$dst/; \
		cp $$src/plots/*.png $$dst/plots/; \
		for d in $$src/points/*/; do n=$$(basename $$d); case $$n in *.partial) continue;; esac; \
			mkdir -p $$dst/points/$$n; cp $$d/report.json $$dst/points/$$n/; \
			case " $(EXP_PUBLISH_GRIDS) " in *" $$src "*) cp $$d/samples_*.png $$dst/points/$$n/;; esac; \
		done; \
	done
	for src in runs/experiments runs/experiments/budget-$(EXP_BUDGET_STEPS)-seeds; do \
		[ -f $$src/seeds.json ] || continue; \
		case $$src in runs/experiments) dst=$(EXP_DOCS);; *) dst=$(EXP_DOCS)/$$(basename $$src);; esac; \
		mkdir -p $$dst/plots; cp $$src/seeds.json $$src/seeds.md $$dst/; \
		cp $$src/plots/seeds_fid.png $$dst/plots/; \
	done

# Your own colour images (README, "Your own data"; docs/results.md, "Colour images"): Noto emoji
# from Debian's ruby-tanuki-emoji as seven class folders, and the federation on them with the
# defaults of `make run` at 3x32x32, and at 1x64x64 with fewer steps and a few-step sampler.
COLOUR_PKG ?= ruby-tanuki-emoji=0.6.0-2
COLOUR_DATA ?= .cache/emoji
COLOUR_OUT ?= runs/colour
COLOUR_64_ARGS ?= --steps 250 --samples-per-site 100 --sampler dpmpp-2m-sde --sample-steps 10 10

.PHONY: colour-data colour-run colour-run-64

colour-data: $(STAMP)  ## Noto emoji (Debian's ruby-tanuki-emoji) as class folders in COLOUR_DATA
	@if [ -d /usr/share/rubygems-integration/all/gems/tanuki_emoji-0.6.0 ]; then root=/; else \
	  mkdir -p .cache/colour-pkg && cd .cache/colour-pkg && \
	  { ls ruby-tanuki-emoji_*.deb >/dev/null 2>&1 || apt-get download $(COLOUR_PKG); } && \
	  dpkg-deb -x ruby-tanuki-emoji_*.deb . && cd ../.. && root=.cache/colour-pkg; fi; \
	$(PY) scripts/emoji_data.py --out $(COLOUR_DATA) --package-root $$root

colour-run: $(STAMP)  ## the federation on COLOUR_DATA at 3x32x32 (make colour-data first)
	$(VENV)/bin/collafuse stack run --out $(COLOUR_OUT)-32 --overwrite --data $(COLOUR_DATA) \
	  --image-size 32 --channels 3 $(RUN_ARGS)

colour-run-64: $(STAMP)  ## the same at 1x64x64 (grey), fewer steps and a few-step sampler
	$(VENV)/bin/collafuse stack run --out $(COLOUR_OUT)-64 --overwrite --data $(COLOUR_DATA) \
	  --image-size 64 --channels 1 $(COLOUR_64_ARGS) $(RUN_ARGS)
