"""stage=dpo and stage=kto: preference optimisation, as a recipe over the SFT recipe's parts (data, model,
distributed, checkpoints, export). What differs is small and lives here: the data are twos of samples (a pair's
chosen and rejected sides; a labelled sample and its KL sample), a step's objective is preference.PreferenceLoss
(DPO) or kto.KTOLoss against a reference model, and evaluation scores the held-out twos with that objective.

The reference is the run's starting point. Under LoRA it is the model itself with its adapters off (and its
learnable λ at their start), so there is no second copy in memory; under full fine-tuning it is a frozen copy
taken before the first step, in eval mode, sharded like the policy under FSDP (and not wrapped under DDP: it
has no gradients to reduce). With stage.precompute_reference its log-probs of every pair are computed once from
the starting model, before the first step, and cached with the data (training/reference.py): no reference in
memory, and no reference forward per step."""

from __future__ import annotations

import copy

from hsa_train.data.dataset import pair_eval_batches
from hsa_train.data.pipeline import View
from hsa_train.training import distributed as D
from hsa_train.training.kto import KTOLoss
from hsa_train.training.preference import PreferenceLoss, adapters_off, frozen_copy
from hsa_train.training.recipe import Recipe
from hsa_train.training.reference import reference_table, weights_digest
from hsa_train.training.report import preference_eval_line, preference_eval_log, preference_eval_summary
from hsa_train.training.step import make_forward


class PreferenceRecipe(Recipe):
    pairs = True

    @property
    def unit(self) -> str:
        return "labelled samples" if self.run.stage.labelled else "pairs"

    def _before_wrap(self, model) -> None:
        self.reference_model, self.eval_reference = None, {}
        if self.run.stage.precompute_reference:
            self._precompute_reference(model)
            return
        if self.lora:
            return
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        if self.info.mode == "fsdp":  # sharded as the policy is: each rank keeps its share of the copy
            mixed = self.autocast_dtype is not None and self.device.type == "cuda"
            reference = D.wrap(reference, self.info, self.device, mixed_bf16=mixed)
        self.reference_model = reference

    def _precompute_reference(self, model) -> None:
        """Every pair's reference log-probs under the starting model, before the first step: the training pool's
        (the held-out split's among them), then each eval set's (training.reference; cached with the data)."""
        training = model.training
        model.eval()
        forward = make_forward(model, self.device, self.autocast_dtype, self.run.hsa.enabled)
        model_key = f"{weights_digest(model)}|{self.autocast_dtype}"
        cached = []

        def table(pairs):
            values, hit = reference_table(
                forward, pairs, model_key, self.cfg.eval_batch_size, self.collator, self.info, self.device,
                self.data.cache_root,
            )  # fmt: skip
            cached.append(hit)
            return values

        train = self.data.train
        train.reference = table(train.pool)
        held = self.eval_samples
        if isinstance(held, View) and held.pool is train.pool:  # the split held out of the training pool
            self.eval_reference["eval"] = train.reference[held.ids]
        elif len(held):
            self.eval_reference["eval"] = table(held)
        for name, pairs in self.extra_evals.items():
            self.eval_reference[name] = table(pairs)
        model.train(training)
        self.reference_cached = all(cached)
        where = "from the cache" if all(cached) else "computed" + (", cached" if self.data.cache_root else "")
        self._notes.append(f"reference: log-probs of the starting model for {len(train.pool)} {self.unit} ({where})")

    def _objective(self) -> PreferenceLoss | KTOLoss:
        st, use_hsa = self.run.stage, self.run.hsa.enabled
        if st.precompute_reference:  # every batch brings its reference log-probs
            reference = None
        elif self.reference_model is None:  # LoRA: the policy's own module (unwrapped: no DDP hooks), adapters off
            forward = make_forward(D.unwrap(self.model), self.device, self.autocast_dtype, use_hsa)
            reference = adapters_off(self.model, forward)
        else:
            reference = frozen_copy(make_forward(self.reference_model, self.device, self.autocast_dtype, use_hsa))
        if st.labelled:
            return KTOLoss(reference, st.beta, st.desirable_weight, st.undesirable_weight)
        return PreferenceLoss(reference, st.beta, st.label_smoothing, st.loss)

    def evaluate_samples(self, samples, generate: bool = False, name: str = "eval") -> dict | None:
        """The objective over the held-out twos, split over the ranks with the same number of forwards on each and
        summed over all of them (eval.generate is refused for these stages at validation)."""
        if not samples:
            return None
        self.model.eval()
        info, reference, size = self.info, self.eval_reference.get(name), self.cfg.eval_batch_size

        def batches():
            return pair_eval_batches(samples, size, self.collator, info.rank, info.world, reference)

        result = self.objective.evaluate(self.forward, batches, lambda v: D.all_reduce_sum(v, self.device, info))
        self.model.train()
        return result

    def eval_report(self, name: str, prefix: str, result: dict) -> tuple[str, dict[str, float]]:
        return preference_eval_line(name, result), preference_eval_log(prefix, result)

    def eval_summary(self, result: dict | None) -> dict:
        return preference_eval_summary(result, self.run.stage.labelled)

    def stage_metrics(self) -> dict:
        """metrics.json `reference`: which reference the run compared against (and, precomputed, whether its
        log-probs came from the cache)."""
        if self.run.stage.precompute_reference:
            return {"reference": {"kind": "precomputed", "from_cache": self.reference_cached}}
        return {"reference": {"kind": "frozen_copy" if self.reference_model is not None else "adapters_off"}}
